"""The AsyncSandbox flavour over the same envd (separate transport stack)."""

import asyncio

import pytest

from e2b import CommandExitException, FileNotFoundException, FileType


async def test_async_files_roundtrip(async_sandbox, scratch):
    f = async_sandbox.files
    info = await f.write(f"{scratch}/n/a.txt", "async text")
    assert info.path == f"{scratch}/n/a.txt"
    assert await f.read(f"{scratch}/n/a.txt") == "async text"
    data = bytes(range(256)) * 4000
    await f.write(f"{scratch}/b.bin", data, gzip=True)
    assert bytes(await f.read(f"{scratch}/b.bin", format="bytes", gzip=True)) == data
    chunks = [c async for c in await f.read(f"{scratch}/b.bin", format="stream")]
    assert b"".join(chunks) == data
    names = sorted((e.name, e.type) for e in await f.list(scratch))
    assert names == [("b.bin", FileType.FILE), ("n", FileType.DIR)]
    assert await f.exists(f"{scratch}/n") is True
    assert await f.make_dir(f"{scratch}/n") is False
    await f.rename(f"{scratch}/n/a.txt", f"{scratch}/n/c.txt")
    assert (await f.get_info(f"{scratch}/n/c.txt")).size == len("async text")
    await f.remove(f"{scratch}/n")
    with pytest.raises(FileNotFoundException):
        await f.read(f"{scratch}/n/c.txt")


async def test_async_background_connect_kill(async_sandbox):
    c = async_sandbox.commands
    h = await c.run("head -n1; sleep 30", background=True, stdin=True, timeout=30)
    try:
        assert any(p.pid == h.pid for p in await c.list())
        await c.send_stdin(h.pid, "async-in\n")
        for _ in range(50):
            if "async-in" in h.stdout:
                break
            await asyncio.sleep(0.05)
        assert h.stdout == "async-in\n"
        out = []
        h2 = await c.connect(h.pid, on_stdout=out.append, timeout=30)
        assert await c.kill(h.pid) is True
        with pytest.raises(CommandExitException) as ei:
            await h2.wait()
        assert ei.value.exit_code == -1
    finally:
        await c.kill(h.pid)
    assert await c.kill(h.pid) is False


async def test_async_many_concurrent(async_sandbox):
    results = await asyncio.gather(
        *(async_sandbox.commands.run(f"echo {i}") for i in range(30))
    )
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(30)]
