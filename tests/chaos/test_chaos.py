"""The reliability suite, bounded for CI (`cargo bench --bench reliability` runs the long
form): kill -9 of `wrenn serve` during mixed lifecycle operations (then of `wrenn serve
--agent` and `wrenn agent` as two processes), faults (a VMM killed
mid-pause, a frozen guest), and a short load phase. Nothing may leak, no paused capsule
may be lost, and the load must see no error that is not 429."""

from __future__ import annotations

import json
import os

import pytest

from . import chaos

OPS = int(os.environ.get("WRENN_CHAOS_OPS", "30"))
KILLS = int(os.environ.get("WRENN_CHAOS_KILLS", "5"))
# The same with `wrenn serve --agent` + `wrenn agent`, kills hitting either.
SPLIT_OPS = int(os.environ.get("WRENN_CHAOS_SPLIT_OPS", "16"))
SPLIT_KILLS = int(os.environ.get("WRENN_CHAOS_SPLIT_KILLS", "4"))


@pytest.mark.timeout(3600)
def test_kills_faults_and_load_leave_nothing_behind():
    if os.geteuid() != 0:
        pytest.fail("the chaos suite must run as root (capsules need network namespaces)")
    if not os.access(os.path.join(chaos.REPO, "target", "debug", "wrenn"), os.X_OK):
        pytest.fail("target/debug/wrenn is missing: cargo build -p wrenn-server")
    lines = []
    out = chaos.run(
        binary=os.path.join(chaos.REPO, "target", "debug", "wrenn"),
        ops=OPS,
        kills=KILLS,
        clients=20,
        load_secs=10,
        churn=2,
        seed=int(os.environ.get("WRENN_CHAOS_SEED", "7")),
        log=lines.append,
        split_ops=SPLIT_OPS,
        split_kills=SPLIT_KILLS,
    )
    print("\n".join(lines))
    print(json.dumps({k: v for k, v in out.items() if k != "problems"}))
    assert out["kill_points"] == KILLS + SPLIT_KILLS
    # The two-process phase's kills alternate, the agent first.
    assert out["agent_kill_points"] == (SPLIT_KILLS + 1) // 2, out
    assert out["load_requests"] > 0 and out["load_churned_capsules"] > 0, out
    # The kills found paused capsules to bring back (the check is not vacuous).
    assert out["paused_checked"] > 0, out
    assert out["problems"] == [], "\n".join(out["problems"])
    assert (out["leaks"], out["lost_paused"], out["load_errors"], out["fault_problems"]) == (0, 0, 0, 0), out
