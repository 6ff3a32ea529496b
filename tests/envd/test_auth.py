"""Access token (X-Access-Token) and signed /files URLs.

Runs against its own envd on port 49984 whose token is set with POST /init,
so the main debug-mode instance stays open.
"""

import os
import urllib.parse
import uuid

import httpx
import pytest

from e2b import AuthenticationException

from helpers import owner_of, sandbox_for, unary

PORT = 49984
TOKEN = "wrenn-test-token-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def secured(envd_factory):
    inst = envd_factory(PORT)
    r = inst.init({"accessToken": TOKEN})
    assert r.status_code == 204, f"POST /init -> {r.status_code} {r.text}"
    yield inst
    inst.stop()


@pytest.fixture(scope="module")
def sbx(secured):
    return sandbox_for(secured.url, TOKEN)


@pytest.fixture(scope="module")
def bad_sbx(secured):
    return sandbox_for(secured.url, "not-the-token")


def _with_query(url: str, **changes) -> str:
    parts = urllib.parse.urlsplit(url)
    q = dict(urllib.parse.parse_qsl(parts.query))
    q.update(changes)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))


def _flip(sig: str) -> str:
    i = len(sig) - 3
    return sig[:i] + ("A" if sig[i] != "A" else "B") + sig[i + 1 :]


def test_health_is_open(secured):
    r = httpx.get(f"{secured.url}/health", trust_env=False)
    assert r.status_code == 204


def test_sdk_with_token_works(sbx, scratch):
    assert sbx.commands.run("whoami").stdout == "user\n"
    sbx.files.write(f"{scratch}/t.txt", "tok")
    assert sbx.files.read(f"{scratch}/t.txt") == "tok"
    assert [e.name for e in sbx.files.list(scratch)] == ["t.txt"]
    assert sbx.is_running()


def test_wrong_token_rpc(bad_sbx, scratch):
    with pytest.raises(AuthenticationException):
        bad_sbx.commands.run("true", timeout=10)
    with pytest.raises(AuthenticationException):
        bad_sbx.commands.list()
    with pytest.raises(AuthenticationException):
        bad_sbx.files.list(scratch)
    with pytest.raises(AuthenticationException):
        bad_sbx.files.make_dir(f"{scratch}/nope")
    assert not os.path.exists(f"{scratch}/nope")


def test_wrong_token_files(bad_sbx, scratch):
    with open(f"{scratch}/f.txt", "w") as f:
        f.write("x")
    with pytest.raises(AuthenticationException):
        bad_sbx.files.read(f"{scratch}/f.txt")
    with pytest.raises(AuthenticationException):
        bad_sbx.files.write(f"{scratch}/w.txt", "w")
    with pytest.raises(AuthenticationException):
        bad_sbx.files.write(f"{scratch}/w2.txt", "w", use_octet_stream=True)
    assert not os.path.exists(f"{scratch}/w.txt")
    assert not os.path.exists(f"{scratch}/w2.txt")


def test_missing_token_raw_401_json(secured, scratch):
    r = unary(secured.url, "process.Process/List", {})
    assert r.status_code == 401, r.text
    body = r.json()
    assert isinstance(body.get("message"), str) and body["message"]

    r = httpx.get(f"{secured.url}/files", params={"path": f"{scratch}"}, trust_env=False)
    assert r.status_code == 401, r.text
    assert isinstance(r.json().get("message"), str)

    r = httpx.get(f"{secured.url}/metrics", trust_env=False)
    assert r.status_code == 401

    r = unary(secured.url, "process.Process/List", {}, headers={"X-Access-Token": TOKEN})
    assert r.status_code == 200, r.text


def test_signed_download_url(sbx, scratch):
    p = f"{scratch}/signed.txt"
    sbx.files.write(p, "signed content")
    url = sbx.download_url(p)
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert q["signature"].startswith("v1_")
    r = httpx.get(url, trust_env=False)
    assert r.status_code == 200, r.text
    assert r.content == b"signed content"


def test_tampered_signature_rejected(sbx, scratch):
    p = f"{scratch}/signed.txt"
    sbx.files.write(p, "x")
    url = sbx.download_url(p)
    sig = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["signature"]
    r = httpx.get(_with_query(url, signature=_flip(sig)), trust_env=False)
    assert r.status_code == 401
    # A valid signature for another path does not open this one.
    other = sbx.download_url(f"{scratch}/other.txt")
    other_sig = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(other).query))["signature"]
    r = httpx.get(_with_query(url, signature=other_sig), trust_env=False)
    assert r.status_code == 401
    # Signature missing entirely.
    r = httpx.get(f"{sbx.envd_api_url}/files", params={"path": p}, trust_env=False)
    assert r.status_code == 401


def test_signature_expiration(sbx, scratch):
    p = f"{scratch}/exp.txt"
    sbx.files.write(p, "exp")
    ok = sbx.download_url(p, use_signature_expiration=120)
    assert "signature_expiration=" in ok
    r = httpx.get(ok, trust_env=False)
    assert r.status_code == 200
    assert r.content == b"exp"

    expired = sbx.download_url(p, use_signature_expiration=-10)
    r = httpx.get(expired, trust_env=False)
    assert r.status_code == 401
    assert "expired" in r.text.lower()

    # Moving the expiration forward invalidates the signature.
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(expired).query))
    r = httpx.get(
        _with_query(expired, signature_expiration=str(int(q["signature_expiration"]) + 3600)),
        trust_env=False,
    )
    assert r.status_code == 401


def test_signed_upload_url(sbx, scratch):
    p = f"{scratch}/up/loaded.txt"
    url = sbx.upload_url(p)
    r = httpx.post(url, files={"file": ("loaded.txt", b"uploaded via url")}, trust_env=False)
    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == p
    assert open(p, "rb").read() == b"uploaded via url"
    assert owner_of(p) == "user"


def test_signed_upload_as_root(sbx, scratch):
    p = f"{scratch}/rootup.txt"
    url = sbx.upload_url(p, user="root")
    assert "username=root" in url
    r = httpx.post(url, files={"file": ("x", b"r")}, trust_env=False)
    assert r.status_code == 200, r.text
    assert owner_of(p) == "root"
    # The username is part of the signed string.
    r = httpx.post(_with_query(url, username="user"), files={"file": ("x", b"u")}, trust_env=False)
    assert r.status_code == 401


def test_read_signature_does_not_allow_write(sbx, scratch):
    p = f"{scratch}/rw.txt"
    read_url = sbx.download_url(p)
    r = httpx.post(read_url, files={"file": ("rw.txt", b"nope")}, trust_env=False)
    assert r.status_code == 401
    assert not os.path.exists(p)
    write_url = sbx.upload_url(p)
    sbx.files.write(p, "data")
    r = httpx.get(write_url, trust_env=False)
    assert r.status_code == 401


def test_wrong_header_beats_valid_signature(sbx, scratch):
    p = f"{scratch}/hdr.txt"
    sbx.files.write(p, "h")
    url = sbx.download_url(p)
    r = httpx.get(url, headers={"X-Access-Token": "wrong"}, trust_env=False)
    assert r.status_code == 401
    r = httpx.get(
        f"{sbx.envd_api_url}/files", params={"path": p}, headers={"X-Access-Token": TOKEN}, trust_env=False
    )
    assert r.status_code == 200
    assert r.content == b"h"


def test_token_rotation_needs_old_token(make_envd):
    inst = make_envd(49986)
    a, b = "token-a-" + uuid.uuid4().hex, "token-b-" + uuid.uuid4().hex
    assert inst.init({"accessToken": a}).status_code == 204
    # Changing the token without presenting the current one is refused.
    assert inst.init({"accessToken": b}).status_code == 401
    assert unary(inst.url, "process.Process/List", {}, headers={"X-Access-Token": a}).status_code == 200
    # With the current token it is accepted.
    assert inst.init({"accessToken": b}, token=a).status_code == 204
    assert unary(inst.url, "process.Process/List", {}, headers={"X-Access-Token": a}).status_code == 401
    assert unary(inst.url, "process.Process/List", {}, headers={"X-Access-Token": b}).status_code == 200
    assert sandbox_for(inst.url, b).commands.run("echo ok").stdout == "ok\n"
