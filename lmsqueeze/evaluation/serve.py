"""An OpenAI-compatible chat-completions server over the engine's Backend (aiohttp), for judges and tests.

    python -m lmsqueeze.evaluation.serve --model smollm2-135m --port 8000
    # then: EndpointJudge("http://127.0.0.1:8000/v1") or any OpenAI client

Endpoints: `POST /v1/chat/completions` (fields read: messages, max_tokens or max_completion_tokens,
temperature, top_p, n, seed; no streaming, no tools) and `GET /v1/models`. The conversation goes through
the model's chat template with the generation prompt (`judge.chat_ids`); temperature 0 (or absent) is
greedy, otherwise sampled with the engine's seeded sampler. One model, one request at a time (a lock
around generation). A request the server cannot honour gets HTTP 400 with an OpenAI-style error body
naming the bad field. It serves a loopback address by default; it has no authentication.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger("lmsqueeze")


class BadRequest(Exception):
    pass


def _number(body: dict, name: str, default, kind, low=None, high=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise BadRequest(f"'{name}' must be a {kind.__name__}, got {v!r}")
    v = kind(v)
    if (low is not None and v < low) or (high is not None and v > high):
        raise BadRequest(f"'{name}' must be in [{low}, {high}], got {v}")
    return v


class ChatServer:
    """Holds the model; `complete(body)` answers one chat-completions request body (a dict)."""

    def __init__(self, backend, model_name: str, default_max_tokens: int = 256):
        self.backend, self.model_name, self.default_max_tokens = backend, model_name, default_max_tokens
        self._lock = threading.Lock()
        self.requests = 0

    def complete(self, body: dict) -> dict:
        from lmsqueeze.evaluation.judge import chat_ids

        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects with string content")
        if body.get("stream"):
            raise BadRequest("'stream' is not supported by this server")
        max_tokens = _number(body, "max_completion_tokens", None, int, 1) or \
            _number(body, "max_tokens", self.default_max_tokens, int, 1)
        temperature = _number(body, "temperature", 0.0, float, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, float, 0.0, 1.0)
        n = _number(body, "n", 1, int, 1, 16)
        seed = _number(body, "seed", 0, int)
        if top_p == 0:
            raise BadRequest("'top_p' must be > 0")
        sample = temperature > 0
        if n > 1 and not sample:
            raise BadRequest("'n' > 1 needs temperature > 0 (greedy decoding gives one answer)")
        with self._lock:
            self.requests += 1
            ids = chat_ids(self.backend, messages)
            gen = self.backend.generate([ids], max_tokens, sample=sample, temperature=temperature or 1.0,
                                        top_p=top_p, k=n, seed=seed, desc="serve")
        new = gen.new_tokens[0]
        choices = [{"index": j, "message": {"role": "assistant", "content": text},
                    "finish_reason": "length" if new[j] >= max_tokens else "stop"}
                   for j, text in enumerate(gen.texts[0])]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": gen.prompt_tokens[0], "completion_tokens": sum(new),
                          "total_tokens": gen.prompt_tokens[0] + sum(new)}}


def make_app(server: ChatServer):
    from aiohttp import web

    def error(status: int, message: str, kind: str = "invalid_request_error"):
        return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": None}},
                                 status=status)

    async def chat(request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not valid JSON")
        try:
            out = await asyncio.get_running_loop().run_in_executor(None, server.complete, body)
        except BadRequest as exc:
            return error(400, str(exc))
        except Exception as exc:  # the client gets a 500 it may retry; the server log has the traceback
            log.exception("chat completion failed")
            return error(500, f"generation failed: {exc}", "server_error")
        return web.json_response(out)

    async def models(request):
        return web.json_response({"object": "list", "data": [
            {"id": server.model_name, "object": "model", "created": 0, "owned_by": "lmsqueeze"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "fp32", device: str = "cpu",
          port_file: str | None = None, max_tokens: int = 256) -> None:
    """Load `model` and serve it until interrupted. port 0 picks a free port; port_file receives the port
    actually bound (written once the server accepts connections)."""
    from aiohttp import web

    from lmsqueeze.evaluation.backend import Backend
    from lmsqueeze.models import load_model

    m, tok = load_model(model, dtype=dtype, device=device)
    server = ChatServer(Backend(m, tok, name="serve"), model, max_tokens)

    async def run():
        runner = web.AppRunner(make_app(server), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]
        log.warning("serving %s at http://%s:%d/v1", model, host, bound)
        if port_file:
            tmp = Path(port_file).with_suffix(".tmp")
            tmp.write_text(str(bound))
            tmp.replace(port_file)
        await asyncio.Event().wait()

    asyncio.run(run())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmsqueeze.evaluation.serve",
                                description="OpenAI-compatible chat-completions server over one model.")
    p.add_argument("--model", required=True, help="builtin name, local directory, .gguf file or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; see --port-file)")
    p.add_argument("--port-file", default=None, help="write the bound port here once serving")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        serve(a.model, a.host, a.port, a.dtype, a.device, a.port_file, a.max_tokens)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
