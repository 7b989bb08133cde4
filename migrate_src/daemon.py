"""The source daemon: the VM that runs here, and the QMP commands that migrate it away.

Adds ``migrate``, ``migrate_cancel``, ``stop`` and ``cont`` to the shared commands.
``migrate`` returns at once and the migration runs as a task; ``query-migrate``
and ``MIGRATION`` events report its progress.
"""

from __future__ import annotations

import asyncio
from typing import Any

from migrate_common.daemon import DaemonBase
from migrate_common.net import parse_address
from migrate_common.qmp import CommandTable, QmpError, require
from migrate_common.settings import MigrationSettings, effective_multifd_transfer
from migrate_common.tls import TlsCreds, client_context
from migrate_src.migration import OutgoingMigration
from protocol.errors import ConfigError
from vm.machine import RunState, VirtualMachine
from vm.vfio_sim import DeviceState

__all__ = ["SourceDaemon"]


class SourceDaemon(DaemonBase):
    side = "src"

    def __init__(self, vm: VirtualMachine, settings: MigrationSettings | None = None,
                 tls_objects: dict[str, TlsCreds] | None = None) -> None:
        super().__init__(vm, settings, tls_objects)
        self.migration: OutgoingMigration | None = None
        self._task: asyncio.Task[None] | None = None

    def commands(self) -> CommandTable:
        table = super().commands()
        table.update({
            "migrate": self.cmd_migrate,
            "migrate_cancel": self.cmd_migrate_cancel,
            "stop": self.cmd_stop,
            "cont": self.cmd_cont,
        })
        return table

    async def cmd_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        if "channels" in args:
            raise QmpError("the 'channels' argument is not supported; use 'uri'")
        uri = require(args, "uri", str)
        if args.get("resume"):
            raise QmpError("postcopy resume is not supported")
        if self.status.in_progress:
            raise QmpError("There's a migration process in progress")
        if self.vm.run_state is not RunState.RUNNING:
            raise QmpError(f"the VM is {self.vm.run_state.value}, not running: "
                           "run 'cont' first to migrate it again")
        try:
            address = parse_address(uri)
            settings = self.settings.snapshot()
            for device in self.vm.devices.values():  # fail early, like QEMU's save_setup
                effective_multifd_transfer(device.config.multifd_transfer, settings, device.id)
            creds = self.tls_creds(settings)
            tls = client_context(creds) if creds is not None else None
        except ConfigError as exc:
            raise QmpError(str(exc)) from None
        self.migration = OutgoingMigration(self.vm, settings, uri, address, self.status,
                                           self.emit_event, tls=tls)
        self._task = asyncio.get_running_loop().create_task(self.migration.run(),
                                                            name="outgoing-migration")
        return {}

    #: parameters QEMU lets a running migration pick up at once
    LIVE_PARAMETERS = frozenset({"max-bandwidth", "downtime-limit"})

    async def cmd_set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        migration = self.migration
        if migration is None or not self.migration_running():
            return await super().cmd_set_parameters(args)
        fixed = sorted(set(args) - self.LIVE_PARAMETERS)
        if fixed:
            raise QmpError(f"cannot change {', '.join(fixed)} while a migration is in "
                           f"progress; only {', '.join(sorted(self.LIVE_PARAMETERS))} can")
        try:
            self.settings.set_parameters(args)
            migration.update_parameters(args)
        except ConfigError as exc:
            raise QmpError(str(exc)) from None
        return {}

    async def cmd_migrate_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.migration is not None:
            self.migration.cancel()
        return {}

    async def cmd_query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.migration is None:
            return {}
        return self.migration.info()

    async def cmd_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.status.in_progress:
            raise QmpError("cannot stop the VM while a migration is in progress")
        if self.vm.run_state is RunState.RUNNING:
            if self.vm.workload is not None:
                self.vm.workload.pause()
            for device in self.vm.devices.values():
                await device.set_state(DeviceState.STOP)
            self.vm.set_run_state(RunState.PAUSED)
        return {}

    async def cmd_cont(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.status.in_progress:
            raise QmpError("cannot resume the VM while a migration is in progress")
        if self.vm.run_state is not RunState.RUNNING:
            await self.vm.resume()
        return {}

    async def shutdown(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await super().shutdown()
