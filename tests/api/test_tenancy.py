"""Tenancy and authentication of every capsule, snapshot, API-key and audit route of
`/v1` and of every E2B route (`/sandboxes…`, `/v2/sandboxes…`, `/snapshots`,
`/templates…`).

For each route: no credentials → 401, an API key that was never issued → 401 (and a
garbage JWT → 401); another team's key or user token on the admin team's capsule,
snapshot or key → 404 (never 403, never 2xx), and the resource is untouched
afterwards; list routes never show another team's resources. Error bodies: `/v1`
answers `{"error":{"code","message"}}`, the E2B routes `{"code":<status>,"message"}`.

One admin capsule (with a file, a background process and a snapshot) serves the
whole module.
"""

from __future__ import annotations

import base64
import glob
import os
import re
import time
import uuid
from dataclasses import dataclass

import httpx
import httpx_ws
import pytest

KEEP_PATH = "/home/user/keep.txt"
KEEP_TEXT = "admin data"
KEEPER_TAG = "keeper"


@dataclass
class Target:
    """The admin team's resources the other team must not reach."""

    cap: str
    pid: int
    snap: str
    key_id: str
    key: str
    snap_host: str


@pytest.fixture(scope="module")
def target(server):
    with server.admin() as h:
        r = h.post("/v1/capsules", json={"metadata": {"owner": "admin"}})
        assert r.status_code == 201, r.text
        cap = r.json()["id"]
        snap = None
        key_id = None
        try:
            w = h.post(
                f"/v1/capsules/{cap}/files/write",
                files={"file": ("upload", KEEP_TEXT.encode())},
                data={"path": KEEP_PATH},
            )
            assert w.status_code == 204, w.text
            snap = "tenancy-" + uuid.uuid4().hex[:8]
            host_dirs = os.path.join(server.data_dir, "templates", "snap-*")
            before = set(glob.glob(host_dirs))
            s = h.post("/v1/snapshots", json={"sandbox_id": cap, "name": snap})
            assert s.status_code == 201, s.text
            [host] = set(glob.glob(host_dirs)) - before  # the snapshot's name on the host
            if h.get(f"/v1/capsules/{cap}").json()["status"] == "paused":
                assert h.post(f"/v1/capsules/{cap}/resume").status_code == 200
            bg = h.post(
                f"/v1/capsules/{cap}/exec",
                json={"cmd": "/bin/sleep", "args": ["100000"], "background": True, "tag": KEEPER_TAG},
            )
            assert bg.status_code == 202, bg.text
            with server.admin_user() as u:  # keys are made by the team's owner
                k = u.post("/v1/api-keys", json={"name": "tenancy target"})
            assert k.status_code == 201, k.text
            key_id = k.json()["id"]
            yield Target(
                cap=cap,
                pid=bg.json()["pid"],
                snap=snap,
                key_id=key_id,
                key=k.json()["key"],
                snap_host=os.path.basename(host),
            )
        finally:
            h.delete(f"/v1/capsules/{cap}")
            if snap:
                h.delete(f"/v1/snapshots/{snap}")
            if key_id:
                with server.admin_user() as u:
                    u.delete(f"/v1/api-keys/{key_id}")
    # Anything the other team managed to create is a failure, and is cleaned up.
    with server.other() as o:
        leaked = [c["id"] for c in o.get("/v1/capsules").json()]
        for c in leaked:
            o.delete(f"/v1/capsules/{c}")
        stolen = [t["name"] for t in o.get("/v1/snapshots").json() if not t["platform"]]
        for t in stolen:
            o.delete(f"/v1/snapshots/{t}")
    assert not leaked and not stolen, (leaked, stolen)


# ── the route table ───────────────────────────────────────────────────


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # placeholders: {cap} {pid} {snap} {key}
    api: str  # "v1" or "e2b"
    body: str | None = None  # name of a body builder below
    owned: bool = True  # names one of the admin team's resources

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}"


def _bodies(t: Target) -> dict:
    return {
        "exec": {"json": {"cmd": "/bin/sh", "args": ["-c", "touch /tmp/pwned"]}},
        "read": {"json": {"path": KEEP_PATH}},
        "list": {"json": {"path": "/home/user"}},
        "mkdir": {"json": {"path": "/tmp/pwned-dir"}},
        "remove": {"json": {"path": KEEP_PATH}},
        "upload": {"files": {"file": ("upload", b"pwned")}, "data": {"path": KEEP_PATH}},
        "snapshot": {"json": {"sandbox_id": t.cap, "name": "stolen-" + uuid.uuid4().hex[:6]}},
        "create": {"json": {}},
        "key": {"json": {"name": "k"}},
        "e2b_timeout": {"json": {"timeout": 1}},
        "e2b_network": {"json": {"denyOut": ["0.0.0.0/0"]}},
        "v1_network": {"json": {"deny_out": ["0.0.0.0/0"]}},
        "e2b_connect": {"json": {"timeout": 1}},
        "e2b_create": {"json": {"templateID": "base"}},
        "e2b_snapshot": {"json": {"name": "stolen-" + uuid.uuid4().hex[:6]}},
        "empty": {"json": {}},
    }


V1_OWNED = [
    Route("GET", "/v1/capsules/{cap}", "v1"),
    Route("DELETE", "/v1/capsules/{cap}", "v1"),
    Route("POST", "/v1/capsules/{cap}/ping", "v1"),
    Route("PATCH", "/v1/capsules/{cap}/network", "v1", "v1_network"),
    Route("POST", "/v1/capsules/{cap}/pause", "v1"),
    Route("POST", "/v1/capsules/{cap}/resume", "v1"),
    Route("POST", "/v1/capsules/{cap}/exec", "v1", "exec"),
    Route("GET", "/v1/capsules/{cap}/processes", "v1"),
    Route("DELETE", "/v1/capsules/{cap}/processes/{pid}", "v1"),
    Route("DELETE", "/v1/capsules/{cap}/processes/" + KEEPER_TAG, "v1"),
    Route("GET", "/v1/capsules/{cap}/metrics", "v1"),
    Route("POST", "/v1/capsules/{cap}/files/read", "v1", "read"),
    Route("POST", "/v1/capsules/{cap}/files/stream/read", "v1", "read"),
    Route("POST", "/v1/capsules/{cap}/files/list", "v1", "list"),
    Route("POST", "/v1/capsules/{cap}/files/mkdir", "v1", "mkdir"),
    Route("POST", "/v1/capsules/{cap}/files/remove", "v1", "remove"),
    Route("POST", "/v1/capsules/{cap}/files/write", "v1", "upload"),
    Route("POST", "/v1/capsules/{cap}/files/stream/write", "v1", "upload"),
    Route("POST", "/v1/snapshots", "v1", "snapshot"),
    Route("DELETE", "/v1/snapshots/{snap}", "v1"),
    Route("DELETE", "/v1/api-keys/{key}", "v1"),
]
V1_LISTS = [
    Route("GET", "/v1/capsules", "v1", owned=False),
    Route("POST", "/v1/capsules", "v1", "create", owned=False),
    Route("GET", "/v1/capsules/stats", "v1", owned=False),
    Route("GET", "/v1/capsules/usage", "v1", owned=False),
    Route("GET", "/v1/snapshots", "v1", owned=False),
    Route("GET", "/v1/api-keys", "v1", owned=False),
    Route("POST", "/v1/api-keys", "v1", "key", owned=False),
    Route("GET", "/v1/audit-logs", "v1", owned=False),
]
E2B_OWNED = [
    Route("GET", "/sandboxes/{cap}", "e2b"),
    Route("DELETE", "/sandboxes/{cap}", "e2b"),
    Route("POST", "/sandboxes/{cap}/connect", "e2b", "e2b_connect"),
    Route("POST", "/v2/sandboxes/{cap}/connect", "e2b", "e2b_connect"),
    Route("POST", "/sandboxes/{cap}/resume", "e2b", "e2b_connect"),
    Route("POST", "/sandboxes/{cap}/timeout", "e2b", "e2b_timeout"),
    Route("PUT", "/sandboxes/{cap}/network", "e2b", "e2b_network"),
    Route("POST", "/sandboxes/{cap}/pause", "e2b", "empty"),
    Route("GET", "/sandboxes/{cap}/metrics", "e2b"),
    Route("POST", "/sandboxes/{cap}/fork", "e2b", "empty"),
    Route("POST", "/sandboxes/{cap}/snapshots", "e2b", "e2b_snapshot"),
    Route("DELETE", "/templates/{snap}", "e2b"),
    Route("GET", "/templates/aliases/{snap}", "e2b"),
    Route("GET", "/templates/{snap}/builds/{key}/status", "e2b"),
]
E2B_LISTS = [
    Route("GET", "/sandboxes", "e2b", owned=False),
    Route("POST", "/sandboxes", "e2b", "e2b_create", owned=False),
    Route("GET", "/v2/sandboxes", "e2b", owned=False),
    Route("POST", "/v2/sandboxes", "e2b", "e2b_create", owned=False),
    Route("GET", "/snapshots", "e2b", owned=False),
    # Whether the caller's own team has uploaded these files, and where to put them.
    Route("GET", "/templates/{snap}/files/{key}", "e2b", owned=False),
]
# Routes whose credential is a signed URL handed out by an authenticated route
# (tests/api/test_e2b_templates.py checks forged, other-hash and expired URLs).
SIGNED = {("PUT", "/templates/{}/files/{}")}
WS_ROUTES = [
    "/v1/capsules/{cap}/exec/stream",
    "/v1/capsules/{cap}/processes/{pid}/stream",
    "/v1/capsules/{cap}/pty",
]
ALL_HTTP = V1_OWNED + V1_LISTS + E2B_OWNED + E2B_LISTS
OWNED = V1_OWNED + E2B_OWNED


def test_route_table_covers_the_router():
    """Every method of every capsule/snapshot/key/audit route of `/v1` and of every E2B
    route in the router is in a table here."""
    src = open(os.path.join(os.path.dirname(__file__), "..", "..", "wrenn-api", "src", "lib.rs")).read()
    prefixes = ("/v1/capsules", "/v1/snapshots", "/v1/api-keys", "/v1/audit-logs",
                "/sandboxes", "/v2/sandboxes", "/snapshots", "/templates")
    norm = re.compile(r"\{[^}]+\}")
    routed = set()
    for chunk in src.split(".route(")[1:]:
        m = re.match(r'\s*"(/[^"]*)"', chunk)
        if not m or not m.group(1).startswith(prefixes):
            continue
        handlers = chunk.split(".route(")[0].split(".layer(")[0]
        for method in re.findall(r"\b(get|post|put|patch|delete)\(", handlers):
            routed.add((method.upper(), norm.sub("{}", m.group(1))))
    assert len(routed) >= 40, routed
    covered = {(r.method, norm.sub("{}", r.path)) for r in ALL_HTTP}
    covered |= {("GET", norm.sub("{}", p)) for p in WS_ROUTES} | SIGNED
    covered = {(m, p.replace("/processes/" + KEEPER_TAG, "/processes/{}")) for m, p in covered}
    missing = routed - covered
    assert not missing, f"routes without tenancy coverage: {sorted(missing)}"


def _fill(path: str, t: Target) -> str:
    return path.format(cap=t.cap, pid=t.pid, snap=t.snap, key=t.key_id)


def _call(server, route: Route, t: Target, headers: dict) -> httpx.Response:
    kwargs = dict(_bodies(t)[route.body]) if route.body else {}
    with server.client(None, **headers) as c:
        return c.request(route.method, _fill(route.path, t), **kwargs)


def _assert_error_body(route_api: str, r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    if route_api == "v1":
        assert set(body) == {"error"}, body
        assert body["error"]["code"] == code, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    else:
        assert set(body) == {"code", "message"}, body
        assert body["code"] == status, body
        assert isinstance(body["message"], str) and body["message"]


def _untouched(server, t: Target) -> None:
    """The admin team's capsule, file, process, snapshot and key are as they were."""
    with server.admin() as h:
        c = h.get(f"/v1/capsules/{t.cap}").json()
        assert c["status"] == "running", c
        assert c["timeout_sec"] == 0, c
        assert c["metadata"].get("owner") == "admin"
        r = h.post(f"/v1/capsules/{t.cap}/files/read", json={"path": KEEP_PATH})
        assert r.status_code == 200 and r.text == KEEP_TEXT, (r.status_code, r.text)
        ex = h.post(
            f"/v1/capsules/{t.cap}/exec",
            json={"cmd": "/bin/sh", "args": ["-c", "ls -d /tmp/pwned /tmp/pwned-dir 2>/dev/null; true"]},
        ).json()
        assert ex["stdout"] == "", ex
        procs = h.get(f"/v1/capsules/{t.cap}/processes").json()["processes"]
        assert any(p["pid"] == t.pid and p.get("tag") == KEEPER_TAG for p in procs), procs
        assert t.snap in {s["name"] for s in h.get("/v1/snapshots").json()}
        assert t.key_id in {k["id"] for k in h.get("/v1/api-keys").json()}
    with server.client(t.key) as k:
        assert k.get("/v1/capsules").status_code == 200


BAD_CREDENTIALS = {
    "none": {},
    "unissued_key": {"X-API-Key": "wrn_" + "5" * 32},
    "garbage_jwt": {"Authorization": "Bearer not.a.jwt"},
}


@pytest.mark.parametrize("cred", list(BAD_CREDENTIALS))
@pytest.mark.parametrize("route", ALL_HTTP, ids=lambda r: r.id)
def test_unauthenticated_is_401(server, target, route, cred):
    headers = dict(BAD_CREDENTIALS[cred])
    if cred == "unissued_key":
        headers["X-API-Key"] = "wrn_" + uuid.uuid4().hex  # 32 hex, never issued
    r = _call(server, route, target, headers)
    _assert_error_body(route.api, r, 401, "unauthorized")


@pytest.mark.parametrize("who", ["other_key", "other_token"])
@pytest.mark.parametrize("route", OWNED, ids=lambda r: r.id)
def test_other_team_gets_404_and_changes_nothing(server, target, route, who):
    if who == "other_key":
        headers = {"X-API-Key": server.other_key}
    else:
        headers = {"Authorization": f"Bearer {server.other_token}"}
    r = _call(server, route, target, headers)
    assert r.status_code != 403 and not 200 <= r.status_code < 300, (r.status_code, r.text)
    _assert_error_body(route.api, r, 404, "not_found")
    _untouched(server, target)


def test_envd_token_only_for_the_owner(server, target):
    with server.admin() as h:
        own = h.get(f"/sandboxes/{target.cap}")
        assert own.status_code == 200, own.text
        token = own.json().get("envdAccessToken")
        assert isinstance(token, str) and len(token) >= 16
        connected = h.post(f"/sandboxes/{target.cap}/connect", json={"timeout": 3600})
        assert connected.status_code == 200 and connected.json()["envdAccessToken"] == token
        # Connect only extends the deadline; a capsule without a TTL keeps none.
        assert h.get(f"/v1/capsules/{target.cap}").json()["timeout_sec"] == 0
        for path in ("/sandboxes", "/v2/sandboxes"):
            listed = h.get(path).json()
            assert target.cap in {s["sandboxID"] for s in listed}
            assert all("envdAccessToken" not in s for s in listed)
    for headers in ({"X-API-Key": server.other_key}, {"Authorization": f"Bearer {server.other_token}"}):
        with server.client(None, **headers) as o:
            r = o.get(f"/sandboxes/{target.cap}")
            _assert_error_body("e2b", r, 404, "not_found")
            assert token not in r.text
            for path in ("/sandboxes", "/v2/sandboxes", "/v2/sandboxes?state=running,paused"):
                lr = o.get(path)
                assert lr.status_code == 200
                assert token not in lr.text and target.cap not in lr.text


def test_lists_never_show_the_other_team(server, target):
    with server.admin() as h:
        admin_keys = {k["id"] for k in h.get("/v1/api-keys").json()}
        assert target.key_id in admin_keys
        # The admin team sees its own things (so the checks below are not vacuous).
        assert target.cap in {c["id"] for c in h.get("/v1/capsules").json()}
        assert target.snap in {s["name"] for s in h.get("/v1/snapshots").json()}
        assert target.snap in {s["snapshotID"] for s in h.get("/snapshots").json()}
        admin_audit = h.get("/v1/audit-logs", params={"limit": 200}).json()["items"]
        assert any(i.get("resource_id") == target.cap for i in admin_audit)
        assert h.get("/v1/capsules/stats").json()["current"]["running_count"] >= 1
    for headers in ({"X-API-Key": server.other_key}, {"Authorization": f"Bearer {server.other_token}"}):
        with server.client(None, **headers) as o:
            caps = o.get("/v1/capsules")
            assert caps.status_code == 200
            assert target.cap not in caps.text
            assert all(c["id"] != target.cap for c in caps.json())
            stats = o.get("/v1/capsules/stats").json()
            own_running = sum(1 for c in caps.json() if c["status"] == "running")
            assert stats["current"]["running_count"] == own_running
            snaps = o.get("/v1/snapshots").json()
            assert target.snap not in {s["name"] for s in snaps}
            assert all(s["platform"] for s in snaps if s["name"].startswith("tenancy-"))
            assert target.snap_host not in {s["name"] for s in snaps}
            assert o.get("/v1/snapshots", params={"type": "snapshot"}).json() == [
                s for s in snaps if s["type"] == "snapshot"
            ]
            keys = o.get("/v1/api-keys").json()
            assert not admin_keys & {k["id"] for k in keys}
            other_team = {k["team_id"] for k in keys}
            assert len(other_team) == 1
            audit = o.get("/v1/audit-logs", params={"limit": 200}).json()
            for item in audit["items"]:
                assert item.get("resource_id") not in (target.cap, target.snap, target.key_id), item
                assert item.get("actor_id") not in admin_keys, item
            for path in ("/sandboxes", "/v2/sandboxes", "/v2/sandboxes?state=paused", "/snapshots"):
                r = o.get(path)
                assert r.status_code == 200, (path, r.text)
                assert target.cap not in r.text and target.snap not in r.text, (path, r.text)


def test_other_team_cannot_boot_the_admin_snapshot(server, target):
    with server.other() as o:
        for name in (target.snap, target.snap_host):
            r = o.post("/v1/capsules", json={"template": name})
            _assert_error_body("v1", r, 404, "not_found")
            r = o.post("/sandboxes", json={"templateID": name})
            _assert_error_body("e2b", r, 404, "not_found")
        # Nor pass the admin capsule as a fork/snapshot source.
        r = o.post("/v1/snapshots", json={"sandbox_id": target.cap})
        _assert_error_body("v1", r, 404, "not_found")
        assert o.get("/v1/capsules").json() == []
    _untouched(server, target)


def _handshake(server, path: str, headers: dict) -> tuple[int, dict | None]:
    h = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        **headers,
    }
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("GET", path, headers=h) as r:
            if r.status_code == 101:
                return 101, None
            r.read()
            return r.status_code, r.json()


def _first_message_session(server, path: str, first: dict, then: dict | None = None) -> list[dict]:
    """Opens the socket without credentials, sends `first` (and `then`), returns what
    the server says until it closes."""
    out: list[dict] = []
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with httpx_ws.connect_ws(path, c) as ws:
            ws.send_json(first)
            if then is not None:
                try:
                    ws.send_json(then)
                except Exception:  # noqa: BLE001 - the server may already have hung up
                    pass
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    msg = ws.receive_json(timeout=10)
                except (httpx_ws.WebSocketDisconnect, httpx_ws.WebSocketNetworkError, TimeoutError):
                    break
                except Exception:  # noqa: BLE001 - queue timeout type differs by version
                    break
                out.append(msg)
                if msg.get("type") in ("error", "exit"):
                    break
    return out


def _process_count(server, t: Target) -> int:
    with server.admin() as h:
        return len(h.get(f"/v1/capsules/{t.cap}/processes").json()["processes"])


@pytest.mark.parametrize("path", WS_ROUTES)
def test_websocket_routes(server, target, path):
    url = _fill(path, target)
    before = _process_count(server, target)
    # Bad header credentials: refused before the upgrade.
    for headers in ({"X-API-Key": "wrn_" + uuid.uuid4().hex}, {"Authorization": "Bearer junk"}):
        status, body = _handshake(server, url, headers)
        assert status == 401, (status, body)
        assert body["error"]["code"] == "unauthorized"
    # Another team's credentials in the headers: the capsule does not exist for them.
    for headers in ({"X-API-Key": server.other_key}, {"Authorization": f"Bearer {server.other_token}"}):
        status, body = _handshake(server, url, headers)
        assert status == 404, (status, body)
        assert body == {"error": {"code": "not_found", "message": body["error"]["message"]}}
    start = {"type": "start", "cmd": "/bin/sh", "args": ["-c", "touch /tmp/pwned"]}
    # No credentials: the first message must authenticate, and a start is not that.
    msgs = _first_message_session(server, url, start)
    assert msgs and msgs[-1]["type"] == "error" and "unauthorized" in msgs[-1]["data"], msgs
    # An unissued key in the auth message.
    msgs = _first_message_session(server, url, {"type": "auth", "token": "wrn_" + uuid.uuid4().hex}, start)
    assert msgs and msgs[-1]["type"] == "error" and "unauthorized" in msgs[-1]["data"], msgs
    # Another team's key / token in the auth message: not found, nothing started.
    for token in (server.other_key, server.other_token):
        msgs = _first_message_session(server, url, {"type": "auth", "token": token}, start)
        assert msgs and msgs[-1]["type"] == "error", msgs
        assert "not found" in msgs[-1]["data"], msgs
        assert not any(m.get("type") in ("start", "started", "stdout", "output") for m in msgs), msgs
    assert _process_count(server, target) == before
    _untouched(server, target)
    # The owner, authenticating by first message, gets in.
    if path.endswith("/exec/stream"):
        msgs = _first_message_session(
            server, url, {"type": "auth", "token": server.admin_key},
            {"type": "start", "cmd": "/bin/echo", "args": ["owner"]},
        )
        assert msgs[0]["type"] == "start", msgs
        assert msgs[-1] == {"type": "exit", "exit_code": 0}, msgs
