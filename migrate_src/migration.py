"""One outgoing migration, from ``migrate`` to completed, failed or cancelled.

The phases follow QEMU's precopy migration thread:

1. **setup** — connect the main channel and the N multifd channels (each sends its
   64-byte init), send ``hello`` and wait for the destination's reply on the return
   path, OPEN_RETURN_PATH, then one START section per handler (``save_setup``):
   guest RAM first (its block list, the first flush), then every device.
2. **active** — iterations of PART sections: RAM hands dirty pages to the multifd
   channels round after round (``migrate_src/ram.py``), devices send pre-copy data
   on the main channel.  The switchover is decided as QEMU does: no device pre-copy
   left, the destination's switchover-ack (if enabled) received, and the RAM still
   dirty at most ``bandwidth × downtime-limit`` (re-checked after an exact dirty-log
   sync).  ``max-bandwidth`` paces this phase only; a guest that dirties faster than
   the migration moves is reported as not converging.
3. **device** (downtime) — stop the VM (guest workload paused, devices quiesce
   concurrently), send SWITCHOVER_START, start one ``save_complete_precopy_thread``
   task per device at once, write the END sections (RAM's final pass runs while the
   device tasks share the channels), join the tasks, write the FULL sections,
   ``eof`` with the digests of every device and of the RAM as it was when the VM
   stopped, drain every multifd channel, then wait for the destination's SHUT.
   Downtime ends when SHUT arrives: the destination's VM runs.
4. **completed** — the source VM stays stopped (``postmigrate``); devices go to STOP.

Every task runs under one :class:`Funnel`: the first error is recorded as
``error-desc``, all tasks are cancelled in one place, the sockets are closed and the
source VM runs again, with its devices back in RUNNING and its guest writing again.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any

from migrate_common.funnel import Funnel, describe
from migrate_common.log import get_logger
from migrate_common.net import Address, connect
from migrate_common.settings import (
    MigrationSettings,
    compression_level,
    effective_load_config_after_iter,
    effective_multifd_transfer,
)
from migrate_common.status import MigrationStatus as S
from migrate_common.status import StatusMachine
from migrate_common.timeline import TIMELINE
from migrate_common.tls import handshake
from migrate_src.channels import MainChannel, MultifdSender
from migrate_src.ram import RamSaveHandler
from migrate_src.save import VfioSaveHandler
from protocol.control import (
    RAM_DIGEST_KEY,
    SCHEMA_VERSION,
    Command,
    CommandType,
    DeviceDescriptor,
    Eof,
    Hello,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
)
from protocol.errors import (
    ChannelError,
    MigrationError,
    RemoteProtocolError,
    VerificationError,
)
from protocol.multifd import ram_page_count
from vm.machine import RunState, VirtualMachine

__all__ = ["OutgoingMigration"]

BANDWIDTH_WINDOW = 0.1  # seconds: QEMU applies max-bandwidth per 100 ms window


class _Pacer:
    """Caps the live phase at ``max-bandwidth`` bytes/s, budgeted per 100 ms window."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.clock = clock
        self.window_start = clock()
        self.window_bytes = 0

    async def account(self, nbytes: int) -> None:
        if self.limit <= 0:
            return
        self.window_bytes += nbytes
        budget = self.limit * BANDWIDTH_WINDOW
        if self.window_bytes >= budget:
            elapsed = self.clock() - self.window_start
            if elapsed < BANDWIDTH_WINDOW:
                await asyncio.sleep(BANDWIDTH_WINDOW - elapsed)
            self.window_start = self.clock()
            self.window_bytes = 0


class OutgoingMigration:
    """Runs one migration of ``vm`` to ``uri``; see the module docstring."""

    def __init__(self, vm: VirtualMachine, settings: MigrationSettings, uri: str,
                 address: Address, status: StatusMachine,
                 emit_event: Callable[[str, dict[str, Any]], None],
                 tls: ssl.SSLContext | None = None) -> None:
        self.vm = vm
        self.tls = tls
        self.settings = settings
        self.uri = uri
        self.address = address
        self.status = status
        self.emit_event = emit_event
        self.id = str(uuid.uuid4())
        self.log = get_logger("migrate-src", migration=self.id[:8])
        self.funnel = Funnel(self.log)
        self.clock = time.monotonic
        self.start_time = self.clock()
        self.end_time: float | None = None
        self.setup_time: float | None = None
        self.downtime_start: float | None = None
        self.downtime: float | None = None
        self.checkpoints: dict[str, float] = {}
        self.dst_checkpoints: dict[str, float] = {}
        self.expected_downtime: float | None = None
        self.expected_at_switchover: float | None = None
        self.bandwidth: float = 0.0     # bytes/s measured in the live phase
        self.handlers: list[VfioSaveHandler] = []
        self.ram_handler: RamSaveHandler | None = None
        self.pacer: _Pacer | None = None
        self.convergence: dict[str, Any] = {}
        self._ram_digest: asyncio.Future[str] | None = None
        self.main: MainChannel | None = None
        self.sender: MultifdSender | None = None
        self.error_desc: str | None = None
        self.digests: dict[str, str] = {}
        self.dst_digests: dict[str, str] = {}
        self.digests_verified = False  # the destination returned every digest we sent
        self.iterations = 0
        self._cancel_requested = False
        self._abort_save = asyncio.Event()

    # -- control ------------------------------------------------------------------------
    def cancel(self) -> None:
        """``migrate_cancel``: idempotent; a finished migration is left alone."""
        if self.status.status in (S.SETUP, S.ACTIVE, S.DEVICE):
            self._cancel_requested = True
            self.status.set(S.CANCELLING)
            self.log.info("migration cancel requested")
            self._abort_save.set()
            self.funnel.cancel_all()

    def update_parameters(self, args: dict[str, Any]) -> None:
        """``migrate-set-parameters`` during the migration: takes effect at once
        (``max-bandwidth`` only for the live phase; the switchover is never paced)."""
        self.settings.set_parameters(args)
        if "max-bandwidth" in args and self.pacer is not None and \
                self.status.status is not S.DEVICE:
            self.pacer.limit = int(args["max-bandwidth"])
        self.log.info("parameters changed during migration", **{
            k.replace("-", "_"): v for k, v in args.items()})

    async def run(self) -> None:
        """The whole migration; never raises for migration errors (status says why)."""
        self.status.set(S.SETUP)
        with TIMELINE.migration():
            # a failure or the daemon shutting down restores the VM (_abandon)
            await self.funnel.run_to_end(
                self._migrate(), "migration", succeeded=self._finish_success,
                failed=self._abandon,
                shutting_down=ChannelError("source daemon is shutting down"))

    async def _abandon(self) -> None:
        """Failure or cancel: stop all tasks, close sockets, run the VM again."""
        if self.status.status not in (S.CANCELLING, S.FAILING):
            self.status.set(S.FAILING)
        err = self.funnel.error
        if err is not None and self.error_desc is None:
            self.error_desc = describe(err)
        self._abort_save.set()
        await self.funnel.close()
        self._close_sockets()
        try:
            await self._resume_vm()
        except MigrationError as exc:  # report, but the status must still finish
            self.log.error("could not resume the source VM", error=describe(exc))
            if self.error_desc is None:
                self.error_desc = f"could not resume the source VM: {exc}"
        self.end_time = self.clock()
        if self.status.status is S.CANCELLING and self.error_desc is None:
            self.status.set(S.CANCELLED)
            self.log.info("migration cancelled; source VM running")
        else:
            if self.status.status is S.CANCELLING:
                self.status.set(S.FAILING)
            if self.error_desc is None:
                self.error_desc = "migration failed"
            self.status.set(S.FAILED)
            self.log.warning("migration failed; source VM running", error=self.error_desc)

    async def _finish_success(self) -> None:
        self._close_sockets()
        for handler in self._all_handlers():
            await handler.save_cleanup(completed=True)
        self.end_time = self.clock()
        await self.funnel.close()

    def _close_sockets(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.main is not None:
            try:
                self.main.sock.close()
            except OSError:
                pass

    async def _resume_vm(self) -> None:
        if self._ram_digest is not None and not self._ram_digest.done():
            self._ram_digest.cancel()
        if self.ram_handler is not None:
            self.ram_handler.ram.stop_dirty_tracking()
        await self.vm.resume()

    # -- the migration itself -----------------------------------------------------------
    async def _migrate(self) -> None:
        await self._setup()
        self.status.set(S.ACTIVE)
        await self._live_phase()
        await self._switchover()

    def _timeout(self, name: str) -> float:
        return float(self.settings.param(name)) / 1000.0

    async def _setup(self) -> None:
        settings = self.settings
        multifd = settings.cap("multifd")
        return_path = settings.cap("return-path")
        connect_timeout = self._timeout("x-connect-timeout")
        self.log.info("migration starting", uri=self.uri, multifd=multifd,
                      channels=settings.param("multifd-channels") if multifd else 0)

        page_size = self.vm.ram.page_size if self.vm.ram is not None else 4096
        if multifd:  # a packet size the pages do not fit fails before any connection
            ram_page_count(page_size, settings.param("x-multifd-packet-size"))
        main_sock = await self._connect("main channel")
        stall = self._timeout("x-channel-stall-timeout")
        self.main = MainChannel(main_sock, self.funnel, self.log, stall_timeout=stall)
        if multifd:
            count = settings.param("multifd-channels")
            socks = await asyncio.gather(
                *(self._connect(f"multifd channel {i}") for i in range(count)),
                return_exceptions=True)
            good = [s for s in socks if not isinstance(s, BaseException)]
            errors = [s for s in socks if isinstance(s, BaseException)]
            if errors:
                for s in good:
                    s.close()
                raise errors[0]
            self.sender = MultifdSender(good, self.vm.uuid.bytes, self.funnel, self.log,
                                        page_size=page_size,
                                        compression=settings.param("multifd-compression"),
                                        level=compression_level(settings),
                                        stall_timeout=stall,
                                        socket_buffer=settings.param("x-socket-buffer-size"),
                                        packet_size=settings.param("x-multifd-packet-size"))
            await self.sender.send_init()
            self.sender.start()
        await self.main.send_preamble()
        if return_path:
            self.main.start_return_path()

        self.handlers = []
        descriptors = []
        for section_id, device in enumerate(self.vm.devices.values(), start=1):
            mode = effective_multifd_transfer(device.config.multifd_transfer, settings, device.id)
            interlock = effective_load_config_after_iter(device.config.load_config_after_iter,
                                                         mode)
            self.handlers.append(VfioSaveHandler(
                device, section_id, multifd_transfer=mode, load_config_after_iter=interlock,
                switchover_ack=settings.cap("switchover-ack"), main=self.main, log=self.log,
                packet_size=settings.param("x-device-state-packet-size")))
            descriptors.append(DeviceDescriptor(
                id=device.id, driver=device.config.driver, idstr=device.idstr,
                instance_id=device.instance_id, version_id=device.version_id,
                multifd_transfer=mode, load_config_after_iter=interlock,
                properties=device.config.properties()))
        self.pacer = _Pacer(int(settings.param("max-bandwidth")), self.clock)
        if self.vm.ram is not None:
            self.ram_handler = RamSaveHandler(
                self.vm.ram, 0, main=self.main, sender=self.sender,
                zero_page_detection=settings.param("zero-page-detection"),
                pace=self.pacer.account, log=self.log, on_pass=self._on_pass,
                verify=settings.param("x-verify-ram"))
        # device digests of the state we are about to send (RAM's comes at VM stop)
        self.digests = await self.vm.digests()

        hello = Hello(
            protocol_version=SCHEMA_VERSION, migration_id=self.id, vm_uuid=str(self.vm.uuid),
            capabilities={n: settings.cap(n) for n in ("multifd", "return-path",
                                                       "switchover-ack", "validate-uuid")},
            parameters={"multifd-channels": settings.param("multifd-channels") if multifd else 0,
                        "multifd-compression": settings.param("multifd-compression"),
                        "zero-page-detection": settings.param("zero-page-detection"),
                        "x-verify-ram": settings.param("x-verify-ram"),
                        # every device-state data packet but a device's last holds
                        # exactly its data buffer size (save.py), so the destination
                        # places each from its idx without waiting for the others
                        "x-uniform-device-packets": True,
                        # guest bytes per RAM packet (QEMU: always 512 KiB)
                        "x-multifd-packet-size": settings.param("x-multifd-packet-size"),
                        # data bytes per device-state packet (QEMU: at most 1 MiB)
                        "x-device-state-packet-size":
                            settings.param("x-device-state-packet-size"),
                        "ram-size": self.vm.ram.total_size if self.vm.ram is not None else 0},
            devices=tuple(descriptors))
        await self.main.send(hello)
        if return_path:
            try:
                async with asyncio.timeout(connect_timeout):
                    reply = await self.main.hello_reply
            except TimeoutError:
                raise ChannelError(f"destination did not answer the hello within "
                                   f"{connect_timeout:g} s", channel="main") from None
            if not reply.accepted:
                raise RemoteProtocolError(f"destination refused the migration: {reply.error}")
            await self.main.send(Command(CommandType.OPEN_RETURN_PATH))
        for handler in self._all_handlers():
            await self.main.send(SectionStart(handler.section_id, handler.idstr,
                                              handler.instance_id, handler.version_id))
            await handler.save_setup()
            await self.main.send(SectionFooter(handler.section_id))
        self.setup_time = self.clock() - self.start_time
        self.log.info("setup done", setup_ms=round(self.setup_time * 1000, 1))

    async def _connect(self, what: str) -> socket.socket:
        """One connection to the destination, TLS-wrapped when ``tls-creds`` is set."""
        timeout = self._timeout("x-connect-timeout")
        sock = await connect(self.address, timeout, what)
        if self.tls is None:
            return sock
        hostname = (self.settings.param("tls-hostname") or
                    (self.address.host if self.address.transport == "tcp" else "localhost"))
        return await handshake(sock, self.tls, server_side=False, server_hostname=hostname,
                               timeout=timeout, what=what)

    def _bytes_sent(self) -> int:
        total = self.main.stats.bytes if self.main else 0
        if self.sender is not None:
            total += self.sender.bytes_sent
        return total

    def _all_handlers(self) -> list[Any]:
        """Every section in registration order: RAM first, as QEMU registers it."""
        return ([self.ram_handler] if self.ram_handler is not None else []) + list(self.handlers)

    def _on_pass(self, count: int) -> None:
        self.emit_event("MIGRATION_PASS", {"pass": count})

    def _threshold(self) -> float:
        """Bytes that may remain at switchover: bandwidth × downtime-limit."""
        return self.bandwidth * float(self.settings.param("downtime-limit")) / 1000.0

    async def _live_phase(self) -> None:
        assert self.main is not None and self.pacer is not None
        need_ack = self.settings.cap("switchover-ack")
        window_start, window_bytes = self.clock(), self._bytes_sent()
        while True:
            devices = [h for h in self.handlers if h.is_active_iterate()]
            ram = self.ram_handler
            can_switch = not need_ack or self.main.switchover_ack.is_set()
            if not devices and can_switch:
                if ram is None:
                    break
                # QEMU: an estimate below the threshold triggers an exact dirty sync
                if ram.pending() <= self._threshold() and \
                        ram.pending_exact() <= self._threshold():
                    break
            elif not devices and ram is None:
                # nothing left to pre-copy: wait for the destination to allow switchover
                await self.main.switchover_ack.wait()
                continue
            self.iterations += 1
            if ram is not None:
                await self.main.send(SectionPart(ram.section_id))
                await ram.save_live_iterate()
                await self.main.send(SectionFooter(ram.section_id))
            for handler in devices:
                before = self._bytes_sent()
                await self.main.send(SectionPart(handler.section_id))
                await handler.save_live_iterate()
                await self.main.send(SectionFooter(handler.section_id))
                await self.pacer.account(self._bytes_sent() - before)
            now = self.clock()
            if now - window_start >= BANDWIDTH_WINDOW:
                sent = self._bytes_sent()
                self.bandwidth = (sent - window_bytes) / (now - window_start)
                window_start, window_bytes = now, sent
            self._update_convergence()

    def _update_convergence(self) -> None:
        remaining = sum(h.pending_exact() for h in self.handlers)
        ram = self.ram_handler
        if ram is not None:
            remaining += ram.pending()
        self.expected_downtime = remaining / self.bandwidth if self.bandwidth else None
        if ram is None or ram.rounds < 2 or not self.bandwidth:
            self.convergence = {}
            return
        dirty_bps = ram.dirty_rate * ram.page_size
        converging = dirty_bps < 0.9 * self.bandwidth
        self.convergence = {
            "converging": converging,
            "dirty-rate": int(dirty_bps), "bandwidth": int(self.bandwidth),
            "threshold": int(self._threshold()),
        }
        if not converging:
            self.convergence["reason"] = (
                f"the guest dirties {dirty_bps / 1e6:.0f} MB/s but the migration moves "
                f"{self.bandwidth / 1e6:.0f} MB/s: raise max-bandwidth or downtime-limit, "
                "or cancel")

    async def _final_ram_digest(self) -> str:
        assert self.vm.ram is not None
        if self.ram_handler is not None:
            await self.ram_handler.prehasher.stop()
        return await self.vm.ram.digest_async()

    def _checkpoint(self, name: str) -> None:
        assert self.downtime_start is not None
        self.checkpoints[name] = round((self.clock() - self.downtime_start) * 1000, 3)
        TIMELINE.record("checkpoint", name)

    async def _switchover(self) -> None:
        assert self.main is not None
        self.downtime_start = self.clock()
        self._update_convergence()
        self.expected_at_switchover = self.expected_downtime
        self._checkpoint("downtime-start")
        self.vm.set_run_state(RunState.FINISH_MIGRATE)
        if self.vm.workload is not None:
            self.vm.workload.pause()
        self.status.set(S.DEVICE)
        if self.pacer is not None:
            self.pacer.limit = 0  # no throttling while the VM is stopped
        if self.ram_handler is not None and self.ram_handler.verify:
            # the guest is stopped, so this is the content the destination must end with
            self._ram_digest = asyncio.ensure_future(self._final_ram_digest())
        # VM-state callbacks: every device quiesces at the same time
        await asyncio.gather(*(h.on_vm_stop() for h in self.handlers))
        self._checkpoint("vm-stopped")
        try:
            async with asyncio.timeout(self._timeout("x-switchover-timeout")):
                await self._complete_precopy()
        except TimeoutError:
            raise ChannelError(f"switchover did not finish within "
                               f"{self._timeout('x-switchover-timeout'):g} s "
                               "(x-switchover-timeout)", channel="main") from None

    async def _save_complete(self, handler: Any) -> None:
        await self.main.send(SectionEnd(handler.section_id))
        await handler.save_complete()
        await self.main.send(SectionFooter(handler.section_id))

    async def _complete_precopy(self) -> None:
        assert self.main is not None
        await self.main.send(Command(CommandType.SWITCHOVER_START))
        self._checkpoint("switchover-start-sent")
        save_tasks = []
        if self.sender is not None:
            for handler in self.handlers:
                if handler.multifd_transfer:
                    save_tasks.append(self.funnel.spawn(
                        handler.save_complete_precopy_thread(self.sender, self._abort_save),
                        f"save-{handler.device.id}"))
        if save_tasks:
            # one turn of the loop for the save tasks first: their first packets go to
            # the channels now, not after the END sections (2.5 ms with 64 devices)
            await asyncio.sleep(0)
        if self.ram_handler is not None:  # its last pass waits on the channels: unbatched
            await self._save_complete(self.ram_handler)
        async with self.main.batch():  # the devices' END sections: a marker each in multifd mode
            for handler in self.handlers:
                await self._save_complete(handler)
        if save_tasks:
            await asyncio.gather(*save_tasks)
        self._checkpoint("iterable-saved")
        async with self.main.batch():  # small records only: one write, not three a device
            for handler in self.handlers:
                await self.main.send(SectionFull(handler.section_id, handler.idstr,
                                                 handler.instance_id, handler.version_id))
                await handler.save_state()
                await self.main.send(SectionFooter(handler.section_id))
        self._checkpoint("non-iterable-saved")
        if self._ram_digest is not None:
            self.digests[RAM_DIGEST_KEY] = await self._ram_digest
        await self.main.send(Eof(digests=self.digests))
        self._checkpoint("eof-sent")
        if self.sender is not None:
            await self.sender.drain()
        self._checkpoint("channels-drained")
        if self.settings.cap("return-path"):
            shut = await self.main.shut
            self._checkpoint("shut-received")
            self.dst_checkpoints = dict(shut.checkpoints)
            if not shut.ok:
                raise RemoteProtocolError(f"destination failed: {shut.error}")
            self.dst_digests = dict(shut.digests)
            mismatched = [d for d, h in self.digests.items() if shut.digests.get(d) != h]
            if mismatched:
                raise VerificationError(
                    "destination reports different state digests for "
                    + ", ".join(mismatched))
            self.digests_verified = True
        assert self.downtime_start is not None
        self.downtime = self.clock() - self.downtime_start
        self.vm.set_run_state(RunState.POSTMIGRATE)
        self.status.set(S.COMPLETED)
        total = self.clock() - self.start_time
        self.log.info("migration completed", downtime_ms=round(self.downtime * 1000, 1),
                      total_ms=round(total * 1000, 1), bytes=self._bytes_sent())

    # -- status -------------------------------------------------------------------------
    def device_bytes(self) -> int:
        return sum(h.transferred for h in self.handlers)

    def info(self) -> dict[str, Any]:
        """``query-migrate`` for the source side."""
        status = self.status.status
        now = self.end_time if self.end_time is not None else self.clock()
        total_time = now - self.start_time
        sent = self._bytes_sent()
        multifd_bytes = self.sender.bytes_sent if self.sender else 0
        info: dict[str, Any] = {
            "status": status.value,
            "total-time": int(total_time * 1000),
            "x-migration-id": self.id,
            "x-tls": self.tls is not None,
        }
        if self.setup_time is not None:
            info["setup-time"] = int(self.setup_time * 1000)
        if status is S.COMPLETED and self.downtime is not None:
            info["downtime"] = int(round(self.downtime * 1000))
            if self.expected_at_switchover is not None:
                info["x-expected-downtime"] = int(self.expected_at_switchover * 1000)
        elif status in (S.ACTIVE, S.DEVICE) and self.expected_downtime is not None:
            info["expected-downtime"] = int(self.expected_downtime * 1000)
        mbps = sent * 8 / total_time / 1e6 if total_time > 0 else 0.0
        info["ram"] = {
            "transferred": sent,
            "multifd-bytes": multifd_bytes,
            "mbps": round(mbps, 3),
        }
        ram = self.ram_handler
        if ram is not None:
            stats = ram.stats(self.sender)
            info["ram"].update(stats)
            info["ram"]["total"] = ram.ram.total_size
            info["ram"]["page-size"] = ram.page_size
            info["ram"]["pages-per-second"] = int(
                (stats["normal"] + stats["duplicate"]) / total_time) if total_time > 0 else 0
            if status in (S.SETUP, S.ACTIVE, S.DEVICE):
                info["ram"]["remaining"] = ram.pending()
        if self.convergence:
            info["x-convergence"] = dict(self.convergence)
        info["vfio"] = {"transferred": self.device_bytes()}
        remaining = 0
        if status in (S.SETUP, S.ACTIVE, S.DEVICE):
            remaining = (sum(h.pending_exact() for h in self.handlers) if self.handlers
                         else sum(d.stop_copy_size() for d in self.vm.devices.values()))
            if self.ram_handler is not None:
                remaining += self.ram_handler.pending()
        info["x-remaining"] = remaining
        info["x-iterations"] = self.iterations
        channels = []
        if self.main is not None:
            channels.append(self.main.stats.as_dict())
        if self.sender is not None:
            channels.extend(s.as_dict() for s in self.sender.stats)
        info["x-channels"] = channels
        info["x-devices"] = [
            {"id": h.device.id, "mode": "multifd" if h.multifd_transfer else "main",
             "state": h.device.state.name.lower().replace("_", "-"),
             "transferred": h.transferred, "precopy-bytes": h.precopy_bytes,
             "stopcopy-bytes": h.stopcopy_bytes, "packets": h.packets}
            for h in self.handlers]
        if self.checkpoints:
            info["x-downtime-checkpoints"] = dict(self.checkpoints)
        if self.dst_checkpoints:
            info["x-destination-checkpoints"] = dict(self.dst_checkpoints)
        if status is S.COMPLETED:
            # only a return path brings the destination's digests back to compare
            info["x-digests-verified"] = self.digests_verified
            if self.vm.ram is not None:  # x-verify-ram off: devices only
                info["x-ram-verified"] = (self.digests_verified
                                          and RAM_DIGEST_KEY in self.digests)
        if self.error_desc is not None and status in (S.FAILED, S.FAILING):
            info["error-desc"] = self.error_desc
        elif status is S.FAILING and self.funnel.error is not None:
            info["error-desc"] = describe(self.funnel.error)
        return info
