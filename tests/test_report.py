"""`sslbench report`: the HTML page rendered in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from sslbench.cli import main

from .test_leaderboard import correct, knn, make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browser():
    """Playwright's Chromium API on the system's Chromium (no browser download). Outside CI a missing browser
    skips the test; in CI (`.ci/run` installs Debian's chromium) it fails."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium for this test")
        pytest.skip("no chromium on this machine (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    return sync_api.sync_playwright()


def test_report_renders_every_run_and_every_figure(tmp_path, capsys):
    start = str(tmp_path / "results" / "digits_mae" / "checkpoints" / "backbone.pt")
    blocks = lambda shift: [("per_block", "top1", {"k": 20, "block": b, "stream": "normed", "std": False},  # noqa: E731
                             correct(250 + 10 * b + shift)) for b in range(4)]
    root = tmp_path / "results"
    make_run(root, "digits_mae", [knn(correct(300)), *blocks(0)])
    make_run(root, "digits_mimrefiner", [knn(correct(340)), *blocks(30)], start=start)
    make_run(root, "digits_maect", [knn(correct(290)), *blocks(-5)], start=start)
    assert main(["report", str(root)]) == 0
    page_path = root / "report.html"
    assert str(page_path) in capsys.readouterr().out
    html = page_path.read_text()
    assert "<script src=" not in html and "<link " not in html          # self-contained: nothing fetched

    with browser() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = chromium.new_page(viewport={"width": 1400, "height": 900})
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            table = page.locator("table#headline-pppppppppppp")
            names = table.locator("tbody tr td:first-child").all_inner_texts()
            assert sorted(names) == ["digits_mae/train", "digits_maect/train", "digits_mimrefiner/train"]
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            assert len(images) == 2 and all(done and width > 400 for done, width in images), images
            # the refinement that is right on 40 more digits than its base is marked, the worse one is not
            marked = table.locator("tr", has_text="digits_mimrefiner/train").inner_text()
            assert "▲" in marked and "▲" not in table.locator("tr", has_text="digits_maect/train").inner_text()
            # sorting: a click on the k-NN column orders the rows by value, a second click reverses them
            header = table.locator("th", has_text="k-NN top-1")
            header.click()
            assert table.locator("tbody tr td:first-child").all_inner_texts() == [
                "digits_maect/train", "digits_mae/train", "digits_mimrefiner/train"]
            assert header.get_attribute("aria-sort") == "ascending"
            header.click()
            assert table.locator("tbody tr td:first-child").all_inner_texts()[0] == "digits_mimrefiner/train"
            # every row links to its run's recipe, log and metrics, and the links resolve to files
            links = page.evaluate("Array.from(document.querySelectorAll('td a')).map(a => a.href)")
            assert len(links) == 3 * 3                                     # recipe.json, log.jsonl, metrics.csv
            assert all(Path(unquote(urlparse(link).path)).is_file() for link in links)
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            chromium.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
