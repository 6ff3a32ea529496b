"""Registered hosts: an admin creates a host and gets a one-time registration token; a
`wrenn agent --control-plane URL --register TOKEN --advertise ADDR:PORT` trades it for a
host certificate and serves mutual TLS; the control plane finds the host in PostgreSQL,
connects with its own certificate (checking the host's), and places capsules there (a
team-owned host is preferred by its team). Tokens work once (of racing registrations
exactly one wins) and expire; deleting a host with capsules needs `?force=true`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import threading
import time

import httpx
import pytest
from e2b import Sandbox

from conftest import Agent, _postgres_url, point_sdks_at, wait_host_status
from test_channels import SECRET, Receiver, make_channel, verify

SPECS = {"arch": "x86_64", "cpu_cores": 2, "memory_mb": 4096, "disk_gb": 20}


@pytest.fixture(scope="module")
def control_plane(start_server):
    db_url, db_name = _postgres_url()
    srv = start_server("register-cp", args=("--database-url", db_url, "--rate-limit", "0",
                                            "--host-check-interval", "0.5", "--host-timeout", "4",
                                            # Agents renew at 40 s: renewals happen during these tests.
                                            "--host-cert-lifetime", "60",
                                            # The channel test's receiver is on loopback.
                                            "--channels-allow-private-addresses"))
    yield srv
    with srv.admin() as c:
        for cap in c.get("/v1/capsules").json():
            c.delete(f"/v1/capsules/{cap['id']}")
    srv.stop()
    base = os.environ["WRENN_TEST_POSTGRES_URL"]
    subprocess.run(["psql", base, "-qc", f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"], check=False)


def admin_team(srv) -> str:
    with srv.admin_user() as c:
        token = c.headers["authorization"].split()[1]
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["team_id"]


def create_host(srv, **body) -> tuple[dict, str]:
    with srv.admin_user() as c:
        r = c.post("/v1/hosts", json=body)
        assert r.status_code == 201, r.text
        return r.json()["host"], r.json()["registration_token"]


def register(srv, token: str, address: str = "127.0.0.1:1") -> httpx.Response:
    with srv.client() as c:
        return c.post("/v1/hosts/register", json={"token": token, "address": address, **SPECS})


def test_hosts_are_created_by_platform_admins_with_a_one_time_token(control_plane):
    srv = control_plane
    with srv.admin() as c:
        r = c.post("/v1/hosts", json={})
        assert r.status_code == 401 and "user token" in r.json()["error"]["message"], r.text
    with srv.admin_user() as c:
        for body, word in [({"type": "byoc"}, "team_id"), ({"type": "giant"}, "giant"),
                           ({"team_id": admin_team(srv)}, "byoc"), ({"nope": 1}, "nope"),
                           ({"type": "byoc", "team_id": "team-missing"}, "team-missing")]:
            r = c.post("/v1/hosts", json=body)
            assert r.status_code == 400 and word in r.json()["error"]["message"], (body, r.text)
    host, token = create_host(srv, provider="test", availability_zone="here")
    assert host["status"] == "pending" and host["type"] == "regular", host
    assert token.startswith("htok-"), token

    # Bad registrations: a wrong token is 401, a bad address 400; neither uses the token.
    assert register(srv, "htok-" + "0" * 64).status_code == 401
    r = register(srv, token, address="no-port")
    assert r.status_code == 400 and "host:port" in r.json()["error"]["message"], r.text

    # Two agents racing with one token: exactly one registers.
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(register(srv, token))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status_code for a in answers) == [201, 401], [a.text for a in answers]
    won = next(a.json() for a in answers if a.status_code == 201)
    assert won["host"]["id"] == host["id"]
    assert "BEGIN CERTIFICATE" in won["cert_pem"] and "PRIVATE KEY" in won["key_pem"]
    assert "BEGIN CERTIFICATE" in won["ca_cert_pem"] and won["ca_cert_pem"] != won["cert_pem"]
    # Used once: used again it fails.
    r = register(srv, token)
    assert r.status_code == 401 and "used or expired" in r.json()["error"]["message"], r.text

    # A new token replaces the unused ones; tags; delete (no capsules: no force needed).
    with srv.admin_user() as c:
        r = c.post(f"/v1/hosts/{host['id']}/token")
        assert r.status_code == 201, r.text
        fresh = r.json()["registration_token"]
        r = c.post(f"/v1/hosts/{host['id']}/token")
        newest = r.json()["registration_token"]
        assert register(srv, fresh).status_code == 401, "replaced by a newer token"
        assert c.post(f"/v1/hosts/{host['id']}/tags", json={"tag": "gpu"}).json() == ["gpu"]
        assert c.post(f"/v1/hosts/{host['id']}/tags", json={"tag": "zone=a"}).json() == ["gpu", "zone=a"]
        assert c.post(f"/v1/hosts/{host['id']}/tags", json={"tag": "bad tag"}).status_code == 400
        assert c.delete(f"/v1/hosts/{host['id']}/tags/gpu").status_code == 204
        assert c.get(f"/v1/hosts/{host['id']}/tags").json() == ["zone=a"]
        assert c.delete(f"/v1/hosts/{host['id']}/tags/gpu").status_code == 404
        assert c.delete(f"/v1/hosts/{host['id']}").status_code == 204
        assert c.get(f"/v1/hosts/{host['id']}").status_code == 404
        assert register(srv, newest).status_code == 401, "a deleted host's token is dead"
        # The in-process host is not a registered host.
        r = c.delete("/v1/hosts/local")
        assert r.status_code == 409 and "not a registered host" in r.json()["error"]["message"], r.text


@pytest.mark.timeout(300)
def test_a_registered_agent_serves_mutual_tls_and_runs_its_teams_capsules(control_plane, monkeypatch):
    srv = control_plane
    host, token = create_host(srv, type="byoc", team_id=admin_team(srv))
    agent = Agent("registered", register=(srv.url, token))
    try:
        agent.start()
        assert f"registered with {srv.url} as host {host['id']}" in agent.log_text()
        assert "with mutual TLS" in agent.log_text()
        creds = os.path.join(agent.data_dir, "agent-credentials.json")
        assert stat.S_IMODE(os.stat(creds).st_mode) == 0o600
        wait_host_status(srv, host["id"], "online")
        with srv.admin_user() as c:
            h = c.get(f"/v1/hosts/{host['id']}").json()
        assert h["type"] == "byoc" and h["address"] == f"127.0.0.1:{agent.port}" and "cert_expires_at" in h, h

        # Restarted, the agent registers no more: it keeps its certificate.
        agent.stop()
        agent.register = None
        agent.start()
        assert agent.log_text().count("registered with") == 1
        wait_host_status(srv, host["id"], "online")

        # Plaintext to the agent's endpoint is refused: only the control plane's
        # certificate gets in.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{agent.port}/", timeout=5)

        # The team's capsule goes to its own host; commands and files reach the guest
        # through the agent's connection.
        point_sdks_at(srv, monkeypatch)
        sbx = Sandbox.create(template="minimal", timeout=300)
        assert os.path.isdir(os.path.join(agent.data_dir, "capsules", sbx.sandbox_id))
        assert sbx.commands.run("echo over-mtls").stdout == "over-mtls\n"
        sbx.files.write("/tmp/x.txt", "through the tunnel")
        assert sbx.files.read("/tmp/x.txt") == "through the tunnel"

        # Deleting a host with capsules needs force; force destroys them.
        with srv.admin_user() as c:
            r = c.delete(f"/v1/hosts/{host['id']}")
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "host_has_capsules"
            assert r.json()["capsule_ids"] == [sbx.sandbox_id], r.text
            assert c.delete(f"/v1/hosts/{host['id']}?force=true").status_code == 204
            assert c.get(f"/v1/hosts/{host['id']}").status_code == 404
        with srv.admin() as c:
            assert c.get(f"/v1/capsules/{sbx.sandbox_id}").json()["status"] == "stopped"
        assert not os.path.exists(os.path.join(agent.data_dir, "capsules", sbx.sandbox_id))
    finally:
        agent.stop()
        shutil.rmtree(agent.data_dir, ignore_errors=True)


def test_an_agent_with_a_used_token_says_so(control_plane):
    srv = control_plane
    host, token = create_host(srv)
    assert register(srv, token).status_code == 201
    agent = Agent("used-token", register=(srv.url, token))
    try:
        with pytest.raises(AssertionError, match="refused \\(401\\)"):
            agent.start()
    finally:
        agent.stop()
        shutil.rmtree(agent.data_dir, ignore_errors=True)
        with srv.admin_user() as c:
            c.delete(f"/v1/hosts/{host['id']}")


def platform_audit(srv, action: str) -> list[dict]:
    with srv.admin_user() as c:
        r = c.get("/v1/admin/audit-logs", params={"action": action, "limit": 200})
        assert r.status_code == 200, r.text
        return [e for e in r.json()["items"] if e["scope"] == "platform"]


@pytest.mark.timeout(400)
def test_an_agent_renews_its_certificate_and_refused_credentials_are_audited(control_plane, monkeypatch):
    srv = control_plane
    # Refused credentials leave platform audit rows (platform admins read them).
    assert register(srv, "htok-not-a-token", "10.9.9.9:7070").status_code == 401
    refused = platform_audit(srv, "host.register")
    assert any(e["status"] == "failure" and e["metadata"]["address"] == "10.9.9.9:7070"
               for e in refused), refused
    with srv.client() as c:
        r = c.post("/v1/hosts/auth/refresh", json={"refresh_token": "hrt-nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
    with srv.admin() as c:  # a team's API key is no platform admin
        assert c.get("/v1/admin/audit-logs").status_code in (401, 403)

    host, token = create_host(srv, type="byoc", team_id=admin_team(srv))
    agent = Agent("renewing", register=(srv.url, token))
    creds_path = os.path.join(agent.data_dir, "agent-credentials.json")
    try:
        agent.start()
        with open(creds_path) as f:
            first = json.load(f)
        wait_host_status(srv, host["id"], "online")
        # Renewed when a third of its 60 s is left, while the agent serves.
        deadline = time.monotonic() + 90
        while True:
            with open(creds_path) as f:
                now = json.load(f)
            if now["cert_pem"] != first["cert_pem"]:
                break
            assert time.monotonic() < deadline, agent.log_text()[-3000:]
            time.sleep(1)
        assert now["refresh_token"] != first["refresh_token"]
        assert now["cert_expires_at"] > first["cert_expires_at"]
        assert "host certificate renewed" in agent.log_text()
        renewals = [e for e in platform_audit(srv, "host.refresh") if e.get("resource_id") == host["id"]]
        assert renewals and all(e["status"] == "success" for e in renewals), renewals
        # A refresh token works once.
        with srv.client() as c:
            r = c.post("/v1/hosts/auth/refresh", json={"refresh_token": first["refresh_token"]})
            assert r.status_code == 401, r.text
        assert any(e["status"] == "failure" for e in platform_audit(srv, "host.refresh"))

        # Once the first certificate has expired, a restarted agent is reached with the
        # renewed one: its team's capsule runs there.
        expired = time.mktime(time.strptime(first["cert_expires_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        time.sleep(max(0.0, expired - time.time() + 1))
        agent.stop()
        agent.register = None
        agent.start()
        wait_host_status(srv, host["id"], "online")
        point_sdks_at(srv, monkeypatch)
        sbx = Sandbox.create(template="minimal", timeout=120)
        try:
            assert os.path.isdir(os.path.join(agent.data_dir, "capsules", sbx.sandbox_id))
            assert sbx.commands.run("echo renewed").stdout == "renewed\n"
        finally:
            sbx.kill()
    finally:
        agent.stop()
        shutil.rmtree(agent.data_dir, ignore_errors=True)
        with srv.admin_user() as c:
            c.delete(f"/v1/hosts/{host['id']}?force=true")


def test_a_team_hears_its_host_go_silent_and_come_back(control_plane):
    """host.up / host.down of a team-owned host reach that team's channels, signed."""
    srv = control_plane
    host, token = create_host(srv, type="byoc", team_id=admin_team(srv))
    rx = Receiver()
    agent = Agent("byoc-events", register=(srv.url, token))
    with srv.admin_user() as u:
        ch = make_channel(u, rx.url, events=["host.up", "host.down"])

    def of(kind):
        return [e for e in rx.events(host["id"]) if e["payload"]["type"] == kind]

    try:
        agent.start()
        wait_host_status(srv, host["id"], "online")
        rx.wait(lambda: of("host.up"), what="host.up")
        agent.kill9()
        wait_host_status(srv, host["id"], "unreachable")
        rx.wait(lambda: of("host.down"), what="host.down")
        agent.register = None
        agent.start()
        wait_host_status(srv, host["id"], "online")
        rx.wait(lambda: len(of("host.up")) >= 2, what="the second host.up")
        for e in rx.events(host["id"]):
            verify(e, SECRET)
            assert e["payload"]["resource"] == {"id": host["id"], "type": "host"}
        seq = [e["payload"]["type"] for e in sorted(rx.events(host["id"]), key=lambda e: e["payload"]["timestamp"])]
        assert seq[:3] == ["host.up", "host.down", "host.up"], seq
    finally:
        agent.stop()
        shutil.rmtree(agent.data_dir, ignore_errors=True)
        rx.close()
        with srv.admin_user() as u:
            u.delete(f"/v1/channels/{ch['id']}")
            u.delete(f"/v1/hosts/{host['id']}?force=true")
