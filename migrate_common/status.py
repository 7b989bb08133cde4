"""Migration status: QEMU's ``MigrationStatus`` names with checked transitions.

Both daemons keep one :class:`StatusMachine` for their side of the migration.  Every
transition is checked against :data:`TRANSITIONS`, recorded in ``history`` (tests
assert the exact sequence) and reported to listeners (the ``MIGRATION`` QMP event).

Source:      none → setup → active → device → completed
                      ↘ failing → failed       (any of setup/active/device)
                      ↘ cancelling → cancelled (any of setup/active/device)
Destination: none → setup → active → completed | failing → failed

``failing`` is the "clean-up underway" state QEMU has been asked for: the first error
is already known (``error-desc``) but tasks, sockets and the VM are still being put
back in order.  A finished migration (completed, failed, cancelled) may be followed by
a new one, which starts again at ``setup``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from protocol.errors import StateError

__all__ = ["MigrationStatus", "TRANSITIONS", "StatusMachine", "FINISHED", "IN_PROGRESS"]


class MigrationStatus(str, enum.Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILING = "failing"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


S = MigrationStatus

FINISHED = frozenset({S.NONE, S.COMPLETED, S.FAILED, S.CANCELLED})
IN_PROGRESS = frozenset({S.SETUP, S.ACTIVE, S.DEVICE, S.FAILING, S.CANCELLING})

TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.NONE: frozenset({S.SETUP}),
    S.SETUP: frozenset({S.ACTIVE, S.FAILING, S.CANCELLING}),
    S.ACTIVE: frozenset({S.DEVICE, S.COMPLETED, S.FAILING, S.CANCELLING}),
    S.DEVICE: frozenset({S.COMPLETED, S.FAILING, S.CANCELLING}),
    S.FAILING: frozenset({S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILING}),
    S.COMPLETED: frozenset({S.SETUP}),
    S.FAILED: frozenset({S.SETUP}),
    S.CANCELLED: frozenset({S.SETUP}),
}


class StatusMachine:
    """The current status of one side, with checked transitions and a history."""

    def __init__(self) -> None:
        self.status = S.NONE
        self.history: list[MigrationStatus] = [S.NONE]
        self._listeners: list[Callable[[MigrationStatus], None]] = []

    def subscribe(self, listener: Callable[[MigrationStatus], None]) -> None:
        self._listeners.append(listener)

    def can(self, new: MigrationStatus) -> bool:
        return new in TRANSITIONS[self.status]

    def set(self, new: MigrationStatus) -> None:
        if new not in TRANSITIONS[self.status]:
            raise StateError(
                f"migration status cannot go from {self.status.value} to {new.value}",
                state=self.status.value,
                required=new.value,
            )
        self.status = new
        self.history.append(new)
        for listener in list(self._listeners):
            listener(new)

    @property
    def in_progress(self) -> bool:
        return self.status in IN_PROGRESS
