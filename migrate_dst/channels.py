"""Receive channels: one per multifd channel (wire → receive thread → reassembly).

Each channel has a thread that owns its socket and a sans-I/O
:class:`~protocol.channel.ChannelDecoder`, and receives straight into the buffer the
decoder asks for:

* device state: when a packet's VFIO header has arrived, the device's reassembly
  says where its data belongs (``claim``) — usually a place in the device's own
  resume image, so the bytes are never copied — else it goes into a pooled buffer;
  the thread then queues the packet for the device's load thread itself;
* RAM: pages go straight into guest memory, and the thread applies the packet;
* SYNC and compressed RAM packets go to the channel's task on the event loop, and
  the thread runs at most ``AHEAD`` such packets ahead of it.

``BufferPool`` recycles payload buffers so steady-state receiving allocates nothing.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

from migrate_common.log import TRACE
from migrate_common.threadio import (Stopped, Stopper, filled_bytes, hand_to_thread, recv_into,
                                     recv_into_many)
from migrate_common.timeline import TIMELINE
from protocol.channel import (
    ChannelClosed,
    ChannelDecoder,
    DeviceStateReceived,
    RamPacketReceived,
)
from protocol.compression import PacketDecompressor, method_flag
from protocol.errors import ChannelError, SequenceError, UnknownDeviceError
from protocol.multifd import MULTIFD_PACKET_SIZE, DeviceStateHeader
from protocol.vfio import VFIO_STATE_PACKET_HEADER

__all__ = ["BufferPool", "ReceiveChannel"]


class BufferPool:
    """Free lists of receive buffers by exact size: at most ``keep`` of each size and
    ``max_bytes`` in all.

    The byte bound matters where sizes vary: compressed RAM payloads each have a
    size of their own, and a free list per size would otherwise keep every one of
    them for the daemon's whole life.
    """

    def __init__(self, keep: int = 16, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._keep = keep
        self._max_bytes = max_bytes
        self._lock = threading.Lock()  # the channel threads take, the loop gives
        self.kept_bytes = 0
        self.allocated = 0

    def take(self, size: int) -> bytearray:
        with self._lock:
            free = self._free.get(size)
            if free:
                self.kept_bytes -= size
                buf = free.pop()
                if not free:
                    del self._free[size]
                return buf
            self.allocated += 1
        return bytearray(size)  # zero-filled, so already faulted in

    def give(self, buf: bytearray) -> None:
        size = len(buf)
        with self._lock:
            if self.kept_bytes + size > self._max_bytes:
                return
            free = self._free.setdefault(size, [])
            if len(free) < self._keep:
                free.append(buf)
                self.kept_bytes += size

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self.kept_bytes = 0


#: Packets a receive thread may decode before the channel task has applied the
#: earlier ones (besides the one it is receiving into).
AHEAD = 1

#: Bytes a receive thread asks for between payloads, at least: a device-state header
#: and its VFIO header with room to spare, or a whole RAM packet header (12 + 308 +
#: 8 × 128 bytes for 512 KiB of 4 KiB pages; a channel of bigger RAM packets asks for
#: its whole header).  The decoder's buffer would take 64 KiB, and what it holds of a
#: payload is then copied again.
HEADER_READ = 4096

DeviceLookup = Callable[[str, int], Any]


def _no_ram(name: str) -> int | None:
    return None


class ReceiveChannel:
    """One multifd channel of an incoming migration, after its init was accepted."""

    def __init__(self, channel_id: int, sock: socket.socket, pool: BufferPool,
                 lookup: DeviceLookup, log: Any, ram: Any = None,
                 compression: str = "none", recorder: Any = None,
                 packet_size: int = MULTIFD_PACKET_SIZE) -> None:
        self.id = channel_id
        self.recorder = recorder
        self.sock = sock
        self.ram = ram  # the RamLoadHandler, when the VM has guest RAM
        self.decompressor = (PacketDecompressor(compression) if compression != "none"
                             else None)
        block_size = ram.ram.block_size if ram is not None else _no_ram
        page_size = ram.ram.page_size if ram is not None else 4096
        self.decoder = ChannelDecoder(expect_init=False, allocate=self.allocate,
                                      page_size=page_size, ram_packet_bytes=packet_size,
                                      block_size=block_size, channel=f"multifd {channel_id}",
                                      compression=method_flag(compression),
                                      ram_target=ram.receive_targets
                                      if ram is not None and compression == "none" else None,
                                      device_target=self._device_target,
                                      device_prefix=VFIO_STATE_PACKET_HEADER.size)
        self.pool = pool
        self.lookup = lookup
        self.log = log.bind(channel=channel_id)
        self.bytes = 0
        self.packets = 0
        self.closed = False
        self._stopper = Stopper(sock)
        self._credits = threading.Semaphore(AHEAD)
        self._header_read = max(HEADER_READ, self.decoder.ram_header_size)
        self._thread: threading.Thread | None = None

    def allocate(self, size: int) -> memoryview:
        return memoryview(self.pool.take(size))

    async def run(self) -> None:
        """Start the receive thread and apply what it delivers, in order, until the
        channel closes cleanly; stop the thread when cancelled."""
        loop = asyncio.get_running_loop()
        delivered: asyncio.Queue[Any] = asyncio.Queue()
        hand_to_thread(self.sock)
        self._thread = threading.Thread(target=self._receive_thread,
                                         args=(loop, delivered),
                                         name=f"multifd-recv-{self.id}", daemon=True)
        self._thread.start()
        try:
            while True:
                event = await delivered.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, RamPacketReceived):
                    await self._on_ram(event)
                elif isinstance(event, ChannelClosed):
                    self.closed = True
                    return
                else:
                    raise SequenceError(f"multifd channel {self.id}: unexpected "
                                        f"{type(event).__name__}")
                self._credits.release()
        finally:
            self._stop_thread()

    def _receive_thread(self, loop: asyncio.AbstractEventLoop,
                        delivered: asyncio.Queue[Any]) -> None:
        decoder = self.decoder
        name = f"multifd-{self.id}"
        stopper = self._stopper
        ram = self.ram
        try:
            while True:
                try:
                    if decoder.receiving_body:
                        # a payload, maybe the scattered runs of pages of a RAM packet
                        views = decoder.buffers()
                        n = recv_into_many(self.sock, views, stopper)
                    else:
                        # bytes read with a header are copied into their payload in
                        # Python (holding the GIL): take little more than the largest
                        # header
                        views = [decoder.buffer()[:self._header_read]]
                        n = recv_into(self.sock, views[0], stopper)
                except OSError as exc:
                    raise ChannelError(f"multifd channel {self.id}: receive failed: "
                                       f"{exc.strerror or exc}", channel=str(self.id)) from exc
                self.bytes += n
                if self.recorder is not None and n:
                    self.recorder.record(name, filled_bytes(views, n))
                for event in decoder.eof() if n == 0 else decoder.advance(n):
                    if isinstance(event, (DeviceStateReceived, RamPacketReceived)):
                        self.packets += 1
                        if isinstance(event, RamPacketReceived):
                            TIMELINE.record("ram", self.id, event.packet.normal_pages)
                    if isinstance(event, DeviceStateReceived):
                        self._on_device_state(event)
                        continue
                    if (ram is not None and isinstance(event, RamPacketReceived)
                            and not event.packet.is_sync
                            and (event.in_place or not event.packet.normal_pages)):
                        # nothing left for the event loop: apply it right here
                        if TRACE.packets:
                            self._trace_ram(event)
                        ram.apply_in_thread(self.id, event.packet)
                        continue
                    self._credits.acquire()
                    if stopper.stopped:
                        return
                    loop.call_soon_threadsafe(delivered.put_nowait, event)
                    if isinstance(event, ChannelClosed):
                        return
                    if isinstance(event, RamPacketReceived) and event.packet.is_sync:
                        # pages after a SYNC belong to the next round: they may land in
                        # guest memory only once the task has passed the sync barrier
                        self._wait_applied()
        except Stopped:
            return
        except BaseException as exc:  # raised by the channel task, into the funnel
            try:
                loop.call_soon_threadsafe(delivered.put_nowait, exc)
            except RuntimeError:  # the loop is gone
                pass

    def _wait_applied(self) -> None:
        """Block until the channel task has applied every packet delivered so far."""
        for _ in range(AHEAD):
            self._credits.acquire()
        for _ in range(AHEAD):
            self._credits.release()
        if self._stopper.stopped:
            raise Stopped

    def _stop_thread(self) -> None:
        self._stopper.stop()
        for _ in range(AHEAD + 1):
            self._credits.release()
        if self._thread is not None:
            # polling threads wake on the stopper; one in a non-blocking call ends soon
            self._thread.join(timeout=5)

    def _handler(self, header: DeviceStateHeader) -> Any:
        handler = self.lookup(header.idstr, header.instance_id)
        if handler is None:
            raise UnknownDeviceError(f"multifd channel {self.id}: device-state packet for "
                                     f"unknown device {header.idstr!r} instance "
                                     f"{header.instance_id}")
        return handler

    def _device_target(self, header: DeviceStateHeader, prefix: memoryview
                       ) -> memoryview | None:
        """Decoder hook (receive thread): where the packet's data goes."""
        target: memoryview | None = self._handler(header).claim(prefix, header.payload_size)
        TIMELINE.record("header", self.id, header.idstr, target is not None)
        return target

    def _on_device_state(self, event: DeviceStateReceived) -> None:
        """A whole device-state packet (receive thread): queue it for its device."""
        header = event.header
        TIMELINE.record("received", self.id, header.idstr, header.payload_size)
        if TRACE.packets:
            self.log.debug("<- device state", idstr=header.idstr, size=header.payload_size,
                           in_place=event.in_place)
        handler = self._handler(header)
        if event.in_place:
            handler.load_state_placed(event.payload, header.payload_size)
            return
        # the payload is a view of the pooled buffer the decoder took from allocate();
        # the handler owns it from here and gives it back exactly once, error or not
        buf = event.payload.obj
        assert isinstance(buf, bytearray)
        pool = self.pool
        handler.load_state_buffer(event.payload, lambda: pool.give(buf))

    def _trace_ram(self, event: RamPacketReceived) -> None:
        p = event.packet
        self.log.debug("<- ram", block=p.ramblock, normal=p.normal_pages, zero=p.zero_pages,
                       sync=p.is_sync, num=p.packet_num, in_place=event.in_place)

    async def _on_ram(self, event: RamPacketReceived) -> None:
        if TRACE.packets:
            self._trace_ram(event)
        if self.ram is None:
            raise SequenceError(f"multifd channel {self.id}: RAM packet received but this VM "
                                "has no guest RAM to load it into")
        buf = event.payload.obj
        payload = event.payload
        packet = event.packet
        try:
            if self.decompressor is not None and packet.normal_pages:
                # the stream is this channel's: packets decompress in arrival order
                payload = memoryview(await asyncio.to_thread(
                    self.decompressor.decompress, payload,
                    packet.normal_pages * self.ram.ram.page_size))
            await self.ram.load_packet(self.id, packet, None if event.in_place else payload)
        finally:
            if isinstance(buf, bytearray):
                self.pool.give(buf)

    def close(self) -> None:
        self._stop_thread()
        self._stopper.close()
        try:
            self.sock.close()
        except OSError:
            pass
