"""The official `e2b` SDK (sync and asyncio), unmodified, against `wrenn serve`.

Everything goes through the server: the REST calls to its E2B-compatible API and the
envd traffic through its proxy (``E2B_SANDBOX_URL``: routed by the ``E2b-Sandbox-Id`` /
``E2b-Sandbox-Port`` headers). Each test runs once per database backend.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
import uuid

import httpx
import pytest
from packaging.version import Version
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    FileType,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
)

UNKNOWN_ID = "cl-" + "0" * 25


def api(server, key: str | None = None) -> dict:
    """Explicit connection options (for fixtures that outlive one test's environment)."""
    return {
        "api_key": key or server.admin_key,
        "api_url": server.url,
        "sandbox_url": server.url,
        "debug": False,
    }


def wait_until(fn, timeout: float, desc: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {desc} (last: {last!r})")


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@pytest.fixture(scope="module")
def run_tag() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def sbx(server, run_tag):
    """One long-lived sandbox for the tests that only read or write inside it."""
    s = Sandbox.create(
        timeout=900,
        metadata={"suite": "e2b-sdk", "run": run_tag},
        envs={"WRENN_SUITE_VAR": "hello env", "SECOND": "2"},
        **api(server),
    )
    yield s
    s.kill()


# --- create, info, envs, metadata ---------------------------------------------------------

IDENTITY = 'echo "$WRENN_CAPSULE_ID|$WRENN_TEMPLATE_ID|$E2B_SANDBOX|$E2B_SANDBOX_ID|$E2B_SANDBOX_TEMPLATE_ID"'


def identity(s: Sandbox) -> str:
    """What every process in the sandbox is told about who it is."""
    return s.commands.run(IDENTITY).stdout.strip()


def expected_identity(sandbox_id: str, template: str = "base") -> str:
    return f"{sandbox_id}|{template}|true|{sandbox_id}|{template}"


def test_create_default_template(e2b_env):
    before = now()
    s = Sandbox.create()
    try:
        assert s.sandbox_id.startswith("cl-")
        info = s.get_info()
        assert info.sandbox_id == s.sandbox_id
        assert info.template_id == "base"
        assert info.state == SandboxState.RUNNING
        assert info.metadata == {}
        assert info.cpu_count >= 1 and info.memory_mb >= 128
        assert Version(info.envd_version) == s._envd_version >= Version("0.2.4")
        assert before - dt.timedelta(seconds=2) <= info.started_at <= now() + dt.timedelta(seconds=2)
        # No timeout given: the server's E2B default (300 s).
        assert abs((info.end_at - info.started_at).total_seconds() - 300) < 10
        assert info.lifecycle == {"on_timeout": "kill", "auto_resume": False}
        assert s.is_running()
        assert s.commands.run("cat /etc/os-release").exit_code == 0
    finally:
        assert s.kill() is True


def test_envs_and_metadata(sbx, run_tag):
    r = sbx.commands.run('echo "$WRENN_SUITE_VAR|$SECOND"')
    assert r.stdout == "hello env|2\n"
    # Per-command envs add to (and override) the sandbox's.
    r = sbx.commands.run('echo "$WRENN_SUITE_VAR|$SECOND|$THIRD"', envs={"SECOND": "two", "THIRD": "3"})
    assert r.stdout == "hello env|two|3\n"
    info = sbx.get_info()
    assert info.metadata == {"suite": "e2b-sdk", "run": run_tag}
    # The guest knows who it is, in Wrenn's names and E2B's.
    assert identity(sbx) == expected_identity(sbx.sandbox_id)


def test_get_info_end_at_follows_timeout(e2b_env):
    s = Sandbox.create(timeout=120)
    try:
        info = s.get_info()
        assert abs((info.end_at - info.started_at).total_seconds() - 120) < 5
        # set_timeout counts from now and may lengthen or shorten the deadline.
        s.set_timeout(600)
        assert abs((s.get_info().end_at - now()).total_seconds() - 600) < 10
        s.set_timeout(30)
        assert abs((s.get_info().end_at - now()).total_seconds() - 30) < 10
        # connect() only ever extends a running sandbox's deadline.
        Sandbox.connect(s.sandbox_id, timeout=10)
        assert (s.get_info().end_at - now()).total_seconds() > 15
        Sandbox.connect(s.sandbox_id, timeout=200)
        assert abs((s.get_info().end_at - now()).total_seconds() - 200) < 10
    finally:
        s.kill()


# --- commands -----------------------------------------------------------------------------


def test_commands_foreground(sbx):
    r = sbx.commands.run("echo out; echo err >&2; exit 0")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0)
    with pytest.raises(CommandExitException) as ei:
        sbx.commands.run("echo bad >&2; exit 7")
    assert ei.value.exit_code == 7 and ei.value.stderr == "bad\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("id -u", user="root").stdout == "0\n"
    assert sbx.commands.run("id -un").stdout == "user\n"


def test_on_stdout_streams_while_running(sbx):
    got = []
    r = sbx.commands.run(
        "echo one; sleep 1.5; echo two; echo three >&2",
        on_stdout=lambda line: got.append(("out", line, time.monotonic())),
        on_stderr=lambda line: got.append(("err", line, time.monotonic())),
    )
    assert r.stdout == "one\ntwo\n" and r.stderr == "three\n"
    outs = [(k, line) for k, line, _ in got]
    assert ("out", "one\n") in outs and ("out", "two\n") in outs and ("err", "three\n") in outs
    t_one = next(t for k, line, t in got if line == "one\n")
    t_two = next(t for k, line, t in got if line == "two\n")
    # "one" reached the callback before the command slept, not at the end.
    assert t_two - t_one > 1.0


def test_background_wait_list_kill(sbx):
    h = sbx.commands.run("sleep 0.5; echo done", background=True)
    assert h.pid > 0
    assert h.wait().stdout == "done\n"

    marker = uuid.uuid4().hex[:8]
    h = sbx.commands.run(f"sleep 120 # {marker}", background=True, timeout=0)
    procs = wait_until(
        lambda: [p for p in sbx.commands.list() if p.pid == h.pid], 10, "process in commands.list()"
    )
    assert any(marker in " ".join(p.args) for p in procs)
    assert h.kill() is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code != 0
    wait_until(lambda: all(p.pid != h.pid for p in sbx.commands.list()), 10, "killed process to leave the list")
    assert sbx.commands.kill(h.pid) is False


def test_send_stdin(sbx):
    h = sbx.commands.run("head -n 2", background=True, stdin=True, timeout=30)
    sbx.commands.send_stdin(h.pid, "first line\n")
    sbx.commands.send_stdin(h.pid, "second line\nthird\n")
    r = h.wait()
    assert r.stdout == "first line\nsecond line\n"


def test_connect_to_running_command(sbx):
    h = sbx.commands.run("for i in 1 2 3 4; do echo tick$i; sleep 0.5; done", background=True)
    again = sbx.commands.connect(h.pid)
    r = again.wait()
    assert "tick4\n" in r.stdout


# --- files --------------------------------------------------------------------------------


def test_files_text_and_bytes(sbx):
    d = f"/home/user/files-{uuid.uuid4().hex[:8]}"
    assert sbx.files.make_dir(d) is True
    assert sbx.files.make_dir(d) is False
    info = sbx.files.write(f"{d}/a.txt", "héllo wörld\n")
    assert info.path == f"{d}/a.txt"
    assert sbx.files.read(f"{d}/a.txt") == "héllo wörld\n"

    blob = bytes(range(256)) * 64
    sbx.files.write(f"{d}/b.bin", blob)
    assert bytes(sbx.files.read(f"{d}/b.bin", format="bytes")) == blob
    assert sbx.commands.run(f"sha256sum {d}/b.bin").stdout.split()[0] == hashlib.sha256(blob).hexdigest()

    entries = {e.name: e for e in sbx.files.list(d)}
    assert set(entries) == {"a.txt", "b.bin"}
    assert entries["b.bin"].type == FileType.FILE and entries["b.bin"].size == len(blob)
    assert sbx.files.exists(f"{d}/a.txt") and not sbx.files.exists(f"{d}/nope")

    moved = sbx.files.rename(f"{d}/a.txt", f"{d}/c.txt")
    assert moved.path == f"{d}/c.txt"
    assert not sbx.files.exists(f"{d}/a.txt")
    assert sbx.files.read(f"{d}/c.txt") == "héllo wörld\n"

    sbx.files.remove(f"{d}/c.txt")
    assert not sbx.files.exists(f"{d}/c.txt")
    with pytest.raises(FileNotFoundException):
        sbx.files.read(f"{d}/c.txt")
    sbx.files.remove(d)
    assert not sbx.files.exists(d)


def test_files_4mib_byte_exact(sbx):
    data = os.urandom(4 << 20)
    path = f"/tmp/big-{uuid.uuid4().hex[:8]}.bin"
    sbx.files.write(path, data)
    back = sbx.files.read(path, format="bytes")
    assert len(back) == len(data) and bytes(back) == data
    assert sbx.commands.run(f"sha256sum {path}").stdout.split()[0] == hashlib.sha256(data).hexdigest()
    sbx.files.remove(path)


def test_watch_dir(sbx):
    d = f"/tmp/watch-{uuid.uuid4().hex[:8]}"
    sbx.files.make_dir(d)
    h = sbx.files.watch_dir(d)
    try:
        sbx.files.write(f"{d}/new.txt", "x")
        sbx.commands.run(f"mkdir {d}/sub")
        seen: set = set()

        def poll():
            seen.update((e.name, e.type.name) for e in h.get_new_events())
            return {n for n, _ in seen} >= {"new.txt", "sub"}

        wait_until(poll, 10, "watch events")
        assert ("new.txt", "CREATE") in seen or ("new.txt", "WRITE") in seen
    finally:
        h.stop()


# --- listing ------------------------------------------------------------------------------


def test_list_filters_and_pagination(e2b_env, server):
    tag = uuid.uuid4().hex[:10]
    a = Sandbox.create(timeout=300, metadata={"list": tag, "n": "a"})
    b = Sandbox.create(timeout=300, metadata={"list": tag, "n": "b"})
    try:
        def ids(**kw):
            out = []
            p = Sandbox.list(**kw)
            while p.has_next:
                out += [i.sandbox_id for i in p.next_items()]
            return out

        assert sorted(ids(query=SandboxQuery(metadata={"list": tag}))) == sorted([a.sandbox_id, b.sandbox_id])
        assert ids(query=SandboxQuery(metadata={"list": tag, "n": "b"})) == [b.sandbox_id]
        assert ids(query=SandboxQuery(metadata={"list": "no-such-" + tag})) == []
        listed = Sandbox.list(query=SandboxQuery(metadata={"n": "a", "list": tag})).next_items()
        assert [i.metadata for i in listed] == [{"list": tag, "n": "a"}]
        assert listed[0].state == SandboxState.RUNNING and listed[0].template_id == "base"

        # One per page: two pages, then no more.
        p = Sandbox.list(query=SandboxQuery(metadata={"list": tag}), limit=1, order="asc")
        assert p.has_next
        first = p.next_items()
        assert [i.sandbox_id for i in first] == [a.sandbox_id]
        assert p.has_next and p.next_token
        second = p.next_items()
        assert [i.sandbox_id for i in second] == [b.sandbox_id]
        assert not p.has_next
        desc = Sandbox.list(query=SandboxQuery(metadata={"list": tag}), limit=1, order="desc").next_items()
        assert [i.sandbox_id for i in desc] == [b.sandbox_id]

        # State filters.
        assert a.pause() is True
        q = lambda *st: SandboxQuery(metadata={"list": tag}, state=list(st))  # noqa: E731
        assert ids(query=q(SandboxState.PAUSED)) == [a.sandbox_id]
        assert ids(query=q(SandboxState.RUNNING)) == [b.sandbox_id]
        assert sorted(ids(query=q(SandboxState.RUNNING, SandboxState.PAUSED))) == sorted([a.sandbox_id, b.sandbox_id])
        paused = Sandbox.list(query=q(SandboxState.PAUSED)).next_items()[0]
        assert paused.state == SandboxState.PAUSED

        # Another team sees none of them.
        other = Sandbox.list(query=SandboxQuery(metadata={"list": tag}), api_key=server.other_key).next_items()
        assert other == []
    finally:
        a.kill()
        b.kill()
    assert ids(query=SandboxQuery(metadata={"list": tag})) == []


# --- pause / resume -----------------------------------------------------------------------


def test_pause_connect_preserves_state(e2b_env, server):
    s = Sandbox.create(timeout=300)
    try:
        s.files.write("/home/user/state.txt", "before pause")
        h = s.commands.run("sleep 600", background=True, timeout=0)
        s.commands.run("echo 'in memory' > /dev/shm/mem.txt")

        assert s.pause() is True
        assert s.pause() is False  # already paused
        assert s.get_info().state == SandboxState.PAUSED
        assert s.is_running() is False

        same = s.connect(timeout=120)
        assert same.get_info().state == SandboxState.RUNNING
        assert same.files.read("/home/user/state.txt") == "before pause"
        assert same.files.read("/dev/shm/mem.txt") == "in memory\n"
        assert h.pid in [p.pid for p in same.commands.list()]
        assert identity(same) == expected_identity(s.sandbox_id)

        # The wire statuses: 201 when connect resumed, 200 when it was already running.
        assert Sandbox.pause(s.sandbox_id) is True
        with server.admin() as c:
            r = c.post(f"/v2/sandboxes/{s.sandbox_id}/connect", json={"timeout": 120})
            assert r.status_code == 201, r.text
            assert r.json()["sandboxID"] == s.sandbox_id
            r = c.post(f"/v2/sandboxes/{s.sandbox_id}/connect", json={"timeout": 120})
            assert r.status_code == 200, r.text
        again = Sandbox.connect(s.sandbox_id)
        assert again.commands.run("cat /dev/shm/mem.txt").stdout == "in memory\n"
        assert h.pid in [p.pid for p in again.commands.list()]
    finally:
        s.kill()


# --- kill ---------------------------------------------------------------------------------


def test_kill_then_gone(e2b_env):
    s = Sandbox.create()
    s.files.write("/tmp/x", "x")
    assert s.kill() is True
    # envd traffic to a killed sandbox: E2B's proxy answer, which the SDK understands.
    assert s.is_running() is False
    with pytest.raises(SandboxNotRunningException):
        s.files.read("/tmp/x")
    with pytest.raises(SandboxNotRunningException):
        s.commands.run("true")
    assert s.kill() is False
    assert Sandbox.kill(s.sandbox_id) is False
    with pytest.raises(SandboxNotFoundException):
        s.get_info()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(s.sandbox_id)
    ids = [i.sandbox_id for i in Sandbox.list().next_items()]
    assert s.sandbox_id not in ids


def test_client_stays_usable_after_calls_to_killed_sandboxes(e2b_env):
    """The proxy answers envd calls to a killed sandbox before reading their (streamed)
    bodies; the SDK's pooled connection must not be reused afterwards, or its next call
    (here: the next create) fails with a broken pipe."""
    for _ in range(8):
        s = Sandbox.create(timeout=60)
        s.kill()
        with pytest.raises(SandboxNotRunningException):
            s.commands.run("true")
        with pytest.raises(SandboxNotRunningException):
            s.files.write("/tmp/x", "x")


# --- metrics ------------------------------------------------------------------------------


def test_get_metrics(sbx):
    info = sbx.get_info()

    def metrics():
        return sbx.get_metrics()

    ms = wait_until(metrics, 20, "at least one metric")
    for m in ms:
        assert m.cpu_count == info.cpu_count
        assert 0 <= m.cpu_used_pct <= 100 * m.cpu_count + 1
        assert m.mem_total == info.memory_mb << 20
        assert 0 < m.mem_used <= m.mem_total
        assert m.disk_total > 0 and 0 <= m.disk_used <= m.disk_total
        assert info.started_at - dt.timedelta(seconds=2) <= m.timestamp <= now() + dt.timedelta(seconds=2)
    # A window in the past has nothing.
    assert sbx.get_metrics(end=info.started_at - dt.timedelta(minutes=5)) == []


# --- snapshots and fork -------------------------------------------------------------------


def test_snapshot_create_list_delete(e2b_env):
    src = Sandbox.create(timeout=300)
    name = f"e2b-snap-{uuid.uuid4().hex[:8]}"
    try:
        src.files.write("/home/user/snap.txt", "from the snapshot")
        snap = src.create_snapshot(name=name)
        assert snap.snapshot_id == name and name in snap.names
        # The source keeps running and diverges freely.
        src.files.write("/home/user/snap.txt", "changed later")
        assert src.get_info().state == SandboxState.RUNNING

        all_ids = [i.snapshot_id for i in Sandbox.list_snapshots().next_items()]
        assert name in all_ids
        mine = [i.snapshot_id for i in src.list_snapshots().next_items()]
        assert mine == [name]
        assert [i.snapshot_id for i in Sandbox.list_snapshots(name=name).next_items()] == [name]

        child = Sandbox.create(name, timeout=120)
        try:
            assert child.get_info().template_id == name
            assert child.files.read("/home/user/snap.txt") == "from the snapshot"
            assert Sandbox.delete_snapshot(name) is True
            assert Sandbox.delete_snapshot(name) is False
            assert name not in [i.snapshot_id for i in Sandbox.list_snapshots().next_items()]
            # A sandbox created from a deleted snapshot keeps working.
            child.files.write("/home/user/after.txt", "ok")
            assert child.commands.run("cat /home/user/snap.txt /home/user/after.txt").stdout == "from the snapshotok"
        finally:
            child.kill()
        with pytest.raises(SandboxException):
            Sandbox.create(name)
    finally:
        src.kill()
        Sandbox.delete_snapshot(name)


def test_snapshot_unnamed(e2b_env):
    s = Sandbox.create(timeout=120)
    try:
        snap = s.create_snapshot()
        assert snap.snapshot_id and snap.names == [snap.snapshot_id]
        assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    finally:
        s.kill()


def test_fork(e2b_env):
    src = Sandbox.create(timeout=300, metadata={"forked": "yes"})
    try:
        src.files.write("/home/user/fork.txt", "parent state")
        forks = src.fork(count=2, timeout=120)
        assert len(forks) == 2
        assert all(isinstance(f, Sandbox) for f in forks), forks
        try:
            ids = {f.sandbox_id for f in forks}
            assert len(ids) == 2 and src.sandbox_id not in ids
            for i, f in enumerate(forks):
                assert f.files.read("/home/user/fork.txt") == "parent state"
                f.files.write("/home/user/fork.txt", f"fork {i}")
                info = f.get_info()
                assert info.metadata == {"forked": "yes"}
                # Each fork is told its own id, not its parent's.
                assert identity(f) == expected_identity(f.sandbox_id)
                assert abs((info.end_at - now()).total_seconds() - 120) < 15
            assert [f.files.read("/home/user/fork.txt") for f in forks] == ["fork 0", "fork 1"]
            assert src.files.read("/home/user/fork.txt") == "parent state"
            assert src.get_info().state == SandboxState.RUNNING
        finally:
            for f in forks:
                f.kill()
    finally:
        src.kill()


# --- lifecycle ----------------------------------------------------------------------------


def test_timeout_kills(e2b_env):
    s = Sandbox.create(timeout=3)
    assert s.get_info().state == SandboxState.RUNNING
    time.sleep(4)

    def gone():
        try:
            Sandbox.get_info(s.sandbox_id)
            return False
        except SandboxNotFoundException:
            return True

    wait_until(gone, 10, "the timed-out sandbox to be killed")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(s.sandbox_id)
    assert s.kill() is False


def test_timeout_pauses_with_lifecycle(e2b_env):
    s = Sandbox.create(timeout=3, lifecycle={"on_timeout": "pause"})
    try:
        info = s.get_info()
        assert info.lifecycle["on_timeout"] == "pause"
        s.files.write("/home/user/keep.txt", "survives the auto-pause")
        wait_until(lambda: Sandbox.get_info(s.sandbox_id).state == SandboxState.PAUSED, 15, "auto-pause")
        paused = [i.sandbox_id for i in Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()]
        assert s.sandbox_id in paused

        back = Sandbox.connect(s.sandbox_id, timeout=120)
        assert back.get_info().state == SandboxState.RUNNING
        assert back.files.read("/home/user/keep.txt") == "survives the auto-pause"
    finally:
        s.kill()


# --- errors -------------------------------------------------------------------------------


def test_unknown_template(e2b_env):
    with pytest.raises(SandboxException) as ei:
        Sandbox.create("no-such-template-" + uuid.uuid4().hex[:6])
    assert "not found" in str(ei.value)


def test_bad_api_key(e2b_env):
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="wrn_" + "f" * 32)
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="wrn_" + "f" * 32).next_items()


def test_connect_unknown(e2b_env):
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(UNKNOWN_ID)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info("not-even-an-id")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(UNKNOWN_ID, 30)
    assert Sandbox.kill(UNKNOWN_ID) is False


def test_other_team_cannot_see(sbx, server):
    other = api(server, server.other_key)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id, **other)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id, **other)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(sbx.sandbox_id, 5, **other)
    assert Sandbox.kill(sbx.sandbox_id, **other) is False
    assert sbx.sandbox_id not in [i.sandbox_id for i in Sandbox.list(**other).next_items()]
    # Untouched for its owner.
    assert sbx.get_info().state == SandboxState.RUNNING
    assert (sbx.get_info().end_at - now()).total_seconds() > 60


# --- routing into the guest ---------------------------------------------------------------


def test_host_name_routing(sbx, server):
    host = f"49983-{sbx.sandbox_id}.example.test"
    r = httpx.get(f"{server.url}/health", headers={"Host": host})
    assert r.status_code == 204, r.text
    # envd checks its own token: the proxy gives no access by itself.
    r = httpx.get(f"{server.url}/files", params={"path": "/etc/hostname"}, headers={"Host": host})
    assert r.status_code == 401, r.text
    r = httpx.get(
        f"{server.url}/files",
        params={"path": "/etc/hostname", "username": "user"},
        headers={"Host": host, "X-Access-Token": sbx._envd_access_token},
    )
    assert r.status_code == 200, r.text
    assert r.text == sbx.files.read("/etc/hostname")
    # A Host naming no capsule of this server.
    r = httpx.get(f"{server.url}/health", headers={"Host": f"49983-{UNKNOWN_ID}.example.test"})
    assert r.status_code == 404


def test_upload_over_cap_is_refused(sbx, server):
    # The server runs with an 8 MiB upload cap; envd uploads through the proxy obey it.
    path = f"/tmp/toobig-{uuid.uuid4().hex[:8]}.bin"
    with pytest.raises(Exception) as err:
        sbx.files.write(path, b"x" * (9 << 20))
    assert "413" in str(err.value) or "limit" in str(err.value), err.value
    # Without Content-Length (chunked), the body is cut off at the cap.
    def chunks():
        for _ in range(9):
            yield b"y" * (1 << 20)

    r = httpx.post(
        f"{server.url}/files",
        params={"path": path, "username": "user"},
        headers={"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": sbx._envd_access_token or "",
                 "Content-Type": "application/octet-stream"},
        content=chunks(),
        timeout=60,
    )
    assert r.status_code == 413, r.text
    # The client keeps working, and an upload under the cap passes.
    ok = path + ".ok"
    sbx.files.write(ok, b"z" * (1 << 20))
    assert sbx.commands.run(f"stat -c %s {ok}").stdout.strip() == str(1 << 20)
    sbx.commands.run(f"rm -f {path} {ok}", user="root")


def test_header_routing(sbx, server):
    h = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
    r = httpx.get(f"{server.url}/health", headers=h)
    assert r.status_code == 204, r.text
    # The port defaults to envd's.
    r = httpx.get(f"{server.url}/health", headers={"E2b-Sandbox-Id": sbx.sandbox_id})
    assert r.status_code == 204, r.text
    r = httpx.get(f"{server.url}/health", headers={**h, "E2b-Sandbox-Port": "not-a-port"})
    assert r.status_code == 400
    # No such sandbox: E2B's proxy answer (502, "was not found"), as the SDK expects.
    r = httpx.get(f"{server.url}/health", headers={"E2b-Sandbox-Id": UNKNOWN_ID})
    assert r.status_code == 502 and "was not found" in r.json()["message"], r.text
    # Answered without reading the request body: the connection is not kept.
    assert r.headers.get("connection") == "close"
    # A port nothing listens on: 502 "port is not open".
    r = httpx.get(f"{server.url}/", headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "1"})
    assert r.status_code == 502 and "port is not open" in r.json()["message"], r.text
    # Without routing headers the same path is the server's own health.
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_many_create_kill_cycles_stay_reachable(e2b_env):
    """A new sandbox may get a freed network address: the proxy must not reuse pooled
    connections of the previous owner (the new guest resets them)."""
    for i in range(3):
        a = Sandbox.create(timeout=60)
        a.files.write("/tmp/x", str(i))
        a.kill()
        b = Sandbox.create(timeout=60)
        try:
            assert not b.files.exists("/tmp/x")
            assert b.commands.run("echo ok").stdout == "ok\n"
        finally:
            b.kill()


# --- asyncio ------------------------------------------------------------------------------


async def test_async_sandbox(e2b_env, run_tag):
    s = await AsyncSandbox.create(timeout=120, metadata={"async": run_tag}, envs={"AV": "async-env"})
    try:
        r = await s.commands.run("echo $AV")
        assert r.stdout == "async-env\n"
        chunks = []
        r = await s.commands.run("echo a; sleep 0.3; echo b", on_stdout=chunks.append)
        assert "".join(chunks) == "a\nb\n"
        h = await s.commands.run("head -n 1", background=True, stdin=True)
        await s.commands.send_stdin(h.pid, "from async\n")
        assert (await h.wait()).stdout == "from async\n"

        await s.files.write("/tmp/async.bin", b"\x00\x01\xff" * 1000)
        assert bytes(await s.files.read("/tmp/async.bin", format="bytes")) == b"\x00\x01\xff" * 1000
        assert await s.files.exists("/tmp/async.bin")
        names = [e.name for e in await s.files.list("/tmp")]
        assert "async.bin" in names

        info = await s.get_info()
        assert info.metadata == {"async": run_tag}
        p = AsyncSandbox.list(query=SandboxQuery(metadata={"async": run_tag}))
        assert [i.sandbox_id for i in await p.next_items()] == [s.sandbox_id]

        assert await s.pause() is True
        back = await AsyncSandbox.connect(s.sandbox_id)
        assert await back.files.exists("/tmp/async.bin")
        await s.set_timeout(60)
    finally:
        assert await s.kill() is True
    assert await s.kill() is False
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_info(s.sandbox_id)


def test_idempotency_key_dedupes_retried_creates(server):
    from concurrent.futures import ThreadPoolExecutor

    key = uuid.uuid4().hex

    def create(k):
        with server.admin() as c:
            r = c.post("/sandboxes", json={"templateID": "base"}, headers={"Idempotency-Key": k})
            assert r.status_code == 201, r.text
            return r.json()["sandboxID"]

    with ThreadPoolExecutor(3) as pool:
        ids = list(pool.map(create, [key, key, uuid.uuid4().hex]))
    try:
        # Concurrent retries with one key get one sandbox; another key gets its own.
        assert ids[0] == ids[1] and ids[2] != ids[0], ids
    finally:
        with server.admin() as c:
            for i in set(ids):
                c.delete(f"/sandboxes/{i}")
