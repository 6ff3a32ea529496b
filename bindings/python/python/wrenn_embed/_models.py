"""Plain data returned by the API (shaped like the reference SDK's models)."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass(frozen=True)
class CapsuleInfo:
    """A capsule as the host sees it."""

    id: str
    status: str
    template: str
    vcpus: int
    memory_mb: int
    disk_mb: int
    accel: str
    created_at: _dt.datetime
    host_addr: Optional[str] = None
    metadata: Dict[str, str] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def capsule_id(self) -> str:
        return self.id

    @classmethod
    def _from(cls, d: Dict[str, Any]) -> "CapsuleInfo":
        return cls(
            id=d["id"],
            status=d["status"],
            template=d["template"],
            vcpus=d["vcpus"],
            memory_mb=d["memory_mb"],
            disk_mb=d["disk_mb"],
            accel=d["accel"],
            created_at=_dt.datetime.fromtimestamp(d["created_at"], tz=_dt.timezone.utc),
            host_addr=d.get("host_addr"),
            metadata=dict(d.get("metadata") or {}),
            error=d.get("error"),
        )


@dataclass(frozen=True)
class FileEntry:
    """A file, directory or symlink inside a capsule."""

    name: str
    path: str
    type: str  # "file" | "directory" | "symlink" | "other"
    size: int
    mode: int
    permissions: str
    owner: str
    group: str
    modified_at: int
    symlink_target: Optional[str] = None

    @property
    def is_dir(self) -> bool:
        return self.type == "directory"

    @classmethod
    def _from(cls, d: Dict[str, Any]) -> "FileEntry":
        return cls(**d)


@dataclass
class CommandResult:
    """Result of a foreground command."""

    stdout: str
    stderr: str
    exit_code: int
    duration_ms: Optional[int] = None
    pid: Optional[int] = None
    #: Raw output bytes (``stdout``/``stderr`` are decoded as UTF-8 with replacement).
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    #: e.g. ``"exit status 1"``, ``"signal: killed"``.
    status: str = ""

    def check(self) -> "CommandResult":
        """Raises :class:`CommandExitError` if the exit code is non-zero."""
        if self.exit_code != 0:
            from ._errors import CommandExitError

            raise CommandExitError(self.exit_code, self.stdout, self.stderr)
        return self


@dataclass(frozen=True)
class ProcessInfo:
    """A process started through the agent."""

    pid: int
    tag: Optional[str] = None
    cmd: Optional[str] = None
    args: Optional[List[str]] = None


@dataclass(frozen=True)
class Template:
    """A snapshot template made by :meth:`Capsule.create_snapshot`."""

    name: str
    type: str = "snapshot"


class StreamEvent:
    """An event of a streamed command: ``type`` is ``start``, ``stdout``,
    ``stderr``, ``exit`` or ``error``."""

    __slots__ = ("type",)

    def __init__(self, type: str) -> None:
        self.type = type

    def __repr__(self) -> str:
        fields = ", ".join(f"{s}={getattr(self, s)!r}" for s in self._fields())
        return f"{type(self).__name__}({fields})"

    def _fields(self) -> List[str]:
        out: List[str] = []
        for k in type(self).__mro__:
            out.extend(getattr(k, "__slots__", ()))
        return out


class StreamStartEvent(StreamEvent):
    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        super().__init__("start")
        self.pid = pid


class StreamStdoutEvent(StreamEvent):
    __slots__ = ("data",)

    def __init__(self, data: str) -> None:
        super().__init__("stdout")
        self.data = data


class StreamStderrEvent(StreamEvent):
    __slots__ = ("data",)

    def __init__(self, data: str) -> None:
        super().__init__("stderr")
        self.data = data


class StreamExitEvent(StreamEvent):
    __slots__ = ("exit_code",)

    def __init__(self, exit_code: int) -> None:
        super().__init__("exit")
        self.exit_code = exit_code


class StreamErrorEvent(StreamEvent):
    __slots__ = ("data", "error")

    def __init__(self, data: str, error: Optional[BaseException] = None) -> None:
        super().__init__("error")
        self.data = data
        self.error = error
