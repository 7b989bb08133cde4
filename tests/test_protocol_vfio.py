"""protocol.vfio: the device-state chunk header, markers and config-blob framing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import (
    BadFlagsError,
    BadMagicError,
    BadVersionError,
    ConfigError,
    LimitExceededError,
    MigrationError,
    RemoteProtocolError,
)
from protocol.vfio import (
    IDX_INVALID,
    MAX_DATA_BUFFER_SIZE,
    VFIO_STATE_PACKET_HEADER,
    VfioMigFlag,
    VfioPacketFlags,
    VfioStatePacketHeader,
    decode_config_blob,
    decode_state_packet,
    encode_config_blob,
    encode_state_packet,
)


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def test_constants() -> None:
    assert VFIO_STATE_PACKET_HEADER.format == ">III" and VFIO_STATE_PACKET_HEADER.size == 12
    assert IDX_INVALID == 0xFFFFFFFF and MAX_DATA_BUFFER_SIZE == 1 << 20
    assert [hex(m) for m in VfioMigFlag] == [
        "0xffffffffef100001",
        "0xffffffffef100002",
        "0xffffffffef100003",
        "0xffffffffef100004",
        "0xffffffffef100005",
        "0xffffffffef100006",
    ]


@pytest.mark.parametrize(
    ("header", "wire"),
    [
        (VfioStatePacketHeader(0, 0), "00000000 00000000 00000000"),
        (VfioStatePacketHeader(5, 1), "00000000 00000005 00000001"),
        (VfioStatePacketHeader(0xFFFFFFFE, 0), "00000000 fffffffe 00000000"),
    ],
)
def test_header_golden(header: VfioStatePacketHeader, wire: str) -> None:
    assert header.encode() == h(wire)
    assert VfioStatePacketHeader.decode(h(wire)) == header
    assert VfioStatePacketHeader.decode(h(wire) + b"data") == header  # whole payload accepted


def test_is_config() -> None:
    assert VfioStatePacketHeader(3, VfioPacketFlags.CONFIG_STATE).is_config
    assert not VfioStatePacketHeader(3, 0).is_config


@pytest.mark.parametrize(
    ("wire", "error", "match"),
    [
        ("", RemoteProtocolError, "device-state packet too short"),
        ("00000000 00000000 000000", RemoteProtocolError, "device-state packet too short"),
        ("00000001 00000000 00000000", BadVersionError, "version 1"),
        ("00000000 ffffffff 00000000", RemoteProtocolError, "invalid idx"),
        ("00000000 00000001 00000002", BadFlagsError, "unknown flag bits 0x2"),
        ("00000000 00000001 80000001", BadFlagsError, "0x80000000"),
    ],
)
def test_header_errors(wire: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        VfioStatePacketHeader.decode(h(wire))


@pytest.mark.parametrize(
    "header", [VfioStatePacketHeader(IDX_INVALID, 0), VfioStatePacketHeader(-1, 0), VfioStatePacketHeader(0, 2)]
)
def test_header_encode_rejects_bad_input(header: VfioStatePacketHeader) -> None:
    with pytest.raises(ConfigError):
        header.encode()


@given(st.integers(0, IDX_INVALID - 1), st.sampled_from([0, 1]))
def test_header_roundtrip(idx: int, flags: int) -> None:
    header = VfioStatePacketHeader(idx, flags)
    assert VfioStatePacketHeader.decode(header.encode()) == header


def test_config_blob_golden() -> None:
    blob = encode_config_blob(b"\x01\x02\x03")
    assert blob == h("ffffffffef100002 010203 ffffffffef100001")
    assert bytes(decode_config_blob(blob)) == b"\x01\x02\x03"
    assert bytes(decode_config_blob(encode_config_blob(b""))) == b""


@pytest.mark.parametrize(
    ("blob", "error", "match"),
    [
        ("ffffffffef100002 ffffffffef1000", RemoteProtocolError, "too short"),
        ("ffffffffef100004 00 ffffffffef100001", BadMagicError, "expected DEV_CONFIG_STATE"),
        ("ffffffffef100002 00 ffffffffef100006", BadMagicError, "expected END_OF_STATE"),
    ],
)
def test_config_blob_errors(blob: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        decode_config_blob(h(blob))


def test_state_packets() -> None:
    wire = encode_state_packet(7, b"abc")
    assert wire == h("00000000 00000007 00000000 616263")
    header, data = decode_state_packet(wire)
    assert header == VfioStatePacketHeader(7, 0) and bytes(data) == b"abc"

    config = encode_state_packet(8, encode_config_blob(b"cfg"), config=True)
    assert config == h("00000000 00000008 00000001 ffffffffef100002 636667 ffffffffef100001")
    header, data = decode_state_packet(config)
    assert header.is_config and bytes(decode_config_blob(data)) == b"cfg"


def test_state_packet_errors() -> None:
    with pytest.raises(RemoteProtocolError, match="no data"):
        decode_state_packet(VfioStatePacketHeader(0, 0).encode())
    with pytest.raises(LimitExceededError):
        decode_state_packet(VfioStatePacketHeader(0, 0).encode() + bytes(11), max_data=10)
    with pytest.raises(ConfigError):
        encode_state_packet(0, b"")
    with pytest.raises(ConfigError):
        encode_state_packet(0, bytes(MAX_DATA_BUFFER_SIZE + 1))


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_garbage(data: bytes) -> None:
    for decode in (VfioStatePacketHeader.decode, decode_config_blob, decode_state_packet):
        try:
            decode(data)
        except MigrationError:
            pass
