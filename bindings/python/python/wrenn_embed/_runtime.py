"""Glue between the native tasks and Python.

Every native call returns a ``Pending`` (a task on the binding's tokio runtime).
Multi-step operations are written once, as generators that ``yield`` a
``Pending`` (or ``(Pending, timeout_seconds)``) and receive its result; the sync
API drives them with :func:`drive` (blocking waits, GIL released, Ctrl-C
checked every 50 ms) and the asyncio API with :func:`adrive`.
"""

from __future__ import annotations

import asyncio
import atexit
import codecs
import time
from typing import Any, Callable, Generator, List, Optional, Tuple, Union

from . import _native
from ._errors import CommandNotFoundError, GuestNotFoundError, WrennTimeoutError
from ._models import (
    CommandResult,
    StreamErrorEvent,
    StreamEvent,
    StreamExitEvent,
    StreamStartEvent,
    StreamStderrEvent,
    StreamStdoutEvent,
)

Step = Union[Any, Tuple[Any, Optional[float]]]
Op = Generator[Step, Any, Any]


def _split(step: Step) -> Tuple[Any, Optional[float]]:
    if isinstance(step, tuple):
        return step[0], step[1]
    return step, None


def _step(gen: Op, send: Any, exc: Optional[BaseException]) -> Step:
    if exc is None:
        return gen.send(send)
    try:
        return gen.throw(exc)
    finally:
        del exc


def drive(gen: Op) -> Any:
    """Runs an operation to completion, blocking (sync API)."""
    send: Any = None
    exc: Optional[BaseException] = None
    while True:
        try:
            step = _step(gen, send, exc)
        except StopIteration as stop:
            return stop.value
        finally:
            # No frame of ours may keep the exception: that would make a cycle
            # (exception → traceback → frame → exception) and delay freeing what
            # the frames hold (e.g. an interrupted create's capsule) until a GC.
            exc = None
        pending, timeout = _split(step)
        send = None
        try:
            send = pending.wait(timeout)
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt goes to the op too
            exc = e
        finally:
            del pending


async def await_pending(pending: Any, timeout: Optional[float] = None) -> Any:
    """Awaits a native task without blocking the event loop."""
    if not pending.done():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def _set() -> None:
            if not fut.done():
                fut.set_result(None)

        def _wake() -> None:
            try:
                loop.call_soon_threadsafe(_set)
            except RuntimeError:
                pass  # the loop is closed

        pending.add_done_callback(_wake)
        try:
            if timeout is None:
                await fut
            else:
                await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pending.cancel()
            raise WrennTimeoutError(f"did not finish within {timeout:.1f} s") from None
        except asyncio.CancelledError:
            pending.cancel()
            raise
    return pending.result()


async def adrive(gen: Op) -> Any:
    """Runs an operation to completion (asyncio API)."""
    send: Any = None
    exc: Optional[BaseException] = None
    while True:
        try:
            step = _step(gen, send, exc)
        except StopIteration as stop:
            return stop.value
        finally:
            # No frame of ours may keep the exception: that would make a cycle
            # (exception → traceback → frame → exception) and delay freeing what
            # the frames hold (e.g. an interrupted create's capsule) until a GC.
            exc = None
        pending, timeout = _split(step)
        send = None
        try:
            send = await await_pending(pending, timeout)
        except BaseException as e:  # noqa: BLE001 - cancellation goes to the op too
            exc = e
        finally:
            del pending


def one(pending: Any) -> Op:
    """An operation of a single step."""
    return (yield pending)


# ---------------------------------------------------------------------------
# Commands


class Collector:
    """Turns a process's raw events into stream events, output and callbacks."""

    def __init__(
        self,
        on_stdout: Optional[Callable[[str], Any]] = None,
        on_stderr: Optional[Callable[[str], Any]] = None,
    ) -> None:
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._dec = {
            "stdout": codecs.getincrementaldecoder("utf-8")("replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self.exit_code: Optional[int] = None
        self.status = ""
        self.ended = False
        self.started = time.monotonic()

    def feed(self, ev: Optional[tuple]) -> Optional[StreamEvent]:
        if ev is None:
            self.ended = True
            return None
        kind = ev[0]
        if kind == "start":
            return StreamStartEvent(ev[1])
        if kind in ("stdout", "stderr"):
            data: bytes = ev[1]
            (self.stdout if kind == "stdout" else self.stderr).extend(data)
            text = self._dec[kind].decode(data)
            cb = self.on_stdout if kind == "stdout" else self.on_stderr
            if cb is not None and text:
                cb(text)
            return StreamStdoutEvent(text) if kind == "stdout" else StreamStderrEvent(text)
        if kind == "exit":
            self.exit_code, self.status = ev[1], ev[3]
            for name in ("stdout", "stderr"):
                rest = self._dec[name].decode(b"", final=True)
                cb = self.on_stdout if name == "stdout" else self.on_stderr
                if cb is not None and rest:
                    cb(rest)
            return StreamExitEvent(ev[1])
        return StreamErrorEvent(f"unknown event {ev!r}")

    @property
    def exited(self) -> bool:
        return self.exit_code is not None

    def result(self, pid: Optional[int] = None) -> CommandResult:
        out, err = bytes(self.stdout), bytes(self.stderr)
        return CommandResult(
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            exit_code=self.exit_code if self.exit_code is not None else -1,
            duration_ms=int((time.monotonic() - self.started) * 1000),
            pid=pid,
            stdout_bytes=out,
            stderr_bytes=err,
            status=self.status,
        )


def argv_of(cmd: Union[str, List[str], Tuple[str, ...]], args: Optional[List[str]]) -> Tuple[str, List[str], bool]:
    """``"echo hi"`` → ``/bin/sh -c "echo hi"``; ``["ls", "-l"]`` or
    ``("ls", ["-l"])`` → that program. Returns (cmd, args, is_argv)."""
    if isinstance(cmd, str):
        if args:
            return cmd, list(args), True
        return "/bin/sh", ["-c", cmd], False
    if isinstance(cmd, (list, tuple)) and cmd and all(isinstance(c, str) for c in cmd):
        return cmd[0], list(cmd[1:]) + list(args or []), True
    raise TypeError(f"cmd must be a str or a non-empty list of str, not {type(cmd).__name__}")


def start_op(capsule_id: str, cmd: str, args: List[str], is_argv: bool, **kw: Any) -> Op:
    try:
        return (yield _native.exec(capsule_id, cmd, args, **kw))
    except GuestNotFoundError as e:
        if is_argv:
            raise CommandNotFoundError(f"{cmd}: command not found in the capsule ({e.message})") from e
        raise


def wait_op(capsule_id: str, proc: Any, col: Collector, timeout: Optional[float]) -> Op:
    """Collects a process's output until its stream ends. On any interruption
    (Ctrl-C, cancellation, host-side deadline) the process is killed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not col.ended:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            col.feed((yield (proc.next_event(), left)))
    except BaseException:
        if not col.exited:
            _native.signal(capsule_id, proc.pid, True)  # fire and forget
        raise
    return col.result(proc.pid)


# ---------------------------------------------------------------------------
# Interpreter exit


def _at_exit() -> None:
    try:
        _native.shutdown(60.0)
    except BaseException:  # noqa: BLE001 - never fail the interpreter's exit
        pass


atexit.register(_at_exit)
