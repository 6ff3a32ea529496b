"""The sync API: :class:`Capsule`, ``capsule.commands``, ``capsule.files``."""

from __future__ import annotations

import builtins
import os
import posixpath
import secrets
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union, overload

from . import _native
from ._errors import GuestNotFoundError, InvalidArgumentError, WrennError
from ._models import CapsuleInfo, CommandResult, FileEntry, ProcessInfo, StreamEvent, StreamErrorEvent, StreamStartEvent, Template
from ._runtime import Collector, argv_of, drive, one, start_op, wait_op

from typing import Literal

Cmd = Union[str, List[str], Tuple[str, ...]]
OutputCallback = Callable[[str], Any]

#: ``timeout`` default of ``commands.run``: 30 s in the foreground (like the
#: reference SDK), no limit in the background.
_DEFAULT = object()
FOREGROUND_TIMEOUT = 30.0
#: Extra host-side grace beyond a command's own timeout before the wait gives up.
_GRACE = 10.0


# ---------------------------------------------------------------------------
# argument checks (wrong types are TypeError, before anything reaches Rust)


def _opt(name: str, v: Any, *types: type) -> None:
    if v is not None and (not isinstance(v, types) or (int in types and isinstance(v, bool))):
        want = " or ".join(t.__name__ for t in types)
        raise TypeError(f"{name} must be {want} or None, not {type(v).__name__}")


def _str_map(name: str, v: Any) -> Optional[Dict[str, str]]:
    if v is None:
        return None
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise TypeError(f"{name} must be a dict of str to str")
    return dict(v)


def _path(v: Any) -> str:
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str):
        raise TypeError(f"path must be a str, not {type(v).__name__}")
    return v


def _data(v: Any) -> bytes:
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    raise TypeError(f"data must be str or bytes, not {type(v).__name__}")


def _timeout(v: Any, background: bool) -> Optional[float]:
    if v is _DEFAULT:
        return None if background else FOREGROUND_TIMEOUT
    _opt("timeout", v, int, float)
    return None if v is None or v == 0 else float(v)


def _network_args(network: Any) -> Dict[str, Any]:
    """``{"allow_out": [...], "deny_out": [...], "dns_servers": [...]}`` (all optional)."""
    if network is None:
        return {}
    if not isinstance(network, dict):
        raise TypeError(f"network must be a dict, not {type(network).__name__}")
    unknown = set(network) - {"allow_out", "deny_out", "dns_servers"}
    if unknown:
        raise ValueError(f"unknown network settings: {sorted(unknown)}")
    out: Dict[str, Any] = {}
    for k, v in network.items():
        if v is None:
            continue
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise TypeError(f"network[{k!r}] must be a list of str")
        out[k] = list(v)
    return out


def _create_args(
    template: Any, vcpus: Any, memory_mb: Any, disk_mb: Any, envs: Any, metadata: Any, network: Any = None
) -> Dict[str, Any]:
    _opt("template", template, str)
    _opt("vcpus", vcpus, int)
    _opt("memory_mb", memory_mb, int)
    _opt("disk_mb", disk_mb, int)
    return dict(
        template=template,
        vcpus=vcpus,
        memory_mb=memory_mb,
        disk_mb=disk_mb,
        envs=_str_map("envs", envs),
        metadata=_str_map("metadata", metadata),
        **_network_args(network),
    )


def _check_id(capsule_id: Any) -> str:
    if not isinstance(capsule_id, str):
        raise TypeError(f"capsule_id must be a str, not {type(capsule_id).__name__}")
    return capsule_id


def _exec_kwargs(envs: Any, cwd: Any, user: Any, tag: Any) -> Dict[str, Any]:
    _opt("cwd", cwd, str)
    _opt("user", user, str)
    _opt("tag", tag, str)
    return dict(envs=_str_map("envs", envs), cwd=cwd, user=user, tag=tag)


class _DualMethod:
    """``Capsule.destroy(id)`` (by id) and ``capsule.destroy()`` (this one), like
    the reference SDK."""

    def __init__(self, instance_fn: str, static_fn: str) -> None:
        self._ifn, self._sfn = instance_fn, static_fn

    def __get__(self, obj: Any, cls: type) -> Any:
        return getattr(cls, self._sfn) if obj is None else getattr(obj, self._ifn)


# ---------------------------------------------------------------------------
# Commands


class CommandHandle:
    """A background command: iterate it for :class:`StreamEvent` s, ``wait()``
    for its result, ``kill()`` it, feed it with ``send_stdin()``."""

    def __init__(self, capsule_id: str, handle: Any, proc: Any, tag: Optional[str], timeout: Optional[float]) -> None:
        self.capsule_id = capsule_id
        self.pid: int = proc.pid
        self.tag: str = tag or ""
        self._handle = handle  # keeps the capsule alive while the handle is
        self._proc = proc
        self._timeout = timeout
        self._col = Collector()

    def __repr__(self) -> str:
        return f"<CommandHandle pid={self.pid} capsule={self.capsule_id}>"

    @property
    def exit_code(self) -> Optional[int]:
        """The exit code once the process has exited (and been waited for or iterated)."""
        return self._col.exit_code

    @property
    def stdout(self) -> str:
        return bytes(self._col.stdout).decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return bytes(self._col.stderr).decode("utf-8", "replace")

    def __iter__(self) -> Iterator[StreamEvent]:
        while not self._col.ended:
            try:
                ev = self._col.feed(self._proc.next_event().wait())
            except WrennError as e:
                self._col.ended = True
                yield StreamErrorEvent(str(e), e)
                return
            if ev is not None:
                yield ev

    def wait(
        self,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        timeout: Optional[float] = None,
    ) -> CommandResult:
        """Waits for the process to end and returns its result (output produced
        before the call included). ``timeout`` (s): give up waiting (the process
        is killed) — the command's own ``timeout`` applies regardless."""
        self._col.on_stdout, self._col.on_stderr = on_stdout, on_stderr
        _opt("timeout", timeout, int, float)
        return drive(wait_op(self.capsule_id, self._proc, self._col, timeout))

    def kill(self) -> bool:
        """SIGKILLs the process. Returns False if it was already gone."""
        try:
            drive(one(_native.signal(self.capsule_id, self.pid, True)))
            return True
        except GuestNotFoundError:
            return False

    def send_stdin(self, data: Union[str, bytes]) -> None:
        drive(one(_native.send_stdin(self.capsule_id, self.pid, _data(data))))

    def close_stdin(self) -> None:
        drive(one(_native.close_stdin(self.capsule_id, self.pid)))


class Commands:
    """Commands in a capsule (``capsule.commands``)."""

    def __init__(self, capsule_id: str, handle: Any) -> None:
        self._id = capsule_id
        self._handle = handle

    @overload
    def run(self, cmd: Cmd, *, background: Literal[False] = ..., timeout: Optional[float] = ..., envs: Optional[Dict[str, str]] = ..., cwd: Optional[str] = ..., user: Optional[str] = ..., tag: Optional[str] = ..., stdin: Union[None, str, bytes] = ..., on_stdout: Optional[OutputCallback] = ..., on_stderr: Optional[OutputCallback] = ..., check: bool = ...) -> CommandResult: ...

    @overload
    def run(self, cmd: Cmd, *, background: Literal[True], timeout: Optional[float] = ..., envs: Optional[Dict[str, str]] = ..., cwd: Optional[str] = ..., user: Optional[str] = ..., tag: Optional[str] = ..., stdin: Union[None, bool, str, bytes] = ..., on_stdout: Optional[OutputCallback] = ..., on_stderr: Optional[OutputCallback] = ..., check: bool = ...) -> CommandHandle: ...

    def run(
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
    ) -> Union[CommandResult, CommandHandle]:
        """Runs a command in the capsule.

        ``cmd`` is a shell string (run as ``/bin/sh -c cmd``, like the reference
        SDK) or an argv list (run directly; a missing program raises
        :class:`CommandNotFoundError`). ``timeout`` (seconds; default 30 in the
        foreground, none in the background; ``None``/0 = none) kills the command
        and raises :class:`WrennTimeoutError`. ``envs``/``cwd``/``user`` apply to
        the process. ``stdin`` (str/bytes) is fed to a foreground command, then
        closed.

        Foreground: returns :class:`CommandResult` (a non-zero exit code is *not*
        an error, as in the reference SDK; pass ``check=True`` to raise
        :class:`CommandExitError`). ``on_stdout``/``on_stderr`` receive output as
        it arrives. Background (``background=True``): returns a
        :class:`CommandHandle` at once (its stdin stays open for
        ``send_stdin``). Ctrl-C while waiting kills the command.
        """
        program, args, is_argv = argv_of(cmd, None)
        t = _timeout(timeout, background)
        kw = _exec_kwargs(envs, cwd, user, tag)
        feed: Optional[bytes] = None
        if background:
            keep_stdin = True if stdin is None else bool(stdin) if isinstance(stdin, bool) else True
            if stdin is not None and not isinstance(stdin, bool):
                feed = _data(stdin)
        else:
            keep_stdin = stdin is not None
            if stdin is not None:
                feed = _data(stdin)

        def op() -> Any:
            proc = yield from start_op(self._id, program, args, is_argv, timeout=t, stdin=keep_stdin, **kw)
            if feed is not None or (keep_stdin and not background):
                try:
                    if feed:
                        yield _native.send_stdin(self._id, proc.pid, feed)
                    if not background:
                        yield _native.close_stdin(self._id, proc.pid)
                except BaseException:
                    _native.signal(self._id, proc.pid, True)
                    raise
            if background:
                return CommandHandle(self._id, self._handle, proc, tag, t)
            col = Collector(on_stdout, on_stderr)
            return (yield from wait_op(self._id, proc, col, None if t is None else t + _GRACE))

        out = drive(op())
        if check and isinstance(out, CommandResult):
            out.check()
        return out

    def stream(
        self,
        cmd: Cmd,
        args: Optional[List[str]] = None,
        *,
        timeout: Any = _DEFAULT,
        envs: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
    ) -> Iterator[StreamEvent]:
        """Runs a command and yields its events as they happen: start, stdout,
        stderr, exit (or error). Leaving the loop early kills the command."""
        program, argv, is_argv = argv_of(cmd, args)
        t = _timeout(timeout, False)
        kw = _exec_kwargs(envs, cwd, user, None)
        proc = drive(start_op(self._id, program, argv, is_argv, timeout=t, **kw))
        h = CommandHandle(self._id, self._handle, proc, None, t)
        try:
            yield StreamStartEvent(proc.pid)
            for ev in h:
                if ev.type != "start":
                    yield ev
        finally:
            if h.exit_code is None:
                _native.signal(self._id, proc.pid, True)

    def connect(self, pid: int) -> CommandHandle:
        """Re-attaches to a running process (its output from now on)."""
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError("pid must be an int")
        proc = drive(one(_native.connect_process(self._id, pid)))
        return CommandHandle(self._id, self._handle, proc, None, None)

    def list(self) -> builtins.list[ProcessInfo]:
        """Processes started through the agent that are still running."""
        return [ProcessInfo(**p) for p in drive(one(_native.list_processes(self._id)))]

    def kill(self, pid: int) -> bool:
        """SIGKILLs a process. Returns False if there was none."""
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError("pid must be an int")
        try:
            drive(one(_native.signal(self._id, pid, True)))
            return True
        except GuestNotFoundError:
            return False

    def send_stdin(self, pid: int, data: Union[str, bytes]) -> None:
        drive(one(_native.send_stdin(self._id, pid, _data(data))))


# ---------------------------------------------------------------------------
# Files


def _exists_op(capsule_id: str, path: str) -> Any:
    try:
        yield _native.stat(capsule_id, path)
        return True
    except GuestNotFoundError:
        return False


def _make_dir_op(capsule_id: str, path: str) -> Any:
    try:
        return FileEntry._from((yield _native.make_dir(capsule_id, path)))
    except InvalidArgumentError:
        # Already there: idempotent, like the reference SDK.
        entry = FileEntry._from((yield _native.stat(capsule_id, path)))
        if not entry.is_dir:
            raise
        return entry


class Files:
    """The capsule's filesystem (``capsule.files``). Paths are absolute paths
    in the guest; operations run as the guest's default user."""

    _CHUNK = 1 << 16

    def __init__(self, capsule_id: str, handle: Any) -> None:
        self._id = capsule_id
        self._handle = handle

    def read(self, path: str) -> str:
        """A file's content as UTF-8 text (raises :class:`GuestNotFoundError`)."""
        return self.read_bytes(path).decode("utf-8", "replace")

    def read_bytes(self, path: str) -> bytes:
        return drive(one(_native.read_file(self._id, _path(path))))

    def write(self, path: str, data: Union[str, bytes]) -> None:
        """Writes a file (parent directories are created)."""
        drive(one(_native.write_file(self._id, _path(path), _data(data))))

    def list(self, path: str, depth: int = 1) -> builtins.list[FileEntry]:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise TypeError("depth must be a positive int")
        return [FileEntry._from(e) for e in drive(one(_native.list_dir(self._id, _path(path), depth)))]

    def stat(self, path: str) -> FileEntry:
        return FileEntry._from(drive(one(_native.stat(self._id, _path(path)))))

    def exists(self, path: str) -> bool:
        return drive(_exists_op(self._id, _path(path)))

    def make_dir(self, path: str) -> FileEntry:
        """Creates a directory (and its parents). Idempotent."""
        return drive(_make_dir_op(self._id, _path(path)))

    def remove(self, path: str) -> None:
        """Removes a file or a directory (recursively)."""
        drive(one(_native.remove(self._id, _path(path))))

    def upload_stream(self, path: str, stream: Iterator[bytes]) -> None:
        """Writes a file from chunks (joined on the host, then written)."""
        self.write(path, b"".join(_data(c) for c in stream))

    def download_stream(self, path: str) -> Iterator[bytes]:
        data = self.read_bytes(path)
        for i in range(0, len(data), self._CHUNK):
            yield data[i : i + self._CHUNK]


# ---------------------------------------------------------------------------
# Capsule


class Capsule:
    """A capsule (microVM) run by this process.

    ::

        with Capsule(template="python") as capsule:
            print(capsule.commands.run("python3 -V").stdout)

    ``Capsule(...)`` and ``Capsule.create(...)`` create and start one (returning
    once its agent answers). It is destroyed by ``destroy()``, at the end of a
    ``with`` block, when its last Python reference is garbage-collected, or at
    interpreter exit. ``api_key``/``base_url``/``timeout``/``wait`` are accepted
    for compatibility with the remote SDK and ignored.
    """

    def __init__(
        self,
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
        _bound: Optional[Tuple[Dict[str, Any], Any]] = None,
    ) -> None:
        if _bound is None:
            kw = _create_args(template, vcpus, memory_mb, disk_mb, envs, metadata, network)
            _bound = drive(one(_native.create(cold_boot=bool(cold_boot), **kw)))
        info, handle = _bound
        self._init(info, handle)

    def _init(self, info: Dict[str, Any], handle: Any) -> None:
        self._info: CapsuleInfo = CapsuleInfo._from(info)
        self._id: str = self._info.id
        self._handle = handle
        self.commands = Commands(self._id, handle)
        self.files = Files(self._id, handle)

    @classmethod
    def _bind(cls, bound: Tuple[Dict[str, Any], Any]) -> "Capsule":
        return cls(_bound=bound)

    def __repr__(self) -> str:
        return f"<Capsule {self._id} {self._info.template} {self._info.status}>"

    # -- properties

    @property
    def capsule_id(self) -> str:
        return self._id

    @property
    def id(self) -> str:
        return self._id

    @property
    def info(self) -> CapsuleInfo:
        """Metadata as of the last call that returned it."""
        return self._info

    # -- factories

    @classmethod
    def create(
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
    ) -> "Capsule":
        """Creates a capsule; same as ``Capsule(...)``. ``network`` is its egress
        policy: ``allow_out`` (IPv4 addresses, CIDRs, domains), ``deny_out``
        (addresses, CIDRs; ``"0.0.0.0/0"`` = no internet), ``dns_servers``."""
        return cls(
            template, vcpus, memory_mb, timeout, envs=envs, metadata=metadata, disk_mb=disk_mb,
            cold_boot=cold_boot, network=network,
        )

    @classmethod
    def connect(cls, capsule_id: str, *, api_key: Optional[str] = None, base_url: Optional[str] = None) -> "Capsule":
        """Binds to a capsule of this process, or adopts a paused one left by a
        process that is gone; resumes it if paused."""
        cid = _check_id(capsule_id)

        def op() -> Any:
            info, handle = yield _native.connect(cid)
            if info["status"] == "paused":
                info = yield _native.resume(cid)
            return info, handle

        return cls._bind(drive(op()))

    @classmethod
    def list(cls, *, api_key: Optional[str] = None, base_url: Optional[str] = None) -> builtins.list[CapsuleInfo]:
        """The capsules of this process (running or paused)."""
        return [CapsuleInfo._from(d) for d in drive(one(_native.list()))]

    # -- lifecycle (instance or by id)

    destroy = _DualMethod("_instance_destroy", "_static_destroy")
    pause = _DualMethod("_instance_pause", "_static_pause")
    resume = _DualMethod("_instance_resume", "_static_resume")
    get_info = _DualMethod("_instance_get_info", "_static_get_info")

    def _instance_destroy(self) -> None:
        """Destroys the capsule: its VM and everything it holds."""
        self._handle.release()
        drive(one(_native.destroy(self._id)))

    @classmethod
    def _static_destroy(cls, capsule_id: str, **_: Any) -> None:
        drive(one(_native.destroy(_check_id(capsule_id))))

    def _instance_pause(self) -> CapsuleInfo:
        """Pauses: memory, devices and disk go to disk; no VM runs."""
        self._info = CapsuleInfo._from(drive(one(_native.pause(self._id))))
        return self._info

    @classmethod
    def _static_pause(cls, capsule_id: str, **_: Any) -> CapsuleInfo:
        return CapsuleInfo._from(drive(one(_native.pause(_check_id(capsule_id)))))

    def set_network(self, network: Optional[Dict[str, List[str]]] = None) -> CapsuleInfo:
        """Replaces the egress policy (omitted lists are cleared); in force when
        this returns, and kept across pause and resume."""
        kw = _network_args(network)
        self._info = CapsuleInfo._from(drive(one(_native.set_network(self._id, **kw))))
        return self._info

    def _instance_resume(self) -> CapsuleInfo:
        """Resumes a paused capsule; its processes carry on."""
        self._info = CapsuleInfo._from(drive(one(_native.resume(self._id))))
        return self._info

    @classmethod
    def _static_resume(cls, capsule_id: str, **_: Any) -> CapsuleInfo:
        return CapsuleInfo._from(drive(one(_native.resume(_check_id(capsule_id)))))

    def _instance_get_info(self) -> CapsuleInfo:
        self._info = CapsuleInfo._from(drive(one(_native.get(self._id))))
        return self._info

    @classmethod
    def _static_get_info(cls, capsule_id: str, **_: Any) -> CapsuleInfo:
        return CapsuleInfo._from(drive(one(_native.get(_check_id(capsule_id)))))

    def is_running(self) -> bool:
        return self._instance_get_info().status == "running"

    def wait_ready(self, timeout: float = 30, interval: float = 0.5) -> None:
        """Resumes the capsule if paused (a created capsule is already ready)."""
        if self._instance_get_info().status == "paused":
            self._instance_resume()

    def ping(self) -> None:
        """No-op (no inactivity timer in-process)."""

    def keep(self) -> "Capsule":
        """Stops garbage collection from destroying the capsule (``destroy()``
        and interpreter exit still do). Returns self."""
        self._handle.release()
        return self

    # -- snapshots and forks

    def create_snapshot(self, name: Optional[str] = None, overwrite: bool = False) -> Template:
        """Saves the running capsule as snapshot template ``name`` (default
        ``template-<8 hex>``); ``Capsule(template=name)`` starts from it. The
        capsule keeps running."""
        _opt("name", name, str)
        name = name or f"template-{secrets.token_hex(4)}"
        drive(one(_native.snapshot(self._id, name, bool(overwrite))))
        return Template(name)

    def snapshot(self, name: str, overwrite: bool = False) -> Template:
        """Same as :meth:`create_snapshot` with a required name."""
        if not isinstance(name, str):
            raise TypeError("name must be a str")
        return self.create_snapshot(name, overwrite)

    def fork(self, n: int = 1) -> builtins.list["Capsule"]:
        """``n`` new capsules continuing from this one's current state (memory,
        processes, files), each with its own identity and disk."""
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError("n must be an int")
        return [type(self)._bind(b) for b in drive(one(_native.fork(self._id, n)))]

    # -- context manager

    def __enter__(self) -> "Capsule":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._instance_destroy()
        except WrennError as e:
            if e.kind != "not_found":
                import logging

                logging.getLogger("wrenn_embed").warning("Failed to destroy capsule %s: %s", self._id, e)


def host_info() -> Dict[str, Any]:
    """The host this process runs capsules on (starting it if needed):
    acceleration, data directory, what the startup sweep removed."""
    return drive(one(_native.host_info()))
