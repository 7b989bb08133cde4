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
from protocol.multifd import RamPacket, ram_page_count
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
