"""Save side of guest RAM: QEMU's RAM ``SaveVMHandlers`` for multifd, as coroutines.

Rounds work as in QEMU: the first round sends every page; each later round sends
the pages the guest dirtied since the previous dirty-log sync.  A round walks the
migration bitmap block by block and hands batches of at most 128 pages of one
block to idle multifd channels (:class:`~migrate_src.channels.RamJob`), where zero
pages are detected.  When the walk wraps around, every channel gets a SYNC packet
after all its earlier pages and the RAM_SAVE_FLAG_MULTIFD_FLUSH marker follows on
the main channel, so the destination never applies a page from the next round
before every page of this one (the sync rule of spec §3).

Without multifd the pages travel on the main channel as ``ram-pages`` records.
With ``zero-page-detection=legacy`` zero pages are found here and sent as
``ram-zero`` records on the main channel; with ``none`` every page is sent whole.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from migrate_src.channels import MainChannel, MultifdSender, RamJob
from protocol.control import RamEos, RamFlush, RamPages, RamSetup, RamZeroPages
from vm.ram import GuestRam, Prehasher, RamBlock, split_zero_pages

__all__ = ["RamSaveHandler"]

#: time one ``save_live_iterate`` call may take before the other sections get a turn
ITERATE_BUDGET = 0.05


class RamSaveHandler:
    idstr = "ram"
    instance_id = 0
    version_id = 4

    def __init__(self, ram: GuestRam, section_id: int, *, main: MainChannel,
                 sender: MultifdSender | None, zero_page_detection: str,
                 pace: Callable[[int], Awaitable[None]], log: Any,
                 on_pass: Callable[[int], None], verify: bool = True) -> None:
        self.ram = ram
        self.verify = verify  # x-verify-ram: hash the RAM for the digest at the end
        self.section_id = section_id
        self.main = main
        self.sender = sender
        # without multifd channels there is nobody else to look for zero pages: the
        # scanner does it, as QEMU's migration thread does (legacy detection)
        self.zero_detection = ("legacy" if sender is None and zero_page_detection == "multifd"
                               else zero_page_detection)
        self.pace = pace
        self.log = log.bind(section="ram")
        self.on_pass = on_pass
        self.page_size = ram.page_size
        self.prehasher = Prehasher(ram)
        # statistics, QEMU's names
        self.normal_pages = 0          # main-channel normal pages (multifd: see sender)
        self.zero_pages = 0            # main-channel zero pages (legacy detection)
        self.precopy_bytes = 0
        self.downtime_bytes = 0
        self.rounds = 0
        self.round_pages = 0           # pages handed out in the current round
        self.last_round_pages = 0
        self.dirty_rate = 0.0          # pages/s the guest dirtied, from the last sync
        self._last_sync = time.monotonic()
        self._stopped = False

    # -- setup ----------------------------------------------------------------------------
    async def save_setup(self) -> None:
        ram = self.ram
        await self.main.send(RamSetup(ram.page_size, {b.name: b.used_length
                                                      for b in ram.blocks.values()}))
        ram.start_migration()
        ram.begin_round()
        # hash settled chunks now, so the digest at VM stop has little left to do
        if self.verify:
            self.prehasher.start()
        self._last_sync = time.monotonic()
        await self._flush_and_sync()
        await self.main.send(RamEos())

    def is_active_iterate(self) -> bool:
        return True

    def pending(self) -> int:
        """Bytes still dirty: not yet sent this round, plus what the guest dirtied since."""
        return (self.ram.dirty_pages() + self.ram.live_dirty_pages()) * self.page_size

    def pending_exact(self) -> int:
        """Sync the dirty log first (QEMU's migration_bitmap_sync before deciding)."""
        self._sync_dirty_log()
        return self.ram.dirty_pages() * self.page_size

    # -- live phase -----------------------------------------------------------------------
    async def save_live_iterate(self) -> None:
        """Send pages for up to :data:`ITERATE_BUDGET` seconds; at the end of a round,
        flush and sync the channels and start the next round from a fresh dirty log."""
        deadline = time.monotonic() + ITERATE_BUDGET
        while time.monotonic() < deadline:
            sent = await self._send_batch(precopy=True)
            if sent < 0:  # the walk wrapped: round complete
                await self._end_round()
                break
        await self.main.send(RamEos())

    async def _end_round(self) -> None:
        await self._flush_and_sync()
        self._sync_dirty_log()
        self.ram.begin_round()

    def _sync_dirty_log(self) -> None:
        now = time.monotonic()
        new = self.ram.sync_dirty_log()
        elapsed = now - self._last_sync
        if elapsed > 0:
            self.dirty_rate = new / elapsed
        self._last_sync = now
        self.rounds += 1
        self.last_round_pages = self.round_pages
        self.round_pages = 0
        self.on_pass(self.ram.dirty_sync_count)

    async def _send_batch(self, *, precopy: bool) -> int:
        """Hand out one job of up to ``job_packets`` packets of dirty pages (one batch on
        the main channel); the number of pages, or -1 at the end of the round."""
        count = self.sender.page_count if self.sender else 128
        batches: list[tuple[RamBlock, Sequence[int]]] = []
        npages = 0
        for _ in range(self.sender.job_packets if self.sender is not None else 1):
            batch = self.ram.next_dirty_batch(count)
            if batch is None:
                break
            block, pages = batch
            npages += len(pages)
            if self.zero_detection == "legacy":
                pages = await self._send_zero_pages_on_main(block, pages)
            if pages:
                batches.append((block, pages))
        if not npages:
            return -1
        self.round_pages += npages
        nbytes = npages * self.page_size
        if batches:
            if self.sender is not None:
                await self.sender.submit(RamJob(batches, self.zero_detection == "multifd"))
            else:
                await self._send_pages_on_main(*batches[0])
        if precopy:
            self.precopy_bytes += nbytes
            await self.pace(nbytes)
        else:
            self.downtime_bytes += nbytes
        return npages

    async def _send_zero_pages_on_main(self, block: RamBlock,
                                      pages: Sequence[int]) -> Sequence[int]:
        size = self.page_size
        # the same checks as the channel threads' multifd detection (a run whose pages
        # all start with a non-zero word at once, else first and last words, then a
        # full compare only where those are zero)
        normal, zero = split_zero_pages(block.view, pages, size, block.words)
        if not zero:
            return pages  # as it came: a run stays a range for _send_pages_on_main
        await self.main.send(RamZeroPages(block.name, tuple(zero)))
        self.zero_pages += len(zero)
        return [offset // size for offset in normal]

    async def _send_pages_on_main(self, block: RamBlock, pages: Sequence[int]) -> None:
        size = self.page_size
        view = block.view
        data: bytes | memoryview
        if type(pages) is range and pages.step == 1:
            # consecutive pages (every batch of the first round): their offsets in one
            # C-level step, and the pages as one view of guest memory, not joined
            start, stop = pages.start * size, pages.stop * size
            offsets = tuple(range(start, stop, size))
            data = view[start:stop]
        else:
            offsets = tuple(i * size for i in pages)
            data = b"".join(view[o:o + size] for o in offsets)
        await self.main.send(RamPages(block.name, offsets, len(data)), data)
        self.normal_pages += len(pages)

    async def _flush_and_sync(self) -> None:
        if self.sender is not None:
            await self.sender.sync()
            await self.main.send(RamFlush())

    # -- switchover -----------------------------------------------------------------------
    async def save_complete(self) -> None:
        """END section body, VM stopped: the final dirty-log sync and the last pass."""
        self._stopped = True
        self._sync_dirty_log()
        self.ram.begin_round()
        while await self._send_batch(precopy=False) >= 0:
            pass
        await self._flush_and_sync()
        await self.main.send(RamEos())

    async def save_state(self) -> None:
        """RAM has no non-iterable state."""

    async def save_cleanup(self, completed: bool) -> None:
        await self.prehasher.stop()
        self.ram.stop_dirty_tracking()

    def stats(self, sender: MultifdSender | None) -> dict[str, Any]:
        normal = self.normal_pages + (sender.ram_normal_pages if sender else 0)
        zero = self.zero_pages + (sender.ram_zero_pages if sender else 0)
        return {"normal": normal, "duplicate": zero, "normal-bytes": normal * self.page_size,
                "dirty-sync-count": self.ram.dirty_sync_count,
                "dirty-pages-rate": int(self.dirty_rate),
                "precopy-bytes": self.precopy_bytes, "downtime-bytes": self.downtime_bytes}
