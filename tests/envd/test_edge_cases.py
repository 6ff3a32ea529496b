"""Edge cases and resource hygiene: concurrency, leaks, encodings, less common
protocol paths. Native execution lets these look at envd's /proc directly."""

import base64
import concurrent.futures
import gzip
import os
import re
import subprocess
import time
import uuid

import httpx
import pytest

from e2b import CommandExitException, PtySize

from helpers import (
    TEST_HOME,
    ServerStream,
    basic_auth,
    process_event_kind,
    sandbox_for,
    unary,
    envelope,
)


# --- process lifecycle hygiene ----------------------------------------------


def _children(pid: int):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append((int(d), fields[0]))
    return out


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_many_concurrent_commands(sandbox):
    def one(i):
        r = sandbox.commands.run(f"printf 'job-%s' {i}; printf 'err-%s' {i} >&2")
        return i, r.stdout, r.stderr

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as ex:
        results = list(ex.map(one, range(40)))
    for i, out, err in results:
        assert out == f"job-{i}"
        assert err == f"err-{i}"


def test_output_right_before_exit_not_lost(sandbox):
    # The end event must come after all output of the process.
    for _ in range(25):
        r = sandbox.commands.run("head -c 70000 /dev/zero | tr '\\0' x; printf END")
        assert len(r.stdout) == 70003 and r.stdout.endswith("END")


def test_no_zombies_no_fd_leak_no_list_leak(sandbox, envd):
    pid = envd.proc.pid
    for _ in range(5):  # warm up pools/caches
        sandbox.commands.run("true")
    fds_before = _fd_count(pid)
    for _ in range(40):
        sandbox.commands.run("echo x")
    h = sandbox.commands.run("exec sleep 30", background=True, timeout=0)
    sandbox.commands.kill(h.pid)
    with pytest.raises(CommandExitException):
        h.wait()
    time.sleep(0.5)
    zombies = [c for c in _children(pid) if c[1] == "Z"]
    assert not zombies, f"unreaped children of envd: {zombies}"
    fds_after = _fd_count(pid)
    assert fds_after <= fds_before + 4, f"envd fds grew from {fds_before} to {fds_after}"
    assert all(p.pid != h.pid for p in sandbox.commands.list())


def test_sigterm_status(envd_url, sandbox):
    body = {"process": {"cmd": "/bin/sleep", "args": ["30"]}, "stdin": False}
    with ServerStream(envd_url, "process.Process/Start", body, headers=basic_auth("user"), timeout=15) as s:
        kind, start = process_event_kind(next(s.events()))
        assert kind == "start"
        r = unary(
            envd_url,
            "process.Process/SendSignal",
            {"process": {"pid": start["pid"]}, "signal": "SIGNAL_SIGTERM"},
        )
        assert r.status_code == 200, r.text
        msgs = s.read_all()
    kind, end = process_event_kind(msgs[-1])
    assert kind == "end"
    assert end.get("exitCode") == -1
    assert not end.get("exited", False)
    assert "terminated" in end.get("status", ""), end


def test_supplementary_groups_match_host(sandbox):
    host = subprocess.run(["id", "-Gn", "user"], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(sandbox.commands.run("id -Gn").stdout.split()) == sorted(host)


def test_binary_stdout_raw(envd_url):
    body = {"process": {"cmd": "/bin/bash", "args": ["-c", "printf '\\xff\\x00\\xfe'"]}, "stdin": False}
    with ServerStream(envd_url, "process.Process/Start", body, timeout=10) as s:
        msgs = s.read_all()
    data = b"".join(
        base64.b64decode(v["stdout"]) for k, v in map(process_event_kind, msgs) if k == "data" and "stdout" in v
    )
    assert data == b"\xff\x00\xfe"


def test_large_stdin(sandbox):
    h = sandbox.commands.run("wc -c", background=True, stdin=True, timeout=30)
    chunk = b"z" * 65536
    for _ in range(32):  # 2 MiB
        sandbox.commands.send_stdin(h.pid, chunk)
    sandbox.commands.close_stdin(h.pid)
    assert h.wait().stdout.strip() == str(32 * 65536)


def test_keepalive_timer_reset_by_data(envd_url):
    # Output every 0.5 s with a 1 s keepalive interval: no keepalive needed.
    body = {
        "process": {"cmd": "/bin/bash", "args": ["-c", "for i in 1 2 3 4 5 6; do echo $i; sleep 0.5; done"]},
        "stdin": False,
    }
    with ServerStream(
        envd_url, "process.Process/Start", body, headers={"Keepalive-Ping-Interval": "1"}, timeout=15
    ) as s:
        kinds = [process_event_kind(m)[0] for m in s.events()]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("keepalive") <= 1, kinds


def test_connect_stream_keepalive(envd_url, sandbox):
    h = sandbox.commands.run("sleep 3", background=True, timeout=20)
    with ServerStream(
        envd_url,
        "process.Process/Connect",
        {"process": {"pid": h.pid}},
        headers={"Keepalive-Ping-Interval": "1"},
        timeout=15,
    ) as s:
        kinds = [process_event_kind(m)[0] for m in s.events()]
    assert kinds[0] == "start" and kinds[-1] == "end", kinds
    assert kinds.count("keepalive") >= 1, kinds


def test_relative_and_tilde_cwd(sandbox, scratch):
    rel = os.path.relpath(scratch, TEST_HOME)
    assert sandbox.commands.run("pwd", cwd=rel).stdout == scratch + "\n"
    assert sandbox.commands.run("pwd", cwd=f"~/{rel}").stdout == scratch + "\n"


# --- PTY -------------------------------------------------------------------


def test_pty_stream_input_and_close_stdin_refused(sandbox):
    h = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=30)
    try:
        sandbox.pty.stream_input(h.pid, [b"echo str", b"eam-$((3*3))\n"], timeout=10)
        seen = bytearray()
        deadline = time.monotonic() + 10
        for _, _, chunk in h:
            seen.extend(chunk or b"")
            if b"stream-9" in seen or time.monotonic() > deadline:
                break
        assert b"stream-9" in seen, bytes(seen)
    finally:
        assert sandbox.pty.kill(h.pid) is True


# --- filesystem edge cases ----------------------------------------------------


def test_listdir_depth_zero_and_symlinks(envd_url, scratch):
    os.makedirs(f"{scratch}/d/inner")
    with open(f"{scratch}/f.txt", "w") as f:
        f.write("f")
    os.symlink(f"{scratch}/d", f"{scratch}/dlink")
    os.symlink(f"{scratch}/f.txt", f"{scratch}/flink")
    r = unary(envd_url, "filesystem.Filesystem/ListDir", {"path": scratch, "depth": 0})
    assert r.status_code == 200, r.text
    entries = {e["name"]: e for e in r.json()["entries"]}
    assert set(entries) == {"d", "f.txt", "dlink", "flink"}
    assert entries["dlink"]["type"] == "FILE_TYPE_DIRECTORY"
    assert entries["dlink"]["symlinkTarget"] == f"{scratch}/d"
    assert entries["flink"]["type"] == "FILE_TYPE_FILE"
    assert entries["flink"]["symlinkTarget"] == f"{scratch}/f.txt"
    assert "symlinkTarget" not in entries["f.txt"]
    assert entries["d"]["path"] == f"{scratch}/d"


def test_dangling_symlink_listed(sandbox, scratch):
    os.symlink(f"{scratch}/nowhere", f"{scratch}/dangling")
    with open(f"{scratch}/ok.txt", "w") as f:
        f.write("ok")
    names = {e.name for e in sandbox.files.list(scratch)}
    assert "ok.txt" in names  # a dangling link must not break the listing


def test_upload_parent_is_file(sandbox, scratch):
    with open(f"{scratch}/blocker", "w") as f:
        f.write("x")
    with pytest.raises(Exception) as ei:
        sandbox.files.write(f"{scratch}/blocker/child.txt", "c")
    assert "blocker" in str(ei.value) or ei.value.__class__.__name__ != "SandboxException"


def test_upload_relative_multipart_filename(envd_url, scratch):
    rel = os.path.relpath(scratch, TEST_HOME)
    r = httpx.post(
        f"{envd_url}/files",
        files=[("file", (f"{rel}/relpart.txt", b"r")), ("other", ("ignored.txt", b"i"))],
        trust_env=False,
    )
    assert r.status_code == 200, r.text
    assert [e["path"] for e in r.json()] == [f"{scratch}/relpart.txt"]
    assert open(f"{scratch}/relpart.txt").read() == "r"
    assert not os.path.exists(f"{TEST_HOME}/ignored.txt")


def test_octet_stream_gzip_raw(envd_url, scratch):
    data = b"raw gzip body\n" * 1000
    r = httpx.post(
        f"{envd_url}/files",
        params={"path": f"{scratch}/g.txt"},
        content=gzip.compress(data),
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        trust_env=False,
    )
    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == f"{scratch}/g.txt"
    assert open(f"{scratch}/g.txt", "rb").read() == data


def test_range_ignores_gzip(envd_url, scratch):
    with open(f"{scratch}/r.txt", "wb") as f:
        f.write(b"abcdefghij" * 100)
    r = httpx.get(
        f"{envd_url}/files",
        params={"path": f"{scratch}/r.txt"},
        headers={"Range": "bytes=10-19", "Accept-Encoding": "gzip"},
        trust_env=False,
    )
    assert r.status_code == 206
    assert r.headers.get("content-encoding", "identity") == "identity"
    assert r.content == b"abcdefghij"


def test_star_q0_with_gzip(envd_url, scratch):
    with open(f"{scratch}/s.txt", "wb") as f:
        f.write(b"s" * 1000)
    r = httpx.get(
        f"{envd_url}/files",
        params={"path": f"{scratch}/s.txt"},
        headers={"Accept-Encoding": "gzip, *;q=0"},
        trust_env=False,
    )
    assert r.status_code == 200
    assert r.headers.get("content-encoding") == "gzip"
    assert r.content == b"s" * 1000


def test_metadata_invalid_rejected(envd_url, scratch):
    r = httpx.post(
        f"{envd_url}/files",
        params={"path": f"{scratch}/m.txt"},
        content=b"m",
        headers={"Content-Type": "application/octet-stream", "X-Metadata-Big": "v" * 5000},
        trust_env=False,
    )
    assert r.status_code == 400, r.text
    assert not os.path.exists(f"{scratch}/m.txt") or not os.listxattr(f"{scratch}/m.txt")


def test_get_watcher_events_unknown_id(envd_url):
    r = unary(envd_url, "filesystem.Filesystem/GetWatcherEvents", {"watcherId": "no-such-watcher"})
    assert r.status_code == 404, r.text
    assert r.json()["code"] == "not_found"


def test_watchdir_stream_start_and_keepalive(envd_url, scratch):
    with ServerStream(
        envd_url,
        "filesystem.Filesystem/WatchDir",
        {"path": scratch},
        headers={"Keepalive-Ping-Interval": "1"},
        timeout=10,
    ) as s:
        it = s.events()
        first = next(it)
        assert "start" in first, first
        with open(f"{scratch}/ev.txt", "w") as f:
            f.write("e")
        got = []
        t0 = time.monotonic()
        for m in it:
            got.append(m)
            if time.monotonic() - t0 > 2.5:
                break
    kinds = [next(iter(m)) for m in got]
    assert "keepalive" in kinds, kinds
    fs = [m["filesystem"] for m in got if "filesystem" in m]
    assert any(e["name"] == "ev.txt" and e["type"] == "EVENT_TYPE_CREATE" for e in fs), fs


def test_unicode_signed_url(envd_factory, scratch):
    inst = envd_factory(49987)
    try:
        token = "tok-" + uuid.uuid4().hex
        assert inst.init({"accessToken": token}).status_code == 204
        sbx = sandbox_for(inst.url, token)
        p = f"{scratch}/ü n/ïcode ✓ &x=1.txt"
        sbx.files.write(p, "uni")
        r = httpx.get(sbx.download_url(p), trust_env=False)
        assert r.status_code == 200, r.text
        assert r.content == b"uni"
        up = sbx.upload_url(f"{scratch}/ü n/up ✓.txt", use_signature_expiration=60)
        r = httpx.post(up, files={"file": ("x", b"up")}, trust_env=False)
        assert r.status_code == 200, r.text
        assert open(f"{scratch}/ü n/up ✓.txt").read() == "up"
    finally:
        inst.stop()


def test_init_clears_token(envd_factory):
    inst = envd_factory(49988)
    try:
        token = "tok-" + uuid.uuid4().hex
        assert inst.init({"accessToken": token}).status_code == 204
        assert unary(inst.url, "process.Process/List", {}).status_code == 401
        assert inst.init({}, token=token).status_code == 204
        assert unary(inst.url, "process.Process/List", {}).status_code == 200
    finally:
        inst.stop()


# --- flow control -------------------------------------------------------------


def test_slow_reader_loses_nothing(envd_url):
    """A client that reads slowly must get every byte (backpressure, no
    dropped broadcast messages)."""
    n = 200_000
    body = {"process": {"cmd": "/usr/bin/seq", "args": ["1", str(n)]}, "stdin": False}
    out = bytearray()
    kinds = []
    with ServerStream(envd_url, "process.Process/Start", body, timeout=60) as s:
        for i, m in enumerate(s.events()):
            k, v = process_event_kind(m)
            kinds.append(k)
            if k == "data":
                out.extend(base64.b64decode(v.get("stdout", "")))
            if i < 30:
                time.sleep(0.05)
    assert kinds[-1] == "end", kinds[-5:]
    assert bytes(out) == "".join(f"{i}\n" for i in range(1, n + 1)).encode()


def test_slow_subscriber_does_not_starve_fast_one(sandbox, envd_url):
    n = 150_000
    h = sandbox.commands.run(f"sleep 1; seq 1 {n}", background=True, timeout=30)
    out = bytearray()
    with ServerStream(envd_url, "process.Process/Connect", {"process": {"pid": h.pid}}, timeout=30) as s:
        for i, m in enumerate(s.events()):
            k, v = process_event_kind(m)
            if k == "data":
                out.extend(base64.b64decode(v.get("stdout", "")))
            if i < 20:
                time.sleep(0.05)
    fast = h.wait()
    expected = "".join(f"{i}\n" for i in range(1, n + 1))
    assert fast.stdout == expected
    assert bytes(out) == expected.encode()


def test_request_body_trickled_byte_by_byte(envd_url):
    env = envelope({"process": {"cmd": "/bin/echo", "args": ["trickle"]}, "stdin": False})

    def gen():
        for b in env:
            yield bytes([b])

    with httpx.Client(trust_env=False, timeout=10) as c:
        r = c.post(
            f"{envd_url}/process.Process/Start",
            content=gen(),
            headers={"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"},
        )
    assert r.status_code == 200
    from helpers import parse_envelopes

    frames = parse_envelopes(r.content)
    out = b"".join(
        base64.b64decode(m["event"]["data"]["stdout"])
        for _, m in frames[:-1]
        if "data" in m.get("event", {})
    )
    assert out == b"trickle\n"


def test_pty_large_output(sandbox):
    h = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=30)
    try:
        sandbox.pty.send_stdin(h.pid, b"seq 1 60000; echo DONE-$((40+2))\n")
        seen = bytearray()
        deadline = time.monotonic() + 20
        for _, _, chunk in h:
            seen.extend(chunk or b"")
            if b"DONE-42" in seen or time.monotonic() > deadline:
                break
        assert b"DONE-42" in seen
        # Drop terminal control sequences (e.g. bracketed-paste toggles).
        clean = re.sub(rb"\x1b\[[0-9;?]*[a-zA-Z]", b"", bytes(seen))
        lines = clean.replace(b"\r", b"").split(b"\n")
        nums = [ln for ln in lines if ln.isdigit()]
        assert nums[-1] == b"60000"
        assert nums[-60000:] == [str(i).encode() for i in range(1, 60001)]
    finally:
        sandbox.pty.kill(h.pid)


# --- uploads ------------------------------------------------------------------


def test_empty_uploads(sandbox, scratch):
    sandbox.files.write(f"{scratch}/e1", b"")
    sandbox.files.write(f"{scratch}/e2", b"", use_octet_stream=True)
    sandbox.files.write(f"{scratch}/e3", b"", gzip=True)
    for n in ("e1", "e2", "e3"):
        assert os.path.getsize(f"{scratch}/{n}") == 0
        assert sandbox.files.get_info(f"{scratch}/{n}").size == 0


def test_upload_onto_directory_rejected(envd_url, scratch):
    os.mkdir(f"{scratch}/isdir")
    r = httpx.post(
        f"{envd_url}/files",
        params={"path": f"{scratch}/isdir"},
        content=b"x",
        headers={"Content-Type": "application/octet-stream"},
        trust_env=False,
    )
    assert r.status_code >= 400 and r.status_code != 500, r.text
    assert os.path.isdir(f"{scratch}/isdir")


# --- spawn details, disk full ----------------------------------------------------


def test_start_without_stdin_field_keeps_pipe(envd_url, sandbox):
    # `stdin` absent (older SDKs, other clients) -> stdin pipe open.
    body = {"process": {"cmd": "/usr/bin/head", "args": ["-n1"]}}
    with ServerStream(envd_url, "process.Process/Start", body, timeout=15) as s:
        it = s.events()
        kind, start = process_event_kind(next(it))
        assert kind == "start"
        sandbox.commands.send_stdin(start["pid"], "piped\n")
        msgs = list(it)
    data = b"".join(
        base64.b64decode(v["stdout"]) for k, v in map(process_event_kind, msgs) if k == "data" and "stdout" in v
    )
    assert data == b"piped\n"


def test_process_oom_score_adj(sandbox):
    # Spec §7 (reference spawn): commands run with oom_score_adj 100 so the
    # OOM killer picks user work before envd.
    assert sandbox.commands.run("cat /proc/self/oom_score_adj").stdout.strip() == "100"
    assert sandbox.commands.run("cat /proc/self/oom_score_adj", user="root").stdout.strip() == "100"


@pytest.fixture
def tiny_fs(scratch):
    mnt = f"{scratch}/tiny"
    os.mkdir(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0777", "tmpfs", mnt], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)


def test_disk_full_507(sandbox, envd_url, tiny_fs):
    from e2b import NotEnoughSpaceException

    data = b"x" * (1024 * 1024)
    with pytest.raises(NotEnoughSpaceException):
        sandbox.files.write(f"{tiny_fs}/big.bin", data)
    r = httpx.post(
        f"{envd_url}/files",
        params={"path": f"{tiny_fs}/big2.bin"},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
        trust_env=False,
    )
    assert r.status_code == 507, r.text
    assert isinstance(r.json().get("message"), str)


@pytest.mark.parametrize("octet", [False, True], ids=["multipart", "octet-stream"])
def test_early_upload_error_reaches_client(sandbox, scratch, octet):
    """An upload rejected before its body is read (here: unknown user) must
    still deliver the error status to a client that is sending a large body;
    closing the connection with unread data makes the client fail with a
    broken pipe (httpx.WriteError) instead of AuthenticationException."""
    from e2b import AuthenticationException

    data = b"x" * (32 * 1024 * 1024)
    outcomes = []
    for _ in range(10):
        try:
            sandbox.files.write(f"{scratch}/big.bin", data, user="nobody_here", use_octet_stream=octet)
            outcomes.append("ok")
        except AuthenticationException:
            outcomes.append("401")
        except Exception as e:  # noqa: BLE001
            outcomes.append(type(e).__name__)
    assert outcomes == ["401"] * 10, outcomes
