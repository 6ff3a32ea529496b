"""`wrenn serve` restarts: a kill -9 loses no paused capsule and leaks no VM; a graceful
stop pauses running capsules so they resume where they were."""

from __future__ import annotations

import signal
import subprocess
import time


def _vmm_running(capsule_id: str) -> bool:
    r = subprocess.run(["pgrep", "-f", f"wrenn-{capsule_id}"], capture_output=True)
    return r.returncode == 0


def _exec(c, cid: str, script: str) -> dict:
    r = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/sh", "args": ["-c", script]})
    assert r.status_code == 200, r.text
    return r.json()


def _create(c) -> str:
    r = c.post("/v1/capsules", json={"template": "minimal"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_kill_9_keeps_paused_capsules_and_leaks_no_vm(server):
    with server.admin() as c:
        running = _create(c)
        paused = _create(c)
        _exec(c, paused, "echo kept > /tmp/state")
        r = c.post(f"/v1/capsules/{paused}/pause")
        assert r.status_code == 200 and r.json()["status"] == "paused", r.text
        assert _vmm_running(running)

    server.stop(signal.SIGKILL)
    # The VMMs die with their owner.
    deadline = time.monotonic() + 15
    while _vmm_running(running) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _vmm_running(running), "a VM outlived its killed server"

    server.start()
    with server.admin() as c:
        r = c.get(f"/v1/capsules/{running}")
        assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
        assert running not in [x["id"] for x in c.get("/v1/capsules").json()]
        r = c.get(f"/v1/capsules/{paused}")
        assert r.json()["status"] == "paused", r.text
        r = c.post(f"/v1/capsules/{paused}/resume")
        assert r.status_code == 200 and r.json()["status"] == "running", r.text
        assert _exec(c, paused, "cat /tmp/state")["stdout"] == "kept\n"
        # The lost capsule is in the audit log as reconciled by the system.
        items = c.get("/v1/audit-logs", params={"resource_type": "capsule", "limit": 200}).json()["items"]
        assert any(
            i["resource_id"] == running and i["action"] == "capsule.reconcile" and i["actor_type"] == "system"
            for i in items
        )
        r = c.delete(f"/v1/capsules/{paused}")
        assert r.status_code == 204


def test_graceful_stop_pauses_running_capsules(server):
    with server.admin() as c:
        cid = _create(c)
        _exec(c, cid, "echo before-restart > /tmp/mark; (sleep 1000 &)")
    server.restart(signal.SIGTERM)
    assert not _vmm_running(cid)
    with server.admin() as c:
        r = c.get(f"/v1/capsules/{cid}")
        assert r.json()["status"] == "paused", r.text
        r = c.post(f"/v1/capsules/{cid}/resume")
        assert r.status_code == 200, r.text
        out = _exec(c, cid, "cat /tmp/mark; pgrep -f 'sleep 1000' >/dev/null && echo sleeper-alive")
        assert out["stdout"] == "before-restart\nsleeper-alive\n", out
        assert c.delete(f"/v1/capsules/{cid}").status_code == 204
    assert not _vmm_running(cid)


def test_a_snapshot_interrupted_before_its_row_is_removed_at_restart(server):
    """A server killed between writing a snapshot template's files and its row leaves
    a host template no row names: the next start removes it once it is older than the
    grace a control plane may still be writing its row in (10 min), and keeps younger
    ones and every template a row names. A write killed before it finished leaves its
    staging directory, which the next start removes."""
    import os
    import shutil
    import uuid

    templates = os.path.join(server.data_dir, "templates")
    name = "kept-" + uuid.uuid4().hex[:6]
    with server.admin() as c:
        cid = _create(c)
        r = c.post("/v1/snapshots", json={"sandbox_id": cid, "name": name})
        assert r.status_code == 201, r.text
        assert c.delete(f"/v1/capsules/{cid}").status_code == 204
    before = {d for d in os.listdir(templates) if d.startswith("snap-")}
    # The state a kill -9 leaves: the files of a snapshot, no row. One an hour old, one
    # just written.
    source = os.path.join(templates, sorted(before)[0])
    old, new = "snap-orphan" + uuid.uuid4().hex[:8], "snap-fresh" + uuid.uuid4().hex[:8]
    for orphan in (old, new):
        subprocess.run(["cp", "-a", "--sparse=always", source, os.path.join(templates, orphan)], check=True)
    hour_ago = time.time() - 3600
    os.utime(os.path.join(templates, old, "rootfs.img"), (hour_ago, hour_ago))
    # And a template write that never finished: its staging directory, named by the
    # writer's pid (a process that is gone).
    gone = subprocess.Popen(["true"])
    gone.wait()
    stage = os.path.join(templates, f".{old}.new-{gone.pid}-0badf00d")
    # A live writer's is left alone (this test's own process stands in for it).
    live = os.path.join(templates, f".{old}.new-{os.getpid()}-0badf00d")
    os.makedirs(live)
    os.makedirs(os.path.join(stage, "snapshot"))
    with open(os.path.join(stage, "rootfs.img"), "wb") as f:
        f.truncate(1 << 20)

    server.stop(signal.SIGKILL)
    server.start()
    left = {d for d in os.listdir(templates) if d.startswith("snap-")}
    assert old not in left, "an orphan snapshot template outlived the restart"
    assert not os.path.exists(stage), "an unfinished template write outlived the restart"
    assert os.path.isdir(live), "a live process's template write was removed"
    os.rmdir(live)
    assert new in left and before <= left
    with open(server.log_path) as f:
        said = [line for line in f if old in line]
    assert any("no row names" in line for line in said), said
    shutil.rmtree(os.path.join(templates, new))
    with server.admin() as c:
        # The snapshot a row names still works.
        r = c.post("/v1/capsules", json={"template": name})
        assert r.status_code == 201, r.text
        assert c.delete(f"/v1/capsules/{r.json()['id']}").status_code == 204
        assert c.delete(f"/v1/snapshots/{name}").status_code == 204
