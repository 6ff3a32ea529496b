"""Where E2B's API defines a behaviour, `wrenn serve` has it: checked through the
unmodified `e2b` SDK (sync and asyncio), the way E2B's own users write their code.

- A sandbox's timeout is an end time: traffic (even `is_running()` polling every
  0.2 s) does not move it; only `set_timeout` and `connect` do.
- Kill and pause end every envd stream in flight at once, with the SDK's
  "sandbox not running" error.
- List filters `startedAfter` / `startedBefore` are inclusive.
- Every route under the E2B API answers `{code, message}`, unknown ones included, so
  the SDK raises its own typed errors.
- Keys work in E2B's `e2b_` + hex form too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
import uuid

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AsyncTemplate,
    Sandbox,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    Template,
    TemplateException,
)

TICKER = "while true; do echo tick; sleep 0.2; done"


def gone(sandbox_id: str) -> bool:
    try:
        Sandbox.get_info(sandbox_id)
        return False
    except SandboxNotFoundException:
        return True


# --- timeouts are end times -----------------------------------------------------------------


def test_polling_does_not_keep_a_sandbox_alive(e2b_env):
    s = Sandbox.create(timeout=6)
    end_at = s.get_info().end_at
    polls = 0
    deadline = time.monotonic() + 30
    # What a client that watches its sandbox does: is_running() every 0.2 s (envd
    # /health through the proxy) and a command now and then.
    while time.monotonic() < deadline:
        try:
            if not s.is_running():
                break
            if polls % 10 == 0:
                s.commands.run("true")
                # The reported end time is the real one, and traffic does not move it.
                assert Sandbox.get_info(s.sandbox_id).end_at == end_at
        except SandboxNotRunningException:
            break
        polls += 1
        time.sleep(0.2)
    ended = dt.datetime.now(dt.timezone.utc)
    assert polls > 10, "the sandbox should have run for a while"
    # Expired at its end time (give the reaper, which looks every second, its slack).
    assert ended <= end_at + dt.timedelta(seconds=5), (ended, end_at)
    deadline = time.monotonic() + 5
    while not gone(s.sandbox_id):
        assert time.monotonic() < deadline, "the expired sandbox is still listed"
        time.sleep(0.1)


def test_set_timeout_moves_the_end_time_and_traffic_does_not(e2b_env):
    s = Sandbox.create(timeout=60)
    try:
        first = s.get_info().end_at
        for _ in range(5):
            s.commands.run("true")
            s.files.write("/tmp/x", "y")
        assert s.get_info().end_at == first
        s.set_timeout(120)
        moved = s.get_info().end_at
        assert moved > first
        s.commands.run("true")
        assert s.get_info().end_at == moved
        listed = [i for i in Sandbox.list(query=SandboxQuery(metadata={})).next_items() if i.sandbox_id == s.sandbox_id]
        assert listed and listed[0].end_at == moved
    finally:
        s.kill()


async def test_async_polling_does_not_keep_a_sandbox_alive(e2b_env):
    s = await AsyncSandbox.create(timeout=5)
    end_at = (await s.get_info()).end_at
    deadline = time.monotonic() + 30
    polls = 0
    while time.monotonic() < deadline:
        try:
            if not await s.is_running():
                break
        except SandboxNotRunningException:
            break
        polls += 1
        await asyncio.sleep(0.2)
    assert polls > 5
    assert dt.datetime.now(dt.timezone.utc) <= end_at + dt.timedelta(seconds=5)
    # Its traffic ends as the kill starts; the record says so once the VM is gone.
    for _ in range(50):
        try:
            await AsyncSandbox.get_info(s.sandbox_id)
        except SandboxNotFoundException:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the expired sandbox is still listed 5 s after its end")


# --- kill and pause end what is in flight ---------------------------------------------------------


def _stream_until_ended(s: Sandbox, end) -> tuple[Exception | None, float]:
    """Runs a command that prints forever, calls `end()` once output flows, and returns
    the error the command's waiter got and how long after `end()` began it came."""
    out: list[str] = []
    result: dict = {}
    h = s.commands.run(TICKER, background=True)

    def waiter():
        try:
            h.wait(on_stdout=out.append)
            result["err"] = None
        except Exception as e:  # noqa: BLE001 - the error is what the test checks
            result["err"] = e
        result["at"] = time.monotonic()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while len(out) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(out) >= 2, "the command's output should be streaming"
    started = time.monotonic()
    end()
    t.join(timeout=30)
    assert not t.is_alive(), "the command stream is still open after the sandbox ended"
    return result["err"], result["at"] - started


def test_kill_ends_a_streaming_command(e2b_env):
    s = Sandbox.create(timeout=120)
    err, after = _stream_until_ended(s, lambda: s.kill())
    assert isinstance(err, SandboxNotRunningException), repr(err)
    assert after < 2.0, f"the stream ended {after:.2f} s after the kill"
    assert gone(s.sandbox_id)  # kill() returned: the record is final


def test_pause_ends_a_streaming_command(e2b_env):
    s = Sandbox.create(timeout=120)
    try:
        err, after = _stream_until_ended(s, lambda: s.pause())
        assert isinstance(err, SandboxNotRunningException), repr(err)
        # The stream ends as the pause starts, not when its snapshot is written.
        assert after < 2.0, after
        back = Sandbox.connect(s.sandbox_id, timeout=60)
        assert back.commands.run("echo back").stdout == "back\n"
    finally:
        s.kill()


async def test_async_kill_ends_a_directory_watch(e2b_env):
    s = await AsyncSandbox.create(timeout=120)
    events: list = []
    ended: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_exit(err):
        if not ended.done():
            ended.set_result((err, time.monotonic()))

    await s.files.watch_dir("/tmp", on_event=events.append, on_exit=on_exit, timeout=0)
    await s.files.write("/tmp/seen.txt", "x")
    deadline = time.monotonic() + 30
    while not events and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert events, "the watch stream should be delivering events"
    started = time.monotonic()
    assert await s.kill() is True
    err, at = await asyncio.wait_for(ended, timeout=10)
    assert isinstance(err, SandboxNotRunningException), repr(err)
    assert at - started < 2.0


async def test_async_kill_ends_a_streaming_command(e2b_env):
    s = await AsyncSandbox.create(timeout=120)
    out: list[str] = []
    h = await s.commands.run(TICKER, background=True, on_stdout=out.append)
    deadline = time.monotonic() + 30
    while len(out) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(out) >= 2
    started = time.monotonic()
    assert await s.kill() is True
    with pytest.raises(SandboxNotRunningException):
        await asyncio.wait_for(h.wait(), timeout=10)
    assert time.monotonic() - started < 2.0


# --- list filters ---------------------------------------------------------------------------------


def test_started_after_and_before_are_inclusive(e2b_env, server):
    tag = uuid.uuid4().hex[:10]
    s = Sandbox.create(timeout=120, metadata={"incl": tag})
    try:
        started = s.get_info().started_at
        q = SandboxQuery(metadata={"incl": tag}, started_after=started)
        assert [i.sandbox_id for i in Sandbox.list(query=q).next_items()] == [s.sandbox_id]
        later = SandboxQuery(metadata={"incl": tag}, started_after=started + dt.timedelta(microseconds=1))
        assert Sandbox.list(query=later).next_items() == []
        # startedBefore (not sent by the SDK; the API has it).
        with server.admin() as c:
            def listed(**params):
                r = c.get("/v2/sandboxes", params={"metadata": f"incl={tag}", **params})
                assert r.status_code == 200, r.text
                return [i["sandboxID"] for i in r.json()]

            assert listed(startedBefore=started.isoformat()) == [s.sandbox_id]
            assert listed(startedBefore=(started - dt.timedelta(microseconds=1)).isoformat()) == []
            assert listed(startedAfter=started.isoformat(), startedBefore=started.isoformat()) == [s.sandbox_id]
            r = c.get("/v2/sandboxes", params={"startedBefore": "yesterday"})
            assert r.status_code == 400 and set(r.json()) == {"code", "message"}
            assert "startedBefore" in r.json()["message"]
    finally:
        s.kill()


# --- error bodies ---------------------------------------------------------------------------------


def test_unknown_e2b_routes_raise_the_sdks_typed_errors(e2b_env, server):
    # Template routes Wrenn does not serve: the SDK parses E2B's error body.
    with pytest.raises(TemplateException) as ei:
        Template.get_tags("no-such-template")
    assert "404" in str(ei.value) or "not found" in str(ei.value)
    with server.admin() as c:
        for method, path in [
            ("GET", "/sandboxes/cl-x/logs"),
            ("GET", "/volumes"),
            ("GET", "/v2/no/such/route"),
            ("POST", "/v3/templates/x/tags"),
            ("GET", "/snapshots/x/y"),
            ("GET", "/templates"),
        ]:
            r = c.request(method, path)
            assert r.status_code == 404, (method, path, r.status_code)
            body = r.json()
            assert set(body) == {"code", "message"} and body["code"] == 404, (method, path, body)
        # A known route with a method it does not have.
        for method, path in [("PUT", "/sandboxes"), ("PATCH", "/v2/sandboxes"), ("GET", "/sandboxes/cl-x/pause")]:
            r = c.request(method, path)
            assert r.status_code == 405, (method, path, r.status_code)
            assert r.json()["code"] == 405 and method in r.json()["message"]
        # Wrenn's own routes keep Wrenn's body.
        r = c.get("/v1/no-such-route")
        assert r.status_code == 404 and set(r.json()) == {"error"}
        r = c.put("/v1/capsules")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# --- keys in E2B's form ---------------------------------------------------------------------------


def test_keys_work_in_e2b_form(e2b_env, server):
    e2b_key = "e2b_" + server.admin_key.removeprefix("wrn_")
    tag = uuid.uuid4().hex[:8]
    s = Sandbox.create(timeout=60, metadata={"k": tag}, api_key=e2b_key)
    try:
        assert s.commands.run("echo via e2b key").stdout == "via e2b key\n"
        assert [i.sandbox_id for i in Sandbox.list(query=SandboxQuery(metadata={"k": tag})).next_items()] == [s.sandbox_id]
    finally:
        assert Sandbox.kill(s.sandbox_id, api_key=e2b_key) is True
    # A new key is issued in both spellings; both are one key (revoking one revokes both).
    # Keys are made and deleted by the team's owner (an API key may do neither).
    with server.admin_user() as c:
        r = c.post("/v1/api-keys", json={"name": "e2b form"})
        assert r.status_code == 201, r.text
        k = r.json()
        assert k["e2b_key"] == "e2b_" + k["key"].removeprefix("wrn_")
        with server.client(k["e2b_key"]) as e:
            assert e.get("/v2/sandboxes").status_code == 200
        assert c.delete(f"/v1/api-keys/{k['id']}").status_code == 204
        with server.client(k["e2b_key"]) as e:
            r = e.get("/v2/sandboxes")
            assert r.status_code == 401 and set(r.json()) == {"code", "message"}


# --- the default template -------------------------------------------------------------------------


def test_default_template_has_what_e2b_code_assumes(e2b_env):
    s = Sandbox.create()
    try:
        assert s.get_info().template_id == "base"
        for cmd in (
            "git --version",
            "curl --version",
            "wget --version",
            "python3 -m pip --version",
            "python3 -m venv --help",
            "test -s /etc/ssl/certs/ca-certificates.crt",
            "unzip -v",
            "sh -c 'ls / | grep -q usr && ps aux | grep -q envd'",
        ):
            r = s.commands.run(cmd)
            assert r.exit_code == 0, (cmd, r.stderr)
        # venv can bootstrap pip (Debian ships ensurepip's wheels in python3-venv).
        r = s.commands.run("python3 -c 'import ensurepip; print(ensurepip.version())'")
        assert r.stdout.strip()[:1].isdigit(), r.stdout
    finally:
        s.kill()


# --- filesystem-only pause -------------------------------------------------------------------------

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


def test_filesystem_pause_keeps_the_disk_and_boots_afresh(e2b_env, server):
    s = Sandbox.create(timeout=300)
    try:
        boot = s.commands.run(BOOT_ID).stdout.strip()
        s.files.write("/home/user/kept.txt", "on the disk")
        s.commands.run("sleep 1000", background=True)
        assert s.pause(mode="filesystem") is True
        assert Sandbox.get_info(s.sandbox_id).state.value == "paused"
        back = Sandbox.connect(s.sandbox_id, timeout=120)
        # A fresh boot: new boot id, no process of before; the files are there.
        assert back.commands.run(BOOT_ID).stdout.strip() != boot
        assert back.files.read("/home/user/kept.txt") == "on the disk"
        assert "sleep 1000" not in back.commands.run("ps -eo args").stdout
        # A full pause after the reboot keeps memory again (a new memory chain).
        back.commands.run("sleep 2000", background=True)
        boot2 = back.commands.run(BOOT_ID).stdout.strip()
        assert back.pause() is True
        again = Sandbox.connect(s.sandbox_id, timeout=120)
        assert again.commands.run(BOOT_ID).stdout.strip() == boot2
        assert "sleep 2000" in again.commands.run("ps -eo args").stdout
        assert again.files.read("/home/user/kept.txt") == "on the disk"
        with server.admin() as c:
            items = c.get("/v1/audit-logs", params={"limit": 200}).json()["items"]
            assert any(
                r.get("action") == "capsule.pause" and r.get("resource_id") == s.sandbox_id
                and (r.get("metadata") or {}).get("memory") is False
                for r in items
            ), "the filesystem-only pause is audited as such"
    finally:
        s.kill()


def test_connect_with_reboot_drops_the_memory(e2b_env):
    s = Sandbox.create(timeout=300)
    try:
        boot = s.commands.run(BOOT_ID).stdout.strip()
        s.files.write("/home/user/f.txt", "x")
        assert s.pause() is True  # a full pause
        back = Sandbox.connect(s.sandbox_id, timeout=120, on_resume="reboot")
        assert back.commands.run(BOOT_ID).stdout.strip() != boot
        assert back.files.read("/home/user/f.txt") == "x"
    finally:
        s.kill()


async def test_async_timeout_pause_in_filesystem_mode(e2b_env):
    s = await AsyncSandbox.create(
        timeout=4, lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}}
    )
    try:
        boot = (await s.commands.run(BOOT_ID)).stdout.strip()
        await s.files.write("/home/user/t.txt", "timed out")
        for _ in range(150):
            if (await AsyncSandbox.get_info(s.sandbox_id)).state.value == "paused":
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the sandbox was not paused at its end time")
        back = await AsyncSandbox.connect(s.sandbox_id, timeout=120)
        assert (await back.commands.run(BOOT_ID)).stdout.strip() != boot
        assert await back.files.read("/home/user/t.txt") == "timed out"
    finally:
        await s.kill()


def test_filesystem_snapshot_templates_are_refused_not_ignored(e2b_env, server):
    s = Sandbox.create(timeout=120)
    try:
        with server.admin() as c:
            r = c.post(f"/sandboxes/{s.sandbox_id}/snapshots", json={"memory": False})
            assert r.status_code == 400, r.text
            assert "memory" in r.json()["message"]
        assert s.commands.run("echo still").stdout == "still\n"
    finally:
        s.kill()


# --- the same through the asyncio SDK -------------------------------------------------------------


async def test_async_filters_errors_keys_template_and_filesystem_pause(e2b_env, server):
    tag = uuid.uuid4().hex[:10]
    e2b_key = "e2b_" + server.admin_key.removeprefix("wrn_")
    # Default template, created with the E2B spelling of the key.
    s = await AsyncSandbox.create(timeout=300, metadata={"async-incl": tag}, api_key=e2b_key)
    try:
        info = await s.get_info()
        assert info.template_id == "base"
        for cmd in ("git --version", "curl --version", "python3 -m pip --version"):
            assert (await s.commands.run(cmd)).exit_code == 0, cmd
        # startedAfter is inclusive.
        q = SandboxQuery(metadata={"async-incl": tag}, started_after=info.started_at)
        assert [i.sandbox_id for i in await AsyncSandbox.list(query=q).next_items()] == [s.sandbox_id]
        # An unknown E2B route: the SDK's own typed error.
        with pytest.raises(TemplateException):
            await AsyncTemplate.get_tags("no-such-template")
        # Filesystem-only pause, then connect: a fresh boot with the old files.
        boot = (await s.commands.run(BOOT_ID)).stdout.strip()
        await s.files.write("/home/user/async-kept.txt", "kept")
        assert await s.pause(mode="filesystem") is True
        back = await AsyncSandbox.connect(s.sandbox_id, timeout=120)
        assert (await back.commands.run(BOOT_ID)).stdout.strip() != boot
        assert await back.files.read("/home/user/async-kept.txt") == "kept"
    finally:
        await s.kill()
