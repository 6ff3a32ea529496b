"""Bad input over raw HTTP / Connect, and the SDK's mapping of the answers."""

import struct

import httpx
import pytest

from e2b import AuthenticationException, InvalidArgumentException, NotFoundException

from helpers import FLAG_END_STREAM, ServerStream, basic_auth, envelope, parse_envelopes, unary


def _json_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("message"), str) and body["message"], body
    return body


# --- /files ----------------------------------------------------------------


def test_files_missing_404(envd_url, scratch):
    r = httpx.get(f"{envd_url}/files", params={"path": f"{scratch}/missing"}, trust_env=False)
    body = _json_error(r, 404)
    assert body.get("code") == 404


def test_files_directory_400(envd_url, scratch):
    r = httpx.get(f"{envd_url}/files", params={"path": scratch}, trust_env=False)
    body = _json_error(r, 400)
    assert body.get("code") == 400


def test_files_sdk_errors(sandbox, scratch):
    from e2b import FileNotFoundException

    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{scratch}/missing")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read(scratch)


def test_files_unknown_user_401(envd_url, scratch):
    with open(f"{scratch}/x", "w") as f:
        f.write("x")
    r = httpx.get(
        f"{envd_url}/files",
        params={"path": f"{scratch}/x", "username": "nobody_here"},
        trust_env=False,
    )
    _json_error(r, 401)
    r = httpx.post(
        f"{envd_url}/files",
        params={"path": f"{scratch}/y", "username": "nobody_here"},
        files={"file": ("y", b"y")},
        trust_env=False,
    )
    _json_error(r, 401)


def test_sdk_unknown_user(sandbox, scratch):
    with pytest.raises(AuthenticationException):
        sandbox.files.read(f"{scratch}/x", user="nobody_here")
    with pytest.raises(AuthenticationException):
        sandbox.files.list(scratch, user="nobody_here")
    with pytest.raises(AuthenticationException):
        sandbox.commands.run("true", user="nobody_here", timeout=10)


def test_rpc_unknown_user_unauthenticated(envd_url, scratch):
    r = unary(envd_url, "filesystem.Filesystem/Stat", {"path": scratch}, headers=basic_auth("nobody_here"))
    body = _json_error(r, 401)
    assert body["code"] == "unauthenticated"


def test_upload_unsupported_content_type(envd_url, scratch):
    r = httpx.post(
        f"{envd_url}/files",
        params={"path": f"{scratch}/ct"},
        content=b"x",
        headers={"Content-Type": "text/plain"},
        trust_env=False,
    )
    _json_error(r, 400)


def test_octet_stream_requires_path(envd_url):
    r = httpx.post(
        f"{envd_url}/files",
        content=b"x",
        headers={"Content-Type": "application/octet-stream"},
        trust_env=False,
    )
    _json_error(r, 400)


def test_multipart_duplicate_destination(envd_url, scratch):
    r = httpx.post(
        f"{envd_url}/files",
        files=[("file", (f"{scratch}/dup.txt", b"1")), ("file", (f"{scratch}/dup.txt", b"2"))],
        trust_env=False,
    )
    _json_error(r, 400)


def test_identity_refused_406(envd_url, scratch):
    with open(f"{scratch}/enc.txt", "w") as f:
        f.write("enc")
    r = httpx.get(
        f"{envd_url}/files",
        params={"path": f"{scratch}/enc.txt"},
        headers={"Accept-Encoding": "identity;q=0"},
        trust_env=False,
    )
    assert r.status_code == 406


# --- Connect unary ------------------------------------------------------------


def test_unary_bad_json(envd_url):
    r = unary(envd_url, "filesystem.Filesystem/Stat", None, raw=b"{not json")
    body = _json_error(r, 400)
    assert body["code"] == "invalid_argument"


def test_unary_wrong_field_type(envd_url):
    r = unary(envd_url, "filesystem.Filesystem/ListDir", {"path": "/tmp", "depth": "deep"})
    body = _json_error(r, 400)
    assert body["code"] == "invalid_argument"


def test_unary_not_found_shape(envd_url, scratch):
    r = unary(envd_url, "filesystem.Filesystem/Stat", {"path": f"{scratch}/none"})
    body = _json_error(r, 404)
    assert body["code"] == "not_found"


def test_unary_accepts_snake_case_and_number_enums(envd_url, sandbox):
    h = sandbox.commands.run("sleep 30", background=True, timeout=0)
    try:
        # Proto field names and numeric enums must be accepted on input.
        r = unary(
            envd_url,
            "process.Process/SendSignal",
            {"process": {"pid": h.pid}, "signal": 9},
        )
        assert r.status_code == 200, r.text
        assert r.json() == {}
    finally:
        sandbox.commands.kill(h.pid)
    r = unary(envd_url, "filesystem.Filesystem/CreateWatcher", {"path": "/tmp", "include_entry": True})
    assert r.status_code == 200, r.text
    watcher_id = r.json()["watcherId"]
    r = unary(envd_url, "filesystem.Filesystem/RemoveWatcher", {"watcher_id": watcher_id})
    assert r.status_code == 200, r.text


def test_send_signal_unknown_pid(envd_url):
    r = unary(
        envd_url,
        "process.Process/SendSignal",
        {"process": {"pid": 4_000_000}, "signal": "SIGNAL_SIGKILL"},
    )
    body = _json_error(r, 404)
    assert body["code"] == "not_found"


def test_close_stdin_unknown_pid(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.close_stdin(4_000_000)


def test_update_unknown_pid(sandbox):
    from e2b import PtySize

    with pytest.raises(NotFoundException):
        sandbox.pty.resize(4_000_000, PtySize(rows=10, cols=10))


# --- Connect streaming ------------------------------------------------------


def _stream_error(s: ServerStream) -> dict:
    """The Connect error of a failed stream call, accepting both an end-of-stream
    error (the protocol's form) and a unary-style JSON error response."""
    if s.response.status_code != 200:
        s.response.read()
        body = s.response.json()
        return body
    msgs = s.read_all()
    assert s.end_stream is not None, f"stream ended without end-of-stream; messages {msgs}"
    assert "error" in s.end_stream, f"expected an error end-of-stream, got {s.end_stream} after {msgs}"
    return s.end_stream["error"]


def test_stream_truncated_envelope(envd_url):
    with ServerStream(envd_url, "process.Process/Start", None, raw=b"\x00\x00\x00", timeout=10) as s:
        err = _stream_error(s)
    assert err["code"] == "invalid_argument", err


def test_stream_length_mismatch(envd_url):
    payload = b'{"process":{"cmd":"/bin/true"}}'
    raw = struct.pack(">BI", 0, len(payload) + 10) + payload
    with ServerStream(envd_url, "process.Process/Start", None, raw=raw, timeout=10) as s:
        err = _stream_error(s)
    assert err["code"] == "invalid_argument", err


def test_stream_bad_json_in_envelope(envd_url):
    raw = envelope(b"{this is not json")
    with ServerStream(envd_url, "process.Process/Start", None, raw=raw, timeout=10) as s:
        err = _stream_error(s)
    assert err["code"] == "invalid_argument", err


def test_stream_connect_unknown_pid(envd_url):
    with ServerStream(envd_url, "process.Process/Connect", {"process": {"pid": 4_000_000}}, timeout=10) as s:
        err = _stream_error(s)
    assert err["code"] == "not_found", err


def test_stream_start_nonexistent_cwd(envd_url):
    body = {"process": {"cmd": "/bin/true", "cwd": "/definitely/not/here"}}
    with ServerStream(envd_url, "process.Process/Start", body, timeout=10) as s:
        err = _stream_error(s)
    assert err["code"] == "invalid_argument", err


def test_stream_start_missing_binary(envd_url):
    body = {"process": {"cmd": "/definitely/not/a/binary"}}
    with ServerStream(envd_url, "process.Process/Start", body, timeout=10) as s:
        if s.response.status_code == 200:
            msgs = s.read_all()
            kinds = [list(m.get("event", {}).keys())[0] for m in msgs if m.get("event")]
            # Either an error end-of-stream, or start + end with error text.
            if "error" not in (s.end_stream or {}):
                assert kinds and kinds[-1] == "end", msgs
                end = msgs[-1]["event"]["end"]
                assert end.get("exitCode", 0) != 0 or end.get("error"), end
        else:
            assert s.response.status_code >= 400


def test_stream_success_wire_shape(envd_url):
    body = {"process": {"cmd": "/bin/echo", "args": ["hi"]}, "stdin": False}
    with httpx.Client(trust_env=False, timeout=10) as c:
        r = c.post(
            f"{envd_url}/process.Process/Start",
            content=envelope(body),
            headers={"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"},
        )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/connect+json")
    frames = parse_envelopes(r.content)
    flags = [f for f, _ in frames]
    assert flags[-1] & FLAG_END_STREAM and all(not f & FLAG_END_STREAM for f in flags[:-1])
    assert frames[-1][1] == {} or "error" not in frames[-1][1]
    kinds = [list(m["event"].keys())[0] for _, m in frames[:-1]]
    assert kinds[0] == "start" and kinds[-1] == "end", kinds
    assert isinstance(frames[0][1]["event"]["start"]["pid"], int)
    import base64

    out = b"".join(
        base64.b64decode(m["event"]["data"]["stdout"])
        for _, m in frames[:-1]
        if "data" in m["event"] and "stdout" in m["event"]["data"]
    )
    assert out == b"hi\n"
    end = frames[-2][1]["event"]["end"]
    assert end.get("exitCode", 0) == 0 and end.get("exited") is True
    assert end.get("status") == "exit status 0"


def test_stream_input_client_stream(envd_url, sandbox):
    """StreamInput: start, data and keepalive envelopes, ended by body EOF."""
    import base64

    h = sandbox.commands.run("head -n2", background=True, stdin=True, timeout=20)
    try:
        frames = [
            {"start": {"process": {"pid": h.pid}}},
            {"data": {"input": {"stdin": base64.b64encode(b"l1\n").decode()}}},
            {"keepalive": {}},
            {"data": {"input": {"stdin": base64.b64encode(b"l2\n").decode()}}},
        ]
        raw = b"".join(envelope(f) for f in frames)
        with httpx.Client(trust_env=False, timeout=10) as c:
            r = c.post(
                f"{envd_url}/process.Process/StreamInput",
                content=raw,
                headers={"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"},
            )
        assert r.status_code == 200, r.text
        got = parse_envelopes(r.content)
        assert got[-1][0] & FLAG_END_STREAM
        assert "error" not in got[-1][1], got
        assert h.wait().stdout == "l1\nl2\n"
    finally:
        sandbox.commands.kill(h.pid)


def test_unknown_procedure(envd_url):
    r = unary(envd_url, "process.Process/NoSuchMethod", {})
    assert r.status_code in (404, 501), r.text
