"""Directory watching: sync polling watcher and async streaming WatchDir."""

import asyncio
import os
import time

import pytest

from e2b import (
    FileNotFoundException,
    FilesystemEventType,
    InvalidArgumentException,
    SandboxException,
)

C, W, R, MV = (
    FilesystemEventType.CREATE,
    FilesystemEventType.WRITE,
    FilesystemEventType.REMOVE,
    FilesystemEventType.RENAME,
)


def _poll(handle, want, timeout=5.0):
    """Collect events until every (name, type) in `want` was seen."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got.extend(handle.get_new_events())
        seen = {(e.name, e.type) for e in got}
        if want <= seen:
            return got
        time.sleep(0.1)
    raise AssertionError(f"missing events {want - {(e.name, e.type) for e in got}}; got {got}")


def test_sync_watch_create_write_remove(sandbox, scratch):
    h = sandbox.files.watch_dir(scratch)
    try:
        sandbox.files.write(f"{scratch}/w.txt", "one")
        with open(f"{scratch}/w.txt", "a") as f:
            f.write("two")
        sandbox.files.remove(f"{scratch}/w.txt")
        got = _poll(h, {("w.txt", C), ("w.txt", W), ("w.txt", R)})
        # Event names are relative to the watched directory.
        assert all(not e.name.startswith("/") for e in got)
        # Draining: a second call without new activity returns nothing new.
        time.sleep(0.3)
        assert h.get_new_events() == []
    finally:
        h.stop()
    with pytest.raises(SandboxException):
        h.get_new_events()


def test_sync_watch_rename_and_mkdir(sandbox, scratch):
    with open(f"{scratch}/before.txt", "w") as f:
        f.write("x")
    h = sandbox.files.watch_dir(scratch)
    try:
        os.rename(f"{scratch}/before.txt", f"{scratch}/after.txt")
        os.mkdir(f"{scratch}/newdir")
        got = _poll(h, {("newdir", C)})
        names = {(e.name, e.type) for e in got}
        assert ("before.txt", MV) in names or ("before.txt", R) in names, got
        assert ("after.txt", C) in names or ("after.txt", MV) in names, got
    finally:
        h.stop()


def test_sync_watch_non_recursive_ignores_subdirs(sandbox, scratch):
    os.makedirs(f"{scratch}/sub")
    h = sandbox.files.watch_dir(scratch)
    try:
        with open(f"{scratch}/sub/inner.txt", "w") as f:
            f.write("x")
        with open(f"{scratch}/marker.txt", "w") as f:
            f.write("x")
        got = _poll(h, {("marker.txt", C)})
        assert not any("inner.txt" in e.name for e in got), got
    finally:
        h.stop()


def test_sync_watch_recursive(sandbox, scratch):
    os.makedirs(f"{scratch}/sub")
    h = sandbox.files.watch_dir(scratch, recursive=True)
    try:
        with open(f"{scratch}/sub/inner.txt", "w") as f:
            f.write("x")
        time.sleep(0.2)
        os.mkdir(f"{scratch}/sub/new")
        time.sleep(0.3)  # the new subdirectory must get watched too
        os.mkdir(f"{scratch}/sub/new/deeper")
        time.sleep(0.3)
        with open(f"{scratch}/sub/new/deeper/f.txt", "w") as f:
            f.write("y")
        _poll(h, {("sub/inner.txt", C), ("sub/new", C), ("sub/new/deeper", C), ("sub/new/deeper/f.txt", C)})
    finally:
        h.stop()


def test_sync_watch_include_entry(sandbox, scratch):
    h = sandbox.files.watch_dir(scratch, include_entry=True)
    try:
        sandbox.files.write(f"{scratch}/ent.txt", "12")
        got = _poll(h, {("ent.txt", C)})
        ev = next(e for e in got if (e.name, e.type) == ("ent.txt", C))
        assert ev.entry is not None
        assert ev.entry.path == f"{scratch}/ent.txt"
        assert ev.entry.name == "ent.txt"
    finally:
        h.stop()


def test_watch_missing_dir(sandbox, scratch):
    with pytest.raises(FileNotFoundException):
        sandbox.files.watch_dir(f"{scratch}/missing")


def test_watch_file_is_invalid(sandbox, scratch):
    with open(f"{scratch}/plain", "w") as f:
        f.write("x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir(f"{scratch}/plain")


async def test_async_watch_stream(async_sandbox, scratch):
    events = []
    exits = []
    h = await async_sandbox.files.watch_dir(
        scratch, on_event=events.append, on_exit=exits.append, timeout=30
    )
    try:
        await async_sandbox.files.write(f"{scratch}/a.txt", "a")
        with open(f"{scratch}/a.txt", "a") as f:
            f.write("more")
        await async_sandbox.files.remove(f"{scratch}/a.txt")
        want = {("a.txt", C), ("a.txt", W), ("a.txt", R)}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not want <= {(e.name, e.type) for e in events}:
            await asyncio.sleep(0.05)
        assert want <= {(e.name, e.type) for e in events}, events
        assert not exits, f"watch ended early: {exits}"
    finally:
        await h.stop()


async def test_async_watch_recursive_include_entry(async_sandbox, scratch):
    # The write below runs as `user`, so the directory must be theirs.
    await async_sandbox.files.make_dir(f"{scratch}/s")
    events = []
    h = await async_sandbox.files.watch_dir(
        scratch, on_event=events.append, recursive=True, include_entry=True, timeout=30
    )
    try:
        await async_sandbox.files.write(f"{scratch}/s/deep.txt", "d")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(e.name == "s/deep.txt" for e in events):
            await asyncio.sleep(0.05)
        ev = next((e for e in events if e.name == "s/deep.txt" and e.type == C), None)
        assert ev is not None, events
        assert ev.entry is not None and ev.entry.path == f"{scratch}/s/deep.txt"
    finally:
        await h.stop()


async def test_async_watch_missing_dir(async_sandbox, scratch):
    with pytest.raises(FileNotFoundException):
        await async_sandbox.files.watch_dir(f"{scratch}/missing", on_event=lambda e: None)
