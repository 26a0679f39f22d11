"""Slow: `mnist-vae explore` in a real browser (Debian's Chromium driven by Playwright): draw a
stroke, move a slider, interpolate, sample; no request may leave 127.0.0.1."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from helpers.repo import start_server, stop_server, wait_for
from pipeline.config import load_params
from pipeline.stages import train as train_stage
from pipeline.stages.evaluate import run_evaluation
from pipeline.tools.servers import free_port

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As the workplace's probe starts it: no sandbox (root), no GPU, and none of Chromium's own
# background traffic (which would also fail this test's only-127.0.0.1 rule).
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync",
    "--disable-component-update", "--no-first-run", "--disable-quic",
]  # fmt: skip


@pytest.fixture
def page_url(workdir: Path):
    """The explorer on a free port, showing the @champion of a tiny model trained here."""
    train_stage.train(load_params())
    run_evaluation(load_params())  # the first evaluated model becomes @champion
    port = free_port()
    server = start_server([sys.executable, "-m", "pipeline", "explore", "--port", str(port)])
    try:
        wait_for(f"http://127.0.0.1:{port}/", server, 120)
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop_server(server)


def test_the_page_draws_walks_interpolates_and_samples_without_leaving_the_machine(
    page_url: str, tmp_path: Path
) -> None:
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: `make test` installs Debian's as root")
    from playwright.sync_api import sync_playwright

    hosts = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("request", lambda request: hosts.append(urlparse(request.url).hostname))
        page.goto(page_url)
        page.wait_for_selector("text=models:/mnist-vae@champion (version 1")

        # A stroke on the canvas: the digit as MNIST, its reconstruction and a score appear.
        page.locator("#canvas button[aria-label='Brush']").first.click()
        box = page.locator("#canvas canvas").first.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.2
        page.mouse.move(x, y)
        page.mouse.down()
        for step in range(1, 21):
            page.mouse.move(x - 10 + step, y + step * box["height"] * 0.03)
        stroke_ended = time.perf_counter()
        page.mouse.up()
        page.locator("#reconstruction img").wait_for(timeout=30_000)
        page.wait_for_selector("#score :text('nats')")
        print(f"stroke to reconstruction: {time.perf_counter() - stroke_ended:.2f} s")
        said = page.locator("#score").inner_text()
        assert "look like a digit" in said and "ms from the drawing" in said
        page.screenshot(path=tmp_path / "draw.png")

        # A slider moves the decoded digit.
        page.get_by_role("tab", name="Walk the latent space").click()
        decoded = page.locator("#walk img")
        decoded.wait_for()
        before = decoded.get_attribute("src")
        value = page.locator("[id^=z] input[type=number]").first
        value.fill("2.5")
        value.press("Enter")
        page.wait_for_function(
            "before => document.querySelector('#walk img').src !== before", arg=before
        )
        page.screenshot(path=tmp_path / "walk.png")

        page.get_by_role("tab", name="Interpolate").click()
        page.locator("#interpolate").click()
        page.locator("#frames img").wait_for(timeout=30_000)
        page.screenshot(path=tmp_path / "interpolate.png")

        page.get_by_role("tab", name="Sample").click()
        page.locator("#sample").click()
        page.locator("#samples img").wait_for(timeout=30_000)
        page.screenshot(path=tmp_path / "sample.png")
        browser.close()
    assert {host for host in hosts if host} == {"127.0.0.1"}
