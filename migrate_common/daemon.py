"""What both daemons share: the VM, the settings, the QMP commands common to both
sides, the ``MIGRATION`` event, and the run loop with signal handling.

``migrate_src.daemon`` and ``migrate_dst.daemon`` add their own commands
(``migrate`` and ``migrate_cancel``; ``migrate-incoming``) on top.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from migrate_common.log import get_logger
from migrate_common.net import Address
from migrate_common.qmp import CommandTable, QmpError, QmpServer, require
from migrate_common.settings import MigrationSettings
from migrate_common.status import MigrationStatus, StatusMachine
from migrate_common.tls import TlsCreds
from protocol.errors import ConfigError, StateError
from vm.machine import VirtualMachine
from vm.properties import PROPERTY_NAMES, format_size

__all__ = ["DaemonBase", "run_daemon"]

QOM_PREFIX = "/machine/peripheral/"


class DaemonBase:
    """VM + settings + status + QMP server; subclasses add side-specific commands."""

    side = "base"

    def __init__(self, vm: VirtualMachine, settings: MigrationSettings | None = None,
                 tls_objects: dict[str, TlsCreds] | None = None) -> None:
        self.vm = vm
        self.tls_objects = dict(tls_objects or {})
        self.settings = settings or MigrationSettings()
        self.status = StatusMachine()
        self.status.subscribe(self._on_status)
        self.log = get_logger(f"migrate-{self.side}")
        self.qmp = QmpServer(self.commands(), package=f"multifd-migrate {self.side}",
                             log=self.log)
        self.stopped = asyncio.Event()
        self._workload_task: asyncio.Task[None] | None = None

    # -- events -------------------------------------------------------------------------
    def _on_status(self, status: MigrationStatus) -> None:
        self.log.info("migration status", status=status.value)
        if self.settings.cap("events"):
            self.qmp.emit_event("MIGRATION", {"status": status.value})

    def emit_event(self, name: str, data: dict[str, Any]) -> None:
        if self.settings.cap("events"):
            self.qmp.emit_event(name, data)

    # -- commands -----------------------------------------------------------------------
    def commands(self) -> CommandTable:
        return {
            "migrate-set-capabilities": self.cmd_set_capabilities,
            "query-migrate-capabilities": self.cmd_query_capabilities,
            "migrate-set-parameters": self.cmd_set_parameters,
            "query-migrate-parameters": self.cmd_query_parameters,
            "query-migrate": self.cmd_query_migrate,
            "query-status": self.cmd_query_status,
            "query-name": self.cmd_query_name,
            "query-uuid": self.cmd_query_uuid,
            "qom-get": self.cmd_qom_get,
            "qom-set": self.cmd_qom_set,
            "qom-list": self.cmd_qom_list,
            "x-query-state-digest": self.cmd_state_digest,
            "quit": self.cmd_quit,
        }

    def tls_creds(self, settings: MigrationSettings) -> TlsCreds | None:
        """The credentials the ``tls-creds`` parameter names, or None without TLS."""
        name = settings.param("tls-creds")
        if not name:
            return None
        creds = self.tls_objects.get(name)
        if creds is None:
            raise ConfigError(f"tls-creds {name!r}: no such object; declare it with --object "
                              f"tls-creds-x509,id={name},dir=PATH")
        return creds

    def migration_running(self) -> bool:
        """Whether a migration uses the settings and devices right now."""
        return self.status.in_progress

    def _refuse_while_migrating(self, what: str) -> None:
        if self.migration_running():
            raise QmpError(f"cannot change {what} while a migration is in progress "
                           f"(status {self.status.status.value})")

    async def cmd_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        self._refuse_while_migrating("capabilities")
        try:
            self.settings.set_capabilities(require(args, "capabilities", list))
        except ConfigError as exc:
            raise QmpError(str(exc)) from None
        return {}

    async def cmd_query_capabilities(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return self.settings.query_capabilities()

    async def cmd_set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        self._refuse_while_migrating("parameters")
        try:
            self.settings.set_parameters(args)
        except ConfigError as exc:
            raise QmpError(str(exc)) from None
        return {}

    async def cmd_query_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.settings.query_parameters()

    async def cmd_query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def cmd_query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.vm.run_state.value, "running": self.vm.running,
                "singlestep": False}

    async def cmd_query_name(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"name": f"multifd-migrate-{self.side}"}

    async def cmd_query_uuid(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"UUID": str(self.vm.uuid)}

    def _device_for_path(self, path: str) -> Any:
        name = path[len(QOM_PREFIX):] if path.startswith(QOM_PREFIX) else path
        device = self.vm.devices.get(name)
        if device is None:
            raise QmpError(f"Device '{path}' not found", "DeviceNotFound")
        return device

    async def cmd_qom_get(self, args: dict[str, Any]) -> Any:
        device = self._device_for_path(require(args, "path", str))
        prop = require(args, "property", str)
        if prop == "device-state":
            return device.state.name.lower().replace("_", "-")
        if prop not in PROPERTY_NAMES and prop not in ("id", "driver"):
            raise QmpError(f"Property '{prop}' not found")
        try:
            return device.config.get_property(prop)
        except ConfigError as exc:
            raise QmpError(str(exc)) from None

    async def cmd_qom_set(self, args: dict[str, Any]) -> dict[str, Any]:
        device = self._device_for_path(require(args, "path", str))
        prop = require(args, "property", str)
        if "value" not in args:
            raise QmpError("Parameter 'value' is missing")
        if self.migration_running() and prop != "x-migration-multifd-transfer":
            raise QmpError(f"cannot change '{prop}' while a migration is in progress")
        try:
            device.set_config(device.config.with_property(prop, args["value"]))
        except (ConfigError, StateError) as exc:
            raise QmpError(str(exc)) from None
        return {}

    async def cmd_qom_list(self, args: dict[str, Any]) -> list[dict[str, str]]:
        path = require(args, "path", str)
        if path.rstrip("/") == QOM_PREFIX.rstrip("/"):
            return [{"name": d, "type": "child<vfio-sim>"} for d in self.vm.devices]
        self._device_for_path(path)
        return [{"name": p, "type": "str"} for p in PROPERTY_NAMES]

    async def cmd_state_digest(self, args: dict[str, Any]) -> dict[str, Any]:
        devices = []
        for device in self.vm.devices.values():
            try:
                digest: str | None = await device.digest_async()
            except StateError:
                digest = None
            size = device.config.precopy_size + device.config.state_size
            devices.append({"id": device.id, "idstr": device.idstr, "digest": digest,
                            "size": size, "size-text": format_size(size),
                            "device-state": device.state.name.lower().replace("_", "-")})
        result: dict[str, Any] = {"devices": devices, "vm-status": self.vm.run_state.value}
        if self.vm.ram is not None:
            # independent of the digest cache the migrations use
            result["ram"] = {"digest": await self.vm.ram.digest_async(fresh=True),
                             "size": self.vm.ram.total_size,
                             "blocks": {b.name: b.used_length
                                        for b in self.vm.ram.blocks.values()}}
        return result

    async def cmd_quit(self, args: dict[str, Any]) -> dict[str, Any]:
        asyncio.get_running_loop().call_soon(self.stopped.set)
        return {}

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, qmp_address: Address) -> None:
        # the VM's device memory exists before management can touch it, as QEMU
        # allocates guest memory at start: generate (source) or pre-fault
        # (destination) it now, so that no migration pays for first-touch faults
        await self.vm.prepare()
        if self.vm.workload is not None:
            self._workload_task = asyncio.get_running_loop().create_task(
                self.vm.workload.run(), name="guest-workload")
        await self.qmp.start(qmp_address)

    async def shutdown(self) -> None:
        if self._workload_task is not None:
            self._workload_task.cancel()
            try:
                await self._workload_task
            except asyncio.CancelledError:
                pass
        await self.qmp.close()


async def run_daemon(daemon: DaemonBase, qmp_address: Address) -> None:
    """Serve until SIGINT/SIGTERM or the QMP ``quit`` command."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, daemon.stopped.set)
        except (NotImplementedError, RuntimeError):
            pass
    await daemon.start(qmp_address)
    try:
        await daemon.stopped.wait()
    finally:
        await daemon.shutdown()
