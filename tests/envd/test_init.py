"""POST /init effects (env vars, default user/workdir) on a fresh envd."""

import httpx
import pytest

from helpers import owner_of, sandbox_for

PORT = 49985


@pytest.fixture
def fresh(make_envd):
    inst = make_envd(PORT)
    return inst, sandbox_for(inst.url)


def test_init_env_vars(fresh):
    inst, sbx = fresh
    r = inst.init({"envVars": {"WRENN_A": "1", "WRENN_B": "two words"}})
    assert r.status_code == 204, r.text
    out = sbx.commands.run('printf "%s|%s" "$WRENN_A" "$WRENN_B"').stdout
    assert out == "1|two words"
    # Request envs win over the defaults.
    out = sbx.commands.run('printf "%s" "$WRENN_A"', envs={"WRENN_A": "req"}).stdout
    assert out == "req"
    envs = httpx.get(f"{inst.url}/envs", trust_env=False)
    assert envs.status_code == 200
    assert envs.json().get("WRENN_A") == "1"
    assert envs.json().get("WRENN_B") == "two words"


def test_init_default_user(fresh, scratch):
    inst, sbx = fresh
    assert sbx.commands.run("whoami").stdout == "user\n"
    assert inst.init({"defaultUser": "root"}).status_code == 204
    assert sbx.commands.run("whoami").stdout == "root\n"
    assert sbx.commands.run("whoami", user="user").stdout == "user\n"
    sbx.files.write(f"{scratch}/byroot.txt", "r")
    assert owner_of(f"{scratch}/byroot.txt") == "root"


def test_init_default_workdir(fresh, scratch):
    inst, sbx = fresh
    assert inst.init({"defaultWorkdir": scratch}).status_code == 204
    assert sbx.commands.run("pwd").stdout == scratch + "\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"


def test_init_empty_body_ok(fresh):
    inst, sbx = fresh
    assert inst.init({}).status_code == 204
    assert sbx.commands.run("echo still-open").stdout == "still-open\n"


def test_init_unknown_fields_ignored(fresh):
    inst, _ = fresh
    r = inst.init({"lifecycleID": "x", "somethingNew": True})
    assert r.status_code == 204, r.text


def _rfc3339(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def test_init_env_vars_replaced(fresh):
    inst, sbx = fresh
    assert inst.init({"envVars": {"WRENN_OLD": "1"}}).status_code == 204
    assert inst.init({"envVars": {"WRENN_NEW": "2"}}).status_code == 204
    out = sbx.commands.run('printf "%s|%s" "$WRENN_OLD" "$WRENN_NEW"').stdout
    assert out == "|2", "a later /init envVars must replace the earlier set"


def test_init_stale_timestamp_not_applied(fresh):
    import time

    inst, sbx = fresh
    now = time.time()
    r = inst.init({"timestamp": _rfc3339(now), "envVars": {"WRENN_T": "new"}})
    assert r.status_code == 204, r.text
    # A replayed/stale /init is acknowledged but not applied.
    r = inst.init({"timestamp": _rfc3339(now - 60), "envVars": {"WRENN_T": "stale"}})
    assert r.status_code == 204, r.text
    assert sbx.commands.run('printf "%s" "$WRENN_T"').stdout == "new"
    r = inst.init({"timestamp": _rfc3339(now + 1), "envVars": {"WRENN_T": "newer"}})
    assert r.status_code == 204, r.text
    assert sbx.commands.run('printf "%s" "$WRENN_T"').stdout == "newer"
