"""The virtual machine a daemon migrates: its run state and its VFIO devices.

This module is responsible for the VM-level model both daemons share:

* the set of simulated devices, in command-line order (the order QEMU
  registers ``SaveStateEntry``s, hence the order of sections on the wire),
  with unique ids and idstrs, and lookup by ``(idstr, instance_id)`` the way
  the destination resolves an incoming section or device-state packet;
* the run state as ``query-status`` reports it (:class:`RunState`, QEMU's
  names), changed only through :meth:`VirtualMachine.set_run_state`, which
  enforces the subset of QEMU's ``runstate_transitions_def`` relevant to
  migration and records the history.

Stopping/starting devices around a switchover is orchestrated by the daemons;
this class only keeps the state honest.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuid_mod
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Final

from protocol.errors import ConfigError, StateError
from vm.properties import DeviceConfig, parse_device_option
from vm.vfio_sim import Clock, Role, Sleep, TransitionCallback, VfioSimDevice
from vm.ram import BackendConfig, GuestRam, MemoryConfig
from vm.workload import Workload, WorkloadConfig

__all__ = [
    "RunState",
    "RUN_STATE_TRANSITIONS",
    "DEFAULT_DEVICE_OPTIONS",
    "default_device_configs",
    "VirtualMachine",
]


class RunState(str, Enum):
    """``RunState`` values as ``query-status`` spells them (the subset we use)."""

    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"

    def __str__(self) -> str:
        return self.value


_R = RunState

#: Allowed run-state changes: QEMU's ``runstate_transitions_def`` restricted to
#: these six states.  Typical paths -- source: running -> finish-migrate ->
#: postmigrate (done) or -> running (failed/cancelled); destination: inmigrate ->
#: running (autostart) or -> paused (``-S``), paused -> running on ``cont``.
RUN_STATE_TRANSITIONS: Final[dict[RunState, frozenset[RunState]]] = {
    _R.PRELAUNCH: frozenset({_R.INMIGRATE, _R.RUNNING, _R.FINISH_MIGRATE}),
    _R.INMIGRATE: frozenset(
        {_R.RUNNING, _R.PAUSED, _R.FINISH_MIGRATE, _R.PRELAUNCH, _R.POSTMIGRATE}
    ),
    _R.RUNNING: frozenset({_R.PAUSED, _R.FINISH_MIGRATE}),
    _R.PAUSED: frozenset({_R.RUNNING, _R.FINISH_MIGRATE, _R.POSTMIGRATE, _R.PRELAUNCH}),
    _R.FINISH_MIGRATE: frozenset({_R.RUNNING, _R.PAUSED, _R.POSTMIGRATE, _R.PRELAUNCH}),
    _R.POSTMIGRATE: frozenset({_R.RUNNING, _R.FINISH_MIGRATE, _R.PRELAUNCH}),
}

#: The embedded default VM of the demo: four 256 MiB devices that behave like real
#: VFs in the two ways that decide the downtime: each takes 50 ms to quiesce when it
#: is stopped, and its state reads at 2 GB/s (a zero-latency device that reads at
#: memory speed leaves multifd nothing to overlap; see docs/user-guide.md §7.3).
DEFAULT_DEVICE_OPTIONS: Final[list[str]] = [
    f"vfio-sim,id=dev{i},state-size=256M,stop-copy-latency=50ms,read-bandwidth=2G"
    for i in range(4)
]


#: The demo VM's guest RAM and the guest program that keeps dirtying it.
DEFAULT_MEMORY_OPTION: Final[str] = "1G,fill=mixed"
DEFAULT_WORKLOAD_OPTION: Final[str] = "dirty-rate=64M,pattern=hotspot"


def default_device_configs() -> list[DeviceConfig]:
    """:data:`DEFAULT_DEVICE_OPTIONS`, parsed."""
    return [parse_device_option(text) for text in DEFAULT_DEVICE_OPTIONS]


class VirtualMachine:
    """A VM with simulated VFIO devices, on the source or the destination side.

    ``devices`` keeps command-line order.  The initial run state is ``running``
    on the source and ``inmigrate`` on the destination (QEMU with ``-incoming``)
    unless ``initial_run_state`` says otherwise.  Device content is generated
    lazily, so constructing even the default 1 GiB VM is instant; call
    :meth:`prepare` to pay for it up front.
    """

    def __init__(
        self,
        devices: Sequence[DeviceConfig],
        *,
        uuid: uuid_mod.UUID | None = None,
        role: Role,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        on_device_transition: TransitionCallback | None = None,
        initial_run_state: RunState | None = None,
        memory: MemoryConfig | None = None,
        memory_backend: BackendConfig | None = None,
        workload: WorkloadConfig | None = None,
    ) -> None:
        if role not in ("source", "destination"):
            raise ConfigError(f"VM role must be 'source' or 'destination', not {role!r}")
        self.role: Role = role
        self.uuid: uuid_mod.UUID = uuid if uuid is not None else uuid_mod.uuid4()
        self.devices: dict[str, VfioSimDevice] = {}
        self._by_idstr: dict[tuple[str, int], VfioSimDevice] = {}
        for config in devices:
            if config.id in self.devices:
                raise ConfigError(f"duplicate device id {config.id!r}")
            device = VfioSimDevice(
                config, role=role, clock=clock, sleep=sleep, on_transition=on_device_transition
            )
            key = (device.idstr, device.instance_id)
            if key in self._by_idstr:
                raise ConfigError(
                    f"duplicate device idstr {device.idstr!r} (instance {device.instance_id})"
                )
            self.devices[config.id] = device
            self._by_idstr[key] = device
        #: guest RAM, when the VM has any (``--memory``)
        self.ram: GuestRam | None = None
        if memory is not None:
            self.ram = GuestRam(memory, backend=memory_backend or BackendConfig("anonymous"),
                                role=role)
        #: the guest program that writes RAM while the VM runs (``--workload``)
        self.workload: Workload | None = None
        if workload is not None:
            if self.ram is None:
                raise ConfigError("--workload needs guest RAM: add --memory SIZE")
            self.workload = Workload(self.ram, workload, clock=clock, sleep=sleep)
            if role != "source":
                self.workload.pause()  # it runs once the migrated VM starts
        if initial_run_state is None:
            initial_run_state = RunState.RUNNING if role == "source" else RunState.INMIGRATE
        self._run_state = RunState(initial_run_state)
        #: every run state entered, starting with the initial one
        self.run_state_history: list[RunState] = [self._run_state]

    @classmethod
    def from_options(
        cls,
        options: Iterable[str],
        *,
        uuid: uuid_mod.UUID | None = None,
        role: Role,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        on_device_transition: TransitionCallback | None = None,
    ) -> VirtualMachine:
        """Build a VM from ``-device`` option strings (see :func:`parse_device_option`)."""
        return cls(
            [parse_device_option(text) for text in options],
            uuid=uuid,
            role=role,
            clock=clock,
            sleep=sleep,
            on_device_transition=on_device_transition,
        )

    # -- devices -------------------------------------------------------------------

    def device_by_idstr(self, idstr: str, instance_id: int) -> VfioSimDevice | None:
        """The device registered as ``(idstr, instance_id)``, or None."""
        return self._by_idstr.get((idstr, instance_id))

    @property
    def total_state_size(self) -> int:
        """Sum of every device's data stream size (pre-copy + stop-copy parts)."""
        return sum(d.total_size for d in self.devices.values())

    async def prepare(self) -> None:
        """Generate source content / pre-fault destination buffers for every device
        and for guest RAM."""
        if self.ram is not None:
            await self.ram.prepare()
        for device in self.devices.values():
            await device.prepare()

    async def digests(self) -> dict[str, str]:
        """Every device's :meth:`~VfioSimDevice.digest`, by device id (hashed off the loop)."""
        return {dev_id: await dev.digest_async() for dev_id, dev in self.devices.items()}

    # -- run state -----------------------------------------------------------------

    @property
    def run_state(self) -> RunState:
        return self._run_state

    @property
    def running(self) -> bool:
        """``query-status``'s ``running`` field."""
        return self._run_state is RunState.RUNNING

    async def resume(self) -> None:
        """Run the guest again: every device back to RUNNING (reset from ERROR), the
        run state ``running``, the workload writing.  Used by ``cont`` and after a
        failed or cancelled migration."""
        from vm.vfio_sim import DeviceState

        for device in self.devices.values():
            if device.state is DeviceState.ERROR:
                device.reset()
            elif device.state is not DeviceState.RUNNING:
                await device.set_state(DeviceState.RUNNING)
        if self.run_state is not RunState.RUNNING:
            self.set_run_state(RunState.RUNNING)
        if self.workload is not None:
            self.workload.resume()

    def set_run_state(self, new: RunState) -> None:
        """Change the run state; same-state is a no-op (as in QEMU), illegal changes
        raise :class:`StateError`."""
        new = RunState(new)
        cur = self._run_state
        if new is cur:
            return
        if new not in RUN_STATE_TRANSITIONS[cur]:
            allowed = ", ".join(sorted(s.value for s in RUN_STATE_TRANSITIONS[cur]))
            raise StateError(
                f"invalid run state transition {cur.value} -> {new.value} "
                f"(allowed from {cur.value}: {allowed})",
                state=cur.value,
                required=allowed,
            )
        self._run_state = new
        self.run_state_history.append(new)

    def __repr__(self) -> str:
        return (
            f"<VirtualMachine {self.role} {self._run_state.value} "
            f"devices={list(self.devices)}>"
        )
