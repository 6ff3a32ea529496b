"""Loads a page in headless Chromium (Debian's, through Playwright) ROUNDS times, each in
a fresh browser context (empty cache), and prints one JSON object: the time from
navigation start to the dashboard's `wrenn:interactive` mark, and to the load event, in
milliseconds per round. Used by `cargo bench --bench dashboard`.

Usage: dashboard_probe.py URL ROUNDS
"""

import json
import shutil
import sys

from playwright.sync_api import sync_playwright

url, rounds = sys.argv[1], int(sys.argv[2])
chromium = shutil.which("chromium") or shutil.which("chromium-browser")
if not chromium:
    sys.exit("chromium is missing: scripts/deps.sh installs Debian's chromium")
out = {"interactive_ms": [], "load_ms": []}
with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path=chromium,
        args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
    )
    for _ in range(rounds + 1):
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(url, wait_until="load")
        page.wait_for_function("() => performance.getEntriesByName('wrenn:interactive').length > 0")
        t = page.evaluate(
            "() => [performance.getEntriesByName('wrenn:interactive')[0].startTime,"
            " performance.getEntriesByType('navigation')[0].loadEventEnd]"
        )
        ctx.close()
        if _ == 0:
            continue  # the first round warms Chromium itself, not the page
        out["interactive_ms"].append(t[0])
        out["load_ms"].append(t[1])
    browser.close()
print(json.dumps(out))
