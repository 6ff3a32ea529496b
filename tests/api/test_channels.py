"""Notification channels (`/v1/channels`): a webhook receiver started here gets the
team's lifecycle events, signed (`X-Wrenn-Signature: sha256=HMAC(secret, timestamp +
"." + body)`); a failing receiver is retried with backoff until it answers; the test
send; the channel API's checks and tenancy; and a server that keeps channels off
private addresses by default.

The session servers allow loopback receivers (`--channels-allow-private-addresses`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ADMIN_KEY

SECRET = "whsec_test_" + "s" * 20
LIFECYCLE = ["capsule.created", "capsule.running", "capsule.paused", "capsule.destroyed"]


class Receiver:
    """An HTTP endpoint on loopback that records what it is sent (header names in lower
    case); the first `fail` requests are answered 500."""

    def __init__(self, fail: int = 0):
        self.requests: list[dict] = []
        self.fail = fail
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                                           "at": time.monotonic()})
                    failing = outer.fail > 0
                    if failing:
                        outer.fail -= 1
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/wrenn?src=test"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def events(self, resource: str | None = None) -> list[dict]:
        with self.lock:
            got = list(self.requests)
        out = []
        for r in got:
            p = json.loads(r["body"])
            if resource is None or (p.get("resource") or {}).get("id") == resource:
                out.append({**r, "payload": p})
        return out

    def wait(self, pred, timeout: float = 60, what: str = "events"):
        deadline = time.monotonic() + timeout
        while True:
            got = pred()
            if got:
                return got
            assert time.monotonic() < deadline, f"receiver: no {what} within {timeout}s; got {self.events()}"
            time.sleep(0.2)


def verify(req: dict, secret: str) -> None:
    h = req["headers"]
    ts, sig = h["x-wrenn-timestamp"], h["x-wrenn-signature"]
    want = "sha256=" + hmac.new(secret.encode(), ts.encode() + b"." + req["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(sig, want), (sig, want)
    assert h["content-type"] == "application/json"
    assert h["x-wrenn-delivery"].startswith("dlv-")


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def make_channel(u, url: str, events=LIFECYCLE, **extra) -> dict:
    body = {"name": "hook-" + uuid.uuid4().hex[:8], "provider": "webhook",
            "config": {"url": url, "secret": SECRET}, "events": events, **extra}
    r = u.post("/v1/channels", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def wait_status(c, cid: str, want: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while c.get(f"/v1/capsules/{cid}").json()["status"] != want:
        assert time.monotonic() < deadline, f"capsule {cid} never {want}"
        time.sleep(0.3)


def test_webhook_gets_signed_lifecycle_events(server, receiver):
    with server.admin_user() as u:
        ch = make_channel(u, receiver.url)
        assert ch["secret"] == SECRET
        assert ch["config"] == {"url": f"{receiver.url.split('/hooks')[0]}/…"}
        try:
            with server.admin() as c:
                r = c.post("/v1/capsules", json={"template": "minimal", "timeout_sec": 0})
                assert r.status_code == 201, r.text
                cid = r.json()["id"]
                wait_status(c, cid, "running")
                assert c.post(f"/v1/capsules/{cid}/pause").status_code == 200
                wait_status(c, cid, "paused")
                assert c.post(f"/v1/capsules/{cid}/resume").status_code == 200
                wait_status(c, cid, "running")
                assert c.delete(f"/v1/capsules/{cid}").status_code == 204
            want = ["capsule.created", "capsule.running", "capsule.paused", "capsule.running", "capsule.destroyed"]
            got = receiver.wait(lambda: len(receiver.events(cid)) >= len(want) and receiver.events(cid), what="lifecycle")
            time.sleep(1)  # nothing more comes
            # Deliveries are not ordered among themselves: their timestamps are (a create
            # is created and running at one moment).
            rank = {"capsule.created": 0, "capsule.running": 1}
            got = sorted(receiver.events(cid),
                         key=lambda e: (e["payload"]["timestamp"], rank.get(e["payload"]["type"], 2)))
            assert [e["payload"]["type"] for e in got] == want, [e["payload"] for e in got]
            for e in got:
                verify(e, SECRET)
                assert e["path"] == "/hooks/wrenn?src=test"
                assert e["headers"]["x-wrenn-event"] == e["payload"]["type"]
                assert e["payload"]["resource"] == {"id": cid, "type": "capsule"}
            assert len({e["headers"]["x-wrenn-delivery"] for e in got}) == len(got)
            paused = next(e for e in got if e["payload"]["type"] == "capsule.paused")
            assert paused["payload"]["metadata"]["to"] == "paused"
            # A forged body does not verify.
            forged = {**got[0], "body": got[0]["body"].replace(b"capsule", b"Capsule", 1)}
            with pytest.raises(AssertionError):
                verify(forged, SECRET)
            # The deliveries as the API shows them.
            ds = u.get(f"/v1/channels/{ch['id']}/deliveries").json()
            mine = [d for d in ds if (d["payload"].get("resource") or {}).get("id") == cid]
            assert len(mine) == len(want)
            assert all(d["status"] == "delivered" and d["attempts"] == 1 and d["last_status"] == 200 for d in mine), mine
        finally:
            assert u.delete(f"/v1/channels/{ch['id']}").status_code == 204


def test_failing_receiver_is_retried(server):
    failing = Receiver(fail=2)
    try:
        with server.admin_user() as u:
            ch = make_channel(u, failing.url, events=["capsule.created"])
            with server.admin() as c:
                r = c.post("/v1/capsules", json={"template": "minimal", "timeout_sec": 0})
                assert r.status_code == 201, r.text
                cid = r.json()["id"]
            try:
                # 500, 500, then 200: three attempts of one delivery, 2 s and 4 s apart.
                got = failing.wait(lambda: len(failing.events(cid)) >= 3 and failing.events(cid), timeout=90,
                                   what="three attempts")
                assert len({e["headers"]["x-wrenn-delivery"] for e in got}) == 1
                for e in got:
                    verify(e, SECRET)
                deadline = time.monotonic() + 30
                while True:
                    ds = u.get(f"/v1/channels/{ch['id']}/deliveries").json()
                    d = next(d for d in ds if d["payload"]["resource"]["id"] == cid)
                    if d["status"] == "delivered" or time.monotonic() > deadline:
                        break
                    time.sleep(0.3)
                assert d["status"] == "delivered" and d["attempts"] == 3 and d["last_status"] == 200, d
                assert d["delivered_at"]
                # Backoff: the retries wait 2 s, then 4 s (at least).
                at = [e["at"] for e in got[:3]]
                assert at[1] - at[0] >= 1.8 and at[2] - at[1] >= 3.6, at
            finally:
                with server.admin() as c:
                    c.delete(f"/v1/capsules/{cid}")
                u.delete(f"/v1/channels/{ch['id']}")
    finally:
        failing.close()


def test_a_receiver_that_never_answers_well_fails_the_delivery(start_server):
    """Out of attempts: `failed`, with the last status and error (a server whose
    deliveries get two attempts)."""
    srv = start_server("channels-fail", args=("--channels-allow-private-addresses",))
    down = Receiver(fail=100)
    try:
        with srv.admin_user() as u:
            ch = make_channel(u, down.url, events=["capsule.created"])
            with srv.client(ADMIN_KEY) as c:
                cid = c.post("/v1/capsules", json={"template": "minimal", "timeout_sec": 0}).json()["id"]
            deadline = time.monotonic() + 120
            while True:
                ds = u.get(f"/v1/channels/{ch['id']}/deliveries").json()
                if ds and ds[0]["status"] == "failed":
                    break
                assert time.monotonic() < deadline, ds
                time.sleep(0.5)
            d = ds[0]
            assert d["attempts"] == 5 and d["last_status"] == 500, d
            assert "answered 500" in d["last_error"]
            assert len(down.events(cid)) == 5
            with srv.client(ADMIN_KEY) as c:
                c.delete(f"/v1/capsules/{cid}")
    finally:
        down.close()


def test_test_send_and_the_channel_api(server, receiver):
    with server.admin_user() as u:
        # The test send: signed with the given secret, nothing stored.
        r = u.post("/v1/channels/test", json={"provider": "webhook", "config": {"url": receiver.url, "secret": SECRET}})
        assert r.status_code == 200, r.text
        assert r.json() == {"ok": True, "status": 200}
        sent = receiver.wait(lambda: [e for e in receiver.events() if e["payload"]["type"] == "channel.test"])
        verify(sent[0], SECRET)
        # Chat providers get a line of text.
        r = u.post("/v1/channels/test", json={"provider": "slack", "config": {"url": receiver.url}})
        assert r.json()["ok"] is True
        slack = receiver.wait(lambda: [e for e in receiver.events() if "text" in e["payload"]])
        assert slack[0]["payload"] == {"text": "Wrenn: this channel works."}
        assert "x-wrenn-signature" not in slack[0]["headers"]
        # A receiver that is not there.
        r = u.post("/v1/channels/test", json={"provider": "webhook", "config": {"url": "http://127.0.0.1:1/x"}})
        assert r.status_code == 200 and r.json()["ok"] is False and "connect" in r.json()["error"]

        # Bad input.
        good = {"name": "n-" + uuid.uuid4().hex[:6], "provider": "webhook", "config": {"url": receiver.url},
                "events": ["capsule.paused"]}
        for bad, needle in [
            ({"provider": "pigeon"}, "unknown provider"),
            ({"provider": "telegram"}, "not supported"),
            ({"config": {"url": "ftp://example.com/"}}, "http(s)"),
            ({"config": {"url": "not a url"}}, "not a URL"),
            ({"config": {"url": receiver.url, "secret": "short"}}, "at least 16"),
            ({"config": {"url": receiver.url, "token": "x"}}, "unknown field"),
            ({"events": []}, "at least one"),
            ({"events": ["capsule.exploded"]}, "unknown event type"),
            ({"events": ["host.exploded"]}, "unknown event type"),
            ({"name": ""}, "name"),
        ]:
            r = u.post("/v1/channels", json={**good, **bad})
            assert r.status_code == 400, (bad, r.text)
            assert needle in r.json()["error"]["message"], (bad, r.text)
        # A generated secret, shown once.
        r = u.post("/v1/channels", json=good)
        assert r.status_code == 201, r.text
        ch = r.json()
        assert ch["secret"].startswith("whsec_") and ch["events"] == ["capsule.paused"]
        assert u.post("/v1/channels", json=good).status_code == 409
        got = u.get(f"/v1/channels/{ch['id']}").json()
        assert "secret" not in got and "hooks" not in json.dumps(got)
        assert ch["id"] in {c["id"] for c in u.get("/v1/channels").json()}
        # Changes.
        r = u.patch(f"/v1/channels/{ch['id']}", json={"events": ["capsule.created", "capsule.created"]})
        assert r.status_code == 200 and r.json()["events"] == ["capsule.created"]
        r = u.put(f"/v1/channels/{ch['id']}/config", json={"config": {"url": receiver.url}})
        assert r.status_code == 200 and r.json()["secret"].startswith("whsec_") and r.json()["secret"] != ch["secret"]
        # API keys do not manage channels; other teams do not see them.
        with server.admin() as k:
            assert k.get("/v1/channels").status_code == 401
        with server.client(None, Authorization=f"Bearer {server.other_token}") as o:
            assert o.get(f"/v1/channels/{ch['id']}").status_code == 404
            assert o.get(f"/v1/channels/{ch['id']}/deliveries").status_code == 404
            assert o.patch(f"/v1/channels/{ch['id']}", json={"name": "x"}).status_code == 404
            assert o.delete(f"/v1/channels/{ch['id']}").status_code == 404
            assert ch["id"] not in {c["id"] for c in o.get("/v1/channels").json()}
        assert u.delete(f"/v1/channels/{ch['id']}").status_code == 204
        assert u.get(f"/v1/channels/{ch['id']}").status_code == 404


def test_private_addresses_are_refused_by_default(start_server, receiver):
    srv = start_server("channels-private")
    with srv.admin_user() as u:
        for url in [receiver.url, "http://169.254.169.254/latest/meta-data", "http://[::1]:8080/"]:
            r = u.post("/v1/channels", json={"name": "p", "provider": "webhook", "config": {"url": url},
                                              "events": ["capsule.created"]})
            assert r.status_code == 400, r.text
            assert "not a public address" in r.json()["error"]["message"]
            r = u.post("/v1/channels/test", json={"provider": "webhook", "config": {"url": url}})
            assert r.status_code == 400, r.text
    assert receiver.events() == []
