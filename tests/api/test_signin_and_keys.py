"""Sign-up, invitations, key management and sign-in throttling on a real `wrenn serve`
that listens beyond loopback (0.0.0.0), started with its defaults for sign-up.

- Sign-up is closed by default on such a server; an owner's invitation lets one e-mail
  sign up (once) and join the team.
- API keys and members cannot create or delete API keys; the owner can.
- Login is throttled per client address (the peer address of the TCP connection) before
  any password is hashed: 429 with Retry-After and a JSON body, and another client
  address is not affected.
"""

from __future__ import annotations

import uuid

import httpx
import pytest

PASSWORD = "correct horse battery"
IP_LIMIT = 6


@pytest.fixture(scope="module")
def srv(start_server):
    # Listening on every address, with the defaults for sign-up (closed there).
    return start_server(
        "auth",
        "0.0.0.0",
        ("--rate-limit", "0", "--auth-rate-limit", str(IP_LIMIT), "--auth-account-rate-limit", "0"),
    )


def _client(srv, source: str, token: str | None = None) -> httpx.Client:
    """A client connecting from the loopback address `source` (all of 127/8 is local)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(
        base_url=srv.url,
        headers=headers,
        timeout=60,
        transport=httpx.HTTPTransport(local_address=source),
    )


def _error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]


def test_signup_is_closed_beyond_loopback_and_invitations_open_it(srv):
    # Each test uses client addresses of its own: login is throttled per address.
    with _client(srv, "127.0.1.1") as c:
        r = c.post("/v1/auth/signup", json={"email": "walk-in@example.com", "password": PASSWORD})
        _error(r, 403, "forbidden")
        assert "invitation" in r.json()["error"]["message"]

        r = c.post("/v1/auth/login", json={"email": srv.admin_email, "password": srv.admin_password})
        assert r.status_code == 200, r.text
        owner, team = r.json()["token"], r.json()["team_id"]
    email = f"invited-{uuid.uuid4().hex[:8]}@example.com"
    with _client(srv, "127.0.1.2", owner) as o:
        r = o.post(f"/v1/teams/{team}/invitations", json={"email": email})
        assert r.status_code == 201, r.text
        token = r.json()["token"]
    with _client(srv, "127.0.1.3") as c:
        r = c.post("/v1/auth/signup", json={"email": "else@example.com", "password": PASSWORD, "invitation": token})
        _error(r, 403, "invalid_invitation")
        r = c.post("/v1/auth/signup", json={"email": email, "password": PASSWORD, "invitation": token})
        assert r.status_code == 201, r.text
        r = c.post("/v1/auth/signup", json={"email": email, "password": PASSWORD, "invitation": token})
        assert r.status_code in (403, 409), r.text
        r = c.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        assert r.json()["team_id"] == team
        member = r.json()["token"]
    with _client(srv, "127.0.1.4", member) as m:
        assert m.get("/v1/me").json()["role"] == "member"
        # A member makes no keys; the owner removes them and their token stops working.
        _error(m.post("/v1/api-keys", json={"name": "m"}), 403, "forbidden")
        me = m.get("/v1/me").json()["id"]
    with _client(srv, "127.0.1.5", owner) as o:
        assert o.delete(f"/v1/teams/{team}/members/{me}").status_code == 204
    with _client(srv, "127.0.1.6", member) as m:
        _error(m.get("/v1/capsules"), 401, "unauthorized")


def test_api_keys_cannot_make_or_delete_keys(srv):
    with srv.admin() as k:
        _error(k.post("/v1/api-keys", json={"name": "by a key"}), 403, "forbidden")
        [own] = [x for x in k.get("/v1/api-keys").json() if x["key_prefix"] == srv.admin_key[:10]]
        _error(k.delete(f"/v1/api-keys/{own['id']}"), 403, "forbidden")
        assert k.get("/v1/capsules").status_code == 200
    with _client(srv, "127.0.2.1") as c:
        owner = c.post("/v1/auth/login", json={"email": srv.admin_email, "password": srv.admin_password}).json()["token"]
    with _client(srv, "127.0.2.2", owner) as o:
        r = o.post("/v1/api-keys", json={"name": "by the owner"})
        assert r.status_code == 201, r.text
        assert o.delete(f"/v1/api-keys/{r.json()['id']}").status_code == 204


def test_login_is_throttled_per_client_address(srv):
    body = {"email": "nobody@example.com", "password": "wrong password"}
    with _client(srv, "127.0.3.1") as c:
        for _ in range(IP_LIMIT):
            _error(c.post("/v1/auth/login", json=body), 401, "wrong_password")
        r = c.post("/v1/auth/login", json=body)
        _error(r, 429, "rate_limited")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        _error(c.post("/v1/auth/signup", json={"email": "x@example.com", "password": PASSWORD}), 403, "forbidden")
        r = c.post("/v1/auth/login", json={"email": srv.admin_email, "password": srv.admin_password})
        _error(r, 429, "rate_limited")
    # Another client address has its own allowance.
    with _client(srv, "127.0.3.2") as c:
        r = c.post("/v1/auth/login", json={"email": srv.admin_email, "password": srv.admin_password})
        assert r.status_code == 200, r.text
