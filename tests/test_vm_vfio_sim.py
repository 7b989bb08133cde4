"""Tests for vm.vfio_sim: the VFIO uAPI v2 state machine and the simulated device's data."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import xxhash

from protocol.errors import ConfigError, DeviceError, StateError
from vm.properties import KiB, MiB, DeviceConfig
from vm.vfio_sim import (
    ALL_FEATURES,
    DIRECT_ARCS,
    MAX_DATA_BUFFER_SIZE,
    PAGE_SIZE,
    DeviceState,
    MigrationFeature,
    VfioSimDevice,
    generate_config_blob,
    generate_stream,
    transition_path,
)

S = DeviceState
F = MigrationFeature


class FakeTime:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make(
    role: str = "source", *, fake: FakeTime | None = None, **fields: object
) -> VfioSimDevice:
    fields.setdefault("state_size", 64 * KiB)
    config = DeviceConfig(id=str(fields.pop("id", "dev0")), **fields)  # type: ignore[arg-type]
    fake = fake or FakeTime()
    return VfioSimDevice(config, role=role, clock=fake.clock, sleep=fake.sleep)  # type: ignore[arg-type]


async def read_all(dev: VfioSimDevice, size: int | None = None) -> list[bytes]:
    chunks: list[bytes] = []
    while True:
        chunk = await dev.read(size or dev.data_buffer_size)
        if not chunk:
            return chunks
        chunks.append(bytes(chunk))


async def resume(dst: VfioSimDevice, chunks: list[bytes], config: bytes) -> None:
    await dst.set_state(S.RESUMING)
    for chunk in chunks:
        await dst.write(chunk)
    dst.load_config(config)
    await dst.set_state(S.RUNNING)


# -- the state machine -------------------------------------------------------------------

# The kernel's next-step table (drivers/vfio/vfio_main.c, vfio_mig_get_next_state),
# used as the oracle: row = current state, column = target, value = next step.
_R, _RP, _ST, _SC, _RS, _PC, _PP, _E = (
    S.RUNNING, S.RUNNING_P2P, S.STOP, S.STOP_COPY, S.RESUMING, S.PRE_COPY, S.PRE_COPY_P2P, S.ERROR,
)
KERNEL_NEXT: dict[S, dict[S, S]] = {
    _ST: {_ST: _ST, _R: _RP, _PC: _RP, _PP: _RP, _SC: _SC, _RS: _RS, _RP: _RP, _E: _E},
    _R: {_ST: _RP, _R: _R, _PC: _PC, _PP: _RP, _SC: _RP, _RS: _RP, _RP: _RP, _E: _E},
    _PC: {_ST: _R, _R: _R, _PC: _PC, _PP: _PP, _SC: _PP, _RS: _R, _RP: _R, _E: _E},
    _PP: {_ST: _RP, _R: _RP, _PC: _PC, _PP: _PP, _SC: _SC, _RS: _RP, _RP: _RP, _E: _E},
    _SC: {_ST: _ST, _R: _ST, _PC: _E, _PP: _E, _SC: _SC, _RS: _ST, _RP: _ST, _E: _E},
    _RS: {_ST: _ST, _R: _ST, _PC: _ST, _PP: _ST, _SC: _ST, _RS: _RS, _RP: _ST, _E: _E},
    _RP: {_ST: _ST, _R: _R, _PC: _R, _PP: _PP, _SC: _ST, _RS: _ST, _RP: _RP, _E: _E},
    _E: {s: _E for s in S},
}
KERNEL_FLAGS: dict[S, int] = {
    _ST: F.STOP_COPY, _R: F.STOP_COPY, _SC: F.STOP_COPY, _RS: F.STOP_COPY,
    _RP: F.STOP_COPY | F.P2P, _PC: F.STOP_COPY | F.PRE_COPY, _PP: ALL_FEATURES, _E: ~0,
}


def kernel_path(cur: S, new: S, features: MigrationFeature) -> list[S] | None:
    """Run the kernel's algorithm step by step; None where it returns -EINVAL."""

    def ok(state: S) -> bool:
        return KERNEL_FLAGS[state] & features == KERNEL_FLAGS[state]

    if cur == new:  # drivers loop "while (new != cur)": a same-state request is a no-op
        return []
    if not ok(cur) or not ok(new):
        return None
    path: list[S] = []
    while cur != new:
        nxt = KERNEL_NEXT[cur][new]
        # (the kernel loops on the flags alone; ERROR's flags are ~0, so stop there
        # explicitly -- only reachable with PRE_COPY but no P2P, STOP_COPY -> PRE_COPY)
        while nxt is not S.ERROR and not ok(nxt):
            nxt = KERNEL_NEXT[nxt][new]
        if nxt is S.ERROR:
            return None
        path.append(nxt)
        cur = nxt
    return path


FEATURE_SETS = [
    F.STOP_COPY,
    F.STOP_COPY | F.P2P,
    F.STOP_COPY | F.PRE_COPY,
    ALL_FEATURES,
]


def test_state_and_feature_values_are_the_kernels() -> None:
    assert [(s.name, int(s)) for s in S] == [
        ("ERROR", 0), ("STOP", 1), ("RUNNING", 2), ("STOP_COPY", 3),
        ("RESUMING", 4), ("RUNNING_P2P", 5), ("PRE_COPY", 6), ("PRE_COPY_P2P", 7),
    ]
    assert (int(F.STOP_COPY), int(F.P2P), int(F.PRE_COPY)) == (1, 2, 4)


def test_direct_arcs_are_exactly_the_uapi_list() -> None:
    assert DIRECT_ARCS == {
        (_RP, _ST), (_SC, _ST), (_RS, _ST),
        (_PC, _R), (_RP, _R),
        (_PP, _RP), (_R, _RP), (_ST, _RP),
        (_R, _PC), (_RP, _PP), (_ST, _SC),
        (_PC, _PP), (_PP, _PC), (_PP, _SC),
        (_ST, _RS),
    }


@pytest.mark.parametrize("features", FEATURE_SETS, ids=lambda f: str(int(f)))
def test_transition_path_matches_the_kernel_for_every_pair(features: MigrationFeature) -> None:
    for cur, new in itertools.product(S, S):
        expected = kernel_path(cur, new, features)
        if expected is None:
            with pytest.raises(DeviceError, match=f"illegal arc {cur.name} -> {new.name}"):
                transition_path(cur, new, features)
        else:
            assert transition_path(cur, new, features) == expected, (cur, new)


def test_full_feature_paths_use_only_direct_arcs() -> None:
    for cur, new in itertools.product(S, S):
        try:
            path = transition_path(cur, new)
        except DeviceError:
            continue
        for a, b in itertools.pairwise([cur, *path]):
            assert (a, b) in DIRECT_ARCS


@pytest.mark.parametrize(
    ("cur", "new", "features", "expected"),
    [
        (_R, _PC, ALL_FEATURES, [_PC]),
        (_PC, _SC, ALL_FEATURES, [_PP, _SC]),  # stays inside one save session
        (_R, _SC, ALL_FEATURES, [_RP, _ST, _SC]),  # never enters pre-copy on the way
        (_R, _RS, ALL_FEATURES, [_RP, _ST, _RS]),
        (_RS, _R, ALL_FEATURES, [_ST, _RP, _R]),
        (_PC, _RP, ALL_FEATURES, [_R, _RP]),  # not via PRE_COPY_P2P
        (_SC, _R, ALL_FEATURES, [_ST, _RP, _R]),
        (_R, _ST, F.STOP_COPY, [_ST]),  # without P2P the driver sees RUNNING -> STOP
        (_PC, _SC, F.STOP_COPY | F.PRE_COPY, [_SC]),
        (_R, _R, ALL_FEATURES, []),
    ],
)
def test_transition_path_examples(
    cur: S, new: S, features: MigrationFeature, expected: list[S]
) -> None:
    assert transition_path(cur, new, features) == expected


@pytest.mark.parametrize(
    ("cur", "new", "features"),
    [
        (_SC, _PC, ALL_FEATURES),
        (_SC, _PP, ALL_FEATURES),
        (_R, _E, ALL_FEATURES),
        (_E, _R, ALL_FEATURES),
        (_E, _ST, ALL_FEATURES),
        (_R, _PC, F.STOP_COPY | F.P2P),
        (_R, _RP, F.STOP_COPY | F.PRE_COPY),
        (_R, _PP, F.STOP_COPY | F.PRE_COPY),
    ],
)
def test_transition_path_illegal(cur: S, new: S, features: MigrationFeature) -> None:
    with pytest.raises(DeviceError, match=f"illegal arc {cur.name} -> {new.name}"):
        transition_path(cur, new, features)


# -- driving a device --------------------------------------------------------------------


async def test_initial_state_and_identity() -> None:
    dev = make(id="gpu0", precopy_size=4 * KiB)
    assert dev.id == "gpu0"
    assert dev.idstr == "gpu0/vfio"
    assert (dev.instance_id, dev.version_id) == (0, 1)
    assert dev.state is S.RUNNING
    assert dev.history == [S.RUNNING]
    assert dev.features == ALL_FEATURES
    assert make(precopy_size=0).features == F.STOP_COPY | F.P2P


def test_bad_role() -> None:
    with pytest.raises(ConfigError, match="role"):
        make("sideways")


async def test_qemu_source_sequence_with_precopy() -> None:
    dev = make(precopy_size=8 * KiB)
    for target in (S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY, S.STOP):
        await dev.set_state(target)
    assert dev.history == [S.RUNNING, S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY, S.STOP]


async def test_qemu_source_sequence_without_precopy() -> None:
    dev = make()
    for target in (S.RUNNING_P2P, S.STOP, S.STOP_COPY, S.STOP):
        await dev.set_state(target)
    assert dev.history == [S.RUNNING, S.RUNNING_P2P, S.STOP, S.STOP_COPY, S.STOP]


async def test_combination_request_records_every_arc() -> None:
    dev = make()
    await dev.set_state(S.STOP_COPY)
    assert dev.history == [S.RUNNING, S.RUNNING_P2P, S.STOP, S.STOP_COPY]


async def test_qemu_destination_sequence() -> None:
    src, dst = make(), make("destination")
    await src.set_state(S.STOP_COPY)
    chunks = await read_all(src)
    await dst.set_state(S.RESUMING)  # load_setup: a combination arc via STOP
    assert dst.history == [S.RUNNING, S.RUNNING_P2P, S.STOP, S.RESUMING]
    for chunk in chunks:
        await dst.write(chunk)
    dst.load_config(src.config_blob())
    await dst.set_state(S.RUNNING)  # VM start: via STOP and RUNNING_P2P
    assert dst.history == [
        S.RUNNING, S.RUNNING_P2P, S.STOP, S.RESUMING, S.STOP, S.RUNNING_P2P, S.RUNNING,
    ]


async def _reach(dev: VfioSimDevice, state: S) -> None:
    """Put ``dev`` into ``state`` (a destination reaching STOP from RESUMING gets valid data)."""
    await dev.set_state(state)


@pytest.mark.parametrize("arc", sorted(DIRECT_ARCS), ids=lambda a: f"{a[0].name}->{a[1].name}")
async def test_every_direct_arc_is_accepted(arc: tuple[S, S]) -> None:
    src_state, dst_state = arc
    role = "destination" if S.RESUMING in arc else "source"
    dev = make(role, state_size=8 * KiB, precopy_size=4 * KiB)
    await dev.set_state(src_state)
    if src_state is S.RESUMING:
        await dev.write(bytes(dev.total_size))
        dev.load_config(bytes(dev.config.config_size))
    before = list(dev.history)
    await dev.set_state(dst_state)
    assert dev.history == [*before, dst_state]
    assert dev.state is dst_state


@pytest.mark.parametrize(
    ("start", "target", "precopy"),
    [
        (S.STOP_COPY, S.PRE_COPY, True),
        (S.STOP_COPY, S.PRE_COPY_P2P, True),
        (S.RUNNING, S.ERROR, True),
        (S.STOP, S.ERROR, False),
        (S.RUNNING, S.PRE_COPY, False),  # no PRE_COPY support without initial bytes
        (S.STOP, S.PRE_COPY_P2P, False),
    ],
)
async def test_illegal_requests_are_rejected(start: S, target: S, precopy: bool) -> None:
    dev = make(precopy_size=4 * KiB if precopy else 0)
    await dev.set_state(start)
    before = list(dev.history)
    with pytest.raises(DeviceError, match=f"device dev0: illegal arc {start.name} -> {target.name}"):
        await dev.set_state(target)
    assert dev.state is start
    assert dev.history == before


async def test_error_state_needs_reset() -> None:
    dev = make("destination")
    await dev.set_state(S.RESUMING)
    with pytest.raises(DeviceError):
        await dev.set_state(S.STOP)  # nothing was written
    assert (dev.state, dev.history[-1]) == (S.ERROR, S.ERROR)
    with pytest.raises(DeviceError, match="illegal arc ERROR -> RUNNING"):
        await dev.set_state(S.RUNNING)
    dev.reset()
    assert dev.state is S.RUNNING
    assert dev.history[-3:] == [S.RESUMING, S.ERROR, S.RUNNING]


async def test_same_state_is_a_no_op() -> None:
    dev = make()
    await dev.set_state(S.RUNNING)
    assert dev.history == [S.RUNNING]


async def test_on_transition_sees_every_arc() -> None:
    seen: list[tuple[str, S, S]] = []
    fake = FakeTime()
    dev = VfioSimDevice(
        DeviceConfig(id="cb", state_size=4 * KiB),
        role="source",
        clock=fake.clock,
        sleep=fake.sleep,
        on_transition=lambda d, old, new: seen.append((d.id, old, new)),
    )
    await dev.set_state(S.STOP_COPY)
    dev.reset()
    assert seen == [
        ("cb", S.RUNNING, S.RUNNING_P2P),
        ("cb", S.RUNNING_P2P, S.STOP),
        ("cb", S.STOP, S.STOP_COPY),
        ("cb", S.STOP_COPY, S.RUNNING),
    ]


async def test_stop_copy_latency_is_awaited_on_the_injected_sleep() -> None:
    fake = FakeTime()
    dev = make(fake=fake, stop_copy_latency=0.05, precopy_size=4 * KiB)
    await dev.set_state(S.PRE_COPY)
    await dev.set_state(S.PRE_COPY_P2P)
    assert fake.sleeps == []
    await dev.set_state(S.STOP_COPY)
    assert fake.sleeps == [0.05]
    await dev.set_state(S.STOP)
    assert fake.sleeps == [0.05]


async def test_cancelled_during_latency_leaves_state_unchanged() -> None:
    blocked = asyncio.Event()

    async def slow_sleep(seconds: float) -> None:
        blocked.set()
        await asyncio.Event().wait()  # forever

    dev = VfioSimDevice(
        DeviceConfig(id="x", state_size=4 * KiB, stop_copy_latency=1),
        role="source",
        sleep=slow_sleep,
    )
    await dev.set_state(S.STOP)
    task = asyncio.create_task(dev.set_state(S.STOP_COPY))
    await blocked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert dev.state is S.STOP
    assert not dev.save_session_open
    await dev.set_state(S.RUNNING)  # the lock was released


async def test_reset_during_latency_abandons_the_transition() -> None:
    release = asyncio.Event()

    async def gated_sleep(seconds: float) -> None:
        await release.wait()

    dev = VfioSimDevice(
        DeviceConfig(id="x", state_size=4 * KiB, stop_copy_latency=1),
        role="source",
        sleep=gated_sleep,
    )
    await dev.set_state(S.STOP)
    task = asyncio.create_task(dev.set_state(S.STOP_COPY))
    await asyncio.sleep(0)
    dev.reset()
    release.set()
    with pytest.raises(DeviceError, match="state changed to RUNNING while entering STOP_COPY"):
        await task
    assert dev.state is S.RUNNING


# -- save side ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state_size", "precopy_size", "expected"),
    [
        (0, 0, 1),
        (1000, 0, 1000),
        (MiB, 0, MiB),
        (3 * MiB, 0, MiB),
        (MiB - 10, 10, MiB),
        (100, 200, 300),
    ],
)
def test_data_buffer_size(state_size: int, precopy_size: int, expected: int) -> None:
    dev = make(state_size=state_size, precopy_size=precopy_size)
    assert dev.data_buffer_size == expected
    assert MAX_DATA_BUFFER_SIZE == MiB


async def test_stop_copy_read_chunking() -> None:
    size = 2 * MiB + 512 * KiB
    dev = make(state_size=size)
    assert dev.stop_copy_size() == size
    await dev.set_state(S.STOP_COPY)
    sizes = []
    while True:
        chunk = await dev.read(dev.data_buffer_size)
        if not chunk:
            break
        sizes.append(len(chunk))
        assert dev.stop_copy_size() == size - sum(sizes)
    assert sizes == [MiB, MiB, 512 * KiB]
    assert len(await dev.read(MiB)) == 0  # end of data stays the end
    assert dev.bytes_read == size


async def test_read_is_a_read_only_zero_copy_view_of_the_stream() -> None:
    dev = make(state_size=3 * PAGE_SIZE + 100, seed=99)
    await dev.set_state(S.STOP_COPY)
    chunk = await dev.read(1 << 30)
    assert isinstance(chunk, memoryview) and chunk.readonly
    assert bytes(chunk) == bytes(generate_stream(3 * PAGE_SIZE + 100, 99))
    with pytest.raises(TypeError):
        chunk[0] = 1


async def test_small_reads() -> None:
    dev = make(state_size=10_000)
    await dev.set_state(S.STOP_COPY)
    chunks = await read_all(dev, 3000)
    assert [len(c) for c in chunks] == [3000, 3000, 3000, 1000]


async def test_precopy_then_stop_copy_gives_the_whole_stream() -> None:
    dev = make(state_size=700 * KiB, precopy_size=300 * KiB)
    assert dev.precopy_info() == (300 * KiB, 0)
    await dev.set_state(S.PRE_COPY)
    pre = await read_all(dev, 128 * KiB)
    assert [len(c) for c in pre] == [128 * KiB, 128 * KiB, 44 * KiB]
    assert dev.precopy_info() == (0, 0)
    assert len(await dev.read(MiB)) == 0  # ENOMSG: initial bytes exhausted
    assert dev.stop_copy_size() == 700 * KiB
    await dev.set_state(S.STOP_COPY)  # PRE_COPY -> PRE_COPY_P2P -> STOP_COPY: same session
    assert dev.history[-2:] == [S.PRE_COPY_P2P, S.STOP_COPY]
    rest = await read_all(dev)
    assert sum(map(len, rest)) == 700 * KiB
    whole = b"".join(pre + rest)
    assert whole == bytes(generate_stream(dev.total_size, dev.config.seed))
    await dev.set_state(S.STOP)
    assert not dev.save_session_open


async def test_precopy_read_in_p2p_state_and_partial_precopy() -> None:
    dev = make(state_size=8 * KiB, precopy_size=8 * KiB)
    await dev.set_state(S.PRE_COPY)
    first = await dev.read(3 * KiB)
    assert dev.precopy_info() == (5 * KiB, 0)
    await dev.set_state(S.PRE_COPY_P2P)
    second = await dev.read(MiB)
    assert len(second) == 5 * KiB
    await dev.set_state(S.STOP_COPY)
    rest = await read_all(dev)
    assert bytes(first) + bytes(second) + b"".join(rest) == bytes(
        generate_stream(16 * KiB, dev.config.seed)
    )


async def test_stop_copy_straight_from_stop_reads_everything() -> None:
    dev = make(state_size=8 * KiB, precopy_size=8 * KiB)
    await dev.set_state(S.STOP_COPY)  # no pre-copy phase at all
    assert b"".join(await read_all(dev)) == bytes(generate_stream(16 * KiB, dev.config.seed))


async def test_a_new_save_session_starts_from_the_beginning() -> None:
    dev = make(state_size=8 * KiB, precopy_size=8 * KiB)
    await dev.set_state(S.PRE_COPY)
    await dev.read(4 * KiB)
    await dev.set_state(S.RUNNING)  # migration cancelled
    assert dev.precopy_info() == (8 * KiB, 0)
    assert dev.stop_copy_size() == 16 * KiB
    await dev.set_state(S.PRE_COPY)
    again = await dev.read(4 * KiB)
    assert bytes(again) == bytes(generate_stream(4 * KiB, dev.config.seed))


@pytest.mark.parametrize("state", [S.RUNNING, S.STOP, S.RUNNING_P2P])
async def test_read_in_wrong_state(state: S) -> None:
    dev = make(precopy_size=4 * KiB)
    await dev.set_state(state)
    with pytest.raises(DeviceError, match=f"device dev0: read\\(\\) in state {state.name}"):
        await dev.read(100)


async def test_read_size_must_be_positive() -> None:
    dev = make()
    await dev.set_state(S.STOP_COPY)
    with pytest.raises(DeviceError, match="must be positive"):
        await dev.read(0)


async def test_role_checks() -> None:
    dst = make("destination")
    await dst.set_state(S.STOP_COPY)
    with pytest.raises(DeviceError, match="not available on a destination device"):
        await dst.read(10)
    src = make()
    await src.set_state(S.RESUMING)
    with pytest.raises(DeviceError, match="not available on a source device"):
        await src.write(b"x")
    with pytest.raises(DeviceError, match="not available on a source device"):
        src.load_config(b"x")


def test_config_blob_is_deterministic() -> None:
    a, b = make(config_size=100, seed=1), make("destination", config_size=100, seed=1)
    assert a.config_blob() == b.config_blob() == generate_config_blob(100, 1)
    assert len(a.config_blob()) == 100
    assert make(config_size=100, seed=2).config_blob() != a.config_blob()


# -- content -----------------------------------------------------------------------------


def test_generated_stream_is_deterministic_and_every_page_distinct() -> None:
    size = 3 * MiB  # > one 1 MiB tile, so tiles repeat underneath the stamps
    a = bytes(generate_stream(size, 5))
    assert a == bytes(generate_stream(size, 5))
    assert a != bytes(generate_stream(size, 6))
    pages = [a[i : i + PAGE_SIZE] for i in range(0, size, PAGE_SIZE)]
    assert len(set(pages)) == len(pages)
    assert int.from_bytes(pages[300][:8], "little") == 300
    assert int.from_bytes(pages[300][8:16], "little") == 5


@pytest.mark.parametrize("size", [0, 1, 15, 4095, 4097, MiB + 1])
def test_generated_stream_odd_sizes(size: int) -> None:
    view = generate_stream(size, 3)
    assert len(view) == size
    assert bytes(generate_stream(MiB + PAGE_SIZE, 3))[:size] == bytes(view)


# -- load side and digests ---------------------------------------------------------------


async def test_copy_source_to_destination_gives_equal_digests() -> None:
    src = make(state_size=2 * MiB + 300, precopy_size=100 * KiB, seed=11)
    dst = make("destination", state_size=2 * MiB + 300, precopy_size=100 * KiB, seed=11)
    await src.set_state(S.PRE_COPY)
    pre = await read_all(src)
    await src.set_state(S.STOP_COPY)
    chunks = pre + await read_all(src)
    await resume(dst, chunks, src.config_blob())
    assert dst.state is S.RUNNING
    assert dst.bytes_written == src.total_size
    assert dst.digest() == src.digest() == await src.digest_async() == await dst.digest_async()
    expected = xxhash.xxh3_128(bytes(generate_stream(src.total_size, 11)) + src.config_blob())
    assert src.digest() == expected.hexdigest()
    assert dst.config_blob() == src.config_blob()


async def test_digest_async_on_a_fresh_source() -> None:
    src = make(state_size=10 * MiB)  # above the offload threshold: hashed in a thread
    assert await src.digest_async() == src.digest()


async def test_swapped_chunks_change_the_digest() -> None:
    src, dst = make(state_size=4 * MiB), make("destination", state_size=4 * MiB)
    await src.set_state(S.STOP_COPY)
    chunks = await read_all(src)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    await resume(dst, chunks, src.config_blob())  # the size is right, so the device accepts it
    assert dst.digest() != src.digest()


async def test_duplicated_chunk_changes_the_digest() -> None:
    src, dst = make(state_size=3 * MiB), make("destination", state_size=3 * MiB)
    await src.set_state(S.STOP_COPY)
    chunks = await read_all(src)
    chunks[2] = chunks[1]
    await resume(dst, chunks, src.config_blob())
    assert dst.digest() != src.digest()


async def test_wrong_config_changes_the_digest() -> None:
    src, dst = make(config_size=64), make("destination", config_size=64)
    await src.set_state(S.STOP_COPY)
    await resume(dst, await read_all(src), bytes(64))
    assert dst.digest() != src.digest()


async def test_missing_chunk_fails_validation() -> None:
    src, dst = make(state_size=3 * MiB), make("destination", state_size=3 * MiB)
    await src.set_state(S.STOP_COPY)
    chunks = await read_all(src)
    del chunks[1]
    with pytest.raises(DeviceError) as info:
        await resume(dst, chunks, src.config_blob())
    assert "device dev0: resume data rejected" in str(info.value)
    assert f"received {2 * MiB} of {3 * MiB} bytes" in str(info.value)
    assert dst.state is S.ERROR
    assert dst.history[-2:] == [S.RESUMING, S.ERROR]
    with pytest.raises(StateError, match="no completed resume session"):
        dst.digest()


async def test_missing_config_fails_validation() -> None:
    dst = make("destination", state_size=4 * KiB)
    await dst.set_state(S.RESUMING)
    await dst.write(bytes(4 * KiB))
    with pytest.raises(DeviceError, match="the config space was never loaded"):
        await dst.set_state(S.STOP)
    assert dst.state is S.ERROR


async def test_overrun() -> None:
    dst = make("destination", state_size=4 * KiB)
    await dst.set_state(S.RESUMING)
    await dst.write(bytes(3 * KiB))
    with pytest.raises(DeviceError, match="device dev0: resume data overrun"):
        await dst.write(bytes(2 * KiB))
    assert dst.write_offset == 3 * KiB  # nothing of the rejected write landed
    await dst.write(bytes(KiB))  # the exact remainder still fits
    with pytest.raises(DeviceError, match="resume data overrun"):
        await dst.write(b"x")


async def test_write_accepts_any_buffer() -> None:
    src, dst = make(state_size=8 * KiB), make("destination", state_size=8 * KiB)
    await src.set_state(S.STOP_COPY)
    data = bytes(b"".join(await read_all(src)))
    await dst.set_state(S.RESUMING)
    await dst.write(bytearray(data[:1000]))
    await dst.write(memoryview(data)[1000:5000])
    await dst.write(memoryview(data[5000:]).cast("I"))  # a non-byte format still counts bytes
    await dst.write(b"")
    dst.load_config(memoryview(src.config_blob()))
    await dst.set_state(S.STOP)
    assert dst.digest() == src.digest()


@pytest.mark.parametrize("state", [S.RUNNING, S.STOP, S.STOP_COPY])
async def test_write_and_load_config_in_wrong_state(state: S) -> None:
    dst = make("destination")
    await dst.set_state(state)
    with pytest.raises(DeviceError, match=f"write\\(\\) in state {state.name}"):
        await dst.write(b"abc")
    with pytest.raises(DeviceError, match=f"load_config\\(\\) in state {state.name}"):
        dst.load_config(bytes(4096))


async def test_load_config_size_and_twice() -> None:
    dst = make("destination", config_size=64)
    await dst.set_state(S.RESUMING)
    with pytest.raises(DeviceError, match="config blob is 63 bytes, expected config-size 64"):
        dst.load_config(bytes(63))
    dst.load_config(bytes(64))
    with pytest.raises(DeviceError, match="config space loaded twice"):
        dst.load_config(bytes(64))


async def test_destination_digest_needs_a_completed_session() -> None:
    dst = make("destination")
    with pytest.raises(StateError):
        dst.digest()
    await dst.set_state(S.RESUMING)
    with pytest.raises(StateError):
        dst.digest()


async def test_second_resume_session_starts_fresh() -> None:
    src, dst = make(state_size=8 * KiB), make("destination", state_size=8 * KiB)
    await src.set_state(S.STOP_COPY)
    chunks = await read_all(src)
    await dst.set_state(S.RESUMING)
    await dst.write(chunks[0][:100])
    dst.reset()  # abandoned migration
    assert not dst.resume_session_open
    await resume(dst, chunks, src.config_blob())
    assert dst.digest() == src.digest()
    assert dst.bytes_written == 100 + 8 * KiB  # cumulative counter


# -- pacing ------------------------------------------------------------------------------


async def test_read_bandwidth_pacing() -> None:
    fake = FakeTime()
    dev = make(fake=fake, state_size=4 * MiB, read_bandwidth=MiB)
    await dev.set_state(S.STOP_COPY)
    start = fake.now
    chunks = await read_all(dev, 256 * KiB)
    assert sum(map(len, chunks)) == 4 * MiB
    assert sum(fake.sleeps) == pytest.approx(4.0)  # 4 MiB at 1 MiB/s
    assert fake.now - start == pytest.approx(4.0)
    assert len(fake.sleeps) == 16


async def test_pacing_gives_no_credit_for_idle_time_but_does_not_double_charge() -> None:
    fake = FakeTime()
    dev = make(fake=fake, state_size=2 * MiB, read_bandwidth=MiB)
    await dev.set_state(S.STOP_COPY)
    await dev.read(MiB)
    fake.now += 10.0  # the consumer was slow: the next chunk is not delayed further...
    await dev.read(MiB)
    assert fake.sleeps == [pytest.approx(1.0), pytest.approx(1.0)]  # ...nor paid in advance


async def test_write_bandwidth_pacing() -> None:
    fake = FakeTime()
    dst = make("destination", fake=fake, state_size=2 * MiB, write_bandwidth=4 * MiB)
    await dst.set_state(S.RESUMING)
    for _ in range(8):
        await dst.write(bytes(256 * KiB))
    assert sum(fake.sleeps) == pytest.approx(0.5)


async def test_unlimited_bandwidth_never_sleeps() -> None:
    fake = FakeTime()
    src = make(fake=fake, state_size=2 * MiB)
    await src.set_state(S.STOP_COPY)
    await read_all(src)
    assert fake.sleeps == []


# -- configuration changes (qom-set) -------------------------------------------------------


async def test_set_config_runtime_properties_anytime() -> None:
    fake = FakeTime()
    dev = make(fake=fake, state_size=2 * MiB)
    await dev.set_state(S.STOP_COPY)
    dev.set_config(dev.config.with_property("read-bandwidth", "1M"))
    dev.set_config(dev.config.with_property("x-migration-multifd-transfer", "off"))
    await dev.read(MiB)
    assert fake.sleeps == [pytest.approx(1.0)]


async def test_set_config_content_properties_only_between_sessions() -> None:
    dev = make(state_size=8 * KiB)
    old_digest = dev.digest()
    await dev.set_state(S.STOP_COPY)
    with pytest.raises(StateError, match="while a migration session is open"):
        dev.set_config(dev.config.with_property("state-size", "16K"))
    await dev.set_state(S.STOP)
    dev.set_config(dev.config.with_property("state-size", "16K"))
    assert dev.total_size == 16 * KiB
    assert dev.digest() != old_digest
    with pytest.raises(ConfigError, match="cannot change id"):
        dev.set_config(DeviceConfig(id="other"))


async def test_set_config_precopy_changes_features() -> None:
    dev = make()
    assert F.PRE_COPY not in dev.features
    dev.set_config(dev.config.with_property("precopy-size", "4K"))
    assert F.PRE_COPY in dev.features
    await dev.set_state(S.PRE_COPY)


async def test_prepare() -> None:
    src, dst = make(state_size=20 * MiB), make("destination", state_size=20 * MiB)
    await src.prepare()
    await dst.prepare()
    await src.set_state(S.STOP_COPY)
    await resume(dst, await read_all(src), src.config_blob())
    assert dst.digest() == src.digest()


async def test_state_changes_of_a_prepared_device_stay_on_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # entering STOP_COPY is inside the downtime: a prepared device must not pay for a
    # trip through a worker thread there; an unprepared one offloads its big buffers
    offloaded: list[str] = []
    real = asyncio.to_thread

    async def spy(fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        offloaded.append(fn.__name__)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    src, dst = make(state_size=20 * MiB), make("destination", state_size=20 * MiB)
    await src.set_state(S.STOP_COPY)
    await dst.set_state(S.RESUMING)
    assert offloaded == ["_ensure_stream", "_ensure_resume_buffer"]
    src2, dst2 = make(state_size=20 * MiB), make("destination", state_size=20 * MiB)
    await src2.prepare()
    await dst2.prepare()
    offloaded.clear()
    await src2.set_state(S.STOP_COPY)
    await dst2.set_state(S.RESUMING)
    assert offloaded == []
    await resume(dst2, await read_all(src2), src2.config_blob())
    assert dst2.digest() == src2.digest()
