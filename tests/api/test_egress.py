"""Egress policies, private ports and fresh randomness, through the unmodified `e2b` SDK,
with real guests.

The "internet" is a network namespace this module creates (198.18.0.0/24, the
benchmarking range): `inet_services.py` serves HTTP, UDP echo and DNS there, and a
metadata address (169.254.169.254) is routed to it from the host as a cloud's would be.
`wrenn serve` forwards the names a policy allows to that DNS server
(`--dns-upstream`). Probes run inside the guest (`guest_net_probe.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException

HERE = os.path.dirname(os.path.abspath(__file__))
NS = f"wt-inet-{os.getpid()}"
LINK = f"wti-{os.getpid()}"
HOST_SIDE, GOOD, BAD = "198.18.0.1", "198.18.0.2", "198.18.0.3"
METADATA = "169.254.169.254"
HTTP, UDP = 8080, 7007
ALL_TRAFFIC = "0.0.0.0/0"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def internet():
    sh("ip", "netns", "add", NS)
    proc = None
    try:
        sh("ip", "link", "add", LINK, "type", "veth", "peer", "name", "eth0", "netns", NS)
        sh("ip", "addr", "add", f"{HOST_SIDE}/24", "dev", LINK)
        sh("ip", "link", "set", LINK, "up")
        for a in (GOOD, BAD):
            sh("ip", "-n", NS, "addr", "add", f"{a}/24", "dev", "eth0")
        sh("ip", "-n", NS, "addr", "add", f"{METADATA}/32", "dev", "eth0")
        sh("ip", "-n", NS, "link", "set", "eth0", "up")
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        sh("ip", "-n", NS, "route", "add", "default", "via", HOST_SIDE)
        sh("ip", "route", "add", f"{METADATA}/32", "via", GOOD, "dev", LINK)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", NS, "python3", os.path.join(HERE, "inet_services.py"), GOOD, BAD, METADATA],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        # The host reaches the test internet (and its metadata address) directly.
        for a in (GOOD, METADATA):
            assert httpx.get(f"http://{a}:{HTTP}/x", timeout=5).text == f"inet {a} /x"
        yield
    finally:
        if proc:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "link", "del", LINK], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


@pytest.fixture(scope="module")
def srv(start_server, internet):
    # Listening on all addresses: the host side of the internet link is one of them,
    # and a capsule must still not reach it.
    return start_server("egress", listen_host="0.0.0.0", args=("--dns-upstream", f"{GOOD}:53"))


def api(server) -> dict:
    return {"api_key": server.admin_key, "api_url": server.url, "sandbox_url": server.url, "debug": False}


def sandbox(server, **kw) -> Sandbox:
    s = Sandbox.create("python", timeout=600, **api(server), **kw)
    with open(os.path.join(HERE, "guest_net_probe.py")) as f:
        s.files.write("/tmp/probe.py", f.read())
    return s


def probe(s: Sandbox, *probes) -> list[str]:
    # As root: ping needs a raw socket.
    r = s.commands.run(f"python3 /tmp/probe.py '{json.dumps(list(probes))}'", timeout=120, user="root")
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def aged(srv):
    """A sandbox started when the module starts, so it is old when the last test runs:
    past two minutes of uptime Linux reseeds its RNG only every 60 s, so children
    forked from it share RNG state unless the host reseeds them."""
    s = Sandbox.create("python", timeout=900, **api(srv))
    yield s
    s.kill()


def test_open_by_default_and_deny_all_blocks_tcp_udp_icmp(srv, aged):
    s = sandbox(srv)
    try:
        assert probe(s, ["tcp", GOOD, HTTP], ["udp", BAD, UDP], ["ping", GOOD]) == ["ok", "ok", "ok"]
        assert s.get_info().allow_internet_access is True
    finally:
        s.kill()
    s = sandbox(srv, allow_internet_access=False)
    try:
        tcp, udp, icmp = probe(s, ["tcp", GOOD, HTTP], ["udp", GOOD, UDP], ["ping", GOOD])
        # Refused visibly: a reset for TCP, an ICMP error for UDP; nothing hangs.
        assert tcp == "refused", tcp
        assert udp in ("unreachable", "refused"), udp
        assert icmp == "fail"
        info = s.get_info()
        assert info.allow_internet_access is False
        assert info.network["deny_out"] == [ALL_TRAFFIC]
    finally:
        s.kill()


def test_allow_lists_by_domain_and_cidr_and_live_update(srv):
    s = sandbox(srv, network={"allow_out": ["good.test", "*.wild.test"], "deny_out": [ALL_TRAFFIC]})
    try:
        got = probe(
            s,
            ["tcp", GOOD, HTTP],  # not resolved yet: closed
            ["dns", "8.8.8.8", "good.test"],  # any server: the capsule's resolver answers
            ["tcp", GOOD, HTTP],
            ["http", f"http://good.test:{HTTP}/by-name"],  # the guest's own resolver
            ["http", f"http://x.wild.test:{HTTP}/wild"],
            ["dns", "8.8.8.8", "bad.test"],
            ["tcp", BAD, HTTP],  # hard-coded address of a name that is not allowed
            ["udp", BAD, UDP],
        )
        assert got[0] == "refused"
        assert got[1] == GOOD
        assert got[2] == "ok"
        assert got[3] == f"inet {GOOD} /by-name"
        assert got[4] == f"inet {GOOD} /wild"
        assert got[5] == "REFUSED"
        assert got[6] == "refused"
        assert got[7] in ("unreachable", "refused")

        # Replace the policy of the running sandbox: a CIDR allow-list.
        started = time.monotonic()
        s.update_network({"allow_out": [f"{BAD}/32"], "deny_out": [ALL_TRAFFIC]})
        took = time.monotonic() - started
        assert took < 1.0, f"update_network took {took:.2f}s"
        assert probe(s, ["tcp", BAD, HTTP], ["tcp", GOOD, HTTP]) == ["ok", "refused"]
        assert s.get_info().network["allow_out"] == [BAD]  # shown in canonical form

        # Omitted fields are cleared: an empty update opens everything again.
        s.update_network({})
        assert probe(s, ["tcp", GOOD, HTTP]) == ["ok"]
    finally:
        s.kill()


def test_the_host_metadata_and_other_capsules_are_never_reachable(srv):
    port = int(srv.url.rsplit(":", 1)[1])
    targets = [
        ["tcp", HOST_SIDE, port],  # wrenn serve, on a host address
        ["tcp", METADATA, HTTP],  # the (test) metadata service
        ["tcp", "169.254.128.1", port],  # the host side of the first slot's veth
        ["tcp", "169.254.128.2", 49983],  # the first slot's peer (another capsule's envd)
        ["tcp", "169.254.0.22", port],  # the capsule's own gateway
    ]
    other = sandbox(srv)
    try:
        for kw in ({}, {"network": {"allow_out": [ALL_TRAFFIC, METADATA]}}, {"allow_internet_access": False}):
            s = sandbox(srv, **kw)
            try:
                got = probe(s, *targets)
                for t, r in zip(targets, got):
                    assert r in ("refused", "unreachable", "denied"), f"{t} under {kw}: {r}"
            finally:
                s.kill()
    finally:
        other.kill()


def test_private_ports_need_the_traffic_token(srv):
    s = sandbox(srv, network={"allow_public_traffic": False})
    try:
        token = s.traffic_access_token
        assert token
        s.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True, timeout=0)
        url = f"{srv.url}/"
        h = {"E2b-Sandbox-Id": s.sandbox_id, "E2b-Sandbox-Port": "8000"}
        deadline = time.monotonic() + 60
        while True:
            r = httpx.get(url, headers={**h, "e2b-traffic-access-token": token}, timeout=10)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        r = httpx.get(url, headers=h, timeout=10)
        assert r.status_code == 403, r.text
        assert r.json()["message"]
        r = httpx.get(url, headers={**h, "e2b-traffic-access-token": "0" * len(token)}, timeout=10)
        assert r.status_code == 403
        # envd keeps its own token check: the SDK still works.
        assert s.commands.run("echo hi").stdout == "hi\n"
    finally:
        s.kill()
    # Public by default: no token.
    s = sandbox(srv)
    try:
        assert s.traffic_access_token is None
    finally:
        s.kill()


@pytest.mark.parametrize(
    "network",
    [
        {"egress_proxy": {"address": "proxy.example.com:1080"}},
        {"rules": {"api.example.com": [{"transform": {"headers": {"X-A": "b"}}}]}},
        {"mask_request_host": "${PORT}-x.example.com"},
        {"allow_out": ["2001:db8::/32"], "deny_out": [ALL_TRAFFIC]},
        {"deny_out": ["example.com"]},
        {"allow_out": ["not a name!"]},
    ],
)
def test_what_cannot_be_enforced_is_refused(srv, network):
    before = httpx.get(f"{srv.url}/v1/capsules", headers={"X-API-Key": srv.admin_key}).json()
    with pytest.raises(SandboxException) as e:
        Sandbox.create("python", network=network, **api(srv))
    assert "400" in str(e.value)
    after = httpx.get(f"{srv.url}/v1/capsules", headers={"X-API-Key": srv.admin_key}).json()
    assert len(after) == len(before), "a refused create left a capsule behind"


@pytest.mark.timeout(300)
def test_clones_and_forks_get_fresh_randomness(srv, aged):
    cmd = "python3 -c 'import os, uuid; print(os.urandom(16).hex(), uuid.uuid4())'"
    a, b = Sandbox.create("python", **api(srv)), Sandbox.create("python", **api(srv))
    try:
        ra, rb = a.commands.run(cmd).stdout, b.commands.run(cmd).stdout
        assert ra != rb, "two sandboxes of one template drew the same random bytes"
    finally:
        a.kill()
        b.kill()
    # Forks of a guest past its early-boot reseeding: without a reseed by the host,
    # both children would continue the parent's RNG and draw the same bytes.
    uptime = float(aged.commands.run("cut -d' ' -f1 /proc/uptime").stdout)
    if uptime < 125:
        time.sleep(125 - uptime)
    # The parent's own draw reseeds it (its interval has passed); the children are
    # forked right after, well inside the next 60 s interval.
    first = aged.commands.run(cmd).stdout
    forks = aged.fork(count=2)
    assert all(isinstance(f, Sandbox) for f in forks), forks
    try:
        f1, f2 = (f.commands.run(cmd).stdout for f in forks)
        assert len({f1, f2, first}) == 3, (f1, f2, first)
    finally:
        for f in forks:
            f.kill()
