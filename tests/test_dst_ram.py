"""migrate_dst.ram.RamLoadHandler: in-place receive targets and apply_in_thread, from
one thread and from several at once (the multifd receive threads)."""

from __future__ import annotations

import sys
import threading

import pytest

from migrate_common.log import get_logger
from migrate_dst.load import SectionKind
from migrate_dst.ram import RamLoadHandler
from protocol.control import RamSetup
from protocol.errors import SequenceError
from protocol.multifd import RamPacket
from vm.ram import MAIN_BLOCK, TARGET_PAGE_SIZE, GuestRam, is_zero_page, parse_memory_option

PS = TARGET_PAGE_SIZE


async def handler_for(text: str = "256K,block=rom:8K", *, setup: bool = True) -> RamLoadHandler:
    ram = GuestRam(parse_memory_option(text), role="destination")
    await ram.prepare()
    handler = RamLoadHandler(ram, None, get_logger("test"))
    if setup:
        blocks = {b.name: b.used_length for b in ram.blocks.values()}
        assert not await handler.load_state(SectionKind.START, RamSetup(PS, blocks), None)
        assert handler.setup_seen
    return handler


def pages_packet(normal: list[int], zero: list[int], num: int = 1,
                 block: str = MAIN_BLOCK) -> RamPacket:
    offsets = tuple(i * PS for i in normal + zero)
    return RamPacket(0, 128, len(normal), len(normal) * PS, num, len(zero), block, offsets)


def receive(handler: RamLoadHandler, packet: RamPacket, fill: int) -> None:
    """What a receive thread does with an uncompressed packet: pages straight into the
    targets (here: every byte ``fill``), then apply_in_thread."""
    targets = handler.receive_targets(packet)
    assert targets is not None
    assert sum(v.nbytes for v in targets) == packet.next_packet_size
    for view in targets:
        view[:] = bytes([fill]) * view.nbytes
    handler.apply_in_thread(0, packet)


def counters(handler: RamLoadHandler) -> tuple[int, int, int]:
    return handler.normal_pages, handler.zero_pages, handler.packets


@pytest.mark.parametrize("packet", [
    pages_packet([], [3]),
    pages_packet([1, 2], []),
    pages_packet([1], [5, 6]),
])
async def test_pages_before_setup_are_a_sequence_error(packet: RamPacket) -> None:
    handler = await handler_for(setup=False)
    assert handler.receive_targets(packet) is None  # not in place: the buffer path decides
    with pytest.raises(SequenceError, match="multifd channel 2: RAM pages before the RAM setup"):
        handler.apply_in_thread(2, packet)
    assert counters(handler) == (0, 0, 0) and handler.ram.received_pages() == 0
    handler.ram.close()


async def test_empty_packet_before_setup_only_counts() -> None:
    handler = await handler_for(setup=False)
    handler.apply_in_thread(0, RamPacket(0, 128, 0, 0, 4, 0, "", ()))
    assert counters(handler) == (0, 0, 1)
    handler.ram.close()


async def test_apply_in_thread_zero_pages_and_counters() -> None:
    handler = await handler_for()
    ram = handler.ram
    block = ram.blocks[MAIN_BLOCK]
    receive(handler, pages_packet([0, 1, 2, 7], [9]), 0x11)
    assert [block.page(i)[0] for i in (0, 1, 2, 7)] == [0x11] * 4
    assert counters(handler) == (4, 1, 1) and ram.received_pages() == 5

    block.page(20)[:] = b"\xee" * PS  # never received: a zero page leaves it alone
    receive(handler, pages_packet([3], [1, 7, 20]), 0x22)
    assert is_zero_page(block.page(1)) and is_zero_page(block.page(7))
    assert block.page(0)[0] == 0x11 and block.page(2)[0] == 0x11 and block.page(3)[0] == 0x22
    assert block.page(20)[0] == 0xEE
    assert counters(handler) == (5, 4, 2) and ram.received_pages() == 7

    # zero-only packets have no payload and go straight to apply_in_thread
    handler.apply_in_thread(1, pages_packet([], [0, 3]))
    assert is_zero_page(block.page(0)) and is_zero_page(block.page(3))
    assert counters(handler) == (5, 6, 3) and ram.received_pages() == 7

    receive(handler, pages_packet([1], [0], block="rom"), 0x33)
    rom = ram.blocks["rom"]
    assert rom.page(1)[0] == 0x33 and is_zero_page(rom.page(0))
    assert counters(handler) == (6, 7, 4) and ram.received_pages() == 9
    stats = handler.stats()
    assert (stats["normal"], stats["duplicate"], stats["received-pages"]) == (6, 7, 9)
    ram.close()


THREADS = 4
PACKETS = 150


async def test_apply_in_thread_from_several_threads() -> None:
    """Receive threads on disjoint pages, started together and switching often: no
    count is lost and every page holds what its thread wrote."""
    handler = await handler_for("8M")  # 2048 pages: 4 threads x 150 packets x 3 pages
    ram = handler.ram
    block = ram.blocks[MAIN_BLOCK]
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def channel(t: int) -> None:
        try:
            start.wait()
            for k in range(PACKETS):
                first = (t * PACKETS + k) * 3
                # two pages in place, then one zero page over the first of them
                receive(handler, pages_packet([first, first + 1], [first + 2]), t + 1)
                handler.apply_in_thread(t, pages_packet([], [first]))
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=channel, args=(t,)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        sys.setswitchinterval(old)
    assert not errors and not any(thread.is_alive() for thread in threads)
    total = THREADS * PACKETS
    assert counters(handler) == (2 * total, 2 * total, 2 * total)
    assert ram.received_pages() == 3 * total
    for t in range(THREADS):
        for k in range(PACKETS):
            first = (t * PACKETS + k) * 3
            assert is_zero_page(block.page(first))
            assert bytes(block.page(first + 1)) == bytes([t + 1]) * PS
            assert is_zero_page(block.page(first + 2))
    assert is_zero_page(block.view[3 * total * PS :])
    ram.close()
