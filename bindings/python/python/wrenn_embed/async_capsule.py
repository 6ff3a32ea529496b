"""The asyncio API: :class:`AsyncCapsule` (same shape as :class:`Capsule`,
every operation a coroutine). The work runs on the binding's own runtime; the
event loop is only woken when it is done."""

from __future__ import annotations

import builtins
import secrets
from typing import Any, AsyncIterator, Dict, List, Literal, Optional, Tuple, Union, overload

from . import _native
from ._errors import GuestNotFoundError, WrennError
from ._models import CapsuleInfo, CommandResult, FileEntry, ProcessInfo, StreamErrorEvent, StreamEvent, StreamStartEvent, Template
from ._runtime import Collector, adrive, argv_of, await_pending, one, start_op, wait_op
from .capsule import (
    _DEFAULT,
    _GRACE,
    Cmd,
    OutputCallback,
    _check_id,
    _create_args,
    _network_args,
    _data,
    _exec_kwargs,
    _exists_op,
    _make_dir_op,
    _opt,
    _path,
    _timeout,
)


class AsyncCommandHandle:
    """A background command (async): ``async for`` its events, ``await
    wait()``, ``await kill()``, ``await send_stdin()``."""

    def __init__(self, capsule_id: str, handle: Any, proc: Any, tag: Optional[str]) -> None:
        self.capsule_id = capsule_id
        self.pid: int = proc.pid
        self.tag: str = tag or ""
        self._handle = handle
        self._proc = proc
        self._col = Collector()

    def __repr__(self) -> str:
        return f"<AsyncCommandHandle pid={self.pid} capsule={self.capsule_id}>"

    @property
    def exit_code(self) -> Optional[int]:
        return self._col.exit_code

    @property
    def stdout(self) -> str:
        return bytes(self._col.stdout).decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return bytes(self._col.stderr).decode("utf-8", "replace")

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        while not self._col.ended:
            try:
                ev = self._col.feed(await await_pending(self._proc.next_event()))
            except WrennError as e:
                self._col.ended = True
                yield StreamErrorEvent(str(e), e)
                return
            if ev is not None:
                yield ev

    async def wait(
        self,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        timeout: Optional[float] = None,
    ) -> CommandResult:
        self._col.on_stdout, self._col.on_stderr = on_stdout, on_stderr
        _opt("timeout", timeout, int, float)
        return await adrive(wait_op(self.capsule_id, self._proc, self._col, timeout))

    async def kill(self) -> bool:
        try:
            await adrive(one(_native.signal(self.capsule_id, self.pid, True)))
            return True
        except GuestNotFoundError:
            return False

    async def send_stdin(self, data: Union[str, bytes]) -> None:
        await adrive(one(_native.send_stdin(self.capsule_id, self.pid, _data(data))))

    async def close_stdin(self) -> None:
        await adrive(one(_native.close_stdin(self.capsule_id, self.pid)))


class AsyncCommands:
    """Commands in a capsule (async). See :class:`wrenn_embed.Commands`."""

    def __init__(self, capsule_id: str, handle: Any) -> None:
        self._id = capsule_id
        self._handle = handle

    @overload
    async def run(self, cmd: Cmd, *, background: Literal[False] = ..., timeout: Optional[float] = ..., envs: Optional[Dict[str, str]] = ..., cwd: Optional[str] = ..., user: Optional[str] = ..., tag: Optional[str] = ..., stdin: Union[None, str, bytes] = ..., on_stdout: Optional[OutputCallback] = ..., on_stderr: Optional[OutputCallback] = ..., check: bool = ...) -> CommandResult: ...

    @overload
    async def run(self, cmd: Cmd, *, background: Literal[True], timeout: Optional[float] = ..., envs: Optional[Dict[str, str]] = ..., cwd: Optional[str] = ..., user: Optional[str] = ..., tag: Optional[str] = ..., stdin: Union[None, bool, str, bytes] = ..., on_stdout: Optional[OutputCallback] = ..., on_stderr: Optional[OutputCallback] = ..., check: bool = ...) -> AsyncCommandHandle: ...

    async def run(
        self,
        cmd: Cmd,
        *,
        background: bool = False,
        timeout: Any = _DEFAULT,
        envs: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        tag: Optional[str] = None,
        stdin: Union[None, bool, str, bytes] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        check: bool = False,
    ) -> Union[CommandResult, AsyncCommandHandle]:
        program, args, is_argv = argv_of(cmd, None)
        t = _timeout(timeout, background)
        kw = _exec_kwargs(envs, cwd, user, tag)
        feed: Optional[bytes] = None
        if background:
            keep_stdin = stdin if isinstance(stdin, bool) else True
            if stdin is not None and not isinstance(stdin, bool):
                feed = _data(stdin)
        else:
            keep_stdin = stdin is not None
            if stdin is not None:
                feed = _data(stdin)

        def op() -> Any:
            proc = yield from start_op(self._id, program, args, is_argv, timeout=t, stdin=keep_stdin, **kw)
            if feed is not None:
                try:
                    if feed:
                        yield _native.send_stdin(self._id, proc.pid, feed)
                    if not background:
                        yield _native.close_stdin(self._id, proc.pid)
                except BaseException:
                    _native.signal(self._id, proc.pid, True)
                    raise
            if background:
                return AsyncCommandHandle(self._id, self._handle, proc, tag)
            col = Collector(on_stdout, on_stderr)
            return (yield from wait_op(self._id, proc, col, None if t is None else t + _GRACE))

        out = await adrive(op())
        if check and isinstance(out, CommandResult):
            out.check()
        return out

    async def stream(
        self,
        cmd: Cmd,
        args: Optional[List[str]] = None,
        *,
        timeout: Any = _DEFAULT,
        envs: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
    ) -> AsyncIterator[StreamEvent]:
        program, argv, is_argv = argv_of(cmd, args)
        t = _timeout(timeout, False)
        kw = _exec_kwargs(envs, cwd, user, None)
        proc = await adrive(start_op(self._id, program, argv, is_argv, timeout=t, **kw))
        h = AsyncCommandHandle(self._id, self._handle, proc, None)
        try:
            yield StreamStartEvent(proc.pid)
            async for ev in h:
                if ev.type != "start":
                    yield ev
        finally:
            if h.exit_code is None:
                _native.signal(self._id, proc.pid, True)

    async def connect(self, pid: int) -> AsyncCommandHandle:
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError("pid must be an int")
        proc = await adrive(one(_native.connect_process(self._id, pid)))
        return AsyncCommandHandle(self._id, self._handle, proc, None)

    async def list(self) -> builtins.list[ProcessInfo]:
        return [ProcessInfo(**p) for p in await adrive(one(_native.list_processes(self._id)))]

    async def kill(self, pid: int) -> bool:
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError("pid must be an int")
        try:
            await adrive(one(_native.signal(self._id, pid, True)))
            return True
        except GuestNotFoundError:
            return False

    async def send_stdin(self, pid: int, data: Union[str, bytes]) -> None:
        await adrive(one(_native.send_stdin(self._id, pid, _data(data))))


class AsyncFiles:
    """The capsule's filesystem (async). See :class:`wrenn_embed.Files`."""

    _CHUNK = 1 << 16

    def __init__(self, capsule_id: str, handle: Any) -> None:
        self._id = capsule_id
        self._handle = handle

    async def read(self, path: str) -> str:
        return (await self.read_bytes(path)).decode("utf-8", "replace")

    async def read_bytes(self, path: str) -> bytes:
        return await adrive(one(_native.read_file(self._id, _path(path))))

    async def write(self, path: str, data: Union[str, bytes]) -> None:
        await adrive(one(_native.write_file(self._id, _path(path), _data(data))))

    async def list(self, path: str, depth: int = 1) -> builtins.list[FileEntry]:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise TypeError("depth must be a positive int")
        return [FileEntry._from(e) for e in await adrive(one(_native.list_dir(self._id, _path(path), depth)))]

    async def stat(self, path: str) -> FileEntry:
        return FileEntry._from(await adrive(one(_native.stat(self._id, _path(path)))))

    async def exists(self, path: str) -> bool:
        return await adrive(_exists_op(self._id, _path(path)))

    async def make_dir(self, path: str) -> FileEntry:
        return await adrive(_make_dir_op(self._id, _path(path)))

    async def remove(self, path: str) -> None:
        await adrive(one(_native.remove(self._id, _path(path))))

    async def upload_stream(self, path: str, stream: AsyncIterator[bytes]) -> None:
        chunks = [_data(c) async for c in stream]
        await self.write(path, b"".join(chunks))

    async def download_stream(self, path: str) -> AsyncIterator[bytes]:
        data = await self.read_bytes(path)
        for i in range(0, len(data), self._CHUNK):
            yield data[i : i + self._CHUNK]


class _AsyncDualMethod:
    def __init__(self, instance_fn: str, static_fn: str) -> None:
        self._ifn, self._sfn = instance_fn, static_fn

    def __get__(self, obj: Any, cls: type) -> Any:
        return getattr(cls, self._sfn) if obj is None else getattr(obj, self._ifn)


class AsyncCapsule:
    """A capsule run by this process, driven from asyncio::

        async with await AsyncCapsule.create(template="python") as capsule:
            out = await capsule.commands.run("python3 -V")
    """

    def __init__(self, *, _bound: Tuple[Dict[str, Any], Any]) -> None:
        info, handle = _bound
        self._info: CapsuleInfo = CapsuleInfo._from(info)
        self._id: str = self._info.id
        self._handle = handle
        self.commands = AsyncCommands(self._id, handle)
        self.files = AsyncFiles(self._id, handle)

    def __repr__(self) -> str:
        return f"<AsyncCapsule {self._id} {self._info.template} {self._info.status}>"

    @property
    def capsule_id(self) -> str:
        return self._id

    @property
    def id(self) -> str:
        return self._id

    @property
    def info(self) -> CapsuleInfo:
        return self._info

    @classmethod
    async def create(
        cls,
        template: Optional[str] = None,
        vcpus: Optional[int] = None,
        memory_mb: Optional[int] = None,
        timeout: Optional[int] = None,
        *,
        envs: Optional[Dict[str, str]] = None,
        metadata: Optional[Dict[str, str]] = None,
        disk_mb: Optional[int] = None,
        cold_boot: bool = False,
        network: Optional[Dict[str, List[str]]] = None,
        wait: bool = False,
        api_key: Optional[str] = None,
        base_url: Optional[str] = None,
    ) -> "AsyncCapsule":
        kw = _create_args(template, vcpus, memory_mb, disk_mb, envs, metadata, network)
        return cls(_bound=await adrive(one(_native.create(cold_boot=bool(cold_boot), **kw))))

    @classmethod
    async def connect(cls, capsule_id: str, *, api_key: Optional[str] = None, base_url: Optional[str] = None) -> "AsyncCapsule":
        cid = _check_id(capsule_id)

        def op() -> Any:
            info, handle = yield _native.connect(cid)
            if info["status"] == "paused":
                info = yield _native.resume(cid)
            return info, handle

        return cls(_bound=await adrive(op()))

    @classmethod
    async def list(cls, *, api_key: Optional[str] = None, base_url: Optional[str] = None) -> builtins.list[CapsuleInfo]:
        return [CapsuleInfo._from(d) for d in await adrive(one(_native.list()))]

    destroy = _AsyncDualMethod("_instance_destroy", "_static_destroy")
    pause = _AsyncDualMethod("_instance_pause", "_static_pause")
    resume = _AsyncDualMethod("_instance_resume", "_static_resume")
    get_info = _AsyncDualMethod("_instance_get_info", "_static_get_info")

    async def _instance_destroy(self) -> None:
        self._handle.release()
        await adrive(one(_native.destroy(self._id)))

    @classmethod
    async def _static_destroy(cls, capsule_id: str, **_: Any) -> None:
        await adrive(one(_native.destroy(_check_id(capsule_id))))

    async def _instance_pause(self) -> CapsuleInfo:
        self._info = CapsuleInfo._from(await adrive(one(_native.pause(self._id))))
        return self._info

    @classmethod
    async def _static_pause(cls, capsule_id: str, **_: Any) -> CapsuleInfo:
        return CapsuleInfo._from(await adrive(one(_native.pause(_check_id(capsule_id)))))

    async def set_network(self, network: Optional[Dict[str, List[str]]] = None) -> CapsuleInfo:
        """Replaces the egress policy (see ``Capsule.set_network``)."""
        kw = _network_args(network)
        self._info = CapsuleInfo._from(await adrive(one(_native.set_network(self._id, **kw))))
        return self._info

    async def _instance_resume(self) -> CapsuleInfo:
        self._info = CapsuleInfo._from(await adrive(one(_native.resume(self._id))))
        return self._info

    @classmethod
    async def _static_resume(cls, capsule_id: str, **_: Any) -> CapsuleInfo:
        return CapsuleInfo._from(await adrive(one(_native.resume(_check_id(capsule_id)))))

    async def _instance_get_info(self) -> CapsuleInfo:
        self._info = CapsuleInfo._from(await adrive(one(_native.get(self._id))))
        return self._info

    @classmethod
    async def _static_get_info(cls, capsule_id: str, **_: Any) -> CapsuleInfo:
        return CapsuleInfo._from(await adrive(one(_native.get(_check_id(capsule_id)))))

    async def is_running(self) -> bool:
        return (await self._instance_get_info()).status == "running"

    async def wait_ready(self, timeout: float = 30, interval: float = 0.5) -> None:
        if (await self._instance_get_info()).status == "paused":
            await self._instance_resume()

    async def ping(self) -> None:
        """No-op (no inactivity timer in-process)."""

    def keep(self) -> "AsyncCapsule":
        self._handle.release()
        return self

    async def create_snapshot(self, name: Optional[str] = None, overwrite: bool = False) -> Template:
        _opt("name", name, str)
        name = name or f"template-{secrets.token_hex(4)}"
        await adrive(one(_native.snapshot(self._id, name, bool(overwrite))))
        return Template(name)

    async def snapshot(self, name: str, overwrite: bool = False) -> Template:
        if not isinstance(name, str):
            raise TypeError("name must be a str")
        return await self.create_snapshot(name, overwrite)

    async def fork(self, n: int = 1) -> builtins.list["AsyncCapsule"]:
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError("n must be an int")
        return [type(self)(_bound=b) for b in await adrive(one(_native.fork(self._id, n)))]

    async def __aenter__(self) -> "AsyncCapsule":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._instance_destroy()
        except WrennError as e:
            if e.kind != "not_found":
                import logging

                logging.getLogger("wrenn_embed").warning("Failed to destroy capsule %s: %s", self._id, e)


async def async_host_info() -> Dict[str, Any]:
    return await adrive(one(_native.host_info()))
