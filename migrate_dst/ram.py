"""Load side of guest RAM, and the multifd receive-side sync barrier.

RAM packets are received by the thread of the channel they arrive on straight into
guest memory at the offsets they name (the decoder has already checked the block
name and every offset against the block's length; compressed pages are copied in
after decompression), and accounted by the channel's task.  Zero pages
are only written where this migration wrote the page before: fresh destination
memory is already zero.

:class:`RecvSync` is QEMU's ``multifd_recv_sync_main``: a receive task that applied a
SYNC packet parks until the main channel reaches the RAM_SAVE_FLAG_MULTIFD_FLUSH
marker; the main channel waits there until every channel has parked, then releases
them all.  So no page of the next round can overwrite a page of this round on
another channel, and when the main channel goes past the marker, every page sent
before it is in guest memory.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from migrate_dst.load import SectionKind
from protocol.control import RamEos, RamFlush, RamPages, RamSetup, RamZeroPages
from protocol.errors import ConfigError, SequenceError, UnknownDeviceError
from protocol.multifd import RamPacket
from vm.ram import GuestRam, Prehasher

__all__ = ["RamLoadHandler", "RecvSync"]


class RecvSync:
    """The barrier between SYNC packets on N channels and FLUSH markers on main."""

    def __init__(self, channels: int, timeout: float) -> None:
        self.channels = channels
        self.timeout = timeout
        self._parked: set[int] = set()
        self._all_parked = asyncio.Event()
        self._release = asyncio.Event()
        self.generation = 0
        self.syncs = 0

    async def channel_synced(self, channel_id: int) -> None:
        """A receive task applied a SYNC packet: park until the main channel releases."""
        # a parked channel reads nothing more, so it cannot park twice in one round
        self._parked.add(channel_id)
        release = self._release
        if len(self._parked) == self.channels:
            self._all_parked.set()
        await release.wait()

    async def main_flush(self) -> None:
        """The main channel reached a FLUSH marker: wait for every channel, release all."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._all_parked.wait()
        except TimeoutError:
            missing = sorted(set(range(self.channels)) - self._parked)
            raise SequenceError(f"multifd sync: channel(s) {missing} sent no SYNC packet "
                                f"within {self.timeout:g} s of the flush marker") from None
        release = self._release
        self._release = asyncio.Event()
        self._all_parked = asyncio.Event()
        self._parked = set()
        self.generation += 1
        self.syncs += 1
        release.set()


class RamLoadHandler:
    idstr = "ram"
    instance_id = 0
    version_id = 4

    def __init__(self, ram: GuestRam, sync: RecvSync | None, log: Any,
                 verify: bool = True) -> None:
        self.ram = ram
        self.verify = verify  # x-verify-ram: the digest at the end is compared
        self.sync = sync
        self.log = log.bind(section="ram")
        self.setup_seen = False
        self.normal_pages = 0
        self.zero_pages = 0
        self.packets = 0
        self._count_lock = threading.Lock()  # receive threads count too
        self.prehasher = Prehasher(ram, incoming=True)

    async def load_setup(self) -> None:
        # "received" must keep meaning "may hold data": a failed attempt can have left
        # pages behind, and a zero page sent now must overwrite them, so it is never
        # reset between attempts.  Settled chunks are hashed while pages arrive, so the
        # digest at the end (in the downtime) has little left to do.
        if self.verify:
            self.prehasher.start()

    def check_setup(self, setup: RamSetup) -> None:
        mine = {b.name: b.used_length for b in self.ram.blocks.values()}
        if setup.page_size != self.ram.page_size:
            raise ConfigError(f"RAM page size differs: source {setup.page_size}, destination "
                              f"{self.ram.page_size}")
        if setup.blocks != mine:
            raise ConfigError(f"RAM blocks differ: source {_blocks(setup.blocks)}, destination "
                              f"{_blocks(mine)}; start both sides with the same --memory")

    async def load_state(self, kind: SectionKind, message: Any,
                         payload: memoryview | None) -> bool:
        """One record of a RAM section body; True at the body's end (``ram-eos``)."""
        if isinstance(message, RamEos):
            return True
        if isinstance(message, RamSetup):
            if kind is not SectionKind.START or self.setup_seen:
                raise SequenceError("RAM setup record outside the RAM START section")
            self.check_setup(message)
            self.setup_seen = True
            return False
        if not self.setup_seen:
            raise SequenceError(f"{type(message).__name__} before the RAM setup record")
        if isinstance(message, RamFlush):
            if self.sync is None:
                raise SequenceError("multifd flush marker but multifd is off")
            await self.sync.main_flush()
            return False
        if isinstance(message, RamPages):
            assert payload is not None
            block = self._block(message.block)
            self._check_offsets(block.name, block.used_length, message.offsets)
            self.ram.write_pages(block, message.offsets, payload)
            self._count(len(message.offsets), 0)
            return False
        if isinstance(message, RamZeroPages):
            block = self._block(message.block)
            self._check_offsets(block.name, block.used_length, message.offsets)
            self.ram.zero_pages(block, message.offsets)
            self._count(0, len(message.offsets))
            return False
        raise SequenceError(f"unexpected {type(message).__name__} in the RAM section")

    def _block(self, name: str) -> Any:
        block = self.ram.blocks.get(name)
        if block is None:
            raise UnknownDeviceError(f"RAM record for unknown block {name!r}")
        return block

    def _check_offsets(self, name: str, length: int, offsets: tuple[int, ...]) -> None:
        size = self.ram.page_size
        for off in offsets:
            if off % size or off > length - size:
                raise SequenceError(f"RAM block {name!r}: offset {off:#x} is not a page inside "
                                    f"its {length} bytes")

    def receive_targets(self, packet: RamPacket) -> list[memoryview] | None:
        """For a receive thread: the guest memory a packet's normal pages go to, so
        they are received in place; None (receive into a buffer, then
        :meth:`load_packet` rejects or copies it) before the RAM setup record."""
        if not self.setup_seen:
            return None
        # (decoded against the blocks' sizes: the decoder checked the offsets)
        return self.ram.receive_targets(self.ram.blocks[packet.ramblock],
                                        packet.normal_offsets, packet.normal_run,
                                        validated=True)

    def _count(self, normal: int, zero: int, packets: int = 0) -> None:
        with self._count_lock:
            self.normal_pages += normal
            self.zero_pages += zero
            self.packets += packets

    def apply_in_thread(self, channel_id: int, packet: RamPacket) -> None:
        """A receive thread applies a packet whose normal pages it received in place
        (or that has none), other than SYNC: its zero pages and the counters.  Safe
        beside the event loop and the other channels' threads: the pages of one round
        are disjoint, and rounds are separated by the sync barrier, which the thread
        waits at (see ``ReceiveChannel``)."""
        self._apply(channel_id, packet, None)

    async def load_packet(self, channel_id: int, packet: RamPacket,
                          payload: memoryview | None) -> None:
        """A RAM packet from a multifd channel on the event loop (offsets already
        validated): one whose pages came in a buffer (compressed ones, after
        decompression), or a SYNC packet, which parks at the sync barrier."""
        self._apply(channel_id, packet, payload)
        if packet.is_sync:
            if self.sync is None:
                raise SequenceError(f"multifd channel {channel_id}: SYNC packet without multifd")
            await self.sync.channel_synced(channel_id)

    def _apply(self, channel_id: int, packet: RamPacket, payload: memoryview | None) -> None:
        """Write a packet's pages (``payload`` None: its normal pages are in place)."""
        if packet.normal_pages or packet.zero_pages:
            if not self.setup_seen:
                raise SequenceError(f"multifd channel {channel_id}: RAM pages before the RAM "
                                    "setup record")
            block = self.ram.blocks[packet.ramblock]
            if payload is not None and packet.normal_pages:
                self.ram.write_pages(block, packet.normal_offsets, payload)
            elif packet.normal_pages:  # received in place: the digest must see them
                self.ram.written(block, packet.normal_offsets, packet.normal_run)
            if packet.zero_pages:
                self.ram.zero_pages(block, packet.zero_offsets, validated=True)
        self._count(packet.normal_pages, packet.zero_pages, 1)

    def stats(self) -> dict[str, Any]:
        return {"normal": self.normal_pages, "duplicate": self.zero_pages,
                "received-pages": self.ram.received_pages(),
                "syncs": self.sync.syncs if self.sync else 0}


def _blocks(blocks: dict[str, int]) -> str:
    return ", ".join(f"{name}={size}" for name, size in blocks.items()) or "none"
