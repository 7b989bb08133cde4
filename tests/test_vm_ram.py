"""Tests for vm.ram: RAM options, blocks, dirty tracking rounds, page apply, digests."""

from __future__ import annotations

import os
import random
import re
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ConfigError, DeviceError, StateError
from vm.properties import GiB, KiB, MiB
from vm.ram import (
    ANONYMOUS_BACKEND,
    MAIN_BLOCK,
    TARGET_PAGE_SIZE,
    ZERO_PAGE,
    BackendConfig,
    GuestRam,
    MemoryConfig,
    block_file_name,
    has_zero_word,
    is_zero_page,
    parse_memory_backend,
    parse_memory_option,
    run_is_normal,
    split_zero_pages,
)

PS = TARGET_PAGE_SIZE


def ram(text: str = "1M", role: str = "source", backend: BackendConfig = ANONYMOUS_BACKEND,
        *, prepare: bool = True) -> GuestRam:
    guest = GuestRam(parse_memory_option(text), backend=backend, role=role)  # type: ignore[arg-type]
    if prepare:
        guest.prepare_blocking()
    return guest


def drain_round(guest: GuestRam, max_pages: int = 128) -> list[tuple[str, list[int]]]:
    batches = []
    while (batch := guest.next_dirty_batch(max_pages)) is not None:
        batches.append((batch[0].name, list(batch[1])))
    return batches


def copy_round(src: GuestRam, dst: GuestRam) -> int:
    """Send one round of dirty pages the way the channel tasks do; returns pages sent."""
    sent = 0
    while (batch := src.next_dirty_batch()) is not None:
        block, pages = batch
        normal = [i for i in pages if not is_zero_page(block.page(i))]
        zero = [i for i in pages if is_zero_page(block.page(i))]
        target = dst.blocks[block.name]
        payload = b"".join(bytes(block.page(i)) for i in normal)
        dst.write_pages(target, [block.offset_of(i) for i in normal], memoryview(payload))
        dst.zero_pages(target, [block.offset_of(i) for i in zero])
        sent += len(pages)
    return sent


# -- options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size, blocks, fill, seed",
    [
        ("1G", GiB, ((MAIN_BLOCK, GiB),), "zero", 0),
        ("size=1G,fill=random,seed=3", GiB, ((MAIN_BLOCK, GiB),), "random", 3),
        ("4096", 4096, ((MAIN_BLOCK, 4096),), "zero", 0),
        ("512M,fill=mixed,seed=0x10", 512 * MiB, ((MAIN_BLOCK, 512 * MiB),), "mixed", 16),
        ("1G,block=vga.vram:16M,block=rom:2M", GiB,
         ((MAIN_BLOCK, GiB), ("vga.vram", 16 * MiB), ("rom", 2 * MiB)), "zero", 0),
        ("fill=random,size=8M", 8 * MiB, ((MAIN_BLOCK, 8 * MiB),), "random", 0),
        ("64M,block=0000:00:02.0/vga.vram:8K", 64 * MiB,
         ((MAIN_BLOCK, 64 * MiB), ("0000:00:02.0/vga.vram", 8 * KiB)), "zero", 0),
    ],
)
def test_parse_memory_option(text, size, blocks, fill, seed):
    config = parse_memory_option(text)
    assert (config.size, config.blocks, config.fill, config.seed) == (size, blocks, fill, seed)
    assert config.total_size == sum(s for _, s in blocks)
    assert parse_memory_option(config.to_option()) == config


@pytest.mark.parametrize(
    "text, quoted",
    [
        ("", "''"),
        ("0", "0"),
        ("1000", "1000"),
        ("1G,fill=blue", "blue"),
        ("1G,seed=-1", "-1"),
        ("1G,seed=abc", "abc"),
        ("1G,block=vram", "vram"),
        ("1G,block=:4K", ":4K"),
        ("1G,block=a:5000", "5000"),
        ("1G,block=a:lots", "lots"),
        ("1G,block=pc.ram:4K", "pc.ram"),
        ("1G,block=a:4K,block=a:8K", "'a'"),
        ("1G,foo=1", "foo"),
        ("1G,,fill=zero", "1G,,fill=zero"),
        ("fill=zero", "fill=zero"),
        ("1G,size=2G", "size"),
        ("1G,4K", "4K"),
        ("100G", "100G"),
        ("1G,block=" + "x" * 256 + ":4K", "xxxx"),
    ],
)
def test_parse_memory_option_rejects(text, quoted):
    with pytest.raises(ConfigError) as info:
        parse_memory_option(text)
    assert quoted in str(info.value)


def test_memory_config_direct():
    assert MemoryConfig(size=8 * MiB).blocks == ((MAIN_BLOCK, 8 * MiB),)
    config = MemoryConfig(8 * MiB, ((MAIN_BLOCK, 8 * MiB), ("rom", 64 * KiB)), "mixed", 9)
    assert config.total_size == 8 * MiB + 64 * KiB
    assert parse_memory_option(config.to_option()) == config
    with pytest.raises(ConfigError, match="first block"):
        MemoryConfig(8 * MiB, (("rom", 64 * KiB),))
    with pytest.raises(ConfigError, match="first block"):
        MemoryConfig(8 * MiB, ((MAIN_BLOCK, 4 * MiB),))
    with pytest.raises(ConfigError, match="NUL"):
        MemoryConfig(8 * MiB, ((MAIN_BLOCK, 8 * MiB), ("a\0b", 4096)))
    with pytest.raises(ConfigError, match="fill"):
        MemoryConfig(8 * MiB, fill="ones")
    with pytest.raises(ConfigError, match="seed"):
        MemoryConfig(8 * MiB, seed=1 << 64)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("anonymous", BackendConfig("anonymous")),
        ("file:/dev/shm/vm", BackendConfig("file", "/dev/shm/vm", False)),
        ("file:/dev/shm/vm,share=on", BackendConfig("file", "/dev/shm/vm", True)),
        ("file:rel/dir,share=off", BackendConfig("file", "rel/dir", False)),
        ("file:/a,,b,share=yes", BackendConfig("file", "/a,b", True)),
    ],
)
def test_parse_memory_backend(text, expected):
    config = parse_memory_backend(text)
    assert config == expected
    assert parse_memory_backend(config.to_option()) == config


@pytest.mark.parametrize(
    "text, quoted",
    [
        ("", "''"),
        ("file", "file"),
        ("file:", "file:"),
        ("tmpfs:/x", "tmpfs:/x"),
        ("file:/x,share=maybe", "maybe"),
        ("file:/x,size=1G", "size=1G"),
        ("file:/x,share=on,share=off", "share"),
        ("anonymous,share=on", "anonymous,share=on"),
    ],
)
def test_parse_memory_backend_rejects(text, quoted):
    with pytest.raises(ConfigError) as info:
        parse_memory_backend(text)
    assert quoted in str(info.value)


def test_backend_config_direct():
    with pytest.raises(ConfigError):
        BackendConfig("file")
    with pytest.raises(ConfigError):
        BackendConfig("anonymous", share=True)
    with pytest.raises(ConfigError):
        BackendConfig("hugetlbfs", "/x")


def test_block_file_name():
    assert block_file_name("pc.ram") == "pc.ram"
    assert block_file_name("0000:00:02.0/vga.vram") == "0000:00:02.0%2Fvga.vram"
    assert block_file_name("100%") == "100%25"
    assert block_file_name("..") == "%2E."
    names = ["a/b", "a%2Fb", "a%b", ".x", "%2Ex", "/"]
    escaped = [block_file_name(n) for n in names]
    assert len(set(escaped)) == len(names)
    assert all("/" not in e and not e.startswith(".") for e in escaped)


def test_is_zero_page():
    page = bytearray(PS)
    assert is_zero_page(memoryview(page))
    assert is_zero_page(bytes(PS))
    page[-1] = 1
    assert not is_zero_page(memoryview(page))
    assert not is_zero_page(page)
    big = bytearray(3 * PS)
    assert is_zero_page(memoryview(big))
    big[2 * PS + 7] = 9
    assert not is_zero_page(memoryview(big))
    assert is_zero_page(memoryview(big)[:PS])
    assert ZERO_PAGE == bytes(PS)


# -- layout and memory -------------------------------------------------------------


def test_layout_without_prepare():
    guest = ram("1G,block=vga.vram:16M,block=rom:2M", prepare=False)
    assert list(guest.blocks) == [MAIN_BLOCK, "vga.vram", "rom"]
    assert guest.total_size == GiB + 18 * MiB
    assert guest.page_size == PS
    assert guest.npages_total == guest.total_size // PS
    assert guest.block_size("vga.vram") == 16 * MiB
    assert guest.block_size("nope") is None
    vram = guest.blocks["vga.vram"]
    assert (vram.npages, vram.base_page) == (16 * MiB // PS, GiB // PS)
    assert guest.locate(GiB // PS + 1) == (vram, 1)
    assert guest.locate(0) == (guest.blocks[MAIN_BLOCK], 0)
    with pytest.raises(DeviceError):
        guest.locate(guest.npages_total)
    with pytest.raises(StateError):
        _ = vram.view
    with pytest.raises(StateError):
        guest.digest()
    with pytest.raises(ConfigError):
        GuestRam(parse_memory_option("1M"), role="sideways")  # type: ignore[arg-type]


def test_ram_block_pages():
    guest = ram("64K")
    block = guest.blocks[MAIN_BLOCK]
    assert block.view.format == "B" and not block.view.readonly
    assert block.view.nbytes == 64 * KiB
    block.page(3)[:4] = b"abcd"
    assert bytes(block.view[3 * PS : 3 * PS + 4]) == b"abcd"
    assert block.offset_of(15) == 15 * PS
    assert block.index_of(15 * PS) == 15
    for bad in (-1, 16):
        with pytest.raises(DeviceError):
            block.page(bad)
        with pytest.raises(DeviceError):
            block.offset_of(bad)
    for bad_offset in (1, 16 * PS, -PS):
        with pytest.raises(DeviceError):
            block.index_of(bad_offset)


async def test_prepare_fills():
    zero = ram("1M,fill=zero", prepare=False)
    await zero.prepare()
    await zero.prepare()  # idempotent
    assert is_zero_page(zero.blocks[MAIN_BLOCK].view)

    rnd = ram("1M,fill=random,seed=5,block=rom:64K")
    pages = [bytes(b.page(i)) for b in rnd.blocks.values() for i in range(b.npages)]
    assert not any(is_zero_page(p) for p in pages)
    assert len(set(pages)) == len(pages)  # the stamps make every page distinct
    assert rnd.digest() == ram("1M,fill=random,seed=5,block=rom:64K").digest()
    assert rnd.digest() != ram("1M,fill=random,seed=6,block=rom:64K").digest()

    mixed = ram("4M,fill=mixed,seed=2")
    block = mixed.blocks[MAIN_BLOCK]
    zeros = sum(is_zero_page(block.page(i)) for i in range(block.npages))
    assert 0.4 * block.npages < zeros < 0.6 * block.npages
    assert mixed.digest() == ram("4M,fill=mixed,seed=2").digest()

    dst = ram("1M", role="destination")
    assert is_zero_page(dst.blocks[MAIN_BLOCK].view)
    assert dst.digest() == zero.digest()  # same layout, all zero


def test_close():
    guest = ram("64K")
    held = guest.blocks[MAIN_BLOCK].page(0)  # a view still alive must not break close()
    guest.close()
    guest.close()
    with pytest.raises(StateError):
        _ = guest.blocks[MAIN_BLOCK].view
    with pytest.raises(StateError):
        guest.prepare_blocking()
    del held


# -- dirty tracking ------------------------------------------------------------------


def test_tracking_requires_start():
    guest = ram("64K", prepare=False)
    with pytest.raises(StateError):
        guest.next_dirty_batch()
    with pytest.raises(StateError):
        guest.sync_dirty_log()
    guest.mark_dirty(guest.blocks[MAIN_BLOCK], 3)  # no-op: not tracking
    assert guest.dirty_pages() == guest.live_dirty_pages() == 0
    guest.start_migration()
    assert guest.live_dirty_pages() == 0
    with pytest.raises(DeviceError):
        guest.mark_dirty(guest.blocks[MAIN_BLOCK], 16)
    with pytest.raises(ConfigError):
        guest.next_dirty_batch(0)


def test_live_dirty_pages_counts_distinct_pages_until_the_sync():
    guest = ram("1M,block=rom:8K", prepare=False)
    guest.start_migration()
    block, rom = guest.blocks[MAIN_BLOCK], guest.blocks["rom"]
    for index in (3, 3, 4, 200):
        guest.mark_dirty(block, index)
    guest.mark_dirty(rom, 1)
    assert guest.live_dirty_pages() == 4
    assert guest.sync_dirty_log() == 4 and guest.live_dirty_pages() == 0
    guest.mark_dirty(block, 3)
    assert guest.live_dirty_pages() == 1
    guest.stop_dirty_tracking()
    assert guest.live_dirty_pages() == 0


def test_consecutive_batch_is_a_range_others_a_list():
    # a batch of consecutive pages is a range, which the sender takes as one span
    guest = ram("1M", prepare=False)
    guest.start_migration()
    block = guest.blocks[MAIN_BLOCK]
    assert guest.next_dirty_batch(100) == (block, range(100))
    assert guest.next_dirty_batch(200) == (block, range(100, 256))
    guest.sync_dirty_log()
    guest.begin_round()
    for index in (3, 4, 9):
        guest.mark_dirty(block, index)
    guest.sync_dirty_log()
    guest.begin_round()
    batch = guest.next_dirty_batch()
    assert batch == (block, [3, 4, 9]) and type(batch[1]) is list
    assert guest.dirty_pages() == 0


def test_first_round_sends_everything_in_batches():
    guest = ram("1M,block=vga.vram:40K,block=rom:4K", prepare=False)
    guest.start_migration()
    assert guest.dirty_pages() == guest.npages_total == 256 + 10 + 1
    batches = drain_round(guest)
    assert [(name, len(p)) for name, p in batches] == [
        (MAIN_BLOCK, 128), (MAIN_BLOCK, 128), ("vga.vram", 10), ("rom", 1)
    ]
    assert batches[0][1] == list(range(128)) and batches[1][1] == list(range(128, 256))
    assert guest.dirty_pages() == 0
    assert guest.next_dirty_batch() is None  # stays at the end until begin_round
    guest.begin_round()
    assert guest.next_dirty_batch() is None  # nothing dirty
    guest.start_migration()  # restart: all dirty again
    assert sum(len(p) for _, p in drain_round(guest, 100)) == guest.npages_total


def test_batches_one_block_increasing_bounded():
    guest = ram("256K,block=b:256K,block=c:4K", prepare=False)
    guest.start_migration()
    drain_round(guest)
    rng = random.Random(4)
    chosen = {(name, i) for name in guest.blocks for i in range(guest.blocks[name].npages)
              if rng.random() < 0.4}
    chosen |= {(MAIN_BLOCK, 63), ("b", 0)}  # contiguous across the boundary: never merged
    for name, i in chosen:
        guest.mark_dirty(guest.blocks[name], i)
        guest.mark_dirty(guest.blocks[name], i)  # twice: still one page
    assert guest.live_dirty_pages() == len(chosen)
    assert guest.sync_dirty_log() == len(chosen)
    assert guest.live_dirty_pages() == 0
    assert guest.dirty_sync_count == 1
    assert guest.dirty_pages() == len(chosen)
    guest.begin_round()
    got = []
    for name, pages in drain_round(guest, 7):
        assert 1 <= len(pages) <= 7
        assert pages == sorted(set(pages))
        got += [(name, i) for i in pages]
    assert set(got) == chosen and len(got) == len(chosen)
    assert guest.dirty_pages() == 0
    names = [name for name, _ in got]
    assert names == sorted(names, key=list(guest.blocks).index)  # block order


def test_pages_dirtied_mid_round():
    guest = ram("1M", prepare=False)
    block = guest.blocks[MAIN_BLOCK]
    guest.start_migration()
    first = guest.next_dirty_batch()
    assert first is not None and list(first[1]) == list(range(128))
    guest.mark_dirty(block, 5)    # behind the cursor: next round
    guest.mark_dirty(block, 200)  # ahead, already dirty
    assert guest.sync_dirty_log() == 2
    rest = drain_round(guest)
    assert [p for _, p in rest] == [list(range(128, 256))]
    assert guest.dirty_pages() == 1
    guest.begin_round()
    assert drain_round(guest) == [(MAIN_BLOCK, [5])]
    assert guest.sync_dirty_log() == 0
    assert guest.dirty_sync_count == 2


def test_huge_bitmap_few_dirty_pages():
    guest = ram("1G,block=vga.vram:16M", prepare=False)  # bitmaps only: no memory needed
    guest.start_migration()
    assert sum(len(p) for _, p in drain_round(guest)) == guest.npages_total
    main, vram = guest.blocks[MAIN_BLOCK], guest.blocks["vga.vram"]
    for i in (0, 1, 2, 100_000, main.npages - 1):
        guest.mark_dirty(main, i)
    guest.mark_dirty(vram, vram.npages - 1)
    assert guest.sync_dirty_log() == 6
    guest.begin_round()
    assert drain_round(guest) == [
        (MAIN_BLOCK, [0, 1, 2, 100_000, main.npages - 1]), ("vga.vram", [vram.npages - 1])
    ]
    guest.stop_dirty_tracking()
    assert not guest.tracking and guest.dirty_pages() == 0
    guest.mark_dirty(main, 0)  # no-op again
    with pytest.raises(StateError):
        guest.next_dirty_batch()


# -- destination apply ---------------------------------------------------------------


def test_write_pages_and_zero_pages():
    dst = ram("64K,block=rom:8K", role="destination")
    block = dst.blocks[MAIN_BLOCK]
    payload = b"".join(bytes([i + 1]) * PS for i in range(4))
    dst.write_pages(block, [2 * PS, 3 * PS, 9 * PS, 0], memoryview(payload))
    assert [block.page(i)[0] for i in (2, 3, 9, 0)] == [1, 2, 3, 4]
    assert dst.received_pages() == 4
    dst.write_pages(block, [2 * PS], b"\x07" * PS)  # again: not counted twice
    assert block.page(2)[0] == 7 and dst.received_pages() == 4

    # a zero page only overwrites what was received before
    block.page(5)[:] = b"\xee" * PS  # "stale" content that was never received
    dst.zero_pages(block, [5 * PS, 9 * PS])
    assert block.page(5)[0] == 0xEE  # untouched (fresh memory is assumed zero)
    assert is_zero_page(block.page(9))
    assert dst.received_pages() == 5
    dst.zero_pages(block, [5 * PS])  # now received: memset
    assert is_zero_page(block.page(5))
    assert dst.received_pages() == 5
    # a page named twice in one packet counts once; one named alone is counted too
    dst.zero_pages(block, [6 * PS, 7 * PS, 6 * PS])
    assert dst.received_pages() == 7
    dst.zero_pages(block, [8 * PS])
    assert dst.received_pages() == 8
    block.page(8)[:] = b"\x01" * PS
    dst.zero_pages(block, [8 * PS, 6 * PS, 10 * PS])  # received ones among fresh ones
    assert is_zero_page(block.page(8)) and dst.received_pages() == 9

    dst.reset_received()
    assert dst.received_pages() == 0
    dst.write_pages(dst.blocks["rom"], [PS], memoryview(bytearray(b"\x01") * PS))
    assert dst.received_pages() == 1


@pytest.mark.parametrize(
    "offsets, payload_pages",
    [
        ([0, 1], 2),            # misaligned
        ([0, 16 * PS], 2),      # past the end
        ([0, 15 * PS + 8], 2),  # straddles the end
        ([0, -PS], 2),          # negative
        ([0, PS], 1),           # payload too short
        ([0], 1.5),             # payload not whole pages
    ],
)
def test_write_pages_rejects(offsets, payload_pages):
    dst = ram("64K", role="destination")
    block = dst.blocks[MAIN_BLOCK]
    with pytest.raises(DeviceError):
        dst.write_pages(block, offsets, memoryview(b"\x05" * int(payload_pages * PS)))
    assert is_zero_page(block.view) and dst.received_pages() == 0  # nothing applied
    with pytest.raises(DeviceError):
        dst.zero_pages(block, [0, 3])
    assert dst.received_pages() == 0


def test_write_pages_foreign_block():
    dst = ram("64K", role="destination")
    other = ram("64K", role="destination")
    with pytest.raises(DeviceError):
        dst.write_pages(other.blocks[MAIN_BLOCK], [0], bytes(PS))


# -- migration-style copies and digests ------------------------------------------------


async def test_copy_through_batches_gives_equal_digest():
    src = ram("2M,fill=mixed,seed=11,block=vga.vram:256K,block=rom:8K")
    dst = ram("2M,block=vga.vram:256K,block=rom:8K", role="destination")
    assert src.digest() != dst.digest()
    src.start_migration()
    assert copy_round(src, dst) == src.npages_total
    assert dst.received_pages() == dst.npages_total
    assert src.digest() == dst.digest() == await dst.digest_async()

    # The guest writes more: some pages become zero, others change; one more round.
    main = src.blocks[MAIN_BLOCK]
    rng = random.Random(3)
    for i in rng.sample(range(main.npages), 50):
        main.page(i)[:] = ZERO_PAGE if i % 2 else os.urandom(PS)
        src.mark_dirty(main, i)
    assert src.digest() != dst.digest()
    assert src.sync_dirty_log() == 50
    src.begin_round()
    assert copy_round(src, dst) == 50
    assert src.digest() == dst.digest()

    # one differing byte is noticed: by a fresh digest when it went around GuestRam,
    # by any digest once a writer marks it
    dst.blocks["rom"].page(1)[100] ^= 1
    assert src.digest() != dst.digest(fresh=True)
    dst.written(dst.blocks["rom"], [PS])
    assert src.digest() != dst.digest()


def test_digest_covers_names_and_lengths():
    a = ram("64K,block=x:8K")
    b = ram("64K,block=y:8K")
    c = ram("72K")
    assert len({a.digest(), b.digest(), c.digest()}) == 3


# -- file backend ------------------------------------------------------------------------


async def test_file_backend_shared(tmp_path: Path):
    directory = tmp_path / "dst-ram"
    stale = directory / "pc.ram"
    directory.mkdir()
    stale.write_bytes(b"\xff" * 2 * PS)  # leftovers of an earlier run are truncated
    backend = parse_memory_backend(f"file:{directory},share=on")
    dst = ram("64K,block=0000:00:02.0/vga.vram:8K", role="destination", backend=backend,
              prepare=False)
    await dst.prepare()
    main, vram = dst.blocks[MAIN_BLOCK], dst.blocks["0000:00:02.0/vga.vram"]
    assert main.path == stale and vram.path == directory / "0000:00:02.0%2Fvga.vram"
    assert stale.stat().st_size == 64 * KiB and vram.path.stat().st_size == 8 * KiB
    assert stale.read_bytes() == bytes(64 * KiB)
    dst.write_pages(main, [3 * PS], b"\xab" * PS)
    dst.write_pages(vram, [PS], b"\xcd" * PS)
    data = stale.read_bytes()  # visible without close: it is the same memory
    assert data[3 * PS : 4 * PS] == b"\xab" * PS and data.count(0) == 60 * KiB
    dst.close()
    assert vram.path.read_bytes()[PS:] == b"\xcd" * PS


def test_file_backend_source_and_private(tmp_path: Path):
    src = ram("64K,fill=random,seed=1", backend=BackendConfig("file", str(tmp_path / "s"), True))
    assert (tmp_path / "s" / "pc.ram").read_bytes() == bytes(src.blocks[MAIN_BLOCK].view)
    assert src.digest() == ram("64K,fill=random,seed=1").digest()
    private = ram("64K", role="destination",
                  backend=parse_memory_backend(f"file:{tmp_path / 'p'},share=off"))
    private.write_pages(private.blocks[MAIN_BLOCK], [0], b"\x01" * PS)
    assert private.blocks[MAIN_BLOCK].page(0)[0] == 1
    assert (tmp_path / "p" / "pc.ram").read_bytes() == bytes(64 * KiB)  # MAP_PRIVATE
    src.close()
    private.close()


# -- zero-page split (source) ------------------------------------------------------------

# where a single non-zero byte sits in a page: split_zero_pages reads the first and the
# last word directly and only compares the rest
FIRST_WORD = range(0, 8)
LAST_WORD = range(PS - 8, PS)
MIDDLE = range(8, PS - 8)


def memory_with(marks: dict[int, tuple[int, int]], npages: int) -> tuple[memoryview, memoryview]:
    """``npages`` zero pages with byte ``value`` at ``pos`` of page ``index`` for each
    ``index: (pos, value)``; returns the bytes and the same memory as words."""
    mem = bytearray(npages * PS)
    for index, (pos, value) in marks.items():
        mem[index * PS + pos] = value
    view = memoryview(mem)
    return view, view.cast("Q")


@pytest.mark.parametrize("pos", [None, 0, 1, 7, 8, 9, 2047, 2048, PS - 9, PS - 8, PS - 2, PS - 1])
def test_split_zero_pages_golden(pos):
    marks = {} if pos is None else {1: (pos, 0x80)}
    view, words = memory_with(marks, 3)
    normal, zero = split_zero_pages(view, [2, 1, 0], PS, words)
    if pos is None:
        assert (normal, zero) == ([], [2 * PS, PS, 0])
    else:
        assert (normal, zero) == ([PS], [2 * PS, 0])


@st.composite
def marked_pages(draw):
    npages = draw(st.integers(1, 12))
    marks = {}
    for index in range(npages):
        where = draw(st.sampled_from(["zero", "first", "last", "middle"]))
        if where != "zero":
            region = {"first": FIRST_WORD, "last": LAST_WORD, "middle": MIDDLE}[where]
            marks[index] = (draw(st.sampled_from(region)), draw(st.integers(1, 255)))
    pages = draw(st.lists(st.integers(0, npages - 1), max_size=npages))
    return npages, marks, pages


@settings(max_examples=200)
@given(marked_pages())
def test_split_zero_pages_agrees_with_is_zero_page(case):
    npages, marks, pages = case
    view, words = memory_with(marks, npages)
    normal, zero = split_zero_pages(view, pages, PS, words)
    assert normal == [i * PS for i in pages if not is_zero_page(view[i * PS : (i + 1) * PS])]
    assert zero == [i * PS for i in pages if is_zero_page(view[i * PS : (i + 1) * PS])]
    assert sorted(normal + zero) == sorted(i * PS for i in pages)


@settings(max_examples=200)
@given(marked_pages(), st.integers(0, 11), st.integers(0, 12))
def test_split_zero_pages_of_a_run_agrees_with_is_zero_page(case, start, length):
    """A batch that is a ``range`` (the first round's) takes the stretch-wise path."""
    npages, marks, _ = case
    view, words = memory_with(marks, npages)
    pages = range(min(start, npages), min(start + length, npages))
    normal, zero = split_zero_pages(view, pages, PS, words)
    assert normal == [i * PS for i in pages if not is_zero_page(view[i * PS : (i + 1) * PS])]
    assert zero == [i * PS for i in pages if is_zero_page(view[i * PS : (i + 1) * PS])]


@pytest.mark.parametrize("mark", [None, 0, 127, 128, 129, 300, 511])
def test_split_zero_pages_of_a_2m_packet(mark):
    """A packet of 512 pages (x-multifd-packet-size=2M) whose zero-looking stretch is
    longer than one comparison with zeros: a page that is not all zero is still found."""
    marks = {} if mark is None else {mark: (PS - 1, 0x80)}  # last byte: first word zero
    view, words = memory_with(marks, 512)
    normal, zero = split_zero_pages(view, range(512), PS, words)
    assert normal == ([] if mark is None else [mark * PS])
    assert zero == [i * PS for i in range(512) if i != mark]


@pytest.mark.parametrize(("data", "expected"), [
    (b"", False),
    (bytes(8), True),
    (bytes(7), False),                                  # no whole word
    (b"\x01" + bytes(8) + b"\x01" * 7, False),          # zeros straddle words 0 and 1
    (b"\x01" * 3 + bytes(10) + b"\x01" * 3, False),      # ten zeros, none word-aligned
    (b"\x01" + bytes(15), True),                        # straddling run, then word 1
    (b"\x01" * 8 + bytes(8), True),
    (b"\x01" * 16 + bytes(7) + b"\x01", False),
])
def test_has_zero_word_golden(data, expected):
    assert has_zero_word(data) is expected


@settings(max_examples=300)
@given(st.lists(st.sampled_from([b"\x00", b"\x01"]), max_size=48).map(b"".join))
def test_has_zero_word_agrees_with_a_word_scan(data):
    words = [data[i:i + 8] for i in range(0, len(data) - 7, 8)]
    assert has_zero_word(data) is (bytes(8) in words)


@pytest.mark.parametrize("zero_at", [None, 0, 5, 127])
def test_run_is_normal_looks_at_first_words(zero_at):
    view, words = memory_with({i: (8, 1) for i in range(130)}, 130)  # words 0 all zero
    mem = view.obj
    for i in range(130):
        if i != zero_at:
            mem[i * PS] = 0x80  # first word non-zero
    assert run_is_normal(words, 0, 128, PS) is (zero_at is None)
    assert run_is_normal(words, 1, 127, PS) is (zero_at in (None, 0))


def test_split_zero_pages_on_a_block():
    guest = ram("64K,fill=mixed,seed=4")
    block = guest.blocks[MAIN_BLOCK]
    block.page(3)[PS - 1] = 1  # zero or not, page 3 now only differs in its last byte
    pages = list(range(block.npages))
    normal, zero = split_zero_pages(block.view, pages, PS, block.words)
    assert zero == [i * PS for i in pages if is_zero_page(block.page(i))]
    assert normal == [i * PS for i in pages if not is_zero_page(block.page(i))]
    assert 3 * PS in normal and zero  # mixed: both kinds present


def test_ram_block_words():
    guest = ram("64K,block=rom:8K")
    for block in guest.blocks.values():
        words = block.words
        assert words is block.words  # cast once, then cached
        assert words.format == "Q" and words.itemsize == 8 and not words.readonly
        assert len(words) == block.used_length // 8 and words.nbytes == block.used_length
    block = guest.blocks["rom"]
    block.page(1)[8:16] = (0x0102030405060708).to_bytes(8, sys.byteorder)
    assert block.words[PS // 8 + 1] == 0x0102030405060708
    block.words[3] = 0xFFFF_FFFF_FFFF_FFFF
    assert bytes(block.view[24:32]) == b"\xff" * 8
    guest.close()
    with pytest.raises(StateError):
        _ = block.words


# -- in-place receive targets (destination) ----------------------------------------------


async def test_receive_targets_one_view_per_run():
    guest = GuestRam(parse_memory_option("64K,block=rom:8K"), role="destination")
    await guest.prepare()
    block = guest.blocks[MAIN_BLOCK]
    offsets = [2 * PS, 3 * PS, 4 * PS, 9 * PS, 0, PS, 11 * PS]
    views = guest.receive_targets(block, offsets)
    assert [v.nbytes for v in views] == [3 * PS, PS, 2 * PS, PS]
    assert all(not v.readonly and v.format == "B" for v in views)
    # marked received before anything arrives
    assert guest.received_pages() == len(offsets)
    # filling the views in order fills the pages at the offsets in order
    payload = b"".join(bytes([i + 1]) * PS for i in range(len(offsets)))
    pos = 0
    for view in views:
        view[:] = payload[pos : pos + view.nbytes]
        pos += view.nbytes
    assert [block.page(o // PS)[0] for o in offsets] == [1, 2, 3, 4, 5, 6, 7]
    assert is_zero_page(block.page(5)) and is_zero_page(guest.blocks["rom"].view)

    # again, overlapping: only the new pages count
    guest.receive_targets(block, [PS, 2 * PS, 5 * PS])
    assert guest.received_pages() == len(offsets) + 1

    # received pages now get memset by a zero page; a never-received one is left alone
    block.page(12)[:] = b"\xee" * PS
    guest.zero_pages(block, [2 * PS, 9 * PS, 12 * PS])
    assert is_zero_page(block.page(2)) and is_zero_page(block.page(9))
    assert block.page(12)[0] == 0xEE
    assert block.page(3)[0] == 2  # its neighbour in the run is untouched
    assert guest.received_pages() == len(offsets) + 2
    guest.close()


def test_receive_targets_and_written_for_a_known_run():
    # a decoded packet's normal_run: the ends stand for the run, with the same checks
    guest = ram("64K", role="destination")
    block = guest.blocks[MAIN_BLOCK]
    run = [3 * PS, 4 * PS, 5 * PS]
    (view,) = guest.receive_targets(block, run, run=True)
    assert view.nbytes == 3 * PS and guest.received_pages() == 3
    view[:] = b"\x07" * view.nbytes
    assert block.page(4)[0] == 7 and is_zero_page(block.page(6))
    before = guest.generation()
    guest.written(block, run, run=True)
    assert guest._chunk_gen[0] > before
    with pytest.raises(DeviceError):
        guest.receive_targets(block, [15 * PS, 16 * PS], run=True)  # runs past the end
    with pytest.raises(DeviceError):
        guest.receive_targets(block, [PS + 1, 2 * PS + 1], run=True)


def test_receive_targets_other_block_and_empty():
    guest = ram("64K,block=rom:8K", role="destination")
    rom = guest.blocks["rom"]
    (view,) = guest.receive_targets(rom, [PS])
    view[:] = b"\x05" * PS
    assert bytes(rom.page(1)) == b"\x05" * PS and is_zero_page(guest.blocks[MAIN_BLOCK].view)
    assert guest.received_pages() == 1
    assert guest.receive_targets(rom, []) == [] and guest.received_pages() == 1
    other = ram("64K", role="destination")
    with pytest.raises(DeviceError, match="does not belong"):
        guest.receive_targets(other.blocks[MAIN_BLOCK], [0])


BAD_OFFSETS = [
    ([1], 1),
    ([0, PS, 2 * PS + 8], 2 * PS + 8),   # misaligned at the end
    ([PS // 2, 0], PS // 2),              # misaligned first
    ([0, -PS], -PS),                      # negative
    ([-1], -1),
    ([16 * PS], 16 * PS),                 # one past the last page
    ([0, 15 * PS, 1 << 40], 1 << 40),    # far out
    ([15 * PS + 8], 15 * PS + 8),         # straddles the end
    ([17 * PS, 1], 17 * PS),              # the first culprit is named
]


@pytest.mark.parametrize("offsets, culprit", BAD_OFFSETS)
def test_check_offsets_rejects(offsets, culprit):
    guest = ram("64K", role="destination")
    block = guest.blocks[MAIN_BLOCK]
    message = f"bad page offset {culprit:#x}"
    for apply in (lambda: guest.receive_targets(block, offsets),
                  lambda: guest.zero_pages(block, offsets),
                  lambda: guest.write_pages(block, offsets, bytes(len(offsets) * PS))):
        with pytest.raises(DeviceError, match=re.escape(message)):
            apply()
    assert guest.received_pages() == 0  # nothing marked, nothing written


@pytest.mark.parametrize("offsets", [[], [0], [15 * PS], [15 * PS, 0, 7 * PS], list(range(0, 64 * KiB, PS))])
def test_check_offsets_accepts(offsets):
    guest = ram("64K", role="destination")
    guest.receive_targets(guest.blocks[MAIN_BLOCK], offsets)
    assert guest.received_pages() == len(set(offsets))


_CHECKED = ram("64K", role="destination")


@settings(max_examples=300)
@given(st.lists(st.one_of(st.integers(-2, 17).map(lambda i: i * PS),
                          st.integers(-PS, 17 * PS)), max_size=8))
def test_check_offsets_like_the_reference(offsets):
    block = _CHECKED.blocks[MAIN_BLOCK]
    bad = [o for o in offsets if o % PS or not 0 <= o <= 15 * PS]
    if bad:
        with pytest.raises(DeviceError, match=re.escape(f"bad page offset {bad[0]:#x}")):
            _CHECKED.receive_targets(block, offsets)
    else:
        views = _CHECKED.receive_targets(block, offsets)
        assert sum(v.nbytes for v in views) == len(offsets) * PS


# -- the digest cache and prehash ----------------------------------------------------

@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """64 KiB digest chunks, and a log of the sizes of the chunks actually hashed."""
    import vm.ram as ram_module
    hashed: list[int] = []
    real = ram_module._chunk_digest

    def counting(view: memoryview) -> bytes:
        hashed.append(len(view))
        return real(view)
    monkeypatch.setattr(ram_module, "DIGEST_CHUNK", 64 * KiB)
    monkeypatch.setattr(ram_module, "_chunk_digest", counting)
    return hashed


def test_digest_hashes_only_chunks_written_since(small_chunks: list[int]) -> None:
    guest = ram("1M", role="destination")      # 16 chunks
    first = guest.digest()
    assert len(small_chunks) == 16
    small_chunks.clear()
    assert guest.digest() == first and small_chunks == []   # all cached
    block = guest.blocks[MAIN_BLOCK]
    block.page(20)[:] = b"\x01" * PS                        # page 20 is in chunk 1
    guest.mark_dirty(block, 20)
    changed = guest.digest()
    assert changed != first and len(small_chunks) == 1
    assert changed == guest.digest(fresh=True)


@pytest.mark.parametrize("writer", ["write_pages", "zero_pages", "receive_targets+written"])
def test_every_writer_invalidates_its_chunks(small_chunks: list[int], writer: str) -> None:
    guest = ram("1M", role="destination")
    block = guest.blocks[MAIN_BLOCK]
    offsets = [40 * PS, 41 * PS]                             # chunk 2
    guest.write_pages(block, offsets, b"\x07" * (2 * PS))   # received before: zero pages memset
    guest.digest()
    small_chunks.clear()
    if writer == "write_pages":
        guest.write_pages(block, offsets, b"\x09" * (2 * PS))
    elif writer == "zero_pages":
        guest.zero_pages(block, offsets)
    else:
        for view in guest.receive_targets(block, offsets):
            view[:] = b"\x0b" * len(view)
        guest.written(block, offsets)
    assert guest.digest() == guest.digest(fresh=True)
    assert small_chunks.count(64 * KiB) == 1 + 16            # one cached pass, one fresh


@pytest.mark.parametrize("writer", ["write_pages", "receive_targets"])
def test_scattered_pages_invalidate_exactly_their_chunks(small_chunks: list[int],
                                                         writer: str) -> None:
    guest = ram("1M", role="destination")
    block = guest.blocks[MAIN_BLOCK]
    offsets = [90 * PS, 20 * PS, 21 * PS, 50 * PS]            # chunks 5, 1, 1, 3
    guest.digest()
    small_chunks.clear()
    if writer == "write_pages":
        guest.write_pages(block, offsets, b"\x05" * (4 * PS))
    else:
        for view in guest.receive_targets(block, offsets):
            view[:] = b"\x06" * len(view)
    assert guest.digest() == guest.digest(fresh=True)
    assert len(small_chunks) == 3 + 16                       # chunks 1, 3, 5; then fresh


def test_a_write_during_a_hash_is_not_cached(small_chunks: list[int],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import vm.ram as ram_module
    monkeypatch.setattr(ram_module, "DIGEST_THREADS", 1)  # chunks in order: 0 first
    guest = ram("1M", role="destination")
    block = guest.blocks[MAIN_BLOCK]
    real = ram_module._chunk_digest

    def racing(view: memoryview) -> bytes:
        first = not small_chunks
        result = real(view)              # (the fixture's counter: logs the hash)
        if first:                        # while chunk 0 is hashed, a receiver starts
            guest.receive_targets(block, [0])
        return result
    monkeypatch.setattr(ram_module, "_chunk_digest", racing)
    guest.digest()
    small_chunks.clear()
    guest.digest()
    assert small_chunks == [64 * KiB]    # chunk 0 again, the rest from the cache


def test_prehash_hashes_settled_chunks_then_stops(small_chunks: list[int]) -> None:
    import threading
    guest = ram("1M", role="source")
    stop = threading.Event()
    worker = threading.Thread(target=lambda: setattr(worker, "n", guest.prehash(stop, 0.01)))
    worker.start()
    block = guest.blocks[MAIN_BLOCK]
    deadline = time.monotonic() + 5
    while len(small_chunks) < 15 and time.monotonic() < deadline:
        guest.mark_dirty(block, 0)        # chunk 0 stays hot: never settles
        time.sleep(0.002)
    stop.set()
    worker.join(5)
    assert not worker.is_alive() and worker.n == 15 == len(small_chunks)  # type: ignore[attr-defined]
    small_chunks.clear()
    guest.digest()
    assert small_chunks == [64 * KiB]    # only the hot chunk is left for the digest


def test_incoming_prehash_skips_chunks_not_received_yet(small_chunks: list[int]) -> None:
    import threading
    guest = ram("1M", role="destination")
    block = guest.blocks[MAIN_BLOCK]
    after = guest.generation()
    guest.write_pages(block, [PS * 16 * i for i in range(3)], b"\x05" * (3 * PS))  # chunks 0-2
    stop = threading.Event()
    worker = threading.Thread(target=lambda: guest.prehash(stop, 0.01, written_after=after))
    worker.start()
    deadline = time.monotonic() + 5
    while len(small_chunks) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    stop.set()
    worker.join(5)
    assert len(small_chunks) == 3        # the 13 chunks still to come were left alone
