"""A real browser for tests: the system's Chromium, headless, driven by Playwright.

Playwright's own browser download is never used (``executable_path`` points at the Chromium that
the system's package manager installed, e.g. Debian's ``chromium``), and the flags keep it off the
network: no background requests, no component updates, no sync, no proxy (loopback only).

    python -m tests.browser URL IMAGE [--screenshot PNG]   # the classes a Gradio Label shows
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = os.environ.get("DL_LABS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-proxy-server"]


def missing() -> str | None:
    """Why a browser test cannot run here, or None when it can."""
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set DL_LABS_CHROMIUM)"
    if importlib.util.find_spec("playwright") is None:
        return 'Playwright is not installed (pip install -e ".[ui]")'
    return None


@contextmanager
def chromium_page(width: int = 1100, height: int = 620) -> Iterator:
    """A page in a fresh headless Chromium with an empty profile, closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="dl-labs-chromium-") as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": width, "height": height})
        try:
            yield context.new_page()
        finally:
            context.close()


def classes_on_gradio_page(url: str, image: str | Path, screenshot: str | Path | None = None,
                           timeout_s: float = 60) -> list[tuple[str, float]]:
    """Open a Gradio Interface with one image input and a Label output, upload ``image``, press
    Submit, and read the classes the Label shows, most probable first, with the probability each
    bar holds (the <meter> value: the number the page received, not the rounded percentage)."""
    with chromium_page() as page:
        page.set_default_timeout(timeout_s * 1000)
        page.goto(url, wait_until="networkidle")
        page.set_input_files("input[type=file]", str(image))
        page.get_by_role("button", name="Submit").click()
        page.locator("[data-testid=label-output-value]").wait_for()
        rows = page.locator("button.confidence-set")
        rows.first.wait_for()
        shown = [(row.locator("dt").inner_text().strip(),
                  float(row.locator("meter").get_attribute("value"))) for row in rows.all()]
        if screenshot:
            page.screenshot(path=str(screenshot), full_page=False)
        return shown


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("image")
    parser.add_argument("--screenshot", default=None)
    args = parser.parse_args()
    reason = missing()
    if reason:
        sys.exit(f"error: {reason}")
    for name, p in classes_on_gradio_page(args.url, args.image, args.screenshot):
        print(f"{name}\t{p:.6f}")
