"""Progress: a bar on a terminal, whole lines in a file, nothing when quiet; the first-step estimate."""
import io
import sys

import pytest

from lmsqueeze import progress as prog


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.fixture
def loud(monkeypatch):
    monkeypatch.setattr(prog, "_quiet", False)


class _Clock:
    """time.perf_counter for progress.py: each call moves `step` seconds on."""

    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


def test_a_file_gets_whole_lines_per_step_and_no_carriage_returns(monkeypatch, loud):
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(prog.time, "perf_counter", _Clock(20.0))  # every step looks slow: each 10 % prints
    bar = prog.progress(range(200), desc="sparsegpt", unit="layer")
    for i in bar:
        bar.set_postfix_str(f"layer {i}: solve")
    text = err.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10  # 10 %, 20 %, ..., 90 %, and the end
    assert lines[0].startswith("lmsqueeze: sparsegpt: 20/200 layer (10%), ") and "left [layer 19: solve]" in lines[0]
    assert lines[-1].startswith("lmsqueeze: sparsegpt: 200/200 layer in ") and "[" not in lines[-1]


def test_a_fast_bar_in_a_file_is_one_line(monkeypatch, loud):
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    assert list(prog.progress(range(1000), desc="ppl", unit="batch")) == list(range(1000))
    assert err.getvalue().splitlines() == [err.getvalue().strip()]
    assert err.getvalue().startswith("lmsqueeze: ppl: 1000/1000 batch in ")
    with prog.progress(total=3, desc="x") as bar:  # the update()/context-manager form
        bar.update(3)
    assert err.getvalue().splitlines()[-1].startswith("lmsqueeze: x: 3/3 it in ")


def test_a_terminal_gets_a_tqdm_bar_and_quiet_gets_nothing(monkeypatch, loud):
    err = _Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", err)
    assert list(prog.progress(range(5), desc="wanda", unit="layer", file=err)) == list(range(5))
    assert "\r" in err.getvalue() and "wanda" in err.getvalue()
    prog.set_quiet(True)
    try:
        quiet = _Stream(tty=False)
        monkeypatch.setattr(sys, "stderr", quiet)
        assert list(prog.progress(range(5), desc="wanda")) == list(range(5))
        assert quiet.getvalue() == ""
    finally:
        prog.set_quiet(False)


def test_first_step_estimate_is_said_once_for_the_asked_unit(monkeypatch, loud):
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(prog.time, "perf_counter", _Clock(0.5))
    with prog.first_step_estimate("layer", "shorter with --nsamples"):
        assert list(prog.progress(range(30), desc="rtn", unit="layer")) == list(range(30))
        list(prog.progress(range(4), desc="ppl", unit="batch"))
    assert "layer" not in prog._estimates  # the context restores what was there
    said = [ln for ln in err.getvalue().splitlines() if "first" in ln]
    # 0.5 s per clock reading: the first step spans two readings of the wrapper plus the bar's own
    assert len(said) == 1 and said[0].startswith("lmsqueeze: rtn: the first layer took ")
    took = float(said[0].split("took ")[1].split(" s")[0])
    assert f"about {took * 30:.0f} s for all 30; shorter with --nsamples" in said[0]
