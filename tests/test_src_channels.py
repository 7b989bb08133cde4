"""migrate_src.channels: what a RAM job puts on the wire, whichever way it is built, and
how the channel threads hand finished jobs back to the loop."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Sequence
from typing import Any

import pytest
import structlog

from migrate_common.funnel import Funnel
from migrate_src import channels
from migrate_src.channels import RamJob
from protocol.control import (ControlDecoder, MessageReceived, SectionEnd, SectionFooter,
                              VfioRecord)
from protocol.multifd import RamPacket, ram_page_count
from protocol.vfio import VfioMigFlag
from vm.ram import GuestRam, parse_memory_option

PS = 4096


class _Sender:
    """The two things a job asks of its MultifdSender."""

    page_count = ram_page_count(PS)

    def __init__(self) -> None:
        self._nums = itertools.count(7)

    def next_packet_num(self) -> int:
        return next(self._nums)


class _Chan:
    compressor = None


def _wire(job: RamJob) -> bytes:
    return b"".join(bytes(part) for part in job.build(_Sender(), _Chan()))  # type: ignore[arg-type]


@pytest.fixture
def guest() -> Any:
    ram = GuestRam(parse_memory_option("2M,fill=random"), role="source")
    ram.prepare_blocking()
    yield ram
    ram.close()


@pytest.mark.parametrize("detect_zero", [True, False])
@pytest.mark.parametrize("zero_at", [None, 0, 5, 127])
def test_run_batch_is_sent_as_the_same_bytes(guest: GuestRam, detect_zero: bool,
                                             zero_at: int | None) -> None:
    block = next(iter(guest.blocks.values()))
    if zero_at is not None:
        block.page(100 + zero_at)[:] = bytes(PS)
    pages: Sequence[int] = range(100, 228)
    fast, general = RamJob([(block, pages)], detect_zero), RamJob([(block, list(pages))], detect_zero)
    wire = _wire(fast)
    assert wire == _wire(general)
    assert (fast.normal, fast.zero) == (general.normal, general.zero)
    packet = RamPacket.decode(wire[:ram_page_count(PS) * 8 + 320], page_count=128, page_size=PS)
    zero = 1 if detect_zero and zero_at is not None else 0
    assert (packet.normal_pages, packet.zero_pages) == (128 - zero, zero)
    assert packet.normal_run is (zero == 0 or zero_at in (0, 127))


async def test_channel_threads_wake_the_loop_once_for_several_jobs(monkeypatch) -> None:
    """Finished jobs are collected in batches (WAKE_BELOW), every byte still arrives in
    order, drain() and a SYNC still return."""
    collects = 0
    original = channels.MultifdSender._collect

    def counting(self: channels.MultifdSender) -> None:
        nonlocal collects
        collects += 1
        original(self)

    monkeypatch.setattr(channels.MultifdSender, "_collect", counting)
    ours, peer = socket.socketpair()
    received = bytearray()

    def reader() -> None:
        while chunk := peer.recv(1 << 20):
            received.extend(chunk)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    funnel = Funnel()
    sender = channels.MultifdSender([ours], bytes(16), funnel, structlog.get_logger())
    sender.start()
    jobs = 200
    payloads = [bytes([i]) * 65536 for i in range(jobs)]
    for i, payload in enumerate(payloads):
        await sender.submit((i.to_bytes(4, "big"), payload))
    await asyncio.wait_for(sender.drain(), 10)
    assert sender.bytes_sent == jobs * (4 + 65536)
    assert collects < jobs / 2          # one wake-up per job would be 200
    await asyncio.wait_for(sender.sync(), 10)  # urgent: not left waiting for more jobs
    sender.close()
    t.join(5)
    peer.close()
    expect = b"".join(i.to_bytes(4, "big") + p for i, p in enumerate(payloads))
    assert bytes(received[:len(expect)]) == expect
    assert funnel.error is None


class _CountingSocket:
    """A non-blocking socket whose writes are counted."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.writes = 0

    def sendmsg(self, buffers: Sequence[Any]) -> int:
        self.writes += 1
        return self.sock.sendmsg(buffers)

    def fileno(self) -> int:
        return self.sock.fileno()


def _main_channel() -> tuple[channels.MainChannel, _CountingSocket, socket.socket]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    counting = _CountingSocket(ours)
    main = channels.MainChannel(counting, Funnel(), structlog.get_logger())  # type: ignore[arg-type]
    return main, counting, peer


def _decode(data: bytes) -> list[tuple[Any, bytes | None]]:
    decoder = ControlDecoder(expect_preamble=False)
    out = []
    rest = memoryview(data)
    while rest:
        buf = decoder.buffer()
        n = min(len(buf), len(rest))
        buf[:n] = rest[:n]
        rest = rest[n:]
        for event in decoder.advance(n):
            assert isinstance(event, MessageReceived)
            payload = None if event.payload is None else bytes(event.payload)
            out.append((event.message, payload))
    return out


def _recv_all(peer: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        data += peer.recv(size - len(data))
    return bytes(data)


def _recv_to_eof(peer: socket.socket) -> bytes:
    data = bytearray()
    while chunk := peer.recv(1 << 20):
        data += chunk
    return bytes(data)


async def test_a_batch_of_main_channel_records_is_one_write_in_order() -> None:
    main, counting, peer = _main_channel()
    records = [m for i in range(64) for m in (SectionEnd(i), VfioRecord(
        VfioMigFlag.END_OF_STATE), SectionFooter(i))]
    async with main.batch():
        for record in records:
            await main.send(record)
        assert counting.writes == 0 and main.stats.bytes == 0
    assert counting.writes == 1 and main.stats.packets == len(records)
    got = _decode(_recv_all(peer, main.stats.bytes))
    assert [m for m, _ in got] == records
    await main.send(SectionEnd(99))          # after the batch: written at once again
    assert counting.writes == 2
    peer.close()


async def test_a_batch_is_written_once_it_holds_enough_bytes() -> None:
    main, counting, peer = _main_channel()
    payload = bytes(range(256)) * (channels.BATCH_FLUSH_BYTES // 256)
    reader = asyncio.get_running_loop().run_in_executor(None, _recv_to_eof, peer)
    try:
        async with main.batch():
            await main.send(SectionEnd(1))
            await main.send(VfioRecord(VfioMigFlag.DEV_DATA_STATE, len(payload)), payload)
            flushed = main.stats.bytes     # the streamed data does not wait for the end
            await main.send(VfioRecord(VfioMigFlag.DEV_DATA_STATE, len(payload)), payload)
            await main.send(SectionFooter(1))
    finally:
        counting.sock.close()
    assert len(payload) < flushed < main.stats.bytes
    data = await asyncio.wait_for(reader, 10)
    assert len(data) == main.stats.bytes
    assert [p for _, p in _decode(data)] == [None, payload, payload, None]
    peer.close()


async def test_a_batch_left_by_an_error_is_dropped_and_batches_do_not_nest() -> None:
    main, counting, peer = _main_channel()
    with pytest.raises(ValueError):
        async with main.batch():
            await main.send(SectionEnd(1))
            raise ValueError("the migration failed")
    assert counting.writes == 0 and main.stats.bytes == 0
    with pytest.raises(RuntimeError, match="do not nest"):
        async with main.batch():
            async with main.batch():
                pass
    peer.close()
