"""The source's channels: the main channel (with its return path) and N multifd channels.

``MainChannel`` writes control messages (and the raw bytes that follow a data record)
in order, and reads the return path on the same socket in a task of its own.

``MultifdSender`` owns the N multifd sockets, one send thread each.  As in QEMU, a
caller with a packet waits for a channel with room (a counting semaphore of queue
places), picks the first idle one round-robin after the last one used, and hands
the packet over; the channel's thread builds it and writes header and payload views
with one ``sendmsg``.  RAM and device state share these channels.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from migrate_common.funnel import Funnel
from migrate_common.log import TRACE
from migrate_common.net import Buffer, recv_into, sendmsg_all
from migrate_common.threadio import (
    LoopWaker,
    Stopped,
    Stopper,
    hand_to_thread,
    send_all,
    size_buffers,
)
from migrate_common.timeline import TIMELINE
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
from protocol.multifd import (
    MULTIFD_PACKET_SIZE,
    ChannelInit,
    RamPacket,
    encode_ram_run,
    ram_page_count,
)
from vm.ram import RamBlock, page_runs, run_is_normal, split_zero_pages

__all__ = ["MainChannel", "MultifdSender", "ChannelStats", "Job", "DeviceStateJob", "RamJob",
           "SyncJob", "JOB_BYTES"]


@dataclass
class ChannelStats:
    name: str
    bytes: int = 0
    packets: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.name, "bytes": self.bytes, "packets": self.packets}


# A batch of main-channel messages is written out once it holds this many bytes or
# buffers: the destination starts on them, and one ``sendmsg`` stays below IOV_MAX.
BATCH_FLUSH_BYTES = 256 * 1024
BATCH_FLUSH_PARTS = 512


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
        self._batch: list[Buffer] | None = None
        self._batch_bytes = 0

    async def send_preamble(self) -> None:
        self.stats.bytes += await sendmsg_all(self.sock, [encode_preamble()])

    async def send(self, message: ControlMessage, payload: Buffer | None = None) -> None:
        frame = encode_message(message)
        parts: list[Buffer] = [frame] if payload is None else [frame, payload]
        if TRACE.packets:
            self._log.debug("-> main", message=type(message).__name__,
                            payload=0 if payload is None else len(payload))
        batch = self._batch
        if batch is None:
            await self._write(parts)
        else:
            batch.extend(parts)
            self._batch_bytes += sum(len(part) for part in parts)
        self.stats.packets += 1
        if batch is not None and (self._batch_bytes >= BATCH_FLUSH_BYTES
                                  or len(batch) >= BATCH_FLUSH_PARTS):
            await self._flush_batch()

    async def _write(self, parts: Sequence[Buffer]) -> None:
        self.stats.bytes += await sendmsg_all(self.sock, parts, self.stall_timeout,
                                              "main channel")

    @contextlib.asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        """Gather the messages sent inside into few writes, flushed on leaving.

        Meant for runs of small records that need no answer (64 devices' FULL
        sections are 192 of them): written one by one, each would wake the
        destination's loop for a record or two.  Left by an exception, the batch
        is dropped: the migration is failing and the channel goes with it.
        """
        if self._batch is not None:
            raise RuntimeError("main channel: batches do not nest")
        self._batch, self._batch_bytes = [], 0
        try:
            yield
            await self._flush_batch()
        finally:
            self._batch, self._batch_bytes = None, 0

    async def _flush_batch(self) -> None:
        assert self._batch is not None
        parts, self._batch, self._batch_bytes = self._batch, [], 0
        if parts:
            await self._write(parts)

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
    """One unit of work for a multifd channel.

    ``build`` runs in the channel's thread, just before the send (so zero-page
    detection and compression run beside the event loop and the other channels);
    ``sent`` runs on the event loop once the bytes are in the socket.
    """

    kind = "job"
    #: packets on the wire for this job
    packets = 1
    #: ``sent`` must run as soon as the job is sent (someone awaits it), not with the
    #: next few jobs (``WAKE_BELOW``)
    urgent = False

    def build(self, sender: MultifdSender, chan: _SendChannel) -> Sequence[Buffer]:
        raise NotImplementedError

    def sent(self, sender: MultifdSender) -> None:
        return None


class DeviceStateJob(Job):
    """A device-state packet whose header and payload views are already built."""

    kind = "device-state"
    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[Buffer]) -> None:
        self.parts = parts

    def build(self, sender: MultifdSender, chan: _SendChannel) -> Sequence[Buffer]:
        return self.parts


class RamJob(Job):
    """Up to :attr:`MultifdSender.job_packets` RAM packets, each of up to
    ``page_count`` pages of one block, sent back to back with one ``sendmsg`` (fewer
    trips between the event loop and the channel thread; the wire is the same as one
    packet per job).

    Zero-page detection runs here, in the channel's thread (QEMU's
    ``zero-page-detection=multifd``): each batch is split into normal pages, whose
    data is sent, and zero pages, of which only the offsets travel.
    """

    kind = "ram"
    __slots__ = ("batches", "detect_zero", "normal", "zero", "packets")

    def __init__(self, batches: list[tuple[RamBlock, Sequence[int]]], detect_zero: bool) -> None:
        self.batches = batches
        self.packets = len(batches)
        self.detect_zero = detect_zero
        self.normal = self.zero = 0

    def build(self, sender: MultifdSender, chan: _SendChannel) -> Sequence[Buffer]:
        parts: list[Buffer] = []
        for block, pages in self.batches:
            self._build_packet(sender, chan, block, pages, parts)
        return parts

    def _build_packet(self, sender: MultifdSender, chan: _SendChannel, block: RamBlock,
                      pages: Sequence[int], parts: list[Buffer]) -> None:
        size = block.page_size
        view = block.view
        if type(pages) is range and pages.step == 1 and chan.compressor is None:
            # the usual batch, consecutive pages: when every page is normal, the
            # packet is built and sent as one span, without a Python int per page
            first, n = pages.start, len(pages)
            if n and (not self.detect_zero or run_is_normal(block.words, first, n, size)):
                start = first * size
                parts.append(encode_ram_run(page_count=sender.page_count, page_size=size,
                                            packet_num=sender.next_packet_num(),
                                            ramblock=block.name, first=start, pages=n))
                parts.append(view[start:start + n * size])
                self.normal += n
                return
        zero: list[int] = []
        if self.detect_zero:
            normal, zero = split_zero_pages(view, pages, size, block.words)
        else:
            normal = [index * size for index in pages]
        compressor = chan.compressor
        payload: Buffer | None = None
        if compressor is not None and normal:
            # the channel's stream runs on across packets
            payload = compressor.compress([view[o:o + size] for o in normal])
            payload_size = len(payload)
        else:
            payload_size = len(normal) * size
        flags = compressor.flag if compressor is not None else 0
        packet = RamPacket(flags=flags, pages_alloc=sender.page_count,
                           normal_pages=len(normal), next_packet_size=payload_size,
                           packet_num=sender.next_packet_num(), zero_pages=len(zero),
                           ramblock=block.name, offsets=tuple(normal + zero))
        parts.append(packet.encode(sender.page_count))
        self.normal += len(normal)
        self.zero += len(zero)
        if compressor is not None:
            if payload is not None:
                parts.append(payload)
            return
        # contiguous normal pages leave as one view
        parts.extend(view[start:stop] for _, _, start, stop in page_runs(normal, size))

    def sent(self, sender: MultifdSender) -> None:
        sender.ram_normal_pages += self.normal
        sender.ram_zero_pages += self.zero


class SyncJob(Job):
    """QEMU's SYNC packet: empty, flags ``SYNC``, after all earlier packets."""

    kind = "sync"
    urgent = True
    __slots__ = ("done",)

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def build(self, sender: MultifdSender, chan: _SendChannel) -> Sequence[Buffer]:
        return [RamPacket.sync_packet(sender.next_packet_num()).encode(sender.page_count)]

    def sent(self, sender: MultifdSender) -> None:
        if not self.done.done():
            self.done.set_result(None)


#: Guest bytes of RAM a job describes at most: 4 packets of QEMU's 512 KiB, one of
#: 2 MiB (x-multifd-packet-size).  With 2 MiB packets, jobs of 4 packets ran about as
#: fast as jobs of 1, but a device-state packet waits behind the jobs queued before
#: it: the README demo's downtime (1 GiB of scattered dirty RAM beside 4 devices of
#: 256 MiB, 4 channels, bench/ab.py) was 417-448 ms with 1 packet per job, 477-607
#: with 4.
JOB_BYTES = 2 * 1024 * 1024

#: Jobs queued per channel: the next packets wait in the channel's queue while the
#: current one is being sent, so the socket never idles for a trip through the loop.
QUEUE_DEPTH = 4

#: A channel thread wakes the loop to collect its finished jobs (and refill its
#: queue) only once fewer than this many jobs wait in its queue, not after every
#: job: each wake-up is a system call and, when the loop sleeps on the other CPU, an
#: interrupt between CPUs — in this VM a costly exit.  The job still queued keeps
#: the socket busy while the loop answers.  Alternating runs (bench/ab.py, 4 x 512M
#: of device state) against a wake-up per job and 2 jobs per channel: 1 channel
#: 3.26 → 4.0, 4 channels 3.79 → 4.16, 16 channels 2.8 → 3.2 GB/s; 2 GiB of RAM on
#: 4 channels 3.08 → 3.21 (medians).
WAKE_BELOW = QUEUE_DEPTH // 2

#: Seconds a channel that the peer broke waits before it reports that as the failure.
PEER_CLOSE_GRACE = 0.25


@dataclass
class _SendChannel:
    id: int
    sock: socket.socket
    stats: ChannelStats
    compressor: PacketCompressor | None = None
    jobs: queue.SimpleQueue[Job | None] = field(default_factory=queue.SimpleQueue)
    stopper: Stopper = field(init=False)
    queued: int = 0
    busy_time: float = 0.0
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.stopper = Stopper(self.sock)


class MultifdSender:
    """N multifd channels shared by RAM and device-state packets.

    Every channel has a thread that builds and sends its jobs in order (a blocking
    socket; TLS ones are polled, see :mod:`migrate_common.threadio`).  The event loop
    only picks channels and counts: ``_slots`` counts free queue places over all
    channels, and finished jobs give their places back through a
    :class:`~migrate_common.threadio.LoopWaker` (one wake-up for every job finished
    meanwhile).  A channel task per channel waits for its thread's failure, so
    errors reach the migration's funnel like any task's.
    """

    def __init__(self, socks: list[socket.socket], vm_uuid: bytes, funnel: Funnel,
                 log: Any, page_size: int = 4096, compression: str = "none",
                 level: int = 1, stall_timeout: float | None = None,
                 socket_buffer: int = 0, packet_size: int = MULTIFD_PACKET_SIZE) -> None:
        self.page_count = ram_page_count(page_size, packet_size)
        self.job_packets = max(1, JOB_BYTES // packet_size)
        self.stall_timeout = stall_timeout
        self._channels = [
            _SendChannel(i, s, ChannelStats(str(i)),
                         compressor=PacketCompressor(compression, level)
                         if compression != "none" else None)
            for i, s in enumerate(socks)]
        for s in socks:
            size_buffers(s, socket_buffer, len(socks))
        self._slots = asyncio.Semaphore(len(socks) * QUEUE_DEPTH)
        self._last = len(socks) - 1
        self._funnel = funnel
        self._log = log
        self._uuid = vm_uuid
        self._loop = asyncio.get_running_loop()
        self.bytes_sent = 0
        # finished jobs, appended by the threads and collected on the loop
        self._done: collections.deque[tuple[_SendChannel, Job, int, float, bool]] = \
            collections.deque()
        self._wake_pending = False
        self._waker = LoopWaker(self._loop, self._collect)
        self._packet_nums = itertools.count()
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
        # itertools.count is atomic under the GIL: channel threads draw from it
        return next(self._packet_nums)

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
        """Hand one job (or ready header + payload views) to the next channel with room."""
        if not isinstance(job, Job):
            job = DeviceStateJob(job)
        await self._slots.acquire()
        n = len(self._channels)
        # first the channel after the last one used that is idle, else one with room
        for depth in range(1, QUEUE_DEPTH + 1):
            for step in range(1, n + 1):
                chan = self._channels[(self._last + step) % n]
                if chan.queued < depth:
                    break
            else:
                continue
            break
        else:  # the semaphore guarantees room somewhere
            raise AssertionError("no multifd channel with room")
        self._last = chan.id
        self._queue(chan, job)

    def _queue(self, chan: _SendChannel, job: Job) -> None:
        chan.queued += 1
        chan.jobs.put(job)

    async def sync(self) -> None:
        """QEMU's ``multifd_send_sync_main``: one SYNC packet on every channel, each
        after all the jobs handed to that channel before; returns once the SYNC
        packets are sent.  Jobs handed over meanwhile queue behind them and are not
        waited for: the destination parks each channel at its SYNC until the main
        channel's flush marker, so waiting for them here could wait forever."""
        total = len(self._channels) * QUEUE_DEPTH
        for _ in range(total):
            await self._slots.acquire()
        jobs = [SyncJob(self._loop.create_future()) for _ in self._channels]
        for chan, job in zip(self._channels, jobs, strict=True):
            self._queue(chan, job)
        # the SYNC jobs hold one place per channel until they are sent
        for _ in range(total - len(self._channels)):
            self._slots.release()
        await asyncio.gather(*(job.done for job in jobs))
        self.syncs += 1

    async def _run(self, chan: _SendChannel) -> None:
        """Start the channel's thread and wait for it to fail; stop it when cancelled."""
        hand_to_thread(chan.sock, self.stall_timeout)
        failed: asyncio.Future[BaseException] = self._loop.create_future()
        chan.thread = threading.Thread(target=self._thread_main, args=(chan, failed),
                                       name=f"multifd-send-{chan.id}", daemon=True)
        chan.thread.start()
        try:
            exc = await failed
            if isinstance(exc.__cause__, OSError):
                # A destination that fails sends its reason (SHUT) on the main channel
                # and then closes every socket; this thread can see the broken pipe
                # before the return path has read the reason, which must win.
                await asyncio.sleep(PEER_CLOSE_GRACE)
            raise exc
        finally:
            self._stop(chan)

    def _stop(self, chan: _SendChannel) -> None:
        chan.stopper.stop()
        chan.jobs.put(None)
        if chan.thread is not None and chan.thread is not threading.current_thread():
            # the thread is either polling (the stopper wakes it) or in one
            # non-blocking call: it ends at once, before its socket is closed
            chan.thread.join(timeout=5)

    def _thread_main(self, chan: _SendChannel, failed: asyncio.Future[BaseException]) -> None:
        what = f"multifd channel {chan.id}"
        name = threading.current_thread().name
        trace = TRACE.packets
        try:
            while True:
                job = chan.jobs.get()
                if job is None:
                    return
                started = time.monotonic_ns()
                parts = job.build(self, chan)
                try:
                    n = send_all(chan.sock, parts, chan.stopper, self.stall_timeout, what)
                except OSError as exc:
                    raise ChannelError(f"{what}: send failed: {exc.strerror or exc}",
                                       channel=str(chan.id)) from exc
                ended = time.monotonic_ns()
                timeline = TIMELINE.events
                if timeline is not None:
                    timeline.append((ended, name, "sent", chan.id, started, n, job.kind))
                self._done.append((chan, job, n, (ended - started) / 1e9, trace))
                if not self._wake_pending and (chan.jobs.qsize() < WAKE_BELOW
                                               or job.urgent):
                    # one wake-up of the loop for every few jobs finished meanwhile
                    self._wake_pending = True
                    self._waker.wake()
        except Stopped:
            return
        except BaseException as exc:  # handed to the funnel through the channel task
            try:
                self._loop.call_soon_threadsafe(_set_result, failed, exc)
            except RuntimeError:  # the loop is gone: nobody is left to tell
                pass

    def _collect(self) -> None:
        """On the loop: account for the jobs the threads finished."""
        self._wake_pending = False  # before draining: a later append wakes us again
        done = self._done
        while done:
            self._sent(*done.popleft())

    def _sent(self, chan: _SendChannel, job: Job, n: int, elapsed: float,
              trace: bool) -> None:
        chan.busy_time += elapsed
        chan.stats.bytes += n
        chan.stats.packets += job.packets
        chan.queued -= 1
        self.bytes_sent += n
        job.sent(self)
        if trace:
            self._log.debug("-> multifd", channel=chan.id, kind=job.kind, bytes=n,
                            packet=chan.stats.packets)
        self._slots.release()

    async def drain(self) -> None:
        """Wait until every packet handed over so far has been written to its socket."""
        total = len(self._channels) * QUEUE_DEPTH
        for _ in range(total):
            await self._slots.acquire()
        for _ in range(total):
            self._slots.release()

    def close(self) -> None:
        for chan in self._channels:
            self._stop(chan)
            chan.stopper.close()
            try:
                chan.sock.close()
            except OSError:
                pass
        self._waker.close()


def _set_result(fut: asyncio.Future[BaseException], exc: BaseException) -> None:
    if not fut.done():
        fut.set_result(exc)
