"""The asyncio API: same operations as the sync one, awaited; the event loop
keeps running while Rust works."""

from __future__ import annotations

import asyncio
import time

import pytest

import wrenn_embed as w
from wrenn_embed import AsyncCapsule


async def test_async_commands_streaming_background_files():
    async with await AsyncCapsule.create(template="minimal", envs={"E": "async"}) as c:
        assert c.info.status == "running"
        r = await c.commands.run("echo $E; exit 2")
        assert (r.stdout, r.exit_code) == ("async\n", 2)
        with pytest.raises(w.CommandExitError):
            await c.commands.run("exit 5", check=True)

        # the loop is free while a command runs
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        t = asyncio.create_task(ticker())
        chunks = []
        r = await c.commands.run("sleep 1; echo done", on_stdout=chunks.append)
        t.cancel()
        assert r.stdout == "done\n" and chunks == ["done\n"]
        assert ticks >= 10, f"event loop was blocked ({ticks} ticks)"

        # concurrent commands in one capsule
        outs = await asyncio.gather(*(c.commands.run(f"sleep 0.5; echo {i}") for i in range(3)))
        assert [o.stdout for o in outs] == ["0\n", "1\n", "2\n"]

        events = [e async for e in c.commands.stream("echo x; exit 3")]
        assert [e.type for e in events] == ["start", "stdout", "exit"] and events[-1].exit_code == 3

        h = await c.commands.run("cat", background=True)
        await h.send_stdin("async stdin\n")
        await h.close_stdin()
        assert (await h.wait()).stdout == "async stdin\n"
        h = await c.commands.run("sleep 60", background=True)
        assert await h.kill() is True
        assert (await h.wait()).exit_code == -1

        await c.files.write("/tmp/a/b.txt", "async file")
        assert await c.files.read("/tmp/a/b.txt") == "async file"
        assert await c.files.exists("/tmp/a/b.txt") and not await c.files.exists("/tmp/a/zz")
        assert [e.name for e in await c.files.list("/tmp/a")] == ["b.txt"]
        assert (await c.files.make_dir("/tmp/a/d")).is_dir
        await c.files.remove("/tmp/a")
        with pytest.raises(w.GuestNotFoundError):
            await c.files.read("/tmp/a/b.txt")

        with pytest.raises(w.WrennTimeoutError):
            await c.commands.run("sleep 30", timeout=1)
        with pytest.raises(w.CommandNotFoundError):
            await c.commands.run(["/no/such/binary"])

        # cancelling an awaited command kills it in the guest
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.commands.run("sleep 45"), 0.5)
        await asyncio.sleep(0.5)
        assert not any(p.args[-1:] == ["sleep 45"] for p in await c.commands.list())
    assert all(x.id != c.id for x in await AsyncCapsule.list())


async def test_async_pause_resume_fork_and_errors():
    with pytest.raises(w.TemplateNotFoundError):
        await AsyncCapsule.create(template="no-such-template")
    with pytest.raises(TypeError):
        await AsyncCapsule.create(memory_mb="lots")
    c = await AsyncCapsule.create(template="minimal", memory_mb=256)
    try:
        await c.files.write("/home/user/f.txt", "kept")
        assert (await c.pause()).status == "paused"
        with pytest.raises(w.StateError):
            await c.files.read("/home/user/f.txt")
        again = await AsyncCapsule.connect(c.id)  # resumes a paused capsule
        assert again.info.status == "running"
        assert await c.files.read("/home/user/f.txt") == "kept"
        (kid,) = await c.fork(1)
        try:
            assert isinstance(kid, AsyncCapsule) and kid.id != c.id
            assert await kid.files.read("/home/user/f.txt") == "kept"
        finally:
            await kid.destroy()
    finally:
        await c.destroy()
    with pytest.raises(w.NotFoundError):
        await AsyncCapsule.get_info(c.id)


def test_sync_calls_release_the_gil():
    """Another Python thread keeps running while a sync call waits in Rust."""
    import threading

    from wrenn_embed import Capsule

    with Capsule(template="minimal") as c:
        count = 0
        stop = threading.Event()

        def spin():
            nonlocal count
            while not stop.is_set():
                count += 1
                time.sleep(0.001)

        th = threading.Thread(target=spin)
        th.start()
        c.commands.run("sleep 1")
        stop.set()
        th.join()
        assert count > 200, f"the other thread only ran {count} times"
