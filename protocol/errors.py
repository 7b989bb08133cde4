"""The error hierarchy shared by every part of multifd-migrate.

Errors are split by blame, so that the failure funnel of a migration can tell an
operator *who* got it wrong:

``MigrationError``                    root; every error we raise on purpose
 ├── ``LocalError``                   we were misused (bad argument, wrong state)
 │    ├── ``ConfigError``             an invalid option, property or parameter
 │    └── ``StateError``              an operation not allowed in the current state
 ├── ``RemoteProtocolError``          the peer sent bytes that break the protocol
 │    ├── ``BadMagicError`` / ``BadVersionError`` / ``BadFlagsError``
 │    ├── ``HandshakeError``          channel init rejected (UUID, id range, duplicate)
 │    ├── ``UnknownDeviceError``      a packet names a device we do not have
 │    ├── ``LimitExceededError``      a size, count or byte cap was exceeded
 │    └── ``SequenceError``           a packet arrived that the state does not allow
 ├── ``ChannelError``                 a transport failed (reset, EOF, timeout)
 ├── ``DeviceError``                  a device refused an operation (state arc, write)
 └── ``VerificationError``            a digest did not match after loading

Every class carries a short stable ``code`` string that crosses the wire in a
``shut`` message next to the human-readable text that ``query-migrate`` shows as
``error-desc``.  None of these
ever wraps ``asyncio.CancelledError``: cancellation is not an error.
"""

from __future__ import annotations

__all__ = [
    "MigrationError",
    "LocalError",
    "ConfigError",
    "StateError",
    "RemoteProtocolError",
    "BadMagicError",
    "BadVersionError",
    "BadFlagsError",
    "HandshakeError",
    "UnknownDeviceError",
    "LimitExceededError",
    "SequenceError",
    "ChannelError",
    "DeviceError",
    "VerificationError",
]


class MigrationError(Exception):
    """Root of every error multifd-migrate raises on purpose."""

    code = "migration-error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class LocalError(MigrationError):
    """The local user or caller did something invalid."""

    code = "local-error"


class ConfigError(LocalError):
    """An option, device property or migration parameter is invalid."""

    code = "config-error"


class StateError(LocalError):
    """An operation was requested in a state that does not allow it."""

    code = "state-error"

    def __init__(self, message: str, state: str = "", required: str = "") -> None:
        super().__init__(message)
        self.state = state
        self.required = required


class RemoteProtocolError(MigrationError):
    """The peer violated the protocol; the migration cannot continue."""

    code = "protocol-error"


class BadMagicError(RemoteProtocolError):
    code = "bad-magic"


class BadVersionError(RemoteProtocolError):
    code = "bad-version"


class BadFlagsError(RemoteProtocolError):
    code = "bad-flags"


class HandshakeError(RemoteProtocolError):
    """A channel's init message was rejected (UUID, id range, duplicate id)."""

    code = "handshake"


class UnknownDeviceError(RemoteProtocolError):
    code = "unknown-device"


class LimitExceededError(RemoteProtocolError):
    """A bound was exceeded: header size, payload size, queued bytes or count."""

    code = "limit-exceeded"

    def __init__(self, message: str, limit: int = 0, value: int = 0) -> None:
        super().__init__(message)
        self.limit = limit
        self.value = value


class SequenceError(RemoteProtocolError):
    """A message or packet arrived that the current state does not allow."""

    code = "sequence"


class ChannelError(MigrationError):
    """A transport failed: connection reset, premature EOF, timeout."""

    code = "channel"

    def __init__(self, message: str, channel: str = "") -> None:
        super().__init__(message)
        self.channel = channel


class DeviceError(MigrationError):
    """A device refused an operation (illegal state arc, overrun, bad config)."""

    code = "device"


class VerificationError(MigrationError):
    """Loaded state does not match what the source sent."""

    code = "verification"
