"""The reliability driver: tries to break a real `wrenn serve` and counts what breaks.

Three phases, each against one server (SQLite, its own data directory):

1. **Kill -9 during work.** A seeded sequence of mixed lifecycle operations through the
   /v1 API (create, exec, write, pause, resume, fork, snapshot, destroy); at chosen
   operations the server is killed with SIGKILL while the operation is in flight, then
   restarted. After every restart: every capsule the API lists as running answers,
   every QEMU of the data directory belongs to such a capsule, every network namespace,
   host veth, slot lease and capsule directory created since the start belongs to a
   listed capsule, and every capsule that was paused before the kill resumes with its
   files. At the end everything is destroyed and nothing may be left. Then the same with
   the control plane and the host agent as two processes (`wrenn serve --agent` and
   `wrenn agent`), kills alternating between them; after an agent restart the
   control plane must catch up by itself (it sees the new agent instance).
2. **Faults.** A VMM killed in the middle of a pause (typed error, the capsule is
   marked failed and its resources released), and a frozen guest (its VMM stopped with
   SIGSTOP: exec times out with a typed error, the capsule works again once thawed).
3. **Load.** Many concurrent API clients for a while, plus capsules created and
   destroyed in a loop: every answer that is not 2xx or 429 is an error; p99 of the
   clients' requests is reported.

`python -m tests.chaos.chaos --ops 100 --kills 10 --clients 200 --load-secs 60
--churn 20` prints one JSON line of figures (kill_points, leaks, lost_paused,
load_errors, load_p99_ms, ...) and the problems found; tests/chaos/test_chaos.py runs
a bounded form.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
IMAGES = os.environ.get("WRENN_DATA_DIR", "/var/lib/wrenn")
ADMIN_KEY = "wrn_" + "c4a05" * 6 + "ab"
NETNS_PREFIX = "wrenn-ns-"
# Host settings come from the driver's arguments only (another suite of the same pytest
# run may have set some in this process's environment; `serve --agent` refuses them).
HOST_SETTINGS_ENV = ("WRENN_DISK_OVERCOMMIT", "WRENN_DISK_RESERVE_MB", "WRENN_POOLS", "WRENN_POOL_MEMORY_MB", "WRENN_DNS_UPSTREAM", "WRENN_MAX_CONCURRENT_STARTS", "WRENN_JAIL_UIDS", "WRENN_AGENT", "WRENN_AGENTS", "WRENN_HOST_ID")
VETH_PREFIX = "wrenn-veth-"
SLOT_DIR = "/run/wrenn/net"
# Tag of the background process every capsule of the run starts with.
KEEPER = "chaos-keeper"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_data_dir(tag: str) -> str:
    d = f"/var/lib/wrenn-test/{tag}-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(d, "templates"))
    os.symlink(os.path.join(IMAGES, "images"), os.path.join(d, "images"))
    for t in sorted(os.listdir(os.path.join(IMAGES, "templates"))):
        src = os.path.join(IMAGES, "templates", t)
        if os.path.isfile(os.path.join(src, "rootfs.img")) and not t.startswith("snap-"):
            os.symlink(src, os.path.join(d, "templates", t))
    return d


@dataclass
class Server:
    binary: str
    data_dir: str
    extra: list = field(default_factory=list)
    # What the host is started with; `--agent URL` to drive a `wrenn agent` instead.
    host_args: list = field(default_factory=lambda: ["--disk-overcommit", "4"])
    database_url: str | None = None
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in HOST_SETTINGS_ENV}
        env.pop("DATABASE_URL", None)
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        env["WRENN_BOOTSTRAP_API_KEY"] = ADMIN_KEY
        env["WRENN_BOOTSTRAP_ADMIN_PASSWORD"] = "chaos admin password"
        env.setdefault("WRENN_LOG", "info,tower_http=warn")
        log = open(os.path.join(self.data_dir, "serve.log"), "ab")
        self.proc = subprocess.Popen(
            [
                self.binary, "--data-dir", self.data_dir, "serve",
                "--listen", f"127.0.0.1:{self.port}",
                "--rate-limit", "0", "--auth-rate-limit", "0", "--auth-account-rate-limit", "0",
                "--team-max-capsules", "0", "--team-max-vcpus", "0", "--team-max-memory-mb", "0",
                "--team-max-disk-mb", "0", "--team-max-snapshots", "0",
                *self.host_args,
                *self.extra,
            ],
            env=env, stdout=log, stderr=log,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wrenn serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("wrenn serve did not become healthy:\n" + self.tail())

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, n: int = 30) -> str:
        try:
            with open(os.path.join(self.data_dir, "serve.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def client(self, timeout: float = 180) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": ADMIN_KEY}, timeout=timeout)


@dataclass
class Agent:
    """A `wrenn agent` (this machine's capsules behind gRPC) for `wrenn serve --agent`."""

    binary: str
    data_dir: str
    extra: list = field(default_factory=lambda: ["--disk-overcommit", "4"])
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _log(self) -> str:
        try:
            with open(os.path.join(self.data_dir, "agent.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in HOST_SETTINGS_ENV}
        env.setdefault("WRENN_LOG", "info")
        log = open(os.path.join(self.data_dir, "agent.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--data-dir", self.data_dir, "agent", "--listen",
             f"127.0.0.1:{self.port}", *self.extra],
            env=env, stdout=log, stderr=log,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wrenn agent exited with {self.proc.returncode}:\n{self.tail()}")
            if self._log().count("wrenn agent listening on ") > self.starts:
                self.starts += 1
                return
            time.sleep(0.2)
        raise RuntimeError("wrenn agent did not come up:\n" + self.tail())

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, n: int = 30) -> str:
        return "".join(self._log().splitlines(keepends=True)[-n:])


# ---------------------------------------------------------------------------
# What exists on the host


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(NETNS_PREFIX)}


def _veths() -> set[str]:
    return {n for n in os.listdir("/sys/class/net") if n.startswith(VETH_PREFIX)}


def _slot_leases() -> set[str]:
    try:
        return {n for n in os.listdir(SLOT_DIR) if n.startswith("slot-")}
    except FileNotFoundError:
        return set()


def _qemus(data_dir: str) -> set[int]:
    """QEMU processes working on this data directory's files."""
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in os.path.basename(argv[0]) and any(data_dir.encode() in a for a in argv):
            found.add(int(pid))
    return found


def _slot_owner_alive(index: str, mine: int | None) -> bool:
    """Whether slot `index` is held by a live process other than `mine` (another Wrenn
    process on this machine: not ours to judge)."""
    try:
        with open(os.path.join(SLOT_DIR, f"slot-{index}")) as f:
            pid, start = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError):
        return False
    if pid == mine:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rfind(")") + 1:].split()[19]) == start
    except (OSError, ValueError, IndexError):
        return False


def _host_view(mine: int | None = None) -> dict:
    """Network namespaces, veths and slot leases, leaving out those of slots another live
    process holds."""
    def ours(name: str, prefix: str) -> bool:
        return not _slot_owner_alive(name[len(prefix):], mine)
    return {
        "netns": {n for n in _netns() if ours(n, NETNS_PREFIX)},
        "veths": {n for n in _veths() if ours(n, VETH_PREFIX)},
        "slots": {n for n in _slot_leases() if ours(n, "slot-")},
    }


def _state(data_dir: str, cid: str) -> dict | None:
    try:
        with open(os.path.join(data_dir, "capsules", cid, "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# The model: what the driver believes each capsule holds


@dataclass
class Capsule:
    id: str
    files: dict = field(default_factory=dict)
    # Files as of its last *completed* pause while it is paused: what must survive a kill.
    paused_files: dict | None = None
    # Files as of the last completed pause, kept after a resume: a capsule that ran when
    # the server died comes back as of that pause (Capsules::recover).
    last_pause_files: dict | None = None


class Driver:
    def __init__(self, srv: Server, seed: int, log=print, agent: Agent | None = None):
        self.srv = srv
        # With an agent, the capsules live in its process and data directory, and a
        # kill hits either process.
        self.agent = agent
        self.rng = random.Random(seed)
        self.caps: dict[str, Capsule] = {}
        self.problems: list[str] = []
        self.log = log
        self.counts = {"ops": 0, "kill_points": 0, "agent_kills": 0, "leaks": 0, "lost_paused": 0,
                       "snapshots": 0, "paused_checked": 0}
        self.snapshots: list[str] = []
        # Operations that acted (found a capsule in the state they need), by kind.
        self.done: dict[str, int] = {}
        # The operation in flight and the capsule it acts on (for a kill's check).
        self.inflight: tuple[str, str | None] = ("", None)

    @property
    def host_dir(self) -> str:
        return self.agent.data_dir if self.agent else self.srv.data_dir

    def host_pid(self) -> int | None:
        proc = (self.agent or self.srv).proc
        return proc.pid if proc else None

    def _settled(self) -> bool:
        """The control plane has caught up with a restarted agent: no row mid-operation,
        every capsule listed running has a live VMM."""
        with self.srv.client(30) as c:
            listed = c.get("/v1/capsules").json()
        for x in listed:
            if x["status"] in ("starting", "pausing", "resuming", "stopping"):
                return False
            if x["status"] == "running":
                pid = (_state(self.host_dir, x["id"]) or {}).get("vmm_pid")
                if not pid or not os.path.exists(f"/proc/{pid}"):
                    return False
        return True

    def problem(self, what: str) -> None:
        self.log("PROBLEM: " + what)
        self.problems.append(what)

    # -- operations -------------------------------------------------------------------

    def _create(self, c: httpx.Client) -> None:
        r = c.post("/v1/capsules", json={"template": "minimal", "timeout_sec": 3600})
        if r.status_code != 201:
            raise RuntimeError(f"create: {r.status_code} {r.text}")
        cid = r.json()["id"]
        self.caps[cid] = Capsule(cid)
        # A process that must survive every pause, resume and fork of the capsule.
        r = c.post(f"/v1/capsules/{cid}/exec",
                   json={"cmd": "/bin/sleep", "args": ["86400"], "background": True, "tag": KEEPER})
        if r.status_code != 202:
            raise RuntimeError(f"starting the keeper process: {r.status_code} {r.text}")

    def _pick(self, status: str | None = None) -> Capsule | None:
        ids = sorted(self.caps)
        self.rng.shuffle(ids)
        for cid in ids:
            if status is None or self._status(cid) == status:
                self.inflight = (self.inflight[0], cid)
                return self.caps[cid]
        return None

    def _status(self, cid: str) -> str | None:
        with self.srv.client(30) as c:
            r = c.get(f"/v1/capsules/{cid}")
        return r.json().get("status") if r.status_code == 200 else None

    def op(self, kind: str, c: httpx.Client) -> None:
        """One operation; raises on an answer the API should not give."""
        if kind == "create" or not self.caps:
            self._create(c)
            self.done["create"] = self.done.get("create", 0) + 1
            return
        acted = self._op(kind, c)
        if acted:
            self.done[kind] = self.done.get(kind, 0) + 1

    def _op(self, kind: str, c: httpx.Client) -> bool:
        """Returns whether a capsule in the state `kind` needs was found."""
        if kind == "exec":
            cap = self._pick("running")
            if not cap:
                return False
            r = c.post(f"/v1/capsules/{cap.id}/exec", json={"cmd": "/bin/sh", "args": ["-c", "echo ok"]})
            if r.status_code != 200 or r.json().get("stdout") != "ok\n":
                raise RuntimeError(f"exec: {r.status_code} {r.text}")
        elif kind == "write":
            cap = self._pick("running")
            if not cap:
                return False
            path, data = f"/tmp/chaos-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
            r = c.post(f"/v1/capsules/{cap.id}/files/write", files={"path": (None, path), "file": ("f", data.encode())})
            if r.status_code != 204:
                raise RuntimeError(f"write: {r.status_code} {r.text}")
            cap.files[path] = data
            self.log(f"wrote {path} to {cap.id}")
        elif kind == "pause":
            cap = self._pick("running")
            if not cap:
                return False
            files = dict(cap.files)
            r = c.post(f"/v1/capsules/{cap.id}/pause")
            if r.status_code != 200:
                raise RuntimeError(f"pause: {r.status_code} {r.text}")
            cap.paused_files = files
            cap.last_pause_files = dict(files)
            self.log(f"paused {cap.id} with {sorted(files)}")
        elif kind == "resume":
            cap = self._pick("paused")
            if not cap:
                return False
            r = c.post(f"/v1/capsules/{cap.id}/resume")
            if r.status_code != 200:
                raise RuntimeError(f"resume: {r.status_code} {r.text}")
            cap.paused_files = None
            self.log(f"resumed {cap.id}")
        elif kind == "fork":
            cap = self._pick("running")
            if not cap:
                return False
            r = c.post(f"/sandboxes/{cap.id}/fork", json={"count": 1, "timeout": 3600})
            if r.status_code not in (200, 201):
                raise RuntimeError(f"fork: {r.status_code} {r.text}")
            body = r.json()
            for child in body if isinstance(body, list) else [body]:
                cid = child.get("sandboxID") or child.get("id")
                if cid:
                    self.caps[cid] = Capsule(cid, files=dict(cap.files))
        elif kind == "snapshot":
            cap = self._pick("running")
            if not cap:
                return False
            name = f"chaos-{uuid.uuid4().hex[:8]}"
            r = c.post("/v1/snapshots", json={"sandbox_id": cap.id, "name": name})
            if r.status_code != 201:
                raise RuntimeError(f"snapshot: {r.status_code} {r.text}")
            self.snapshots.append(name)
            self.counts["snapshots"] += 1
        elif kind == "destroy":
            cap = self._pick()
            if not cap:
                return False
            r = c.delete(f"/v1/capsules/{cap.id}")
            if r.status_code not in (204, 404):
                raise RuntimeError(f"destroy: {r.status_code} {r.text}")
            self.caps.pop(cap.id, None)
        return True

    KINDS = ["exec", "write", "write", "pause", "resume", "resume", "fork", "snapshot", "destroy", "create"]

    def next_kind(self) -> str:
        live = len(self.caps)
        paused = sum(1 for c in self.caps.values() if c.paused_files is not None)
        if live < 2:
            return "create"
        if live > 5:
            return self.rng.choice(["destroy", "pause", "exec", "write"])
        # Kills should find paused capsules often: that is what must survive them.
        if paused == 0 and self.rng.random() < 0.5:
            return "pause"
        return self.rng.choice(self.KINDS)

    # -- kill and check ---------------------------------------------------------------

    def killed_during(self, kind: str) -> None:
        """Starts `kind` and kills the server while it is in flight."""
        errors = []

        def run():
            try:
                with self.srv.client() as c:
                    self.op(kind, c)
            except Exception as e:  # noqa: BLE001 - a killed server breaks the request
                errors.append(e)

        self.inflight = (kind, None)
        # With an agent, kills alternate between it (first) and the control plane.
        victim = self.agent if self.agent and self.counts["kill_points"] % 2 == 0 else self.srv
        t = threading.Thread(target=run)
        t.start()
        time.sleep(self.rng.uniform(0.0, 1.2))
        victim.kill9()
        t.join(timeout=120)
        self.counts["kill_points"] += 1
        name = "wrenn agent" if victim is self.agent else "wrenn serve"
        self.log(f"killed {name} during {kind} ({'cut short' if errors else 'it had finished'})")
        victim.start()
        if self.agent:
            if victim is self.agent:
                self.counts["agent_kills"] += 1
            # The control plane catches up by itself: with a restarted agent when it sees
            # the new instance, after its own restart with what the agent finished meanwhile.
            deadline = time.monotonic() + 60
            while not self._settled() and time.monotonic() < deadline:
                time.sleep(0.25)

    def check(self, baseline: dict, when: str) -> None:
        """The host and the API agree; nothing is held that no capsule owns."""
        with self.srv.client() as c:
            listed = {x["id"]: x for x in c.get("/v1/capsules").json()}
        live = {cid: x for cid, x in listed.items() if x["status"] not in ("stopped", "error")}
        running = {cid for cid, x in live.items() if x["status"] == "running"}
        # The model follows the API for capsules a kill cut short.
        for cid in list(self.caps):
            if cid not in live:
                cap = self.caps.pop(cid)
                if cap.paused_files is not None:
                    self.counts["lost_paused"] += 1
                    self.problem(f"{when}: paused capsule {cid} is gone ({listed.get(cid, {}).get('status')})")
        for cid in live:
            if cid not in self.caps:
                self.caps[cid] = Capsule(cid)
        states = {cid: _state(self.host_dir, cid) for cid in live}
        want_netns = {((s or {}).get("slot") or {}).get("netns") for cid, s in states.items() if cid in running}
        want_veth = {((s or {}).get("slot") or {}).get("host_veth") for cid, s in states.items() if cid in running}
        want_pids = {(s or {}).get("vmm_pid") for cid, s in states.items() if cid in running}
        want_slots = {f"slot-{((s or {}).get('slot') or {}).get('index')}" for cid, s in states.items() if cid in running}
        now = _host_view(self.host_pid())
        leaks = []
        for what, extra in (
            ("netns", now["netns"] - baseline["netns"] - want_netns),
            ("veth", now["veths"] - baseline["veths"] - want_veth),
            ("slot lease", now["slots"] - baseline["slots"] - want_slots),
            ("QEMU", _qemus(self.host_dir) - want_pids),
        ):
            for x in sorted(map(str, extra)):
                leaks.append(f"{what} {x}")
        cap_dir = os.path.join(self.host_dir, "capsules")
        for d in sorted(os.listdir(cap_dir)) if os.path.isdir(cap_dir) else []:
            if d not in live:
                leaks.append(f"capsule directory {d}")
        snap_dir = os.path.join(self.host_dir, "snapshots")
        for d in sorted(os.listdir(snap_dir)) if os.path.isdir(snap_dir) else []:
            if d not in live:
                leaks.append(f"snapshot directory {d}")
        for cid in running:
            st = states.get(cid)
            if not st or not st.get("vmm_pid") or not os.path.exists(f"/proc/{st['vmm_pid']}"):
                leaks.append(f"capsule {cid} listed running without a VMM")
        for x in leaks:
            self.counts["leaks"] += 1
            self.problem(f"{when}: leak: {x}")
        # Every capsule paused before the kill resumes with the files it had.
        with self.srv.client() as c:
            for cid in sorted(live):
                cap = self.caps[cid]
                if live[cid]["status"] == "paused":
                    r = c.post(f"/v1/capsules/{cid}/resume")
                    if r.status_code != 200:
                        self.counts["lost_paused"] += 1
                        self.problem(f"{when}: paused {cid} does not resume: {r.status_code} {r.text}")
                        continue
                    # Paused before the kill: as of that pause. Running (or pausing) when
                    # the server died: as of its last completed pause, or - for a pause
                    # the kill cut short but that committed - as it was.
                    choices = [cap.paused_files] if cap.paused_files is not None else [cap.last_pause_files]
                    if self.inflight == ("pause", cid) and cap.paused_files is None:
                        choices.append(cap.files)
                    choices = [c_ for c_ in choices if c_ is not None] or [{}]
                    found = {p: c.post(f"/v1/capsules/{cid}/files/read", json={"path": p}) for ch in choices for p in ch}
                    have = {p: r.text for p, r in found.items() if r.status_code == 200}
                    want = next((ch for ch in choices if all(have.get(p) == d for p, d in ch.items())), None)
                    if want is None:
                        self.counts["lost_paused"] += 1
                        self.problem(f"{when}: {cid} resumed without the files of its pause: wanted one of "
                                     f"{[sorted(ch) for ch in choices]}, has {sorted(have)}")
                        want = {p: d for p, d in have.items()}
                    cap.files = dict(want)
                    cap.paused_files = None
                    self.counts["paused_checked"] += 1
                    procs = c.get(f"/v1/capsules/{cid}/processes")
                    tags = [p.get("tag") for p in procs.json().get("processes", [])] if procs.status_code == 200 else []
                    if KEEPER not in tags:
                        self.counts["lost_paused"] += 1
                        self.problem(f"{when}: {cid} resumed without its process {KEEPER} ({procs.status_code} {tags})")
                elif live[cid]["status"] == "running":
                    r = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/true"})
                    if r.status_code != 200:
                        self.counts["leaks"] += 1
                        self.problem(f"{when}: running {cid} does not answer: {r.status_code} {r.text}")

    def teardown(self, baseline: dict) -> None:
        with self.srv.client() as c:
            for x in c.get("/v1/capsules").json():
                if x["status"] not in ("stopped",):
                    c.delete(f"/v1/capsules/{x['id']}")
            for name in self.snapshots:
                c.delete(f"/v1/snapshots/{name}")
            left = [x for x in c.get("/v1/capsules").json() if x["status"] != "stopped"]
        for x in left:
            self.counts["leaks"] += 1
            self.problem(f"teardown: capsule {x['id']} still {x['status']}")
        self.caps.clear()
        self.check(baseline, "after teardown")

    def run_kills(self, ops: int, kills: int) -> None:
        baseline = _host_view()
        kill_at = set(self.rng.sample(range(3, ops), min(kills, max(0, ops - 3))))
        with self.srv.client() as c:
            for i in range(ops):
                kind = self.next_kind()
                self.counts["ops"] += 1
                if i in kill_at:
                    self.killed_during(kind)
                    self.check(baseline, f"after kill #{self.counts['kill_points']} (during {kind})")
                    continue
                try:
                    self.op(kind, c)
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    self.problem(f"op {i} {kind}: {e}")
        self.teardown(baseline)


# ---------------------------------------------------------------------------
# Faults


def faults(srv: Server, log=print) -> dict:
    problems = []
    baseline = _host_view()
    with srv.client() as c:
        # A VMM killed in the middle of a pause.
        cid = c.post("/v1/capsules", json={"template": "minimal"}).json()["id"]
        pid = (_state(srv.data_dir, cid) or {}).get("vmm_pid")
        r = {}

        def pause():
            r["resp"] = c.post(f"/v1/capsules/{cid}/pause")

        t = threading.Thread(target=pause)
        t.start()
        time.sleep(0.3)
        if pid:
            os.kill(pid, signal.SIGKILL)
        t.join(timeout=120)
        resp = r.get("resp")
        status = c.get(f"/v1/capsules/{cid}").json().get("status")
        if resp is not None and resp.status_code == 200:
            # The pause won the race: it must have produced a resumable capsule.
            if c.post(f"/v1/capsules/{cid}/resume").status_code != 200:
                problems.append("pause that finished before the kill does not resume")
        elif resp is None or resp.status_code >= 500 and "code" not in resp.json().get("error", {}):
            problems.append(f"VMM killed mid-pause: untyped answer {resp and resp.text}")
        else:
            deadline = time.monotonic() + 30
            while status not in ("error", "stopped") and time.monotonic() < deadline:
                time.sleep(0.5)
                status = c.get(f"/v1/capsules/{cid}").json().get("status")
            if status not in ("error", "stopped"):
                problems.append(f"VMM killed mid-pause: capsule left {status}")
        c.delete(f"/v1/capsules/{cid}")

        # A frozen guest: the VMM stopped (SIGSTOP) answers nothing until thawed.
        cid = c.post("/v1/capsules", json={"template": "minimal"}).json()["id"]
        pid = (_state(srv.data_dir, cid) or {}).get("vmm_pid")
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            resp = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/true", "timeout_sec": 3}, timeout=120)
            took = time.monotonic() - t0
            err = resp.json().get("error", {}) if resp.status_code >= 400 else {}
            if resp.status_code < 400 or not err.get("code"):
                problems.append(f"exec in a frozen guest: {resp.status_code} {resp.text}")
            log(f"frozen guest: exec answered {resp.status_code} {err.get('code')} after {took:.1f} s")
        finally:
            os.kill(pid, signal.SIGCONT)
        resp = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/sh", "args": ["-c", "echo back"]})
        if resp.status_code != 200 or resp.json().get("stdout") != "back\n":
            problems.append(f"thawed guest does not answer: {resp.status_code} {resp.text}")
        c.delete(f"/v1/capsules/{cid}")
    time.sleep(1)
    now = _host_view(srv.proc.pid if srv.proc else None)
    for what in ("netns", "veths", "slots"):
        for x in sorted(now[what] - baseline[what]):
            problems.append(f"faults left {what} {x}")
    for x in _qemus(srv.data_dir):
        problems.append(f"faults left QEMU {x}")
    return {"fault_problems": problems}


def _typed(resp: httpx.Response) -> bool:
    """An error answer with a JSON body naming its kind."""
    try:
        body = resp.json()
    except ValueError:
        return False
    err = body.get("error", body) if isinstance(body, dict) else {}
    return isinstance(err, dict) and bool(err.get("code"))


def disk_full(binary: str, log=print) -> list[str]:
    """The data directory's filesystem (a small loop-mounted ext4) runs full: a pause and
    an upload are refused with 507 and change nothing; once there is room again the
    capsule pauses and resumes with its files."""
    problems = []
    root = f"/var/lib/wrenn-test/chaos-fs-{os.getpid()}"
    img, mnt = root + ".img", root
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["truncate", "-s", "3G", img], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
    srv = None
    try:
        data = os.path.join(mnt, "data")
        os.makedirs(os.path.join(data, "templates"))
        os.symlink(os.path.join(IMAGES, "images"), os.path.join(data, "images"))
        # Capsules hard-link their template's files: the template must be on this filesystem.
        subprocess.run(["cp", "-a", "--sparse=always", os.path.join(IMAGES, "templates", "minimal"),
                        os.path.join(data, "templates", "minimal")], check=True)
        srv = Server(binary, data, extra=["--disk-reserve-mb", "64"])
        srv.start()
        filler = os.path.join(mnt, "filler")
        with srv.client() as c:
            cid = c.post("/v1/capsules", json={"template": "minimal"}).json()["id"]
            r = c.post(f"/v1/capsules/{cid}/files/write", files={"path": (None, "/tmp/kept"), "file": ("f", b"kept")})
            if r.status_code != 204:
                problems.append(f"disk full: write before filling: {r.status_code} {r.text}")
            st = os.statvfs(mnt)
            free = st.f_bavail * st.f_frsize
            subprocess.run(["fallocate", "-l", str(max(0, free - (32 << 20))), filler], check=True)
            r = c.post(f"/v1/capsules/{cid}/pause")
            if r.status_code != 507 or not _typed(r):
                problems.append(f"disk full: pause answered {r.status_code} {r.text}")
            r = c.post(f"/v1/capsules/{cid}/files/write",
                       files={"path": (None, "/tmp/big"), "file": ("f", b"x" * (64 << 20))})
            if r.status_code != 507 or not _typed(r):
                problems.append(f"disk full: upload answered {r.status_code} {r.text[:200]}")
            r = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/cat", "args": ["/tmp/kept"]})
            if r.status_code != 200 or r.json().get("stdout") != "kept":
                problems.append(f"disk full: the capsule stopped working: {r.status_code} {r.text}")
            os.remove(filler)
            r = c.post(f"/v1/capsules/{cid}/pause")
            if r.status_code != 200:
                problems.append(f"disk full: pause with room again: {r.status_code} {r.text}")
            r = c.post(f"/v1/capsules/{cid}/resume")
            got = c.post(f"/v1/capsules/{cid}/files/read", json={"path": "/tmp/kept"})
            if r.status_code != 200 or got.text != "kept":
                problems.append(f"disk full: resume after: {r.status_code}, file {got.status_code} {got.text!r}")
            c.delete(f"/v1/capsules/{cid}")
        log(f"disk full: {'ok' if not problems else 'problems'}")
    finally:
        if srv:
            srv.stop()
        subprocess.run(["umount", mnt], check=False)
        shutil.rmtree(mnt, ignore_errors=True)
        if os.path.exists(img):
            os.remove(img)
    return problems


def db_outage(binary: str, log=print, secs: float = 10) -> list[str]:
    """The database (PostgreSQL) goes away for `secs`: answers meanwhile are typed errors
    (or successes), never a hang or a crash; afterwards everything works again."""
    problems = []
    pg_dir = f"/tmp/wrenn-postgres-chaos-{os.getpid()}"
    env = dict(os.environ, WRENN_PG_DIR=pg_dir)
    pg = os.path.join(REPO, "scripts", "postgres.sh")
    url = subprocess.run([pg], env=env, check=True, capture_output=True, text=True).stdout.strip()
    port = url.rsplit(":", 1)[1].split("/")[0]
    data = make_data_dir("chaos-pg")
    srv = Server(binary, data, database_url=url)
    try:
        srv.start()
        with srv.client(60) as c:
            cid = c.post("/v1/capsules", json={"template": "minimal"}).json()["id"]
            subprocess.run([pg, "stop"], env=env, check=True, capture_output=True)
            t_end = time.monotonic() + secs
            answers = []
            while time.monotonic() < t_end:
                for method, path, body in (
                    ("GET", "/v1/capsules", None),
                    ("POST", f"/v1/capsules/{cid}/exec", {"cmd": "/bin/true"}),
                    ("POST", "/v1/capsules", {"template": "minimal"}),
                ):
                    t0 = time.monotonic()
                    try:
                        r = c.request(method, path, json=body, timeout=30)
                    except httpx.HTTPError as e:
                        problems.append(f"db outage: {method} {path}: {e!r}")
                        continue
                    answers.append(r.status_code)
                    if r.status_code >= 400 and (r.status_code != 503 or not _typed(r)):
                        problems.append(f"db outage: {method} {path}: {r.status_code} {r.text[:200]} "
                                        "(wanted success or a typed 503)")
                    if r.status_code == 201 and path == "/v1/capsules":
                        c.delete(f"/v1/capsules/{r.json()['id']}")
                    if time.monotonic() - t0 > 20:
                        problems.append(f"db outage: {method} {path} took {time.monotonic() - t0:.0f} s")
                time.sleep(0.5)
            subprocess.run([pg], env=dict(env, WRENN_PG_PORT=port), check=True, capture_output=True)
            log(f"db outage: answers while down {sorted(set(answers))}")
            deadline = time.monotonic() + 30
            while True:
                r = c.post("/v1/capsules", json={"template": "minimal"})
                if r.status_code == 201 or time.monotonic() > deadline:
                    break
                time.sleep(1)
            if r.status_code != 201:
                problems.append(f"db outage: no create after the database returned: {r.status_code} {r.text}")
            else:
                c.delete(f"/v1/capsules/{r.json()['id']}")
            r = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/true"})
            if r.status_code != 200:
                problems.append(f"db outage: capsule unusable afterwards: {r.status_code} {r.text}")
            c.delete(f"/v1/capsules/{cid}")
            if srv.proc and srv.proc.poll() is not None:
                problems.append("db outage: the server exited")
    finally:
        srv.stop()
        subprocess.run([pg, "stop"], env=env, check=False, capture_output=True)
        shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    return problems


# ---------------------------------------------------------------------------
# Load


def load(srv: Server, clients: int, secs: float, churn: int, log=print) -> dict:
    stop = time.monotonic() + secs
    lat: list[float] = []
    churn_lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    with srv.client() as c:
        shared = c.post("/v1/capsules", json={"template": "minimal", "timeout_sec": 3600}).json()["id"]

    def client(i: int):
        paths = ["/health", "/v1/capsules", f"/v1/capsules/{shared}", "/v1/snapshots"]
        with srv.client(60) as c:
            n = 0
            while time.monotonic() < stop:
                n += 1
                path = f"/v1/capsules/{shared}/exec" if n % 10 == 0 else paths[(i + n) % len(paths)]
                t0 = time.monotonic()
                try:
                    if n % 10 == 0:
                        r = c.post(path, json={"cmd": "/bin/true"})
                    else:
                        r = c.get(path)
                    code = r.status_code
                except httpx.HTTPError as e:
                    code, r = 0, e
                dt = (time.monotonic() - t0) * 1000
                with lock:
                    lat.append(dt)
                    if not (200 <= code < 300 or code == 429):
                        errors.append(f"{path}: {code} {getattr(r, 'text', r)}"[:300])

    created = [0]

    def churner():
        with srv.client() as c:
            while time.monotonic() < stop:
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/capsules", json={"template": "minimal"})
                    ok = r.status_code == 201
                    if ok:
                        c.delete(f"/v1/capsules/{r.json()['id']}")
                        created[0] += 1
                    code = r.status_code
                except httpx.HTTPError as e:
                    ok, code, r = False, 0, e
                with lock:
                    if not ok and code != 429:
                        errors.append(f"churn create: {code} {getattr(r, 'text', r)}"[:300])
                    churn_lat.append((time.monotonic() - t0) * 1000)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads += [threading.Thread(target=churner) for _ in range(churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with srv.client() as c:
        c.delete(f"/v1/capsules/{shared}")
    def pct(v: list[float], q: float) -> float:
        v = sorted(v)
        return v[min(len(v) - 1, int(len(v) * q))] if v else 0.0
    for e in errors[:10]:
        log("PROBLEM: load: " + e)
    return {
        "load_requests": len(lat),
        "load_errors": len(errors),
        "load_p50_ms": round(pct(lat, 0.5), 1),
        "load_p99_ms": round(pct(lat, 0.99), 1),
        "churn_create_destroy_p50_ms": round(pct(churn_lat, 0.5), 1),
        "load_churned_capsules": created[0],
    }


def run_split(binary: str, ops: int, kills: int, seed: int, log=print) -> dict:
    """The kill phase with the control plane and the host agent as two processes
    (`wrenn serve --agent` + `wrenn agent`): kills alternate between them."""
    agent = Agent(binary, make_data_dir("chaos-agent"))
    srv = Server(binary, make_data_dir("chaos-cp"), host_args=["--agent", agent.url])
    try:
        agent.start()
        srv.start()
        d = Driver(srv, seed, log, agent=agent)
        d.run_kills(ops, kills)
        leftover = _qemus(agent.data_dir)
        return {**d.counts, "leaks": d.counts["leaks"] + len(leftover), "problems": d.problems,
                "done": d.done}
    finally:
        srv.stop()
        agent.stop()
        shutil.rmtree(srv.data_dir, ignore_errors=True)
        shutil.rmtree(agent.data_dir, ignore_errors=True)


def run(binary: str, ops: int, kills: int, clients: int, load_secs: float, churn: int, seed: int,
        log=print, split_ops: int = 0, split_kills: int = 0) -> dict:
    data_dir = make_data_dir("chaos")
    srv = Server(binary, data_dir)
    srv.start()
    try:
        d = Driver(srv, seed, log)
        t0 = time.monotonic()
        d.run_kills(ops, kills)
        kill_secs = time.monotonic() - t0
        f = faults(srv, log)
        f["fault_problems"] += disk_full(binary, log) + db_outage(binary, log)
        for p in f["fault_problems"]:
            log("PROBLEM: " + p)
        lo = load(srv, clients, load_secs, churn, log) if load_secs > 0 else {}
        split = {"ops": 0, "kill_points": 0, "agent_kills": 0, "leaks": 0, "lost_paused": 0,
                 "paused_checked": 0, "problems": [], "done": {}}
        if split_ops > 0:
            t1 = time.monotonic()
            split = run_split(binary, split_ops, split_kills, seed, log)
            log(f"two-process kill phase: {time.monotonic() - t1:.0f} s")
        base = _host_view()
        leftover = _qemus(data_dir)
        out = {
            "seed": seed,
            "ops": d.counts["ops"] + split["ops"],
            "kill_points": d.counts["kill_points"] + split["kill_points"],
            "agent_kill_points": split["agent_kills"],
            "leaks": d.counts["leaks"] + len(leftover) + split["leaks"],
            "lost_paused": d.counts["lost_paused"] + split["lost_paused"],
            "snapshots": d.counts["snapshots"],
            "paused_checked": d.counts["paused_checked"] + split["paused_checked"],
            "done": d.done,
            "split_done": split["done"],
            "kill_phase_s": round(kill_secs, 1),
            **lo,
            "fault_problems": len(f["fault_problems"]),
            "problems": d.problems + f["fault_problems"] + split["problems"],
            "host_after": {k: sorted(v) for k, v in base.items()},
        }
        return out
    finally:
        srv.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join(REPO, "target", "debug", "wrenn"))
    ap.add_argument("--ops", type=int, default=100)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--load-secs", type=float, default=60)
    ap.add_argument("--churn", type=int, default=20)
    ap.add_argument("--seed", type=int, default=int(os.environ.get("WRENN_CHAOS_SEED", "7")))
    ap.add_argument("--split-ops", type=int, default=50,
                    help="operations with `wrenn serve --agent` + `wrenn agent` (0: none)")
    ap.add_argument("--split-kills", type=int, default=6,
                    help="kills among them, each of one of the two processes")
    a = ap.parse_args()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    out = run(a.binary, a.ops, a.kills, a.clients, a.load_secs, a.churn, a.seed, log,
              split_ops=a.split_ops, split_kills=a.split_kills)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
