"""Platform admin routes (`/v1/admin/teams`, `/users`, `/users/{id}/active`,
`/capsules`, `/templates`): every team's view for the bootstrap admin's user token,
refused to API keys and to other users; disabling an account stops its logins and its
tokens at once, enabling it brings them back. With real guests.
"""

from __future__ import annotations

import uuid

from conftest import PASSWORD

ROUTES = [
    ("GET", "/v1/admin/teams"),
    ("GET", "/v1/admin/users"),
    ("PUT", "/v1/admin/users/usr-x/active"),
    ("GET", "/v1/admin/capsules"),
    ("GET", "/v1/admin/capsules/cl-x"),
    ("DELETE", "/v1/admin/capsules/cl-x"),
    ("GET", "/v1/admin/templates"),
]


def signup(server) -> tuple[str, str, str]:
    """A new account with its own team: (email, token, team id)."""
    email = f"adm-{uuid.uuid4().hex[:8]}@example.com"
    with server.client() as c:
        r = c.post("/v1/auth/signup", json={"email": email, "password": PASSWORD, "name": "Someone"})
        assert r.status_code == 201, r.text
        r = c.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        return email, r.json()["token"], r.json()["team_id"]


def test_admin_routes_are_for_platform_admins(server):
    _, token, _ = signup(server)
    with server.admin() as key, server.client(None, Authorization=f"Bearer {token}") as user:
        for method, path in ROUTES:
            body = {"json": {"active": True}} if method == "PUT" else {}
            r = key.request(method, path, **body)
            assert r.status_code == 401, (path, r.text)
            r = user.request(method, path, **body)
            assert r.status_code == 403, (path, r.text)
            assert "platform admins" in r.json()["error"]["message"]


def test_teams_users_capsules_and_templates_of_every_team(server):
    email, token, team = signup(server)
    with server.client(None, Authorization=f"Bearer {token}") as u:
        r = u.post("/v1/capsules", json={"template": "minimal", "timeout_sec": 0})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
    with server.admin_user() as a:
        teams = {t["id"]: t for t in a.get("/v1/admin/teams").json()}
        mine = teams[team]
        assert mine["owner"] == email and mine["member_count"] == 1
        assert mine["active_capsule_count"] == 1 and mine["channel_count"] == 0
        # Users, a page at a time.
        first = a.get("/v1/admin/users", params={"per_page": 1}).json()
        assert len(first["items"]) == 1 and first["total"] >= 2 and first["page"] == 1
        everyone = a.get("/v1/admin/users", params={"per_page": 200}).json()["items"]
        me = next(x for x in everyone if x["email"] == email)
        assert me["status"] == "active" and me["is_admin"] is False
        assert a.get("/v1/admin/users", params={"page": 0}).status_code == 400
        # Capsules of every team, with their team.
        caps = {c["id"]: c for c in a.get("/v1/admin/capsules").json()}
        assert caps[cid]["team_id"] == team and caps[cid]["status"] == "running"
        assert a.get(f"/v1/admin/capsules/{cid}").json()["team_id"] == team
        # Templates: the platform's, then teams' snapshots.
        temps = a.get("/v1/admin/templates").json()
        assert {"minimal", "python"} <= {t["name"] for t in temps if "team_id" not in t}
        # The admin destroys another team's capsule.
        assert a.delete(f"/v1/admin/capsules/{cid}").status_code == 204
        assert a.get(f"/v1/admin/capsules/{cid}").json()["status"] == "stopped"
        assert cid not in {c["id"] for c in a.get("/v1/admin/capsules").json()}
        assert a.delete("/v1/admin/capsules/cl-" + "0" * 25).status_code == 404
    with server.client(None, Authorization=f"Bearer {token}") as u:
        assert u.get(f"/v1/capsules/{cid}").json()["status"] == "stopped"
        log = u.get("/v1/audit-logs").json()["items"]
        assert any(i["action"] == "capsule.destroy" and i["resource_id"] == cid for i in log)


def test_disabling_an_account(server):
    email, token, _ = signup(server)
    with server.admin_user() as a:
        uid = next(x["id"] for x in a.get("/v1/admin/users", params={"per_page": 200}).json()["items"]
                   if x["email"] == email)
        r = a.put(f"/v1/admin/users/{uid}/active", json={"active": False})
        assert r.status_code == 200 and r.json()["status"] == "disabled", r.text
        # Its token stops working at once; it cannot log in.
        with server.client(None, Authorization=f"Bearer {token}") as u:
            r = u.get("/v1/capsules")
            assert r.status_code == 401 and "disabled" in r.json()["error"]["message"], r.text
        with server.client() as c:
            r = c.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
            assert r.status_code == 403 and r.json()["error"]["code"] == "account_disabled", r.text
            # A wrong password still says only that.
            r = c.post("/v1/auth/login", json={"email": email, "password": "wrong " + PASSWORD})
            assert r.status_code == 401
        # Platform admins are not disabled; unknown accounts are 404; bad bodies 400.
        admin_id = next(x["id"] for x in a.get("/v1/admin/users", params={"per_page": 200}).json()["items"]
                        if x["is_admin"])
        assert a.put(f"/v1/admin/users/{admin_id}/active", json={"active": False}).status_code == 409
        assert a.put("/v1/admin/users/usr-nobody/active", json={"active": False}).status_code == 404
        assert a.put(f"/v1/admin/users/{uid}/active", json={"active": "no"}).status_code in (400, 422)
        # Enabled again: the old token works again, and so does logging in.
        r = a.put(f"/v1/admin/users/{uid}/active", json={"active": True})
        assert r.status_code == 200 and r.json()["status"] == "active"
    with server.client(None, Authorization=f"Bearer {token}") as u:
        assert u.get("/v1/capsules").status_code == 200
    with server.client() as c:
        assert c.post("/v1/auth/login", json={"email": email, "password": PASSWORD}).status_code == 200
