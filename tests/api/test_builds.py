"""Template builds from recipes (`/v1/builds`), with real guests.

A recipe with every step kind builds into a snapshot template, and a capsule created
from it sees the files, environment, working directory and user the recipe set, with
its start command serving; a failing step stops the build with its exit code and log
tail; cancels and the time limit stop a build; bad recipes are refused before
anything runs; no build leaves a capsule behind; a killed server's build is failed
and cleaned by the next one.

The session server runs its pre- and post-build phases as `echo`s (the default
pre-build phase updates the package index over the network, which tests never reach).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
import uuid

import httpx
import pytest
from wrenn import Capsule

from conftest import ADMIN_KEY, BINARY

FINAL = {"success", "failed", "cancelled"}


def archive(files: dict[str, tuple[bytes, int]], gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for path, (data, mode) in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def submit(c: httpx.Client, config: dict, files: bytes | None = None) -> httpx.Response:
    if files is None:
        return c.post("/v1/builds", json=config)
    return c.post(
        "/v1/builds",
        data={"config": json.dumps(config)},
        files={"archive": ("files.tar.gz", files, "application/gzip")},
    )


def wait_build(c: httpx.Client, build_id: str, timeout: float = 600, until=FINAL) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = c.get(f"/v1/builds/{build_id}")
        assert r.status_code == 200, r.text
        b = r.json()
        if b["status"] in until:
            return b
        assert time.monotonic() < deadline, f"build still {b['status']}: {b.get('logs', [])[-5:]}"
        time.sleep(1)


def build_capsules(c: httpx.Client, build_id: str) -> list[dict]:
    """Live capsules a build made."""
    return [
        cap
        for cap in c.get("/v1/capsules").json()
        if (cap.get("metadata") or {}).get("wrenn.build") == build_id and cap["status"] != "stopped"
    ]


def log_text(b: dict, stream: str | None = None) -> str:
    return "\n".join(l["line"] for l in b["logs"] if stream is None or l["stream"] == stream)


def test_recipe_with_every_step_kind(wrenn_env, server):
    name = "built-" + uuid.uuid4().hex[:8]
    files = archive(
        {
            "app/hello.txt": (b"hello from the archive\n", 0o604),
            "app/bin/run.sh": (b"#!/bin/sh\necho running\n", 0o755),
            "single.conf": (b"key=value\n", 0o600),
        }
    )
    config = {
        "name": name,
        "base_template": "python",
        "recipe": [
            "RUN echo building; echo to-stderr >&2",
            'ENV GREETING="hello world" STAGE=built',
            "WORKDIR /srv/app",
            "COPY app/ /srv/app/",
            "COPY single.conf /etc/single.conf",
            "RUN test \"$GREETING\" = 'hello world' && pwd > where.txt && whoami >> where.txt",
            "USER user",
            "RUN whoami > /home/user/who.txt",
            "WORKDIR /home/user/work",
            "RUN --timeout=1m echo \"$STAGE\" > stage.txt",
            "START python3 -m http.server 8000",
        ],
        "healthcheck": "--interval=1s --timeout=5s --port=8000",
        "timeout_sec": 900,
    }
    with server.admin() as c:
        r = submit(c, config, files)
        assert r.status_code == 202, r.text
        queued = r.json()
        assert queued["id"].startswith("bld-")
        assert queued["status"] in {"pending", "running"}
        assert queued["total_steps"] == len(config["recipe"])
        b = wait_build(c, queued["id"])
        assert b["status"] == "success", (b.get("error"), log_text(b)[-3000:])
        assert b["current_step"] == b["total_steps"]
        assert b["default_user"] == "user"
        assert b["default_env"] == {"GREETING": "hello world", "STAGE": "built"}
        system = log_text(b, "system")
        assert "pre-build" in system and "post-build" in system
        assert f"step 1/{len(config['recipe'])}: RUN echo building" in system
        assert "ready after" in system
        assert "building" in log_text(b, "stdout")
        assert "pre-build phase" in log_text(b, "stdout")
        assert "to-stderr" in log_text(b, "stderr")
        # Paging through the log gives the same lines.
        first = c.get(f"/v1/builds/{b['id']}/logs", params={"limit": 3}).json()
        rest = c.get(f"/v1/builds/{b['id']}/logs", params={"offset": first["next_offset"]}).json()
        assert [l["line"] for l in first["logs"] + rest["logs"]] == [l["line"] for l in b["logs"]]
        assert rest["status"] == "success"
        # The build's capsule is gone; the template is listed.
        assert build_capsules(c, b["id"]) == []
        snaps = {t["name"]: t for t in c.get("/v1/snapshots").json()}
        assert snaps[name]["type"] == "snapshot"
        assert b["id"] in [x["id"] for x in c.get("/v1/builds").json()]

    cap = Capsule.create(template=name, wait=True)
    try:
        run = lambda cmd: cap.commands.run(cmd)  # noqa: E731
        assert run("cat /srv/app/hello.txt").stdout == "hello from the archive\n"
        assert run("stat -c '%a %U' /srv/app/hello.txt /srv/app/bin/run.sh /etc/single.conf").stdout == (
            "604 root\n755 root\n600 root\n"
        )
        assert run("/srv/app/bin/run.sh").stdout == "running\n"
        assert run("cat /srv/app/where.txt").stdout == "/srv/app\nroot\n"
        assert run("cat /home/user/who.txt").stdout == "user\n"
        # The recipe's last USER, WORKDIR and ENV are the capsule's defaults.
        assert run('whoami; pwd; echo "$GREETING|$STAGE"; cat stage.txt').stdout == (
            "user\n/home/user/work\nhello world|built\nbuilt\n"
        )
        assert run("stat -c %U /home/user/work").stdout == "user\n"
        # A create's own variables win over the template's; the identity is its own.
        assert run('echo "$WRENN_CAPSULE_ID|$WRENN_TEMPLATE_ID"').stdout == f"{cap.capsule_id}|{name}\n"
        # The start command is serving, restored running.
        r = run("python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/').status)\"")
        assert r.stdout == "200\n"
    finally:
        cap.destroy()


def test_failing_step_stops_the_build(server):
    name = "fails-" + uuid.uuid4().hex[:8]
    with server.admin() as c:
        r = submit(
            c,
            {
                "name": name,
                "recipe": ["RUN echo first step", "RUN echo oops >&2; exit 3", "RUN echo never runs"],
                "skip_pre_post": True,
            },
        )
        assert r.status_code == 202, r.text
        b = wait_build(c, r.json()["id"])
        assert b["status"] == "failed"
        assert "step 2 (RUN echo oops >&2; exit 3): exited with code 3" in b["error"]
        assert "oops" in b["error"]  # the step's log tail
        assert "never runs" not in log_text(b)
        assert "pre-build" not in log_text(b, "system")
        assert b["current_step"] == 1
        assert build_capsules(c, b["id"]) == []
        assert name not in {t["name"] for t in c.get("/v1/snapshots").json()}


def test_cancel_and_time_limit(server):
    with server.admin() as c:
        r = submit(
            c,
            {"name": "cancelled-" + uuid.uuid4().hex[:8], "recipe": ["RUN --timeout=10m sleep 600"],
             "skip_pre_post": True},
        )
        assert r.status_code == 202, r.text
        bid = r.json()["id"]
        deadline = time.monotonic() + 120
        while "step 1/1" not in log_text(c.get(f"/v1/builds/{bid}").json()):
            assert time.monotonic() < deadline, "the step never started"
            time.sleep(0.5)
        r = c.post(f"/v1/builds/{bid}/cancel")
        assert r.status_code == 200, r.text
        b = wait_build(c, bid, timeout=60)
        assert b["status"] == "cancelled"
        assert b["error"] == "cancelled on request"
        assert build_capsules(c, bid) == []

        # Past its time limit a build is cancelled and cleaned.
        r = submit(
            c,
            {"name": "slow-" + uuid.uuid4().hex[:8], "recipe": ["RUN --timeout=10m sleep 600"],
             "skip_pre_post": True, "timeout_sec": 30},
        )
        assert r.status_code == 202, r.text
        b = wait_build(c, r.json()["id"], timeout=120)
        assert b["status"] == "cancelled"
        assert "exceeded its time limit of 30 s" in b["error"]
        assert build_capsules(c, b["id"]) == []
        # An ended build stays as it ended.
        assert c.post(f"/v1/builds/{b['id']}/cancel").json()["status"] == "cancelled"


@pytest.mark.parametrize(
    "config, files, status, needle",
    [
        ({"name": "x1", "recipe": ["FETCH http://example.com"]}, None, 400, "line 1: unknown instruction"),
        ({"name": "x2", "recipe": ["RUN true", "ENV 1A=b"]}, None, 400, "line 2: invalid environment"),
        ({"name": "x3", "recipe": ["COPY missing.txt /x"]}, None, 400, "COPY missing.txt: not in the uploaded archive"),
        ({"name": "x4", "base_template": "no-such-base"}, None, 404, "base template no-such-base"),
        ({"name": "x5", "healthcheck": "--port=0"}, None, 400, "healthcheck"),
        ({"name": "minimal"}, None, 409, "platform template"),
        ({"name": "x6", "vcpus": 99}, None, 400, "vcpus"),
        ({"name": "x7", "timeout_sec": 0}, None, 400, "timeout_sec"),
        ({"name": "bad name!"}, None, 400, "name"),
        ({"name": "x8", "recipe": ["RUN true"], "surprise": 1}, None, 400, "surprise"),
        ({"name": "x9", "recipe": ["COPY a /a"]}, b"PK\x03\x04zipdata", 400, "zip is not supported"),
        ({"name": "x10", "recipe": ["COPY a /a"]}, b"not an archive at all" * 30, 400, "archive"),
    ],
)
def test_bad_requests_are_refused(server, config, files, status, needle):
    with server.admin() as c:
        before = len(c.get("/v1/builds").json())
        if files is None:
            r = submit(c, config)
        else:
            r = c.post(
                "/v1/builds",
                data={"config": json.dumps(config)},
                files={"archive": ("files", files, "application/octet-stream")},
            )
        assert r.status_code == status, r.text
        assert needle in r.json()["error"]["message"], r.text
        assert len(c.get("/v1/builds").json()) == before


def test_archives_with_escaping_paths_are_refused(server):
    with server.admin() as c:
        for bad in ["../etc/passwd", "/etc/passwd"]:
            r = submit(c, {"name": "esc", "recipe": ["COPY a /a"]}, archive({bad: (b"x", 0o644)}))
            assert r.status_code == 400, r.text
            assert "relative path" in r.json()["error"]["message"]


def test_builds_are_team_scoped(server):
    with server.admin() as c:
        r = submit(c, {"name": "scoped-" + uuid.uuid4().hex[:8], "recipe": ["RUN true"], "skip_pre_post": True})
        assert r.status_code == 202, r.text
        bid = r.json()["id"]
    with server.other() as o:
        assert o.get(f"/v1/builds/{bid}").status_code == 404
        assert o.get(f"/v1/builds/{bid}/logs").status_code == 404
        assert o.post(f"/v1/builds/{bid}/cancel").status_code == 404
        assert bid not in [b["id"] for b in o.get("/v1/builds").json()]
        # Admin routes are for platform admins' user tokens.
        assert o.get("/v1/admin/builds").status_code in (401, 403)
    with server.admin_user() as a:
        assert bid in [b["id"] for b in a.get("/v1/admin/builds").json()]
        assert a.get(f"/v1/admin/builds/{bid}").json()["team_id"]
    with server.admin() as c:
        wait_build(c, bid)


def test_a_killed_servers_build_is_failed_and_cleaned(start_server):
    srv = start_server(
        "builds-kill",
        args=("--build-heartbeat-timeout", "5", "--build-pre-command", "true", "--build-post-command", "true"),
    )
    with srv.client(ADMIN_KEY) as c:
        r = submit(c, {"name": "killed-" + uuid.uuid4().hex[:8], "recipe": ["RUN --timeout=10m sleep 600"]})
        assert r.status_code == 202, r.text
        bid = r.json()["id"]
        deadline = time.monotonic() + 120
        while not build_capsules(c, bid) or "step 1/1" not in log_text(c.get(f"/v1/builds/{bid}").json()):
            assert time.monotonic() < deadline, "the build never reached its step"
            time.sleep(0.5)
        capsule = build_capsules(c, bid)[0]["id"]
    srv.restart(signal.SIGKILL)
    with srv.client(ADMIN_KEY) as c:
        b = wait_build(c, bid, timeout=60)
        assert b["status"] == "failed"
        assert "stopped while it ran" in b["error"]
        assert build_capsules(c, bid) == []
        assert c.get(f"/v1/capsules/{capsule}").json()["status"] == "stopped"
    # No VMM of the build is left on the host.
    time.sleep(1)
    assert capsule not in os.popen("ps -eo args").read()


def test_cli_builds_a_recipe_file(server, tmp_path):
    """`wrenn template build FILE`: the file's COPY sources are uploaded from its
    directory, the log is printed as the build runs, the exit code says how it ended."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "app.ini").write_text("[app]\nmode=cli\n")
    recipe = tmp_path / "Wrennfile"
    recipe.write_text(
        "# built by the command line\n"
        "FROM minimal\n"
        "ENV MODE=cli\n"
        "COPY conf/ /etc/cliapp/\n"
        "RUN echo \"mode is $MODE\" && \\\n"
        "    grep -q mode=cli /etc/cliapp/app.ini\n"
    )
    name = "cli-" + uuid.uuid4().hex[:8]
    env = {**os.environ, "WRENN_BASE_URL": server.url, "WRENN_API_KEY": server.admin_key}
    r = subprocess.run(
        [BINARY, "template", "build", str(recipe), "--name", name, "--skip-pre-post"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"template {name} built" in r.stdout
    out = r.stdout + r.stderr
    assert "==> step 3/3: RUN echo" in out and "    mode is cli" in out
    with server.admin() as c:
        assert name in {t["name"] for t in c.get("/v1/snapshots").json()}

    # A failing step: exit code 1 and the reason.
    recipe.write_text("FROM minimal\nRUN exit 4\n")
    r = subprocess.run(
        [BINARY, "template", "build", str(recipe), "--name", name + "-x", "--skip-pre-post"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 1
    assert "failed: step 1 (RUN exit 4): exited with code 4" in r.stderr
    # A bad file is refused before anything is sent, naming the line.
    recipe.write_text("FROM minimal\n\nRUNN true\n")
    r = subprocess.run(
        [BINARY, "template", "build", str(recipe), "--name", name + "-y"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1 and "line 3: unknown instruction" in r.stderr, r.stderr


def test_platform_builds(server):
    """`POST /v1/admin/builds`: a platform admin builds a template that every team may
    create capsules from; API keys and other users may not."""
    name = "plat-" + uuid.uuid4().hex[:8]
    config = {
        "name": name,
        "base_template": "minimal",
        "recipe": ["RUN echo built-for-all > /etc/platform-mark", "ENV MARK=platform"],
        "skip_pre_post": True,
    }
    with server.admin() as c:
        r = c.post("/v1/admin/builds", json=config)
        assert r.status_code in (401, 403), r.text
    with server.client(None, Authorization=f"Bearer {server.other_token}") as o:
        r = o.post("/v1/admin/builds", json=config)
        assert r.status_code == 403, r.text
        assert "platform admins" in r.json()["error"]["message"]
    with server.admin_user() as a:
        r = a.post("/v1/admin/builds", json=config)
        assert r.status_code == 202, r.text
        b = r.json()
        assert b["platform"] is True
        bid = b["id"]
        deadline = time.monotonic() + 600
        while b["status"] not in FINAL:
            assert time.monotonic() < deadline, b
            time.sleep(1)
            b = a.get(f"/v1/admin/builds/{bid}").json()
        assert b["status"] == "success", b
        # The name is taken now, for platform builds and team builds alike.
        r = a.post("/v1/admin/builds", json=config)
        assert r.status_code == 409, r.text
    with server.admin() as c:
        r = submit(c, {**config, "skip_pre_post": True})
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "name_reserved"
        # Listed as a platform template, not as a snapshot of the admin's team.
        listed = [t for t in c.get("/v1/snapshots").json() if t["name"] == name]
        assert len(listed) == 1 and listed[0]["platform"] is True, listed
    # Another team sees it and creates a capsule from it.
    with server.other() as o:
        assert name in {t["name"] for t in o.get("/v1/snapshots").json() if t["platform"]}
        r = o.post("/v1/capsules", json={"template": name, "timeout_sec": 300})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        try:
            deadline = time.monotonic() + 120
            while o.get(f"/v1/capsules/{cid}").json()["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.5)
            r = o.post(
                f"/v1/capsules/{cid}/exec",
                json={"cmd": "/bin/sh", "args": ["-c", "cat /etc/platform-mark; echo $WRENN_TEMPLATE_ID"]},
            )
            assert r.status_code == 200, r.text
            out = r.json()["stdout"]
            assert out == f"built-for-all\n{name}\n", out
        finally:
            o.delete(f"/v1/capsules/{cid}")


def test_disk_only_result(wrenn_env, server):
    """A build that saves the disk alone: flattened and sparse, no memory; capsules boot
    it fresh, at any size, with the recipe's files, environment, user and directory."""
    name = "disk-only-" + uuid.uuid4().hex[:6]
    templates = os.path.join(server.data_dir, "templates")

    def disk_only_dirs() -> set[str]:
        return {d for d in os.listdir(templates)
                if d.startswith("snap-") and not os.path.exists(os.path.join(templates, d, "snapshot"))}

    with server.client(server.admin_key) as c:
        for extra, needle in (
            ({"recipe": ["START sleep 100"]}, "START needs result snapshot"),
            ({"recipe": ["RUN true"], "healthcheck": "--port=80"}, "no running services"),
            ({"recipe": ["RUN true"], "result": "memory"}, "result must be snapshot or disk"),
        ):
            r = submit(c, {"name": name, "result": "disk", **extra})
            assert r.status_code == 400, r.text
            assert needle in r.json()["error"]["message"], r.text
        before = disk_only_dirs()
        config = {
            "name": name, "base_template": "minimal", "result": "disk", "skip_pre_post": True,
            "recipe": [
                "RUN echo on disk > /srv-file",
                "RUN echo in memory > /run/build-marker",
                "RUN mkdir -p /srv/work && chown user /srv/work",
                "ENV STAGE=disk",
                "USER user",
                "WORKDIR /srv/work",
                "RUN echo $STAGE-$(whoami) > made.txt",
            ],
        }
        b = wait_build(c, submit(c, config).json()["id"])
        assert b["status"] == "success", (b.get("error"), log_text(b)[-2000:])
        assert b["result"] == "disk"
        assert f"saving template {name} (disk only)" in log_text(b)
        assert build_capsules(c, b["id"]) == []
    made = disk_only_dirs() - before
    assert len(made) == 1, made
    rootfs = os.path.join(templates, made.pop(), "rootfs.img")
    st = os.stat(rootfs)
    assert st.st_blocks * 512 < st.st_size / 2, (st.st_blocks * 512, st.st_size)

    cap = Capsule.create(template=name, vcpus=2, memory_mb=768, wait=True)
    try:
        out = cap.commands.run('cat /srv-file; echo "$STAGE"; whoami; pwd; cat made.txt; nproc').stdout
        assert out == "on disk\ndisk\nuser\n/srv/work\ndisk-user\n2\n", out
        # Booted fresh: what the build left in memory (/run is a tmpfs) is gone.
        assert cap.commands.run("stat -f -c %T /run; cat /run/build-marker || echo fresh").stdout == (
            "tmpfs\nfresh\n")
    finally:
        cap.destroy()
