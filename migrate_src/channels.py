"""The source's channels: the main channel (with its return path) and N multifd channels.

``MainChannel`` writes control messages (and the raw bytes that follow a data record)
in order, and reads the return path on the same socket in a task of its own.

``MultifdSender`` owns the N multifd sockets, one send task each.  As in QEMU, a
caller with a packet waits for an idle channel (a counting semaphore of idle
channels), picks the first idle one round-robin after the last one used, and hands
the packet over; the channel task writes header and payload views with one
``sendmsg`` and becomes idle again.  RAM and device state share these channels.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from migrate_common.funnel import Funnel
from migrate_common.log import TRACE
from migrate_common.net import Buffer, recv_into, sendmsg_all
from protocol.control import (
    ControlDecoder,
    ControlMessage,
    HelloReply,
    MessageReceived,
    Pong,
    Shut,
    StreamClosed,
    SwitchoverAck,
    encode_message,
    encode_preamble,
)
from protocol.compression import PacketCompressor
from protocol.errors import ChannelError, RemoteProtocolError, SequenceError
from protocol.multifd import ChannelInit, RamPacket, ram_page_count
from vm.ram import RamBlock, is_zero_page

__all__ = ["MainChannel", "MultifdSender", "ChannelStats", "Job", "DeviceStateJob", "RamJob",
           "SyncJob"]


@dataclass
class ChannelStats:
    name: str
    bytes: int = 0
    packets: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.name, "bytes": self.bytes, "packets": self.packets}


class MainChannel:
    """Main channel writer plus the return-path reader on the same socket."""

    def __init__(self, sock: socket.socket, funnel: Funnel, log: Any,
                 stall_timeout: float | None = None) -> None:
        self.sock = sock
        self.stall_timeout = stall_timeout
        self.stats = ChannelStats("main")
        self._funnel = funnel
        self._log = log.bind(channel="main")
        self.hello_reply: asyncio.Future[HelloReply] = asyncio.get_running_loop().create_future()
        self.shut: asyncio.Future[Shut] = asyncio.get_running_loop().create_future()
        self.switchover_ack = asyncio.Event()
        self.pongs: asyncio.Queue[int] = asyncio.Queue()
        self.rp_bytes = 0

    async def send_preamble(self) -> None:
        self.stats.bytes += await sendmsg_all(self.sock, [encode_preamble()])

    async def send(self, message: ControlMessage, payload: Buffer | None = None) -> None:
        frame = encode_message(message)
        parts: list[Buffer] = [frame] if payload is None else [frame, payload]
        if TRACE.packets:
            self._log.debug("-> main", message=type(message).__name__,
                            payload=0 if payload is None else len(payload))
        self.stats.bytes += await sendmsg_all(self.sock, parts, self.stall_timeout,
                                              "main channel")
        self.stats.packets += 1

    def start_return_path(self) -> None:
        self._funnel.spawn(self._read_return_path(), "return-path")

    async def _read_return_path(self) -> None:
        decoder = ControlDecoder(expect_preamble=False)
        while True:
            n = await recv_into(self.sock, decoder.buffer())
            events = decoder.eof() if n == 0 else decoder.advance(n)
            self.rp_bytes += n
            for event in events:
                if isinstance(event, StreamClosed):
                    if not self.shut.done():
                        raise ChannelError("destination closed the main channel before "
                                           "sending its result (SHUT)", channel="main")
                    return
                assert isinstance(event, MessageReceived)
                self._dispatch(event.message)

    def _dispatch(self, message: ControlMessage) -> None:
        if TRACE.packets:
            self._log.debug("<- return path", message=type(message).__name__)
        if isinstance(message, HelloReply) and not self.hello_reply.done():
            self.hello_reply.set_result(message)
        elif isinstance(message, Shut) and not self.shut.done():
            self.shut.set_result(message)
            if not message.ok:
                # the destination's reason must be the migration's first error, before
                # the broken sockets it is about to leave behind are noticed
                raise RemoteProtocolError(f"destination failed: {message.error}")
        elif isinstance(message, SwitchoverAck):
            self.switchover_ack.set()
        elif isinstance(message, Pong):
            self.pongs.put_nowait(message.value)
        else:
            raise SequenceError(f"unexpected {type(message).__name__} on the return path")


class Job:
    """One unit of work for a multifd channel; ``build`` runs in the channel task."""

    kind = "job"

    async def build(self, sender: MultifdSender, chan: _SendChannel) -> Sequence[Buffer]:
        raise NotImplementedError


class DeviceStateJob(Job):
    """A device-state packet whose header and payload views are already built."""

    kind = "device-state"
    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[Buffer]) -> None:
        self.parts = parts

    async def build(self, sender: MultifdSender, chan: _SendChannel) -> Sequence[Buffer]:
        return self.parts


class RamJob(Job):
    """Up to ``page_count`` pages of one RAM block.

    Zero-page detection runs here, in the channel task (QEMU's
    ``zero-page-detection=multifd``): the batch is split into normal pages, whose
    data is sent, and zero pages, of which only the offsets travel.
    """

    kind = "ram"
    __slots__ = ("block", "pages", "detect_zero")

    def __init__(self, block: RamBlock, pages: list[int], detect_zero: bool) -> None:
        self.block = block
        self.pages = pages
        self.detect_zero = detect_zero

    async def build(self, sender: MultifdSender, chan: _SendChannel) -> Sequence[Buffer]:
        block = self.block
        size = block.page_size
        view = block.view
        normal: list[int] = []
        zero: list[int] = []
        if self.detect_zero:
            for index in self.pages:
                off = index * size
                (zero if is_zero_page(view[off:off + size]) else normal).append(off)
        else:
            normal = [index * size for index in self.pages]
        compressor = chan.compressor
        pages_data: list[Buffer] = []
        if compressor is not None and normal:
            # the channel's stream runs on across packets; compress off the event loop
            payload = await asyncio.to_thread(
                compressor.compress, [view[o:o + size] for o in normal])
            pages_data = [payload]
            payload_size = len(payload)
        else:
            payload_size = len(normal) * size
        flags = compressor.flag if compressor is not None else 0
        packet = RamPacket(flags=flags, pages_alloc=sender.page_count,
                           normal_pages=len(normal), next_packet_size=payload_size,
                           packet_num=sender.next_packet_num(), zero_pages=len(zero),
                           ramblock=block.name, offsets=tuple(normal + zero))
        parts: list[Buffer] = [packet.encode(sender.page_count)]
        sender.ram_normal_pages += len(normal)
        sender.ram_zero_pages += len(zero)
        if pages_data or compressor is not None:
            return parts + pages_data
        # contiguous normal pages leave as one view
        run_start = run_end = -1
        for off in normal:
            if off == run_end:
                run_end += size
                continue
            if run_start >= 0:
                parts.append(view[run_start:run_end])
            run_start, run_end = off, off + size
        if run_start >= 0:
            parts.append(view[run_start:run_end])
        return parts


class SyncJob(Job):
    """QEMU's SYNC packet: empty, flags ``SYNC``, after all earlier packets."""

    kind = "sync"

    async def build(self, sender: MultifdSender, chan: _SendChannel) -> Sequence[Buffer]:
        return [RamPacket.sync_packet(sender.next_packet_num()).encode(sender.page_count)]


@dataclass
class _SendChannel:
    id: int
    sock: socket.socket
    stats: ChannelStats
    job: Job | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    busy_time: float = 0.0
    compressor: PacketCompressor | None = None


class MultifdSender:
    """N multifd channels shared by RAM and device-state packets."""

    def __init__(self, socks: list[socket.socket], vm_uuid: bytes, funnel: Funnel,
                 log: Any, page_size: int = 4096, compression: str = "none",
                 level: int = 1, stall_timeout: float | None = None) -> None:
        self.stall_timeout = stall_timeout
        self._channels = [
            _SendChannel(i, s, ChannelStats(str(i)),
                         compressor=PacketCompressor(compression, level)
                         if compression != "none" else None)
            for i, s in enumerate(socks)]
        self._idle = asyncio.Semaphore(len(socks))
        self._last = len(socks) - 1
        self._funnel = funnel
        self._log = log
        self._uuid = vm_uuid
        self.bytes_sent = 0
        self.page_count = ram_page_count(page_size)
        self._packet_num = 0
        self.ram_normal_pages = 0
        self.ram_zero_pages = 0
        self.syncs = 0

    @property
    def stats(self) -> list[ChannelStats]:
        return [c.stats for c in self._channels]

    @property
    def channels(self) -> int:
        return len(self._channels)

    def next_packet_num(self) -> int:
        num = self._packet_num
        self._packet_num += 1
        return num

    def start(self) -> None:
        for chan in self._channels:
            self._funnel.spawn(self._run(chan), f"multifd-send-{chan.id}")

    async def send_init(self) -> None:
        """Write every channel's 64-byte init message (QEMU's MultiFDInit_t)."""
        for chan in self._channels:
            init = ChannelInit(uuid=self._uuid, channel_id=chan.id).encode()
            n = await sendmsg_all(chan.sock, [init])
            chan.stats.bytes += n
            self.bytes_sent += n

    async def submit(self, job: Job | Sequence[Buffer]) -> None:
        """Hand one job (or ready header + payload views) to the next idle channel."""
        if not isinstance(job, Job):
            job = DeviceStateJob(job)
        await self._idle.acquire()
        n = len(self._channels)
        for step in range(1, n + 1):
            chan = self._channels[(self._last + step) % n]
            if chan.job is None:
                break
        else:  # the semaphore guarantees an idle channel
            raise AssertionError("no idle multifd channel")
        self._last = chan.id
        chan.job = job
        chan.wake.set()

    async def sync(self) -> None:
        """QEMU's ``multifd_send_sync_main``: one SYNC packet on every channel, each
        after all the jobs handed to that channel before; returns once all are sent."""
        n = len(self._channels)
        for _ in range(n):
            await self._idle.acquire()
        for chan in self._channels:
            chan.job = SyncJob()
            chan.wake.set()
        await self.drain()
        self.syncs += 1

    async def _run(self, chan: _SendChannel) -> None:
        log = self._log.bind(channel=chan.id)
        while True:
            await chan.wake.wait()
            chan.wake.clear()
            job = chan.job
            assert job is not None
            start = time.perf_counter()
            parts = await job.build(self, chan)
            try:
                n = await sendmsg_all(chan.sock, parts, self.stall_timeout,
                                      f"multifd channel {chan.id}")
            except OSError as exc:
                raise ChannelError(f"multifd channel {chan.id}: send failed: "
                                   f"{exc.strerror or exc}", channel=str(chan.id)) from exc
            chan.busy_time += time.perf_counter() - start
            chan.stats.bytes += n
            chan.stats.packets += 1
            self.bytes_sent += n
            if TRACE.packets:
                log.debug("-> multifd", kind=job.kind, bytes=n, packet=chan.stats.packets)
            chan.job = None
            self._idle.release()

    async def drain(self) -> None:
        """Wait until every packet handed over so far has been written to its socket."""
        n = len(self._channels)
        for _ in range(n):
            await self._idle.acquire()
        for _ in range(n):
            self._idle.release()

    def close(self) -> None:
        for chan in self._channels:
            try:
                chan.sock.close()
            except OSError:
                pass
