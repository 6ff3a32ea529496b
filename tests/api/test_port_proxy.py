"""The proxy of `wrenn serve` into capsule ports: `{port}-{capsule}.{domain}` Host names and
E2B's `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers, to guest services listening on all
interfaces and (through envd's loopback forwarder) on 127.0.0.1 only; plain HTTP in
both directions, streamed responses, WebSocket upgrades, and the answers for capsules
that are unknown, gone or paused.

The guest services are `guest_http_server.py` (python3 standard library) in a capsule of
the `python` template.
"""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
import os
import socket
import struct
import time
from urllib.parse import urlparse

import httpx
import pytest
from e2b import Sandbox, SandboxState

HERE = os.path.dirname(os.path.abspath(__file__))
UNKNOWN_ID = "cl-" + "0" * 25
PUBLIC, LOOPBACK = 8000, 8001


def api(server) -> dict:
    return {"api_key": server.admin_key, "api_url": server.url, "sandbox_url": server.url, "debug": False}


def host(port: int, capsule: str) -> str:
    return f"{port}-{capsule}.example.test"


def wait_until(fn, timeout: float, desc: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {desc} (last: {last!r})")


def start_servers(s: Sandbox, server) -> None:
    with open(os.path.join(HERE, "guest_http_server.py")) as f:
        s.files.write("/tmp/guest_http_server.py", f.read())
    s.commands.run(f"python3 /tmp/guest_http_server.py 0.0.0.0 {PUBLIC} public", background=True, timeout=0)
    s.commands.run(f"python3 /tmp/guest_http_server.py 127.0.0.1 {LOOPBACK} loopback", background=True, timeout=0)
    for port in (PUBLIC, LOOPBACK):
        def up(port=port):
            r = httpx.get(f"{server.url}/ready", headers={"Host": host(port, s.sandbox_id)}, timeout=10)
            return r.status_code == 200
        # python3 starts slowly under TCG; the forwarder notices a new listener within ~1 s.
        wait_until(up, 60, f"guest server on port {port}")


@pytest.fixture(scope="module")
def guest(server):
    s = Sandbox.create("python", timeout=900, **api(server))
    start_servers(s, server)
    yield s
    s.kill()


# --- plain HTTP ---------------------------------------------------------------------------


@pytest.mark.parametrize("port,name", [(PUBLIC, "public"), (LOOPBACK, "loopback")])
def test_get_by_host_name(guest, server, port, name):
    h = host(port, guest.sandbox_id)
    r = httpx.get(f"{server.url}/some/path?q=1&r=two", headers={"Host": h})
    assert r.status_code == 200, r.text
    # Path, query and Host reach the guest unchanged; the guest's headers come back.
    assert r.text == f"{name} GET /some/path?q=1&r=two host={h}"
    assert r.headers["x-guest-server"] == name
    # The server's own port in the Host does not matter.
    r = httpx.get(f"{server.url}/p", headers={"Host": h + ":12345"})
    assert r.status_code == 200 and r.text.startswith(f"{name} GET /p ")


@pytest.mark.parametrize("port,name", [(PUBLIC, "public"), (LOOPBACK, "loopback")])
def test_get_by_e2b_headers(guest, server, port, name):
    r = httpx.get(
        f"{server.url}/via-headers",
        headers={"E2b-Sandbox-Id": guest.sandbox_id, "E2b-Sandbox-Port": str(port)},
    )
    assert r.status_code == 200, r.text
    assert r.text.startswith(f"{name} GET /via-headers ")


@pytest.mark.parametrize("port,name", [(PUBLIC, "public"), (LOOPBACK, "loopback")])
def test_post_body_through(guest, server, port, name):
    body = os.urandom(3 << 20)
    r = httpx.post(f"{server.url}/upload", content=body, headers={"Host": host(port, guest.sandbox_id)}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.text == f"{name} POST {len(body)} {hashlib.sha256(body).hexdigest()}"


def test_wrenn_credentials_do_not_reach_the_guest(guest, server):
    h = host(PUBLIC, guest.sandbox_id)
    # Wrenn's API key and user token are the caller's, not the guest's business.
    for auth in (f"Bearer {server.other_token}", f"Bearer {server.admin_key}"):
        r = httpx.get(
            f"{server.url}/headers",
            headers={"Host": h, "Authorization": auth, "X-API-Key": server.admin_key},
        )
        assert r.status_code == 200, r.text
        seen = r.json()
        assert "authorization" not in seen and "x-api-key" not in seen, seen
    # The guest application's own credentials pass.
    r = httpx.get(
        f"{server.url}/headers",
        headers={"Host": h, "Authorization": "Basic dXNlcjpwdw==", "X-API-Key": "app-key-1"},
    )
    seen = r.json()
    assert (seen.get("authorization"), seen.get("x-api-key")) == ("Basic dXNlcjpwdw==", "app-key-1"), seen
    # Upgrades too.
    sock, head = _ws_open(server, {"Host": h, "Authorization": f"Bearer {server.other_token}",
                                   "X-API-Key": server.admin_key})
    sock.close()
    fields = {k.strip().lower(): v.strip() for k, v in
              (line.split(":", 1) for line in head.decode().split("\r\n") if ":" in line)}
    assert (fields["x-seen-authorization"], fields["x-seen-api-key"]) == ("-", "-"), head


def test_keep_alive_reuses_connection(guest, server):
    with httpx.Client(base_url=server.url, headers={"Host": host(PUBLIC, guest.sandbox_id)}) as c:
        for i in range(5):
            r = c.get(f"/n/{i}")
            assert r.status_code == 200 and r.text.startswith(f"public GET /n/{i} ")


def test_response_is_streamed(guest, server):
    got = []
    with httpx.stream("GET", f"{server.url}/slow", headers={"Host": host(PUBLIC, guest.sandbox_id)}) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            got.append((time.monotonic(), chunk))
    text = b"".join(c for _, c in got).decode()
    assert text == "chunk0\nchunk1\nchunk2\n"
    # The first chunk arrived well before the last was written (0.7 s apart in the guest).
    first = next(t for t, c in got if b"chunk0" in c)
    last = next(t for t, c in got if b"chunk2" in c)
    assert last - first > 0.8


# --- WebSocket ----------------------------------------------------------------------------


def _frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise AssertionError(f"connection closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    b0, b1 = _read_exact(sock, 2)
    assert b1 & 0x80 == 0, "server frames are never masked"
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", _read_exact(sock, 2))[0]
    elif n == 127:
        n = struct.unpack(">Q", _read_exact(sock, 8))[0]
    return b0 & 0x0F, _read_exact(sock, n)


def _ws_open(server, headers: dict) -> tuple[socket.socket, bytes]:
    u = urlparse(server.url)
    sock = socket.create_connection((u.hostname, u.port), timeout=20)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ws?x=1 HTTP/1.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ] + [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, f"closed before the handshake ended: {head!r}"
        head += chunk
    status, *rest = head.decode().split("\r\n")
    assert status.startswith("HTTP/1.1 101"), head
    fields = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in rest if ":" in line)}
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    assert fields["sec-websocket-accept"] == accept.decode(), head
    assert fields["upgrade"].lower() == "websocket", head
    return sock, head


@pytest.mark.parametrize("port,name", [(PUBLIC, "public"), (LOOPBACK, "loopback")])
def test_websocket_echo(guest, server, port, name):
    sock, _ = _ws_open(server, {"Host": host(port, guest.sandbox_id)})
    try:
        sock.sendall(_frame(0x1, b"hello"))
        assert _read_frame(sock) == (0x1, f"{name}:hello".encode())
        big = os.urandom(70_000)
        sock.sendall(_frame(0x2, big))
        assert _read_frame(sock) == (0x2, big)
        sock.sendall(_frame(0x1, "ünïcode".encode()))
        assert _read_frame(sock) == (0x1, f"{name}:ünïcode".encode())
        sock.sendall(_frame(0x8, struct.pack(">H", 1000)))
        assert _read_frame(sock) == (0x8, struct.pack(">H", 1000))
    finally:
        sock.close()


def test_websocket_by_e2b_headers(guest, server):
    u = urlparse(server.url)
    sock, _ = _ws_open(
        server,
        {"Host": f"{u.hostname}:{u.port}", "E2b-Sandbox-Id": guest.sandbox_id, "E2b-Sandbox-Port": str(PUBLIC)},
    )
    try:
        sock.sendall(_frame(0x1, b"via headers"))
        assert _read_frame(sock) == (0x1, b"public:via headers")
    finally:
        sock.close()


def test_many_websockets_at_once(guest, server):
    socks = [_ws_open(server, {"Host": host(PUBLIC, guest.sandbox_id)})[0] for _ in range(5)]
    try:
        for i, s in enumerate(socks):
            s.sendall(_frame(0x1, f"m{i}".encode()))
        for i, s in enumerate(reversed(socks)):
            j = len(socks) - 1 - i
            assert _read_frame(s) == (0x1, f"public:m{j}".encode())
    finally:
        for s in socks:
            s.close()


# --- errors -------------------------------------------------------------------------------


def test_port_not_listening(guest, server):
    r = httpx.get(f"{server.url}/", headers={"Host": host(8999, guest.sandbox_id)})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "agent_error"
    # The connection is not reused after an error answer.
    assert r.headers.get("connection") == "close"


def test_unknown_capsule(server):
    r = httpx.get(f"{server.url}/", headers={"Host": host(PUBLIC, UNKNOWN_ID)})
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "not_found"
    # Not a capsule host name at all: the API itself answers (its 404 for unknown routes).
    r = httpx.get(f"{server.url}/nope", headers={"Host": "99999-cl-abc.example.test"})
    assert r.status_code == 404


def test_paused_then_resumed_then_killed(server):
    s = Sandbox.create("python", timeout=300, **api(server))
    try:
        start_servers(s, server)
        h = host(PUBLIC, s.sandbox_id)
        assert s.pause() is True
        r = httpx.get(f"{server.url}/", headers={"Host": h})
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "invalid_state"
        # E2B header routing answers as E2B's proxy does for a sandbox that is not running.
        r = httpx.get(f"{server.url}/", headers={"E2b-Sandbox-Id": s.sandbox_id, "E2b-Sandbox-Port": str(PUBLIC)})
        assert r.status_code == 502 and "was not found" in r.json()["message"], r.text

        # Resumed from memory: the guest servers were never restarted, and serve at once.
        Sandbox.connect(s.sandbox_id, **api(server))
        for port, name in ((PUBLIC, "public"), (LOOPBACK, "loopback")):
            r = httpx.get(f"{server.url}/again", headers={"Host": host(port, s.sandbox_id)})
            assert r.status_code == 200 and r.text.startswith(f"{name} GET /again "), r.text
    finally:
        assert s.kill() is True
    r = httpx.get(f"{server.url}/", headers={"Host": h})
    assert r.status_code == 404, r.text


def test_auto_resume_by_traffic_resumes_once(server):
    s = Sandbox.create(
        "python", timeout=300, lifecycle={"on_timeout": "pause", "auto_resume": True}, **api(server)
    )
    try:
        start_servers(s, server)
        h = host(PUBLIC, s.sandbox_id)
        assert s.pause() is True
        # 20 requests at once reach the paused sandbox: one resume serves them all.
        with ThreadPoolExecutor(20) as ex:
            rs = list(ex.map(lambda i: httpx.get(f"{server.url}/n/{i}", headers={"Host": h}, timeout=120), range(20)))
        for i, r in enumerate(rs):
            assert r.status_code == 200 and r.text.startswith(f"public GET /n/{i} "), r.text
        with server.admin() as c:
            r = c.get("/v1/audit-logs", params={"resource_type": "capsule", "limit": 200})
            resumes = [
                e for e in r.json()["items"]
                if e.get("resource_id") == s.sandbox_id and e["action"] == "capsule.resume"
            ]
        assert len(resumes) == 1, resumes
        assert resumes[0]["actor_type"] == "system" and resumes[0]["status"] == "success", resumes
        with server.admin() as c:
            detail = c.get(f"/sandboxes/{s.sandbox_id}").json()
        assert detail["state"] == "running" and detail["lifecycle"]["autoResume"] is True, detail
    finally:
        s.kill()
    # Auto-resume needs a memory pause: the combination with a filesystem-only one is refused.
    with server.admin() as c:
        r = c.post(
            "/sandboxes",
            json={"templateID": "minimal", "autoPause": True, "autoPauseMemory": False, "autoResume": {"enabled": True}},
        )
    assert r.status_code == 400 and "autoResume" in r.json()["message"], r.text


def test_proxied_traffic_keeps_capsule_alive(server):
    """For a capsule of the Wrenn API (an inactivity timeout), traffic through the proxy
    is activity: it moves the idle deadline. (An E2B sandbox's timeout is an end time
    that traffic does not move: test_e2b_semantics.)"""
    with server.admin() as c:
        r = c.post("/v1/capsules", json={"template": "python", "timeout_sec": 4})
        assert r.status_code == 201, r.text
        capsule_id = r.json()["id"]
    # The e2b SDK drives it too (connect keeps its inactivity timeout kind).
    s = Sandbox.connect(capsule_id, timeout=4, **api(server))
    try:
        start_servers(s, server)
        h = host(PUBLIC, s.sandbox_id)
        until = time.monotonic() + 8
        while time.monotonic() < until:
            assert httpx.get(f"{server.url}/ping", headers={"Host": h}).status_code == 200
            time.sleep(1)
        assert Sandbox.get_info(s.sandbox_id, **api(server)).state == SandboxState.RUNNING
        # Left alone (get_info is no activity), it times out: a Wrenn capsule is paused.
        def paused():
            return Sandbox.get_info(s.sandbox_id, **api(server)).state == SandboxState.PAUSED

        wait_until(paused, 20, "the idle capsule to be paused")
        assert httpx.get(f"{server.url}/", headers={"Host": h}).status_code == 409
    finally:
        s.kill()


def test_websocket_unknown_capsule(server):
    u = urlparse(server.url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    try:
        sock.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: {host(PUBLIC, UNKNOWN_ID)}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 404"), head
    finally:
        sock.close()
