"""protocol.multifd: golden bytes from the spec's layouts, round trips, every error path."""

from __future__ import annotations

import re
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import (
    BadFlagsError,
    BadMagicError,
    BadVersionError,
    ConfigError,
    HandshakeError,
    LimitExceededError,
    MigrationError,
    RemoteProtocolError,
    UnknownDeviceError,
)
from protocol.multifd import (
    COMPRESSION_MASK,
    DEFAULT_MAX_DEVICE_PAYLOAD,
    DEVICE_STATE_HEADER_SIZE,
    INIT_SIZE,
    KNOWN_FLAGS,
    MULTIFD_PACKET_SIZE,
    PACKET_HEADER_SIZE,
    ChannelInit,
    DeviceStateHeader,
    PacketFlags,
    PacketHeader,
    RamLayout,
    RamPacket,
    encode_ram_run,
    max_compressed_size,
    ram_packet_size,
    ram_page_count,
)

UUID = uuid.UUID("5c2f7a4e-3b1d-4e8a-9f60-0123456789ab")
MAGIC_VERSION = "11223344" "00000001"


def h(text: str) -> bytes:
    """Hex literal with whitespace for readability."""
    return bytes.fromhex("".join(text.split()))


def name_field(name: str) -> str:
    """A 256-byte NUL-padded name field, as hex (written out by hand from the layout)."""
    raw = name.encode().hex()
    return raw + "00" * (256 - len(raw) // 2)


# --------------------------------------------------------------------------------------
# constants and helpers


def test_constants() -> None:
    assert MULTIFD_PACKET_SIZE == 524288
    assert (INIT_SIZE, PACKET_HEADER_SIZE, DEVICE_STATE_HEADER_SIZE) == (64, 12, 276)
    assert COMPRESSION_MASK == 0x3E and KNOWN_FLAGS == 0x7F
    assert int(PacketFlags.DEVICE_STATE) == 0x40 and int(PacketFlags.QATZIP) == 0x20
    assert DEFAULT_MAX_DEVICE_PAYLOAD == 16 * 1024 * 1024


@pytest.mark.parametrize(
    ("page_size", "count", "size"), [(4096, 128, 1344), (65536, 8, 384), (1024, 512, 4416)]
)
def test_page_count_and_packet_size(page_size: int, count: int, size: int) -> None:
    assert ram_page_count(page_size) == count
    assert ram_packet_size(count) == size


@pytest.mark.parametrize(
    ("page_size", "packet_size", "count"),
    [(4096, 512 * 1024, 128), (4096, 2 << 20, 512), (4096, 4096, 1), (65536, 2 << 20, 32),
     (1024, 512 * 1024, 512)],
)
def test_page_count_of_a_packet_size(page_size: int, packet_size: int, count: int) -> None:
    assert ram_page_count(page_size, packet_size) == count


@pytest.mark.parametrize(
    ("page_size", "packet_size", "message"),
    [(4096, 4 << 20, "holds 1024 pages of 4096 bytes; at most 512"),
     (1024, 2 << 20, "holds 2048 pages"),
     (4096, 2048, "at least the page size"),
     (4096, 3 << 19, "power of two"),
     (4096, 0, "power of two"),
     (4096, True, "power of two")],
)
def test_bad_packet_size(page_size: int, packet_size: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ram_page_count(page_size, packet_size)


@pytest.mark.parametrize("bad", [0, 512, 3000, 4095, 1 << 20, -4096])
def test_bad_page_size(bad: int) -> None:
    with pytest.raises(ConfigError, match="page_size"):
        ram_page_count(bad)


@pytest.mark.parametrize("bad", [0, -1, 513])
def test_bad_page_count(bad: int) -> None:
    with pytest.raises(ConfigError, match="page_count"):
        ram_packet_size(bad)


# --------------------------------------------------------------------------------------
# ChannelInit

INIT_GOLDEN = [
    (
        ChannelInit(UUID.bytes, 1),
        MAGIC_VERSION + "5c2f7a4e 3b1d 4e8a 9f60 0123456789ab" + "01" + "00" * 7 + "00" * 32,
    ),
    (ChannelInit(bytes(16), 0), MAGIC_VERSION + "00" * 16 + "00" + "00" * 39),
    (ChannelInit(bytes(range(16)), 254), MAGIC_VERSION + "000102030405060708090a0b0c0d0e0f" + "fe" + "00" * 39),
]


@pytest.mark.parametrize(("init", "wire"), INIT_GOLDEN)
def test_init_golden(init: ChannelInit, wire: str) -> None:
    assert init.encode() == h(wire)
    assert ChannelInit.decode(h(wire)) == init


def test_init_unused_bytes_not_checked() -> None:
    wire = bytearray(ChannelInit(UUID.bytes, 3).encode())
    wire[25:64] = b"\xff" * 39  # QEMU ignores these; so do we
    assert ChannelInit.decode(bytes(wire)) == ChannelInit(UUID.bytes, 3)


def test_init_bad_magic_and_version() -> None:
    wire = ChannelInit(UUID.bytes, 0).encode()
    with pytest.raises(BadMagicError, match="0x11223345"):
        ChannelInit.decode(h("11223345") + wire[4:])
    with pytest.raises(BadMagicError):
        ChannelInit.decode(b"QEVM" + wire[4:])
    with pytest.raises(BadVersionError, match="version 2"):
        ChannelInit.decode(wire[:4] + h("00000002") + wire[8:])


@pytest.mark.parametrize("size", [0, 1, 12, 63])
def test_init_short(size: int) -> None:
    with pytest.raises(RemoteProtocolError, match="64 bytes"):
        ChannelInit.decode(ChannelInit(UUID.bytes, 0).encode()[:size])


def test_init_long() -> None:
    with pytest.raises(LimitExceededError):
        ChannelInit.decode(ChannelInit(UUID.bytes, 0).encode() + b"\0")


@pytest.mark.parametrize(
    "init", [ChannelInit(b"short", 0), ChannelInit(UUID.bytes, 255), ChannelInit(UUID.bytes, -1)]
)
def test_init_encode_rejects_bad_input(init: ChannelInit) -> None:
    with pytest.raises(ConfigError):
        init.encode()


def test_init_validate_ok() -> None:
    ChannelInit(UUID.bytes, 1).validate(expected_uuid=UUID.bytes, channels=2, connected={0})


def test_init_validate_uuid_mismatch_shows_both() -> None:
    other = uuid.UUID("00000000-0000-0000-0000-000000000001")
    with pytest.raises(HandshakeError) as info:
        ChannelInit(UUID.bytes, 0).validate(expected_uuid=other.bytes, channels=2, connected=())
    assert str(UUID) in str(info.value) and str(other) in str(info.value)


@pytest.mark.parametrize("channel_id", [2, 3, 254])
def test_init_validate_id_out_of_range(channel_id: int) -> None:
    # id == channels is rejected too (QEMU's check is off by one).
    with pytest.raises(HandshakeError, match=f"id {channel_id} out of range"):
        ChannelInit(UUID.bytes, channel_id).validate(expected_uuid=UUID.bytes, channels=2, connected=())


def test_init_validate_duplicate() -> None:
    with pytest.raises(HandshakeError, match="channel 1 already set up"):
        ChannelInit(UUID.bytes, 1).validate(expected_uuid=UUID.bytes, channels=4, connected=[0, 1])


def test_init_validate_checks_uuid_before_range() -> None:
    with pytest.raises(HandshakeError, match="UUID"):
        ChannelInit(bytes(16), 9).validate(expected_uuid=UUID.bytes, channels=2, connected=[9])


@pytest.mark.parametrize("channels", [0, 256])
def test_init_validate_bad_channels(channels: int) -> None:
    with pytest.raises(ConfigError):
        ChannelInit(UUID.bytes, 0).validate(expected_uuid=UUID.bytes, channels=channels, connected=())


@given(st.binary(min_size=16, max_size=16), st.integers(0, 254))
def test_init_roundtrip(raw_uuid: bytes, channel_id: int) -> None:
    init = ChannelInit(raw_uuid, channel_id)
    wire = init.encode()
    assert len(wire) == INIT_SIZE
    assert ChannelInit.decode(wire) == init


# --------------------------------------------------------------------------------------
# PacketHeader


@pytest.mark.parametrize(
    ("flags", "wire"),
    [
        (0, MAGIC_VERSION + "00000000"),
        (PacketFlags.SYNC, MAGIC_VERSION + "00000001"),
        (PacketFlags.ZSTD | PacketFlags.SYNC, MAGIC_VERSION + "00000005"),
        (PacketFlags.DEVICE_STATE, MAGIC_VERSION + "00000040"),
    ],
)
def test_header_golden(flags: int, wire: str) -> None:
    assert PacketHeader(flags).encode() == h(wire)
    assert PacketHeader.decode(h(wire)) == PacketHeader(flags)


def test_header_errors() -> None:
    with pytest.raises(BadMagicError):
        PacketHeader.decode(h("deadbeef 00000001 00000000"))
    with pytest.raises(BadVersionError):
        PacketHeader.decode(h("11223344 00000000 00000000"))
    with pytest.raises(BadFlagsError, match="0x80"):
        PacketHeader.decode(h("11223344 00000001 00000080"))
    with pytest.raises(BadFlagsError, match="0x80000000"):
        PacketHeader.decode(h("11223344 00000001 80000001"))
    with pytest.raises(RemoteProtocolError, match="12 bytes"):
        PacketHeader.decode(h("11223344 00000001 000000"))
    with pytest.raises(ConfigError):
        PacketHeader(0x80).encode()


# --------------------------------------------------------------------------------------
# DeviceStateHeader

DEVICE_GOLDEN = [
    (
        DeviceStateHeader("0000:00:02.0/vfio", 0, 12 + 4096),
        MAGIC_VERSION + "00000040" + name_field("0000:00:02.0/vfio") + "00000000" + "0000100c",
    ),
    (
        DeviceStateHeader("vfio", 7, 1),
        MAGIC_VERSION + "00000040" + name_field("vfio") + "00000007" + "00000001",
    ),
    (
        DeviceStateHeader("x" * 255, 0xFFFFFFFF, DEFAULT_MAX_DEVICE_PAYLOAD),
        MAGIC_VERSION + "00000040" + "78" * 255 + "00" + "ffffffff" + "01000000",
    ),
]


@pytest.mark.parametrize(("header", "wire"), DEVICE_GOLDEN)
def test_device_state_golden(header: DeviceStateHeader, wire: str) -> None:
    assert header.encode() == h(wire)
    assert DeviceStateHeader.decode(h(wire)) == header
    assert DeviceStateHeader.decode_body(0x40, h(wire)[12:]) == header


def _device_body(idstr: bytes = b"dev", instance: int = 0, size: int = 10) -> bytes:
    return struct.pack(">256sII", idstr, instance, size)


@pytest.mark.parametrize(
    ("flags", "body", "error", "match"),
    [
        (0x41, _device_body(), BadFlagsError, "SYNC"),
        (0x42, _device_body(), BadFlagsError, "compression"),
        (0x60, _device_body(), BadFlagsError, "compression"),
        (0xC0, _device_body(), BadFlagsError, "unknown flag bits 0x80"),
        (0x00, _device_body(), BadFlagsError, "lack DEVICE_STATE"),
        (0x40, b"x" * 256 + _device_body()[256:], RemoteProtocolError, "idstr not NUL-terminated"),
        (0x40, _device_body(b""), RemoteProtocolError, "empty idstr"),
        (0x40, _device_body(b"\xff\xfe"), RemoteProtocolError, "not valid UTF-8"),
        (0x40, _device_body(size=0), RemoteProtocolError, "empty device-state payload"),
        (0x40, _device_body(size=DEFAULT_MAX_DEVICE_PAYLOAD + 1), LimitExceededError, "exceeds"),
        (0x40, _device_body(size=0xFFFFFFFF), LimitExceededError, "exceeds"),
        (0x40, _device_body()[:-1], RemoteProtocolError, "264 bytes"),
    ],
)
def test_device_state_errors(flags: int, body: bytes, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        DeviceStateHeader.decode_body(flags, body)


def test_device_state_custom_limit() -> None:
    with pytest.raises(LimitExceededError) as info:
        DeviceStateHeader.decode_body(0x40, _device_body(size=101), max_payload=100)
    assert (info.value.limit, info.value.value) == (100, 101)
    assert DeviceStateHeader.decode_body(0x40, _device_body(size=100), max_payload=100).payload_size == 100


def test_device_state_idstr_stops_at_first_nul() -> None:
    body = _device_body(b"abc\0junk")
    assert DeviceStateHeader.decode_body(0x40, body).idstr == "abc"


def test_device_state_bad_outer_header() -> None:
    wire = DeviceStateHeader("d", 0, 1).encode()
    with pytest.raises(BadMagicError):
        DeviceStateHeader.decode(b"\0" + wire[1:])
    with pytest.raises(RemoteProtocolError, match="276"):
        DeviceStateHeader.decode(wire[:-1])


@pytest.mark.parametrize(
    "header",
    [
        DeviceStateHeader("", 0, 1),
        DeviceStateHeader("x" * 256, 0, 1),
        DeviceStateHeader("é" * 128, 0, 1),  # 256 bytes in UTF-8
        DeviceStateHeader("a\0b", 0, 1),
        DeviceStateHeader("\udc80", 0, 1),  # lone surrogate
        DeviceStateHeader("d", 0, 0),
        DeviceStateHeader("d", 0, 1 << 32),
        DeviceStateHeader("d", -1, 1),
    ],
)
def test_device_state_encode_rejects_bad_input(header: DeviceStateHeader) -> None:
    with pytest.raises(ConfigError):
        header.encode()


idstrs = st.text(
    st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=80
).filter(lambda s: len(s.encode()) <= 255)


@given(idstrs, st.integers(0, 0xFFFFFFFF), st.integers(1, DEFAULT_MAX_DEVICE_PAYLOAD))
def test_device_state_roundtrip(idstr: str, instance: int, size: int) -> None:
    header = DeviceStateHeader(idstr, instance, size)
    assert DeviceStateHeader.decode(header.encode()) == header


# --------------------------------------------------------------------------------------
# RamPacket

RAM_GOLDEN_4K_SYNC = (
    MAGIC_VERSION
    + "00000001"  # flags SYNC
    + "00000000 00000000 00000000"  # pages_alloc, normal_pages, next_packet_size
    + "0000000000000049"  # packet_num 73
    + "00000000 00000000" + "00" * 24  # zero_pages, unused
    + "00" * 256  # empty ramblock
    + "00" * 8 * 128  # offsets
)


def test_ram_sync_golden() -> None:
    packet = RamPacket.sync_packet(73)
    assert packet.encode(128) == h(RAM_GOLDEN_4K_SYNC)
    decoded = RamPacket.decode(h(RAM_GOLDEN_4K_SYNC), page_count=128, page_size=4096)
    assert decoded == packet and decoded.is_sync
    assert decoded.normal_offsets == () and decoded.zero_offsets == ()


# page size 256 KiB -> 2 pages per packet, so the whole packet fits in a literal
RAM_GOLDEN_256K = (
    MAGIC_VERSION
    + "00000000"
    + "00000002 00000001 00040000"  # pages_alloc 2, normal 1, next_packet_size 262144
    + "0000000000000005"  # packet_num 5
    + "00000001 00000000" + "00" * 24  # zero_pages 1
    + name_field("pc.ram")
    + "0000000000040000 0000000000000000"  # normal @0x40000, zero @0
)


def test_ram_golden_normal_and_zero() -> None:
    packet = RamPacket(
        flags=0,
        pages_alloc=2,
        normal_pages=1,
        next_packet_size=262144,
        packet_num=5,
        zero_pages=1,
        ramblock="pc.ram",
        offsets=(0x40000, 0),
    )
    assert packet.encode(2) == h(RAM_GOLDEN_256K)
    decoded = RamPacket.decode(h(RAM_GOLDEN_256K), page_count=2, page_size=262144)
    assert decoded == packet
    assert decoded.normal_offsets == (0x40000,) and decoded.zero_offsets == (0,)
    assert not decoded.is_sync and decoded.compression == 0


def test_ram_unused_offset_entries_are_zero() -> None:
    packet = RamPacket(0, 128, 1, 4096, 0, 0, "mem", (0x1000,))
    wire = packet.encode(128)
    assert len(wire) == 1344
    assert wire[320:328] == h("0000000000001000") and wire[328:] == bytes(8 * 127)


def test_ram_v1_layout_ignores_bytes_32_to_63() -> None:
    wire = bytearray(h(RAM_GOLDEN_256K))
    wire[32:64] = b"\xaa" * 32  # unused64[4] before 9.0: not ours to interpret
    packet = RamPacket.decode(bytes(wire), page_count=2, page_size=262144, layout=RamLayout.V1)
    assert packet.zero_pages == 0 and packet.offsets == (0x40000,)


def test_ram_v1_stale_next_packet_size_without_pages() -> None:
    # QEMU < 9.0 leaves next_packet_size, ramblock and offsets of the previous batch
    # in a packet without pages (seen in the 7.2 captures); no payload follows.
    stale = RamPacket(PacketFlags.SYNC, 128, 0, 4096, 11, 0, "/rom@etc/acpi/rsdp", ()).encode(128)
    packet = RamPacket.decode(stale, page_count=128, page_size=4096, layout=RamLayout.V1)
    assert packet.next_packet_size == 0 and packet.is_sync and packet.pages_alloc == 128
    with pytest.raises(RemoteProtocolError, match="next_packet_size 4096"):
        RamPacket.decode(stale, page_count=128, page_size=4096, layout=RamLayout.V2)


def test_ram_v1_data_carrying_sync() -> None:
    wire = RamPacket(PacketFlags.SYNC | PacketFlags.ZLIB, 128, 1, 60, 11, 0, "rsdp", (0,)).encode(128)
    packet = RamPacket.decode(wire, page_count=128, page_size=4096, layout=RamLayout.V1)
    assert packet.is_sync and packet.normal_pages == 1 and packet.next_packet_size == 60


def _ram(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = dict(
        flags=0,
        pages_alloc=4,
        normal_pages=2,
        next_packet_size=2 * 4096,
        packet_num=9,
        zero_pages=1,
        ramblock="mem",
        offsets=(0x1000, 0x3000, 0x8000),
    )
    fields.update(changes)
    return fields


def _raw_ram(**changes: object) -> tuple[int, bytes]:
    """(flags, body) of a RAM packet built by hand so that invalid values can be written."""
    f = _ram(**changes)
    offsets = list(f["offsets"])  # type: ignore[call-overload]
    offsets += [0] * (128 - len(offsets))
    raw_block = f["ramblock"] if isinstance(f["ramblock"], bytes) else str(f["ramblock"]).encode()
    body = struct.pack(
        ">IIIQI4x24x256s128Q",
        f["pages_alloc"],
        f["normal_pages"],
        f["next_packet_size"],
        f["packet_num"],
        f["zero_pages"],
        raw_block,
        *offsets,
    )
    return int(f["flags"]), body  # type: ignore[call-overload]


def test_raw_ram_helper_matches_encoder() -> None:
    flags, body = _raw_ram()
    assert RamPacket(**_ram()).encode(128)[12:] == body  # type: ignore[arg-type]


def _sizes(name: str) -> int | None:
    return {"mem": 0x10000}.get(name)


RAM_ERRORS = [
    ("pages_alloc > page_count", dict(pages_alloc=129), LimitExceededError, "pages_alloc 129"),
    ("normal > pages_alloc", dict(pages_alloc=1), LimitExceededError, "normal_pages 2 exceeds"),
    ("zero > alloc - normal", dict(zero_pages=3), LimitExceededError, "zero_pages 3 exceeds"),
    ("ramblock unterminated", dict(ramblock=b"m" * 256), RemoteProtocolError, "ramblock not NUL-terminated"),
    ("ramblock empty with pages", dict(ramblock=""), RemoteProtocolError, "empty ramblock"),
    ("ramblock not utf-8", dict(ramblock=b"\xc3"), RemoteProtocolError, "UTF-8"),
    ("unknown block", dict(ramblock="nope"), UnknownDeviceError, "unknown RAM block 'nope'"),
    ("unaligned offset", dict(offsets=(0x1000, 0x3001, 0)), RemoteProtocolError, r"offset\[1\] 0x3001"),
    ("offset past block", dict(offsets=(0x1000, 0x10000, 0)), RemoteProtocolError, "beyond RAM block"),
    ("zero offset past block", dict(offsets=(0, 0, 0x20000)), RemoteProtocolError, r"offset\[2\]"),
    ("nocomp size mismatch", dict(next_packet_size=8191), RemoteProtocolError, "next_packet_size 8191"),
    ("nocomp size too big", dict(next_packet_size=0xFFFFFFFF), RemoteProtocolError, "does not match"),
    ("device-state flag", dict(flags=0x40), BadFlagsError, "DEVICE_STATE"),
    ("unknown flag", dict(flags=0x80), BadFlagsError, "unknown flag bits 0x80"),
    ("two methods", dict(flags=0x06), BadFlagsError, "more than one compression method"),
    (
        "compressed too big",
        dict(flags=0x02, next_packet_size=max_compressed_size(2, 4096) + 1),
        LimitExceededError,
        "compressed next_packet_size",
    ),
    ("compressed empty", dict(flags=0x04, next_packet_size=0), RemoteProtocolError, "empty compressed"),
    (
        "compressed no pages but size",
        dict(flags=0x02, normal_pages=0, zero_pages=1, next_packet_size=5, offsets=(0,)),
        RemoteProtocolError,
        "with no normal pages",
    ),
]


@pytest.mark.parametrize(("what", "changes", "error", "match"), RAM_ERRORS, ids=[e[0] for e in RAM_ERRORS])
def test_ram_errors(what: str, changes: dict[str, object], error: type[Exception], match: str) -> None:
    flags, body = _raw_ram(**changes)
    with pytest.raises(error, match=match):
        RamPacket.decode_body(flags, body, page_count=128, page_size=4096, block_size=_sizes)


def test_ram_valid_reference_passes_all_checks() -> None:
    flags, body = _raw_ram()
    packet = RamPacket.decode_body(flags, body, page_count=128, page_size=4096, block_size=_sizes)
    assert packet == RamPacket(**_ram())  # type: ignore[arg-type]


def test_ram_offset_at_last_page_ok() -> None:
    flags, body = _raw_ram(offsets=(0, 0xF000, 0x1000))
    RamPacket.decode_body(flags, body, page_count=128, page_size=4096, block_size=_sizes)


def test_ram_block_not_looked_up_without_pages() -> None:
    flags, body = _raw_ram(normal_pages=0, zero_pages=0, next_packet_size=0, ramblock="nope", offsets=())
    RamPacket.decode_body(flags, body, page_count=128, page_size=4096, block_size=_sizes)


def test_ram_body_length() -> None:
    flags, body = _raw_ram()
    with pytest.raises(RemoteProtocolError, match="1332 bytes"):
        RamPacket.decode_body(flags, body[:-1], page_count=128, page_size=4096)
    with pytest.raises(RemoteProtocolError, match="1344 bytes"):
        RamPacket.decode(body, page_count=128, page_size=4096)


@pytest.mark.parametrize("method", [PacketFlags.QPL, PacketFlags.UADK, PacketFlags.QATZIP])
def test_ram_v1_rejects_methods_unknown_before_9_0(method: PacketFlags) -> None:
    flags, body = _raw_ram(flags=method, next_packet_size=100)
    RamPacket.decode_body(flags, body, page_count=128, page_size=4096)
    with pytest.raises(BadFlagsError, match="V1"):
        RamPacket.decode_body(flags, body, page_count=128, page_size=4096, layout=RamLayout.V1)


def test_ram_expected_compression() -> None:
    flags, body = _raw_ram(flags=PacketFlags.ZLIB, next_packet_size=100)
    assert RamPacket.decode_body(flags, body, page_count=128, page_size=4096, compression=0x02)
    with pytest.raises(BadFlagsError, match="uses 0x4"):
        RamPacket.decode_body(flags, body, page_count=128, page_size=4096, compression=0x04)
    with pytest.raises(BadFlagsError, match="uses 0x0"):
        RamPacket.decode_body(flags, body, page_count=128, page_size=4096, compression=0)
    # without normal pages both "no method" (<9.0) and "the method" (9.0+) are fine
    for f in (0, PacketFlags.ZLIB):
        fl, b = _raw_ram(flags=f, normal_pages=0, zero_pages=0, next_packet_size=0, offsets=())
        RamPacket.decode_body(fl, b, page_count=128, page_size=4096, compression=0x02)


@pytest.mark.parametrize(
    "packet",
    [
        RamPacket(0, 129, 0, 0, 0, 0, "", ()),
        RamPacket(0, 4, 2, 0, 0, 0, "mem", (0,)),  # offsets count mismatch
        RamPacket(0, 1, 1, 0, 0, 1, "mem", (0, 0)),  # more pages than pages_alloc
        RamPacket(0x40, 0, 0, 0, 0, 0, "", ()),
        RamPacket(0x06, 0, 0, 0, 0, 0, "", ()),
        RamPacket(0, 1, 1, 0, 0, 0, "", (0,)),  # pages without a block
        RamPacket(0, 1, 1, 0, 0, 0, "m" * 256, (0,)),
        RamPacket(0, 1, 1, 0, 0, 0, "\ud800", (0,)),
        RamPacket(0, 1, 1, 0, -1, 0, "m", (0,)),
        RamPacket(0, 1, 1, 0, 0, 0, "m", (-1,)),
        RamPacket(0, 1, 1, 1 << 32, 0, 0, "m", (0,)),
    ],
)
def test_ram_encode_rejects_bad_input(packet: RamPacket) -> None:
    with pytest.raises(ConfigError):
        packet.encode(128)


@st.composite
def ram_packets(draw: st.DrawFn) -> tuple[RamPacket, int]:
    page_size = draw(st.sampled_from([1024, 4096, 16384, 65536, 524288]))
    page_count = ram_page_count(page_size)
    pages_alloc = draw(st.integers(0, page_count))
    normal = draw(st.integers(0, pages_alloc))
    zero = draw(st.integers(0, pages_alloc - normal))
    method = draw(st.sampled_from([0, 0x02, 0x04, 0x08, 0x10, 0x20]))
    flags = method | draw(st.sampled_from([0, 1]))
    if method == 0:
        size = normal * page_size
    elif normal == 0:
        size = 0
    else:
        size = draw(st.integers(1, max_compressed_size(normal, page_size)))
    count = normal + zero
    block = draw(idstrs) if count else draw(st.sampled_from(["", "pc.ram"]))
    offsets = tuple(draw(st.lists(st.integers(0, 1 << 40), min_size=count, max_size=count)))
    packet = RamPacket(
        flags=flags,
        pages_alloc=pages_alloc,
        normal_pages=normal,
        next_packet_size=size,
        packet_num=draw(st.integers(0, (1 << 64) - 1)),
        zero_pages=zero,
        ramblock=block,
        offsets=tuple(o * page_size for o in offsets),
    )
    return packet, page_size


@settings(max_examples=150)
@given(ram_packets())
def test_ram_roundtrip(case: tuple[RamPacket, int]) -> None:
    packet, page_size = case
    page_count = ram_page_count(page_size)
    wire = packet.encode(page_count)
    assert len(wire) == ram_packet_size(page_count)
    assert RamPacket.decode(wire, page_count=page_count, page_size=page_size) == packet


# --------------------------------------------------------------------------------------
# runs: the sender's one-span packets and the receiver's recognition of them

RUNS = [  # (first offset, pages, page size)
    (0, 128, 4096),
    (4096 * 77, 5, 4096),
    (1 << 40, 128, 4096),
    (0, 1, 4096),
    (65536 * 3, 8, 65536),
    ((1 << 64) - 128 * 4096, 128, 4096),  # the last offset is the largest uint64 page
]


@pytest.mark.parametrize(("first", "pages", "page_size"), RUNS)
def test_encode_ram_run_is_the_general_encoding(first: int, pages: int, page_size: int) -> None:
    page_count = ram_page_count(page_size)
    wire = encode_ram_run(page_count=page_count, page_size=page_size, packet_num=9,
                          ramblock="pc.ram", first=first, pages=pages)
    packet = RamPacket(flags=0, pages_alloc=page_count, normal_pages=pages,
                       next_packet_size=pages * page_size, packet_num=9, zero_pages=0,
                       ramblock="pc.ram", offsets=tuple(range(first, first + pages * page_size,
                                                               page_size)))
    assert wire == packet.encode(page_count)
    decoded = RamPacket.decode(wire, page_count=page_count, page_size=page_size)
    assert decoded == packet and decoded.normal_run


@pytest.mark.parametrize("args", [
    {"pages": 0}, {"pages": 129}, {"first": 100}, {"first": -4096},
    {"first": (1 << 64) - 4096}, {"packet_num": -1}, {"ramblock": ""}, {"ramblock": "a\0b"},
    {"ramblock": ["pc.ram"]},
    {"flags": int(PacketFlags.SYNC)}, {"flags": int(PacketFlags.ZLIB)}, {"page_size": 3000},
    {"page_count": 0},
])
def test_encode_ram_run_rejects_bad_input(args: dict[str, object]) -> None:
    call: dict[str, object] = {"page_count": 128, "page_size": 4096, "packet_num": 1,
                               "ramblock": "pc.ram", "first": 0, "pages": 128}
    call.update(args)
    with pytest.raises(ConfigError):
        encode_ram_run(**call)  # type: ignore[arg-type]


def _ram_wire(offsets: tuple[int, ...], normal: int, page_size: int = 4096) -> bytes:
    return RamPacket(flags=0, pages_alloc=128, normal_pages=normal,
                     next_packet_size=normal * page_size, packet_num=1,
                     zero_pages=len(offsets) - normal, ramblock="pc.ram",
                     offsets=offsets).encode(128)


@pytest.mark.parametrize(("offsets", "normal", "run"), [
    ((0, 4096, 8192), 3, True),
    ((0, 4096, 8192, 40960, 4096 * 100), 3, True),   # zero pages after a run
    ((0, 8192, 4096), 3, False),
    ((8192, 4096, 0), 3, False),
    ((0, 4096, 4096), 3, False),
    ((0, 4096, 12288), 3, False),
    ((40960,), 1, True),
    ((4096, 8192), 0, False),                        # only zero pages
])
def test_decode_recognises_runs(offsets: tuple[int, ...], normal: int, run: bool) -> None:
    packet = RamPacket.decode(_ram_wire(offsets, normal), page_count=128, page_size=4096)
    assert packet.offsets == offsets and packet.normal_run is run


@pytest.mark.parametrize(("offsets", "match"), [
    ((4096, 8192, 1 << 30), "offset\\[2\\] .* beyond"),         # a run's last page outside
    ((1 << 30, 4096 + (1 << 30)), "offset\\[0\\] .* beyond"),
    ((0, 4096, 8192 + 1), "offset\\[2\\] .* not aligned"),
    ((0, 4096, 8192, 100), "offset\\[3\\] .* not aligned"),     # a bad zero page after a run
])
def test_decode_checks_runs_and_the_rest(offsets: tuple[int, ...], match: str) -> None:
    wire = _ram_wire(offsets, 3 if len(offsets) > 2 else 2)
    with pytest.raises(RemoteProtocolError, match=match):
        RamPacket.decode(wire, page_count=128, page_size=4096,
                         block_size=lambda name: 1 << 30)


@settings(max_examples=200)
@given(st.lists(st.integers(0, 64), min_size=1, max_size=128), st.integers(0, 1 << 30))
def test_normal_run_means_consecutive(pages: list[int], base: int) -> None:
    offsets = tuple((base + p) * 4096 for p in pages)
    packet = RamPacket.decode(_ram_wire(offsets, len(offsets)), page_count=128, page_size=4096)
    consecutive = all(b - a == 4096 for a, b in zip(offsets, offsets[1:], strict=False))
    assert packet.normal_run is consecutive


# --------------------------------------------------------------------------------------
# garbage never escapes as anything but a MigrationError


@settings(max_examples=200)
@given(st.binary(max_size=80), st.integers(0, 0xFFFFFFFF))
def test_garbage_small_decoders(data: bytes, flags: int) -> None:
    for decode in (ChannelInit.decode, PacketHeader.decode, DeviceStateHeader.decode):
        try:
            decode(data)
        except MigrationError:
            pass
    try:
        DeviceStateHeader.decode_body(flags, data.ljust(264, b"\0")[:264])
    except MigrationError:
        pass


@settings(max_examples=200)
@given(st.binary(min_size=1332, max_size=1332), st.integers(0, 0xFFFFFFFF), st.sampled_from(list(RamLayout)))
def test_garbage_ram_body(body: bytes, flags: int, layout: RamLayout) -> None:
    try:
        RamPacket.decode_body(flags, body, page_count=128, page_size=4096, layout=layout, block_size=_sizes)
    except MigrationError:
        pass


@settings(max_examples=200)
@given(
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.sampled_from([0, 1, 2, 3, 4, 5, 0x40]),
)
def test_garbage_ram_counts(alloc: int, normal: int, size: int, zero: int, flags: int) -> None:
    """Structured garbage reaches the deeper checks; anything accepted is consistent."""
    body = struct.pack(">IIIQI4x24x256s", alloc, normal, size, 0, zero, b"mem") + bytes(8 * 128)
    try:
        packet = RamPacket.decode_body(flags, body, page_count=128, page_size=4096)
    except MigrationError:
        return
    assert packet.normal_pages + packet.zero_pages <= packet.pages_alloc <= 128
    assert packet.next_packet_size <= max_compressed_size(128, 4096)


# --------------------------------------------------------------------------------------
# offsets: encode rejects what is not a uint64, decode names the first bad index


@pytest.mark.parametrize(
    "bad",
    [-1, -4096, 1 << 64, (1 << 64) + 4096, 1 << 100, 4096.0, 0.5, float("nan"), "4096", b"\0", None],
    ids=repr,
)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_ram_encode_rejects_non_uint64_offsets(bad: object, index: int) -> None:
    offsets: list[object] = [0x1000, 0x3000, 0x8000]
    offsets[index] = bad
    packet = RamPacket(**_ram(offsets=tuple(offsets)))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=re.escape(f"RAM packet offset {bad!r} is not a uint64")):
        packet.encode(128)


RAM_OFFSETS_AT = 12 + 308  # header + fixed body fields


def test_ram_encode_offset_limits() -> None:
    top = (1 << 64) - 1
    wire = RamPacket(**_ram(offsets=(0, top, 0x8000))).encode(128)  # type: ignore[arg-type]
    assert wire[RAM_OFFSETS_AT : RAM_OFFSETS_AT + 24] == h("""
        0000000000000000 ffffffffffffffff 0000000000008000""")
    # the decoder then rejects it: misaligned (no block) or beyond the block
    with pytest.raises(RemoteProtocolError, match=r"offset\[1\] 0xffffffffffffffff .* not aligned"):
        RamPacket.decode(wire, page_count=128, page_size=4096)


BAD_DECODED_OFFSETS = [
    # (offsets, with block_size, expected message)
    ((0x1001, 0x2000, 0x3000), True, r"offset\[0\] 0x1001 in 'mem' is not aligned to the 4096-byte"),
    ((0x1000, 0x2000, 0x3800), True, r"offset\[2\] 0x3800 in 'mem' is not aligned"),
    ((0x1000, 0x2008, 0x3001), True, r"offset\[1\] 0x2008 in 'mem' is not aligned"),
    ((0x1000, 0x10000, 0x3000), True, r"offset\[1\] 0x10000 is beyond RAM block 'mem' of 0x10000 bytes"),
    ((0x1000, 0x20000, 0x3001), True, r"offset\[1\] 0x20000 is beyond"),  # first bad wins
    ((0x1000, 0x3001, 0x20000), True, r"offset\[1\] 0x3001 in 'mem' is not aligned"),
    ((0, 0, 0xFFFFFFFFFFFFF000), True, r"offset\[2\] 0xfffffffffffff000 is beyond"),
    ((0x1000, 0x2000, 0xFFF), False, r"offset\[2\] 0xfff in 'mem' is not aligned"),
]


@pytest.mark.parametrize(("offsets", "sized", "match"), BAD_DECODED_OFFSETS)
def test_ram_decode_names_first_bad_offset(offsets: tuple[int, ...], sized: bool, match: str) -> None:
    flags, body = _raw_ram(offsets=offsets)
    with pytest.raises(RemoteProtocolError, match=match):
        RamPacket.decode_body(flags, body, page_count=128, page_size=4096,
                              block_size=_sizes if sized else None)


def test_ram_decode_without_block_size_allows_any_aligned_offset() -> None:
    offsets = (0xFFFFFFFFFFFFF000, 0x10000, 0)
    flags, body = _raw_ram(offsets=offsets)
    assert RamPacket.decode_body(flags, body, page_count=128, page_size=4096).offsets == offsets


@settings(max_examples=300)
@given(
    st.lists(st.one_of(st.integers(0, 20).map(lambda i: i * 4096), st.integers(0, 0x14000),
                       st.integers(0, (1 << 64) - 1)), min_size=1, max_size=128),
    st.sampled_from([4096, 1024, 65536]),
    st.booleans(),
)
def test_ram_decode_offsets_like_the_reference(offsets: list[int], page_size: int, sized: bool) -> None:
    used = 0x10000
    n = len(offsets)
    flags, body = _raw_ram(pages_alloc=n, normal_pages=n, zero_pages=0,
                           next_packet_size=n * page_size, offsets=tuple(offsets))
    decode = lambda: RamPacket.decode_body(  # noqa: E731
        flags, body, page_count=128, page_size=page_size, block_size=_sizes if sized else None)
    for index, offset in enumerate(offsets):
        if offset % page_size:
            with pytest.raises(RemoteProtocolError, match=rf"offset\[{index}\] .* not aligned"):
                decode()
            return
        if sized and offset > used - page_size:
            with pytest.raises(RemoteProtocolError, match=rf"offset\[{index}\] .* beyond"):
                decode()
            return
    assert decode().offsets == tuple(offsets)
