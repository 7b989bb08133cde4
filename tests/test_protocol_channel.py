"""protocol.channel.ChannelDecoder: chunking, in-place payloads, bounds, EOF, misuse."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.channel import (
    ChannelClosed,
    ChannelDecoder,
    ChannelEvent,
    DeviceStateReceived,
    InitReceived,
    RamPacketReceived,
)
from protocol.errors import (
    BadFlagsError,
    BadMagicError,
    ChannelError,
    ConfigError,
    LimitExceededError,
    MigrationError,
    RemoteProtocolError,
    SequenceError,
)
from protocol.multifd import (
    DEFAULT_MAX_DEVICE_PAYLOAD,
    ChannelInit,
    DeviceStateHeader,
    PacketFlags,
    RamLayout,
    RamPacket,
    max_compressed_size,
)

UUID = uuid.UUID("5c2f7a4e-3b1d-4e8a-9f60-0123456789ab").bytes
PAGE = 4096

INIT = ChannelInit(UUID, 1)
SYNC = RamPacket.sync_packet(0)
RAM = RamPacket(0, 128, 2, 2 * PAGE, 1, 1, "pc.ram", (0x1000, 0x5000, 0x9000))
ZERO_ONLY = RamPacket(0, 128, 0, 0, 2, 3, "pc.ram", (0, 0x2000, 0x3000))
DEVICE = DeviceStateHeader("0000:00:02.0/vfio", 0, 5000)
PAGES = bytes(range(256)) * 32  # two pages of recognisable data
DEVICE_DATA = bytes((i * 7) & 0xFF for i in range(5000))


def stream() -> bytes:
    return b"".join(
        [
            INIT.encode(),
            SYNC.encode(128),
            RAM.encode(128),
            PAGES,
            ZERO_ONLY.encode(128),
            DEVICE.encode(),
            DEVICE_DATA,
            SYNC.encode(128),
        ]
    )


def plain(events: list[ChannelEvent]) -> list[tuple[object, ...]]:
    """Events with payload views turned into bytes, for comparisons."""
    out: list[tuple[object, ...]] = []
    for e in events:
        if isinstance(e, RamPacketReceived):
            out.append(("ram", e.packet, bytes(e.payload)))
        elif isinstance(e, DeviceStateReceived):
            out.append(("dev", e.header, bytes(e.payload)))
        else:
            out.append((e,))
    return out


EXPECTED = [
    (InitReceived(INIT),),
    ("ram", SYNC, b""),
    ("ram", RAM, PAGES),
    ("ram", ZERO_ONLY, b""),
    ("dev", DEVICE, DEVICE_DATA),
    ("ram", SYNC, b""),
]


def feed_chunked(decoder: ChannelDecoder, data: bytes, sizes: list[int]) -> list[ChannelEvent]:
    """Write ``data`` through buffer()/advance() in pieces of the given sizes (cycled)."""
    events: list[ChannelEvent] = []
    pos, i = 0, 0
    while pos < len(data):
        target = decoder.buffer()
        assert len(target) > 0
        take = min(len(target), sizes[i % len(sizes)], len(data) - pos)
        target[:take] = data[pos : pos + take]
        events.extend(decoder.advance(take))
        pos += take
        i += 1
    return events


def test_whole_stream_in_one_go() -> None:
    decoder = ChannelDecoder()
    events = decoder.feed(stream())
    assert plain(events) == EXPECTED
    assert decoder.eof() == [ChannelClosed()]
    assert decoder.packets_received == 5
    assert decoder.bytes_received == len(stream())
    assert decoder.init == INIT


def test_one_byte_at_a_time() -> None:
    decoder = ChannelDecoder()
    assert plain(feed_chunked(decoder, stream(), [1])) == EXPECTED
    assert decoder.eof() == [ChannelClosed()]


@pytest.mark.parametrize("sizes", [[7], [13, 1, 300], [64, 12, 1332], [1344], [65536]])
def test_fixed_chunkings(sizes: list[int]) -> None:
    assert plain(feed_chunked(ChannelDecoder(), stream(), sizes)) == EXPECTED


@settings(max_examples=60)
@given(st.lists(st.integers(1, 9000), min_size=1, max_size=20))
def test_random_chunkings_give_identical_events(sizes: list[int]) -> None:
    decoder = ChannelDecoder()
    assert plain(feed_chunked(decoder, stream(), sizes)) == EXPECTED
    assert decoder.eof() == [ChannelClosed()]


def test_payload_is_received_in_place() -> None:
    arena = bytearray(1 << 20)
    handed: list[memoryview] = []

    def allocate(size: int) -> memoryview:
        view = memoryview(arena)[len(handed) * 65536 :][:size]
        handed.append(view)
        return view

    decoder = ChannelDecoder(allocate=allocate)
    header_part = INIT.encode() + RAM.encode(128)
    events = decoder.feed(header_part)
    assert events == [InitReceived(INIT)]
    # the decoder now hands out the allocated payload buffer itself
    target = decoder.buffer()
    assert len(target) == 2 * PAGE
    target[:] = PAGES
    (event,) = decoder.advance(2 * PAGE)
    assert isinstance(event, RamPacketReceived)
    assert event.payload.obj is arena and bytes(arena[: 2 * PAGE]) == PAGES
    assert len(handed) == 1


def test_payload_bytes_in_same_recv_as_header_are_copied_once() -> None:
    sizes: list[int] = []

    def allocate(size: int) -> bytearray:
        sizes.append(size)
        return bytearray(size)

    decoder = ChannelDecoder(allocate=allocate)
    data = INIT.encode() + RAM.encode(128) + PAGES[:100]
    decoder.feed(data)
    assert sizes == [2 * PAGE]
    assert len(decoder.buffer()) == 2 * PAGE - 100
    (event,) = decoder.feed(PAGES[100:])
    assert isinstance(event, RamPacketReceived) and bytes(event.payload) == PAGES


def test_allocate_may_return_a_larger_buffer() -> None:
    decoder = ChannelDecoder(allocate=lambda n: bytearray(n + 100))
    events = decoder.feed(stream())
    assert plain(events) == EXPECTED


def test_allocate_readonly_or_short_is_misuse() -> None:
    decoder = ChannelDecoder(allocate=lambda n: memoryview(bytes(n)))
    with pytest.raises(ConfigError, match="read-only"):
        decoder.feed(stream())
    decoder = ChannelDecoder(allocate=lambda n: bytearray(n - 1))
    with pytest.raises(ConfigError, match="only"):
        decoder.feed(stream())


def test_no_init_expected() -> None:
    decoder = ChannelDecoder(expect_init=False)
    assert plain(decoder.feed(stream()[64:])) == EXPECTED[1:]
    assert ChannelDecoder(expect_init=False).eof() == [ChannelClosed()]


def test_init_errors_surface() -> None:
    with pytest.raises(BadMagicError):
        ChannelDecoder().feed(b"QEVM" + bytes(60))


def test_device_payload_limit_checked_before_allocating() -> None:
    calls: list[int] = []

    def allocate(size: int) -> bytearray:
        calls.append(size)
        return bytearray(size)

    decoder = ChannelDecoder(max_device_payload=4999, allocate=allocate)
    with pytest.raises(LimitExceededError):
        decoder.feed(INIT.encode() + DEVICE.encode())
    assert calls == []


def test_huge_device_payload_field_never_allocates() -> None:
    calls: list[int] = []
    decoder = ChannelDecoder(allocate=lambda n: calls.append(n) or bytearray(n))  # type: ignore[func-returns-value]
    body = bytearray(DeviceStateHeader("d", 0, 1).encode())
    body[-4:] = b"\xff\xff\xff\xff"
    with pytest.raises(LimitExceededError):
        decoder.feed(INIT.encode() + bytes(body))
    assert calls == []


def test_ram_validation_uses_options() -> None:
    decoder = ChannelDecoder(block_size=lambda name: None)
    with pytest.raises(MigrationError, match="unknown RAM block"):
        decoder.feed(INIT.encode() + RAM.encode(128))
    decoder = ChannelDecoder(compression=PacketFlags.ZSTD)
    with pytest.raises(BadFlagsError):
        decoder.feed(INIT.encode() + RAM.encode(128))


def test_page_size_and_layout() -> None:
    big = RamPacket(0, 8, 1, 65536, 0, 0, "mem", (0x10000,))
    decoder = ChannelDecoder(page_size=65536, ram_layout=RamLayout.V1)
    events = decoder.feed(INIT.encode() + big.encode(8) + bytes(65536))
    assert isinstance(events[1], RamPacketReceived) and len(events[1].payload) == 65536


def test_compressed_payload_length_from_header() -> None:
    packet = RamPacket(PacketFlags.ZLIB, 128, 2, 77, 4, 0, "mem", (0, 0x1000))
    decoder = ChannelDecoder(compression=PacketFlags.ZLIB)
    events = decoder.feed(INIT.encode() + packet.encode(128) + b"z" * 77 + SYNC.encode(128))
    assert plain(events)[1:] == [("ram", packet, b"z" * 77), ("ram", SYNC, b"")]


# --------------------------------------------------------------------------------------
# EOF and truncation


def test_eof_before_init_is_truncation() -> None:
    with pytest.raises(ChannelError, match="truncated channel init: got 0 of 64 bytes"):
        ChannelDecoder().eof()


def test_eof_right_after_init_is_clean() -> None:
    decoder = ChannelDecoder()
    decoder.feed(INIT.encode())
    assert decoder.eof() == [ChannelClosed()]


def _boundaries() -> set[int]:
    pos = 64
    out = {64}
    for size in (1344, 1344 + 2 * PAGE, 1344, 276 + 5000, 1344):
        pos += size
        out.add(pos)
    return out


def test_truncation_at_every_offset() -> None:
    data = stream()
    boundaries = _boundaries()
    assert max(boundaries) == len(data)
    for cut in range(len(data) + 1):
        decoder = ChannelDecoder()
        decoder.feed(data[:cut])
        if cut in boundaries:
            assert decoder.eof() == [ChannelClosed()]
        else:
            with pytest.raises(ChannelError, match=r"truncated .*: got \d+ of \d+ bytes"):
                decoder.eof()


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (10, "truncated channel init: got 10 of 64 bytes"),
        (64 + 5, "truncated packet header: got 5 of 12 bytes"),
        (64 + 1344 + 100, "truncated RAM packet: got 100 of 1344 bytes"),
        (64 + 1344 + 1344 + 4000, "truncated RAM packet payload: got 4000 of 8192 bytes"),
        (64 + 3 * 1344 + 2 * PAGE + 200, "truncated device-state packet header: got 200 of 276 bytes"),
        (64 + 3 * 1344 + 2 * PAGE + 276 + 1, "truncated device-state payload: got 1 of 5000 bytes"),
    ],
)
def test_truncation_messages(cut: int, message: str) -> None:
    decoder = ChannelDecoder(channel="multifd/0")
    decoder.feed(stream()[:cut])
    with pytest.raises(ChannelError) as info:
        decoder.eof()
    assert str(info.value) == message and info.value.channel == "multifd/0"


# --------------------------------------------------------------------------------------
# state machine misuse


def test_calls_after_close_raise_sequence_error() -> None:
    decoder = ChannelDecoder()
    decoder.feed(stream())
    decoder.eof()
    for call in (decoder.buffer, decoder.eof, lambda: decoder.advance(0)):
        with pytest.raises(SequenceError, match="closed"):
            call()


def test_calls_after_error_raise_sequence_error() -> None:
    decoder = ChannelDecoder()
    with pytest.raises(BadMagicError):
        decoder.feed(b"\0" * 64)
    with pytest.raises(SequenceError, match="after an error"):
        decoder.buffer()
    with pytest.raises(SequenceError):
        decoder.eof()


def test_eof_failure_is_final() -> None:
    decoder = ChannelDecoder()
    with pytest.raises(ChannelError):
        decoder.eof()
    with pytest.raises(SequenceError):
        decoder.eof()


def test_advance_beyond_buffer_is_misuse() -> None:
    decoder = ChannelDecoder()
    with pytest.raises(ConfigError):
        decoder.advance(len(decoder.buffer()) + 1)
    with pytest.raises(ConfigError):
        decoder.advance(-1)
    assert decoder.advance(0) == []


def test_bad_options() -> None:
    with pytest.raises(ConfigError):
        ChannelDecoder(page_size=1000)
    with pytest.raises(ConfigError):
        ChannelDecoder(max_device_payload=0)


def test_buffer_never_empty_and_bounded() -> None:
    decoder = ChannelDecoder()
    data = stream()
    pos = 0
    while pos < len(data):
        target = decoder.buffer()
        assert 0 < len(target) <= max(65536, DEFAULT_MAX_DEVICE_PAYLOAD)
        take = min(len(target), 997, len(data) - pos)
        target[:take] = data[pos : pos + take]
        decoder.advance(take)
        pos += take


# --------------------------------------------------------------------------------------
# garbage: only MigrationErrors, and no allocation beyond the validated bounds

RAM_PAYLOAD_BOUND = max_compressed_size(128, PAGE)


def _guarded_allocate(limit: int) -> tuple[list[int], object]:
    sizes: list[int] = []

    def allocate(size: int) -> bytearray:
        assert 0 < size <= limit, size
        sizes.append(size)
        return bytearray(size)

    return sizes, allocate


@settings(max_examples=300)
@given(st.binary(max_size=3000), st.booleans())
def test_garbage_stream(data: bytes, with_valid_init: bool) -> None:
    _, allocate = _guarded_allocate(max(RAM_PAYLOAD_BOUND, DEFAULT_MAX_DEVICE_PAYLOAD))
    decoder = ChannelDecoder(allocate=allocate)  # type: ignore[arg-type]
    prefix = INIT.encode() if with_valid_init else b""
    try:
        decoder.feed(prefix + data)
        decoder.eof()
    except MigrationError:
        pass


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=1400), st.sampled_from([0, 1, 2, 4, 0x40, 0x41, 0xFF]))
def test_garbage_after_valid_header(data: bytes, flags: int) -> None:
    """A valid magic/version gets garbage past the first checks."""
    sizes, allocate = _guarded_allocate(max(RAM_PAYLOAD_BOUND, DEFAULT_MAX_DEVICE_PAYLOAD))
    decoder = ChannelDecoder(allocate=allocate)  # type: ignore[arg-type]
    header = bytes.fromhex("11223344 00000001") + flags.to_bytes(4, "big")
    try:
        decoder.feed(INIT.encode() + header + data)
        decoder.eof()
    except MigrationError:
        pass


@settings(max_examples=100)
@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_garbage_lengths_never_allocate_hugely(alloc: int, normal: int, size: int) -> None:
    sizes, allocate = _guarded_allocate(RAM_PAYLOAD_BOUND)
    packet = bytearray(SYNC.encode(128))
    packet[8:12] = (PacketFlags.ZLIB).to_bytes(4, "big")
    packet[12:24] = alloc.to_bytes(4, "big") + normal.to_bytes(4, "big") + size.to_bytes(4, "big")
    packet[64:67] = b"mem"
    decoder = ChannelDecoder(allocate=allocate)  # type: ignore[arg-type]
    try:
        decoder.feed(INIT.encode() + bytes(packet))
    except (RemoteProtocolError, LimitExceededError):
        assert sizes == []
