"""E2B's template builder through the unmodified `e2b` SDK, with real guests.

`Template.build` requests a build, uploads the files of its `copy()`s to the signed URL
the server hands out, sends the steps and follows the status and log; a sandbox
created from the result sees the files (with the owner and mode asked for), the
commands' results, the environment, working directory and user, and its start command
serving. A failing step stops the build and names that step; a second build with the
same files does not upload them again; what cannot be built is refused with a clear
error; builds, uploads and templates are the team's own.
"""

from __future__ import annotations

import io
import tarfile
import time
import uuid

import httpx
import pytest
from e2b import BuildException, Sandbox, Template, wait_for_port


def context(tmp_path):
    (tmp_path / "app" / "data").mkdir(parents=True)
    (tmp_path / "app" / "main.py").write_text("print('hello from main')\n")
    (tmp_path / "app" / "data" / "info.txt").write_text("info\n")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "hello.sh").write_text("#!/bin/sh\necho hello tool\n")
    (tmp_path / "tools" / "bye.sh").write_text("#!/bin/sh\necho bye tool\n")
    (tmp_path / "tools" / "README").write_text("not copied\n")
    return str(tmp_path)


def build_capsules(server) -> list[dict]:
    with server.admin() as c:
        return [
            cap
            for cap in c.get("/v1/capsules").json()
            if "wrenn.build" in (cap.get("metadata") or {}) and cap["status"] != "stopped"
        ]


def wait_status(info, until=("ready", "error"), timeout=600):
    deadline = time.monotonic() + timeout
    while True:
        s = Template.get_build_status(info)
        if s.status.value in until:
            return s
        assert time.monotonic() < deadline, f"build still {s.status}"
        time.sleep(1)


def test_template_builder_builds_what_a_sandbox_uses(e2b_env, server, tmp_path):
    name = "e2b-built-" + uuid.uuid4().hex[:8]
    template = (
        Template(file_context_path=context(tmp_path))
        .from_template("python")
        .copy("app", "/home/user/app")
        .copy("tools/*.sh", "/opt/tools/", user="root", mode=0o750)
        .run_cmd("echo built-by-$(whoami) > /home/user/built.txt")
        .run_cmd(["mkdir -p /srv/data", "id -un > /srv/data/who"], user="root")
        .set_envs({"GREETING": "hello world", "STAGE": "built"})
        .set_workdir("/home/user/app")
        .run_cmd('echo "$STAGE in $(pwd)" > stage.txt')
        .set_start_cmd("python3 -m http.server 8000", wait_for_port(8000))
    )
    logs = []
    info = Template.build(template, name, cpu_count=1, memory_mb=512, on_build_logs=logs.append)
    assert info.template_id == name and info.name == name
    assert info.build_id.startswith("bld-")
    text = "\n".join(str(l.message) for l in logs)
    assert "Uploaded 'app'" in text and "Uploaded 'tools/*.sh'" in text, text
    assert "pre-build phase" in text and "post-build phase" in text, text
    assert "ready after" in text, text
    status = Template.get_build_status(info)
    assert status.status.value == "ready" and status.reason is None
    assert Template.exists(name)
    assert not Template.exists("no-such-" + uuid.uuid4().hex[:6])
    assert build_capsules(server) == []

    sbx = Sandbox.create(template=name)
    try:
        run = lambda cmd: sbx.commands.run(cmd).stdout  # noqa: E731
        assert run("cat /home/user/app/main.py /home/user/app/data/info.txt") == "print('hello from main')\ninfo\n"
        # copy() of a directory keeps its tree, owned by the build's user.
        assert run("stat -c %U /home/user/app/main.py") == "user\n"
        # A glob copies what it matches, with the owner and mode asked for.
        assert run("ls /opt/tools") == "bye.sh\nhello.sh\n"
        assert run("stat -c '%a %U' /opt/tools/hello.sh") == "750 root\n"
        assert run("cat /home/user/built.txt /srv/data/who") == "built-by-user\nroot\n"
        # The last user, working directory and environment are the sandbox's defaults.
        assert run('whoami; pwd; echo "$GREETING"; cat stage.txt') == (
            "user\n/home/user/app\nhello world\nbuilt in /home/user/app\n"
        )
        assert run('echo "$E2B_SANDBOX_TEMPLATE_ID"') == f"{name}\n"
        # The start command was captured running.
        assert run("python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/').status)\"") == "200\n"
    finally:
        sbx.kill()

    # A build that fails: the same files are not uploaded again, and the error names
    # the step.
    failing = (
        Template(file_context_path=str(tmp_path))
        .from_template(name)
        .copy("app", "/home/user/app2")
        .run_cmd("echo about to fail; exit 3")
        .run_cmd("echo never runs")
    )
    logs.clear()
    with pytest.raises(BuildException) as e:
        Template.build(failing, name + "-f", cpu_count=1, memory_mb=512, on_build_logs=logs.append)
    assert "exited with code 3" in str(e.value), str(e.value)
    assert "about to fail" in str(e.value)
    text = "\n".join(str(l.message) for l in logs)
    assert "never runs" not in text
    assert build_capsules(server) == []
    assert not Template.exists(name + "-f")

    info = Template.build_in_background(failing, name + "-g", cpu_count=1, memory_mb=512)
    s = wait_status(info)
    assert s.status.value == "error"
    assert s.reason.step == "2", s.reason
    assert "exited with code 3" in s.reason.message
    assert any("about to fail" in l.message for l in s.reason.log_entries)
    assert s.reason.log_entries[-1].level == "error", s.reason.log_entries[-1]


def test_the_sdk_is_refused_what_cannot_be_built(e2b_env, server, tmp_path):
    ctx = context(tmp_path)
    cases = [
        # Nothing listens there (test_oci_images builds from a registry that does).
        (Template().from_image("127.0.0.1:9/nothing:1").run_cmd("true"), "unreachable"),
        (Template().from_template("no-such-base-" + uuid.uuid4().hex[:6]).run_cmd("true"), "no-such-base"),
        (Template().from_template("python").set_user("no;body"), "invalid user name"),
    ]
    for template, needle in cases:
        with pytest.raises(BuildException) as e:
            Template.build(template, "refused-" + uuid.uuid4().hex[:6])
        assert needle in str(e.value), str(e.value)
    with pytest.raises(BuildException) as e:
        Template.build(Template().from_template("python"), "tagged:v2")
    assert "tags are not supported" in str(e.value)
    with pytest.raises(BuildException) as e:
        Template.build(Template().from_template("python"), "minimal")
    assert "platform template" in str(e.value)
    # E2B's base image is Wrenn's base template.
    with pytest.raises(BuildException) as e:
        Template.build(Template().from_base_image().run_cmd("exit 7"), "base-" + uuid.uuid4().hex[:6])
    assert "exited with code 7" in str(e.value)
    assert build_capsules(server) == []


def test_uploads_need_a_valid_signed_url_and_a_safe_archive(server):
    headers = {"X-API-Key": server.admin_key}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        r = c.post("/v3/templates", json={"name": "uploads-" + uuid.uuid4().hex[:6]})
        assert r.status_code == 202, r.text
        tid, bid = r.json()["templateID"], r.json()["buildID"]
        r = c.get(f"/templates/{tid}/files/abc123")
        assert r.status_code == 201, r.text
        link = r.json()
        assert link["present"] is False
        url = httpx.URL(link["url"])
        assert url.path == f"/templates/{tid}/files/abc123"
        assert c.get(f"/templates/{tid}/files/..%2Fetc").status_code in (400, 404)

        def tar(path):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as t:
                info = tarfile.TarInfo(path)
                info.size = 1
                t.addfile(info, io.BytesIO(b"x"))
            return buf.getvalue()

    with httpx.Client(timeout=60) as anon:
        params = dict(url.params)
        forged = url.copy_with(params={**params, "signature": params["signature"][:-2] + "AA"})
        assert anon.put(forged, content=tar("a.txt")).status_code == 403
        other_hash = url.copy_with(path=f"/templates/{tid}/files/def456")
        assert anon.put(other_hash, content=tar("a.txt")).status_code == 403
        expired = url.copy_with(params={**params, "expires": "1"})
        assert anon.put(expired, content=tar("a.txt")).status_code == 403
        r = anon.put(url, content=tar("../escape.txt"))
        assert r.status_code == 400 and "relative path" in r.json()["message"], r.text
        assert anon.put(url, content=tar("a.txt")).status_code == 200

    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        assert c.get(f"/templates/{tid}/files/abc123").json()["present"] is True
        # Another team has none of it.
        with server.other() as o:
            assert o.get(f"/templates/{tid}/files/abc123").json()["present"] is False
            assert o.get(f"/templates/{tid}/builds/{bid}/status").status_code == 404
            r = o.post(f"/v2/templates/{tid}/builds/{bid}", json={"fromTemplate": "python", "steps": []})
            assert r.status_code == 404, r.text
        # Not started yet: waiting.
        r = c.get(f"/templates/{tid}/builds/{bid}/status")
        assert r.status_code == 200 and r.json()["status"] == "waiting", r.text
        # A COPY whose files were never uploaded is refused before anything runs.
        step = {"type": "COPY", "args": ["a.txt", "/a.txt", "", ""], "filesHash": "ffff"}
        r = c.post(f"/v2/templates/{tid}/builds/{bid}", json={"fromTemplate": "python", "steps": [step]})
        assert r.status_code == 400 and "were not uploaded" in r.json()["message"], r.text
        r = c.post(f"/v2/templates/{tid}/builds/{bid}", json={"fromTemplate": "python", "steps": [{"type": "FETCH"}]})
        assert r.status_code == 400 and "unknown step type" in r.json()["message"], r.text
        run_as = {"type": "RUN", "args": ["id", "root echo"]}
        r = c.post(f"/v2/templates/{tid}/builds/{bid}", json={"fromTemplate": "python", "steps": [run_as]})
        assert r.status_code == 400 and "invalid user name" in r.json()["message"], r.text
        # Started once; a second start is a conflict.
        step = {"type": "COPY", "args": ["a.txt", "/tmp/a.txt", "", ""], "filesHash": "abc123"}
        r = c.post(f"/v2/templates/{tid}/builds/{bid}", json={"fromTemplate": "python", "steps": [step]})
        assert r.status_code == 202, r.text
        r = c.post(f"/v2/templates/{tid}/builds/{bid}", json={"fromTemplate": "python", "steps": []})
        assert r.status_code == 409, r.text
        deadline = time.monotonic() + 600
        while (s := c.get(f"/templates/{tid}/builds/{bid}/status").json())["status"] not in ("ready", "error"):
            assert time.monotonic() < deadline
            time.sleep(1)
        assert s["status"] == "ready", s
        assert c.get(f"/templates/aliases/{tid}").json() == {"templateID": tid, "public": False}
        assert c.get("/templates/aliases/python").json() == {"templateID": "python", "public": True}
        assert c.get("/templates/aliases/nothing-here").status_code == 404
        with server.other() as o:
            assert o.get(f"/templates/aliases/{tid}").status_code == 404
        # Deleting the template is E2B's delete.
        assert c.delete(f"/templates/{tid}").status_code == 204
        assert c.get(f"/templates/aliases/{tid}").status_code == 404
