"""Host discovery through the Kubernetes API, with join tokens.

No Kubernetes cluster runs here: the API server is stood in for by a `kubectl
proxy`-shaped HTTP server this test runs on loopback, serving the pod list of the
agents' DaemonSet (the `PodList` of `GET /api/v1/namespaces/{ns}/pods?labelSelector=`)
as the test sets it. The agents, the control plane, PostgreSQL and the guests are real.
Agents stand for nodes at their own loopback addresses (127.0.0.2, .3, .4), all on one
port, as a DaemonSet's host-network pods are."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from e2b import Sandbox

from conftest import Agent, _free_port, _postgres_url, point_sdks_at, wait_host_status

SELECTOR = "app.kubernetes.io/name=wrenn-agent"


class FakeKubeApi:
    """The pod list of namespace `wrenn`, as `kubectl proxy` would serve it."""

    def __init__(self):
        self.pods: list[dict] = []
        self.selectors: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                u = urlparse(self.path)
                if u.path != "/api/v1/namespaces/wrenn/pods":
                    self.send_response(404)
                    self.end_headers()
                    return
                api.selectors.append(parse_qs(u.query).get("labelSelector", [""])[0])
                body = json.dumps({"kind": "PodList", "apiVersion": "v1",
                                   "items": list(api.pods)}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def set_pods(self, nodes: dict[str, str]) -> None:
        """Running agent pods: node name → pod IP."""
        self.pods = [{
            "metadata": {"name": f"wrenn-agent-{i}", "namespace": "wrenn",
                         "labels": {"app.kubernetes.io/name": "wrenn-agent"}},
            "spec": {"nodeName": node, "hostNetwork": True},
            "status": {"phase": "Running", "podIP": ip, "hostIP": ip},
        } for i, (node, ip) in enumerate(nodes.items())]

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.timeout(600)
def test_kubernetes_discovery_drives_the_daemonsets_registered_agents(start_server, monkeypatch):
    kube = FakeKubeApi()
    db_url, db_name = _postgres_url()
    port = _free_port()
    srv = start_server("discovery-cp", args=(
        "--database-url", db_url, "--rate-limit", "0", "--no-local-host",
        "--host-check-interval", "0.5", "--host-timeout", "4",
        "--discovery", "kubernetes", "--k8s-api", kube.url, "--k8s-namespace", "wrenn",
        "--k8s-agent-port", str(port)))
    agents: list[Agent] = []
    sbx = None
    try:
        # A join token for two hosts (platform admins only).
        with srv.admin() as c:
            assert c.post("/v1/hosts/join-tokens", json={}).status_code in (401, 403)
        with srv.admin_user() as c:
            r = c.post("/v1/hosts/join-tokens", json={"max_hosts": 0})
            assert r.status_code == 400, r.text
            r = c.post("/v1/hosts/join-tokens", json={"max_hosts": 2, "ttl_hours": 1})
            assert r.status_code == 201, r.text
            join = r.json()
            assert join["token"].startswith("hjoin-") and join["used"] == 0
            listed = c.get("/v1/hosts/join-tokens").json()
            assert [j["id"] for j in listed] == [join["id"]] and "token" not in listed[0]

        # Two nodes' agents register with it, under their node names.
        for node, ip in (("node-a.wrenn.test", "127.0.0.2"), ("node-b.wrenn.test", "127.0.0.3")):
            a = Agent(node.split(".")[0], host_id=node, register=(srv.url, join["token"]))
            a.ip, a.port = ip, port
            agents.append(a)
            a.start()
        a, b = agents
        with srv.admin_user() as c:
            assert c.get("/v1/hosts/join-tokens").json()[0]["used"] == 2
            for h in ("node-a.wrenn.test", "node-b.wrenn.test"):
                assert c.get(f"/v1/hosts/{h}").json()["type"] == "regular"
        # The token is used up: a third node is refused.
        third = Agent("node-c", host_id="node-c.wrenn.test", register=(srv.url, join["token"]))
        third.ip, third.port = "127.0.0.5", port
        with pytest.raises(AssertionError, match="refused \\(401\\)"):
            third.start()
        shutil.rmtree(third.data_dir, ignore_errors=True)

        # Registered, but no pod lists them: not driven.
        time.sleep(2)
        with srv.admin_user() as c:
            assert c.get("/v1/hosts/node-a.wrenn.test").json()["status"] == "pending"
        # Their pods appear: both driven, through the API's pod list (by selector).
        kube.set_pods({"node-a.wrenn.test": "127.0.0.2", "node-b.wrenn.test": "127.0.0.3"})
        wait_host_status(srv, "node-a.wrenn.test", "online")
        wait_host_status(srv, "node-b.wrenn.test", "online")
        assert SELECTOR in kube.selectors

        # A capsule runs on a discovered host.
        point_sdks_at(srv, monkeypatch)
        sbx = Sandbox.create(template="minimal", timeout=300)
        assert sbx.commands.run("echo discovered").stdout == "discovered\n"
        on = next(x for x in agents
                  if os.path.isdir(os.path.join(x.data_dir, "capsules", sbx.sandbox_id)))
        other = b if on is a else a
        other_id = other.host_id

        # The other node's pod goes away: its host is unreachable although its agent
        # still runs; back in the list, it is driven again.
        kube.set_pods({on.host_id: on.ip})
        wait_host_status(srv, other_id, "unreachable", timeout=30)
        assert sbx.commands.run("echo still").stdout == "still\n"
        kube.set_pods({on.host_id: on.ip, other_id: other.ip})
        wait_host_status(srv, other_id, "online")

        # The other node's agent comes back at another address (a new pod IP): the
        # control plane follows the pod list, not the address it registered with.
        other.stop()
        other.extra = ["--listen", f"127.0.0.4:{port}"]
        other.start()
        kube.set_pods({on.host_id: on.ip, other_id: "127.0.0.4"})
        deadline = time.monotonic() + 30
        while "host agent moved" not in open(srv.log_path, errors="replace").read():
            assert time.monotonic() < deadline, srv.tail()
            time.sleep(0.2)
        wait_host_status(srv, other_id, "online")
        with srv.admin_user() as c:
            # Revoking the join token leaves its hosts registered.
            assert c.delete(f"/v1/hosts/join-tokens/{join['id']}").status_code == 204
            assert c.delete(f"/v1/hosts/join-tokens/{join['id']}").status_code == 404
            assert c.get(f"/v1/hosts/{other_id}").json()["status"] == "online"
    finally:
        if sbx is not None:
            sbx.kill()
        for a in agents:
            a.stop()
            shutil.rmtree(a.data_dir, ignore_errors=True)
        srv.stop()
        kube.close()
        base = os.environ["WRENN_TEST_POSTGRES_URL"]
        subprocess.run(["psql", base, "-qc", f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"],
                       check=False)
