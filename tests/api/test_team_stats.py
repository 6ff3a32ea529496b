"""Team load over time (`GET /v1/capsules/stats`) and daily usage (`GET
/v1/capsules/usage`), from samples the server takes every 10 s: a running capsule
counts its vCPUs and memory, a paused one no vCPU and half its memory; peaks are over
30 days; another team sees none of it. With real guests.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(1)


def test_stats_series_peaks_and_usage_follow_the_samples(server):
    with server.other() as o:
        before = o.get("/v1/capsules/usage").json()
        today = datetime.now(timezone.utc).date().isoformat()
        start = next(p for p in before["points"] if p["date"] == today)
        r = o.post("/v1/capsules", json={"template": "minimal", "vcpus": 2, "memory_mb": 512, "timeout_sec": 0})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        try:
            # Running: a 10 s point with the capsule in it.
            def running_point():
                s = o.get("/v1/capsules/stats", params={"range": "5m"}).json()
                return s if any(v >= 1 for v in s["series"]["running"]) else None

            s = wait_for(running_point, 40, "sample of the running capsule")
            assert len(s["series"]["labels"]) == 30
            assert len(s["series"]["running"]) == len(s["series"]["vcpus"]) == len(s["series"]["memory_mb"]) == 30
            i = s["series"]["running"].index(max(s["series"]["running"]))
            assert s["series"]["vcpus"][i] >= 2 and s["series"]["memory_mb"][i] >= 512
            assert s["current"]["running_count"] >= 1 and s["current"]["vcpus_reserved"] >= 2
            assert s["peaks"]["vcpus"] >= 2 and s["peaks"]["memory_mb"] >= 512
            labels = [datetime.fromisoformat(x.replace("Z", "+00:00")) for x in s["series"]["labels"]]
            assert all((b - a).total_seconds() == 10 for a, b in zip(labels, labels[1:]))
            for rng, points in [("1h", 60), ("6h", 72), ("24h", 96), ("30d", 120)]:
                longer = o.get("/v1/capsules/stats", params={"range": rng}).json()
                assert len(longer["series"]["labels"]) == points, rng
                assert max(longer["series"]["vcpus"]) >= 2, rng
            assert o.get("/v1/capsules/stats", params={"range": "2d"}).status_code == 400

            # Paused: no vCPU, half the memory.
            assert o.post(f"/v1/capsules/{cid}/pause").status_code == 200
            paused_at = time.time()

            def paused_point():
                s = o.get("/v1/capsules/stats", params={"range": "5m"}).json()
                cur = s["current"]
                if cur["running_count"] != 0:
                    return None
                last = [
                    (lab, v, m) for lab, v, m in zip(s["series"]["labels"], s["series"]["vcpus"], s["series"]["memory_mb"])
                    if datetime.fromisoformat(lab.replace("Z", "+00:00")).timestamp() > paused_at and m > 0
                ]
                return (cur, last[-1]) if last else None

            cur, (_, vcpus, mem) = wait_for(paused_point, 40, "sample of the paused capsule")
            assert cur == {**cur, "vcpus_reserved": 0, "memory_mb_reserved": 256}
            assert (vcpus, mem) == (0, 256)
            # The peak stays.
            assert o.get("/v1/capsules/stats").json()["peaks"]["vcpus"] >= 2

            # Usage today grew by the samples: 2 vCPUs for each running one (1/6 min).
            after = o.get("/v1/capsules/usage", params={"from": today, "to": today}).json()
            assert [p["date"] for p in after["points"]] == [today]
            got = after["points"][0]
            assert got["cpu_minutes"] - start["cpu_minutes"] >= 2 / 6 - 1e-3, (start, got)
            assert got["ram_mb_minutes"] - start["ram_mb_minutes"] >= (512 + 256) / 6 - 1e-3
        finally:
            o.delete(f"/v1/capsules/{cid}")
    # The admin team's stats hold nothing of it (its own capsules only).
    with server.admin() as a:
        s = a.get("/v1/capsules/stats").json()
        assert s["current"]["running_count"] == len(
            [c for c in a.get("/v1/capsules").json() if c["status"] == "running"]
        )
