"""One incoming migration attempt: channels, the main-channel loop, and completion.

An attempt starts with the first connection after ``migrate-incoming`` (or after a
previous attempt finished).  It

1. classifies connections and checks each multifd init (UUID, id < channels, no
   duplicate); reads the ``hello`` on the main channel as soon as it arrives, so a
   mismatch between the two sides fails at once with a clear reason;
2. waits, within ``x-connect-timeout``, until the main channel and all N multifd
   channels are there (status ``active``), runs ``load_setup`` and accepts the hello;
3. runs the main-channel loop: sections go to the device handlers' ``load_state``,
   SWITCHOVER_START starts their load tasks, while the receive tasks feed multifd
   device-state packets to ``load_state_buffer``;
4. after ``eof``: joins every load task, validates every device, compares each
   device's digest with the source's, and only then starts the VM and reports
   ``completed`` with a SHUT on the return path.

The first error anywhere (a receive task, a load task, the main loop) fails the
attempt through the funnel: status ``failing`` → ``failed`` with ``error-desc``, a
SHUT carrying the error goes back to the source if possible, every task and socket
is closed, devices are reset, and the VM is never started from partial state.  The
listener stays open, so the next migration can start right away.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from migrate_common.funnel import Funnel, describe
from migrate_common.log import TRACE, get_logger
from migrate_common.net import recv_into, sendmsg_all
from migrate_common.settings import (
    MigrationSettings,
    effective_load_config_after_iter,
    effective_multifd_transfer,
)
from migrate_common.status import MigrationStatus as S
from migrate_common.status import StatusMachine
from migrate_dst.channels import BufferPool, ReceiveChannel
from migrate_common.threadio import size_buffers
from migrate_common.timeline import TIMELINE
from migrate_dst.incoming import classify_connection
from migrate_dst.load import SectionKind, VfioLoadHandler
from migrate_dst.ram import RamLoadHandler, RecvSync
from migrate_dst.record import ChannelRecorder
from protocol.control import (
    RAM_DIGEST_KEY,
    SCHEMA_VERSION,
    ChannelKind,
    Command,
    CommandType,
    ControlDecoder,
    ControlMessage,
    Eof,
    Hello,
    HelloReply,
    MessageReceived,
    Pong,
    RamEos,
    RamFlush,
    RamPages,
    RamSetup,
    RamZeroPages,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    Shut,
    StreamClosed,
    SwitchoverAck,
    VfioRecord,
    encode_message,
)
from protocol.errors import (
    BadVersionError,
    ChannelError,
    ConfigError,
    HandshakeError,
    RemoteProtocolError,
    SequenceError,
    UnknownDeviceError,
    VerificationError,
)
from protocol.multifd import MULTIFD_PACKET_SIZE, ChannelInit
from protocol.vfio import MAX_DATA_BUFFER_SIZE
from vm.machine import RunState, VirtualMachine
from vm.vfio_sim import DeviceState

__all__ = ["IncomingMigration"]

# device properties that must agree between the two sides
MATCHING_PROPERTIES = ("state-size", "precopy-size", "config-size")


def _hello_value(hello: Hello, name: str, default: Any, kind: type, what: str, *,
                 positive: bool = False) -> Any:
    """A hello parameter, ``default`` when the source did not send it; a value of
    another type (a bool is not an int), or not positive when ``positive``, is the
    source's protocol error."""
    value = hello.parameters.get(name, default)
    if type(value) is not kind or (positive and isinstance(value, int) and value < 1):
        raise RemoteProtocolError(f"hello: {name} must be {what}, got {value!r}")
    return value


class IncomingMigration:
    def __init__(self, vm: VirtualMachine, settings: MigrationSettings,
                 status: StatusMachine, pool: BufferPool,
                 emit_event: Callable[[str, dict[str, Any]], None],
                 recorder: ChannelRecorder | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.recorder = recorder
        self.tls = tls
        self.vm = vm
        self.settings = settings
        self.status = status
        self.pool = pool
        self.emit_event = emit_event
        self.log = get_logger("migrate-dst")
        self.funnel = Funnel(self.log)
        self.clock = time.monotonic
        self.start_time = self.clock()
        self.end_time: float | None = None
        self.channel_count = settings.param("multifd-channels") if settings.cap("multifd") else 0
        self.main_sock: socket.socket | None = None
        self.main_decoder: ControlDecoder | None = None
        self.channels: dict[int, ReceiveChannel] = {}
        self._all_channels = asyncio.Event()
        self._completed = asyncio.Event()
        self._hello_seen = asyncio.Event()
        self.hello: Hello | None = None
        self.handlers: dict[str, VfioLoadHandler] = {}
        self._by_idstr: dict[tuple[str, int], VfioLoadHandler] = {}
        self._sections: dict[int, tuple[Any, str]] = {}
        self.recv_sync = (RecvSync(self.channel_count, self._timeout_switchover())
                          if self.channel_count else None)
        self.ram_handler = (RamLoadHandler(vm.ram, self.recv_sync, self.log,
                                           verify=settings.param("x-verify-ram"))
                            if vm.ram is not None else None)
        # None until the hello says; an early failure still tries to tell the source
        self.return_path: bool | None = None
        self.switchover_ack = False
        self.uniform_device_packets = False  # from the hello: see Reassembly
        self.device_packet_size = MAX_DATA_BUFFER_SIZE  # from the hello: the source's
        self._acks_needed = 0
        self._ack_sent = False
        self.checkpoints: dict[str, float] = {}
        self._switchover_at: float | None = None
        self.error_desc: str | None = None
        self.main_bytes = 0
        self.extra_connections = 0
        self._rp_lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None

    # -- connections --------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        """Whether new connections belong to this attempt."""
        return not self._all_channels.is_set() and not self.funnel.failed

    def adopt(self, sock: socket.socket) -> None:
        """A new connection for this attempt: classify it under the funnel."""
        self.funnel.spawn(self._classify(sock), "classify")

    async def _classify(self, sock: socket.socket) -> None:
        try:
            kind, sock, init, prefix = await classify_connection(sock, self._timeout(),
                                                                 self.tls)
            if kind is ChannelKind.MAIN:
                self._add_main(sock)
                if self.recorder is not None:
                    self.recorder.record("main", prefix)
            else:
                assert init is not None
                self._add_multifd(init, sock)
                if self.recorder is not None:
                    self.recorder.record(f"multifd-{init.channel_id}", prefix)
        except BaseException:
            sock.close()
            raise

    def _add_main(self, sock: socket.socket) -> None:
        if self.main_sock is not None:
            raise HandshakeError("a second main channel connected to this migration")
        self.main_sock = sock
        self.log.info("main channel connected")
        self.funnel.spawn(self._main_loop(), "main-channel")
        self._check_complete()

    def _add_multifd(self, init: ChannelInit, sock: socket.socket) -> None:
        if self.channel_count == 0:
            raise HandshakeError(f"multifd channel {init.channel_id} connected but the "
                                 "destination has the multifd capability off")
        init.validate(expected_uuid=self.vm.uuid.bytes, channels=self.channel_count,
                      connected=self.channels.keys())
        size_buffers(sock, self.settings.param("x-socket-buffer-size"), self.channel_count)
        channel = ReceiveChannel(init.channel_id, sock, self.pool, self._lookup_handler,
                                 self.log, ram=self.ram_handler,
                                 compression=self.settings.param("multifd-compression"),
                                 recorder=self.recorder,
                                 packet_size=self.settings.param("x-multifd-packet-size"))
        self.channels[init.channel_id] = channel
        self.log.info("multifd channel connected", channel=init.channel_id,
                      connected=len(self.channels), of=self.channel_count)
        self._check_complete()

    def _check_complete(self) -> None:
        if self.main_sock is not None and len(self.channels) == self.channel_count:
            self._all_channels.set()

    def _lookup_handler(self, idstr: str, instance_id: int) -> VfioLoadHandler | None:
        return self._by_idstr.get((idstr, instance_id))

    def _timeout(self) -> float:
        return float(self.settings.param("x-connect-timeout")) / 1000.0

    def _timeout_switchover(self) -> float:
        return float(self.settings.param("x-switchover-timeout")) / 1000.0

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name="incoming")

    async def run(self) -> None:
        with TIMELINE.migration():
            await self.funnel.run_to_end(
                self._incoming(), "incoming-migration", succeeded=self._finish_success,
                failed=self._abandon,
                shutting_down=ChannelError("destination daemon is shutting down"))

    async def _incoming(self) -> None:
        timeout = self._timeout()
        try:
            async with asyncio.timeout(timeout):
                await self._all_channels.wait()
        except TimeoutError:
            have = "connected" if self.main_sock is not None else "missing"
            raise ChannelError(
                f"only {len(self.channels)} of {self.channel_count} multifd channels "
                f"connected within {timeout:g} s (main channel {have}, x-connect-timeout)",
                channel="incoming") from None
        self.status.set(S.ACTIVE)
        self.log.info("all channels connected", channels=self.channel_count)
        for channel in self.channels.values():
            self.funnel.spawn(channel.run(), f"multifd-recv-{channel.id}")
        # the main-channel task drives the rest; an error anywhere cancels this wait
        await self._completed.wait()

    async def _abandon(self) -> None:
        if self.status.status is S.COMPLETED:
            # the VM already runs with verified state; only the goodbye failed
            self.log.warning("error after completion", error=describe(self.funnel.error
                                                                     or Exception("?")))
            await self._finish_success()
            return
        if self.status.status is not S.FAILING:
            self.status.set(S.FAILING)
        err = self.funnel.error or ChannelError("incoming migration aborted")
        self.error_desc = describe(err)
        await self.funnel.close()
        if self.ram_handler is not None:
            await self.ram_handler.prehasher.stop()
        if self.recorder is not None:
            self.recorder.update_meta(error=self.error_desc)
            self.recorder.close()
        if self.return_path is not False and self.main_sock is not None:
            await self._say_goodbye(Shut(ok=False, error=self.error_desc,
                                         code=getattr(err, "code", "error")))
        for handler in self.handlers.values():
            handler.load_cleanup()
        self._close_sockets()
        for device in self.vm.devices.values():
            if device.state is not DeviceState.RUNNING:
                device.reset()
        self.end_time = self.clock()
        self.status.set(S.FAILED)
        self.log.warning("incoming migration failed; VM not started", error=self.error_desc)

    async def _say_goodbye(self, shut: Shut, linger: float = 1.0) -> None:
        """Send a failure SHUT so that the source learns why, then close gracefully.

        Closing a socket with unread bytes in it makes the kernel send a reset, and a
        reset can destroy the SHUT before the source reads it.  So: send it, half-close
        the main channel, and read and discard until the source closes (at most
        ``linger`` seconds); the multifd sockets stay open, unread, meanwhile.
        """
        assert self.main_sock is not None
        sock = self.main_sock
        try:
            async with asyncio.timeout(linger):
                await self._send_rp(shut)
                if not isinstance(sock, ssl.SSLSocket):
                    # (on an SSLSocket, shutdown() would drop the TLS layer instead)
                    sock.shutdown(socket.SHUT_WR)
                scratch = memoryview(bytearray(64 * 1024))
                while await recv_into(sock, scratch):
                    pass
        except (OSError, TimeoutError):
            pass

    async def _finish_success(self) -> None:
        await self.funnel.close()
        if self.ram_handler is not None:
            await self.ram_handler.prehasher.stop()
        if self.recorder is not None:
            self.recorder.close()
        for handler in self.handlers.values():
            handler.load_cleanup()
        self._close_sockets()
        self.end_time = self.clock()

    def _close_sockets(self) -> None:
        for channel in self.channels.values():
            channel.close()
        if self.main_sock is not None:
            try:
                self.main_sock.close()
            except OSError:
                pass

    # -- return path --------------------------------------------------------------------
    async def _send_rp(self, message: ControlMessage) -> None:
        assert self.main_sock is not None
        async with self._rp_lock:
            if TRACE.packets:
                self.log.debug("-> return path", message=type(message).__name__)
            await sendmsg_all(self.main_sock, [encode_message(message)])

    # -- main channel -------------------------------------------------------------------
    async def _messages(self) -> Any:
        assert self.main_sock is not None
        decoder = ControlDecoder(expect_preamble=False, allocate=self._allocate_main)
        while True:
            view = decoder.buffer()
            n = await recv_into(self.main_sock, view)
            self.main_bytes += n
            if self.recorder is not None and n:
                self.recorder.record("main", view[:n])
            events = decoder.eof() if n == 0 else decoder.advance(n)
            for event in events:
                if isinstance(event, StreamClosed):
                    raise ChannelError("source closed the main channel before the end of "
                                       "the migration stream", channel="main")
                assert isinstance(event, MessageReceived)
                if TRACE.packets:
                    self.log.debug("<- main", message=type(event.message).__name__)
                yield event.message, event.payload

    def _allocate_main(self, size: int) -> memoryview:
        # pooled: a fresh 1 MiB bytearray per record would fault in new pages each time
        return memoryview(self.pool.take(size))

    def _release_main(self, payload: memoryview | None) -> None:
        if payload is not None and isinstance(payload.obj, bytearray):
            self.pool.give(payload.obj)

    async def _main_loop(self) -> None:
        messages = self._messages()
        try:
            async with asyncio.timeout(self._timeout()):
                first, _ = await anext(messages)
        except TimeoutError:
            raise ChannelError(f"the main channel sent no hello within {self._timeout():g} s "
                               "(x-connect-timeout)", channel="main") from None
        if not isinstance(first, Hello):
            raise SequenceError(f"main channel must start with hello, got "
                                f"{type(first).__name__}")
        self._check_hello(first)
        try:
            async with asyncio.timeout(self._timeout()):
                await self._all_channels.wait()
        except TimeoutError:
            return  # _incoming reports the missing channels
        await self._setup(first)
        section: tuple[VfioLoadHandler, SectionKind, int] | None = None
        body_done = False
        async for message, payload in messages:
            if isinstance(message, (VfioRecord, RamSetup, RamPages, RamZeroPages, RamFlush,
                                    RamEos)):
                if section is None or body_done:
                    raise SequenceError(f"{type(message).__name__} record outside a "
                                        "section body")
                if (section[0] is self.ram_handler) != (not isinstance(message, VfioRecord)):
                    raise SequenceError(f"{type(message).__name__} record in the section of "
                                        f"{section[0].idstr!r}")
                handler, kind, _ = section
                try:
                    body_done = await handler.load_state(kind, message, payload)
                finally:
                    self._release_main(payload)
            elif isinstance(message, (SectionStart, SectionFull)):
                if section is not None:
                    raise SequenceError("section started inside another section")
                handler = self._bind_section(message)
                kind = SectionKind.START if isinstance(message, SectionStart) else SectionKind.FULL
                section, body_done = (handler, kind, message.section_id), False
            elif isinstance(message, (SectionPart, SectionEnd)):
                if section is not None:
                    raise SequenceError("section started inside another section")
                bound = self._sections.get(message.section_id)
                if bound is None:
                    raise SequenceError(f"unknown section id {message.section_id}")
                kind = SectionKind.PART if isinstance(message, SectionPart) else SectionKind.END
                section, body_done = (bound[0], kind, message.section_id), False
            elif isinstance(message, SectionFooter):
                if section is None or section[2] != message.section_id:
                    raise SequenceError(f"section footer {message.section_id} does not match "
                                        "the open section")
                if not body_done:
                    raise SequenceError(f"section {message.section_id} ended before its "
                                        "body was complete")
                section = None
            elif isinstance(message, Command):
                await self._command(message)
            elif isinstance(message, Eof):
                if section is not None:
                    raise SequenceError("end of stream inside a section")
                await self._complete(message)
                return
            else:
                raise SequenceError(f"unexpected {type(message).__name__} on the main channel")

    def _check_hello(self, hello: Hello) -> None:
        """Compare the source's view of the migration with ours; raise on any mismatch."""
        # known first, so that a refusal below still reaches the source as a SHUT
        self.return_path = bool(hello.capabilities.get("return-path"))
        if hello.protocol_version != SCHEMA_VERSION:
            raise BadVersionError(f"source speaks control schema {hello.protocol_version}, "
                                  f"this destination {SCHEMA_VERSION}")
        if hello.vm_uuid != str(self.vm.uuid):
            raise HandshakeError(f"VM UUID mismatch: source {hello.vm_uuid}, destination "
                                 f"{self.vm.uuid}; start both with the same --uuid")
        caps = hello.capabilities
        src_channels = int(hello.parameters.get("multifd-channels", 0))
        if bool(caps.get("multifd")) != self.settings.cap("multifd"):
            raise ConfigError(
                "multifd capability differs: source "
                f"{'on' if caps.get('multifd') else 'off'}, destination "
                f"{'on' if self.settings.cap('multifd') else 'off'}; set it on both sides")
        if caps.get("multifd") and src_channels != self.channel_count:
            raise ConfigError(f"multifd-channels differs: source {src_channels}, destination "
                              f"{self.channel_count}; set the same value on both sides")
        if hello.parameters.get("multifd-compression") != self.settings.param(
                "multifd-compression"):
            raise ConfigError("multifd-compression differs between source and destination")
        if bool(caps.get("switchover-ack")) != self.settings.cap("switchover-ack"):
            raise ConfigError("switchover-ack capability differs between source and "
                              "destination; set it on both sides")
        # a source that predates the parameter always sends the RAM digest
        sent = "x-verify-ram" in hello.parameters
        verify = _hello_value(hello, "x-verify-ram", True, bool, "a boolean")
        if self.vm.ram is not None and verify is not self.settings.param("x-verify-ram"):
            raise ConfigError(
                f"x-verify-ram differs: source {'on' if verify else 'off'}"
                + ("" if sent else " (not sent: a source without the parameter always "
                                   "verifies)")
                + f", destination {'on' if self.settings.param('x-verify-ram') else 'off'}"
                "; set it on both sides")
        # ours promises uniform device-state packets; QEMU's packets may have any size
        self.uniform_device_packets = _hello_value(hello, "x-uniform-device-packets", False,
                                                   bool, "a boolean")
        # a source that predates the parameter sends QEMU's 512 KiB packets
        packet_size = _hello_value(hello, "x-multifd-packet-size", MULTIFD_PACKET_SIZE, int,
                                   "an integer")
        if (self.vm.ram is not None and self.channel_count
                and packet_size != self.settings.param("x-multifd-packet-size")):
            raise ConfigError(f"x-multifd-packet-size differs: source {packet_size}, "
                              f"destination {self.settings.param('x-multifd-packet-size')}; "
                              "set it on both sides")
        # a source that predates the parameter reads device state in QEMU's 1 MiB pieces
        device_packet = _hello_value(hello, "x-device-state-packet-size", MAX_DATA_BUFFER_SIZE,
                                     int, "a positive integer", positive=True)
        accepted = self.settings.param("x-device-state-packet-size")
        if (device_packet > accepted
                and any(d.multifd_transfer for d in hello.devices)):
            raise ConfigError(f"x-device-state-packet-size: the source sends device-state "
                              f"packets of up to {device_packet} bytes, this destination "
                              f"accepts at most {accepted}; raise it here or lower it on the "
                              "source")
        self.device_packet_size = device_packet
        src_ram = int(hello.parameters.get("ram-size", 0))
        dst_ram = self.vm.ram.total_size if self.vm.ram is not None else 0
        if src_ram != dst_ram:
            raise ConfigError(f"guest RAM size differs: source {src_ram} bytes, destination "
                              f"{dst_ram} bytes; start both sides with the same --memory")
        seen: set[str] = set()
        for desc in hello.devices:
            device = self.vm.devices.get(desc.id)
            if device is None:
                raise UnknownDeviceError(f"source device {desc.id} ({desc.idstr}) does not "
                                         "exist on the destination; start both sides with "
                                         "the same --device list")
            seen.add(desc.id)
            if (desc.idstr, desc.instance_id) != (device.idstr, device.instance_id):
                raise UnknownDeviceError(f"device {desc.id}: section {desc.idstr!r} instance "
                                         f"{desc.instance_id} does not match "
                                         f"{device.idstr!r} instance {device.instance_id}")
            if desc.driver != device.config.driver:
                raise ConfigError(f"device {desc.id}: driver {desc.driver} on the source, "
                                  f"{device.config.driver} here")
            if desc.version_id > device.version_id:
                raise BadVersionError(f"device {desc.id}: section version {desc.version_id} "
                                      f"is newer than ours ({device.version_id})")
            mine = device.config.properties()
            for prop in MATCHING_PROPERTIES:
                if desc.properties.get(prop) != mine.get(prop):
                    raise ConfigError(f"device {desc.id}: {prop} differs (source "
                                      f"{desc.properties.get(prop)}, destination "
                                      f"{mine.get(prop)})")
            mode = effective_multifd_transfer(device.config.multifd_transfer, self.settings,
                                              device.id)
            if mode != desc.multifd_transfer:
                where = {True: "multifd channels", False: "the main channel"}
                raise ConfigError(f"device {desc.id}: the source sends its state over "
                                  f"{where[desc.multifd_transfer]} but the destination "
                                  f"expects {where[mode]} (x-migration-multifd-transfer)")
            interlock = effective_load_config_after_iter(
                device.config.load_config_after_iter, mode)
            if interlock != desc.load_config_after_iter:
                raise ConfigError(f"device {desc.id}: x-migration-load-config-after-iter is "
                                  f"{'on' if desc.load_config_after_iter else 'off'} on the "
                                  f"source but {'on' if interlock else 'off'} here")
        missing = [d for d in self.vm.devices if d not in seen]
        if missing:
            raise UnknownDeviceError(f"destination device(s) {', '.join(missing)} have no "
                                     "counterpart on the source")
        self.hello = hello
        self.log = self.log.bind(migration=hello.migration_id[:8])
        if self.recorder is not None:
            self.recorder.update_meta(migration_id=hello.migration_id, vm_uuid=hello.vm_uuid,
                                      channels=self.channel_count,
                                      compression=self.settings.param("multifd-compression"))
        self.return_path = bool(caps.get("return-path"))
        self.switchover_ack = bool(caps.get("switchover-ack"))
        self.log.info("hello accepted", migration=hello.migration_id[:8],
                      devices=len(hello.devices))

    async def _setup(self, hello: Hello) -> None:
        for desc in hello.devices:
            device = self.vm.devices[desc.id]
            handler = VfioLoadHandler(
                device, multifd_transfer=desc.multifd_transfer,
                load_config_after_iter=desc.load_config_after_iter,
                switchover_ack=self.switchover_ack, funnel=self.funnel, log=self.log,
                on_ack=self._device_acked, uniform_packets=self.uniform_device_packets,
                packet_size=self.device_packet_size)
            self.handlers[desc.id] = handler
            self._by_idstr[(device.idstr, device.instance_id)] = handler
        if self.ram_handler is not None:
            await self.ram_handler.load_setup()
        for handler in self.handlers.values():
            await handler.load_setup()
        self._acks_needed = sum(h.switchover_ack_needed() for h in self.handlers.values())
        if self.return_path:
            await self._send_rp(HelloReply(accepted=True))

    def _device_acked(self) -> None:
        self._acks_needed -= 1
        if self._acks_needed == 0 and self.return_path:
            self.funnel.spawn(self._send_ack(), "switchover-ack")

    async def _send_ack(self) -> None:
        if not self._ack_sent:
            self._ack_sent = True
            await self._send_rp(SwitchoverAck())

    def _bind_section(self, message: SectionStart | SectionFull) -> Any:
        handler: Any = self._by_idstr.get((message.idstr, message.instance_id))
        if handler is None and self.ram_handler is not None and (
                message.idstr, message.instance_id) == ("ram", 0):
            handler = self.ram_handler
        if handler is None:
            raise UnknownDeviceError(f"section for unknown device {message.idstr!r} "
                                     f"instance {message.instance_id}")
        if message.version_id > handler.version_id:
            raise BadVersionError(f"section {message.idstr!r}: version {message.version_id} "
                                  f"is newer than ours ({handler.version_id})")
        bound = self._sections.get(message.section_id)
        if bound is not None and bound[0] is not handler:
            raise SequenceError(f"section id {message.section_id} reused for another device")
        self._sections[message.section_id] = (handler, message.idstr)
        return handler

    async def _command(self, message: Command) -> None:
        if message.cmd is CommandType.OPEN_RETURN_PATH:
            if self.switchover_ack and self._acks_needed == 0 and self.return_path:
                await self._send_ack()
        elif message.cmd is CommandType.PING:
            if self.return_path:
                await self._send_rp(Pong(message.value))
        elif message.cmd is CommandType.SWITCHOVER_START:
            if self._switchover_at is not None:
                raise SequenceError("duplicate SWITCHOVER_START")
            self._switchover_at = self.clock()
            self._checkpoint("switchover-start")
            self.funnel.spawn(self._switchover_watchdog(), "switchover-watchdog")
            for handler in self.handlers.values():
                await handler.switchover_start()
        else:
            raise SequenceError(f"unsupported command {message.cmd!r}")

    async def _switchover_watchdog(self) -> None:
        """A source that stalls while its VM is stopped must not hold us forever."""
        timeout = self._timeout_switchover()
        await asyncio.sleep(timeout)
        if not self._completed.is_set():
            raise ChannelError(f"the source did not finish the switchover within {timeout:g} s "
                               "of SWITCHOVER_START (x-switchover-timeout)", channel="main")

    def _checkpoint(self, name: str) -> None:
        base = self._switchover_at if self._switchover_at is not None else self.start_time
        self.checkpoints[name] = round((self.clock() - base) * 1000, 3)
        TIMELINE.record("checkpoint", name)

    async def _complete(self, eof: Eof) -> None:
        self._checkpoint("eof-received")
        await asyncio.gather(*(h.wait_loaded() for h in self.handlers.values()))
        self._checkpoint("devices-loaded")
        for handler in self.handlers.values():     # RESUMING → STOP validates the data
            await handler.device.set_state(DeviceState.STOP)
        digests = {}
        for device_id, handler in self.handlers.items():
            mine = handler.device.digest()
            theirs = eof.digests.get(device_id)
            if theirs != mine:
                raise VerificationError(f"device {device_id}: loaded state digest {mine} "
                                        f"does not match the source's {theirs}")
            digests[device_id] = mine
        if self.ram_handler is not None and self.ram_handler.verify:
            await self.ram_handler.prehasher.stop()
            mine = await self.ram_handler.ram.digest_async()
            theirs = eof.digests.get(RAM_DIGEST_KEY)
            if theirs != mine:
                raise VerificationError(f"guest RAM: loaded digest {mine} does not match the "
                                        f"source's {theirs}")
            digests[RAM_DIGEST_KEY] = mine
        self._checkpoint("digests-verified")
        for handler in self.handlers.values():
            await handler.device.set_state(DeviceState.RUNNING)
        self.vm.set_run_state(RunState.RUNNING)
        if self.vm.workload is not None:
            self.vm.workload.resume()  # the guest carries on where it stopped
        self._checkpoint("vm-started")
        self.status.set(S.COMPLETED)
        if self.return_path:
            await self._send_rp(Shut(ok=True, digests=digests, checkpoints=self.checkpoints))
        self.log.info("incoming migration completed", checkpoints=self.checkpoints)
        self._completed.set()

    # -- status -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        status = self.status.status
        now = self.end_time if self.end_time is not None else self.clock()
        info: dict[str, Any] = {"status": status.value,
                                "total-time": int((now - self.start_time) * 1000)}
        channels = [{"id": "main", "bytes": self.main_bytes}]
        channels += [{"id": str(c.id), "bytes": c.bytes, "packets": c.packets}
                     for c in sorted(self.channels.values(), key=lambda c: c.id)]
        info["x-channels"] = channels
        info["x-devices"] = [h.stats() for h in self.handlers.values()]
        if self.ram_handler is not None:
            info["ram"] = self.ram_handler.stats()
        if self.checkpoints:
            info["x-downtime-checkpoints"] = dict(self.checkpoints)
        if self.recorder is not None:
            info["x-recording"] = str(self.recorder.dir)
        if status is S.FAILED and self.error_desc:
            info["error-desc"] = self.error_desc
        elif status is S.FAILING and self.funnel.error is not None:
            info["error-desc"] = describe(self.funnel.error)
        return info
