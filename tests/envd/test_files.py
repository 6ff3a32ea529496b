"""Filesystem operations through the e2b SDK (files.* and /files)."""

import datetime
import io
import os

import httpx
import pytest

from e2b import (
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
)

from helpers import TEST_HOME, chown_to, owner_of


def _blob(n: int) -> bytes:
    return os.urandom(n)


# --- read / write ----------------------------------------------------------


def test_write_and_read_text(sandbox, scratch):
    p = f"{scratch}/a.txt"
    info = sandbox.files.write(p, "hello wrenn ✓\n")
    assert info.path == p
    assert info.name == "a.txt"
    assert info.type == FileType.FILE
    assert sandbox.files.read(p) == "hello wrenn ✓\n"
    assert open(p, encoding="utf-8").read() == "hello wrenn ✓\n"


def test_read_bytes_all_values(sandbox, scratch):
    p = f"{scratch}/bin.dat"
    data = bytes(range(256)) * 17
    sandbox.files.write(p, data)
    got = sandbox.files.read(p, format="bytes")
    assert isinstance(got, bytearray)
    assert bytes(got) == data


def test_read_stream(sandbox, scratch):
    p = f"{scratch}/big.bin"
    data = _blob(3 * 1024 * 1024 + 7)
    with open(p, "wb") as f:
        f.write(data)
    chunks = list(sandbox.files.read(p, format="stream"))
    assert len(chunks) >= 1
    assert b"".join(chunks) == data


def test_read_empty_file(sandbox, scratch):
    p = f"{scratch}/empty"
    open(p, "wb").close()
    assert sandbox.files.read(p) == ""
    assert bytes(sandbox.files.read(p, format="bytes")) == b""


def test_write_multipart_large(sandbox, scratch):
    p = f"{scratch}/mp.bin"
    data = _blob(4 * 1024 * 1024)
    sandbox.files.write(p, data, use_octet_stream=False)
    assert open(p, "rb").read() == data


def test_write_octet_stream_bytes(sandbox, scratch):
    p = f"{scratch}/oct.bin"
    data = _blob(2 * 1024 * 1024 + 3)
    info = sandbox.files.write(p, data, use_octet_stream=True)
    assert info.path == p
    assert info.type == FileType.FILE
    assert open(p, "rb").read() == data
    assert owner_of(p) == "user"


def test_write_file_like_streams_octet(sandbox, scratch):
    p = f"{scratch}/sub/dir/filelike.bin"
    data = _blob(1024 * 1024 + 11)
    info = sandbox.files.write(p, io.BytesIO(data))  # file-like -> octet-stream
    assert info.path == p
    assert open(p, "rb").read() == data
    assert owner_of(f"{scratch}/sub") == "user"
    assert owner_of(f"{scratch}/sub/dir") == "user"


def test_write_iterable_chunks(sandbox, scratch):
    p = f"{scratch}/iter.txt"
    sandbox.files.write(p, iter([b"abc", b"", b"def" * 1000]))
    assert open(p, "rb").read() == b"abc" + b"def" * 1000


def test_gzip_upload(sandbox, scratch):
    p = f"{scratch}/gz-up.txt"
    data = (b"compressible line\n" * 50000) + _blob(1000)
    sandbox.files.write(p, data, gzip=True)
    assert open(p, "rb").read() == data


def test_gzip_download(sandbox, scratch):
    p = f"{scratch}/gz-down.txt"
    data = b"wrenn gzip " * 100000
    with open(p, "wb") as f:
        f.write(data)
    assert bytes(sandbox.files.read(p, format="bytes", gzip=True)) == data
    assert sandbox.files.read(p, gzip=True) == data.decode()
    assert b"".join(sandbox.files.read(p, format="stream", gzip=True)) == data


def test_gzip_download_wire(envd_url, scratch):
    p = f"{scratch}/gz-wire.txt"
    data = b"abc" * 10000
    with open(p, "wb") as f:
        f.write(data)
    with httpx.Client(trust_env=False) as c:
        r = c.get(f"{envd_url}/files", params={"path": p}, headers={"Accept-Encoding": "gzip"})
        assert r.status_code == 200
        assert r.headers.get("content-encoding") == "gzip"
        assert "accept-encoding" in r.headers.get("vary", "").lower()
        assert r.content == data  # httpx decodes
        r = c.get(f"{envd_url}/files", params={"path": p}, headers={"Accept-Encoding": "identity"})
        assert r.status_code == 200
        assert r.headers.get("content-encoding", "identity") == "identity"
        assert r.content == data


def test_overwrite_truncates(sandbox, scratch):
    p = f"{scratch}/trunc.txt"
    sandbox.files.write(p, "a much longer original content\n")
    sandbox.files.write(p, "short")
    assert sandbox.files.read(p) == "short"
    sandbox.files.write(p, "x" * 100, use_octet_stream=True)
    sandbox.files.write(p, "y", use_octet_stream=True)
    assert sandbox.files.read(p) == "y"


def test_write_files_nested(sandbox, scratch):
    entries = [
        {"path": f"{scratch}/x/y/z/one.txt", "data": "1"},
        {"path": f"{scratch}/two.bin", "data": b"\x00\x02"},
        {"path": f"{scratch}/x/three.txt", "data": "3" * 10000},
        {"path": f"{scratch}/w/four.txt", "data": io.BytesIO(b"four")},
    ]
    res = sandbox.files.write_files(entries)
    assert sorted(r.path for r in res) == sorted(e["path"] for e in entries)
    assert all(r.type == FileType.FILE for r in res)
    assert open(f"{scratch}/x/y/z/one.txt").read() == "1"
    assert open(f"{scratch}/two.bin", "rb").read() == b"\x00\x02"
    assert open(f"{scratch}/x/three.txt").read() == "3" * 10000
    assert open(f"{scratch}/w/four.txt").read() == "four"
    for p in ["x", "x/y", "x/y/z", "x/y/z/one.txt", "two.bin", "x/three.txt", "w", "w/four.txt"]:
        assert owner_of(f"{scratch}/{p}") == "user", p


def test_write_files_multipart_only(sandbox, scratch):
    # All str/bytes -> a single multipart request whose part filenames carry
    # the full destination paths (no `path` query).
    entries = [
        {"path": f"{scratch}/m/a.txt", "data": "A"},
        {"path": f"{scratch}/m/n/b.txt", "data": "B"},
        {"path": f"{scratch}/c.txt", "data": "C"},
    ]
    res = sandbox.files.write_files(entries)
    assert len(res) == 3
    for e in entries:
        assert open(e["path"]).read() == e["data"]
    by_path = {r.path: r for r in res}
    assert by_path[f"{scratch}/m/n/b.txt"].name == "b.txt"


def test_write_as_root(sandbox, scratch):
    p = f"{scratch}/rootdir/rootfile.txt"
    sandbox.files.write(p, "r", user="root")
    assert owner_of(p) == "root"
    assert owner_of(f"{scratch}/rootdir") == "root"
    assert sandbox.files.read(p, user="root") == "r"


def test_relative_and_tilde_paths(sandbox, scratch):
    rel = os.path.relpath(scratch, TEST_HOME)
    sandbox.files.write(f"{rel}/rel.txt", "rel")
    assert open(f"{scratch}/rel.txt").read() == "rel"
    sandbox.files.write(f"~/{rel}/tilde.txt", "tilde")
    assert open(f"{scratch}/tilde.txt").read() == "tilde"
    assert sandbox.files.read(f"~/{rel}/rel.txt") == "rel"
    assert sandbox.files.exists(f"{rel}/tilde.txt")
    # root's home is /root.
    info = sandbox.files.get_info("~", user="root")
    assert info.path == "/root"


def test_unicode_and_space_names(sandbox, scratch):
    p = f"{scratch}/dir with space/ünï cödé ✓.txt"
    sandbox.files.write(p, "u")
    assert sandbox.files.read(p) == "u"
    names = [e.name for e in sandbox.files.list(f"{scratch}/dir with space")]
    assert names == ["ünï cödé ✓.txt"]


def test_metadata_roundtrip(sandbox, scratch):
    p = f"{scratch}/meta.txt"
    info = sandbox.files.write(p, "m", metadata={"Owner-Team": "wrenn", "stage": "test"})
    assert info.metadata == {"owner-team": "wrenn", "stage": "test"}
    assert os.getxattr(p, "user.e2b.owner-team") == b"wrenn"
    assert sandbox.files.get_info(p).metadata == {"owner-team": "wrenn", "stage": "test"}
    # A write without metadata clears it.
    sandbox.files.write(p, "m2")
    assert not sandbox.files.get_info(p).metadata


# --- list / stat -------------------------------------------------------------


@pytest.fixture
def tree(scratch):
    os.makedirs(f"{scratch}/a/b/c")
    for p in ["top.txt", "a/mid.txt", "a/b/low.txt", "a/b/c/deep.txt"]:
        with open(f"{scratch}/{p}", "w") as f:
            f.write(p)
    for root, dirs, files in os.walk(scratch):
        for n in dirs + files:
            chown_to(os.path.join(root, n))
    return scratch


def test_list_depth_1(sandbox, tree):
    entries = sandbox.files.list(tree)
    assert sorted((e.name, e.type) for e in entries) == [
        ("a", FileType.DIR),
        ("top.txt", FileType.FILE),
    ]
    by_name = {e.name: e for e in entries}
    assert by_name["a"].path == f"{tree}/a"
    assert by_name["top.txt"].path == f"{tree}/top.txt"
    assert by_name["top.txt"].size == len("top.txt")
    assert by_name["top.txt"].owner == "user"


def test_list_depth_2_and_3(sandbox, tree):
    got2 = sorted(e.path for e in sandbox.files.list(tree, depth=2))
    assert got2 == sorted(f"{tree}/{p}" for p in ["a", "top.txt", "a/b", "a/mid.txt"])
    got3 = sorted(e.path for e in sandbox.files.list(tree, depth=3))
    assert got3 == sorted(
        f"{tree}/{p}" for p in ["a", "top.txt", "a/b", "a/mid.txt", "a/b/c", "a/b/low.txt"]
    )


def test_list_missing_and_file(sandbox, scratch):
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(f"{scratch}/nope")
    with open(f"{scratch}/f", "w") as f:
        f.write("x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(f"{scratch}/f")


def test_list_follows_symlinked_dir(sandbox, tree):
    os.symlink(f"{tree}/a", f"{tree}/link-to-a")
    entries = sandbox.files.list(f"{tree}/link-to-a")
    assert sorted(e.name for e in entries) == ["b", "mid.txt"]


def test_exists(sandbox, scratch):
    with open(f"{scratch}/e.txt", "w") as f:
        f.write("e")
    assert sandbox.files.exists(f"{scratch}/e.txt") is True
    assert sandbox.files.exists(scratch) is True
    assert sandbox.files.exists(f"{scratch}/nope.txt") is False


def test_get_info_file(sandbox, scratch):
    p = f"{scratch}/info.txt"
    sandbox.files.write(p, "12345")
    os.chmod(p, 0o640)
    before = datetime.datetime.now(datetime.timezone.utc)
    info = sandbox.files.get_info(p)
    assert info.name == "info.txt"
    assert info.path == p
    assert info.type == FileType.FILE
    assert info.size == 5
    assert info.mode == 0o640
    assert info.permissions == "-rw-r-----"
    assert info.owner == "user"
    assert info.group == "user"
    assert info.symlink_target is None
    mtime = datetime.datetime.fromtimestamp(os.stat(p).st_mtime, datetime.timezone.utc)
    assert abs((info.modified_time - mtime).total_seconds()) < 1.5
    assert abs((before - info.modified_time).total_seconds()) < 60


def test_get_info_dir(sandbox, scratch):
    os.mkdir(f"{scratch}/d", 0o750)
    os.chmod(f"{scratch}/d", 0o750)
    info = sandbox.files.get_info(f"{scratch}/d")
    assert info.type == FileType.DIR
    assert info.permissions == "drwxr-x---"
    assert info.mode == 0o750
    assert info.owner == "root"


def test_get_info_symlink(sandbox, scratch):
    target = f"{scratch}/target.txt"
    with open(target, "w") as f:
        f.write("t")
    os.symlink(target, f"{scratch}/link")
    info = sandbox.files.get_info(f"{scratch}/link")
    assert info.symlink_target is not None
    assert info.symlink_target.endswith("target.txt")
    assert info.type in (FileType.FILE, FileType.SYMLINK)


def test_get_info_missing(sandbox, scratch):
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(f"{scratch}/missing")


# --- rename / make_dir / remove ---------------------------------------------


def test_rename(sandbox, scratch):
    sandbox.files.write(f"{scratch}/old.txt", "content")
    info = sandbox.files.rename(f"{scratch}/old.txt", f"{scratch}/new.txt")
    assert info.path == f"{scratch}/new.txt"
    assert info.name == "new.txt"
    assert info.type == FileType.FILE
    assert sandbox.files.exists(f"{scratch}/old.txt") is False
    assert sandbox.files.read(f"{scratch}/new.txt") == "content"


def test_rename_dir(sandbox, scratch):
    sandbox.files.write(f"{scratch}/d1/f.txt", "f")
    info = sandbox.files.rename(f"{scratch}/d1", f"{scratch}/d2")
    assert info.type == FileType.DIR
    assert sandbox.files.read(f"{scratch}/d2/f.txt") == "f"


def test_rename_missing(sandbox, scratch):
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename(f"{scratch}/nope", f"{scratch}/other")


def test_make_dir(sandbox, scratch):
    p = f"{scratch}/newdir/nested/deeper"
    assert sandbox.files.make_dir(p) is True
    assert os.path.isdir(p)
    assert owner_of(p) == "user"
    assert owner_of(f"{scratch}/newdir") == "user"
    assert sandbox.files.make_dir(p) is False


def test_make_dir_over_file(sandbox, scratch):
    with open(f"{scratch}/file", "w") as f:
        f.write("x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir(f"{scratch}/file")


def test_remove(sandbox, scratch):
    sandbox.files.write(f"{scratch}/r.txt", "r")
    sandbox.files.remove(f"{scratch}/r.txt")
    assert not os.path.exists(f"{scratch}/r.txt")
    sandbox.files.write(f"{scratch}/rd/a/b.txt", "b")
    sandbox.files.remove(f"{scratch}/rd")
    assert not os.path.exists(f"{scratch}/rd")
    assert sandbox.files.exists(f"{scratch}/rd") is False
    # Removing a missing path is not an error.
    sandbox.files.remove(f"{scratch}/never-existed")


# --- /files URLs without a token -------------------------------------------


def test_unsigned_urls_without_token(sandbox, scratch):
    p = f"{scratch}/url.txt"
    sandbox.files.write(p, "via url")
    url = sandbox.download_url(p)
    assert "signature" not in url
    r = httpx.get(url, trust_env=False)
    assert r.status_code == 200
    assert r.content == b"via url"

    up = sandbox.upload_url(f"{scratch}/uploaded.txt")
    r = httpx.post(up, files={"file": ("ignored-name.txt", b"uploaded!")}, trust_env=False)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list) and body[0]["path"] == f"{scratch}/uploaded.txt"
    assert body[0]["type"] == "file"
    assert open(f"{scratch}/uploaded.txt", "rb").read() == b"uploaded!"
    assert owner_of(f"{scratch}/uploaded.txt") == "user"


def test_download_headers(envd_url, scratch):
    p = f"{scratch}/page.html"
    with open(p, "w") as f:
        f.write("<p>x</p>")
    r = httpx.get(f"{envd_url}/files", params={"path": p}, trust_env=False)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers.get("content-disposition") == 'inline; filename="page.html"'


def test_range_request(envd_url, scratch):
    p = f"{scratch}/range.bin"
    with open(p, "wb") as f:
        f.write(b"0123456789")
    r = httpx.get(
        f"{envd_url}/files", params={"path": p}, headers={"Range": "bytes=2-5"}, trust_env=False
    )
    assert r.status_code == 206
    assert r.content == b"2345"


def test_stat_wire_format(envd_url, scratch):
    """Protobuf-JSON conventions the SDK (and other Connect clients) rely on."""
    from helpers import unary

    p = f"{scratch}/wire.txt"
    with open(p, "w") as f:
        f.write("12345")
    r = unary(envd_url, "filesystem.Filesystem/Stat", {"path": p})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    e = r.json()["entry"]
    assert e["name"] == "wire.txt"
    assert e["type"] == "FILE_TYPE_FILE"
    assert e["size"] == "5"  # int64 as a JSON string
    assert isinstance(e["mode"], int)
    assert e["modifiedTime"].endswith("Z")
    assert "modified_time" not in e
