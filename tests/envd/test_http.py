"""Plain HTTP routes: /health, /metrics, /envs, and SDK debug-mode wiring."""

import time

import httpx


def test_health(envd_url):
    r = httpx.get(f"{envd_url}/health", trust_env=False)
    assert r.status_code == 204
    assert r.content == b""
    assert "no-store" in r.headers.get("cache-control", "")


def test_metrics(envd_url):
    r = httpx.get(f"{envd_url}/metrics", trust_env=False)
    assert r.status_code == 200, r.text
    m = r.json()
    for key in ["ts", "cpu_count", "mem_total", "mem_used", "mem_total_mib", "mem_used_mib", "disk_used", "disk_total"]:
        assert isinstance(m.get(key), int), (key, m)
    assert isinstance(m.get("cpu_used_pct"), (int, float)), m
    assert abs(m["ts"] - time.time()) < 60
    assert m["cpu_count"] >= 1
    assert 0 < m["mem_used"] <= m["mem_total"]
    assert m["mem_total_mib"] == m["mem_total"] // (1024 * 1024) or abs(
        m["mem_total_mib"] - m["mem_total"] / 1048576
    ) <= 1
    assert 0 < m["disk_used"] <= m["disk_total"]


def test_envs(envd_url):
    r = httpx.get(f"{envd_url}/envs", trust_env=False)
    assert r.status_code == 200
    assert isinstance(r.json(), dict)


def test_sdk_headers_accepted(envd_url):
    # The SDK adds routing headers and a user agent to every call; envd must
    # not choke on them (and must not require them).
    r = httpx.get(
        f"{envd_url}/health",
        headers={"E2b-Sandbox-Id": "x", "E2b-Sandbox-Port": "49983", "User-Agent": "e2b-python-sdk/2.63.0"},
        trust_env=False,
    )
    assert r.status_code == 204


def test_debug_sandbox_create_and_connect(envd):
    from e2b import Sandbox

    sbx = Sandbox.create()
    assert sbx.sandbox_id == "debug_sandbox_id"
    assert sbx.commands.run("echo debug").stdout == "debug\n"
    other = Sandbox.connect("debug_sandbox_id")
    assert other.commands.run("echo again").stdout == "again\n"
