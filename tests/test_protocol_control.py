"""protocol.control: classification, preamble, golden msgpack frames, strict schema, decoder."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.control import (
    DESTINATION_MESSAGES,
    MAIN_MAGIC,
    MAX_CONTROL_MESSAGE,
    MAX_DATA_PAYLOAD,
    MAX_ENTRIES,
    QEMU_VM_FILE_MAGIC,
    SCHEMA_VERSION,
    SOURCE_MESSAGES,
    ChannelKind,
    Command,
    CommandType,
    ControlDecoder,
    ControlEvent,
    ControlMessage,
    DeviceDescriptor,
    Eof,
    Hello,
    HelloReply,
    MessageReceived,
    Pong,
    RamEos,
    RamFlush,
    RamPages,
    RamSetup,
    RamZeroPages,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    Shut,
    StreamClosed,
    SwitchoverAck,
    VfioRecord,
    check_preamble,
    classify_channel,
    decode_message,
    encode_data_record,
    encode_message,
    encode_preamble,
    message_type,
)
from protocol.errors import (
    BadMagicError,
    BadVersionError,
    ChannelError,
    ConfigError,
    LimitExceededError,
    MigrationError,
    RemoteProtocolError,
    SequenceError,
)
from protocol.vfio import VfioMigFlag

UUID_TEXT = "5c2f7a4e-3b1d-4e8a-9f60-0123456789ab"


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def fs(text: str) -> str:
    """msgpack fixstr (text < 32 bytes) as hex: 0xa0|len, then the UTF-8 bytes."""
    raw = text.encode()
    assert len(raw) < 32
    return f"{0xA0 | len(raw):02x}" + raw.hex()


def frame(body_hex: str) -> bytes:
    body = h(body_hex)
    return len(body).to_bytes(4, "big") + body


# --------------------------------------------------------------------------------------
# classification and preamble


def test_preamble_golden() -> None:
    assert MAIN_MAGIC == 0x4D46444D and QEMU_VM_FILE_MAGIC == 0x5145564D
    assert encode_preamble() == h("4d46444d 00000001") == b"MFDM\0\0\0\1"
    check_preamble(encode_preamble())


@pytest.mark.parametrize(
    ("first4", "kind"), [(b"MFDM", ChannelKind.MAIN), (h("11223344"), ChannelKind.MULTIFD)]
)
def test_classify(first4: bytes, kind: ChannelKind) -> None:
    assert classify_channel(first4) is kind
    assert classify_channel(first4 + b"more") is kind


def test_classify_qevm() -> None:
    with pytest.raises(BadMagicError, match=r"QEMU's native main stream \(QEVM\)"):
        classify_channel(b"QEVM")


def test_classify_unknown() -> None:
    with pytest.raises(BadMagicError, match="unknown channel magic 0x47455420"):
        classify_channel(b"GET ")


def test_classify_short() -> None:
    with pytest.raises(RemoteProtocolError):
        classify_channel(b"MFD")


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (h("5145564d 00000003"), BadMagicError, "QEVM"),
        (h("11223344 00000001"), BadMagicError, "unknown channel magic 0x11223344"),
        (h("4d46444d 00000002"), BadVersionError, "version 2"),
        (h("4d46444d 000000"), RemoteProtocolError, "8 bytes"),
    ],
)
def test_preamble_errors(data: bytes, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_preamble(data)


# --------------------------------------------------------------------------------------
# golden frames (msgpack written out by hand from the msgpack spec)

DEVICE = DeviceDescriptor(
    id="vfio0",
    driver="vfio-pci",
    idstr="0000:00:02.0/vfio",
    instance_id=0,
    version_id=1,
    multifd_transfer=True,
    load_config_after_iter=False,
    properties={"host": "0000:01:00.0"},
)
HELLO = Hello(
    protocol_version=SCHEMA_VERSION,
    migration_id="m1",
    vm_uuid=UUID_TEXT,
    capabilities={"multifd": True},
    parameters={"multifd-channels": 2, "x": "y", "z": False},
    devices=(DEVICE,),
)

GOLDEN: list[tuple[ControlMessage, str]] = [
    (
        HELLO,
        "87" + fs("t") + fs("hello")
        + "b0" + b"protocol_version".hex() + "01"
        + fs("migration_id") + fs("m1")
        + fs("vm_uuid") + "d924" + UUID_TEXT.encode().hex()
        + fs("capabilities") + "81" + fs("multifd") + "c3"
        + fs("parameters") + "83" + fs("multifd-channels") + "02" + fs("x") + fs("y") + fs("z") + "c2"
        + fs("devices") + "91" + "88"
        + fs("id") + fs("vfio0")
        + fs("driver") + fs("vfio-pci")
        + fs("idstr") + fs("0000:00:02.0/vfio")
        + fs("instance_id") + "00"
        + fs("version_id") + "01"
        + fs("multifd_transfer") + "c3"
        + fs("load_config_after_iter") + "c2"
        + fs("properties") + "81" + fs("host") + fs("0000:01:00.0"),
    ),
    (
        SectionStart(2, "ram", 0, 4),
        "85" + fs("t") + fs("section-start") + fs("section_id") + "02" + fs("idstr") + fs("ram")
        + fs("instance_id") + "00" + fs("version_id") + "04",
    ),
    (SectionPart(3), "82" + fs("t") + fs("section-part") + fs("section_id") + "03"),
    (SectionEnd(300), "82" + fs("t") + fs("section-end") + fs("section_id") + "cd012c"),
    (
        SectionFull(0xFFFFFFFF, "0000:00:02.0/vfio", 1, 1),
        "85" + fs("t") + fs("section-full") + fs("section_id") + "ceffffffff" + fs("idstr")
        + fs("0000:00:02.0/vfio") + fs("instance_id") + "01" + fs("version_id") + "01",
    ),
    (SectionFooter(3), "82" + fs("t") + fs("section-footer") + fs("section_id") + "03"),
    (
        VfioRecord(VfioMigFlag.DEV_DATA_STATE, 4096),
        "83" + fs("t") + fs("vfio") + fs("marker") + "cfffffffffef100004" + fs("size") + "cd1000",
    ),
    (
        VfioRecord(VfioMigFlag.END_OF_STATE),
        "83" + fs("t") + fs("vfio") + fs("marker") + "cfffffffffef100001" + fs("size") + "00",
    ),
    (Command(CommandType.PING, 1), "83" + fs("t") + fs("command") + fs("cmd") + "02" + fs("value") + "01"),
    (
        Command(CommandType.SWITCHOVER_START),
        "83" + fs("t") + fs("command") + fs("cmd") + "0b" + fs("value") + "00",
    ),
    (Eof({"ram": "ab12"}), "82" + fs("t") + fs("eof") + fs("digests") + "81" + fs("ram") + fs("ab12")),
    (
        HelloReply(False, "no", "bad-version"),
        "84" + fs("t") + fs("hello-reply") + fs("accepted") + "c2" + fs("error") + fs("no")
        + fs("code") + fs("bad-version"),
    ),
    (Pong(7), "82" + fs("t") + fs("pong") + fs("value") + "07"),
    (SwitchoverAck(), "81" + fs("t") + fs("switchover-ack")),
    (
        Shut(True),
        "86" + fs("t") + fs("shut") + fs("ok") + "c3" + fs("error") + "a0" + fs("code") + "a0"
        + fs("digests") + "80" + fs("checkpoints") + "80",
    ),
    (
        Shut(False, "boom", "device", {"ram": "00"}, {"load": 1.5}),
        "86" + fs("t") + fs("shut") + fs("ok") + "c2" + fs("error") + fs("boom") + fs("code")
        + fs("device") + fs("digests") + "81" + fs("ram") + fs("00") + fs("checkpoints") + "81"
        + fs("load") + "cb3ff8000000000000",
    ),
    (
        RamSetup(4096, {"pc.ram": 0x40000000, "vga": 8192}),
        "83" + fs("t") + fs("ram-setup") + fs("page_size") + "cd1000" + fs("blocks") + "82"
        + fs("pc.ram") + "ce40000000" + fs("vga") + "cd2000",
    ),
    (
        RamPages("pc.ram", (0, 0x2000), 8192),
        "84" + fs("t") + fs("ram-pages") + fs("block") + fs("pc.ram") + fs("offsets") + "92"
        + "00" + "cd2000" + fs("size") + "cd2000",
    ),
    (
        RamZeroPages("pc.ram", (4096,)),
        "83" + fs("t") + fs("ram-zero") + fs("block") + fs("pc.ram") + fs("offsets") + "91"
        + "cd1000",
    ),
    (RamFlush(), "81" + fs("t") + fs("ram-flush")),
    (RamEos(), "81" + fs("t") + fs("ram-eos")),
]


@pytest.mark.parametrize(("body", "error"), [
    ("83" + fs("t") + fs("ram-setup") + fs("page_size") + "cd0fff" + fs("blocks") + "80",
     "page size"),
    ("83" + fs("t") + fs("ram-setup") + fs("page_size") + "cd1000" + fs("blocks") + "81"
     + fs("pc.ram") + "cd1001", "not a positive multiple"),
    ("84" + fs("t") + fs("ram-pages") + fs("block") + fs("pc.ram") + fs("offsets") + "90"
     + fs("size") + "cd1000", "offsets, expected 1.."),
    ("84" + fs("t") + fs("ram-pages") + fs("block") + fs("pc.ram") + fs("offsets") + "92"
     + "00" + "01" + fs("size") + "cd1001", "not a whole page per offset"),
])
def test_ram_record_errors(body: str, error: str) -> None:
    with pytest.raises(MigrationError, match=error):
        decode_message(h(body))


@pytest.mark.parametrize(("offset", "where"), [
    ("c3", "offsets\\[1\\]"),                   # true: a bool is no offset
    ("ff", "offsets\\[1\\]"),                   # -1
    ("a130", "offsets\\[1\\]"),                 # a string
    ("cb3ff0000000000000", "offsets\\[1\\]"),   # a float
])
def test_a_bad_offset_among_good_ones_is_named(offset: str, where: str) -> None:
    # ram-zero with offsets [0, <bad>, 0x2000]: the one at index 1 is named
    body = ("83" + fs("t") + fs("ram-zero") + fs("block") + fs("pc.ram") + fs("offsets")
            + "93" + "00" + offset + "cd2000")
    with pytest.raises(MigrationError, match=where):
        decode_message(h(body))


def test_ram_pages_payload_received_in_place() -> None:
    dec = ControlDecoder(expect_preamble=False)
    data = encode_message(RamPages("pc.ram", (0,), 4096)) + bytes(range(256)) * 16
    events = []
    while data:
        view = dec.buffer()
        n = min(len(view), len(data), 1000)
        view[:n] = data[:n]
        data = data[n:]
        events += dec.advance(n)
    assert len(events) == 1 and events[0].payload is not None
    assert bytes(events[0].payload) == bytes(range(256)) * 16


@pytest.mark.parametrize(("message", "body"), GOLDEN, ids=[type(m).__name__ for m, _ in GOLDEN])
def test_golden(message: ControlMessage, body: str) -> None:
    assert encode_message(message) == frame(body)
    assert decode_message(h(body)) == message


def test_golden_frame_literal() -> None:
    assert encode_message(Pong(7)) == h("0000000f 82 a174 a4706f6e67 a576616c7565 07")
    assert encode_message(SwitchoverAck()) == h("00000012 81 a174 ae") + b"switchover-ack"


def test_all_message_types_covered() -> None:
    assert {type(m) for m, _ in GOLDEN} == set(SOURCE_MESSAGES) | set(DESTINATION_MESSAGES)
    assert message_type(Pong(1)) == "pong"


def test_decoded_types() -> None:
    record = decode_message(h(GOLDEN[6][1]))
    assert isinstance(record, VfioRecord) and type(record.marker) is VfioMigFlag
    hello = decode_message(h(GOLDEN[0][1]))
    assert isinstance(hello, Hello) and type(hello.devices) is tuple
    hello.check_version()


def test_key_order_does_not_matter() -> None:
    body = msgpack.packb({"value": 9, "t": "pong"})
    assert decode_message(body) == Pong(9)


def test_hello_version_check() -> None:
    other = Hello(2, "m", UUID_TEXT, {}, {}, ())
    assert decode_message(encode_message(other)[4:]) == other
    with pytest.raises(BadVersionError, match="version 2"):
        other.check_version()


def test_encode_data_record() -> None:
    assert encode_data_record(VfioMigFlag.DEV_CONFIG_STATE, 12) == encode_message(
        VfioRecord(VfioMigFlag.DEV_CONFIG_STATE, 12)
    )


# --------------------------------------------------------------------------------------
# strict decoding

GOOD_SECTION: dict[str, Any] = {"t": "section-start", "section_id": 1, "idstr": "ram", "instance_id": 0, "version_id": 4}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(base)
    for k, v in changes.items():
        if v is DROP:
            del out[k]
        else:
            out[k] = v
    return out


DROP = object()
HELLO_MAP = msgpack.unpackb(encode_message(HELLO)[4:])
SHUT_MAP = msgpack.unpackb(encode_message(Shut(True))[4:])

DECODE_ERRORS: list[tuple[str, Any, str]] = [
    ("unknown type", {"t": "reboot"}, "unknown control message type 'reboot'"),
    ("no type", {"section_id": 1}, "message type string"),
    ("type not str", {"t": 5}, "message type string"),
    ("not a map", [1, 2], "expected a map"),
    ("missing field", with_(GOOD_SECTION, version_id=DROP), "section-start: missing field 'version_id'"),
    ("extra field", with_(GOOD_SECTION, colour="red"), "section-start: unexpected field"),
    ("bool for int", with_(GOOD_SECTION, section_id=True), "section-start.section_id: expected an unsigned"),
    ("str for int", with_(GOOD_SECTION, instance_id="0"), "section-start.instance_id"),
    ("negative", with_(GOOD_SECTION, version_id=-1), "section-start.version_id"),
    ("too big", with_(GOOD_SECTION, section_id=1 << 32), "section-start.section_id"),
    ("float for int", with_(GOOD_SECTION, section_id=1.0), "section-start.section_id"),
    ("empty idstr", with_(GOOD_SECTION, idstr=""), "section-start.idstr"),
    ("long idstr", with_(GOOD_SECTION, idstr="x" * 256), "section-start.idstr"),
    ("nul idstr", with_(GOOD_SECTION, idstr="a\0b"), "section-start.idstr"),
    ("int for bool", {"t": "hello-reply", "accepted": 1, "error": "", "code": ""}, "hello-reply.accepted"),
    ("long error", {"t": "hello-reply", "accepted": False, "error": "e" * 4097, "code": ""}, "hello-reply.error"),
    ("unknown marker", {"t": "vfio", "marker": 0xFFFFFFFFEF100007, "size": 0}, "unknown VfioMigFlag 0xffffffffef100007"),
    ("size on EOS", {"t": "vfio", "marker": int(VfioMigFlag.END_OF_STATE), "size": 1}, "vfio.size: marker END_OF_STATE"),
    ("negative size", {"t": "vfio", "marker": int(VfioMigFlag.DEV_DATA_STATE), "size": -1}, "vfio.size"),
    ("unknown command", {"t": "command", "cmd": 3, "value": 0}, "unknown CommandType 0x3"),
    ("value on non-ping", {"t": "command", "cmd": 11, "value": 5}, "command.value"),
    ("digest not hex", {"t": "eof", "digests": {"ram": "xyz"}}, r"eof.digests\['ram'\]"),
    ("digest key empty", {"t": "eof", "digests": {"": "00"}}, "eof.digests key"),
    ("digests not map", {"t": "eof", "digests": ["00"]}, "eof.digests: expected a map"),
    ("bad uuid", with_(HELLO_MAP, vm_uuid="not-a-uuid"), "hello.vm_uuid"),
    ("upper uuid", with_(HELLO_MAP, vm_uuid=UUID_TEXT.upper()), "hello.vm_uuid"),
    ("capability not bool", with_(HELLO_MAP, capabilities={"multifd": 1}), r"hello.capabilities\['multifd'\]"),
    ("parameter float", with_(HELLO_MAP, parameters={"x": 1.5}), r"hello.parameters\['x'\]"),
    ("devices not list", with_(HELLO_MAP, devices={}), "hello.devices: expected a list"),
    (
        "device missing field",
        with_(HELLO_MAP, devices=[with_(HELLO_MAP["devices"][0], driver=DROP)]),
        r"hello.devices\[0\]: missing field 'driver'",
    ),
    (
        "device wrong type",
        with_(HELLO_MAP, devices=[with_(HELLO_MAP["devices"][0], multifd_transfer="yes")]),
        r"hello.devices\[0\].multifd_transfer",
    ),
    (
        "device extra",
        with_(HELLO_MAP, devices=[with_(HELLO_MAP["devices"][0], extra=1)]),
        r"hello.devices\[0\]: unexpected field",
    ),
    ("nan checkpoint", with_(SHUT_MAP, checkpoints={"x": math.nan}), r"shut.checkpoints\['x'\]"),
    ("inf checkpoint", with_(SHUT_MAP, checkpoints={"x": math.inf}), r"shut.checkpoints\['x'\]"),
    ("str checkpoint", with_(SHUT_MAP, checkpoints={"x": "1"}), r"shut.checkpoints\['x'\]"),
]


@pytest.mark.parametrize(("what", "value", "match"), DECODE_ERRORS, ids=[e[0] for e in DECODE_ERRORS])
def test_decode_errors(what: str, value: Any, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_message(msgpack.packb(value))


def test_too_many_entries() -> None:
    digests = {f"d{i}": "00" for i in range(MAX_ENTRIES + 1)}
    with pytest.raises(RemoteProtocolError):
        decode_message(msgpack.packb({"t": "eof", "digests": digests}))


def test_integer_checkpoints_become_floats() -> None:
    shut = decode_message(msgpack.packb(with_(SHUT_MAP, checkpoints={"x": 2})))
    assert isinstance(shut, Shut) and shut.checkpoints == {"x": 2.0}
    assert type(shut.checkpoints["x"]) is float


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "not valid msgpack"),
        (h("c1"), "not valid msgpack"),  # never-used byte
        (h("82 a174"), "not valid msgpack"),  # truncated
        (msgpack.packb({"t": "switchover-ack"}) + b"\x00", "junk after"),
        (h("82 a174 a4706f6e67 a174 07"), "duplicate key"),
        (h("82 01 02 a174 a4706f6e67"), "not valid msgpack"),  # int key
        (msgpack.packb({"t": "pong", "value": b"\x07"}, use_bin_type=True), "not valid msgpack"),
        (h("82 a174 a4706f6e67 a576616c7565 d40100"), "not valid msgpack"),  # ext type
        (h("81 a174 a2ffff"), "not valid msgpack"),  # invalid UTF-8
        (h("dd ffffffff"), "not valid msgpack"),  # array32 of 4G entries: refused, not allocated
        (h("df ffffffff"), "not valid msgpack"),  # map32 of 4G entries
        (h("db 7fffffff"), "not valid msgpack"),  # str32 of 2G
        (b"\x91" * 5000, "not valid msgpack"),  # deep nesting
    ],
)
def test_decode_malformed_msgpack(body: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_message(body)


@pytest.mark.parametrize(
    "message",
    [
        SectionPart(-1),
        SectionStart(1, "", 0, 0),
        Pong(1 << 32),
        Hello(1, "", UUID_TEXT, {}, {}, ()),
        Hello(1, "m", "nope", {}, {}, ()),
        VfioRecord(VfioMigFlag.DEV_SETUP_STATE, 4),
        Command(CommandType.OPEN_RETURN_PATH, 1),
        Eof({"ram": "not hex"}),
        Shut(True, checkpoints={"x": math.nan}),
        HelloReply(True, "\udc80"),  # lone surrogate: not encodable as UTF-8
    ],
)
def test_encode_rejects_bad_input(message: ControlMessage) -> None:
    with pytest.raises(ConfigError):
        encode_message(message)


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(ConfigError):
        encode_message(DEVICE)  # type: ignore[arg-type]


def test_encode_respects_size_limit() -> None:
    with pytest.raises(ConfigError, match="limit"):
        encode_message(HELLO, max_message_size=50)


# --------------------------------------------------------------------------------------
# round trips

text = st.text(st.characters(codec="utf-8"), max_size=30)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)
idstrs = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=40)
u32 = st.integers(0, 0xFFFFFFFF)
hexes = st.text("0123456789abcdef", min_size=1, max_size=128)

devices = st.builds(
    DeviceDescriptor,
    id=names,
    driver=names,
    idstr=idstrs,
    instance_id=u32,
    version_id=u32,
    multifd_transfer=st.booleans(),
    load_config_after_iter=st.booleans(),
    properties=st.dictionaries(names, text, max_size=4),
)

messages: st.SearchStrategy[ControlMessage] = st.one_of(
    st.builds(
        Hello,
        protocol_version=u32,
        migration_id=names,
        vm_uuid=st.uuids().map(str),
        capabilities=st.dictionaries(names, st.booleans(), max_size=4),
        parameters=st.dictionaries(
            names, st.one_of(st.integers(-(1 << 63), (1 << 64) - 1), text, st.booleans()), max_size=4
        ),
        devices=st.lists(devices, max_size=3).map(tuple),
    ),
    st.builds(SectionStart, u32, idstrs, u32, u32),
    st.builds(SectionPart, u32),
    st.builds(SectionEnd, u32),
    st.builds(SectionFull, u32, idstrs, u32, u32),
    st.builds(SectionFooter, u32),
    st.builds(
        VfioRecord,
        st.sampled_from(VfioMigFlag),
        st.just(0),
    ),
    st.builds(
        VfioRecord,
        st.sampled_from([VfioMigFlag.DEV_DATA_STATE, VfioMigFlag.DEV_CONFIG_STATE]),
        st.integers(0, (1 << 64) - 1),
    ),
    st.builds(Command, st.just(CommandType.PING), u32),
    st.builds(Command, st.sampled_from([CommandType.OPEN_RETURN_PATH, CommandType.SWITCHOVER_START])),
    st.builds(Eof, st.dictionaries(names, hexes, max_size=4)),
    st.builds(HelloReply, st.booleans(), text, text),
    st.builds(Pong, u32),
    st.just(SwitchoverAck()),
    st.builds(
        Shut,
        st.booleans(),
        text,
        text,
        st.dictionaries(names, hexes, max_size=4),
        st.dictionaries(names, st.floats(allow_nan=False, allow_infinity=False), max_size=4),
    ),
)


@settings(max_examples=300)
@given(messages)
def test_roundtrip(message: ControlMessage) -> None:
    wire = encode_message(message)
    assert int.from_bytes(wire[:4], "big") == len(wire) - 4
    assert decode_message(wire[4:]) == message


msgpack_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(), text, st.binary(max_size=8)
    ),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(msgpack_values, st.sampled_from([None, "pong", "hello", "vfio", "shut", "command", "eof"]))
def test_garbage_values_only_raise_protocol_errors(value: Any, kind: str | None) -> None:
    if kind is not None and isinstance(value, dict):
        value["t"] = kind
    try:
        decode_message(msgpack.packb(value, use_bin_type=True))
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_bytes_only_raise_protocol_errors(data: bytes) -> None:
    try:
        decode_message(data)
    except RemoteProtocolError:
        pass


# --------------------------------------------------------------------------------------
# ControlDecoder

PAYLOAD = bytes(range(256)) * 20


def main_stream() -> bytes:
    return b"".join(
        [
            encode_preamble(),
            encode_message(HELLO),
            encode_message(Command(CommandType.PING, 1)),
            encode_message(SectionStart(1, "0000:00:02.0/vfio", 0, 1)),
            encode_data_record(VfioMigFlag.DEV_DATA_STATE, len(PAYLOAD)),
            PAYLOAD,
            encode_message(VfioRecord(VfioMigFlag.END_OF_STATE)),
            encode_message(SectionFooter(1)),
            encode_message(Eof({"vfio0": "ff"})),
        ]
    )


EXPECTED = [
    (HELLO, None),
    (Command(CommandType.PING, 1), None),
    (SectionStart(1, "0000:00:02.0/vfio", 0, 1), None),
    (VfioRecord(VfioMigFlag.DEV_DATA_STATE, len(PAYLOAD)), PAYLOAD),
    (VfioRecord(VfioMigFlag.END_OF_STATE), None),
    (SectionFooter(1), None),
    (Eof({"vfio0": "ff"}), None),
]


def plain(events: list[ControlEvent]) -> list[tuple[object, object]]:
    out: list[tuple[object, object]] = []
    for e in events:
        assert isinstance(e, MessageReceived)
        out.append((e.message, None if e.payload is None else bytes(e.payload)))
    return out


def feed_chunked(decoder: ControlDecoder, data: bytes, sizes: list[int]) -> list[ControlEvent]:
    events: list[ControlEvent] = []
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


def test_decoder_one_go() -> None:
    decoder = ControlDecoder(expect_preamble=True)
    assert plain(decoder.feed(main_stream())) == EXPECTED
    assert decoder.eof() == [StreamClosed()]
    assert decoder.messages_received == len(EXPECTED)
    assert decoder.bytes_received == len(main_stream())


def test_decoder_one_byte_at_a_time() -> None:
    decoder = ControlDecoder(expect_preamble=True)
    assert plain(feed_chunked(decoder, main_stream(), [1])) == EXPECTED


@settings(max_examples=60)
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=20))
def test_decoder_random_chunkings(sizes: list[int]) -> None:
    decoder = ControlDecoder(expect_preamble=True)
    assert plain(feed_chunked(decoder, main_stream(), sizes)) == EXPECTED
    assert decoder.eof() == [StreamClosed()]


def test_return_path_without_preamble() -> None:
    data = encode_message(Pong(1)) + encode_message(SwitchoverAck()) + encode_message(Shut(True))
    decoder = ControlDecoder(expect_preamble=False)
    assert plain(decoder.feed(data)) == [(Pong(1), None), (SwitchoverAck(), None), (Shut(True), None)]
    assert decoder.eof() == [StreamClosed()]


def test_payload_received_in_place() -> None:
    arena = bytearray(len(PAYLOAD) + 10)
    decoder = ControlDecoder(expect_preamble=False, allocate=lambda n: memoryview(arena)[:n])
    decoder.feed(encode_data_record(VfioMigFlag.DEV_DATA_STATE, len(PAYLOAD)))
    target = decoder.buffer()
    assert len(target) == len(PAYLOAD) and target.obj is arena
    target[:] = PAYLOAD
    (event,) = decoder.advance(len(PAYLOAD))
    assert isinstance(event, MessageReceived) and event.payload is not None
    assert event.payload.obj is arena and bytes(event.payload) == PAYLOAD


def test_large_message_beyond_internal_buffer() -> None:
    big = Shut(False, "x" * 4096, "code", {f"device-{i}": "ab" * 64 for i in range(MAX_ENTRIES)})
    wire = encode_message(big)
    assert len(wire) > 128 * 1024
    for sizes in ([len(wire)], [1000, 7], [65536]):
        decoder = ControlDecoder(expect_preamble=False)
        events = feed_chunked(decoder, wire + encode_message(Pong(3)), sizes)
        assert plain(events) == [(big, None), (Pong(3), None)]
    decoder = ControlDecoder(expect_preamble=False)
    decoder.feed(wire[:100000])
    with pytest.raises(ChannelError, match=f"truncated large control message: got {100000 - 4} of {len(wire) - 4}"):
        decoder.eof()


@pytest.mark.parametrize("length", [0, MAX_CONTROL_MESSAGE + 1, 0xFFFFFFFF])
def test_bad_lengths(length: int) -> None:
    decoder = ControlDecoder(expect_preamble=False)
    with pytest.raises(LimitExceededError) as info:
        decoder.feed(length.to_bytes(4, "big"))
    assert info.value.value == length


def test_custom_message_limit() -> None:
    decoder = ControlDecoder(expect_preamble=False, max_message_size=10)
    with pytest.raises(LimitExceededError):
        decoder.feed(encode_message(Pong(1)))


def test_payload_limit_checked_before_allocating() -> None:
    calls: list[int] = []

    def allocate(size: int) -> bytearray:
        calls.append(size)
        return bytearray(size)

    decoder = ControlDecoder(expect_preamble=False, allocate=allocate)
    with pytest.raises(LimitExceededError):
        decoder.feed(encode_data_record(VfioMigFlag.DEV_DATA_STATE, MAX_DATA_PAYLOAD + 1))
    decoder = ControlDecoder(expect_preamble=False, allocate=allocate, max_data_size=100)
    with pytest.raises(LimitExceededError):
        decoder.feed(encode_data_record(VfioMigFlag.DEV_CONFIG_STATE, 101))
    assert calls == []


def test_decoder_preamble_errors() -> None:
    with pytest.raises(BadMagicError, match="QEVM"):
        ControlDecoder(expect_preamble=True).feed(h("5145564d 00000003"))
    with pytest.raises(BadVersionError):
        ControlDecoder(expect_preamble=True).feed(h("4d46444d 00000009"))


def test_decoder_message_errors() -> None:
    decoder = ControlDecoder(expect_preamble=False)
    with pytest.raises(RemoteProtocolError, match="unknown control message type"):
        decoder.feed(frame("81" + fs("t") + fs("nope")))
    with pytest.raises(SequenceError):
        decoder.buffer()


def test_decoder_eof() -> None:
    with pytest.raises(ChannelError, match="truncated main channel preamble: got 0 of 8 bytes"):
        ControlDecoder(expect_preamble=True).eof()
    decoder = ControlDecoder(expect_preamble=True)
    decoder.feed(encode_preamble())
    assert decoder.eof() == [StreamClosed()]
    with pytest.raises(SequenceError):
        decoder.eof()


def test_truncation_at_every_offset() -> None:
    data = main_stream()
    boundaries = {8}
    pos = 8
    for piece in (
        encode_message(HELLO),
        encode_message(Command(CommandType.PING, 1)),
        encode_message(SectionStart(1, "0000:00:02.0/vfio", 0, 1)),
        encode_data_record(VfioMigFlag.DEV_DATA_STATE, len(PAYLOAD)) + PAYLOAD,
        encode_message(VfioRecord(VfioMigFlag.END_OF_STATE)),
        encode_message(SectionFooter(1)),
        encode_message(Eof({"vfio0": "ff"})),
    ):
        pos += len(piece)
        boundaries.add(pos)
    assert pos == len(data)
    for cut in range(len(data) + 1):
        decoder = ControlDecoder(expect_preamble=True)
        decoder.feed(data[:cut])
        if cut in boundaries:
            assert decoder.eof() == [StreamClosed()]
        else:
            with pytest.raises(ChannelError, match=r"truncated .*: got \d+ of \d+ bytes"):
                decoder.eof()


def test_truncated_payload_message() -> None:
    decoder = ControlDecoder(expect_preamble=False, channel="main")
    decoder.feed(encode_data_record(VfioMigFlag.DEV_DATA_STATE, 100) + bytes(30))
    with pytest.raises(ChannelError, match="truncated VFIO record payload: got 30 of 100 bytes") as info:
        decoder.eof()
    assert info.value.channel == "main"


def test_bad_decoder_options() -> None:
    with pytest.raises(ConfigError):
        ControlDecoder(expect_preamble=False, max_message_size=0)
    with pytest.raises(ConfigError):
        ControlDecoder(expect_preamble=False, max_data_size=0)


@settings(max_examples=300)
@given(st.binary(max_size=2000), st.booleans())
def test_decoder_garbage(data: bytes, preamble: bool) -> None:
    def allocate(size: int) -> bytearray:
        assert 0 < size <= MAX_DATA_PAYLOAD
        return bytearray(size)

    decoder = ControlDecoder(expect_preamble=preamble, allocate=allocate)
    try:
        decoder.feed(data)
        decoder.eof()
    except MigrationError:
        pass


@settings(max_examples=100)
@given(st.lists(messages, min_size=1, max_size=6), st.lists(st.integers(1, 500), min_size=1, max_size=8))
def test_decoder_any_messages_any_chunking(batch: list[ControlMessage], sizes: list[int]) -> None:
    data = bytearray()
    expected: list[tuple[object, object]] = []
    for message in batch:
        if isinstance(message, VfioRecord) and message.size:
            message = VfioRecord(message.marker, message.size % 5000)
        payload = bytes([len(expected) & 0xFF]) * (message.size if isinstance(message, VfioRecord) else 0)
        data += encode_message(message) + payload
        expected.append((message, payload or None))
    one_go = ControlDecoder(expect_preamble=False)
    chunked = ControlDecoder(expect_preamble=False)
    assert plain(one_go.feed(bytes(data))) == expected
    assert plain(feed_chunked(chunked, bytes(data), sizes)) == expected
