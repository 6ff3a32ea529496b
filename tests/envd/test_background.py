"""Background commands: connect, list, kill, stdin, disconnect/reattach, keepalive."""

import base64
import os
import threading
import time
import uuid

import pytest

from e2b import CommandExitException, NotFoundException, TimeoutException

from helpers import (
    ServerStream,
    basic_auth,
    process_event_kind,
    unary,
    wait_until,
)


def _find(sandbox, pid):
    return next((p for p in sandbox.commands.list() if p.pid == pid), None)


def test_background_list_and_kill(sandbox, cleanup_pids):
    marker = f"bg-{uuid.uuid4().hex[:8]}"
    h = sandbox.commands.run(f"exec sleep 30 # {marker}", background=True, timeout=0)
    cleanup_pids.append(h.pid)
    assert h.pid > 0

    info = wait_until(lambda: _find(sandbox, h.pid), timeout=3, desc="process in list()")
    assert info.cmd == "/bin/bash"
    assert info.args == ["-l", "-c", f"exec sleep 30 # {marker}"]

    assert sandbox.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code == -1

    wait_until(lambda: _find(sandbox, h.pid) is None, timeout=3, desc="killed process to leave list()")
    # Killing a process that no longer exists: envd not_found -> SDK False.
    assert sandbox.commands.kill(h.pid) is False


def test_handle_kill(sandbox, cleanup_pids):
    h = sandbox.commands.run("sleep 30", background=True, timeout=0)
    cleanup_pids.append(h.pid)
    assert h.kill() is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code == -1


def test_list_shows_tag_envs_cwd(sandbox, envd_url, scratch, cleanup_pids):
    tag = f"wrenn-tag-{uuid.uuid4().hex[:8]}"
    body = {
        "process": {
            "cmd": "/bin/sleep",
            "args": ["30"],
            "envs": {"WRENN_MARK": "1"},
            "cwd": scratch,
        },
        "tag": tag,
        "stdin": False,
    }
    with ServerStream(envd_url, "process.Process/Start", body, headers=basic_auth("user")) as s:
        assert s.response.status_code == 200
        kind, start = process_event_kind(next(s.events()))
        assert kind == "start"
        pid = start["pid"]
        cleanup_pids.append(pid)

        info = _find(sandbox, pid)
        assert info is not None, "started process missing from List"
        assert info.tag == tag
        assert info.cmd == "/bin/sleep"
        assert info.args == ["30"]
        assert info.envs.get("WRENN_MARK") == "1"
        assert info.cwd == scratch

        # Selecting the process by tag works too.
        r = unary(
            envd_url,
            "process.Process/SendSignal",
            {"process": {"tag": tag}, "signal": "SIGNAL_SIGKILL"},
        )
        assert r.status_code == 200, r.text
        kinds = [process_event_kind(m)[0] for m in s.events()]
        assert kinds[-1] == "end"
    wait_until(lambda: _find(sandbox, pid) is None, timeout=3, desc="process to leave list()")


def test_connect_receives_later_output(sandbox, cleanup_pids):
    h = sandbox.commands.run(
        "for i in $(seq 1 10); do echo line$i; sleep 0.2; done",
        background=True,
        timeout=0,
    )
    cleanup_pids.append(h.pid)
    time.sleep(0.5)
    h.disconnect()

    h2 = sandbox.commands.connect(h.pid, timeout=20)
    assert h2.pid == h.pid
    r = h2.wait()
    assert r.exit_code == 0
    lines = r.stdout.split()
    assert lines, "reattached client received no output"
    assert lines[-1] == "line10"
    # Output after attach arrives in order with no gaps or duplicates.
    first = int(lines[0][4:])
    assert lines == [f"line{i}" for i in range(first, 11)]


def test_connect_unknown_pid_not_found(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(4_000_000, timeout=5)


def test_survives_sdk_disconnect_and_reattach(sandbox, scratch, cleanup_pids):
    out = os.path.join(scratch, "survived.txt")
    h = sandbox.commands.run(
        f"sleep 2; echo yes > {out}; sleep 1; echo finished",
        background=True,
        timeout=0,
    )
    cleanup_pids.append(h.pid)
    h.disconnect()
    time.sleep(0.3)
    assert _find(sandbox, h.pid) is not None, "process died when its client disconnected"

    h2 = sandbox.commands.connect(h.pid, timeout=20)
    r = h2.wait()
    assert r.exit_code == 0
    assert "finished" in r.stdout
    assert open(out).read() == "yes\n"


def test_survives_connection_drop(sandbox, envd_url, scratch, cleanup_pids):
    """The TCP connection of the starting client is closed outright."""
    out = os.path.join(scratch, "dropped.txt")
    body = {
        "process": {"cmd": "/bin/bash", "args": ["-c", f"sleep 2; echo ok > {out}; sleep 1; echo bye"]},
        "stdin": False,
    }
    s = ServerStream(envd_url, "process.Process/Start", body, headers=basic_auth("user"))
    s.__enter__()
    kind, start = process_event_kind(next(s.events()))
    assert kind == "start"
    pid = start["pid"]
    cleanup_pids.append(pid)
    s.close()  # drops the HTTP/1.1 connection

    time.sleep(0.5)
    assert _find(sandbox, pid) is not None, "process died when the connection dropped"
    r = sandbox.commands.connect(pid, timeout=20).wait()
    assert r.exit_code == 0
    assert r.stdout.endswith("bye\n")
    assert open(out).read() == "ok\n"


def test_two_subscribers_get_same_output(sandbox, cleanup_pids):
    h = sandbox.commands.run("sleep 1; echo broadcast; sleep 0.5", background=True, timeout=0)
    cleanup_pids.append(h.pid)
    h2 = sandbox.commands.connect(h.pid, timeout=20)
    results = {}

    def wait2():
        results["h2"] = h2.wait()

    t = threading.Thread(target=wait2)
    t.start()
    r1 = h.wait()
    t.join(timeout=20)
    assert r1.stdout == "broadcast\n"
    assert results["h2"].stdout == "broadcast\n"
    assert results["h2"].exit_code == 0


def test_send_stdin(sandbox, cleanup_pids):
    h = sandbox.commands.run("head -n1", background=True, stdin=True, timeout=20)
    cleanup_pids.append(h.pid)
    sandbox.commands.send_stdin(h.pid, "hello-stdin\n")
    r = h.wait()
    assert r.stdout == "hello-stdin\n"


def test_send_stdin_bytes_via_handle(sandbox, cleanup_pids):
    h = sandbox.commands.run("head -c 4 | od -An -tx1", background=True, stdin=True, timeout=20)
    cleanup_pids.append(h.pid)
    h.send_stdin(b"\x00\xff\x10\n")
    r = h.wait()
    assert r.stdout.split() == ["00", "ff", "10", "0a"]


def test_close_stdin_ends_cat(sandbox, cleanup_pids):
    h = sandbox.commands.run("cat; echo eof-seen", background=True, stdin=True, timeout=15)
    cleanup_pids.append(h.pid)
    sandbox.commands.send_stdin(h.pid, "abc\n")
    sandbox.commands.close_stdin(h.pid)
    try:
        r = h.wait()
    except TimeoutException:
        pytest.fail("cat did not exit after close_stdin (stdin pipe not closed)")
    assert r.stdout == "abc\neof-seen\n"


def test_stream_input(sandbox, cleanup_pids):
    h = sandbox.commands.run("cat", background=True, stdin=True, timeout=15)
    cleanup_pids.append(h.pid)
    sandbox.commands.stream_input(h.pid, [b"one\n", "two\n", b"three\n"], timeout=10)
    sandbox.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "one\ntwo\nthree\n"


def test_send_stdin_unknown_pid(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.send_stdin(4_000_000, "x")


def test_keepalive_honours_header(envd_url):
    """A silent process outlives the keepalive interval; keepalives are sent
    at the interval from the Keepalive-Ping-Interval header (here 1 s)."""
    body = {"process": {"cmd": "/bin/bash", "args": ["-c", "sleep 4; echo done"]}, "stdin": False}
    headers = {**basic_auth("user"), "Keepalive-Ping-Interval": "1"}
    events = []
    t0 = time.monotonic()
    with ServerStream(envd_url, "process.Process/Start", body, headers=headers, timeout=20) as s:
        assert s.response.status_code == 200
        assert s.response.headers["content-type"].startswith("application/connect+json")
        for m in s.events():
            events.append((time.monotonic() - t0, *process_event_kind(m)))
    kinds = [k for _, k, _ in events]
    assert kinds[0] == "start"
    assert kinds[-1] == "end", f"no end event: {kinds}"
    keepalives = [t for t, k, _ in events if k == "keepalive"]
    assert len(keepalives) >= 2, f"expected >=2 keepalives during 4 s of silence at 1 s interval, got {events}"
    assert keepalives[0] < 2.5, f"first keepalive too late ({keepalives[0]:.2f}s) for a 1 s interval"
    data = b"".join(
        base64.b64decode(v.get("stdout", "")) for _, k, v in events if k == "data"
    )
    assert data == b"done\n"
    end = events[-1][2]
    assert end.get("exitCode", 0) == 0
    assert end.get("exited") is True
    assert s.end_stream == {} or "error" not in s.end_stream


def test_quiet_background_command_not_cut_off(sandbox, cleanup_pids):
    # The SDK asks for 50 s keepalives; a few silent seconds must not end it.
    h = sandbox.commands.run("sleep 5; echo awake", background=True, timeout=30)
    cleanup_pids.append(h.pid)
    r = h.wait()
    assert r.stdout == "awake\n"


def test_background_default_timeout_applies(sandbox):
    marker = f"bgto-{uuid.uuid4().hex[:8]}"
    h = sandbox.commands.run(f"exec sleep 30 # {marker}", background=True, timeout=2)
    with pytest.raises(TimeoutException):
        h.wait()
    wait_until(
        lambda: all(marker not in " ".join(p.args) for p in sandbox.commands.list()),
        timeout=5,
        desc="background process to be killed at its timeout",
    )


def test_send_signal_finished_pid_not_found(sandbox, envd_url):
    h = sandbox.commands.run("true", background=True)
    h.wait()
    r = unary(
        envd_url,
        "process.Process/SendSignal",
        {"process": {"pid": h.pid}, "signal": "SIGNAL_SIGTERM"},
    )
    assert r.status_code == 404, r.text
    assert r.json()["code"] == "not_found"
    assert sandbox.commands.kill(h.pid) is False


def test_connect_timeout_does_not_kill_process(sandbox, cleanup_pids):
    # Only Start's Connect-Timeout-Ms bounds the process; a Connect call's
    # deadline ends that subscription only.
    h = sandbox.commands.run("exec sleep 30", background=True, timeout=0)
    cleanup_pids.append(h.pid)
    h.disconnect()
    h2 = sandbox.commands.connect(h.pid, timeout=1)
    with pytest.raises(TimeoutException):
        h2.wait()
    time.sleep(1.0)
    assert _find(sandbox, h.pid) is not None, "Connect deadline killed the process"


def test_start_deadline_kills_after_disconnect(sandbox):
    marker = f"dl-{uuid.uuid4().hex[:8]}"
    h = sandbox.commands.run(f"exec sleep 30 # {marker}", background=True, timeout=2)
    h.disconnect()
    assert _find(sandbox, h.pid) is not None
    wait_until(
        lambda: _find(sandbox, h.pid) is None,
        timeout=5,
        desc="process to be killed at its Start deadline after the client left",
    )
