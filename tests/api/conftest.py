"""Fixtures for the suites that drive the real SDKs against `wrenn serve`.

Every test module runs once per database backend: SQLite (the embedded default) and
PostgreSQL (a fresh database on the cluster that ``scripts/postgres.sh`` starts; the
URL comes from ``WRENN_TEST_POSTGRES_URL``, or the script is run here). Each backend
gets its own server process and data directory (platform templates linked from the
built images), an admin team with a known API key, and a second team for tenancy
checks.

Needs root and the built images (``wrenn image build``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field

import httpx
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
IMAGES = os.environ.get("WRENN_DATA_DIR", "/var/lib/wrenn")
BINARY = os.path.join(REPO, "target", "debug", "wrenn")
ADMIN_KEY = "wrn_" + "0123456789abcdef" * 2
# Settings of the host (not the control plane), which some suites' servers take from
# their arguments only: another suite of the run may have set them in the environment.
HOST_SETTINGS_ENV = ("WRENN_DISK_OVERCOMMIT", "WRENN_DISK_RESERVE_MB", "WRENN_POOLS", "WRENN_POOL_MEMORY_MB", "WRENN_DNS_UPSTREAM", "WRENN_MAX_CONCURRENT_STARTS", "WRENN_JAIL_UIDS", "WRENN_AGENT", "WRENN_AGENTS")
PASSWORD = "correct horse battery"
# The bootstrap admin (owner of the admin team): API keys cannot create or delete keys,
# so the suites that do log in as this user.
ADMIN_EMAIL = "admin@wrenn.local"
ADMIN_PASSWORD = "bootstrap admin password"


def _stop(proc: subprocess.Popen | None, sig: int) -> None:
    """Sends `sig` to a process that still runs and waits for it (killing it after 120 s)."""
    if proc and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: str, n: int) -> str:
    """The last `n` lines of a log file ("" if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_url() -> tuple[str, str]:
    url = os.environ.get("WRENN_TEST_POSTGRES_URL")
    if not url:
        url = subprocess.run(
            [os.path.join(REPO, "scripts", "postgres.sh")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        os.environ["WRENN_TEST_POSTGRES_URL"] = url
    name = "wrenn_api_" + uuid.uuid4().hex[:12]
    subprocess.run(["psql", url, "-qc", f"CREATE DATABASE {name}"], check=True)
    return url.rsplit("/", 1)[0] + "/" + name, name


@dataclass
class Server:
    """A running ``wrenn serve`` and what the tests need to reach it."""

    backend: str
    url: str
    data_dir: str
    args: list
    env: dict
    proc: subprocess.Popen | None = None
    log_path: str = ""
    admin_key: str = ADMIN_KEY
    other_key: str = ""
    other_token: str = ""
    admin_token: str = ""
    admin_email: str = ADMIN_EMAIL
    admin_password: str = ADMIN_PASSWORD
    admin_team: str = ""
    extra: dict = field(default_factory=dict)

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [BINARY, "--data-dir", self.data_dir, "serve", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wrenn serve exited: {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"wrenn serve did not come up: {self.tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _stop(self.proc, sig)
        self.proc = None

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def tail(self, n: int = 40) -> str:
        return _tail(self.log_path, n)

    def client(self, key: str | None = None, **headers) -> httpx.Client:
        h = dict(headers)
        if key is not None:
            h["X-API-Key"] = key
        return httpx.Client(base_url=self.url, headers=h, timeout=120)

    def admin(self) -> httpx.Client:
        return self.client(self.admin_key)

    def admin_user(self) -> httpx.Client:
        """The admin team's owner, with a user token (for what API keys may not do)."""
        if not self.admin_token:
            with self.client() as c:
                r = c.post("/v1/auth/login", json={"email": self.admin_email, "password": self.admin_password})
                assert r.status_code == 200, r.text
                self.admin_token = r.json()["token"]
        return self.client(None, Authorization=f"Bearer {self.admin_token}")

    def other(self) -> httpx.Client:
        return self.client(self.other_key)


def _make_data_dir(tag: str) -> str:
    d = f"/var/lib/wrenn-test/{tag}-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(d, "templates"))
    os.symlink(os.path.join(IMAGES, "images"), os.path.join(d, "images"))
    for t in sorted(os.listdir(os.path.join(IMAGES, "templates"))):
        src = os.path.join(IMAGES, "templates", t)
        if os.path.isfile(os.path.join(src, "rootfs.img")) and not t.startswith(("snap-", "img-")):
            os.symlink(src, os.path.join(d, "templates", t))
    return d


class Agent:
    """A `wrenn agent` on loopback with its own data directory (and host id, if given).
    With `register=(control plane URL, token)` it registers and serves mutual TLS."""

    def __init__(self, tag: str, host_id: str | None = None, register: tuple[str, str] | None = None,
                 netns: "HostNetns | None" = None):
        self.data_dir = _make_data_dir(tag)
        self.host_id = host_id
        self.register = register
        self.netns = netns
        self.port = 7070 if netns else _free_port()
        self.ip = netns.host_ip if netns else "127.0.0.1"
        self.url = f"http://{self.ip}:{self.port}"
        self.log_path = os.path.join(self.data_dir, "agent.log")
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        # More `wrenn agent` arguments (e.g. `--listen`).
        self.extra: list[str] = []

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in HOST_SETTINGS_ENV and k != "WRENN_HOST_ID"}
        env.setdefault("WRENN_LOG", "info")
        log = open(self.log_path, "ab")
        if self.register:
            cp, token = self.register
            where = ["--control-plane", cp, "--register", token, "--advertise", f"{self.ip}:{self.port}"]
        else:
            where = [] if self.netns else ["--listen", f"127.0.0.1:{self.port}"]
        # nsenter joins the network namespace only (`ip netns exec` would also remount
        # /sys, hiding the cgroup hierarchies the agent confines its VMMs with).
        inside = ["nsenter", f"--net=/run/netns/{self.netns.name}"] if self.netns else []
        self.proc = subprocess.Popen(
            [*inside, BINARY, "--data-dir", self.data_dir, "agent", *where,
             "--disk-overcommit", "4", *(["--host-id", self.host_id] if self.host_id else []),
             *self.extra],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"wrenn agent exited: {self.tail()}"
            if self.log_text().count("wrenn agent listening on ") > self.starts:
                self.starts += 1
                return
            time.sleep(0.2)
        raise AssertionError(f"wrenn agent did not come up: {self.tail()}")

    def kill9(self) -> None:
        _stop(self.proc, signal.SIGKILL)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the agent stops answering; its VMMs (and guests) keep running."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)
        self.proc = None

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 40) -> str:
        return _tail(self.log_path, n)


class HostNetns:
    """A network namespace standing for another machine: a veth pair to the root
    namespace, `10.213.<n>.1` on the root side, `10.213.<n>.2` inside."""

    def __init__(self, n: int):
        tag = f"{os.getpid() % 10000}{n}"
        self.name = f"wrenn-tc{tag}"
        self.root_if, self.peer_if = f"wtc{tag}r", f"wtc{tag}p"
        self.gateway, self.host_ip = f"10.213.{n}.1", f"10.213.{n}.2"

    def create(self) -> None:
        self.delete()
        for cmd in (["ip", "netns", "add", self.name],
                    ["ip", "link", "add", self.root_if, "type", "veth", "peer", "name", self.peer_if],
                    ["ip", "link", "set", self.peer_if, "netns", self.name],
                    ["ip", "addr", "add", f"{self.gateway}/24", "dev", self.root_if],
                    ["ip", "link", "set", self.root_if, "up"],
                    ["ip", "-n", self.name, "addr", "add", f"{self.host_ip}/24", "dev", self.peer_if],
                    ["ip", "-n", self.name, "link", "set", self.peer_if, "up"],
                    ["ip", "-n", self.name, "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True, capture_output=True)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.root_if], capture_output=True)

    def exists(self) -> bool:
        return os.path.exists(f"/run/netns/{self.name}")


def point_sdks_at(srv: Server, monkeypatch) -> None:
    """Points the unmodified `e2b` and `wrenn` SDKs at `srv` with its admin key."""
    monkeypatch.setenv("E2B_API_URL", srv.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", srv.url)
    monkeypatch.setenv("E2B_API_KEY", srv.admin_key)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    # The envd suite's conftest turns E2B's debug mode on for the whole run.
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.setenv("WRENN_BASE_URL", srv.url)
    monkeypatch.setenv("WRENN_API_KEY", srv.admin_key)


def _second_team(srv: Server) -> None:
    email = f"other-{uuid.uuid4().hex[:8]}@example.com"
    with srv.client() as c:
        r = c.post("/v1/auth/signup", json={"email": email, "password": PASSWORD, "name": "Other"})
        assert r.status_code == 201, r.text
        r = c.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        srv.other_token = r.json()["token"]
        r = c.post(
            "/v1/api-keys",
            json={"name": "other team"},
            headers={"Authorization": f"Bearer {srv.other_token}"},
        )
        assert r.status_code == 201, r.text
        srv.other_key = r.json()["key"]


def _check_prerequisites() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, tap devices)")
    if not os.path.isdir(os.path.join(IMAGES, "templates", "minimal")):
        problems.append(f"no template 'minimal' under {IMAGES}: run `wrenn image build` first")
    if not os.access(BINARY, os.X_OK):
        problems.append(f"{BINARY} missing: run `cargo build -p wrenn-server`")
    if problems:
        pytest.fail("api suite prerequisites missing:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def server(request) -> Server:
    _check_prerequisites()
    backend = request.param
    data_dir = _make_data_dir(backend)
    env = dict(os.environ)
    env["WRENN_BOOTSTRAP_API_KEY"] = ADMIN_KEY
    env["WRENN_BOOTSTRAP_ADMIN_PASSWORD"] = ADMIN_PASSWORD
    env.pop("DATABASE_URL", None)
    env.setdefault("WRENN_LOG", "info,tower_http=warn")
    dbname = None
    if backend == "postgres":
        url, dbname = _postgres_url()
        env["DATABASE_URL"] = url
    port = _free_port()
    srv = Server(
        backend=backend,
        url=f"http://127.0.0.1:{port}",
        data_dir=data_dir,
        args=[
            "--listen", f"127.0.0.1:{port}",
            "--min-idle-timeout", "1",
            "--reaper-period", "1",
            "--rate-limit", "0",
            # The suites sign up and log in far more often than a person would.
            "--auth-rate-limit", "0",
            "--auth-account-rate-limit", "0",
            "--upload-limit-mib", "8",
            # Test machines may have only a few GiB free, and the suites' guests write
            # little: keep room for a quarter of their disks (test_host_disk checks
            # the default, fully reserved, on servers of its own).
            "--disk-overcommit", "4",
            # Template builds' phases: the default pre-build phase updates the package
            # index over the network, which the tests never reach.
            "--build-pre-command", "echo pre-build phase",
            "--build-post-command", "echo post-build phase",
            # Notification channels: the tests' receivers listen on loopback.
            "--channels-allow-private-addresses",
            # Template builds' base images: test_oci_images' registry is on loopback.
            "--registry-allow-private-addresses",
        ],
        env=env,
        log_path=os.path.join(data_dir, "serve.log"),
    )
    srv.start()
    _second_team(srv)
    yield srv
    # Destroy what the tests left, then stop; nothing may outlive the suite.
    for key in (srv.admin_key, srv.other_key):
        try:
            with srv.client(key) as c:
                for cap in c.get("/v1/capsules").json():
                    c.delete(f"/v1/capsules/{cap['id']}")
        except Exception:  # noqa: BLE001 - best-effort cleanup before the real stop
            pass
    srv.stop()
    shutil.rmtree(data_dir, ignore_errors=True)
    if dbname:
        base = os.environ["WRENN_TEST_POSTGRES_URL"]
        subprocess.run(["psql", base, "-qc", f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"], check=False)


@pytest.fixture(scope="module")
def start_server():
    """Starts more `wrenn serve` processes (SQLite, fresh data directory, the admin key and
    password of `server`), with other arguments: `start(tag, listen_host, args)`. They
    are stopped after the module."""
    _check_prerequisites()
    started = []

    def start(tag: str, listen_host: str = "127.0.0.1", args: tuple = ()) -> Server:
        data_dir = _make_data_dir(tag)
        env = dict(os.environ)
        # Settings come from `args` only (the wrenn_embed suite sets disk ones for its
        # in-process host, and its environment is this process's).
        for k in ("DATABASE_URL", "WRENN_SIGNUP", "WRENN_DISABLE_SIGNUP", *HOST_SETTINGS_ENV):
            env.pop(k, None)
        env["WRENN_BOOTSTRAP_API_KEY"] = ADMIN_KEY
        env["WRENN_BOOTSTRAP_ADMIN_PASSWORD"] = ADMIN_PASSWORD
        env.setdefault("WRENN_LOG", "info,tower_http=warn")
        port = _free_port()
        srv = Server(
            backend="sqlite",
            url=f"http://127.0.0.1:{port}",
            data_dir=data_dir,
            args=["--listen", f"{listen_host}:{port}", *args],
            env=env,
            log_path=os.path.join(data_dir, "serve.log"),
        )
        started.append(srv)
        srv.start()
        return srv

    yield start
    for srv in started:
        srv.stop()
        shutil.rmtree(srv.data_dir, ignore_errors=True)


@pytest.fixture
def wrenn_env(server, monkeypatch):
    """Points the `wrenn` SDK at the server (admin team)."""
    monkeypatch.setenv("WRENN_BASE_URL", server.url)
    monkeypatch.setenv("WRENN_API_KEY", server.admin_key)
    return server


@pytest.fixture
def e2b_env(server, monkeypatch):
    """Points the `e2b` SDK at the server: API and envd traffic through one URL."""
    monkeypatch.setenv("E2B_API_URL", server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", server.url)
    monkeypatch.setenv("E2B_API_KEY", server.admin_key)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return server


def wait_host_status(srv: Server, host_id: str, want: str, timeout: float = 60) -> float:
    """Waits until `GET /v1/hosts/{id}` says `want`; returns how long that took."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout:
        with srv.admin_user() as c:
            last = c.get(f"/v1/hosts/{host_id}").json().get("status")
        if last == want:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"host {host_id} is {last}, not {want}, after {timeout}s")
