"""Tests for vm.workload: option parsing, write accounting, pause/resume, patterns."""

from __future__ import annotations

import asyncio
import math
import struct

import pytest

from protocol.errors import ConfigError
from vm.properties import GiB, MiB
from vm.ram import (
    MAIN_BLOCK,
    TARGET_PAGE_SIZE,
    GuestRam,
    RamBlock,
    is_zero_page,
    parse_memory_option,
)
from vm.workload import (
    MAX_TICK_CATCHUP,
    Workload,
    WorkloadConfig,
    parse_workload_option,
)

PS = TARGET_PAGE_SIZE


class Stop(Exception):
    """Raised by the fake sleep to end ``run()`` after a number of ticks."""


class FakeTime:
    """A clock that only moves when someone sleeps on it; stops after ``ticks`` sleeps."""

    def __init__(self, ticks: int | None = None) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.ticks = ticks
        self.before_sleep: list = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if self.ticks is not None and len(self.sleeps) >= self.ticks:
            raise Stop
        self.sleeps.append(seconds)
        for hook in self.before_sleep:
            hook(len(self.sleeps))
        self.now += seconds
        await asyncio.sleep(0)


def make_ram(text: str = "4M") -> GuestRam:
    guest = GuestRam(parse_memory_option(text), role="source")
    guest.prepare_blocking()
    return guest


def recorder(guest: GuestRam) -> list[tuple[str, int]]:
    """Record every mark_dirty call (the workload looks the method up per batch)."""
    calls: list[tuple[str, int]] = []
    original = guest.mark_dirty

    def mark(block: RamBlock, index: int) -> None:
        calls.append((block.name, index))
        original(block, index)

    guest.mark_dirty = mark  # type: ignore[method-assign]
    return calls


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("dirty-rate=200M", WorkloadConfig(200 * MiB)),
        ("dirty-rate=0", WorkloadConfig(0)),
        ("dirty-rate=1G/s,pattern=hotspot,seed=7,hotspot=0.25",
         WorkloadConfig(GiB, "hotspot", 7, 0.25)),
        ("pattern=sequential,dirty-rate=4096", WorkloadConfig(4096, "sequential")),
        ("dirty-rate=1M,seed=0x20,hotspot=1", WorkloadConfig(MiB, "random", 32, 1.0)),
    ],
)
def test_parse_workload_option(text, expected):
    config = parse_workload_option(text)
    assert config == expected
    assert parse_workload_option(config.to_option()) == config


@pytest.mark.parametrize(
    "text, quoted",
    [
        ("", "''"),
        ("pattern=random", "pattern=random"),
        ("dirty-rate=fast", "fast"),
        ("dirty-rate=-1M", "-1M"),
        ("dirty-rate=1M,pattern=zigzag", "zigzag"),
        ("dirty-rate=1M,hotspot=0", "0"),
        ("dirty-rate=1M,hotspot=1.5", "1.5"),
        ("dirty-rate=1M,hotspot=nan", "nan"),
        ("dirty-rate=1M,hotspot=lots", "lots"),
        ("dirty-rate=1M,seed=x", "'x'"),
        ("dirty-rate=1M,seed=-2", "-2"),
        ("dirty-rate=1M,foo=1", "foo"),
        ("dirty-rate=1M,dirty-rate=2M", "dirty-rate"),
        ("dirty-rate", "dirty-rate"),
        ("dirty-rate=1M,", "dirty-rate=1M,"),
    ],
)
def test_parse_workload_option_rejects(text, quoted):
    with pytest.raises(ConfigError) as info:
        parse_workload_option(text)
    assert quoted in str(info.value)


def test_workload_config_direct():
    for bad in (dict(dirty_rate=-1), dict(dirty_rate=1, pattern="x"),
                dict(dirty_rate=1, hotspot=0.0), dict(dirty_rate=1, seed=-1),
                dict(dirty_rate=True)):
        with pytest.raises(ConfigError):
            WorkloadConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Workload(make_ram("64K"), WorkloadConfig(1), tick=0)


# -- writing ---------------------------------------------------------------------------------


async def test_run_writes_rate_times_time_and_marks_dirty():
    guest = make_ram("4M")
    guest.start_migration()
    while guest.next_dirty_batch() is not None:
        pass
    fake = FakeTime(ticks=50)
    # 1.5 pages per 10 ms tick: the fraction carries over (3 pages per 2 ticks)
    config = WorkloadConfig(dirty_rate=150 * PS, pattern="sequential", seed=9)
    work = Workload(guest, config, clock=fake.clock, sleep=fake.sleep, tick=0.01)
    calls = recorder(guest)
    with pytest.raises(Stop):
        await work.run()
    assert fake.sleeps == [0.01] * 50
    assert work.pages_written == len(calls) == 75
    assert calls == [(MAIN_BLOCK, i) for i in range(75)]
    assert guest.sync_dirty_log() == 75
    block = guest.blocks[MAIN_BLOCK]
    for i in range(75):  # the write record: counter from 1, then the seed
        counter, seed = struct.unpack_from("<QQ", block.view, i * PS)
        assert (counter, seed) == (i + 1, 9)
        assert struct.unpack_from("<Q", block.view, (i + 1) * PS - 8)[0] == ~(i + 1) & (2**64 - 1)
    assert is_zero_page(block.page(75))


async def test_every_write_changes_the_page():
    guest = make_ram("4K")  # a single page
    work = Workload(guest, WorkloadConfig(PS, seed=0))
    digests = {guest.digest()}
    for _ in range(5):
        work.write_pages(1)
        digests.add(guest.digest())
        assert not is_zero_page(guest.blocks[MAIN_BLOCK].page(0))
    assert len(digests) == 6


async def test_advance_accounting():
    guest = make_ram("1M")
    work = Workload(guest, WorkloadConfig(dirty_rate=1000 * PS))
    assert work.advance(0.0) == 0
    assert work.advance(0.0105) == 10  # 10.5 pages: half a page carried
    assert work.advance(0.0005) == 1   # 0.5 + 0.5
    assert work.advance(10.0) == math.floor(1000 * MAX_TICK_CATCHUP)  # stall: capped
    idle = Workload(guest, WorkloadConfig(dirty_rate=0))
    assert idle.advance(1.0) == 0


async def test_idle_guest_still_ticks():
    guest = make_ram("64K")
    fake = FakeTime(ticks=10)
    work = Workload(guest, WorkloadConfig(0), clock=fake.clock, sleep=fake.sleep)
    with pytest.raises(Stop):
        await work.run()
    assert len(fake.sleeps) == 10 and work.pages_written == 0


async def test_pause_stops_writes_and_skips_paused_time():
    guest = make_ram("1M")
    fake = FakeTime()
    work = Workload(guest, WorkloadConfig(100 * PS, "sequential"), clock=fake.clock,
                    sleep=fake.sleep, tick=0.01)
    work.pause()
    assert work.paused
    task = asyncio.create_task(work.run())
    for _ in range(20):
        await asyncio.sleep(0)
    assert fake.sleeps == [] and work.pages_written == 0  # waiting, not polling
    fake.now += 3600.0  # an hour paused: not made up for
    work.resume()
    while len(fake.sleeps) < 10:
        await asyncio.sleep(0)
    work.pause()
    written = work.pages_written
    assert 9 <= written <= 10  # 1 page per tick
    for _ in range(20):
        await asyncio.sleep(0)
    assert work.pages_written == written
    assert work.advance(1.0) == 0  # paused: nothing, even when asked directly
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_pause_during_sleep_writes_nothing():
    guest = make_ram("1M")
    fake = FakeTime(ticks=3)
    work = Workload(guest, WorkloadConfig(100 * PS), clock=fake.clock, sleep=fake.sleep)
    fake.before_sleep.append(lambda n: work.pause() if n == 2 else None)
    task = asyncio.create_task(work.run())
    while len(fake.sleeps) < 2:
        await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0)
    assert work.pages_written == 1  # only the first tick's page
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_sequential_wraps_across_blocks():
    guest = make_ram("16K,block=b:8K")  # 4 + 2 pages
    calls = recorder(guest)
    work = Workload(guest, WorkloadConfig(PS, "sequential"))
    work.write_pages(8)
    assert calls == [(MAIN_BLOCK, 0), (MAIN_BLOCK, 1), (MAIN_BLOCK, 2), (MAIN_BLOCK, 3),
                     ("b", 0), ("b", 1), (MAIN_BLOCK, 0), (MAIN_BLOCK, 1)]


async def test_random_covers_all_blocks_uniformly():
    guest = make_ram("1M,block=vga.vram:1M,block=rom:1M")
    calls = recorder(guest)
    Workload(guest, WorkloadConfig(PS, "random", seed=3)).write_pages(6000)
    per_block = {name: sum(1 for n, _ in calls if n == name) for name in guest.blocks}
    assert all(1700 < n < 2300 for n in per_block.values()), per_block
    assert len(set(calls)) > 0.9 * guest.npages_total  # most of the 768 pages
    # deterministic from the seed
    again = make_ram("1M,block=vga.vram:1M,block=rom:1M")
    calls2 = recorder(again)
    Workload(again, WorkloadConfig(PS, "random", seed=3)).write_pages(6000)
    assert calls2 == calls


async def test_hotspot_concentrates_writes():
    guest = make_ram("4M")
    calls = recorder(guest)
    Workload(guest, WorkloadConfig(PS, "hotspot", seed=1, hotspot=0.1)).write_pages(5000)
    hot_pages = int(guest.npages_total * 0.1)
    hot = sum(1 for _, i in calls if i < hot_pages)
    assert 0.87 * 5000 < hot < 0.93 * 5000
    assert any(i >= hot_pages for _, i in calls)
    everything = make_ram("64K")
    calls = recorder(everything)
    Workload(everything, WorkloadConfig(PS, "hotspot", hotspot=1.0)).write_pages(100)
    assert len(calls) == 100


async def test_workload_feeds_live_migration_rounds():
    """Workload + rounds: the live log collects exactly the written pages."""
    guest = make_ram("2M")
    guest.start_migration()
    assert sum(len(p) for _, p in iter(guest.next_dirty_batch, None)) == guest.npages_total
    work = Workload(guest, WorkloadConfig(PS, "hotspot", seed=2, hotspot=0.05))
    calls = recorder(guest)
    work.write_pages(400)
    distinct = {i for _, i in calls}
    assert guest.live_dirty_pages() == len(distinct)
    assert guest.sync_dirty_log() == len(distinct)
    guest.begin_round()
    sent = [i for _, pages in iter(guest.next_dirty_batch, None) for i in pages]
    assert sent == sorted(distinct)
