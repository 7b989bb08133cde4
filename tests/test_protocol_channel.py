"""protocol.channel.ChannelDecoder: chunking, in-place payloads, bounds, EOF, misuse."""

from __future__ import annotations

import random
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


def feed_chunked(decoder: ChannelDecoder, data: bytes, sizes: list[int],
                 scatter: bool = False) -> list[ChannelEvent]:
    """Write ``data`` through buffer()/advance() in pieces of the given sizes (cycled);
    with ``scatter`` through buffers(), a piece spreading over its views in order, as
    one scatter receive (``recvmsg_into``) fills them."""
    events: list[ChannelEvent] = []
    pos, i = 0, 0
    while pos < len(data):
        targets = decoder.buffers() if scatter else [decoder.buffer()]
        assert all(len(t) > 0 for t in targets)
        take = min(sum(map(len, targets)), sizes[i % len(sizes)], len(data) - pos)
        left, at = take, pos
        for target in targets:
            n = min(left, len(target))
            target[:n] = data[at : at + n]
            left -= n
            at += n
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


def test_ram_packet_bytes_sets_the_offset_array() -> None:
    """2 MiB packets of 4 KiB pages carry 512 offsets; a decoder of QEMU's 128 reads
    the rest of the array as the next packet's header and fails."""
    big = RamPacket(0, 512, 2, 2 * PAGE, 1, 0, "pc.ram", (0x1000, 0x1FF000))
    data = INIT.encode() + big.encode(512) + PAGES + SYNC.encode(512)
    decoder = ChannelDecoder(ram_packet_bytes=2 << 20)
    assert decoder.ram_header_size == 4416 and ChannelDecoder().ram_header_size == 1344
    assert plain(decoder.feed(data))[1:] == [("ram", big, PAGES), ("ram", SYNC, b"")]
    with pytest.raises(RemoteProtocolError):
        ChannelDecoder().feed(data)


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


# --------------------------------------------------------------------------------------
# in-place RAM payloads (ram_target) and receiving_body

RAM_PAYLOAD_AT = 64 + 2 * 1344  # stream(): where RAM's pages start
DEVICE_PAYLOAD_AT = RAM_PAYLOAD_AT + 2 * PAGE + 1344 + 276
GUEST = 16 * PAGE  # room for every offset used below


def page_runs(offsets: tuple[int, ...], page_size: int = PAGE) -> list[tuple[int, int]]:
    """[start, stop) byte ranges of the runs of consecutive offsets, in packet order."""
    runs: list[tuple[int, int]] = []
    for offset in offsets:
        if runs and runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], offset + page_size)
        else:
            runs.append((offset, offset + page_size))
    return runs


class Guest:
    """A guest-memory stand-in: ``ram_target`` hands out one view per run of pages,
    optionally chopped into pieces of at most ``piece`` bytes."""

    def __init__(self, size: int = GUEST, piece: int | None = None) -> None:
        self.mem = bytearray(size)
        self.piece = piece
        self.calls: list[RamPacket] = []

    def __call__(self, packet: RamPacket) -> list[memoryview]:
        self.calls.append(packet)
        view = memoryview(self.mem)
        out = []
        for start, stop in page_runs(packet.normal_offsets):
            step = self.piece or stop - start
            out.extend(view[a : min(a + step, stop)] for a in range(start, stop, step))
        return out


def in_place_expected() -> list[tuple[object, ...]]:
    return [e if e[:2] != ("ram", RAM) else ("ram", RAM, b"", True) for e in EXPECTED]


def plain_in_place(events: list[ChannelEvent]) -> list[tuple[object, ...]]:
    """Like plain(), but in-place RAM events keep their flag."""
    out = plain(events)
    for i, e in enumerate(events):
        if isinstance(e, RamPacketReceived) and e.in_place:
            out[i] = (*out[i], True)
    return out


def test_ram_target_receives_pages_in_place() -> None:
    guest = Guest()
    sizes, allocate = _guarded_allocate(5000)
    decoder = ChannelDecoder(ram_target=guest, allocate=allocate)  # type: ignore[arg-type]
    events = decoder.feed(stream())
    assert plain_in_place(events) == in_place_expected()
    ram_event = events[2]
    assert isinstance(ram_event, RamPacketReceived) and ram_event.in_place
    assert ram_event.payload.nbytes == 0
    # RAM's offsets 0x1000 and 0x5000 are two runs: one view each, filled in order
    assert guest.mem[0x1000:0x2000] == PAGES[:PAGE] and guest.mem[0x5000:0x6000] == PAGES[PAGE:]
    assert guest.mem.count(0) == GUEST - 2 * PAGE + PAGES.count(0)
    # only the packet with a payload asks; the device payload still uses allocate
    assert guest.calls == [RAM] and sizes == [5000]
    assert decoder.eof() == [ChannelClosed()] and decoder.packets_received == 5


@pytest.mark.parametrize("piece", [None, 1, 100, 4095, 4096, 5000])
@pytest.mark.parametrize("sizes", [[1], [7], [13, 1, 300], [1344 + 100], [65536]])
def test_ram_target_chunkings_and_view_splits(piece: int | None, sizes: list[int]) -> None:
    guest = Guest(piece=piece)
    decoder = ChannelDecoder(ram_target=guest)
    assert plain_in_place(feed_chunked(decoder, stream(), sizes)) == in_place_expected()
    assert guest.mem[0x1000:0x2000] + guest.mem[0x5000:0x6000] == PAGES
    assert decoder.eof() == [ChannelClosed()]


def test_ram_target_one_run_for_consecutive_pages() -> None:
    packet = RamPacket(0, 128, 3, 3 * PAGE, 1, 1, "pc.ram", (0x3000, 0x4000, 0x5000, 0))
    guest = Guest()
    views: list[int] = []

    def target(p: RamPacket) -> list[memoryview]:
        out = guest(p)
        views.append(len(out))
        return out

    data = bytes(range(251)) * 49  # 12299 bytes, no period of 4096
    decoder = ChannelDecoder(ram_target=target, expect_init=False)
    (event,) = decoder.feed(packet.encode(128) + data[: 3 * PAGE])
    assert event == RamPacketReceived(packet, memoryview(b""), in_place=True)
    assert views == [1] and guest.mem[0x3000:0x6000] == data[: 3 * PAGE]


def test_ram_target_none_falls_back_to_allocate() -> None:
    asked: list[RamPacket] = []
    sizes, allocate = _guarded_allocate(2 * PAGE)

    def target(packet: RamPacket) -> None:
        asked.append(packet)
        return None

    decoder = ChannelDecoder(ram_target=target, allocate=allocate)  # type: ignore[arg-type]
    events = decoder.feed(stream())
    assert plain(events) == EXPECTED
    ram_event = events[2]
    assert isinstance(ram_event, RamPacketReceived) and not ram_event.in_place
    assert asked == [RAM] and sizes == [2 * PAGE, 5000]


@pytest.mark.parametrize(
    ("lengths", "got"),
    [
        ([], 0),
        ([PAGE], PAGE),
        ([PAGE, PAGE - 1], 2 * PAGE - 1),
        ([PAGE, PAGE + 1], 2 * PAGE + 1),
        ([3 * PAGE], 3 * PAGE),
    ],
)
def test_ram_target_wrong_total_is_misuse(lengths: list[int], got: int) -> None:
    mem = memoryview(bytearray(4 * PAGE))
    views = [mem[:n] for n in lengths]
    decoder = ChannelDecoder(ram_target=lambda p: views)
    with pytest.raises(ConfigError, match=f"ram_target gave {got} bytes for a 8192-byte payload"):
        decoder.feed(INIT.encode() + RAM.encode(128))
    with pytest.raises(SequenceError, match="after an error"):
        decoder.buffer()


def test_ram_target_readonly_view_is_misuse() -> None:
    decoder = ChannelDecoder(ram_target=lambda p: [memoryview(bytes(2 * PAGE))])
    with pytest.raises(ConfigError, match="read-only"):
        decoder.feed(INIT.encode() + RAM.encode(128))


@pytest.mark.parametrize("method", [PacketFlags.ZLIB, PacketFlags.ZSTD])
def test_compressed_packets_never_call_ram_target(method: PacketFlags) -> None:
    packet = RamPacket(method, 128, 2, 77, 4, 0, "mem", (0, 0x1000))
    guest = Guest()
    decoder = ChannelDecoder(compression=method, ram_target=guest)
    events = decoder.feed(INIT.encode() + packet.encode(128) + b"z" * 77 + SYNC.encode(128))
    assert plain(events)[1:] == [("ram", packet, b"z" * 77), ("ram", SYNC, b"")]
    assert isinstance(events[1], RamPacketReceived) and not events[1].in_place
    assert guest.calls == [] and not any(guest.mem)


@pytest.mark.parametrize("piece", [None, 1000, 3000])
@pytest.mark.parametrize("got", [0, 1, 100, PAGE - 1, PAGE, PAGE + 1, PAGE + 1000, 2 * PAGE - 1])
def test_in_place_truncation_counts_every_run(piece: int | None, got: int) -> None:
    decoder = ChannelDecoder(ram_target=Guest(piece=piece), channel="multifd/3")
    decoder.feed(stream()[: RAM_PAYLOAD_AT + got])
    with pytest.raises(ChannelError) as info:
        decoder.eof()
    assert str(info.value) == f"truncated RAM packet payload: got {got} of 8192 bytes"
    assert info.value.channel == "multifd/3"


def test_in_place_truncation_at_every_offset_matches_buffer_path() -> None:
    data = stream()
    for cut in range(RAM_PAYLOAD_AT, RAM_PAYLOAD_AT + 2 * PAGE):
        messages = []
        for decoder in (ChannelDecoder(), ChannelDecoder(ram_target=Guest(piece=777))):
            feed_chunked(decoder, data[:cut], [5000])
            with pytest.raises(ChannelError) as info:
                decoder.eof()
            messages.append(str(info.value))
        assert messages[0] == messages[1], cut


def _body_ranges(piece: int | None) -> list[tuple[int, int]]:
    """[start, stop) stream positions where buffer() is the rest of one body (with
    ram_target: of one view) -- stream()'s RAM pages and device payload."""
    if piece is None:
        ram = [(RAM_PAYLOAD_AT, RAM_PAYLOAD_AT + 2 * PAGE)]
    else:
        ram = [
            (RAM_PAYLOAD_AT + run + a, RAM_PAYLOAD_AT + run + min(a + piece, PAGE))
            for run in (0, PAGE)  # RAM's two runs
            for a in range(0, PAGE, piece)
        ]
    return [*ram, (DEVICE_PAYLOAD_AT, DEVICE_PAYLOAD_AT + 5000)]


@pytest.mark.parametrize("in_place", [False, True])
def test_receiving_body_exactly_while_buffer_is_rest_of_body(in_place: bool) -> None:
    piece = 3000 if in_place else None
    decoder = ChannelDecoder(ram_target=Guest(piece=piece) if in_place else None)
    ranges = _body_ranges(piece)
    data = stream()
    assert DEVICE_PAYLOAD_AT + 5000 + 1344 == len(data)
    for pos in range(len(data)):
        inside = [stop for start, stop in ranges if start <= pos < stop]
        assert decoder.receiving_body == bool(inside), pos
        if inside:
            assert len(decoder.buffer()) == inside[0] - pos, pos
        decoder.buffer()[:1] = data[pos : pos + 1]
        decoder.advance(1)
    assert not decoder.receiving_body
    assert decoder.eof() == [ChannelClosed()]


def test_receiving_body_with_header_and_payload_in_one_recv() -> None:
    decoder = ChannelDecoder(ram_target=Guest())
    assert not decoder.receiving_body
    decoder.feed(INIT.encode() + RAM.encode(128) + PAGES[:100])
    assert decoder.receiving_body and len(decoder.buffer()) == PAGE - 100
    decoder.feed(PAGES[100:PAGE])
    assert decoder.receiving_body and len(decoder.buffer()) == PAGE  # the second run
    decoder.feed(PAGES[PAGE:])
    assert not decoder.receiving_body


@st.composite
def ram_streams(draw: st.DrawFn) -> tuple[list[RamPacket], bytes]:
    """A few RAM packets (SYNCs, zero-only, pages in any order) with their payloads."""
    packets: list[RamPacket] = []
    wire: list[bytes] = []
    for num in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 4)) == 0:
            packet = RamPacket.sync_packet(num)
            payload = b""
        else:
            pages = draw(st.lists(st.integers(0, 15), unique=True, max_size=10))
            if draw(st.booleans()):
                pages.sort()  # long runs, as the first round sends
            normal = draw(st.integers(0, len(pages)))
            packet = RamPacket(0, 128, normal, normal * PAGE, num, len(pages) - normal, "pc.ram",
                               tuple(p * PAGE for p in pages))
            seed = draw(st.integers(0, 2**32))
            payload = random.Random(seed).randbytes(normal * PAGE)
        packets.append(packet)
        wire.append(packet.encode(128) + payload)
    return packets, b"".join(wire)


@settings(max_examples=80, deadline=None)
@given(ram_streams(), st.lists(st.integers(1, 9000), min_size=1, max_size=20),
       st.sampled_from([None, 1000, 4096, 5000]), st.booleans())
def test_in_place_and_buffer_paths_write_the_same_bytes(
    case: tuple[list[RamPacket], bytes], sizes: list[int], piece: int | None, scatter: bool
) -> None:
    packets, data = case
    # buffer path: the caller copies each payload to its offsets
    by_buffer = bytearray(GUEST)
    events = feed_chunked(ChannelDecoder(expect_init=False), data, sizes)
    for event in events:
        assert isinstance(event, RamPacketReceived) and not event.in_place
        for i, offset in enumerate(event.packet.normal_offsets):
            by_buffer[offset : offset + PAGE] = event.payload[i * PAGE : (i + 1) * PAGE]
    # in-place path: the decoder receives straight into the guest's views
    guest = Guest(piece=piece)
    in_place = feed_chunked(ChannelDecoder(expect_init=False, ram_target=guest), data, sizes,
                            scatter)
    assert [e.packet for e in in_place] == [e.packet for e in events] == packets  # type: ignore[union-attr]
    for event in in_place:
        assert isinstance(event, RamPacketReceived)
        assert event.in_place == bool(event.packet.next_packet_size)
        assert event.payload.nbytes == 0
    assert guest.calls == [p for p in packets if p.next_packet_size]
    assert guest.mem == by_buffer


def test_buffers_hands_out_every_run_left_of_an_in_place_payload() -> None:
    guest = Guest(piece=3000)  # RAM's two runs of a page each, in pieces of 3000 bytes
    decoder = ChannelDecoder(ram_target=guest)
    assert decoder.buffers() == [decoder.buffer()]  # not in a body: the internal buffer
    decoder.feed(INIT.encode() + RAM.encode(128) + PAGES[:100])
    assert [len(v) for v in decoder.buffers()] == [2900, 1096, 3000, 1096]
    views = decoder.buffers()
    data = PAGES[100:5000]  # ends 904 bytes into the second run's first piece
    views[0][:] = data[:2900]
    views[1][:] = data[2900:3996]
    views[2][:904] = data[3996:]
    assert decoder.advance(len(data)) == []
    assert [len(v) for v in decoder.buffers()] == [2096, 1096]
    with pytest.raises(ConfigError, match=r"advance\(3193\): must be 0..3192"):
        decoder.advance(3193)


def test_buffers_filled_in_one_advance_complete_the_packet() -> None:
    guest = Guest(piece=1000)
    decoder = ChannelDecoder(ram_target=guest)
    decoder.feed(INIT.encode() + RAM.encode(128))
    views = decoder.buffers()
    assert len(views) == 10 and sum(map(len, views)) == 2 * PAGE
    pos = 0
    for view in views:
        view[:] = PAGES[pos : pos + len(view)]
        pos += len(view)
    (event,) = decoder.advance(2 * PAGE)
    assert event == RamPacketReceived(RAM, memoryview(b""), in_place=True)
    assert guest.mem[0x1000:0x2000] + guest.mem[0x5000:0x6000] == PAGES
    assert not decoder.receiving_body and decoder.buffers() == [decoder.buffer()]
    assert plain(decoder.feed(stream()[RAM_PAYLOAD_AT + 2 * PAGE :])) == EXPECTED[3:]


@pytest.mark.parametrize("empty_at", [0, 1, 2])
def test_ram_target_empty_views_are_skipped(empty_at: int) -> None:
    """An empty view among the runs must not become an empty buffer() (a receiver's
    recv_into would return 0 and look like EOF) nor hold back the event."""
    mem = memoryview(bytearray(2 * PAGE))
    views = [mem[:PAGE], mem[PAGE:]]
    views.insert(empty_at, mem[:0])
    decoder = ChannelDecoder(ram_target=lambda p: views)
    decoder.feed(INIT.encode() + RAM.encode(128))
    assert len(decoder.buffer()) == PAGE
    assert decoder.feed(PAGES[:PAGE]) == []
    assert len(decoder.buffer()) == PAGE
    (event,) = decoder.feed(PAGES[PAGE:])
    assert isinstance(event, RamPacketReceived) and event.in_place
    assert bytes(mem) == PAGES and not decoder.receiving_body


# ---------------------------------------------------------------------------
# in-place device-state payloads (device_target)

PREFIX = 12


class Device:
    """A device image stand-in: ``device_target`` places each payload after its
    ``PREFIX`` at a fixed offset, or declines (None) when told to."""

    def __init__(self, decline: bool = False) -> None:
        self.mem = bytearray(8000)
        self.calls: list[tuple[DeviceStateHeader, bytes]] = []
        self.decline = decline

    def __call__(self, header: DeviceStateHeader, prefix: memoryview) -> memoryview | None:
        self.calls.append((header, bytes(prefix)))
        if self.decline:
            return None
        return memoryview(self.mem)[100 : 100 + header.payload_size - len(prefix)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 9000), min_size=1, max_size=20), st.booleans())
def test_device_target_receives_after_the_prefix(sizes: list[int], decline: bool) -> None:
    device = Device(decline=decline)
    decoder = ChannelDecoder(device_target=device, device_prefix=PREFIX)
    events = feed_chunked(decoder, stream(), sizes)
    assert device.calls == [(DEVICE, DEVICE_DATA[:PREFIX])]
    (event,) = [e for e in events if isinstance(e, DeviceStateReceived)]
    assert event.header == DEVICE and event.in_place is not decline
    if decline:  # the whole payload in one allocated buffer, prefix included
        assert bytes(event.payload) == DEVICE_DATA
    else:
        assert bytes(event.payload) == DEVICE_DATA[:PREFIX]
        assert device.mem[100 : 100 + 5000 - PREFIX] == DEVICE_DATA[PREFIX:]
    # everything else decodes exactly as without the hook
    others = [e for e in plain(events) if e[0] != "dev"]
    assert others == [e for e in EXPECTED if e[0] != "dev"]


def test_device_target_skipped_for_payloads_not_longer_than_the_prefix() -> None:
    device = Device()
    decoder = ChannelDecoder(device_target=device, device_prefix=PREFIX, expect_init=False)
    short = DeviceStateHeader("d", 0, PREFIX)
    (event,) = decoder.feed(short.encode() + b"x" * PREFIX)
    assert isinstance(event, DeviceStateReceived) and not event.in_place
    assert bytes(event.payload) == b"x" * PREFIX and device.calls == []


@pytest.mark.parametrize("length", [0, 4987, 4989])
def test_device_target_wrong_length_is_misuse(length: int) -> None:
    view = memoryview(bytearray(length))
    decoder = ChannelDecoder(device_target=lambda h, p: view, device_prefix=PREFIX,
                             expect_init=False)
    with pytest.raises(ConfigError, match=f"device_target gave {length} bytes for the 4988"):
        decoder.feed(DEVICE.encode() + DEVICE_DATA)


def test_device_target_errors_surface_and_are_final() -> None:
    def refuse(header: DeviceStateHeader, prefix: memoryview) -> memoryview | None:
        raise SequenceError("idx already loaded")
    decoder = ChannelDecoder(device_target=refuse, device_prefix=PREFIX, expect_init=False)
    with pytest.raises(SequenceError, match="already loaded"):
        decoder.feed(DEVICE.encode() + DEVICE_DATA)
    with pytest.raises(SequenceError, match="after an error"):
        decoder.buffer()


@pytest.mark.parametrize("prefix", [0, -1, 4097, 1.5])
def test_device_prefix_must_be_sane(prefix: object) -> None:
    with pytest.raises(ConfigError, match="device_prefix"):
        ChannelDecoder(device_target=lambda h, p: None, device_prefix=prefix)  # type: ignore[arg-type]


def test_device_in_place_truncation_at_every_offset_matches_buffer_path() -> None:
    data = stream()
    for cut in range(DEVICE_PAYLOAD_AT - 1, DEVICE_PAYLOAD_AT + 5000):
        messages = []
        for decoder in (ChannelDecoder(),
                        ChannelDecoder(device_target=Device(), device_prefix=PREFIX),
                        ChannelDecoder(device_target=Device(decline=True),
                                       device_prefix=PREFIX)):
            feed_chunked(decoder, data[:cut], [3000])
            with pytest.raises(ChannelError) as info:
                decoder.eof()
            messages.append(str(info.value))
        assert messages[0] == messages[1] == messages[2], cut


def test_device_receiving_body_after_the_prefix() -> None:
    decoder = ChannelDecoder(device_target=Device(), device_prefix=PREFIX, expect_init=False)
    decoder.feed(DEVICE.encode())
    assert not decoder.receiving_body          # the prefix is gathered like a header
    decoder.feed(DEVICE_DATA[:PREFIX])
    assert decoder.receiving_body and len(decoder.buffer()) == 5000 - PREFIX
