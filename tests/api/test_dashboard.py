"""The web dashboard at ``/``, driven in headless Chromium (Debian's ``chromium``, through
Playwright with ``executable_path``) against the real ``wrenn serve`` and real guests.

One person signs up, creates a capsule, watches it run, types in its terminal, uploads
and downloads a file, pauses and resumes it, creates and revokes an API key, and reads
the audit log; another team's person sees none of it. Accessibility basics (every
control has a name, the main flows work from the keyboard), the first page's weight and
its time to interactive are checked here too. Screenshots of the main pages go to
``target/test-artifacts/dashboard`` (kept as artifacts, never committed).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import time
import uuid

import httpx
import pytest

from conftest import PASSWORD, REPO

playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="playwright is in tests/requirements.txt: install it into the venv"
)

ARTIFACTS = os.environ.get(
    "WRENN_TEST_ARTIFACTS", os.path.join(REPO, "target", "test-artifacts")
)
SHOTS = os.path.join(ARTIFACTS, "dashboard")
# The first page's JavaScript and CSS, gzipped (the budget).
FIRST_PAGE_BUDGET = 300 * 1024
# Every control a person can reach must have an accessible name.
UNNAMED_CONTROLS_JS = """
() => [...document.querySelectorAll('button, input, select, textarea, a[href], [role=tab]')]
  .filter(e => e.offsetParent !== null || e.getClientRects().length)
  .filter(e => e.type !== 'hidden')
  .filter(e => {
    const label = (e.getAttribute('aria-label') || '').trim()
      || (e.getAttribute('aria-labelledby') ? 'x' : '')
      || (e.labels && [...e.labels].map(l => l.textContent).join('').trim())
      || (e.getAttribute('title') || '').trim()
      || (['BUTTON', 'A'].includes(e.tagName) ? e.textContent.trim() : '')
      || (e.querySelector && e.querySelector('img[alt]:not([alt=""])') ? 'img' : '');
    return !label;
  })
  .map(e => e.outerHTML.slice(0, 120))
"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("chromium is missing: scripts/deps.sh installs Debian's chromium", pytrace=False)
    return path


@pytest.fixture(scope="module")
def browser():
    os.makedirs(SHOTS, exist_ok=True)
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=_chromium(),
            headless=True,
            # As root Chromium refuses its own sandbox (the pages are our own). The rest
            # keep it from calling out to Google's services: this machine's network is
            # closed, and the tests send traffic to loopback only.
            args=[
                "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
            ],
        )
        yield b
        b.close()


# The pages a test opened, for a screenshot of each when it fails.
_OPEN: list = []


@pytest.fixture(autouse=True)
def _screenshots_of_failures(request):
    failed = request.session.testsfailed
    _OPEN.clear()
    yield
    if request.session.testsfailed > failed:
        for i, page in enumerate(_OPEN):
            try:
                path = os.path.join(SHOTS, f"FAILED-{request.node.name}-{i}.png")
                page.screenshot(path=path, full_page=True)
                print(f"screenshot of the failure: {path}")
            except Exception:  # noqa: BLE001 - the page may be gone with its context
                pass
    _OPEN.clear()


def _page(browser, server, **kw):
    ctx = browser.new_context(base_url=server.url, accept_downloads=True, **kw)
    ctx.set_default_timeout(60_000)
    page = ctx.new_page()
    page.on("dialog", lambda d: d.accept())
    _OPEN.append(page)
    return ctx, page


def _shot(page, name: str, server) -> None:
    page.screenshot(path=os.path.join(SHOTS, f"{server.backend}-{name}.png"), full_page=True)


def _sign_up(page, email: str, name: str) -> None:
    page.goto("/")
    page.get_by_role("button", name="Sign up").click()
    page.get_by_label("Name").fill(name)
    page.get_by_label("E-mail").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    page.get_by_role("heading", name="Capsules").wait_for()


def _unnamed(page) -> list:
    return page.evaluate(UNNAMED_CONTROLS_JS)


def _status(page, want: str, timeout: float = 120_000) -> None:
    page.locator(f"h1 .badge[data-status='{want}']").wait_for(timeout=timeout)


def _login_token(server, email: str) -> str:
    with server.client() as c:
        r = c.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        return r.json()["token"]


def _stty_size(page, nonce: int) -> tuple[int, int]:
    """Runs `stty size` in the open terminal; the guest's (rows, columns)."""
    rows = page.locator(".xterm-rows")
    page.keyboard.type(f"printf 'sz%s:%s\\n' {nonce} \"$(stty size)\"")
    page.keyboard.press("Enter")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(rf"^sz{nonce}:(\d+)\s(\d+)\s*$", rows.inner_text(), re.M)
        if m:
            return int(m.group(1)), int(m.group(2))
        time.sleep(0.2)
    raise AssertionError(f"no `stty size` answer in the terminal: {rows.inner_text()!r}")


def test_first_page_weight_and_time_to_interactive(server, browser):
    ctx, page = _page(browser, server)
    loaded = []
    page.on("response", lambda r: loaded.append(r.url))
    page.goto("/")
    page.get_by_role("heading", name="Sign in to Wrenn").wait_for()
    interactive_ms = page.evaluate(
        "() => performance.getEntriesByName('wrenn:interactive')[0].startTime"
    )
    scripts = [u for u in loaded if re.search(r"\.(js|css)(\?|$)", u)]
    assert scripts, loaded
    # The terminal (xterm.js) is loaded when a terminal opens, not with the first page.
    assert not [u for u in scripts if "Terminal" in u], scripts
    total = 0
    with httpx.Client() as c:
        for u in scripts:
            r = c.get(u, headers={"Accept-Encoding": "identity"})
            assert r.status_code == 200, u
            total += len(gzip.compress(r.content, 9))
            # The server compresses what it sends when the browser accepts it.
            z = c.get(u, headers={"Accept-Encoding": "gzip"})
            assert z.headers.get("content-encoding") == "gzip", (u, z.headers)
    print(
        f"\ndashboard first page ({server.backend}): {len(scripts)} JS/CSS files, "
        f"{total / 1024:.1f} KiB gzipped (budget {FIRST_PAGE_BUDGET // 1024} KiB); "
        f"interactive after {interactive_ms:.0f} ms (goal <= 1000 ms)"
    )
    assert total <= FIRST_PAGE_BUDGET, total
    # Security headers on the page itself.
    r = httpx.get(server.url + "/")
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    # API paths are still the API's: unknown ones are JSON errors, not the console.
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    ctx.close()


@pytest.mark.timeout(600)
def test_console_end_to_end(server, browser, tmp_path):
    email = f"console-{uuid.uuid4().hex[:8]}@example.com"
    ctx, page = _page(browser, server)
    _sign_up(page, email, "Console Person")
    page.get_by_text("No capsules yet.").wait_for()
    _shot(page, "capsules-empty", server)
    # Signed in, the first page is the capsule list, with its data from the API.
    page.reload()
    page.get_by_text("No capsules yet.").wait_for()
    listed_ms = page.evaluate("() => performance.getEntriesByName('wrenn:capsules')[0].startTime")
    print(f"\ndashboard signed-in first page ({server.backend}): capsule list shown after {listed_ms:.0f} ms")
    assert _unnamed(page) == []

    # Create a capsule in the dialog; its page shows it running.
    page.get_by_role("button", name="New capsule").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Template").select_option("minimal")
    dialog.get_by_label("Memory (MiB)").fill("512")
    dialog.get_by_label("Metadata (key=value, one per line)").fill("purpose=browser-test")
    assert _unnamed(page) == []
    dialog.get_by_role("button", name="Create").click()
    page.wait_for_url(re.compile(r"#/capsules/cl-"))
    cid = page.url.rsplit("/", 1)[1]
    _status(page, "running")
    page.get_by_text("browser-test").wait_for()

    # The list shows it running; a capsule created elsewhere appears live (events stream).
    page.get_by_role("link", name="Capsules", exact=True).click()
    page.locator(f"tr[data-id='{cid}'] .badge[data-status='running']").wait_for()
    token = _login_token(server, email)
    with server.client(None, Authorization=f"Bearer {token}") as api:
        r = api.post("/v1/capsules", json={"template": "minimal"})
        assert r.status_code == 201, r.text
        other = r.json()["id"]
        page.locator(f"tr[data-id='{other}']").wait_for(timeout=30_000)
        _shot(page, "capsules", server)
        assert api.delete(f"/v1/capsules/{other}").status_code == 204
        page.locator(f"tr[data-id='{other}']").wait_for(state="detached", timeout=30_000)
    page.get_by_role("link", name=cid).click()
    _status(page, "running")

    # Terminal: echo hi, read hi back.
    page.get_by_role("tab", name="Terminal").click()
    page.locator("[data-terminal-status='connected']").wait_for(timeout=60_000)
    page.locator("[data-testid=terminal]").click()
    page.locator(".xterm-rows").get_by_text("$", exact=False).first.wait_for()
    page.keyboard.type("echo hi")
    page.keyboard.press("Enter")
    rows = page.locator(".xterm-rows")
    deadline = time.monotonic() + 30
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = [l.strip() for l in rows.inner_text().splitlines()]
        if "hi" in lines:
            break
        time.sleep(0.2)
    assert "hi" in lines, lines
    # Resize reaches the guest's terminal: a narrower window, fewer columns.
    _, cols_before = _stty_size(page, 1)
    page.set_viewport_size({"width": 700, "height": 700})
    _, cols_after = _stty_size(page, 2)
    assert 0 < cols_after < cols_before, (cols_before, cols_after)
    page.set_viewport_size({"width": 1280, "height": 800})
    _shot(page, "terminal", server)

    # Files: upload with progress, see it listed, download it, make and delete a folder.
    page.get_by_role("tab", name="Files").click()
    page.get_by_role("table", name="Files in /home/user").wait_for()
    page.get_by_label("Path").fill("/tmp")
    page.get_by_role("button", name="Open", exact=True).click()
    page.get_by_role("table", name="Files in /tmp").or_(page.get_by_text("This folder is empty.")).wait_for()
    payload = b"hello from the browser\n" * 1000
    f = tmp_path / "from-browser.txt"
    f.write_bytes(payload)
    page.get_by_label("Upload files").set_input_files(str(f))
    page.locator("tr[data-name='from-browser.txt']").wait_for()
    with server.client(None, Authorization=f"Bearer {token}") as api:
        r = api.post(f"/v1/capsules/{cid}/files/read", json={"path": "/tmp/from-browser.txt"})
        assert r.status_code == 200 and r.content == payload
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download from-browser.txt").click()
    with open(dl.value.path(), "rb") as got:
        assert got.read() == payload
    page.get_by_label("New folder").fill("made-here")
    page.get_by_role("button", name="Create folder").click()
    page.locator("tr[data-name='made-here']").wait_for()
    assert _unnamed(page) == []
    _shot(page, "files", server)
    page.get_by_role("button", name="Delete made-here").click()
    page.locator("tr[data-name='made-here']").wait_for(state="detached")
    # An error from the API reaches the person.
    page.get_by_label("Path").fill("/no/such/dir")
    page.get_by_role("button", name="Open", exact=True).click()
    page.get_by_role("alert").wait_for()

    # Pause and resume.
    page.get_by_role("button", name="Pause").click()
    _status(page, "paused")
    page.get_by_role("button", name="Resume").click()
    _status(page, "running")

    # API keys: created and shown once, works, revoked, stops working.
    page.get_by_role("link", name="API keys").click()
    page.get_by_text("No API keys.").wait_for()
    page.get_by_label("Key name").fill("from the console")
    page.get_by_role("button", name="Create key").click()
    key = page.get_by_test_id("new-key").inner_text().strip()
    assert key.startswith("wrn_"), key
    _shot(page, "keys", server)
    with server.client(key) as api:
        r = api.get("/v1/capsules")
        assert r.status_code == 200 and cid in [c["id"] for c in r.json()]
    page.get_by_role("button", name="Done").click()
    assert page.get_by_test_id("new-key").count() == 0
    page.get_by_role("button", name="Revoke from the console").click()
    page.get_by_text("No API keys.").wait_for()
    with server.client(key) as api:
        assert api.get("/v1/capsules").status_code == 401

    # The audit log has what was done, and filters.
    page.get_by_role("link", name="Audit log").click()
    for action in ("capsule.create", "capsule.pause", "capsule.resume", "capsule.pty",
                   "api_key.create", "api_key.delete"):
        page.locator(f"tr[data-action='{action}']").first.wait_for()
    page.get_by_label("Resource").select_option("api_key")
    page.get_by_role("button", name="Apply").click()
    page.locator("tr[data-action='capsule.create']").first.wait_for(state="detached")
    assert page.locator("tr[data-action='api_key.create']").count() == 1
    _shot(page, "audit", server)
    # Paging: 60 more key entries, 50 to a page, the rest behind "Older entries".
    with server.client(None, Authorization=f"Bearer {token}") as api:
        for i in range(30):
            r = api.post("/v1/api-keys", json={"name": f"paging {i}"})
            assert r.status_code == 201, r.text
            assert api.delete(f"/v1/api-keys/{r.json()['id']}").status_code == 204
    page.get_by_role("button", name="Apply").click()
    rows = page.get_by_role("table", name="Audit log").locator("tbody tr")
    page.get_by_role("button", name="Older entries").wait_for()
    assert rows.count() == 50
    page.get_by_role("button", name="Older entries").click()
    page.wait_for_function("() => document.querySelectorAll('table[aria-label=\"Audit log\"] tbody tr').length == 62")
    assert page.get_by_role("button", name="Older entries").count() == 0

    # The other pages render, in both themes, and on a phone.
    for link, heading in (("Templates", "Templates"), ("Usage", "Usage"), ("Team", None)):
        page.get_by_role("link", name=link, exact=True).click()
        if heading:
            page.get_by_role("heading", name=heading, exact=True).wait_for()
        else:
            page.get_by_role("table", name="Members").wait_for()
        page.locator(".loading").first.wait_for(state="detached")
        assert page.locator(".error").count() == 0, page.locator(".error").all_inner_texts()
        assert _unnamed(page) == []
        _shot(page, link.lower(), server)
    before = page.evaluate("() => document.documentElement.dataset.theme")
    page.get_by_role("button", name=re.compile("Switch to .* theme")).click()
    after = page.evaluate("() => document.documentElement.dataset.theme")
    assert {before, after} == {"dark", "light"}
    page.get_by_role("link", name="Capsules", exact=True).click()
    page.locator(f"tr[data-id='{cid}']").wait_for()
    _shot(page, f"capsules-{after}", server)
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(200)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, overflow
    _shot(page, "capsules-phone", server)
    page.set_viewport_size({"width": 1280, "height": 800})

    # A second team of the same person: the switcher moves between them, and each
    # team sees its own capsules only.
    page.get_by_role("link", name="Team", exact=True).click()
    page.get_by_role("textbox", name="Name").fill("Second team")
    page.get_by_role("button", name="Create and switch").click()
    page.get_by_role("heading", name="Capsules").wait_for()
    page.get_by_text("No capsules yet.").wait_for()
    team = page.get_by_role("combobox", name="Team")
    assert team.locator("option:checked").inner_text() == "Second team"
    team.select_option(label="Console Person's team")
    page.locator(f"tr[data-id='{cid}']").wait_for()
    # Not an admin: no hosts page.
    assert page.get_by_role("link", name="Hosts").count() == 0
    page.goto("/#/hosts")
    page.get_by_text("No such page.").wait_for()

    # Another team's person sees none of it.
    ctx2, page2 = _page(browser, server)
    _sign_up(page2, f"stranger-{uuid.uuid4().hex[:8]}@example.com", "Stranger")
    page2.get_by_text("No capsules yet.").wait_for()
    assert page2.locator(f"tr[data-id='{cid}']").count() == 0
    page2.goto(f"/#/capsules/{cid}")
    page2.get_by_role("alert").wait_for()
    assert "not found" in page2.get_by_role("alert").inner_text().lower()
    page2.goto("/#/audit")
    page2.get_by_role("table", name="Audit log").or_(page2.get_by_text("No audit entries match.")).first.wait_for()
    page2.locator(".loading").first.wait_for(state="detached")
    assert page2.locator("tr[data-action^='capsule.']").count() == 0
    assert cid not in page2.content()
    ctx2.close()

    # Live metrics: the list's sparklines and the detail page's charts fill in.
    page.goto("/#/capsules")
    page.locator(f"tr[data-id='{cid}'] svg polyline").first.wait_for(timeout=30_000)
    page.get_by_role("link", name=cid).click()
    page.get_by_role("tab", name="Metrics").click()
    for chart in ("CPU", "Memory", "Disk"):
        # A flat line has no height, so "attached" rather than "visible".
        page.locator("figure", has_text=chart).locator("svg polyline").wait_for(state="attached", timeout=30_000)
    page.get_by_label("Range").select_option("2h")
    page.locator("figure", has_text="CPU").locator("svg").wait_for()
    _shot(page, "capsule-metrics", server)

    # Destroy from the console: gone from the API too.
    page.get_by_role("link", name="Capsules", exact=True).click()
    page.get_by_role("link", name=cid).click()
    page.get_by_role("button", name="Destroy").click()
    page.wait_for_url(re.compile(r"#/capsules$"))
    with server.client(None, Authorization=f"Bearer {token}") as api:
        assert cid not in [c["id"] for c in api.get("/v1/capsules").json()]
    ctx.close()


def test_keyboard_only(server, browser):
    """Sign in and open the create dialog with the keyboard alone; Escape closes it."""
    email = f"keys-{uuid.uuid4().hex[:8]}@example.com"
    with server.client() as c:
        r = c.post("/v1/auth/signup", json={"email": email, "password": PASSWORD, "name": "Keyboard"})
        assert r.status_code == 201, r.text
    ctx, page = _page(browser, server)
    page.goto("/")
    page.get_by_role("heading", name="Sign in to Wrenn").wait_for()
    assert _unnamed(page) == []
    # A wrong password is an error shown to the person.
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.name") == "email"
    page.keyboard.type(email)
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.name") == "password"
    page.keyboard.type("not the password")
    page.keyboard.press("Enter")
    page.get_by_role("alert").wait_for()
    page.get_by_label("Password").fill("")
    page.get_by_label("Password").focus()
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Capsules").wait_for()
    # Tab order reaches the main navigation and the create button.
    seen = []
    for _ in range(20):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("() => document.activeElement.textContent.trim()"))
        if seen[-1] == "New capsule":
            break
    assert "Templates" in seen and seen[-1] == "New capsule", seen
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    assert page.evaluate("() => document.activeElement.closest('dialog') !== null")
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    # Again, and this time create the capsule from the keyboard.
    page.get_by_role("button", name="New capsule").focus()
    page.keyboard.press("Enter")
    dialog.wait_for()
    for _ in range(12):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.textContent.trim()") == "Create":
            break
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"#/capsules/cl-"))
    cid = page.url.rsplit("/", 1)[1]
    try:
        _status(page, "running")
        # The capsule's tabs are reachable and switch with the keyboard too.
        page.get_by_role("tab", name="Files").focus()
        page.keyboard.press("Enter")
        page.get_by_role("button", name="Upload files").or_(page.get_by_label("Upload files")).first.wait_for(state="attached")
    finally:
        token = _login_token(server, email)
        with server.client(None, Authorization=f"Bearer {token}") as api:
            api.delete(f"/v1/capsules/{cid}")
    ctx.close()


@pytest.mark.timeout(300)
def test_template_build_and_snapshot_from_the_console(server, browser):
    """A recipe build started in the console shows its log as it runs; a snapshot taken
    from a capsule's page is listed with the templates and deleted there."""
    email = f"builder-{uuid.uuid4().hex[:8]}@example.com"
    ctx, page = _page(browser, server)
    _sign_up(page, email, "Builder")
    page.get_by_role("link", name="Templates", exact=True).click()
    page.get_by_text("No builds yet.").wait_for()
    name = "console-" + uuid.uuid4().hex[:8]
    page.get_by_role("button", name="New build").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name").fill(name)
    dialog.get_by_label("Recipe (RUN, ENV, WORKDIR, USER, START; one per line)").fill(
        "RUN echo built-in-the-console\nRUN echo second-step >&2"
    )
    dialog.get_by_role("button", name="Build").click()
    log = page.get_by_role("region", name="Build log")
    log.get_by_text("built-in-the-console", exact=True).wait_for(timeout=240_000)
    log.get_by_text("second-step", exact=True).wait_for(timeout=120_000)
    log.get_by_text("success", exact=True).wait_for(timeout=120_000)
    templates = page.get_by_role("table", name="Templates and snapshots")
    templates.get_by_role("cell", name=name, exact=True).wait_for()
    _shot(page, "build-log", server)
    page.get_by_role("button", name=f"Delete template {name}").click()
    templates.get_by_role("cell", name=name, exact=True).wait_for(state="detached")

    # A snapshot of a capsule, from its page.
    token = _login_token(server, email)
    with server.client(None, Authorization=f"Bearer {token}") as api:
        r = api.post("/v1/capsules", json={"template": "minimal"})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        try:
            page.goto(f"/#/capsules/{cid}")
            _status(page, "running")
            page.get_by_role("button", name="Snapshot").click()
            notice = page.get_by_role("status").filter(has_text="Snapshot")
            notice.wait_for(timeout=120_000)
            snap = re.search(r"Snapshot (\S+) created", notice.inner_text()).group(1)
            # The page shows the capsule as the API has it after the snapshot.
            _status(page, api.get(f"/v1/capsules/{cid}").json()["status"])
            assert snap in {t["name"] for t in api.get("/v1/snapshots").json()}
            page.get_by_role("link", name="Templates", exact=True).click()
            page.get_by_role("button", name=f"Delete template {snap}").click()
            page.get_by_role("table", name="Templates and snapshots").get_by_role(
                "cell", name=snap, exact=True
            ).wait_for(state="detached")
            assert snap not in {t["name"] for t in api.get("/v1/snapshots").json()}
        finally:
            api.delete(f"/v1/capsules/{cid}")
    ctx.close()


def test_admin_sees_hosts(server, browser):
    """The platform admin's hosts page: this server's own host, its capacity and capsules."""
    with server.admin() as api:
        r = api.post("/v1/capsules", json={"template": "minimal"})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
    try:
        ctx, page = _page(browser, server)
        page.goto("/")
        page.get_by_label("E-mail").fill(server.admin_email)
        page.get_by_label("Password").fill(server.admin_password)
        page.get_by_role("button", name="Sign in").click()
        page.locator(f"tr[data-id='{cid}']").wait_for()
        page.get_by_role("link", name="Hosts").click()
        row = page.get_by_role("table", name="Hosts").locator("tbody tr").first
        row.wait_for()
        assert "online" in row.inner_text()
        with server.admin_user() as api:
            hosts = api.get("/v1/hosts").json()
        host = hosts[0]
        assert host["id"] in row.inner_text()
        # Capacity as the host reported it, and at least the capsule made above.
        assert f"{host['cpu_cores']} CPU" in row.inner_text()
        count = int(row.locator("td").nth(4).inner_text())
        assert count >= 1
        assert _unnamed(page) == []
        _shot(page, "hosts", server)
        ctx.close()
    finally:
        with server.admin() as api:
            api.delete(f"/v1/capsules/{cid}")
