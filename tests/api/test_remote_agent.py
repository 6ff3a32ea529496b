"""The control plane and the host agent as two processes: `wrenn agent` serves this
machine's capsules over gRPC and `wrenn serve --agent` drives it. The unmodified `e2b`
and `wrenn` SDKs work through the control plane, the capsules live in the agent's data
directory (not the control plane's), and an agent that is gone is a clear 503, not a
hang. Runs on loopback only (the agent's endpoint refuses other addresses).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
from e2b import Sandbox

from conftest import BINARY, Agent, point_sdks_at
from test_builds import log_text, wait_build
from test_oci_images import PASSWORD, USER, registry  # noqa: F401 - the registry fixture


@pytest.fixture(scope="module")
def deployment(start_server):
    agent = Agent("agent")
    agent.start()
    srv = start_server("cp", args=("--agent", agent.url, "--min-idle-timeout", "1",
                                   "--rate-limit", "0", "--registry-allow-private-addresses",
                                   "--build-pre-command", "true", "--build-post-command", "true"))
    yield agent, srv
    with srv.admin() as c:
        for cap in c.get("/v1/capsules").json():
            c.delete(f"/v1/capsules/{cap['id']}")
    agent.stop()
    shutil.rmtree(agent.data_dir, ignore_errors=True)


def test_the_agent_refuses_addresses_beyond_loopback():
    r = subprocess.run([BINARY, "--data-dir", "/tmp/wrenn-agent-refused", "agent", "--listen",
                        "0.0.0.0:7070"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "loopback" in r.stderr, r.stderr


def test_host_settings_are_refused_with_a_remote_agent():
    r = subprocess.run([BINARY, "serve", "--agent", "http://127.0.0.1:1", "--pool", "minimal=1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--agent" in r.stderr and "--pool" in r.stderr, r.stderr


def test_sdks_drive_capsules_of_a_remote_agent(deployment, monkeypatch):
    agent, srv = deployment
    point_sdks_at(srv, monkeypatch)
    s = Sandbox.create(template="minimal", timeout=300)
    try:
        # The capsule is the agent's: its directory is in the agent's data directory.
        assert os.path.isdir(os.path.join(agent.data_dir, "capsules", s.sandbox_id))
        assert not os.path.exists(os.path.join(srv.data_dir, "capsules", s.sandbox_id))
        assert s.commands.run("echo hi from $(hostname)").stdout.startswith("hi from")
        s.files.write("/home/user/kept.txt", "across a pause")
        assert s.pause() is True
        same = s.connect(timeout=120)
        assert same.files.read("/home/user/kept.txt") == "across a pause"
        # Metrics and the host's versions come over the seam too.
        with srv.admin() as c:
            r = c.get(f"/v1/capsules/{s.sandbox_id}")
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "running"
            assert c.get("/health").json()["accel"] in ("kvm", "tcg")
    finally:
        s.kill()
    assert not os.path.exists(os.path.join(agent.data_dir, "capsules", s.sandbox_id))

    from wrenn import Capsule  # the reference SDK, through the same control plane

    with Capsule.create(wait=True) as cap:
        assert cap.get_info().metadata.get("envd_version")
        assert cap.commands.run("echo wrenn").stdout == "wrenn\n"


def test_a_stopped_agent_is_a_clear_503(deployment):
    agent, srv = deployment
    with srv.admin() as c:
        r = c.post("/v1/capsules", json={"template": "minimal"})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        agent.stop()
        try:
            r = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "host_unavailable", r.text
            r = c.post("/v1/capsules", json={"template": "minimal"})
            assert r.status_code == 503, r.text
        finally:
            agent.start()
        # The agent paused its capsule when it stopped; the control plane sees the new
        # agent instance and takes the host's word for it.
        wait_for_status(c, cid, "paused")
        r = c.post(f"/v1/capsules/{cid}/resume")
        assert r.status_code == 200, r.text
        r = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"})
        assert r.status_code == 200, r.text


def test_capsules_outlive_an_agent_killed_with_kill_9(deployment):
    agent, srv = deployment
    with srv.admin() as c:
        r = c.post("/v1/capsules", json={"template": "minimal"})
        assert r.status_code == 201, r.text
        running = r.json()["id"]
        # State that only a VM that kept running has: a file in tmpfs and a process.
        r = c.post(f"/v1/capsules/{running}/exec",
                   json={"cmd": "sh", "args": ["-c", "echo alive > /dev/shm/mark; sleep 10000 >/dev/null 2>&1 & echo $! > /dev/shm/pid"]})
        assert r.status_code == 200, r.text
        state = json.load(open(os.path.join(agent.data_dir, "capsules", running, "state.json")))
        vmm_pid, slot = state["vmm_pid"], state["slot"]["index"]
        r = c.post("/v1/capsules", json={"template": "minimal"})
        assert r.status_code == 201, r.text
        paused = r.json()["id"]
        r = c.post(f"/v1/capsules/{paused}/files/write",
                   files={"path": (None, "/tmp/kept"), "file": ("f", b"yes")})
        assert r.status_code == 204, r.text
        r = c.post(f"/v1/capsules/{paused}/pause")
        assert r.status_code == 200, r.text
        agent.kill9()
        # The VMM outlives its agent ...
        assert os.path.exists(f"/proc/{vmm_pid}"), "the VMM died with its agent"
        agent.start()
        # ... and the restarted agent takes it over: the same VM, still running.
        assert "took over running capsule" in agent.log_text(), agent.tail(60)
        wait_for_status(c, running, "running")
        # Its network slot is the new agent's (machine-wide), so no other process's
        # sweep takes it for a dead process's leftover.
        with open(f"/run/wrenn/net/slot-{slot}") as f:
            assert int(f.read().split()[0]) == agent.proc.pid
        r = c.post(f"/v1/capsules/{running}/exec",
                   json={"cmd": "sh", "args": ["-c", "cat /dev/shm/mark; kill -0 $(cat /dev/shm/pid) && echo sleeping"]})
        assert r.status_code == 200, r.text
        assert r.json()["stdout"] == "alive\nsleeping\n", r.text
        # Pause and resume work on the VMM taken over.
        assert c.post(f"/v1/capsules/{running}/pause").status_code == 200
        assert c.post(f"/v1/capsules/{running}/resume").status_code == 200
        r = c.post(f"/v1/capsules/{running}/exec", json={"cmd": "cat", "args": ["/dev/shm/mark"]})
        assert (r.status_code, r.json().get("stdout")) == (200, "alive\n"), r.text
        assert c.delete(f"/v1/capsules/{running}").status_code == 204
        # Gone (its parent is init now, which reaps it a moment later).
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{vmm_pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{vmm_pid}")
        assert c.get(f"/v1/capsules/{paused}").json()["status"] == "paused"
        r = c.post(f"/v1/capsules/{paused}/resume")
        assert r.status_code == 200, r.text
        r = c.post(f"/v1/capsules/{paused}/files/read", json={"path": "/tmp/kept"})
        assert (r.status_code, r.text) == (200, "yes"), r.text
        c.delete(f"/v1/capsules/{paused}")
    assert not os.path.exists(os.path.join(agent.data_dir, "capsules", running))


def wait_for_status(c, cid: str, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = c.get(f"/v1/capsules/{cid}").json().get("status")
        if last == status:
            return
        time.sleep(0.2)
    raise AssertionError(f"{cid} is {last}, not {status}, after {timeout}s")


def test_an_image_build_runs_on_the_agent(deployment, registry):  # noqa: F811
    """The control plane reaches no registry: the agent inspects and imports the image
    (over gRPC) and saves the disk-only result in its own data directory."""
    agent, srv = deployment
    image = f"{registry.host}/test/min:1"
    with srv.admin() as c:
        r = c.post("/v1/builds", json={
            "name": "remote-image", "base_image": image, "result": "disk", "skip_pre_post": True,
            "registry": {"username": USER, "password": PASSWORD},
            "recipe": ["RUN echo built on the agent > /opt/app/remote.txt"]})
        assert r.status_code == 202, r.text
        b = wait_build(c, r.json()["id"])
        assert b["status"] == "success", (b.get("error"), log_text(b)[-2000:])
        assert f"pulled {image}" in log_text(b)
    listing = lambda d: os.listdir(os.path.join(d, "templates"))  # noqa: E731
    assert [t for t in listing(agent.data_dir) if t.startswith("img-")]
    assert not [t for t in listing(srv.data_dir) if t.startswith(("img-", "snap-"))]
    with srv.admin() as c:
        r = c.post("/v1/capsules", json={"template": "remote-image"})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        r = c.post(f"/v1/capsules/{cid}/exec",
                   json={"cmd": "/bin/sh", "args": ["-c", "cat /opt/app/remote.txt /opt/app/hello.txt"]})
        assert r.json()["stdout"] == "built on the agent\nhello from layer 2\n", r.text
        assert c.delete(f"/v1/capsules/{cid}").status_code == 204
