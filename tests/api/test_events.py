"""The live events stream (`GET /v1/events/stream`), read by the seed SDK's
`wrenn.events.stream()` with real guests.

A subscriber gets `connected`, then its team's lifecycle events as they happen, in
order, each naming its capsule (and carrying it as it is then); another team's
subscriber sees none of them, only keep-alive comments.
"""

from __future__ import annotations

import threading
import time

import httpx
from wrenn import Capsule, WrennClient

ACTIONS = ["capsule.create", "capsule.pause", "capsule.resume", "capsule.destroy"]


class Reader(threading.Thread):
    """Reads a team's stream through the SDK in the background."""

    def __init__(self):
        super().__init__(daemon=True)
        self.events = []
        self.connected = threading.Event()

    def run(self):
        try:
            with WrennClient() as wrenn:
                for ev in wrenn.events.stream():
                    self.events.append(ev)
                    if ev.event and ev.event.value == "connected":
                        self.connected.set()
        except httpx.HTTPError:
            # The stream outlives its test (a daemon thread): it ends when a later test
            # restarts the session's server.
            pass

    def of(self, capsule_id):
        return [e for e in list(self.events) if e.resource and e.resource.id == capsule_id]


class RawReader(threading.Thread):
    """Reads another team's stream line by line, with its key."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server = server
        self.lines = []
        self.connected = threading.Event()
        self.kept_alive = threading.Event()

    def run(self):
        headers = {"X-API-Key": self.server.other_key}
        with httpx.Client(base_url=self.server.url, headers=headers, timeout=60) as c:
            with c.stream("GET", "/v1/events/stream") as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                for line in r.iter_lines():
                    self.lines.append(line)
                    if line.startswith("event: connected"):
                        self.connected.set()
                    if line.startswith(":"):
                        self.kept_alive.set()
                        return


def test_a_team_sees_its_lifecycle_events_in_order(wrenn_env, server):
    mine, theirs = Reader(), RawReader(server)
    mine.start()
    theirs.start()
    assert mine.connected.wait(30) and theirs.connected.wait(30)

    cap = Capsule.create(template="minimal", wait=True)
    cid = cap.capsule_id
    cap.pause(wait=True)
    cap.resume(wait=True)
    cap.destroy()
    deadline = time.monotonic() + 60
    while "capsule.destroy" not in [e.event.value for e in mine.of(cid)]:
        assert time.monotonic() < deadline, [e.event for e in mine.of(cid)]
        time.sleep(0.2)

    seen = mine.of(cid)
    actions = [e for e in seen if e.event.value in ACTIONS]
    assert [e.event.value for e in actions] == ACTIONS
    for e in actions:
        assert e.outcome.value == "success", e
        assert e.resource.type == "capsule"
        assert e.actor.type.value == "api_key" and e.actor.id
        assert e.sandbox is not None and e.sandbox.id == cid
        assert e.timestamp is not None
    # Status changes come with them, in order, each from where the last one went.
    changes = [(e.metadata["from"], e.metadata["to"]) for e in seen if e.event.value == "capsule.state.changed"]
    assert ("running", "pausing") in changes and ("paused", "resuming") in changes, changes
    assert changes[-1][1] == "stopped", changes
    for (_, to), (frm, _) in zip(changes, changes[1:]):
        assert to == frm, changes
    # Events are in the order they happened.
    stamps = [e.timestamp for e in seen]
    assert stamps == sorted(stamps)

    # The other team saw nothing of it: its stream only kept the connection alive.
    assert theirs.kept_alive.wait(30), theirs.lines
    assert not any(cid in line for line in theirs.lines), theirs.lines
    assert not any(line.startswith("event: capsule") for line in theirs.lines), theirs.lines


def test_the_stream_needs_credentials(server):
    with server.client() as c:
        r = c.get("/v1/events/stream")
        assert r.status_code == 401, r.text
        assert "error" in r.json()
