"""PTY sessions through the e2b SDK (sync and async)."""

import asyncio
import re
import threading
import time

import pytest

from e2b import CommandExitException, PtySize

from helpers import wait_until


class PtyReader:
    """Consumes a sync PTY handle on a thread, collecting output."""

    def __init__(self, handle):
        self.handle = handle
        self.buf = bytearray()
        self.lock = threading.Lock()
        self.result = None
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_pty(self, data: bytes):
        with self.lock:
            self.buf.extend(data)

    def _run(self):
        try:
            self.result = self.handle.wait(on_pty=self._on_pty)
        except Exception as e:  # noqa: BLE001 - recorded for the test
            self.error = e

    def text(self) -> str:
        with self.lock:
            return self.buf.decode("utf-8", "replace")

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.text())
            if m:
                return m
            if not self.thread.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(
            f"pattern {pattern!r} not seen in PTY output within {timeout}s; "
            f"output so far: {self.text()[-2000:]!r}; error: {self.error!r}"
        )

    def join(self, timeout: float = 10.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "PTY stream did not end"


@pytest.fixture
def pty(sandbox):
    handles = []

    def create(**kw):
        kw.setdefault("size", PtySize(rows=24, cols=80))
        kw.setdefault("timeout", 60)
        h = sandbox.pty.create(**kw)
        handles.append(h)
        return h, PtyReader(h)

    yield create
    for h in handles:
        try:
            sandbox.pty.kill(h.pid, request_timeout=5)
        except Exception:
            pass


def test_pty_echo(sandbox, pty):
    h, r = pty()
    assert h.pid > 0
    sandbox.pty.send_stdin(h.pid, b"echo wrenn-$((6*7))\n")
    r.wait_for(r"wrenn-42")


def test_pty_is_a_tty_with_term(sandbox, pty):
    h, r = pty()
    sandbox.pty.send_stdin(h.pid, b'tty; echo "T=$TERM"; whoami\n')
    r.wait_for(r"/dev/pts/\d+")
    r.wait_for(r"T=xterm-256color")
    r.wait_for(r"\buser\r?\n")


def test_pty_initial_size_and_resize(sandbox, pty):
    h, r = pty(size=PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(h.pid, b"echo S1=$(stty size)\n")
    r.wait_for(r"S1=24 80")
    sandbox.pty.resize(h.pid, PtySize(rows=30, cols=100))
    sandbox.pty.send_stdin(h.pid, b"echo S2=$(stty size)\n")
    r.wait_for(r"S2=30 100")


def test_pty_user_root_and_cwd(sandbox, pty, scratch):
    h, r = pty(user="root", cwd=scratch)
    sandbox.pty.send_stdin(h.pid, b"echo W=$(whoami) P=$(pwd)\n")
    r.wait_for(rf"W=root P={re.escape(scratch)}")


def test_pty_envs(sandbox, pty):
    h, r = pty(envs={"WRENN_PTY_VAR": "xyz"})
    sandbox.pty.send_stdin(h.pid, b"echo V=$WRENN_PTY_VAR\n")
    r.wait_for(r"V=xyz")


def test_pty_kill(sandbox, pty):
    h, r = pty()
    sandbox.pty.send_stdin(h.pid, b"echo ready\n")
    r.wait_for("ready")
    assert sandbox.pty.kill(h.pid) is True
    r.join()
    assert isinstance(r.error, CommandExitException), f"expected exit exception, got {r.error!r}"
    assert r.error.exit_code == -1
    assert sandbox.pty.kill(h.pid) is False


def test_pty_exit_code(sandbox, pty):
    h, r = pty()
    sandbox.pty.send_stdin(h.pid, b"exit 3\n")
    r.join()
    assert isinstance(r.error, CommandExitException), f"got {r.error!r} / {r.result!r}"
    assert r.error.exit_code == 3


def test_pty_ctrl_d_ends_shell(sandbox, pty):
    h, r = pty()
    sandbox.pty.send_stdin(h.pid, b"echo up-$((1+1))\n")
    r.wait_for("up-2")
    # Let readline take the terminal again: a ^D typed while bash is still
    # running the previous line is consumed by the canonical-mode tty.
    time.sleep(0.5)
    sandbox.pty.send_stdin(h.pid, b"\x04")
    r.join()
    assert r.error is None, repr(r.error)
    assert r.result.exit_code == 0


def test_pty_listed(sandbox, pty):
    h, r = pty()
    info = wait_until(
        lambda: next((p for p in sandbox.commands.list() if p.pid == h.pid), None),
        timeout=3,
        desc="pty in list()",
    )
    assert info.cmd == "/bin/bash"
    assert info.args == ["-i", "-l"]


def test_pty_reconnect(sandbox):
    # Read the first handle on this thread so it can be disconnected cleanly.
    h = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=60)
    try:
        _test_pty_reconnect(sandbox, h)
    finally:
        sandbox.pty.kill(h.pid, request_timeout=5)


def _test_pty_reconnect(sandbox, h):
    sandbox.pty.send_stdin(h.pid, b"echo first-$((2+3))\n")
    seen = bytearray()
    deadline = time.monotonic() + 10
    for _, _, chunk in h:
        seen.extend(chunk or b"")
        if b"first-5" in seen or time.monotonic() > deadline:
            break
    assert b"first-5" in seen, bytes(seen)
    h.disconnect()
    h2 = sandbox.pty.connect(h.pid, timeout=20)
    r2 = PtyReader(h2)
    sandbox.pty.send_stdin(h.pid, b"echo second-$((1+1))\n")
    r2.wait_for("second-2")


async def test_async_pty(async_sandbox):
    chunks = []
    h = await async_sandbox.pty.create(
        PtySize(rows=20, cols=70), on_data=chunks.append, timeout=30
    )
    try:
        await async_sandbox.pty.send_stdin(h.pid, b"echo A=$(stty size)\n")
        deadline = time.monotonic() + 10
        while b"A=20 70" not in b"".join(chunks) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert b"A=20 70" in b"".join(chunks), b"".join(chunks)[-500:]
        await async_sandbox.pty.resize(h.pid, PtySize(rows=40, cols=120))
        await async_sandbox.pty.send_stdin(h.pid, b"echo B=$(stty size)\n")
        while b"B=40 120" not in b"".join(chunks) and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.05)
        assert b"B=40 120" in b"".join(chunks)
    finally:
        assert await async_sandbox.pty.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        await h.wait()


def test_pty_output_before_exit_not_lost(sandbox, pty):
    # Output written right before the shell exits must be drained from the
    # PTY master before the end event (EIO after slave close).
    h, r = pty()
    sandbox.pty.send_stdin(h.pid, b"stty -echo; head -c 30000 /dev/zero | tr '\\0' q; printf 'FIN%s' $((7*6)); exit 0\n")
    r.join(timeout=15)
    assert r.error is None and r.result.exit_code == 0, (r.error, r.result)
    out = r.text()
    assert "FIN42" in out, out[-300:]
    assert out.count("q") >= 30000
