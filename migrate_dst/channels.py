"""Receive tasks: one per multifd channel (wire → receive task → reassembly).

Each task owns its socket and a sans-I/O :class:`~protocol.channel.ChannelDecoder`:
it receives straight into the buffer the decoder asks for — for a device-state
payload that is a pooled buffer, so the bytes are never copied before the load task
writes them into the device — and hands every complete packet to its owner's
``load_state_buffer``.  ``BufferPool`` recycles payload buffers so steady-state
receiving allocates nothing.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from migrate_common.log import TRACE
from migrate_common.net import recv_into
from protocol.channel import (
    ChannelClosed,
    ChannelDecoder,
    DeviceStateReceived,
    RamPacketReceived,
)
from protocol.compression import PacketDecompressor, method_flag
from protocol.errors import ChannelError, SequenceError, UnknownDeviceError

__all__ = ["BufferPool", "ReceiveChannel"]


class BufferPool:
    """Free lists of receive buffers by exact size, keeping at most ``keep`` of each."""

    def __init__(self, keep: int = 16) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._keep = keep
        self.allocated = 0

    def take(self, size: int) -> bytearray:
        free = self._free.get(size)
        if free:
            return free.pop()
        self.allocated += 1
        return bytearray(size)  # zero-filled, so already faulted in

    def give(self, buf: bytearray) -> None:
        free = self._free.setdefault(len(buf), [])
        if len(free) < self._keep:
            free.append(buf)

    def clear(self) -> None:
        self._free.clear()


DeviceLookup = Callable[[str, int], Any]


def _no_ram(name: str) -> int | None:
    return None


class ReceiveChannel:
    """One multifd channel of an incoming migration, after its init was accepted."""

    def __init__(self, channel_id: int, sock: socket.socket, pool: BufferPool,
                 lookup: DeviceLookup, log: Any, ram: Any = None,
                 compression: str = "none", recorder: Any = None) -> None:
        self.id = channel_id
        self.recorder = recorder
        self.sock = sock
        self.ram = ram  # the RamLoadHandler, when the VM has guest RAM
        self.decompressor = (PacketDecompressor(compression) if compression != "none"
                             else None)
        block_size = ram.ram.block_size if ram is not None else _no_ram
        self.decoder = ChannelDecoder(expect_init=False, allocate=self.allocate,
                                      page_size=ram.ram.page_size if ram is not None else 4096,
                                      block_size=block_size, channel=f"multifd {channel_id}",
                                      compression=method_flag(compression))
        self.pool = pool
        self.lookup = lookup
        self.log = log.bind(channel=channel_id)
        self.bytes = 0
        self.packets = 0
        self.closed = False

    def allocate(self, size: int) -> memoryview:
        return memoryview(self.pool.take(size))

    async def run(self) -> None:
        decoder = self.decoder
        try:
            name = f"multifd-{self.id}"
            while True:
                view = decoder.buffer()
                n = await recv_into(self.sock, view)
                self.bytes += n
                if self.recorder is not None and n:
                    self.recorder.record(name, view[:n])
                events = decoder.eof() if n == 0 else decoder.advance(n)
                for event in events:
                    if isinstance(event, DeviceStateReceived):
                        self._on_device_state(event)
                    elif isinstance(event, ChannelClosed):
                        self.closed = True
                        return
                    elif isinstance(event, RamPacketReceived):
                        await self._on_ram(event)
                    else:
                        raise SequenceError(f"multifd channel {self.id}: unexpected "
                                            f"{type(event).__name__}")
        except OSError as exc:
            raise ChannelError(f"multifd channel {self.id}: receive failed: "
                               f"{exc.strerror or exc}", channel=str(self.id)) from exc

    def _on_device_state(self, event: DeviceStateReceived) -> None:
        header = event.header
        self.packets += 1
        # the payload is a view of the pooled buffer the decoder took from allocate()
        buf = event.payload.obj
        assert isinstance(buf, bytearray)
        if TRACE.packets:
            self.log.debug("<- device state", idstr=header.idstr, size=header.payload_size)
        handler = self.lookup(header.idstr, header.instance_id)
        if handler is None:
            self.pool.give(buf)
            raise UnknownDeviceError(f"multifd channel {self.id}: device-state packet for "
                                     f"unknown device {header.idstr!r} instance "
                                     f"{header.instance_id}")
        pool = self.pool
        handler.load_state_buffer(event.payload, lambda: pool.give(buf))

    async def _on_ram(self, event: RamPacketReceived) -> None:
        self.packets += 1
        if TRACE.packets:
            p = event.packet
            self.log.debug("<- ram", block=p.ramblock, normal=p.normal_pages,
                           zero=p.zero_pages, sync=p.is_sync, num=p.packet_num)
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
            await self.ram.load_packet(self.id, packet, payload)
        finally:
            if isinstance(buf, bytearray):
                self.pool.give(buf)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
