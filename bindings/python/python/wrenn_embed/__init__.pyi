"""Type stubs: the public API, re-exported from its (fully annotated) modules."""
from ._errors import (
    AlreadyExistsError as AlreadyExistsError,
    CancelledError as CancelledError,
    CommandExitError as CommandExitError,
    CommandNotFoundError as CommandNotFoundError,
    GuestError as GuestError,
    GuestNotFoundError as GuestNotFoundError,
    HostError as HostError,
    InvalidArgumentError as InvalidArgumentError,
    NotFoundError as NotFoundError,
    StateError as StateError,
    TemplateNotFoundError as TemplateNotFoundError,
    WrennAgentError as WrennAgentError,
    WrennConflictError as WrennConflictError,
    WrennError as WrennError,
    WrennInternalError as WrennInternalError,
    WrennNotFoundError as WrennNotFoundError,
    WrennTimeoutError as WrennTimeoutError,
    WrennValidationError as WrennValidationError,
)
from ._models import (
    CapsuleInfo as CapsuleInfo,
    CommandResult as CommandResult,
    FileEntry as FileEntry,
    ProcessInfo as ProcessInfo,
    StreamErrorEvent as StreamErrorEvent,
    StreamEvent as StreamEvent,
    StreamExitEvent as StreamExitEvent,
    StreamStartEvent as StreamStartEvent,
    StreamStderrEvent as StreamStderrEvent,
    StreamStdoutEvent as StreamStdoutEvent,
    Template as Template,
)
from .async_capsule import (
    AsyncCapsule as AsyncCapsule,
    AsyncCommandHandle as AsyncCommandHandle,
    AsyncCommands as AsyncCommands,
    AsyncFiles as AsyncFiles,
    async_host_info as async_host_info,
)
from .capsule import (
    Capsule as Capsule,
    CommandHandle as CommandHandle,
    Commands as Commands,
    Files as Files,
    host_info as host_info,
)
from .capsule import Capsule

Sandbox = Capsule
__all__: list[str]
