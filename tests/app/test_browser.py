"""The web page in a real browser (Debian chromium driven by Playwright): upload, mask drawn, click, box,
under the app's Content-Security-Policy (no violation reported).

Skipped where /usr/bin/chromium is not installed (``.ci/run`` installs it with apt-get).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrsam.pipeline import Segmenter

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def server_url(litemedsam, mask_drafts, phantom_256, serve):
    """The app (automatic drafts for the phantom, default allow-list) served on a free loopback port."""
    from cxrsam.app.server import create_app

    with serve(create_app(Segmenter(litemedsam, drafter=mask_drafts(phantom_256[1])))) as url:
        yield url


def test_upload_see_mask_click_and_box_change_it(server_url, phantom_256, lung_point):
    from playwright.sync_api import sync_playwright

    image, lungs = phantom_256
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(60_000)
            console = []
            page.on("console", lambda message: console.append(message.text))
            response = page.goto(server_url)
            assert "script-src 'self'" in response.headers["content-security-policy"]
            counter = page.locator("#mask-pixels")

            def wait_for_version(version: int) -> int:
                # a selector, not wait_for_function: the policy forbids the string evaluation that uses
                page.locator(f"#mask-pixels[data-version='{version}']").wait_for(state="attached")
                return int(counter.get_attribute("data-count"))

            page.set_input_files("#file", str(image))
            automatic = wait_for_version(1)
            assert automatic > 0.5 * lungs.sum()  # the automatic mask was decoded and drawn
            assert page.locator("#prompt-source").inner_text() == "cnn-draft"

            box = page.locator("#view").bounding_box()
            scale = box["width"] / lungs.shape[1]
            x, y = lung_point(lungs)
            page.check("#label-background")
            page.mouse.click(box["x"] + (x + 0.5) * scale, box["y"] + (y + 0.5) * scale)
            clicked = wait_for_version(2)
            assert clicked != automatic
            assert page.locator("#prompt-source").inner_text() == "cnn-draft+clicks"

            page.mouse.move(box["x"] + 0.05 * box["width"], box["y"] + 0.05 * box["height"])
            page.mouse.down()
            page.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.6 * box["height"], steps=5)
            page.mouse.move(box["x"] + 0.95 * box["width"], box["y"] + 0.95 * box["height"], steps=5)
            page.mouse.up()
            boxed = wait_for_version(3)
            assert boxed != clicked and page.locator("#prompt-source").inner_text() == "box"
            assert "disabled" not in page.locator("#download-mask").get_attribute("class")
            assert page.locator("#status").get_attribute("class") != "error"
            assert not [text for text in console if "Content Security Policy" in text], console
        finally:
            browser.close()
