"""The destination daemon: a VM waiting in ``inmigrate`` for its state to arrive.

Adds ``migrate-incoming`` to the shared QMP commands.  Once listening, every
connection belongs to the current :class:`IncomingMigration` attempt; when an attempt
fails the listener stays open and the next connection starts a fresh attempt, so a
destination survives a bad or hostile source and still accepts the next good one.
After a completed migration the VM runs and further connections are refused.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from migrate_common.daemon import DaemonBase
from migrate_common.net import Address, parse_address
from migrate_common.qmp import CommandTable, QmpError, require
from migrate_common.settings import MigrationSettings
from migrate_common.status import MigrationStatus as S
from migrate_dst.channels import BufferPool
from migrate_dst.incoming import IncomingListener
from migrate_dst.migration import IncomingMigration
from migrate_common.tls import TlsCreds, server_context
from migrate_dst.record import ChannelRecorder
from protocol.errors import ConfigError
from vm.machine import RunState, VirtualMachine

__all__ = ["DestinationDaemon"]


class DestinationDaemon(DaemonBase):
    side = "dst"

    def __init__(self, vm: VirtualMachine, settings: MigrationSettings | None = None, *,
                 incoming: str | None = None, record_dir: Path | None = None,
                 tls_objects: dict[str, TlsCreds] | None = None) -> None:
        super().__init__(vm, settings, tls_objects)
        self.incoming_uri = incoming
        self.record_dir = record_dir
        self.vm.set_run_state(RunState.INMIGRATE)
        self.listener: IncomingListener | None = None
        self.attempt: IncomingMigration | None = None
        self.attempts = 0
        self.pool = BufferPool()

    def commands(self) -> CommandTable:
        table = super().commands()
        table["migrate-incoming"] = self.cmd_migrate_incoming
        return table

    async def start(self, qmp_address: Address) -> None:
        await super().start(qmp_address)
        if self.incoming_uri is not None:  # --incoming tcp:...: listen right away
            self.start_incoming(self.incoming_uri)

    async def cmd_migrate_incoming(self, args: dict[str, Any]) -> dict[str, Any]:
        if "channels" in args:
            raise QmpError("the 'channels' argument is not supported; use 'uri'")
        uri = require(args, "uri", str)
        try:
            self.start_incoming(uri)
        except ConfigError as exc:
            raise QmpError(str(exc)) from None
        return {}

    def start_incoming(self, uri: str) -> None:
        if self.listener is not None:
            raise ConfigError("The incoming migration has already been started")
        if self.vm.run_state is not RunState.INMIGRATE:
            raise ConfigError("the VM is already running; start a new destination")
        self.listener = IncomingListener(parse_address(uri), self._on_connection, self.log)
        self.listener.start()
        self.status.set(S.SETUP)
        self.log.info("waiting for an incoming migration", uri=uri,
                      address=self.listener.socket_address)

    def migration_running(self) -> bool:
        # listening alone does not freeze the settings: an attempt takes its snapshot
        # when its first connection arrives, as QEMU reads them when loading starts
        attempt = self.attempt
        return attempt is not None and attempt.task is not None and not attempt.task.done()

    async def _on_connection(self, sock: socket.socket, peer: Any) -> None:
        attempt = self.attempt
        if attempt is None or not attempt.accepting:
            if attempt is not None and attempt.task is not None and not attempt.task.done():
                # all channels of the running attempt are there: refuse, don't disturb it
                attempt.extra_connections += 1
                self.log.warning("refused an extra connection during a migration", peer=peer)
                sock.close()
                return
            if self.status.status is S.COMPLETED:
                self.log.warning("refused a connection: the VM already runs", peer=peer)
                sock.close()
                return
            if self.status.status is not S.SETUP:
                self.status.set(S.SETUP)
            self.attempts += 1
            recorder = None
            if self.record_dir is not None:
                recorder = ChannelRecorder(self.record_dir, self.attempts,
                                           {"side": "destination"})
                self.log.info("recording channels", dir=str(recorder.dir))
            settings = self.settings.snapshot()
            try:
                creds = self.tls_creds(settings)
                tls = server_context(creds) if creds is not None else None
            except ConfigError as exc:
                self.log.error("refused a connection: TLS is misconfigured", error=str(exc))
                sock.close()
                return
            attempt = IncomingMigration(self.vm, settings, self.status,
                                        self.pool, self.emit_event, recorder=recorder, tls=tls)
            self.attempt = attempt
            attempt.start()
        attempt.adopt(sock)

    async def cmd_query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.attempt is not None:
            info = self.attempt.info()
        elif self.status.status is S.NONE:
            return {}
        else:
            info = {"status": self.status.status.value}
        info["status"] = self.status.status.value
        if self.listener is not None:
            info["socket-address"] = [self.listener.socket_address]
        info["x-attempts"] = self.attempts
        return info

    async def shutdown(self) -> None:
        if self.listener is not None:
            await self.listener.close()
        if self.attempt is not None and self.attempt.task is not None:
            self.attempt.task.cancel()
            try:
                await self.attempt.task
            except asyncio.CancelledError:
                pass
        await super().shutdown()
