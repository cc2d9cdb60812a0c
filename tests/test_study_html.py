"""report.html in a real headless browser: Chromium from the system packages (`make browser` installs it).

The page must render with no console message at all (it logs nothing, so any message is an error or
a warning), its tables must sort (here through the #sort= link, which runs the same code as a click),
and the screenshot must show a page, not a blank.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmsqueeze.study.html import render_html
from lmsqueeze.study.runner import read_results

FIXTURE = Path(__file__).parent / "fixtures" / "study"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH: `make browser` installs it")
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]? (.*)")


def chromium(url: str, *args: str) -> tuple[str, list[str]]:
    """(stdout, console messages) of headless Chromium on `url`."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--enable-logging=stderr", "--v=0", *args, url]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, [m.group(1) for m in map(CONSOLE.search, run.stderr.splitlines()) if m]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """report.html of the fixture study, with one real SVG plot inline (drawn at once, no PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = tmp_path_factory.mktemp("html")
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.errorbar([0, 1], [20, 30], yerr=[[2, 3], [2, 3]], marker="o")
    ax.set_title("ppl")
    fig.savefig(d / "ppl.svg")
    plt.close(fig)
    path = d / "report.html"
    path.write_text(render_html(read_results(FIXTURE), [(d / "ppl.svg", "a caption")]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def browsed(page):
    """One Chromium run on the page opened sorted by ppl, descending: (DOM after the scripts ran, console
    messages, screenshot path)."""
    shot = page.with_name("screenshot.png")
    dom, console = chromium(page.as_uri() + "#sort=headline:3:desc", f"--screenshot={shot}", "--dump-dom",
                            "--window-size=1280,1800")
    return dom, console, shot


def test_html_renders_in_headless_chromium_without_console_messages(browsed):
    from PIL import Image

    _, console, shot = browsed
    assert console == []
    with Image.open(shot) as im:
        assert im.size == (1280, 1800)
        colours = im.convert("L").resize((64, 90)).getcolors(64 * 90)
    assert len(colours) > 20  # text, tables and the plot, not an empty page


def test_html_tables_sort_in_the_browser(browsed):
    dom, _, _ = browsed
    table = dom[dom.index('id="headline"'):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr data-i=\"\d+\">(.*?)</tr>", table)
    ppl = [float(re.findall(r"<td[^>]*>([^<]*)</td>", r)[3]) for r in rows]
    assert ppl == sorted(ppl, reverse=True) == [50.0, 30.0, 25.0, 24.0, 22.0, 21.0, 20.0]
    assert 'aria-sort="descending"' in table
    assert 'src="data:image/svg+xml;base64,' in dom and "<script src" not in dom and "<link rel=\"stylesheet\"" not in dom


def test_a_page_with_a_script_error_fails_the_check(tmp_path):
    """The check itself: a console error is seen (so the clean result above means something)."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    _, console = chromium(bad.as_uri(), "--dump-dom")
    assert any("undefinedFunction is not defined" in m for m in console)
