"""Progress of long work: a tqdm bar on a terminal, whole lines in a log file, nothing when quiet.

`progress(iterable, desc=, total=, unit=)` is the one entry. Where it draws:
- quiet (`--quiet`, LMSQUEEZE_QUIET=1, set_quiet(True)): nothing;
- stderr is a terminal: a tqdm bar, redrawn in place;
- stderr is a file or a pipe (`lmsqueeze ... > log 2>&1`, CI): one line when a bar passes each
  10 % step (at most one every LINE_SECONDS) and one line when it ends, no carriage returns.
  A bar redrawn in place would leave hundreds of '\\r' updates in the file.

`first_step_estimate(unit, hint)` makes the bars over `unit` started inside it print, once their first
step is done, what that step took and the time all steps will take at that rate, plus `hint` (how to
make it shorter). The CLI wraps compression in it: the first layer's time, times the layers.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

from tqdm.auto import tqdm

_quiet = os.environ.get("LMSQUEEZE_QUIET", "0") == "1"
_estimates: dict[str, str] = {}  # unit -> hint, for the bars that announce their estimate

STEP_PERCENT = 10
LINE_SECONDS = 10.0  # a log line per step at most this often; a bar's last line is always written


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


@contextlib.contextmanager
def first_step_estimate(unit: str, hint: str = ""):
    """Inside: bars over `unit` print the time of their first step and the estimate for all of them."""
    before = _estimates.get(unit)
    _estimates[unit] = hint
    try:
        yield
    finally:
        if before is None:
            _estimates.pop(unit, None)
        else:
            _estimates[unit] = before


def _on_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(iterable=None, **kwargs):
    """A progress bar over `iterable`; kwargs as tqdm's (desc, total, unit, leave, ...)."""
    if _quiet:
        return tqdm(iterable, disable=True, **kwargs)
    unit = kwargs.get("unit", "it")
    if _on_terminal():
        kwargs.setdefault("dynamic_ncols", True)
        kwargs.setdefault("leave", False)
        bar = tqdm(iterable, **kwargs)
    else:
        bar = LineProgress(iterable, **kwargs)
    if unit in _estimates and iterable is not None:
        return _FirstStep(bar, _estimates[unit])
    return bar


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _write(line: str) -> None:
    if _on_terminal():
        tqdm.write(line, file=sys.stderr)  # above the bar, which is redrawn below it
    else:
        print(line, file=sys.stderr, flush=True)


class LineProgress:
    """The part of tqdm's interface lmsqueeze uses (iterate, update, set_postfix_str, set_description,
    close, context manager), written as whole lines to stderr."""

    def __init__(self, iterable=None, desc: str | None = None, total: int | None = None, unit: str = "it",
                 **_tqdm_only):
        self.iterable = iterable
        self.desc = desc or ""
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.unit, self.n = total, unit, 0
        self.postfix = ""
        self.start = self.last_line = time.perf_counter()
        self.last_step = 0
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def _line(self, what: str, postfix: bool = True) -> None:
        head = f"{self.desc}: " if self.desc else ""
        tail = f" [{self.postfix}]" if self.postfix and postfix else ""
        print(f"lmsqueeze: {head}{what}{tail}", file=sys.stderr, flush=True)
        self.last_line = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.total:
            step = int(100 * self.n / self.total) // STEP_PERCENT
            if step > self.last_step and self.n < self.total and now - self.last_line >= LINE_SECONDS:
                self.last_step = step
                left = (now - self.start) * (self.total - self.n) / self.n
                self._line(f"{self.n}/{self.total} {self.unit} ({100 * self.n // self.total}%), "
                           f"{_duration(now - self.start)}, about {_duration(left)} left")
        elif now - self.last_line >= LINE_SECONDS:
            self._line(f"{self.n} {self.unit}, {_duration(now - self.start)}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        total = f"/{self.total}" if self.total else ""
        self._line(f"{self.n}{total} {self.unit} in {_duration(time.perf_counter() - self.start)}", postfix=False)


class _FirstStep:
    """A bar that, when its first step is done, says what it took and what all steps will take."""

    def __init__(self, bar, hint: str):
        self.bar, self.hint = bar, hint

    def __iter__(self):
        total = getattr(self.bar, "total", None)
        t0 = None
        for k, item in enumerate(self.bar):
            if k == 0:
                t0 = time.perf_counter()
            elif k == 1 and total:
                took = time.perf_counter() - t0
                desc = f"{self.bar.desc}: " if getattr(self.bar, "desc", "") else ""
                unit = getattr(self.bar, "unit", "step")
                hint = f"; {self.hint}" if self.hint else ""
                _write(f"lmsqueeze: {desc}the first {unit} took {_duration(took)}: about "
                       f"{_duration(took * total)} for all {total}{hint}")
            yield item

    def __getattr__(self, name):
        return getattr(self.bar, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
