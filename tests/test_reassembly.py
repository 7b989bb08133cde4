"""Reassembly: order, duplicates, the config packet, and every bound."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate_dst.reassembly import Reassembly
from protocol.errors import LimitExceededError, SequenceError


def make(max_count=None, max_bytes=None, capacity=1 << 30) -> tuple[Reassembly, list[int]]:
    released: list[int] = []
    return Reassembly("d", max_count=max_count, max_bytes=max_bytes,
                      capacity=capacity), released


def put(r: Reassembly, released: list[int], idx: int, size: int = 10,
        config: bool = False) -> None:
    r.put(idx, config, memoryview(bytes([idx % 256]) * size), lambda: released.append(idx))


async def drain(r: Reassembly) -> list[int]:
    order = []
    while True:
        buf = await r.get()
        order.append(buf.idx)
        r.done_with(buf)
        if buf.is_config:
            return order


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_any_arrival_order_comes_out_in_idx_order(n, seed):
    async def body() -> None:
        r, released = make()
        order = list(range(n + 1))
        random.Random(seed).shuffle(order)
        getter = asyncio.ensure_future(drain(r))
        for idx in order:
            put(r, released, idx, config=(idx == n))
            await asyncio.sleep(0)
        assert await getter == list(range(n + 1))
        assert sorted(released) == list(range(n + 1))
        assert r.queued_bytes == 0
    asyncio.run(body())


@pytest.mark.parametrize("script,error", [
    ([(0, False), (0, False)], "received twice"),
    ([(2, True), (3, False)], "after the config packet"),
    ([(2, True), (1, True)], "second config packet"),
    ([(5, False), (2, True)], "is not the last"),
])
def test_sequence_errors(script, error):
    r, released = make()
    with pytest.raises(SequenceError, match=error):
        for idx, config in script:
            put(r, released, idx, config=config)


async def test_already_loaded_idx_is_a_duplicate():
    r, released = make()
    put(r, released, 0)
    buf = await r.get()
    r.done_with(buf)
    with pytest.raises(SequenceError, match="already loaded"):
        put(r, released, 0)


def test_count_cap():
    r, released = make(max_count=3)
    for idx in (1, 2, 3):
        put(r, released, idx)
    with pytest.raises(LimitExceededError, match="x-migration-max-queued-buffers=3") as exc:
        put(r, released, 4)
    assert exc.value.limit == 3 and exc.value.value == 4


def test_byte_cap_counts_queued_not_loaded_bytes():
    async def body() -> None:
        r, released = make(max_bytes=25)
        put(r, released, 0, size=10)
        put(r, released, 1, size=10)
        with pytest.raises(LimitExceededError, match="x-migration-max-queued-buffers-size=25"):
            put(r, released, 2, size=10)
        buf = await r.get()          # idx 0 is written: its bytes leave the queue
        r.done_with(buf)
        put(r, released, 2, size=10)
        assert r.queued_bytes == 20
        assert r.high_water_bytes == 20
    asyncio.run(body())


def test_capacity_bounds_memory_without_caps():
    r, released = make(capacity=100)
    for idx in range(5):
        put(r, released, idx + 1000, size=20)
    with pytest.raises(LimitExceededError, match="more than the device's 100 bytes"):
        put(r, released, 2000, size=1)


def test_huge_idx_gap_costs_nothing():
    r, released = make()
    put(r, released, 0xFFFFFFFE, size=1)
    assert r.queued_count == 1


def test_clear_releases_everything():
    r, released = make()
    for idx in (3, 5, 7):
        put(r, released, idx)
    r.clear()
    assert sorted(released) == [3, 5, 7]
    assert r.queued_bytes == 0
