"""migrate_dst.load: a device-state packet that arrived in a pooled buffer gives it back
exactly once, whether it is queued, loaded on arrival, refused or fails to load."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from migrate_common.funnel import Funnel
from migrate_dst.channels import BufferPool
from migrate_dst.load import VfioLoadHandler
from protocol.errors import LimitExceededError, SequenceError
from protocol.vfio import VfioStatePacketHeader
from vm.properties import KiB, MiB, DeviceConfig
from vm.vfio_sim import VfioSimDevice


async def handler_for(packet_size: int = MiB, **config: Any) -> VfioLoadHandler:
    device = VfioSimDevice(DeviceConfig(id="d", state_size=64 * KiB, **config),
                           role="destination")
    handler = VfioLoadHandler(device, multifd_transfer=True, load_config_after_iter=False,
                              switchover_ack=False, funnel=Funnel(),
                              log=structlog.get_logger(), on_ack=lambda: None,
                              packet_size=packet_size)
    await handler.load_setup()
    assert handler.reassembly is not None
    handler.reassembly.start(0)  # SWITCHOVER_START, without the load task
    return handler


def packet(pool: BufferPool, idx: int, size: int = 4096) -> bytearray:
    buf = pool.take(12 + size)
    buf[:12] = VfioStatePacketHeader(idx, 0).encode()
    return buf


def free(pool: BufferPool, buf: bytearray) -> int:
    return sum(b is buf for b in pool._free.get(len(buf), []))


async def test_a_packet_loaded_on_arrival_gives_its_buffer_back_once() -> None:
    handler = await handler_for()
    pool = BufferPool()
    buf = packet(pool, 0)
    handler.load_state_buffer(memoryview(buf), lambda: pool.give(buf))
    assert handler.bytes_loaded == 4096 and free(pool, buf) == 1
    handler.load_cleanup()


@pytest.mark.parametrize("announced", [8 * KiB, 16 * KiB])
async def test_a_buffered_packet_is_bounded_by_the_announced_packet_size(announced) -> None:
    # x-device-state-packet-size from the source's hello, not QEMU's 1 MiB
    handler = await handler_for(packet_size=announced)
    pool = BufferPool()
    buf = packet(pool, 0, size=16 * KiB)
    if announced < 16 * KiB:
        with pytest.raises(LimitExceededError, match="16384 bytes of data exceed the limit "
                                                     "of 8192"):
            handler.load_state_buffer(memoryview(buf), lambda: pool.give(buf))
    else:
        handler.load_state_buffer(memoryview(buf), lambda: pool.give(buf))
        assert handler.bytes_loaded == 16 * KiB
    assert free(pool, buf) == 1
    handler.load_cleanup()


async def test_a_refused_packet_gives_its_buffer_back_once() -> None:
    handler = await handler_for()
    pool = BufferPool()
    first = packet(pool, 1)
    handler.load_state_buffer(memoryview(first), lambda: pool.give(first))  # queued
    dup = packet(pool, 1)
    with pytest.raises(SequenceError, match="twice"):
        handler.load_state_buffer(memoryview(dup), lambda: pool.give(dup))
    assert free(pool, dup) == 1 and free(pool, first) == 0
    handler.load_cleanup()


async def test_a_packet_that_fails_to_load_gives_its_buffer_back_once(monkeypatch) -> None:
    handler = await handler_for()
    pool = BufferPool()

    def broken(offset: int, size: int, data: object = None) -> float:
        raise RuntimeError("device write failed")

    monkeypatch.setattr(handler.device, "commit", broken)
    buf = packet(pool, 0)
    with pytest.raises(RuntimeError, match="device write failed"):
        handler.load_state_buffer(memoryview(buf), lambda: pool.give(buf))
    assert free(pool, buf) == 1          # not twice: two later takes would share it
    assert pool.take(len(buf)) is not pool.take(len(buf))
    handler.load_cleanup()


def test_the_pool_keeps_a_bounded_number_of_bytes() -> None:
    # compressed RAM payloads each have a size of their own: kept by size alone, every
    # one of them would stay for the daemon's life
    pool = BufferPool(keep=16, max_bytes=1 << 20)
    bufs = [pool.take(4096 + i) for i in range(1000)]
    for buf in bufs:
        pool.give(buf)
    assert pool.kept_bytes <= 1 << 20
    assert pool.kept_bytes == sum(len(b) for free in pool._free.values() for b in free)
    kept = pool.take(4096)
    assert kept is bufs[0] and pool.kept_bytes <= (1 << 20) - 4096
    assert 4096 not in pool._free  # an emptied list goes, sizes do not pile up


def test_the_pool_keeps_at_most_keep_of_a_size() -> None:
    pool = BufferPool(keep=2)
    bufs = [pool.take(100) for _ in range(5)]
    assert pool.allocated == 5
    for buf in bufs:
        pool.give(buf)
    assert len(pool._free[100]) == 2 and pool.kept_bytes == 200
    assert pool.take(100) is bufs[1] and pool.take(100) is bufs[0]
    fresh = pool.take(100)
    assert all(fresh is not b for b in bufs) and pool.allocated == 6
    pool.give(bufs[2])
    pool.clear()
    assert pool.kept_bytes == 0 and not pool._free
