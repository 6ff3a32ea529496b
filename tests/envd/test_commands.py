"""commands.run (foreground) through the e2b SDK."""

import time

import pytest

from e2b import CommandExitException, InvalidArgumentException, TimeoutException

from helpers import TEST_HOME, wait_until


def test_run_echo(sandbox):
    r = sandbox.commands.run("echo hello")
    assert r.exit_code == 0
    assert r.stdout == "hello\n"
    assert r.stderr == ""
    assert r.error is None or r.error == ""


def test_nonzero_exit_raises_with_output(sandbox):
    with pytest.raises(CommandExitException) as ei:
        sandbox.commands.run("echo out; echo err >&2; exit 3")
    e = ei.value
    assert e.exit_code == 3
    assert e.stdout == "out\n"
    assert e.stderr == "err\n"


@pytest.mark.parametrize("code", [1, 42, 255])
def test_exit_codes(sandbox, code):
    with pytest.raises(CommandExitException) as ei:
        sandbox.commands.run(f"exit {code}")
    assert ei.value.exit_code == code


def test_killed_by_signal_reports_minus_one(sandbox):
    # bash kills itself with SIGKILL: envd reports exitCode -1 (not 137).
    with pytest.raises(CommandExitException) as ei:
        sandbox.commands.run("kill -9 $$")
    assert ei.value.exit_code == -1


def test_stdout_stderr_separated_and_callbacks(sandbox):
    out, err = [], []
    r = sandbox.commands.run(
        "echo a; echo b >&2; echo c; echo d >&2",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert r.stdout == "a\nc\n"
    assert r.stderr == "b\nd\n"
    assert "".join(out) == "a\nc\n"
    assert "".join(err) == "b\nd\n"


def test_envs(sandbox):
    r = sandbox.commands.run(
        'printf "%s|%s" "$FOO" "$BAR"', envs={"FOO": "x", "BAR": "y z=1"}
    )
    assert r.stdout == "x|y z=1"


def test_base_environment(sandbox):
    r = sandbox.commands.run('printf "%s|%s|%s|%s" "$USER" "$LOGNAME" "$HOME" "$PATH"')
    user, logname, home, path = r.stdout.split("|")
    assert (user, logname, home) == ("user", "user", TEST_HOME)
    assert "/bin" in path.split(":") or "/usr/bin" in path.split(":")


def test_request_envs_override_defaults(sandbox):
    r = sandbox.commands.run('printf "%s" "$HOME"', envs={"HOME": "/tmp"})
    assert r.stdout == "/tmp"


def test_cwd(sandbox, scratch):
    r = sandbox.commands.run("pwd", cwd=scratch)
    assert r.stdout == scratch + "\n"


def test_default_cwd_is_user_home(sandbox):
    assert sandbox.commands.run("pwd").stdout == TEST_HOME + "\n"
    assert sandbox.commands.run("pwd", user="root").stdout == "/root\n"


def test_nonexistent_cwd_is_invalid_argument(sandbox):
    with pytest.raises(InvalidArgumentException):
        sandbox.commands.run("pwd", cwd="/nonexistent/wrenn/dir", timeout=10)


def test_default_user_is_user(sandbox):
    assert sandbox.commands.run("whoami").stdout == "user\n"
    assert sandbox.commands.run("id -u").stdout.strip() != "0"


def test_user_root_and_user(sandbox):
    assert sandbox.commands.run("whoami", user="root").stdout == "root\n"
    assert sandbox.commands.run("whoami", user="user").stdout == "user\n"
    r = sandbox.commands.run('printf "%s %s" "$HOME" "$USER"', user="root")
    assert r.stdout == "/root root"


def test_supplementary_groups_and_gid(sandbox):
    # setgid must happen too, not just setuid.
    r = sandbox.commands.run("id -gn")
    assert r.stdout.strip() == "user"


def test_timeout_raises_quickly(sandbox):
    t0 = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30", timeout=2)
    assert time.monotonic() - t0 < 8


def test_timeout_kills_process(sandbox):
    marker = f"wrenn-timeout-marker-{time.time_ns()}"
    with pytest.raises(TimeoutException):
        sandbox.commands.run(f"exec sleep 30 # {marker}", timeout=2)

    def gone():
        return not any(marker in " ".join(p.args) for p in sandbox.commands.list())

    # Connect-Timeout-Ms on Start bounds the process lifetime.
    wait_until(gone, timeout=5, desc="process past its Connect-Timeout-Ms to be killed")


def test_stdin_closed_by_default(sandbox):
    # commands.run sends stdin:false -> no stdin pipe, `cat` sees EOF at once.
    r = sandbox.commands.run("cat; echo done", timeout=10)
    assert r.stdout == "done\n"


def test_large_output_intact(sandbox):
    n = 800_000
    r = sandbox.commands.run(f"seq 1 {n}", timeout=60)
    expected = "".join(f"{i}\n" for i in range(1, n + 1))
    assert len(r.stdout) == len(expected)  # ~5.3 MB
    assert r.stdout == expected


def test_large_stderr_and_stdout_interleaved(sandbox):
    r = sandbox.commands.run(
        "for i in $(seq 1 20000); do echo out$i; echo err$i >&2; done", timeout=60
    )
    assert r.stdout == "".join(f"out{i}\n" for i in range(1, 20001))
    assert r.stderr == "".join(f"err{i}\n" for i in range(1, 20001))


def test_utf8_output(sandbox):
    r = sandbox.commands.run("printf 'h\\xc3\\xa9llo \\xe2\\x9c\\x93\\n'")
    assert r.stdout == "héllo ✓\n"


def test_pid_is_the_command(sandbox):
    # The start event's pid must be the command itself (no lingering wrapper),
    # otherwise kill/send_stdin address the wrong process.
    h = sandbox.commands.run("echo $$; sleep 0.2", background=True)
    r = h.wait()
    assert r.stdout.strip() == str(h.pid)


def test_quiet_command_completes(sandbox):
    r = sandbox.commands.run("sleep 3; echo late", timeout=20)
    assert r.stdout == "late\n"


def test_login_shell_args_and_quoting(sandbox):
    r = sandbox.commands.run("""printf '%s\\n' "a b" 'c"d' $'e\\tf'""")
    assert r.stdout == 'a b\nc"d\ne\tf\n'


def test_is_running(sandbox):
    assert sandbox.is_running() is True


async def test_async_run(async_sandbox):
    out = []
    r = await async_sandbox.commands.run("echo async; echo e >&2", on_stdout=out.append)
    assert r.stdout == "async\n"
    assert r.stderr == "e\n"
    assert "".join(out) == "async\n"
    with pytest.raises(CommandExitException) as ei:
        await async_sandbox.commands.run("exit 7")
    assert ei.value.exit_code == 7
