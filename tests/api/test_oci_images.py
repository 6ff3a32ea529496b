"""Templates from container images: a registry the test runs, images the test makes.

The registry is Debian's `docker-registry` (the CNCF distribution server) on loopback,
with htpasswd authentication. Its images are made here from local files: the layers of
the first are the `minimal` template's files (without Wrenn's init, envd and `user`
account, which the import must add) and a second layer with a whiteout, an opaque
directory, links and the image's own files. Nothing is fetched from outside.

A build `FROM` the image makes a template whose capsules see the layers applied, the
image's environment and working directory, and what the build's steps did; a second
build finds the image imported already; the `e2b` SDK's `Template().from_image(...)`
builds from an image index through the same registry. Unreachable registries, wrong or
missing credentials, unknown images and images for another architecture are 400s
before any build is queued, and a server that does not allow private registries
refuses this one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
import warnings

with warnings.catch_warnings():
    # Debian's libcrypt makes the bcrypt hashes htpasswd files hold.
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt

import httpx
import pytest
from e2b import Sandbox, Template
from e2b.exceptions import BuildException
from wrenn import Capsule

from conftest import IMAGES, _free_port
from test_builds import build_capsules, log_text, wait_build

USER, PASSWORD = "builder", "registry password"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
# What the image must not carry: the import adds them.
WRENN_FILES = {
    "usr/local/bin/envd", "usr/local/bin/wrenn-init", "usr/local/sbin/poweroff",
    "usr/local/sbin/reboot", "usr/local/sbin/halt", "etc/sudoers.d/user", "etc/wrenn-template",
}
ACCOUNT_FILES = {"etc/passwd", "etc/group", "etc/shadow", "etc/gshadow"}


class Registry:
    def __init__(self, url: str):
        self.url = url
        self.host = url.removeprefix("http://")

    def client(self, auth=(USER, PASSWORD)) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=auth, timeout=120)

    def push_blob(self, c: httpx.Client, repo: str, data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if c.head(f"/v2/{repo}/blobs/{digest}").status_code != 200:
            r = c.post(f"/v2/{repo}/blobs/uploads/")
            assert r.status_code == 202, r.text
            loc = r.headers["location"]
            r = c.put(loc + ("&" if "?" in loc else "?") + f"digest={digest}", content=data,
                      headers={"content-type": "application/octet-stream"})
            assert r.status_code == 201, r.text
        return {"digest": digest, "size": len(data)}

    def push_image(self, repo: str, tag: str, layers: list[tuple[bytes, bytes, str]], config: dict) -> str:
        """Pushes an image of `layers` ((blob, uncompressed tar, media type)); its
        manifest's digest."""
        with self.client() as c:
            descs = [{"mediaType": mt, **self.push_blob(c, repo, blob)} for blob, _, mt in layers]
            config = {**config, "rootfs": {"type": "layers", "diff_ids": [
                "sha256:" + hashlib.sha256(tar).hexdigest() for _, tar, _ in layers]}}
            cfg = {"mediaType": OCI_CONFIG, **self.push_blob(c, repo, json.dumps(config).encode())}
            manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                   "config": cfg, "layers": descs}).encode()
            return self.put_manifest(c, repo, tag, manifest, OCI_MANIFEST)

    def put_manifest(self, c: httpx.Client, repo: str, tag: str, body: bytes, media_type: str) -> str:
        r = c.put(f"/v2/{repo}/manifests/{tag}", content=body, headers={"content-type": media_type})
        assert r.status_code == 201, r.text
        return "sha256:" + hashlib.sha256(body).hexdigest()


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
           link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else mode
    info.mtime = 1_700_000_000
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def _base_layer(work: str) -> bytes:
    """The `minimal` template's files as a tar, without what Wrenn adds."""
    tree = os.path.join(work, "tree")
    os.makedirs(tree)
    rootfs = os.path.join(IMAGES, "templates", "minimal", "rootfs.img")
    subprocess.run(["debugfs", "-R", f"rdump / {tree}", rootfs], check=True, capture_output=True)
    try:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            def keep(info: tarfile.TarInfo):
                name = info.name
                if (name in WRENN_FILES or name in ACCOUNT_FILES or name == "lost+found"
                        or name.startswith(("home/user", "lost+found/"))):
                    return None
                info.mtime = 1_700_000_000
                return info

            for entry in sorted(os.listdir(tree)):
                t.add(os.path.join(tree, entry), arcname=entry, filter=keep)
            # The accounts without `user`.
            for f in sorted(ACCOUNT_FILES):
                path = os.path.join(tree, f)
                if not os.path.exists(path):
                    continue
                lines = [l for l in open(path).read().splitlines(keepends=True)
                         if not l.startswith("user:")]
                data = "".join(lines).replace(",user\n", "\n").replace(":user\n", ":\n").encode()
                info = t.gettarinfo(path, arcname=f)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return buf.getvalue()
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _app_layer() -> bytes:
    return _tar([
        _entry("opt", tarfile.DIRTYPE),
        _entry("opt/app", tarfile.DIRTYPE),
        _entry("opt/app/hello.txt", data=b"hello from layer 2\n"),
        _entry("opt/app/link", tarfile.SYMTYPE, link="hello.txt"),
        _entry("opt/app/hard", tarfile.LNKTYPE, link="opt/app/hello.txt"),
        _entry("etc/.wh.motd"),
        _entry("var/cache/keep.txt", data=b"kept\n"),
        _entry("var/cache/.wh..wh..opq"),
    ])


IMAGE_CONFIG = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "APP_MODE=oci"],
        "WorkingDir": "/opt/app",
        "Cmd": ["/bin/sh"],
    },
}


@pytest.fixture(scope="module")
def registry():
    work = tempfile.mkdtemp(prefix="wrenn-registry-")
    port = _free_port()
    hashed = crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH))
    with open(os.path.join(work, "htpasswd"), "w") as f:
        f.write(f"{USER}:{hashed}\n")
    config = os.path.join(work, "config.yml")
    with open(config, "w") as f:
        f.write(f"""version: 0.1
log: {{level: warn}}
storage: {{filesystem: {{rootdirectory: {work}/data}}}}
http: {{addr: 127.0.0.1:{port}}}
auth: {{htpasswd: {{realm: wrenn-test, path: {work}/htpasswd}}}}
""")
    log = open(os.path.join(work, "registry.log"), "w")
    proc = subprocess.Popen(["docker-registry", "serve", config], stdout=log, stderr=subprocess.STDOUT)
    reg = Registry(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(reg.url + "/v2/", timeout=1).status_code == 401:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, open(os.path.join(work, "registry.log")).read()
        assert time.monotonic() < deadline, "the registry did not start"
        time.sleep(0.2)

    base_tar = _base_layer(work)
    app_tar = _app_layer()
    import gzip
    layers = [(gzip.compress(base_tar, compresslevel=1), base_tar, LAYER_GZIP), (app_tar, app_tar, LAYER_TAR)]
    reg.min_digest = reg.push_image("test/min", "1", layers, IMAGE_CONFIG)
    reg.arm_digest = reg.push_image(
        "test/arm", "1", [(app_tar, app_tar, LAYER_TAR)], {**IMAGE_CONFIG, "architecture": "arm64"})
    # An index whose linux/amd64 entry is test/min's manifest.
    with reg.client() as c:
        for repo, digest in (("test/multi", reg.min_digest), ("test/multi", reg.arm_digest)):
            src = "test/min" if digest == reg.min_digest else "test/arm"
            body = c.get(f"/v2/{src}/manifests/{digest}", headers={"accept": OCI_MANIFEST}).content
            for blob in json.loads(body)["layers"] + [json.loads(body)["config"]]:
                data = c.get(f"/v2/{src}/blobs/{blob['digest']}").content
                reg.push_blob(c, repo, data)
            reg.put_manifest(c, repo, digest, body, OCI_MANIFEST)
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": reg.arm_digest, "size": 0,
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": reg.min_digest, "size": 0,
             "platform": {"architecture": "amd64", "os": "linux"}},
        ]}).encode()
        reg.put_manifest(c, "test/multi", "1", index, OCI_INDEX)
    reg.unpacked = len(base_tar) + len(app_tar)
    yield reg
    proc.terminate()
    proc.wait(timeout=10)
    log.close()
    shutil.rmtree(work, ignore_errors=True)


def _builds(c: httpx.Client) -> int:
    return len(c.get("/v1/builds").json())


def test_a_template_from_an_image(wrenn_env, server, registry):
    name = "from-image-" + uuid.uuid4().hex[:6]
    image = f"{registry.host}/test/min:1"
    config = {
        "name": name,
        "base_image": image,
        "registry": {"username": USER, "password": PASSWORD},
        "recipe": ["RUN echo built in $(pwd) > built.txt", "RUN id -un user"],
        "skip_pre_post": True,
    }
    with server.client(server.admin_key) as c:
        r = c.post("/v1/builds", json=config)
        assert r.status_code == 202, r.text
        queued = r.json()
        assert queued["base_image"] == image and queued["base_template"] == image
        assert "registry" not in json.dumps(queued)
        b = wait_build(c, queued["id"])
        assert b["status"] == "success", (b.get("error"), log_text(b)[-3000:])
        text = log_text(b)
        assert f"pulled {image} ({registry.min_digest}): 2 layers" in text, text
        assert "user\n" in text + "\n", text
        # Images the hosts imported are no team's templates.
        names = [t["name"] for t in c.get("/v1/snapshots").json()]
        assert name in names and not any(n.startswith("img-") for n in names), names
        assert build_capsules(c, queued["id"]) == []
    imported = [d for d in os.listdir(os.path.join(server.data_dir, "templates")) if d.startswith("img-")]
    assert len(imported) == 1, imported
    meta = json.load(open(os.path.join(server.data_dir, "templates", imported[0], "image.json")))
    assert meta["summary"]["digest"] == registry.min_digest
    assert meta["unpacked_bytes"] == registry.unpacked
    assert not [d for d in os.listdir(os.path.join(server.data_dir, "templates")) if d.startswith(".img-")]

    cap = Capsule.create(template=name, wait=True)
    try:
        run = lambda cmd: cap.commands.run(cmd).stdout  # noqa: E731
        # The second layer over the first: its files and links, its whiteout and opaque
        # directory.
        assert run("cat /opt/app/hello.txt; readlink /opt/app/link; stat -c %h /opt/app/hard") == (
            "hello from layer 2\nhello.txt\n2\n")
        assert run("test -e /etc/motd || echo no motd; ls /var/cache") == "no motd\nkeep.txt\n"
        # Wrenn's side was added: the account commands run as, and the image's record.
        assert run("whoami; stat -c %U /home/user") == "user\nuser\n"
        assert run("cat /etc/wrenn-template") == f"image={image}@{registry.min_digest}\n"
        # The image's environment and working directory, and what the steps did.
        assert run('echo "$APP_MODE"; pwd; cat built.txt') == "oci\n/opt/app\nbuilt in /opt/app\n"
        assert run("echo $WRENN_TEMPLATE_ID") == f"{name}\n"
    finally:
        cap.destroy()

    # A second build of the image finds it imported.
    with server.client(server.admin_key) as c:
        config = {**config, "name": name + "-again", "recipe": ["RUN true"]}
        b = wait_build(c, c.post("/v1/builds", json=config).json()["id"])
        assert b["status"] == "success", b.get("error")
        assert "is on the host already" in log_text(b), log_text(b)


def test_bad_images_are_refused_before_a_build(wrenn_env, server, registry):
    closed = _free_port()
    login = {"username": USER, "password": PASSWORD}
    cases = [
        ({"base_image": f"127.0.0.1:{closed}/test/min:1"}, "is unreachable"),
        ({"base_image": f"{registry.host}/test/min:1", "registry": {**login, "password": "wrong"}},
         "refused the credentials"),
        ({"base_image": f"{registry.host}/test/min:1"}, "wants credentials"),
        ({"base_image": f"{registry.host}/test/arm:1", "registry": login}, "is for linux/arm64"),
        ({"base_image": f"{registry.host}/test/min:nope", "registry": login}, "was not found"),
        ({"base_image": "Not A Reference"}, "base_image: image Not A Reference"),
        ({"base_image": f"{registry.host}/test/min:1", "base_template": "minimal"}, "not both"),
        ({"registry": login}, "credentials are for a base_image"),
        ({"base_image": f"{registry.host}/test/min:1", "registry": {"username": USER, "password": ""}},
         "both required"),
    ]
    with server.client(server.admin_key) as c:
        before = _builds(c)
        for extra, needle in cases:
            r = c.post("/v1/builds", json={"name": "bad-" + uuid.uuid4().hex[:6], "recipe": ["RUN true"], **extra})
            assert r.status_code == 400, (extra, r.status_code, r.text)
            assert needle in r.json()["error"]["message"], (extra, r.text)
        assert _builds(c) == before


def test_private_registries_are_the_operators_choice(start_server, registry):
    srv = start_server("no-private-registries")
    with srv.client(srv.admin_key) as c:
        r = c.post("/v1/builds", json={"name": "private", "base_image": f"{registry.host}/test/min:1",
                                       "registry": {"username": USER, "password": PASSWORD}})
        assert r.status_code == 400, r.text
        assert "not a public address" in r.json()["error"]["message"], r.text


def test_the_e2b_template_builder_from_an_image_index(e2b_env, server, registry):
    name = "e2b-image-" + uuid.uuid4().hex[:6]
    template = (
        Template()
        .from_image(f"{registry.host}/test/multi:1", username=USER, password=PASSWORD)
        .run_cmd("echo from the sdk > /tmp/sdk.txt", user="root")
    )
    logs = []
    Template.build(template, name, cpu_count=1, memory_mb=512, on_build_logs=logs.append)
    text = "\n".join(str(l.message) for l in logs)
    # The index's linux/amd64 manifest is test/min's, imported by the test above or now.
    assert registry.min_digest in text, text
    sbx = Sandbox.create(template=name)
    try:
        assert sbx.commands.run("cat /tmp/sdk.txt /opt/app/hello.txt").stdout == (
            "from the sdk\nhello from layer 2\n")
    finally:
        sbx.kill()
    with pytest.raises(BuildException) as e:
        Template.build(Template().from_image(f"{registry.host}/test/multi:1", username=USER, password="wrong"),
                       name + "-x")
    assert "refused the credentials" in str(e.value)
