"""The host disk reserve through the API: work that could take the host's disk below
`--disk-reserve-mb` is refused up front with 507 (E2B's `{code, message}` on its routes,
`insufficient_storage` on /v1), and nothing of it is left behind."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException


def api(server) -> dict:
    return {"api_key": server.admin_key, "api_url": server.url, "sandbox_url": server.url, "debug": False}


def free_mb(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize >> 20


def settled_free_mb(path: str) -> int:
    """Free space once it stops moving: files other processes just deleted are released
    when the last process holding them (an exiting VMM) closes them."""
    last = free_mb(path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(1)
        now = free_mb(path)
        if abs(now - last) < 16:
            return now
        last = now
    return last


def test_no_room_means_507_and_nothing_left(start_server):
    srv = start_server("disk-full", args=("--disk-reserve-mb", str(1 << 40)))
    h = {"X-API-Key": srv.admin_key}
    r = httpx.post(f"{srv.url}/v1/capsules", json={"template": "minimal"}, headers=h, timeout=60)
    assert r.status_code == 507, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_storage" and "disk space" in err["message"], err
    r = httpx.post(f"{srv.url}/sandboxes", json={"templateID": "base"}, headers=h, timeout=60)
    assert r.status_code == 507 and r.json()["code"] == 507, r.text
    with pytest.raises(SandboxException) as e:
        Sandbox.create("base", **api(srv))
    assert "507" in str(e.value)
    assert httpx.get(f"{srv.url}/v1/capsules", headers=h).json() == []
    assert os.listdir(os.path.join(srv.data_dir, "capsules")) == []


def test_an_upload_that_does_not_fit_is_refused(start_server):
    # Room for one capsule's disk (2 GiB) and about 100 MiB more; the upload below is
    # 900 MiB, far beyond that (free space moves while other processes' files are
    # released) and within the upload limit, so only the disk can refuse it.
    reserve = settled_free_mb("/var/lib/wrenn-test") - 2048 - 100
    srv = start_server("disk-tight", args=("--disk-reserve-mb", str(reserve), "--upload-limit-mib", "2048"))
    s = Sandbox.create("minimal", **api(srv))
    try:
        s.files.write("/tmp/small.txt", "fits")
        assert s.files.read("/tmp/small.txt") == "fits"
        big = b"x" * (900 << 20)
        with pytest.raises(Exception) as e:
            s.files.write("/tmp/big.bin", big)
        assert "507" in str(e.value) or "disk space" in str(e.value), e.value
        h = {"X-API-Key": srv.admin_key}
        r = httpx.post(
            f"{srv.url}/v1/capsules/{s.sandbox_id}/files/write",
            files={"path": (None, "/tmp/big.bin"), "file": ("big.bin", big)},
            headers=h,
            timeout=120,
        )
        assert r.status_code == 507, r.text
        assert s.commands.run("ls /tmp/big.bin || echo absent").stdout.strip().endswith("absent")
    finally:
        s.kill()


@pytest.mark.parametrize("ratio", ["0.5", "101", "many"])
def test_a_disk_overcommit_outside_1_to_100_stops_the_server_by_name(ratio, tmp_path):
    binary = os.path.join(os.path.dirname(__file__), "..", "..", "target", "debug", "wrenn")
    out = subprocess.run(
        [binary, "--data-dir", str(tmp_path), "serve", "--listen", "127.0.0.1:0", "--disk-overcommit", ratio],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "--disk-overcommit" in out.stderr and "from 1 to 100" in out.stderr, out.stderr
