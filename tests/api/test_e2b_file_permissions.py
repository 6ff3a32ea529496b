"""envd does every file operation with the permissions of the user the request names.

The unmodified `e2b` SDK against `wrenn serve`: as `user`, root's files cannot be read,
root's directories cannot be written (not through a planted symlink either), and what
`user` writes belongs to `user`. Root keeps full access. Each test runs once per
database backend.
"""

from __future__ import annotations

import uuid

import pytest
from e2b import Sandbox, SandboxException


def api(server) -> dict:
    return {
        "api_key": server.admin_key,
        "api_url": server.url,
        "sandbox_url": server.url,
        "debug": False,
    }


@pytest.fixture(scope="module")
def sbx(server):
    s = Sandbox.create(
        template="minimal", timeout=600, metadata={"suite": "e2b-file-permissions"}, **api(server)
    )
    yield s
    s.kill()


def tag() -> str:
    return uuid.uuid4().hex[:8]


def owner(sbx, path: str) -> str:
    return sbx.commands.run(f"stat -c %U:%G {path}", user="root").stdout.strip()


def test_user_cannot_read_root_only_files(sbx):
    secret = f"/root/secret-{tag()}"
    sbx.files.write(secret, "top secret", user="root")
    sbx.commands.run(f"chmod 600 {secret}", user="root")
    with pytest.raises(SandboxException) as err:
        sbx.files.read(secret, user="user")
    assert "403" in str(err.value) or "permission" in str(err.value).lower(), err.value
    # A world-readable file that is root's is fine; root reads everything.
    assert sbx.files.read("/etc/hostname", user="user") == sbx.files.read("/etc/hostname", user="root")
    assert sbx.files.read(secret, user="root") == "top secret"
    # Nor through a symlink the user planted.
    link = f"/home/user/link-{tag()}"
    sbx.commands.run(f"ln -s {secret} {link}", user="user")
    with pytest.raises(SandboxException):
        sbx.files.read(link, user="user")
    sbx.commands.run(f"rm -f {secret} {link}", user="root")


def test_user_cannot_write_where_root_owns(sbx):
    target = f"/root/planted-{tag()}"
    with pytest.raises(SandboxException):
        sbx.files.write(target, "x", user="user")
    with pytest.raises(SandboxException):
        sbx.files.write(f"/etc/wrenn-{tag()}/new/file", "x", user="user")
    # A symlink in the user's home pointing into root's directory is not a way in.
    link = f"/home/user/into-root-{tag()}"
    sbx.commands.run(f"ln -s {target} {link}", user="user")
    with pytest.raises(SandboxException):
        sbx.files.write(link, "x", user="user")
    r = sbx.commands.run(f"test -e {target} && echo present || echo absent", user="root")
    assert r.stdout.strip() == "absent"
    with pytest.raises(SandboxException):
        sbx.files.make_dir(f"/root/dir-{tag()}", user="user")
    # Root may.
    sbx.files.write(target, "root's", user="root")
    assert owner(sbx, target) == "root:root"
    sbx.commands.run(f"rm -f {target} {link}", user="root")


def test_what_user_writes_is_users(sbx):
    d = f"/home/user/perm-{tag()}"
    sbx.files.write(f"{d}/a/b/file.txt", "mine", user="user")
    for p in (d, f"{d}/a", f"{d}/a/b", f"{d}/a/b/file.txt"):
        assert owner(sbx, p) == "user:user", p
    info = sbx.files.get_info(f"{d}/a/b/file.txt", user="user")
    assert (info.owner, info.group) == ("user", "user")
    assert sbx.files.make_dir(f"{d}/made", user="user") is True
    assert owner(sbx, f"{d}/made") == "user:user"
    # /tmp is everyone's: the user's file there is the user's too.
    t = f"/tmp/perm-{tag()}.txt"
    sbx.files.write(t, "x", user="user")
    assert owner(sbx, t) == "user:user"
    sbx.files.remove(d, user="user")
    sbx.files.remove(t, user="user")
