"""The server against its own OpenAPI document (`/openapi.json`), with Schemathesis.

1. `schemathesis run --checks all` over every documented operation (the WebSocket routes
   are not in the document): generated requests from the coverage, fuzzing and stateful
   phases, bounded to a few examples per operation, authenticated with the admin API key
   and, for the routes that need a user, a user's token. Every response must pass every
   check: no 5xx, statuses / content types / headers / bodies as documented, invalid
   input rejected, and so on. Capsule creation is included (E2B's and /v1's); the hooks
   module keeps at most a few of the fuzzer's capsules alive and the teardown destroys
   whatever it left, snapshots included.
2. The success answers of the per-capsule operations, which random ids never reach, for
   a real capsule: each is validated against the document the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import schemathesis

HERE = os.path.dirname(os.path.abspath(__file__))
PASSWORD = "correct horse battery"

# A few examples per operation: creating a capsule takes 0.3-1.5 s under TCG.
MAX_EXAMPLES = int(os.environ.get("WRENN_SCHEMATHESIS_EXAMPLES", "10"))
SEED = os.environ.get("WRENN_SCHEMATHESIS_SEED", "1")

CONFIG = """
[auth.openapi.api_key]
api_key = "${WRENN_ST_KEY}"

[auth.openapi.bearer]
bearer = "${WRENN_ST_TOKEN}"

# Schema-valid requests may still be refused with 400 where the API checks what a schema
# cannot say (an existing cwd, matching passwords, a template name's characters, an
# integer sent as 7.0, a pagination token this server did not issue, ...). Every other
# check stays strict, including that schema-invalid requests are refused.
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "403", "404", "409", "413", "429"]

# Adding a member whose e-mail is no user answers 404 ("user not found") for a team
# that exists: not the missing-resource case this check looks for.
[[operations]]
include-path = "/v1/teams/{id}/members"
include-method = "POST"
checks.ensure_resource_availability.enabled = false

# The events stream never ends by itself (tests/api/test_events.py reads it).
[[operations]]
include-path = "/v1/events/stream"
enabled = false

# Channel settings name a receiver that the server resolves (and the test send posts
# to): generated URLs would send DNS queries and requests off this machine (and the
# session server accepts loopback receivers). tests/api/test_channels.py covers them.
[[operations]]
include-path = "/v1/channels"
include-method = "POST"
enabled = false

[[operations]]
include-path = "/v1/channels/test"
enabled = false

[[operations]]
include-path = "/v1/channels/{id}/config"
enabled = false
"""


def _user_token(server) -> tuple[str, str]:
    """A fresh user (with its own team) for the routes that need a user token."""
    email = f"fuzz-{uuid.uuid4().hex[:8]}@example.com"
    with server.client() as c:
        r = c.post("/v1/auth/signup", json={"email": email, "password": PASSWORD, "name": "Fuzz"})
        assert r.status_code == 201, r.text
        r = c.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        return email, r.json()["token"]


def _sweep(server, headers_list) -> list:
    """Destroys every live capsule and deletes every snapshot these credentials reach;
    returns what is still live afterwards."""
    left = []
    for headers in headers_list:
        with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
            r = c.get("/v1/capsules")
            if r.status_code != 200:
                continue
            for cap in r.json():
                if cap["status"] not in ("stopped", "error"):
                    c.delete(f"/v1/capsules/{cap['id']}")
            for snap in c.get("/v1/snapshots", params={"type": "snapshot"}).json():
                c.delete(f"/v1/snapshots/{snap['name']}")
            # Builds the fuzzer queued (cancelled by the hooks) end with their capsules.
            for b in c.get("/v1/builds").json():
                if b["status"] in ("pending", "running"):
                    c.post(f"/v1/builds/{b['id']}/cancel")
            deadline = time.monotonic() + 120
            while any(b["status"] in ("pending", "running") for b in c.get("/v1/builds").json()):
                assert time.monotonic() < deadline, "fuzzed builds did not end"
                time.sleep(1)
            left += [x for x in c.get("/v1/capsules").json() if x["status"] not in ("stopped", "error")]
    return left


@pytest.mark.timeout(1800)
def test_schemathesis_run_finds_nothing(server, tmp_path):
    _, token = _user_token(server)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    env = dict(os.environ)
    env.update(
        WRENN_ST_URL=server.url,
        WRENN_ST_KEY=server.admin_key,
        WRENN_ST_TOKEN=token,
        SCHEMATHESIS_HOOKS="schemathesis_hooks",
        PYTHONPATH=os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p),
    )
    cmd = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(config),
        "run", f"{server.url}/openapi.json",
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", SEED,
        "--workers", "1",
        "--request-timeout", "120",
        "--no-color",
        "--report", "junit",
        "--report-dir", str(tmp_path / "report"),
    ]
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1700)
    finally:
        left = _sweep(server, [{"X-API-Key": server.admin_key}, {"Authorization": f"Bearer {token}"}])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"schemathesis failed (exit {proc.returncode}):\n{out[-20000:]}"
    assert left == [], left


# --- success answers for a real capsule ---------------------------------------------------


@pytest.fixture
def document(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def _check(document, method: str, template: str, response: httpx.Response, expect: int) -> None:
    assert response.status_code == expect, f"{method} {template}: {response.status_code} {response.text}"
    op = document[template][method]
    documented = set(op.definition.raw["responses"])
    assert str(response.status_code) in documented, (method, template, response.status_code, documented)
    response.request.read()  # a streamed (multipart) request body, for the validator's report
    op.validate_response(response)


def test_real_capsule_answers_match_the_document(server, document):
    h = {"X-API-Key": server.admin_key}
    with httpx.Client(base_url=server.url, headers=h, timeout=120) as c:
        def call(method, template, expect, path=None, **kw):
            r = c.request(method, path or template, **kw)
            _check(document, method, template, r, expect)
            return r

        # E2B: create, read, list, timeout, pause, connect, snapshot, fork, kill.
        sb = call("POST", "/v2/sandboxes", 201, json={"templateID": "base", "timeout": 300, "metadata": {"k": "v"}}).json()
        sid = sb["sandboxID"]
        try:
            call("POST", "/sandboxes", 201, json={"templateID": "minimal", "timeout": 60})  # v1 create too
            call("GET", "/sandboxes/{id}", 200, f"/sandboxes/{sid}")
            call("GET", "/v2/sandboxes", 200, params={"limit": 1})
            call("GET", "/sandboxes", 200)
            call("POST", "/sandboxes/{id}/timeout", 204, f"/sandboxes/{sid}/timeout", json={"timeout": 200})
            call("PUT", "/sandboxes/{id}/network", 204, f"/sandboxes/{sid}/network",
                 json={"allowOut": ["198.18.0.0/24"], "denyOut": ["0.0.0.0/0"]})
            call("PUT", "/sandboxes/{id}/network", 400, f"/sandboxes/{sid}/network",
                 json={"egressProxy": {"address": "proxy.example.com:1080"}})
            call("POST", "/v2/sandboxes/{id}/connect", 200, f"/v2/sandboxes/{sid}/connect", json={"timeout": 300})
            call("POST", "/sandboxes/{id}/pause", 204, f"/sandboxes/{sid}/pause", json={})
            call("POST", "/sandboxes/{id}/pause", 409, f"/sandboxes/{sid}/pause", json={})
            call("POST", "/sandboxes/{id}/resume", 201, f"/sandboxes/{sid}/resume", json={"timeout": 300})
            call("POST", "/sandboxes/{id}/resume", 409, f"/sandboxes/{sid}/resume", json={"timeout": 300})
            call("POST", "/sandboxes/{id}/pause", 204, f"/sandboxes/{sid}/pause")
            call("POST", "/sandboxes/{id}/connect", 201, f"/sandboxes/{sid}/connect", json={"timeout": 300})
            # Metrics need a sample or two.
            for _ in range(40):
                r = c.get(f"/sandboxes/{sid}/metrics")
                if r.status_code == 200 and r.json():
                    break
                time.sleep(0.5)
            call("GET", "/sandboxes/{id}/metrics", 200, f"/sandboxes/{sid}/metrics")
            snap = call("POST", "/sandboxes/{id}/snapshots", 201, f"/sandboxes/{sid}/snapshots", json={}).json()
            call("GET", "/snapshots", 200, params={"sandboxID": sid})
            call("DELETE", "/templates/{id}", 204, f"/templates/{snap['snapshotID']}")
            forks = call("POST", "/sandboxes/{id}/fork", 201, f"/sandboxes/{sid}/fork", json={"count": 1}).json()
            call("DELETE", "/sandboxes/{id}", 204, f"/sandboxes/{forks[0]['sandbox']['sandboxID']}")

            # /v1 on the same capsule.
            call("GET", "/v1/capsules", 200)
            call("GET", "/v1/capsules/{id}", 200, f"/v1/capsules/{sid}")
            call("POST", "/v1/capsules/{id}/ping", 204, f"/v1/capsules/{sid}/ping")
            net = call("PATCH", "/v1/capsules/{id}/network", 200, f"/v1/capsules/{sid}/network",
                       json={"allow_out": ["*.example.com"], "deny_out": ["0.0.0.0/0"]}).json()
            assert net["network"] == {"allow_out": ["*.example.com"], "deny_out": ["0.0.0.0/0"]}, net
            call("PATCH", "/v1/capsules/{id}/network", 400, f"/v1/capsules/{sid}/network",
                 json={"deny_out": ["example.com"]})
            call("PATCH", "/v1/capsules/{id}/network", 200, f"/v1/capsules/{sid}/network", json={})
            call("POST", "/v1/capsules/{id}/exec", 200, f"/v1/capsules/{sid}/exec",
                 json={"cmd": "/bin/sh", "args": ["-c", "echo hi; mkdir -p /tmp/d"]})
            bg = call("POST", "/v1/capsules/{id}/exec", 202, f"/v1/capsules/{sid}/exec",
                      json={"cmd": "/bin/sleep", "args": ["60"], "background": True}).json()
            call("GET", "/v1/capsules/{id}/processes", 200, f"/v1/capsules/{sid}/processes")
            call("DELETE", "/v1/capsules/{id}/processes/{selector}", 204,
                 f"/v1/capsules/{sid}/processes/{bg['pid']}")
            call("POST", "/v1/capsules/{id}/files/write", 204, f"/v1/capsules/{sid}/files/write",
                 files={"path": (None, "/tmp/d/f.txt"), "file": ("f.txt", b"content")})
            call("POST", "/v1/capsules/{id}/files/list", 200, f"/v1/capsules/{sid}/files/list", json={"path": "/tmp/d"})
            call("POST", "/v1/capsules/{id}/files/read", 200, f"/v1/capsules/{sid}/files/read", json={"path": "/tmp/d/f.txt"})
            call("POST", "/v1/capsules/{id}/files/mkdir", 200, f"/v1/capsules/{sid}/files/mkdir", json={"path": "/tmp/d/e"})
            call("POST", "/v1/capsules/{id}/files/remove", 204, f"/v1/capsules/{sid}/files/remove", json={"path": "/tmp/d/e"})
            call("GET", "/v1/capsules/{id}/metrics", 200, f"/v1/capsules/{sid}/metrics")
            call("GET", "/v1/capsules/stats", 200)
            call("GET", "/v1/capsules/usage", 200)
            call("GET", "/v1/audit-logs", 200, params={"limit": 5})
            name = f"oa-{uuid.uuid4().hex[:8]}"
            call("POST", "/v1/snapshots", 201, json={"sandbox_id": sid, "name": name})
            call("GET", "/v1/snapshots", 200)
            call("DELETE", "/v1/snapshots/{name}", 204, f"/v1/snapshots/{name}")
            call("POST", "/v1/capsules/{id}/pause", 200, f"/v1/capsules/{sid}/pause")
            call("POST", "/v1/capsules/{id}/resume", 200, f"/v1/capsules/{sid}/resume")
            call("DELETE", "/v1/capsules/{id}", 204, f"/v1/capsules/{sid}")
            call("DELETE", "/sandboxes/{id}", 404, f"/sandboxes/{sid}")
        finally:
            assert _sweep(server, [h]) == []
