"""The sync API against real capsules: commands, streaming, background
processes, files, pause/resume, fork, snapshots, ownership (with, GC)."""

from __future__ import annotations

import gc
import os
import shutil
import time
import uuid

import pytest

import wrenn_embed as w
from wrenn_embed import Capsule

DATA_DIR = os.environ.get("WRENN_DATA_DIR", "/var/lib/wrenn")


def wait_gone(capsule_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.id != capsule_id for c in Capsule.list()) and not os.path.exists(
            os.path.join(DATA_DIR, "capsules", capsule_id)
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"capsule {capsule_id} still exists")


# ---------------------------------------------------------------------------
# commands


def test_run_output_exit_code_envs_cwd_user(capsule):
    r = capsule.commands.run("echo hello; echo oops >&2; exit 7")
    assert (r.stdout, r.stderr, r.exit_code) == ("hello\n", "oops\n", 7)  # non-zero is not an error
    assert r.pid and r.status == "exit status 7"
    assert capsule.commands.run("true").exit_code == 0

    r = capsule.commands.run(
        'echo "$CAPSULE_ENV $REQ_ENV $(pwd) $(whoami)"', envs={"REQ_ENV": "from-run"}, cwd="/tmp"
    )
    assert r.stdout == "from-create from-run /tmp user\n"
    assert capsule.commands.run("whoami", user="root").stdout == "root\n"
    assert capsule.commands.run(["printf", "%s|", "a b", "c"]).stdout == "a b|c|"
    assert capsule.commands.run("cat", stdin="line one\nline two\n").stdout == "line one\nline two\n"
    # binary output survives
    r = capsule.commands.run("printf '\\377\\000x'")
    assert r.stdout_bytes == b"\xff\x00x"


def test_check_raises_command_exit_error(capsule):
    with pytest.raises(w.CommandExitError) as ei:
        capsule.commands.run("echo out; echo bad >&2; exit 3", check=True)
    e = ei.value
    assert (e.exit_code, e.stdout, e.stderr, e.kind) == (3, "out\n", "bad\n", "command_exit")
    assert isinstance(e, w.WrennError)


def test_streaming_callbacks_and_iterator(capsule):
    out, err = [], []
    stamps = []
    r = capsule.commands.run(
        "for i in 1 2 3; do echo $i; echo e$i >&2; sleep 0.3; done",
        on_stdout=lambda s: (out.append(s), stamps.append(time.monotonic())),
        on_stderr=err.append,
    )
    assert "".join(out) == "1\n2\n3\n" and "".join(err) == "e1\ne2\ne3\n"
    assert r.stdout == "1\n2\n3\n"
    assert len(stamps) >= 2 and stamps[-1] - stamps[0] > 0.4, "output was not streamed as it came"

    events = list(capsule.commands.stream("echo a; echo b >&2; exit 4"))
    assert events[0].type == "start" and events[0].pid > 0
    assert [(e.type, getattr(e, "data", None)) for e in events[1:-1]] in (
        [("stdout", "a\n"), ("stderr", "b\n")],
        [("stderr", "b\n"), ("stdout", "a\n")],
    )
    assert events[-1].type == "exit" and events[-1].exit_code == 4

    # leaving a stream early kills the command
    for ev in capsule.commands.stream("echo first; sleep 60"):
        if ev.type == "stdout":
            break
    time.sleep(0.5)
    assert not any(p.args[-1:] == ["echo first; sleep 60"] for p in capsule.commands.list())


def test_background_wait_kill_stdin_connect(capsule):
    h = capsule.commands.run("cat", background=True, tag="cat-proc")
    assert isinstance(h, w.CommandHandle) and h.pid > 0 and h.tag == "cat-proc"
    assert h.pid in [p.pid for p in capsule.commands.list()]
    h.send_stdin("one\n")
    h.send_stdin(b"two\n")
    h.close_stdin()
    r = h.wait()
    assert (r.stdout, r.exit_code) == ("one\ntwo\n", 0)

    h = capsule.commands.run("echo started; sleep 60", background=True)
    seen = []
    for ev in h:
        seen.append(ev.type)
        if ev.type == "stdout":
            break
    assert h.kill() is True
    r = h.wait()
    assert r.exit_code == -1 and "kill" in r.status
    assert h.pid not in [p.pid for p in capsule.commands.list()]

    # re-attach to a running process from its pid
    h = capsule.commands.run("sleep 1; echo late", background=True)
    again = capsule.commands.connect(h.pid)
    assert again.wait(timeout=30).stdout == "late\n"
    assert capsule.commands.kill(h.pid) is False  # already gone


def test_timeout_kills_command(capsule):
    t = time.monotonic()
    with pytest.raises(w.WrennTimeoutError) as ei:
        capsule.commands.run("sleep 30", timeout=1)
    assert time.monotonic() - t < 15
    assert isinstance(ei.value, TimeoutError) and ei.value.kind == "timeout"


# ---------------------------------------------------------------------------
# files


def test_files(capsule):
    f = capsule.files
    blob = bytes(range(256)) * 4096  # 1 MiB, binary
    f.write("/home/user/data/blob.bin", blob)
    f.write("/home/user/data/hello.txt", "héllo\n")
    assert f.read_bytes("/home/user/data/blob.bin") == blob
    assert f.read("/home/user/data/hello.txt") == "héllo\n"
    names = {e.name: e for e in f.list("/home/user/data")}
    assert set(names) == {"blob.bin", "hello.txt"}
    assert names["blob.bin"].size == len(blob) and names["blob.bin"].type == "file"
    assert names["blob.bin"].owner == "user"
    assert capsule.commands.run("wc -c < /home/user/data/blob.bin").stdout.strip() == str(len(blob))

    d = f.make_dir("/home/user/data/sub/deeper")
    assert d.type == "directory" and d.is_dir
    assert f.make_dir("/home/user/data/sub/deeper").is_dir  # idempotent
    assert f.exists("/home/user/data/sub") and not f.exists("/home/user/data/nope")
    assert [e.name for e in f.list("/home/user/data/sub")] == ["deeper"]
    f.remove("/home/user/data")
    assert not f.exists("/home/user/data/hello.txt")
    assert b"".join(f.download_stream("/etc/hostname")) == f.read_bytes("/etc/hostname")


# ---------------------------------------------------------------------------
# errors


def test_wrong_types_are_type_errors(capsule):
    with pytest.raises(TypeError):
        Capsule(template=42)
    with pytest.raises(TypeError):
        Capsule(vcpus="2")
    with pytest.raises(TypeError):
        Capsule(envs={"A": 1})
    with pytest.raises(TypeError):
        capsule.commands.run(123)
    with pytest.raises(TypeError):
        capsule.commands.run("true", envs=["A=B"])
    with pytest.raises(TypeError):
        capsule.commands.run("true", timeout="soon")
    with pytest.raises(TypeError):
        capsule.files.write("/tmp/x", 3.5)
    with pytest.raises(TypeError):
        capsule.files.read(None)
    with pytest.raises(TypeError):
        capsule.fork("two")
    with pytest.raises(TypeError):
        Capsule.connect(17)


def test_error_kinds(capsule):
    with pytest.raises(w.TemplateNotFoundError) as ei:
        Capsule(template="no-such-template")
    assert ei.value.kind == "template_not_found" and "no-such-template" in str(ei.value)
    assert isinstance(ei.value, w.NotFoundError)

    with pytest.raises(w.InvalidArgumentError) as ei:
        Capsule(template="minimal", vcpus=99)
    assert ei.value.kind == "invalid_argument" and isinstance(ei.value, ValueError)
    with pytest.raises(w.InvalidArgumentError):
        Capsule(template="minimal", memory_mb=-5)
    with pytest.raises(w.InvalidArgumentError):
        Capsule(template="../etc")

    # a program that does not exist: argv form raises, the shell form reports 127
    with pytest.raises(w.CommandNotFoundError) as ei:
        capsule.commands.run(["/no/such/binary", "x"])
    assert ei.value.kind == "command_not_found"
    r = capsule.commands.run("no-such-command-here")
    assert r.exit_code == 127 and "not found" in r.stderr

    with pytest.raises(w.GuestNotFoundError) as ei:
        capsule.files.read("/no/such/file")
    assert ei.value.kind == "guest_not_found"
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, w.NotFoundError)
    capsule.files.remove("/no/such/file")  # like rm -f: not an error
    with pytest.raises(w.NotFoundError):
        capsule.files.list("/no/such/dir")

    unknown = "cl-" + "0" * 25
    with pytest.raises(w.NotFoundError) as ei:
        Capsule.connect(unknown)
    assert ei.value.kind == "not_found"
    with pytest.raises(w.InvalidArgumentError):
        Capsule.connect("not-an-id")
    with pytest.raises(w.StateError):
        capsule.resume()  # running, not paused
    # reference SDK names catch the same errors
    with pytest.raises(w.WrennNotFoundError):
        Capsule.get_info(unknown)


def test_network_policy_is_enforced_and_changed_live():
    # Only denied destinations are probed: the refusal comes from the capsule's own
    # slot, so nothing leaves this machine.
    probe = "timeout 5 bash -c 'exec 3<>/dev/tcp/{}/80' 2>&1; echo rc=$?"
    with Capsule(template="minimal", network={"deny_out": ["0.0.0.0/0"]}) as c:
        out = c.commands.run(probe.format("198.51.100.7")).stdout
        assert "refused" in out.lower() and "rc=1" in out, out
        info = c.set_network({"allow_out": ["198.51.100.0/24"], "deny_out": ["203.0.113.0/24"]})
        assert info.status == "running"
        out = c.commands.run(probe.format("203.0.113.9")).stdout
        assert "refused" in out.lower(), out
        # Kept across a pause.
        c.pause()
        c.resume()
        out = c.commands.run(probe.format("203.0.113.9")).stdout
        assert "refused" in out.lower(), out
    with pytest.raises(w.InvalidArgumentError):
        Capsule(template="minimal", network={"deny_out": ["example.com"]})
    with pytest.raises(ValueError):
        Capsule(template="minimal", network={"egress_proxy": "x"})


# ---------------------------------------------------------------------------
# lifecycle


def test_pause_resume_fork_and_destroy():
    c = Capsule(template="minimal", memory_mb=256)
    try:
        c.files.write("/home/user/state.txt", "before pause")
        counter = c.commands.run(
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done", background=True
        )
        time.sleep(0.5)
        info = c.pause()
        assert info.status == "paused" and c.info.status == "paused"
        with pytest.raises(w.StateError) as ei:
            c.commands.run("true")
        assert ei.value.kind == "invalid_state"
        assert c.resume().status == "running"
        assert c.files.read("/home/user/state.txt") == "before pause"
        n1 = int(c.files.read("/tmp/count"))
        time.sleep(0.6)
        assert int(c.files.read("/tmp/count")) > n1, "the background process did not carry on"

        kids = c.fork(2)
        try:
            assert len(kids) == 2 and all(isinstance(k, Capsule) for k in kids)
            ids = {c.id} | {k.id for k in kids}
            assert len(ids) == 3
            listed = {x.id: x for x in Capsule.list()}
            assert ids <= set(listed)
            for k in kids:
                assert k.info.metadata.get("forked_from") == c.id
                assert k.files.read("/home/user/state.txt") == "before pause"
                k.files.write("/home/user/state.txt", f"kid {k.id}")
            assert c.files.read("/home/user/state.txt") == "before pause"
            assert kids[0].files.read("/home/user/state.txt") == f"kid {kids[0].id}"
        finally:
            for k in kids:
                k.destroy()
        for k in kids:
            wait_gone(k.id)
        assert counter.pid > 0
    finally:
        c.destroy()
    wait_gone(c.id)
    with pytest.raises(w.NotFoundError):
        c.commands.run("true")
    with pytest.raises(w.NotFoundError):
        Capsule.destroy(c.id)


def test_snapshot_template():
    name = f"embed-test-{uuid.uuid4().hex[:8]}"
    try:
        with Capsule(template="minimal") as c:
            c.files.write("/home/user/marker.txt", "from the snapshot")
            tpl = c.snapshot(name)
            assert tpl.name == name
            with pytest.raises(w.AlreadyExistsError):
                c.snapshot(name)
            assert c.commands.run("true").exit_code == 0  # keeps running
        with Capsule(template=name) as clone:
            assert clone.files.read("/home/user/marker.txt") == "from the snapshot"
    finally:
        shutil.rmtree(os.path.join(DATA_DIR, "templates", name), ignore_errors=True)


def test_context_manager_and_gc_destroy():
    with Capsule(template="minimal") as c:
        cid = c.id
        assert c.is_running()
    wait_gone(cid)

    # The last reference going away destroys the capsule (also from a cycle,
    # collected by the GC while it holds the GIL).
    c = Capsule(template="minimal")
    cid = c.id
    c.self_ref = c
    del c
    gc.collect()
    wait_gone(cid)

    # A handle (commands, files, background process) keeps its capsule alive.
    c = Capsule(template="minimal")
    cid, cmds = c.id, c.commands
    del c
    gc.collect()
    assert cmds.run("echo alive").stdout == "alive\n"
    del cmds
    gc.collect()
    wait_gone(cid)


def test_connect_returns_the_same_capsule(capsule):
    again = Capsule.connect(capsule.id)
    assert again.id == capsule.id
    assert again.commands.run("echo via-connect").stdout == "via-connect\n"
    del again
    gc.collect()
    # still alive: the fixture's object holds it too
    assert capsule.commands.run("true").exit_code == 0
