"""Shared helpers for the envd suite: running envd, raw HTTP/Connect access.

The SDK is the main client under test; these helpers exist for what the SDK
cannot express (custom headers such as a short Keepalive-Ping-Interval, tags,
malformed requests) and for inspecting the wire format directly.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import httpx
from packaging.version import Version

from e2b import Sandbox
from e2b.connection_config import ConnectionConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ENVD_BIN = REPO_ROOT / "target" / "x86_64-unknown-linux-gnu" / "guest" / "envd"
DEFAULT_PORT = 49983
TEST_USER = "user"
TEST_HOME = "/home/user"

# Envelope flags (Connect protocol).
FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02


def envd_bin() -> Path:
    return Path(os.environ.get("WRENN_ENVD_BIN") or DEFAULT_ENVD_BIN)


def envd_extra_args() -> List[str]:
    extra = os.environ.get("WRENN_ENVD_ARGS", "").strip()
    return extra.split() if extra else []


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def ensure_user(name: str = TEST_USER) -> None:
    """The default sandbox user must exist on the host, with a home dir."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
    home = pwd.getpwnam(name).pw_dir
    if not os.path.isdir(home):
        os.makedirs(home, exist_ok=True)
        ent = pwd.getpwnam(name)
        os.chown(home, ent.pw_uid, ent.pw_gid)


def owner_of(path: str) -> str:
    return pwd.getpwuid(os.lstat(path).st_uid).pw_name


def chown_to(path: str, user: str = TEST_USER) -> None:
    ent = pwd.getpwnam(user)
    os.chown(path, ent.pw_uid, ent.pw_gid)


class EnvdProcess:
    """One natively running envd listening on 127.0.0.1:<port>."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://localhost:{port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = Path(tempfile.gettempdir()) / f"wrenn-envd-test-{port}.log"

    def start(self, ready_timeout: float = 15.0) -> "EnvdProcess":
        binary = envd_bin()
        if not binary.is_file():
            raise RuntimeError(
                f"envd binary not found at {binary} (build it with scripts/build-envd.sh "
                f"or set WRENN_ENVD_BIN)"
            )
        if port_in_use(self.port):
            raise RuntimeError(
                f"port {self.port} is already in use; stop whatever listens there "
                f"(e.g. a stray envd) before running the envd suite"
            )
        log = open(self.log_path, "wb")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        env.setdefault("NO_COLOR", "1")
        self.proc = subprocess.Popen(
            # --no-forward: on a host, envd must not expose the host's
            # loopback-only services on its other addresses.
            [str(binary), "--port", str(self.port), "--no-forward", *envd_extra_args()],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + ready_timeout
        last_err: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"envd exited with code {self.proc.returncode} during startup; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                r = httpx.get(f"{self.url}/health", timeout=1.0, trust_env=False)
                if r.is_success:
                    return self
                last_err = f"GET /health -> {r.status_code}"
            except httpx.HTTPError as e:
                last_err = e
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"envd on port {self.port} not healthy after {ready_timeout}s "
            f"(last: {last_err}); log tail:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        pid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        # envd's children that stayed in its process group (the group was
        # created for this envd by start_new_session, its id is envd's pid).
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-n:])

    def init(self, body: Dict[str, Any], token: Optional[str] = None) -> httpx.Response:
        headers = {"X-Access-Token": token} if token else {}
        return httpx.post(
            f"{self.url}/init", json=body, headers=headers, timeout=10, trust_env=False
        )


# ---------------------------------------------------------------------------
# Raw Connect protocol
# ---------------------------------------------------------------------------


def envelope(msg: Any, flags: int = 0) -> bytes:
    payload = msg if isinstance(msg, (bytes, bytearray)) else json.dumps(msg).encode()
    return struct.pack(">BI", flags, len(payload)) + bytes(payload)


class EnvelopeReader:
    """Incrementally splits a byte stream into Connect envelopes."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, chunk: bytes) -> List[Tuple[int, Any]]:
        self.buf.extend(chunk)
        out = []
        while len(self.buf) >= 5:
            flags, length = struct.unpack(">BI", self.buf[:5])
            if len(self.buf) < 5 + length:
                break
            payload = bytes(self.buf[5 : 5 + length])
            del self.buf[: 5 + length]
            out.append((flags, json.loads(payload) if payload else {}))
        return out


def parse_envelopes(data: bytes) -> List[Tuple[int, Any]]:
    r = EnvelopeReader()
    frames = r.feed(data)
    assert not r.buf, f"trailing partial envelope: {bytes(r.buf)[:80]!r}"
    return frames


def rpc_headers(extra: Optional[Dict[str, str]] = None, stream: bool = False) -> Dict[str, str]:
    h = {
        "Content-Type": "application/connect+json" if stream else "application/json",
        "Connect-Protocol-Version": "1",
    }
    if extra:
        h.update(extra)
    return h


def basic_auth(user: str) -> Dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}


def unary(
    base_url: str,
    method: str,
    body: Any,
    headers: Optional[Dict[str, str]] = None,
    timeout: float = 15,
    raw: Optional[bytes] = None,
) -> httpx.Response:
    """POST a unary Connect call; `method` like 'process.Process/List'."""
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(
        f"{base_url}/{method}",
        content=content,
        headers=rpc_headers(headers),
        timeout=timeout,
        trust_env=False,
    )


class ServerStream:
    """A server-streaming Connect call read envelope by envelope.

    Use as a context manager; `events()` yields decoded message dicts and
    records the end-of-stream payload in `self.end_stream`.
    """

    def __init__(
        self,
        base_url: str,
        method: str,
        body: Any,
        headers: Optional[Dict[str, str]] = None,
        timeout: float = 30,
        raw: Optional[bytes] = None,
    ):
        self.client = httpx.Client(timeout=timeout, trust_env=False)
        content = raw if raw is not None else envelope(body)
        self._cm = self.client.stream(
            "POST",
            f"{base_url}/{method}",
            content=content,
            headers=rpc_headers(headers, stream=True),
        )
        self.response: Optional[httpx.Response] = None
        self.end_stream: Optional[Dict[str, Any]] = None
        self._iter: Optional[Iterator[bytes]] = None
        self._reader = EnvelopeReader()

    def __enter__(self) -> "ServerStream":
        self.response = self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._cm.__exit__(*exc)
        finally:
            self.client.close()

    def close(self) -> None:
        """Drop the connection without reading further."""
        self.__exit__(None, None, None)

    def events(self) -> Iterator[Dict[str, Any]]:
        assert self.response is not None
        if self._iter is None:
            self._iter = self.response.iter_raw()
        for chunk in self._iter:
            for flags, msg in self._reader.feed(chunk):
                if flags & FLAG_END_STREAM:
                    self.end_stream = msg
                    return
                yield msg
        if self._reader.buf:
            raise AssertionError(f"stream ended inside an envelope: {bytes(self._reader.buf)[:80]!r}")

    def read_all(self) -> List[Dict[str, Any]]:
        return list(self.events())


def process_event_kind(msg: Dict[str, Any]) -> Tuple[str, Any]:
    """('start'|'data'|'end'|'keepalive', payload) for a Start/Connect response."""
    ev = msg.get("event", {})
    assert len(ev) == 1, f"ProcessEvent must hold exactly one oneof member: {msg}"
    (k, v), = ev.items()
    return k, v


def wait_until(pred, timeout: float = 5.0, interval: float = 0.1, desc: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {desc} (last value: {last!r})")


def sandbox_for(
    url: str,
    token: Optional[str] = None,
    cls=Sandbox,
    envd_version: str = "99.99.99",
):
    """An SDK sandbox pointed at an arbitrary envd (via `sandbox_url`), sending
    `X-Access-Token: token` on every request like a REST-created secured
    sandbox does (and signing file URLs with it)."""
    headers: Dict[str, str] = {
        "E2b-Sandbox-Id": "wrenn-test",
        "E2b-Sandbox-Port": str(ConnectionConfig.envd_port),
    }
    if token is not None:
        headers["X-Access-Token"] = token
    config = ConnectionConfig(
        sandbox_url=url,
        debug=True,
        request_timeout=20,
        extra_sandbox_headers=headers,
    )
    return cls(
        sandbox_id="wrenn-test",
        sandbox_domain=None,
        envd_version=Version(envd_version),
        envd_access_token=token,
        traffic_access_token=None,
        connection_config=config,
    )
