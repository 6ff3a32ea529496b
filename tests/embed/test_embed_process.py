"""What happens when the Python process ends: child interpreters create
capsules and never destroy them.

What the product guarantees:
- normal exit (end of script, ``sys.exit``, an uncaught exception): the atexit
  hook destroys every capsule of the process — running and paused — so nothing
  is left: no QEMU, no network namespace, no capsule or snapshot directory;
- SIGKILL: QEMU dies with the process (parent-death signal, within moments);
  namespaces and directories stay until the next host start (any wrenn process:
  this binding, ``wrenn rm``, the server), whose startup sweep removes them.
  (A capsule that was *paused* when its process was killed is kept on purpose,
  to be adopted with ``Capsule.connect(id)``; the children here do not pause
  before SIGKILL.)
Also: Ctrl-C interrupts a blocking call and kills the command it waited for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

DATA_DIR = os.environ.get("WRENN_DATA_DIR", "/var/lib/wrenn")

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from wrenn_embed import Capsule
    mode = sys.argv[1]
    caps = [Capsule(template="minimal", memory_mb=256) for _ in range(2)]
    caps[1].keep()  # not destroyed by GC, only at exit
    if mode == "exit":
        paused = Capsule(template="minimal", memory_mb=256)
        paused.files.write("/tmp/x", "x")
        paused.pause()
        caps.append(paused)
    out = []
    for c in caps:
        with open(os.path.join(os.environ.get("WRENN_DATA_DIR", "/var/lib/wrenn"), "capsules", c.id, "state.json")) as f:
            st = json.load(f)
        out.append({"id": c.id, "netns": (st.get("slot") or {}).get("netns"), "vmm_pid": st.get("vmm_pid"),
                    "status": st["status"]})
    print(json.dumps(out), flush=True)
    if mode == "hang":
        time.sleep(600)
    # mode "exit": leave without destroying anything
    """
)


def qemu_pids_for(ids):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(f"wrenn-{i}" in cmd for i in ids):
            found.append((int(pid), cmd[:120]))
    return found


def netns_owner(netns):
    """The capsule (any process's) currently holding namespace ``netns``, if any."""
    root = os.path.join(DATA_DIR, "capsules")
    for cid in os.listdir(root):
        try:
            with open(os.path.join(root, cid, "state.json")) as f:
                st = json.load(f)
        except (OSError, ValueError):
            continue
        if (st.get("slot") or {}).get("netns") == netns:
            return cid
    return None


def leftovers(caps):
    """What is left of ``caps`` on this host."""
    ids = [c["id"] for c in caps]
    left = [f"qemu {p}: {cmd}" for p, cmd in qemu_pids_for(ids)]
    for c in caps:
        if c["vmm_pid"] and os.path.exists(f"/proc/{c['vmm_pid']}"):
            try:
                with open(f"/proc/{c['vmm_pid']}/cmdline", "rb") as f:
                    if c["id"].encode() in f.read():
                        left.append(f"vmm pid {c['vmm_pid']} alive")
            except OSError:
                pass
        for d in ("capsules", "snapshots"):
            if os.path.exists(os.path.join(DATA_DIR, d, c["id"])):
                left.append(f"{d}/{c['id']}")
        ns = c["netns"]
        # A namespace name is a slot index; it may be reused by another capsule since.
        if ns and os.path.exists(f"/run/netns/{ns}") and netns_owner(ns) in (None, *ids):
            left.append(f"/run/netns/{ns}")
    return left


def run_child(mode):
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_normal_exit_destroys_everything():
    p = run_child("exit")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    caps = json.loads(out.strip().splitlines()[-1])
    assert len(caps) == 3 and caps[2]["status"] == "paused"
    # nothing left, without any sweep: atexit destroyed them before the process ended
    assert leftovers(caps) == []


def test_sigkill_vms_die_and_next_start_sweeps():
    p = run_child("hang")
    line = p.stdout.readline()
    assert line, p.stderr.read()
    caps = json.loads(line)
    ids = [c["id"] for c in caps]
    assert len(qemu_pids_for(ids)) == 2
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    p.stdout.close()
    p.stderr.close()

    deadline = time.monotonic() + 10
    while qemu_pids_for(ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids_for(ids) == [], "QEMU outlived its killed parent"

    # the next host start sweeps directories and namespaces of the dead process
    sweep = subprocess.run(
        [sys.executable, "-c", "import json, wrenn_embed; print(json.dumps(wrenn_embed.host_info()['sweep']))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sweep.returncode == 0, sweep.stderr
    report = json.loads(sweep.stdout.strip().splitlines()[-1])
    # (Another wrenn process starting meanwhile may have swept them first.)
    assert leftovers(caps) == [], report


def test_ctrl_c_interrupts_a_blocking_call():
    script = textwrap.dedent(
        """
        import os, signal, threading, time
        from wrenn_embed import Capsule
        c = Capsule(template="minimal", memory_mb=256)
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t = time.monotonic()
        try:
            c.commands.run("sleep 40", timeout=60)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted after", round(time.monotonic() - t, 1))
        time.sleep(0.5)
        print("left:", [p.args for p in c.commands.list() if p.args[-1:] == ["sleep 40"]])
        print("still usable:", c.commands.run("echo yes").stdout.strip())
        print("id:", c.id)
        # Ctrl-C during a create: the create finishes in the background and the
        # capsule nobody received is destroyed.
        threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            Capsule(template="minimal", memory_mb=256)
            print("create not interrupted")
        except KeyboardInterrupt:
            pass
        deadline = time.monotonic() + 15
        while len(Capsule.list()) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        print("capsules after interrupted create:", len(Capsule.list()))
        """
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    assert r.returncode == 0, r.stderr
    # Nothing of the child is left: neither its capsule nor the one of the create
    # it interrupted (destroyed at exit once that create ended).
    root = os.path.join(DATA_DIR, "capsules")
    for cid in os.listdir(root):
        try:
            with open(os.path.join(root, cid, "state.json")) as f:
                owner = json.load(f).get("owner", {}).get("pid")
        except (OSError, ValueError):
            continue
        assert owner != p.pid, f"capsule {cid} of the exited child is left"
    lines = dict(line.split(":", 1) if ":" in line else (line, "") for line in r.stdout.splitlines())
    assert any(line.startswith("interrupted after") for line in r.stdout.splitlines()), r.stdout
    secs = float(r.stdout.split("interrupted after")[1].split()[0])
    assert secs < 3, r.stdout
    assert lines["left"].strip() == "[]", r.stdout
    assert lines["still usable"].strip() == "yes"
    assert lines["capsules after interrupted create"].strip() == "1", r.stdout
    cid = lines["id"].strip()
    assert not os.path.exists(os.path.join(DATA_DIR, "capsules", cid))


def test_a_bad_disk_setting_in_the_environment_is_refused_by_name():
    code = textwrap.dedent(
        """
        from wrenn_embed import Capsule, InvalidArgumentError
        try:
            Capsule(template="minimal")
        except InvalidArgumentError as e:
            print("refused:", e)
        else:
            print("accepted")
        """
    )
    env = dict(os.environ, WRENN_DISK_OVERCOMMIT="0.5")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused:"), out.stdout
    assert "WRENN_DISK_OVERCOMMIT" in out.stdout and "from 1 to 100" in out.stdout, out.stdout
