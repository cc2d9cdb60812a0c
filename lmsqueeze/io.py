"""Atomic writes (a file or directory appears whole or not at all) and text-file reads that fail in one line.

Reading: every text file a user hands us (calibration text, JSONL task files, dialect pairs, ...) goes
through `read_text_file` or `iter_jsonl`, so that a file which is not UTF-8 fails with one
LmsqueezeError naming the file, the line and the offending byte, instead of a UnicodeDecodeError
traceback that names a byte offset.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmsqueeze.errors import LmsqueezeError


def umask() -> int:
    """The process's umask (read by setting and restoring it: os has no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as JSON to a temporary file beside `path`, then rename it into place.

    mkstemp creates its file 0600; the finished file gets the mode a plain open() would give under the
    user's umask (0644 under the usual 022), so a colleague or a server running as another user can read
    the report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _decode_error(path, data: bytes, exc: UnicodeDecodeError, what: str) -> LmsqueezeError:
    """One line: file:line, the column, the bad bytes and what would be valid."""
    start = exc.start
    line = data.count(b"\n", 0, start) + 1
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1
    bad = data[start:max(exc.end, start + 1)]
    hint = " (0x80-0x9f and 0xa0-0xff alone are typical of cp1252/latin-1 text)" if len(bad) == 1 and bad[0] >= 0x80 else ""
    return LmsqueezeError(f"{path}:{line}: {what} is not UTF-8: byte(s) {bad.hex(' ')} at column {column} "
                          f"({exc.reason}){hint}; re-save the file as UTF-8, e.g. iconv -f cp1252 -t utf-8")


def read_text_file(path: str | os.PathLike, what: str = "text file") -> str:
    """The whole file decoded as UTF-8 (a leading byte-order mark is dropped; newlines are kept as written).

    `what` says what the file is for ("calibration text", "mc task file"); it is named in every error:
    a missing file, a directory, or bytes that are not UTF-8 (with the line and column).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise LmsqueezeError(f"{what} '{path}' does not exist") from None
    except IsADirectoryError:
        raise LmsqueezeError(f"{what} '{path}' is a directory, expected a file") from None
    except OSError as exc:
        raise LmsqueezeError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _decode_error(path, data, exc, what) from None
    return text.removeprefix("\ufeff")


def read_json_file(path: str | os.PathLike, what: str = "JSON file"):
    """The parsed JSON document; bad UTF-8 or bad JSON fails in one line naming the file and the line."""
    text = read_text_file(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LmsqueezeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}) in {what}") from None


def iter_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> Iterator[tuple[int, object]]:
    """(line number, record) for every non-blank line of a JSON-lines file, numbered from 1.

    The whole file is decoded first, so a bad byte anywhere fails before the first record is
    yielded (a caller never acts on half a file); bad JSON names its line.
    """
    text = read_text_file(path, what)
    # split on "\n" only: str.splitlines would also break at U+2028 and friends, which JSON strings may hold
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmsqueezeError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno}); {what} needs one JSON "
                                 f"value per line") from None
