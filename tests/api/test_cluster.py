"""One control plane, three host agents, each in its own network namespace (a
machine of its own: its own address and data directory): the agents register with
one-time tokens and serve mutual TLS; `wrenn serve --no-local-host` on PostgreSQL finds
them in the database, places capsules on the least loaded reachable host, routes every
operation on a capsule to its host (guests reached through their agent), and its host
monitor marks a silent agent's host `unreachable` (its capsules `missing`, no new
capsules there) until it answers again. The unmodified `e2b` and `wrenn` SDKs run
through it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from e2b import Sandbox

from conftest import Agent, HostNetns, _postgres_url, point_sdks_at, wait_host_status

NAMES = ("a", "b", "c")
CHECK_INTERVAL_S = 0.5
HOST_TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def cluster(start_server):
    nets = {n: HostNetns(i + 1) for i, n in enumerate(NAMES)}
    for ns in nets.values():
        ns.create()
    db_url, db_name = _postgres_url()
    # Listening on every address: the agents reach it from their namespaces.
    srv = start_server("cluster-cp", listen_host="0.0.0.0", args=(
        "--database-url", db_url, "--rate-limit", "0", "--no-local-host",
        "--host-check-interval", str(CHECK_INTERVAL_S), "--host-timeout", str(HOST_TIMEOUT_S),
        # Two cores per host here: room for the suite's capsules on each.
        "--cpu-overcommit", "8"))
    port = srv.url.rsplit(":", 1)[1]
    agents, ids = {}, {}
    try:
        with srv.admin_user() as c:
            for n, ns in nets.items():
                r = c.post("/v1/hosts", json={"provider": "netns", "availability_zone": n})
                assert r.status_code == 201, r.text
                ids[n] = r.json()["host"]["id"]
                agents[n] = Agent(f"cluster-{n}", netns=ns,
                                  register=(f"http://{ns.gateway}:{port}", r.json()["registration_token"]))
        for a in agents.values():
            a.start()
        for n in NAMES:
            wait_host_status(srv, ids[n], "online", timeout=60)
        yield {ids[n]: agents[n] for n in NAMES}, srv
        # Nothing leaked: once every capsule is destroyed, no capsule directory and no
        # VMM of any agent is left.
        with srv.admin() as c:
            for cap in c.get("/v1/capsules").json():
                assert c.delete(f"/v1/capsules/{cap['id']}").status_code == 204
        for a in agents.values():
            left = os.listdir(os.path.join(a.data_dir, "capsules"))
            assert left == [], (a.data_dir, left)
            assert vmms_of(a) == [], a.data_dir
    finally:
        with srv.admin() as c:
            for cap in c.get("/v1/capsules").json():
                c.delete(f"/v1/capsules/{cap['id']}")
        srv.stop()
        for a in agents.values():
            a.stop()
            shutil.rmtree(a.data_dir, ignore_errors=True)
        for ns in nets.values():
            ns.delete()
            assert not ns.exists(), ns.name
        base = os.environ["WRENN_TEST_POSTGRES_URL"]
        subprocess.run(["psql", base, "-qc", f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"], check=False)


def vmms_of(agent: Agent) -> list[int]:
    """Pids of QEMU processes working in `agent`'s data directory."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and agent.data_dir in cmd:
            pids.append(int(pid))
    return pids


def host_of(agents: dict, cid: str) -> str:
    """The host whose data directory holds capsule `cid` (exactly one does)."""
    holders = [h for h, a in agents.items() if os.path.isdir(os.path.join(a.data_dir, "capsules", cid))]
    assert len(holders) == 1, f"{cid} is in {holders}"
    return holders[0]


def capsules_on(srv, host: str) -> set[str]:
    with srv.admin_user() as c:
        r = c.get(f"/v1/hosts/{host}/delete-preview")
        assert r.status_code == 200, r.text
        return set(r.json()["sandbox_ids"])


def test_hosts_are_listed_for_platform_admins_only(cluster):
    agents, srv = cluster
    with srv.admin_user() as c:
        r = c.get("/v1/hosts")
        assert r.status_code == 200, r.text
        listed = {h["id"]: h for h in r.json()}
    assert set(agents) == set(listed), listed
    for h, a in agents.items():
        assert listed[h]["status"] == "online"
        assert listed[h]["address"] == f"{a.ip}:{a.port}", listed[h]
        assert listed[h]["cpu_cores"] >= 1 and listed[h]["memory_mb"] > 0, listed[h]
        assert listed[h]["type"] == "regular" and "cert_expires_at" in listed[h]
    # An API key (not a platform admin's user token) is refused; unknown hosts are 404.
    with srv.admin() as c:
        r = c.get("/v1/hosts")
        assert r.status_code == 401 and "user token" in r.json()["error"]["message"], r.text
    with srv.admin_user() as c:
        r = c.get("/v1/hosts/host-nope")
        assert r.status_code == 404, r.text


def test_sdks_spread_capsules_over_every_host(cluster, monkeypatch):
    agents, srv = cluster
    point_sdks_at(srv, monkeypatch)
    from wrenn import Capsule  # the reference SDK

    sandboxes = [Sandbox.create(template="minimal", timeout=300) for _ in range(3)]
    capsules = [Capsule.create(template="minimal", wait=True) for _ in range(3)]
    try:
        placed = {}
        for s in sandboxes:
            placed[s.sandbox_id] = host_of(agents, s.sandbox_id)
            assert s.commands.run("echo e2b").stdout == "e2b\n"
        for cap in capsules:
            placed[cap.capsule_id] = host_of(agents, cap.capsule_id)
            assert cap.commands.run("echo wrenn").stdout == "wrenn\n"
        # Every host took some: six equal capsules over three equal hosts.
        assert set(placed.values()) == set(agents), placed
        for h in agents:
            assert {c for c, p in placed.items() if p == h} <= capsules_on(srv, h)
        # Files, pause and resume go to the capsule's own host.
        s = sandboxes[0]
        s.files.write("/home/user/kept.txt", "on " + placed[s.sandbox_id])
        assert s.pause() is True
        back = s.connect(timeout=120)
        assert back.files.read("/home/user/kept.txt") == "on " + placed[s.sandbox_id]
        assert host_of(agents, s.sandbox_id) == placed[s.sandbox_id]
    finally:
        for s in sandboxes:
            s.kill()
        for cap in capsules:
            cap.destroy()
    for cid in placed:
        for a in agents.values():
            assert not os.path.exists(os.path.join(a.data_dir, "capsules", cid)), cid


def one_on_each_host(c, agents: dict) -> tuple[list[str], dict[str, str]]:
    """Three new capsules, which land one on each host; their ids and hosts."""
    # Placement weighs each host's last report: let the reports catch up with the
    # previous test's destroys (one round of checks; three, for slow answers).
    time.sleep(3 * CHECK_INTERVAL_S)
    made = []
    for _ in range(3):
        r = c.post("/v1/capsules", json={"template": "minimal"})
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
    by_host = {cid: host_of(agents, cid) for cid in made}
    assert set(by_host.values()) == set(agents), by_host
    return made, by_host


def capsule_status(c, cid: str) -> str:
    r = c.get(f"/v1/capsules/{cid}")
    assert r.status_code == 200, r.text
    return r.json()["status"]


def test_a_silent_agents_capsules_are_missing_until_it_answers_again(cluster):
    """A frozen agent (SIGSTOP: a partition, its guests keep running) makes its host
    unreachable and its capsules `missing`; answering again, they are running as
    they were."""
    agents, srv = cluster
    with srv.admin() as c:
        made, by_host = one_on_each_host(c, agents)
        lost = made[0]
        victim = by_host[lost]
        r = c.post(f"/v1/capsules/{lost}/exec", json={"cmd": "sh", "args": ["-c", "echo before > /tmp/state"]})
        assert r.status_code == 200, r.text
        agents[victim].freeze()
        try:
            wait_host_status(srv, victim, "unreachable", timeout=HOST_TIMEOUT_S + 10)
            assert capsule_status(c, lost) == "missing"
            listed = {x["id"]: x["status"] for x in c.get("/v1/capsules").json()}
            assert listed[lost] == "missing", listed
            for cid in made[1:]:
                assert listed[cid] == "running", listed
                r = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"})
                assert r.status_code == 200, r.text
            r = c.post("/v1/capsules", json={"template": "minimal"})
            assert r.status_code == 201, r.text
            made.append(r.json()["id"])
            assert host_of(agents, made[-1]) != victim
        finally:
            agents[victim].thaw()
        wait_host_status(srv, victim, "online", timeout=30)
        assert capsule_status(c, lost) == "running"
        r = c.post(f"/v1/capsules/{lost}/exec", json={"cmd": "cat", "args": ["/tmp/state"]})
        assert r.status_code == 200 and r.json()["stdout"] == "before\n", r.text
        for cid in made:
            assert c.delete(f"/v1/capsules/{cid}").status_code == 204


def test_a_killed_agent_is_unreachable_and_skipped_until_it_is_back(cluster):
    agents, srv = cluster
    with srv.admin() as c:
        made, by_host = one_on_each_host(c, agents)
        victim = by_host[made[0]]
        # Its capsules outlive the agent: the paused one on disk, the running one in
        # its VMM, which the restarted agent takes over.
        paused = made[0]
        r = c.post(f"/v1/capsules/{paused}/files/write",
                   files={"path": (None, "/tmp/kept"), "file": ("f", b"kept")})
        assert r.status_code == 204, r.text
        r = c.post(f"/v1/capsules/{paused}/pause")
        assert r.status_code == 200, r.text
        # The least loaded host is now the victim (a paused capsule weighs less than a
        # running one): a running capsule goes there too.
        time.sleep(3 * CHECK_INTERVAL_S)
        r = c.post("/v1/capsules", json={"template": "minimal"})
        assert r.status_code == 201, r.text
        running = r.json()["id"]
        made.append(running)
        assert host_of(agents, running) == victim
        r = c.post(f"/v1/capsules/{running}/exec", json={"cmd": "sh", "args": [
            "-c", "echo in-memory > /dev/shm/mark; sleep 10000 >/dev/null 2>&1 & echo $! > /dev/shm/pid"]})
        assert r.status_code == 200, r.text

        agents[victim].kill9()
        took = wait_host_status(srv, victim, "unreachable", timeout=HOST_TIMEOUT_S + 10)
        print(f"kill -9 → {victim} unreachable in {took:.2f}s "
              f"(timeout {HOST_TIMEOUT_S}s, checks every {CHECK_INTERVAL_S}s)")
        assert capsule_status(c, running) == "missing"
        assert capsule_status(c, paused) == "paused"
        # The other hosts keep serving, and new capsules avoid the silent one.
        for cid, h in by_host.items():
            if h != victim:
                r = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"})
                assert r.status_code == 200, r.text
        fresh = []
        for _ in range(3):
            r = c.post("/v1/capsules", json={"template": "minimal"})
            assert r.status_code == 201, r.text
            fresh.append(r.json()["id"])
            assert host_of(agents, fresh[-1]) != victim
        # Its capsules say where they are: a clear error, not a hang.
        r = c.post(f"/v1/capsules/{paused}/resume")
        assert r.status_code == 503, r.text

        agents[victim].start()
        wait_host_status(srv, victim, "online", timeout=30)
        # Its running capsule is back and running: the same VM (its memory and
        # processes), taken over by the restarted agent.
        deadline = time.monotonic() + 30
        while capsule_status(c, running) != "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert capsule_status(c, running) == "running"
        r = c.post(f"/v1/capsules/{running}/exec", json={"cmd": "sh", "args": [
            "-c", "cat /dev/shm/mark; kill -0 $(cat /dev/shm/pid) && echo sleeping"]})
        assert (r.status_code, r.json().get("stdout")) == (200, "in-memory\nsleeping\n"), \
            r.text + agents[victim].tail(80)
        r = c.post(f"/v1/capsules/{paused}/resume")
        assert r.status_code == 200, r.text
        r = c.post(f"/v1/capsules/{paused}/files/read", json={"path": "/tmp/kept"})
        assert (r.status_code, r.text) == (200, "kept"), r.text
        assert host_of(agents, paused) == victim
        # And it takes new capsules again.
        r = c.post("/v1/capsules", json={"template": "minimal"})
        assert r.status_code == 201, r.text
        fresh.append(r.json()["id"])
        for cid in made + fresh:
            c.delete(f"/v1/capsules/{cid}")


def snapshot_dirs(agent: Agent) -> set[str]:
    return {d for d in os.listdir(os.path.join(agent.data_dir, "templates")) if d.startswith("snap-")}


def test_a_team_snapshot_is_used_on_the_host_that_holds_it_and_copied_to_others(cluster):
    agents, srv = cluster
    with srv.admin() as c:
        r = c.post("/v1/capsules", json={"template": "minimal"})
        assert r.status_code == 201, r.text
        src = r.json()["id"]
        holder = host_of(agents, src)
        r = c.post(f"/v1/capsules/{src}/files/write",
                   files={"path": (None, "/home/user/mark"), "file": ("f", b"snap")})
        assert r.status_code == 204, r.text
        r = c.post("/v1/snapshots", json={"sandbox_id": src, "name": "cluster-snap"})
        assert r.status_code == 201, r.text
        made = []
        try:
            for _ in range(2):
                r = c.post("/v1/capsules", json={"template": "cluster-snap"})
                assert r.status_code == 201, r.text
                made.append(r.json()["id"])
                assert host_of(agents, made[-1]) == holder
                r = c.post(f"/v1/capsules/{made[-1]}/files/read", json={"path": "/home/user/mark"})
                assert (r.status_code, r.text) == (200, "snap"), r.text
            (snap,) = snapshot_dirs(agents[holder])
            # The holder drained, the snapshot is copied to the host that takes the
            # capsule (checksummed, installed whole) and used there.
            with srv.admin_user() as u:
                assert u.post(f"/v1/hosts/{holder}/drain").json()["status"] == "draining"
            # The agent itself is told: it refuses new capsules too.
            assert "drain changed" in agents[holder].log_text()
            try:
                r = c.post("/v1/capsules", json={"template": "cluster-snap"})
                assert r.status_code == 201, r.text
                made.append(r.json()["id"])
                elsewhere = host_of(agents, made[-1])
                assert elsewhere != holder
                assert snap in snapshot_dirs(agents[elsewhere])
                assert not [d for d in os.listdir(os.path.join(agents[elsewhere].data_dir, "templates"))
                            if d.startswith(".import-")], "no staging left"
                r = c.post(f"/v1/capsules/{made[-1]}/files/read", json={"path": "/home/user/mark"})
                assert (r.status_code, r.text) == (200, "snap"), r.text
            finally:
                with srv.admin_user() as u:
                    assert u.delete(f"/v1/hosts/{holder}/drain").json()["status"] == "online"
        finally:
            for cid in [src, *made]:
                c.delete(f"/v1/capsules/{cid}")
            r = c.delete("/v1/snapshots/cluster-snap")
            assert r.status_code == 204, r.text
        # Deleted on every host holding it.
        for a in agents.values():
            assert snapshot_dirs(a) == set(), a.data_dir
