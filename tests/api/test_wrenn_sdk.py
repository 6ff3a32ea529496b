"""The real `wrenn` SDK (PyPI 0.3.0, unmodified) against `wrenn serve`.

Covers the SDK surface end to end: capsule lifecycle (create with and without
``wait``, info, list, ping, pause/resume, connect, destroy, inactivity auto-pause),
commands (foreground, non-UTF-8 output, timeout, envs/cwd, background + list + kill +
re-attach, streaming), files (small and 4 MiB streamed round trips, the upload cap),
PTY (resize, re-attach by tag, kill), metrics, snapshots, the SDK's error mapping, a
couple of ``AsyncCapsule`` flows, and the audit log the actions leave behind.

Every capsule a test creates is destroyed by the test (``with`` or ``finally``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
import uuid

import httpx
import pytest

from wrenn import (
    AsyncCapsule,
    AsyncWrennClient,
    Capsule,
    WrennAuthenticationError,
    WrennClient,
    WrennConflictError,
    WrennError,
    WrennNotFoundError,
    WrennValidationError,
)
from wrenn.exceptions import handle_response
from wrenn.models import Status


def _wait_status(cap: Capsule, want: set[str], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = cap.get_info().status
        if status in want:
            return status
        time.sleep(0.25)
    raise AssertionError(f"capsule {cap.capsule_id} stayed {status}, wanted {want}")


def _gone(cap_id: str) -> bool:
    """A destroyed capsule reads back `stopped` or not at all."""
    try:
        return Capsule.get_info(cap_id).status == Status.stopped
    except WrennNotFoundError:
        return True


def _pty_read_until(term, needle: bytes, limit: int = 1 << 16) -> bytes:
    """Output of a PTY session up to (and including) `needle` (pytest-timeout bounds it)."""
    buf = b""
    for ev in term:
        if ev.type == "output":
            buf += ev.data
            if needle in buf:
                return buf
        elif ev.type in ("exit", "error"):
            raise AssertionError(f"pty ended before {needle!r}: {ev!r}; output {buf!r}")
        assert len(buf) < limit, buf
    raise AssertionError(f"pty stream closed before {needle!r}; output {buf!r}")


@pytest.fixture(scope="module")
def cap(server):
    """One running capsule of the admin team, shared by the read-mostly tests."""
    c = Capsule(wait=True, api_key=server.admin_key, base_url=server.url)
    try:
        yield c
    finally:
        c.destroy()
        c._client.close()


# ── lifecycle ─────────────────────────────────────────────────────────


def test_create_wait_info_list_destroy(wrenn_env):
    with Capsule.create(wait=True) as c:
        cid = c.capsule_id
        assert cid.startswith("cl-")
        assert c.info.status == Status.running
        info = c.get_info()
        assert info.id == cid
        assert info.status == Status.running
        assert info.template == "minimal"
        assert info.vcpus >= 1 and info.memory_mb >= 128
        assert info.created_at is not None and info.created_at.tzinfo is not None
        assert info.metadata and info.metadata.get("envd_version")
        assert c.is_running()
        assert cid in {x.id for x in Capsule.list()}
        c.ping()
    # Leaving the `with` destroyed it.
    assert _gone(cid)
    assert cid not in {x.id for x in Capsule.list()}


def test_create_without_wait_then_wait_ready(wrenn_env):
    c = Capsule(template="minimal-ubuntu")  # the SDK's default name, an alias of `minimal`
    try:
        # Create is synchronous on this server: the capsule is usable once it returns.
        assert c.info.status in (Status.running, Status.starting, Status.pending)
        c.wait_ready(timeout=30)
        info = c.get_info()
        assert info.status == Status.running
        assert c.commands.run("echo ready").stdout == "ready\n"
        # The sizes the API reports are the guest's.
        nproc, mem_kib = c.commands.run(
            "nproc; awk '/MemTotal/ {print $2}' /proc/meminfo"
        ).stdout.split()
        assert int(nproc) == info.vcpus
        assert 0.8 * info.memory_mb * 1024 < int(mem_kib) <= info.memory_mb * 1024
    finally:
        c.destroy(wait=True)
    assert _gone(c.capsule_id)


def test_destroy_then_get_and_errors(wrenn_env):
    c = Capsule.create(wait=True)
    cid = c.capsule_id
    try:
        c.destroy(wait=True)
        assert _gone(cid)
        assert cid not in {x.id for x in Capsule.list()}
        with pytest.raises(WrennNotFoundError):
            c.destroy()
        with pytest.raises((WrennConflictError, WrennNotFoundError)):
            c.commands.run("true")
    finally:
        c._client.close()


# ── commands ──────────────────────────────────────────────────────────


def test_run_foreground(cap):
    r = cap.commands.run("echo out; echo err >&2; exit 3")
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"
    assert r.exit_code == 3
    assert isinstance(r.duration_ms, int) and r.duration_ms >= 0
    ok = cap.commands.run("uname -s")
    assert ok.exit_code == 0 and ok.stdout.strip() == "Linux" and ok.stderr == ""


def test_run_non_utf8_output_is_base64(cap, server):
    cmd = r"printf '\377\376abc'; printf '\200x' >&2"
    r = cap.commands.run(cmd)
    # The SDK decodes the base64 and renders the invalid bytes as U+FFFD.
    assert r.stdout == "\ufffd\ufffdabc"
    assert r.stderr == "\ufffdx"
    assert r.exit_code == 0
    # On the wire: base64 of the exact bytes.
    with server.admin() as h:
        body = h.post(
            f"/v1/capsules/{cap.capsule_id}/exec",
            json={"cmd": "/bin/sh", "args": ["-c", cmd]},
        ).json()
    assert body["encoding"] == "base64"
    assert base64.b64decode(body["stdout"]) == b"\xff\xfeabc"
    assert base64.b64decode(body["stderr"]) == b"\x80x"
    plain = cap.commands.run("printf 'h\\303\\251llo'")
    assert plain.stdout == "héllo"


def test_run_timeout(cap):
    t0 = time.monotonic()
    try:
        r = cap.commands.run("sleep 20; echo finished", timeout=2)
    except WrennError as e:
        assert e.status_code in (502, 504), (e.status_code, e.code, e.message)
    else:
        assert r.exit_code != 0
        assert "finished" not in r.stdout
    assert time.monotonic() - t0 < 12
    # The capsule is still usable and the process is gone.
    assert cap.commands.run("echo alive").stdout == "alive\n"
    deadline = time.monotonic() + 10
    while "sleep 20" in cap.commands.run("ps -eo args").stdout:
        assert time.monotonic() < deadline, "the timed-out command is still running"
        time.sleep(0.3)


IDENTITY = 'echo "$WRENN_CAPSULE_ID|$WRENN_TEMPLATE_ID|${E2B_SANDBOX_ID-unset}"'


def test_envs_and_cwd(cap):
    r = cap.commands.run("echo $FOO-$BAR; pwd", envs={"FOO": "foo", "BAR": "b a r"}, cwd="/tmp")
    assert r.stdout == "foo-b a r\n/tmp\n"
    # The guest knows who it is; E2B's names are only for capsules E2B's API made.
    template = cap.get_info().template
    assert cap.commands.run(IDENTITY).stdout == f"{cap.capsule_id}|{template}|unset\n"
    h = cap.commands.run(
        "echo $BG_VAR > /tmp/bgenv.txt; pwd >> /tmp/bgenv.txt",
        background=True,
        envs={"BG_VAR": "from-bg"},
        cwd="/var",
    )
    assert h.pid > 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if cap.files.exists("/tmp/bgenv.txt") and cap.files.read("/tmp/bgenv.txt").count("\n") == 2:
            break
        time.sleep(0.2)
    assert cap.files.read("/tmp/bgenv.txt") == "from-bg\n/var\n"


def test_background_list_connect_kill(cap):
    tag = "job-" + uuid.uuid4().hex[:8]
    h = cap.commands.run(
        "for i in 1 2 3 4; do echo line$i; sleep 0.5; done; echo oops >&2; exit 7",
        background=True,
        tag=tag,
    )
    assert h.pid > 0 and h.tag == tag and h.capsule_id == cap.capsule_id
    listed = {p.pid: p for p in cap.commands.list()}
    assert h.pid in listed
    assert listed[h.pid].tag == tag
    assert listed[h.pid].cmd == "/bin/sh"
    # Re-attach: the rest of its output and its exit code.
    events = list(cap.commands.connect(h.pid))
    out = "".join(e.data for e in events if e.type == "stdout")
    err = "".join(e.data for e in events if e.type == "stderr")
    assert "line4\n" in out
    assert "oops" in err
    assert events[-1].type == "exit" and events[-1].exit_code == 7
    assert h.pid not in {p.pid for p in cap.commands.list()}

    sleeper = cap.commands.run("sleep 1000", background=True)
    assert sleeper.tag.startswith("proc-")
    assert sleeper.pid in {p.pid for p in cap.commands.list()}
    cap.commands.kill(sleeper.pid)
    deadline = time.monotonic() + 10
    while sleeper.pid in {p.pid for p in cap.commands.list()}:
        assert time.monotonic() < deadline, "killed process still listed"
        time.sleep(0.2)
    with pytest.raises(WrennNotFoundError):
        cap.commands.kill(sleeper.pid)


def test_stream(cap):
    events = list(cap.commands.stream("echo a; sleep 0.2; echo b >&2; exit 4"))
    assert events[0].type == "start" and events[0].pid > 0
    assert "".join(e.data for e in events if e.type == "stdout") == "a\n"
    assert "".join(e.data for e in events if e.type == "stderr") == "b\n"
    assert events[-1].type == "exit" and events[-1].exit_code == 4
    with_args = list(cap.commands.stream("/bin/echo", ["x", "y z"]))
    assert "".join(e.data for e in with_args if e.type == "stdout") == "x y z\n"
    assert with_args[-1].exit_code == 0


# ── files ─────────────────────────────────────────────────────────────


def test_files_basic(cap):
    base = "/tmp/files-" + uuid.uuid4().hex[:8]
    cap.files.write(f"{base}/sub/hello.txt", "hello wörld")
    cap.files.write(f"{base}/bin.dat", bytes(range(256)))
    assert cap.files.read(f"{base}/sub/hello.txt") == "hello wörld"
    assert cap.files.read_bytes(f"{base}/bin.dat") == bytes(range(256))

    entries = {e.name: e for e in cap.files.list(base)}
    assert set(entries) == {"sub", "bin.dat"}
    assert entries["sub"].type == "directory"
    assert entries["bin.dat"].type == "file" and entries["bin.dat"].size == 256
    assert entries["bin.dat"].path == f"{base}/bin.dat"
    deep = {e.path for e in cap.files.list(base, depth=2)}
    assert f"{base}/sub/hello.txt" in deep

    assert cap.files.exists(f"{base}/sub/hello.txt")
    assert not cap.files.exists(f"{base}/sub/nope.txt")
    assert not cap.files.exists(f"{base}/nodir/nope.txt")

    d = cap.files.make_dir(f"{base}/a/b/c")
    assert d.type == "directory" and d.name == "c" and d.path == f"{base}/a/b/c"
    again = cap.files.make_dir(f"{base}/a/b/c")  # idempotent in the SDK
    assert again.type == "directory" and again.path == f"{base}/a/b/c"
    assert cap.files.exists(f"{base}/a/b/c")

    cap.files.remove(f"{base}/sub")
    assert not cap.files.exists(f"{base}/sub")
    with pytest.raises(WrennNotFoundError):
        cap.files.read(f"{base}/sub/hello.txt")
    with pytest.raises(WrennNotFoundError):
        cap.files.list(f"{base}/sub")
    cap.files.remove(base)
    assert not cap.files.exists(base)


def test_files_stream_4mib_byte_exact(cap):
    data = os.urandom(4 << 20) + b"tail"
    path = "/tmp/big-" + uuid.uuid4().hex[:8] + ".bin"
    cap.files.upload_stream(path, (data[i : i + 65536] for i in range(0, len(data), 65536)))
    got = b"".join(cap.files.download_stream(path))
    assert len(got) == len(data)
    assert got == data
    assert cap.files.read_bytes(path) == data
    digest = cap.commands.run(f"sha256sum {path}").stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()
    [entry] = [e for e in cap.files.list("/tmp") if e.path == path]
    assert entry.size == len(data)
    cap.files.remove(path)


def test_upload_over_cap_is_413_too_large(cap):
    for attempt in range(2):
        with pytest.raises(WrennError) as ei:
            cap.files.write("/tmp/too-big.bin", b"x" * (9 << 20))
        assert ei.value.status_code == 413 and ei.value.code == "too_large"
        with pytest.raises(WrennError) as ei:
            cap.files.upload_stream(
                "/tmp/too-big-stream.bin", (b"y" * (1 << 20) for _ in range(12))
            )
        assert ei.value.status_code == 413 and ei.value.code == "too_large"
        # The same SDK client keeps working after a refused upload.
        assert cap.commands.run(f"echo after-{attempt}").stdout == f"after-{attempt}\n"
        assert not cap.files.exists("/tmp/too-big.bin")
    # Just under the cap is accepted.
    ok = os.urandom((8 << 20) - 4096)
    cap.files.write("/tmp/just-under.bin", ok)
    assert cap.files.read_bytes("/tmp/just-under.bin") == ok
    cap.files.remove("/tmp/just-under.bin")


# ── pty ───────────────────────────────────────────────────────────────


def test_pty_resize_reconnect_kill(cap):
    with cap.pty(cmd="/bin/sh", cols=80, rows=24, envs={"PTY_MARK": "m1"}) as term:
        started = next(iter(term))
        assert started.type == "started"
        assert term.tag and term.tag.startswith("pty-")
        assert term.pid and term.pid > 0
        tag, pid = term.tag, term.pid
        term.write(b"stty size\n")
        assert b"24 80" in _pty_read_until(term, b"24 80")
        term.resize(cols=100, rows=30)
        term.write(b"stty size\n")
        assert b"30 100" in _pty_read_until(term, b"30 100")
        term.write(b"SECOND=s2; echo mark=$PTY_MARK\n")
        _pty_read_until(term, b"mark=m1")
    # The socket is gone; the terminal is not.
    assert pid in {p.pid for p in cap.commands.list()}
    with cap.pty_connect(tag) as again:
        again.write(b"echo again=$SECOND\n")
        assert b"again=s2" in _pty_read_until(again, b"again=s2")
        again.kill()
        tail = list(again)
        assert tail and tail[-1].type == "exit"
    deadline = time.monotonic() + 10
    while pid in {p.pid for p in cap.commands.list()}:
        assert time.monotonic() < deadline, "killed pty still listed"
        time.sleep(0.2)


# ── metrics ───────────────────────────────────────────────────────────


def test_metrics(cap, wrenn_env):
    with WrennClient() as client:
        deadline = time.monotonic() + 20
        points = []
        while time.monotonic() < deadline:
            m = client.capsules.metrics(cap.capsule_id)
            points = m.points or []
            if len(points) >= 2:
                break
            time.sleep(0.5)
        assert m.sandbox_id == cap.capsule_id
        assert len(points) >= 2, points
        now = time.time()
        last = points[-1]
        assert abs(last.timestamp_unix - now) < 120
        assert last.mem_bytes > 0
        assert 0 <= last.cpu_pct <= 100
        assert [p.timestamp_unix for p in points] == sorted(p.timestamp_unix for p in points)
        assert client.capsules.metrics(cap.capsule_id, range="2h").range == "2h"
        with pytest.raises(WrennValidationError):
            client.capsules.metrics(cap.capsule_id, range="3d")
        with pytest.raises(WrennNotFoundError):
            client.capsules.metrics("cl-" + "0" * 25)


# ── pause / resume / connect ──────────────────────────────────────────


def test_pause_resume_keeps_state(wrenn_env):
    with Capsule.create(wait=True) as c:
        c.files.write("/home/user/state.txt", "before pause")
        bg = c.commands.run("sleep 100000", background=True, tag="keeper")
        paused = c.pause()
        assert paused.status == Status.paused
        assert c.get_info().status == Status.paused
        assert c.capsule_id in {x.id for x in Capsule.list()}
        with pytest.raises(WrennConflictError) as ei:
            c.commands.run("echo nope")
        assert ei.value.status_code == 409 and ei.value.code == "invalid_state"
        with pytest.raises(WrennConflictError):
            c.pause()
        with pytest.raises(WrennConflictError):
            c.ping()

        resumed = c.resume(wait=True)
        assert resumed.status == Status.running
        assert c.files.read("/home/user/state.txt") == "before pause"
        procs = {p.pid: p.tag for p in c.commands.list()}
        assert procs.get(bg.pid) == "keeper"
        with pytest.raises(WrennConflictError):
            c.resume()

        # Capsule.connect resumes a paused capsule.
        c.pause(wait=True)
        again = Capsule.connect(c.capsule_id)
        try:
            assert again.get_info().status == Status.running
            assert again.files.read("/home/user/state.txt") == "before pause"
            assert again.commands.run("echo back").stdout == "back\n"
            assert again.commands.run(IDENTITY).stdout.startswith(f"{c.capsule_id}|")
            assert bg.pid in {p.pid for p in again.commands.list()}
        finally:
            again._client.close()


def test_inactivity_auto_pause_and_ping(wrenn_env):
    c = Capsule(timeout=2)
    try:
        assert c.info.timeout_sec == 2
        # Pings keep it alive well past its TTL.
        for _ in range(5):
            time.sleep(1)
            c.ping()
        assert c.get_info().status == Status.running
        # Then ~5 s without activity: auto-paused.
        time.sleep(5)
        assert _wait_status(c, {Status.paused}, timeout=20) == Status.paused
        # A paused capsule refuses work until it is resumed.
        with pytest.raises(WrennConflictError):
            c.commands.run("true")
        back = Capsule.connect(c.capsule_id)
        try:
            assert back.get_info().status == Status.running
        finally:
            back._client.close()
    finally:
        c.destroy()
        c._client.close()


# ── snapshots ─────────────────────────────────────────────────────────


def test_snapshot_create_use_list_delete(wrenn_env):
    name = "sdk-snap-" + uuid.uuid4().hex[:8]
    with WrennClient() as client:
        with Capsule.create(wait=True) as src:
            src.files.write("/home/user/snap.txt", "in the snapshot")
            tpl = src.create_snapshot(name)
            assert tpl.name == name
            assert tpl.type == "snapshot"
            assert tpl.platform is False
            assert (tpl.size_bytes or 0) > 0
            with pytest.raises(WrennError) as ei:
                src.create_snapshot(name)
            assert ei.value.status_code == 409 and ei.value.code == "template_name_taken"
            # overwrite=True replaces it.
            src.files.write("/home/user/snap.txt", "in the snapshot")
            assert src.create_snapshot(name, overwrite=True).name == name
            # The source keeps working.
            if src.get_info().status == Status.paused:
                src.resume(wait=True)
            assert src.commands.run("cat /home/user/snap.txt").stdout == "in the snapshot"

        listed = {t.name: t for t in client.snapshots.list()}
        assert listed[name].type == "snapshot"
        assert any(t.type == "base" and t.platform for t in listed.values())
        assert name in {t.name for t in client.snapshots.list(type="snapshot")}
        assert name not in {t.name for t in client.snapshots.list(type="base")}

        with Capsule.create(template=name, wait=True) as clone:
            assert clone.get_info().template == name
            assert clone.files.read("/home/user/snap.txt") == "in the snapshot"
            # Restored from the snapshot, it is told its own id and the snapshot's name.
            assert clone.commands.run(IDENTITY).stdout == f"{clone.capsule_id}|{name}|unset\n"

        client.snapshots.delete(name)
        assert name not in {t.name for t in client.snapshots.list()}
        with pytest.raises(WrennNotFoundError):
            client.snapshots.delete(name)
        with pytest.raises(WrennNotFoundError):
            Capsule.create(template=name)


# ── errors ────────────────────────────────────────────────────────────


def test_sdk_error_mapping(wrenn_env, server):
    with pytest.raises(WrennNotFoundError) as ei:
        Capsule.create(template="no-such-template")
    assert ei.value.status_code == 404 and ei.value.code == "not_found"
    with pytest.raises(WrennValidationError) as ei:
        Capsule.create(vcpus=0)
    assert ei.value.status_code == 400 and ei.value.code == "invalid_request"
    with pytest.raises(WrennValidationError):
        Capsule.create(template="bad name!")
    for bad_id in ("not-a-capsule", "cl-xyz", "cl-" + "0" * 25, "usr-" + "0" * 25):
        with pytest.raises(WrennNotFoundError):
            Capsule.get_info(bad_id)
    with pytest.raises(WrennNotFoundError):
        Capsule.connect("cl-" + "0" * 25)
    bad_key = "wrn_" + uuid.uuid4().hex
    with pytest.raises(WrennAuthenticationError) as ei:
        Capsule.list(api_key=bad_key)
    assert ei.value.status_code == 401 and ei.value.code == "unauthorized"
    with pytest.raises(WrennAuthenticationError):
        Capsule.create(api_key=bad_key)
    with WrennClient() as client:
        for key in ("envd_version", "kernel_version", "agent_version", "vmm_version"):
            with pytest.raises(WrennValidationError):
                handle_response(
                    client.http.post("/v1/capsules", json={"metadata": {key: "x"}})
                )
        with pytest.raises(WrennValidationError):
            handle_response(client.http.post("/v1/capsules", json={"timeout_sec": -1}))
    # None of the refused creates left a capsule behind.
    with server.admin() as h:
        for c in h.get("/v1/capsules").json():
            assert c["status"] in ("running", "paused"), c


# ── async ─────────────────────────────────────────────────────────────


@pytest.mark.asyncio
async def test_async_capsule_commands_files_pty(wrenn_env):
    async with await AsyncCapsule.create(wait=True) as c:
        info = await c.get_info()
        assert info.status == Status.running
        r = await c.commands.run("echo $X; echo e >&2; exit 2", envs={"X": "async"})
        assert (r.stdout, r.stderr, r.exit_code) == ("async\n", "e\n", 2)

        await c.files.write("/tmp/async.txt", "async data")
        assert await c.files.read("/tmp/async.txt") == "async data"
        assert await c.files.exists("/tmp/async.txt")
        d = await c.files.make_dir("/tmp/adir")
        assert (await c.files.make_dir("/tmp/adir")).path == d.path

        async def chunks():
            for i in range(4):
                yield bytes([i]) * 65536

        await c.files.upload_stream("/tmp/async.bin", chunks())
        got = b"".join([b async for b in c.files.download_stream("/tmp/async.bin")])
        assert got == b"".join(bytes([i]) * 65536 for i in range(4))

        events = [e async for e in c.commands.stream("echo s1; exit 5")]
        assert events[0].type == "start"
        assert "".join(e.data for e in events if e.type == "stdout") == "s1\n"
        assert events[-1].exit_code == 5

        h = await c.commands.run("sleep 1000", background=True, tag="async-bg")
        assert h.pid in {p.pid for p in await c.commands.list()}
        await c.commands.kill(h.pid)

        async with c.pty(cmd="/bin/sh", cols=90, rows=20) as term:
            buf = b""
            await term.write(b"stty size\n")
            async for ev in term:
                if ev.type == "output":
                    buf += ev.data
                    if b"20 90" in buf:
                        break
                assert ev.type in ("started", "output", "ping"), ev
            assert term.tag and term.tag.startswith("pty-")
            await term.kill()
        assert c.capsule_id in {x.id for x in await AsyncCapsule.list()}
    cid = c.capsule_id
    async with AsyncWrennClient() as client:
        try:
            assert (await client.capsules.get(cid)).status == Status.stopped
        except WrennNotFoundError:
            pass


@pytest.mark.asyncio
async def test_async_pause_connect_metrics(wrenn_env):
    c = await AsyncCapsule.create(wait=True)
    try:
        await c.files.write("/home/user/a.txt", "kept")
        await c.pause(wait=True)
        assert (await c.get_info()).status == Status.paused
        with pytest.raises(WrennConflictError):
            await c.commands.run("true")
        again = await AsyncCapsule.connect(c.capsule_id)
        try:
            assert (await again.get_info()).status == Status.running
            assert await again.files.read("/home/user/a.txt") == "kept"
        finally:
            await again._client.aclose()
        async with AsyncWrennClient() as client:
            points = []
            for _ in range(40):
                points = (await client.capsules.metrics(c.capsule_id)).points or []
                if points:
                    break
                await asyncio.sleep(0.5)
            assert points and points[-1].mem_bytes > 0
            assert any(t.name == "minimal" for t in await client.snapshots.list(type="base"))
    finally:
        await c.destroy()
        await c._client.aclose()


# ── audit ─────────────────────────────────────────────────────────────


def _walk_audit(h: httpx.Client, limit: int, **filters) -> list[dict]:
    items: list[dict] = []
    params = {"limit": limit, **filters}
    for _ in range(10_000):
        r = h.get("/v1/audit-logs", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= limit
        items += page["items"]
        if not page.get("next_before"):
            return items
        assert page["next_before_id"] == page["items"][-1]["id"]
        params = {**params, "before": page["next_before"], "before_id": page["next_before_id"]}
    raise AssertionError("audit pagination did not end")


def test_audit_logs(wrenn_env, server):
    with Capsule.create(wait=True) as c:
        cid = c.capsule_id
        c.pause()
        c.resume()
        c.commands.run("true", background=True)
    with server.admin() as h:
        [key] = [k for k in h.get("/v1/api-keys").json() if k["key_prefix"] == server.admin_key[:10]]
        deadline = time.monotonic() + 10
        while True:
            rows = [i for i in _walk_audit(h, 200) if i.get("resource_id") == cid]
            if {"capsule.create", "capsule.pause", "capsule.resume", "capsule.destroy"} <= {
                r["action"] for r in rows
            } or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        by_action = {r["action"]: r for r in rows}
        for action in ("capsule.create", "capsule.pause", "capsule.resume", "capsule.destroy"):
            row = by_action.get(action)
            assert row, (action, rows)
            assert row["actor_type"] == "api_key"
            assert row["actor_id"] == key["id"]
            assert row["resource_type"] == "capsule"
            assert row["status"] == "success"
            assert row["id"].startswith("log-")
        assert by_action["capsule.create"]["metadata"]["template"] == "minimal"
        # Newest first.
        order = [r["action"] for r in rows]
        assert order.index("capsule.destroy") < order.index("capsule.pause") < order.index(
            "capsule.create"
        )

        # A failed create is audited as a failure.
        with pytest.raises(WrennValidationError):
            Capsule.create(vcpus=0)
        failed = _walk_audit(h, 200, action="capsule.create")
        assert all(i["action"] == "capsule.create" for i in failed)
        assert any(i["status"] != "success" for i in failed)

        # Keyset pagination: limit=2 pages walk everything exactly once, in order.
        whole = _walk_audit(h, 200)
        paged = _walk_audit(h, 2)
        ids = [i["id"] for i in paged]
        assert len(ids) == len(set(ids)), "duplicate rows across pages"
        assert {i["id"] for i in whole} <= set(ids)
        keys = [(i["created_at"], i["id"]) for i in paged]
        assert keys == sorted(keys, reverse=True)
        assert len(paged) >= 5

        only_caps = _walk_audit(h, 3, resource_type="capsule")
        assert only_caps and all(i["resource_type"] == "capsule" for i in only_caps)

        for bad in ({"limit": 0}, {"limit": 201}, {"before": "2020-01-01T00:00:00Z"},
                    {"before": "yesterday", "before_id": "log-x"}):
            r = h.get("/v1/audit-logs", params=bad)
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["code"] == "invalid_request"
