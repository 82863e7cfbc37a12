"""Headless Chromium for the web page tests (Debian's chromium, driven by Playwright)."""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def new_page(url: str) -> Iterator:
    """A fresh browser page at `url`; the browser closes afterwards."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (scripts/setup.sh installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page()
        page.goto(url)
        yield page
        browser.close()
