"""Exceptions. Every error from the Rust library arrives as ``(kind, message)``
(``CapsuleError::kind()`` in wrenn-core) and becomes one of these in
:func:`from_kind` — the one place the mapping lives.

Aliases with the reference SDK's names (``WrennNotFoundError``, …) let code
written for the remote ``wrenn`` SDK catch the same errors here.
"""

from __future__ import annotations

import builtins
from typing import Dict, Optional, Type


class WrennError(Exception):
    """Base of every wrenn_embed error.

    Attributes:
        kind: stable machine-readable kind (e.g. ``"not_found"``).
        message: human-readable description (with the chain of causes).
        code: the same as ``kind`` (the reference SDK's attribute name).
    """

    default_kind = "error"

    def __init__(self, message: str = "", kind: Optional[str] = None) -> None:
        self.kind: str = kind or self.default_kind
        self.message: str = message
        super().__init__(message)

    @property
    def code(self) -> str:
        return self.kind

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, message={self.message!r})"


class InvalidArgumentError(WrennError, ValueError):
    """A bad value: out-of-range size, invalid name or id, rejected by the guest."""

    default_kind = "invalid_argument"


class NotFoundError(WrennError):
    """Something does not exist (capsule, snapshot, path or process in the guest)."""

    default_kind = "not_found"


class TemplateNotFoundError(NotFoundError):
    """No template of that name."""

    default_kind = "template_not_found"


class GuestNotFoundError(NotFoundError, builtins.FileNotFoundError):
    """A path or process that does not exist inside the capsule (also a
    builtin ``FileNotFoundError``)."""

    default_kind = "guest_not_found"

    def __init__(self, message: str = "", kind: Optional[str] = None) -> None:
        WrennError.__init__(self, message, kind)


class CommandNotFoundError(NotFoundError):
    """The program of an argv command does not exist in the capsule."""

    default_kind = "command_not_found"


class WrennTimeoutError(WrennError, builtins.TimeoutError):
    """A command or a wait ran out of time (also a builtin ``TimeoutError``)."""

    default_kind = "timeout"

    def __init__(self, message: str = "", kind: Optional[str] = None) -> None:
        WrennError.__init__(self, message, kind)


class StateError(WrennError):
    """The capsule is not in a state the operation needs (e.g. exec on a paused
    capsule, resume of a running one)."""

    default_kind = "invalid_state"


class AlreadyExistsError(StateError):
    """A snapshot template of that name exists (pass ``overwrite=True``)."""

    default_kind = "already_exists"


class GuestError(WrennError):
    """The agent inside the capsule failed or could not be reached."""

    default_kind = "guest_error"


class HostError(WrennError):
    """The host side failed: VMM, network, disks, state files, no kernel…"""

    default_kind = "host_error"


class CancelledError(WrennError):
    """The operation was cancelled."""

    default_kind = "cancelled"


class CommandExitError(WrennError):
    """A command exited non-zero (only with ``check=True``; like the reference
    SDK, ``commands.run`` returns the result otherwise)."""

    default_kind = "command_exit"

    def __init__(self, exit_code: int, stdout: str, stderr: str, message: str = "") -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(message or f"command exited with code {exit_code}: {stderr.strip()[-500:]}")


_BY_KIND: Dict[str, Type[WrennError]] = {
    "invalid_argument": InvalidArgumentError,
    "not_found": NotFoundError,
    "template_not_found": TemplateNotFoundError,
    "guest_not_found": GuestNotFoundError,
    "command_not_found": CommandNotFoundError,
    "timeout": WrennTimeoutError,
    "invalid_state": StateError,
    "already_exists": AlreadyExistsError,
    "guest_error": GuestError,
    "cancelled": CancelledError,
    # host-side failures
    "host_error": HostError,
    "template_error": HostError,
    "permission_denied": HostError,
    "network_error": HostError,
    "storage_error": HostError,
    "vmm_error": HostError,
    "state_error": HostError,
    "snapshot_error": HostError,
    "snapshot_corrupt": HostError,
    "shutting_down": HostError,
    "insufficient_storage": HostError,
}


def from_kind(kind: str, message: str) -> WrennError:
    """The exception for an error of ``kind`` (unknown kinds: ``WrennError``)."""
    return _BY_KIND.get(kind, WrennError)(message, kind)


# The reference SDK's names.
WrennValidationError = InvalidArgumentError
WrennNotFoundError = NotFoundError
WrennConflictError = StateError
WrennAgentError = GuestError
WrennInternalError = HostError
