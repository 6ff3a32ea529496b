"""Fixtures for driving a natively running envd with the official e2b SDK.

The main envd instance listens on 49983 and has no access token, so the SDK's
debug mode (`E2B_DEBUG=true`: no REST API, envd at http://localhost:49983,
envd version assumed 99.99.99) works exactly as documented. Token-protected
behaviour is tested on separate instances (see `make_envd`).

Environment:
  WRENN_ENVD_BIN   path to the envd binary (default target/x86_64-unknown-linux-gnu/guest/envd)
  WRENN_ENVD_ARGS  extra CLI args for envd (space separated)
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Callable, List

import pytest

# Must be set before any e2b ConnectionConfig is built.
os.environ["E2B_DEBUG"] = "true"
os.environ.pop("E2B_SANDBOX_URL", None)
os.environ.pop("E2B_HTTP_VERSION", None)

from packaging.version import Version  # noqa: E402
from e2b import AsyncSandbox, Sandbox  # noqa: E402

from helpers import (  # noqa: E402
    DEFAULT_PORT,
    TEST_HOME,
    TEST_USER,
    EnvdProcess,
    chown_to,
    ensure_user,
)

SCRATCH_ROOT = os.path.join(TEST_HOME, "wrenn-envd-tests")
REQUEST_TIMEOUT = 20

_instances: List[EnvdProcess] = []


def _start(port: int) -> EnvdProcess:
    try:
        inst = EnvdProcess(port).start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    _instances.append(inst)
    return inst


@pytest.fixture(scope="session", autouse=True)
def _host_user():
    if os.geteuid() != 0:
        pytest.fail("the envd suite must run as root (envd switches users)", pytrace=False)
    ensure_user(TEST_USER)
    os.makedirs(SCRATCH_ROOT, exist_ok=True)
    chown_to(SCRATCH_ROOT)


@pytest.fixture(scope="session")
def envd(_host_user) -> EnvdProcess:
    """The main envd on 49983, no access token (plain E2B debug mode)."""
    inst = _start(DEFAULT_PORT)
    yield inst
    inst.stop()


@pytest.fixture(scope="session")
def envd_url(envd) -> str:
    return envd.url


@pytest.fixture(scope="session")
def sandbox(envd) -> Sandbox:
    """Sync SDK sandbox built the documented debug-mode way."""
    sbx = Sandbox.create(request_timeout=REQUEST_TIMEOUT)
    assert sbx.envd_api_url == "http://localhost:49983"
    assert sbx._envd_version == Version("99.99.99")
    return sbx


@pytest.fixture
async def async_sandbox(envd) -> AsyncSandbox:
    sbx = await AsyncSandbox.create(request_timeout=REQUEST_TIMEOUT)
    assert sbx.envd_api_url == "http://localhost:49983"
    return sbx


@pytest.fixture(scope="session")
def envd_factory(_host_user) -> Callable[[int], EnvdProcess]:
    """Start extra envd instances; the caller stops them (all are stopped at
    session end at the latest)."""
    yield _start
    for inst in _instances:
        inst.stop()


@pytest.fixture
def make_envd(envd_factory) -> Callable[[int], EnvdProcess]:
    """Start extra envd instances, stopped at the end of the test."""
    started: List[EnvdProcess] = []

    def factory(port: int) -> EnvdProcess:
        inst = envd_factory(port)
        started.append(inst)
        return inst

    yield factory
    for inst in started:
        inst.stop()


@pytest.fixture
def scratch(request, _host_user) -> str:
    """A fresh directory under /home/user owned by `user`, removed afterwards."""
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in request.node.name)[:60]
    path = os.path.join(SCRATCH_ROOT, f"{name}-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    chown_to(path)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cleanup_pids(sandbox):
    """Collect pids of processes a test started; SIGKILLed at teardown."""
    pids: List[int] = []
    yield pids
    for pid in pids:
        try:
            sandbox.commands.kill(pid, request_timeout=5)
        except Exception:
            pass


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if exitstatus == 0:
        return
    last_per_port = {inst.port: inst for inst in _instances}
    for inst in last_per_port.values():
        terminalreporter.write_sep("-", f"envd :{inst.port} log tail ({inst.log_path})")
        terminalreporter.write_line(inst.log_tail(40))
