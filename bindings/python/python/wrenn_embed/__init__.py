"""wrenn_embed: run Wrenn capsules (microVMs) in-process, no server.

The API follows the reference Wrenn Python SDK (``wrenn`` on PyPI), so code moves
between in-process and remote use with little change::

    from wrenn_embed import Capsule

    with Capsule(template="python") as capsule:
        result = capsule.commands.run("python3 -c 'print(6 * 7)'")
        print(result.stdout)            # 42

The first call starts this process's host (QEMU microVMs, data under
``WRENN_DATA_DIR``, default ``/var/lib/wrenn``; needs root). Capsules are
destroyed by ``destroy()``, a ``with`` block, garbage collection of their last
reference, or interpreter exit; if the process is killed, their VMs die with it
and the next start of a host (any wrenn process) removes what is left.
"""

from ._errors import (
    AlreadyExistsError,
    CancelledError,
    CommandExitError,
    CommandNotFoundError,
    GuestError,
    GuestNotFoundError,
    HostError,
    InvalidArgumentError,
    NotFoundError,
    StateError,
    TemplateNotFoundError,
    WrennAgentError,
    WrennConflictError,
    WrennError,
    WrennInternalError,
    WrennNotFoundError,
    WrennTimeoutError,
    WrennValidationError,
)
from ._models import (
    CapsuleInfo,
    CommandResult,
    FileEntry,
    ProcessInfo,
    StreamErrorEvent,
    StreamEvent,
    StreamExitEvent,
    StreamStartEvent,
    StreamStderrEvent,
    StreamStdoutEvent,
    Template,
)
from .async_capsule import AsyncCapsule, AsyncCommandHandle, AsyncCommands, AsyncFiles, async_host_info
from .capsule import Capsule, CommandHandle, Commands, Files, host_info

#: The reference SDK's deprecated alias.
Sandbox = Capsule

__all__ = [
    "AlreadyExistsError",
    "AsyncCapsule",
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "CancelledError",
    "Capsule",
    "CapsuleInfo",
    "CommandExitError",
    "CommandHandle",
    "CommandNotFoundError",
    "CommandResult",
    "Commands",
    "FileEntry",
    "Files",
    "GuestError",
    "GuestNotFoundError",
    "HostError",
    "InvalidArgumentError",
    "NotFoundError",
    "ProcessInfo",
    "Sandbox",
    "StateError",
    "StreamErrorEvent",
    "StreamEvent",
    "StreamExitEvent",
    "StreamStartEvent",
    "StreamStderrEvent",
    "StreamStdoutEvent",
    "Template",
    "TemplateNotFoundError",
    "WrennAgentError",
    "WrennConflictError",
    "WrennError",
    "WrennInternalError",
    "WrennNotFoundError",
    "WrennTimeoutError",
    "WrennValidationError",
    "async_host_info",
    "host_info",
]
