"""The main channel and its return path: preamble, framing and the message schema.

multifd-migrate's main channel is not QEMU's ``QEVM`` stream: after an 8-byte
preamble (``MFDM`` + version) both directions carry length-prefixed msgpack maps:

``BE32 length`` (1 .. max_message_size) + ``length`` bytes of one msgpack map whose
key ``"t"`` names the message type and whose other keys are exactly the fields of the
matching dataclass below.  A :class:`VfioRecord` with ``size > 0`` is followed
immediately by ``size`` raw bytes (bulk data never goes inside msgpack).

This module owns the message dataclasses, channel classification by magic, the
preamble, :func:`encode_message`, the strict :func:`decode_message` (every field's
type and range is checked, unknown types or keys are errors) and
:class:`ControlDecoder`, the sans-I/O stream decoder shaped like
:class:`protocol.channel.ChannelDecoder`.  Which message may come when is the
daemons' business, not this module's.
"""

from __future__ import annotations

import math
import struct
import uuid as _uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import Enum, IntEnum
from typing import Any, ClassVar, TypeAlias

import msgpack

from protocol._stream import Allocator, StreamDecoder, claim_buffer, default_allocate
from protocol.errors import (
    BadMagicError,
    BadVersionError,
    ConfigError,
    LimitExceededError,
    RemoteProtocolError,
)
from protocol.multifd import MULTIFD_MAGIC
from protocol.vfio import VfioMigFlag

__all__ = [
    "MAIN_MAGIC",
    "MAIN_VERSION",
    "QEMU_VM_FILE_MAGIC",
    "PREAMBLE_SIZE",
    "LENGTH_PREFIX_SIZE",
    "SCHEMA_VERSION",
    "MAX_CONTROL_MESSAGE",
    "MAX_DATA_PAYLOAD",
    "MAX_NAME_LEN",
    "MAX_TEXT_LEN",
    "MAX_ENTRIES",
    "MAX_DIGEST_LEN",
    "ChannelKind",
    "classify_channel",
    "encode_preamble",
    "check_preamble",
    "DeviceDescriptor",
    "Hello",
    "SectionStart",
    "SectionPart",
    "SectionEnd",
    "SectionFull",
    "SectionFooter",
    "VfioRecord",
    "CommandType",
    "Command",
    "Eof",
    "HelloReply",
    "Pong",
    "SwitchoverAck",
    "Shut",
    "RamSetup",
    "RamPages",
    "RamZeroPages",
    "RamFlush",
    "RamEos",
    "MAX_RAM_OFFSETS",
    "RAM_DIGEST_KEY",
    "ControlMessage",
    "SOURCE_MESSAGES",
    "DESTINATION_MESSAGES",
    "DATA_MARKERS",
    "message_type",
    "encode_message",
    "encode_data_record",
    "decode_message",
    "MessageReceived",
    "StreamClosed",
    "ControlEvent",
    "ControlDecoder",
]

MAIN_MAGIC = 0x4D46444D  # b"MFDM"
MAIN_VERSION = 1
QEMU_VM_FILE_MAGIC = 0x5145564D  # b"QEVM"
PREAMBLE_SIZE = 8
LENGTH_PREFIX_SIZE = 4
#: Version of the message schema, carried in :class:`Hello`.
SCHEMA_VERSION = 1
MAX_CONTROL_MESSAGE = 1024 * 1024
MAX_DATA_PAYLOAD = 16 * 1024 * 1024
#: Bounds on what a peer may put in a message (all far above real use).
MAX_NAME_LEN = 256  # ids, names, keys, error codes
MAX_TEXT_LEN = 4096  # error messages, property and parameter values
MAX_ENTRIES = 1024  # entries of any map or list
MAX_DIGEST_LEN = 128  # hex characters of one digest
_IDSTR_MAX_BYTES = 255  # QEMU idstrs travel as counted strings / in 256-byte arrays

_PREAMBLE = struct.Struct(">II")
_LENGTH = struct.Struct(">I")
_MAGIC = struct.Struct(">I")
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_I64_MIN = -(1 << 63)
_HEX = frozenset("0123456789abcdefABCDEF")


# --------------------------------------------------------------------------------------
# Channel classification and preamble


class ChannelKind(Enum):
    MAIN = "main"
    MULTIFD = "multifd"


def _magic_error(magic: int) -> BadMagicError:
    if magic == QEMU_VM_FILE_MAGIC:
        return BadMagicError(
            "peer speaks QEMU's native main stream (QEVM); multifd-migrate's main channel "
            "is not compatible"
        )
    return BadMagicError(f"unknown channel magic {magic:#010x}")


def classify_channel(first4: bytes | bytearray | memoryview) -> ChannelKind:
    """Tell a main channel from a multifd channel by its first 4 bytes."""
    if len(first4) < _MAGIC.size:
        raise RemoteProtocolError(
            f"need {_MAGIC.size} bytes to classify a channel, got {len(first4)}"
        )
    (magic,) = _MAGIC.unpack_from(first4, 0)
    if magic == MAIN_MAGIC:
        return ChannelKind.MAIN
    if magic == MULTIFD_MAGIC:
        return ChannelKind.MULTIFD
    raise _magic_error(magic)


def encode_preamble() -> bytes:
    """The 8 bytes the source writes first on the main channel."""
    return _PREAMBLE.pack(MAIN_MAGIC, MAIN_VERSION)


def check_preamble(data: bytes | bytearray | memoryview) -> None:
    if len(data) != PREAMBLE_SIZE:
        raise RemoteProtocolError(f"main channel preamble must be {PREAMBLE_SIZE} bytes, got {len(data)}")
    magic, version = _PREAMBLE.unpack(data)
    if magic != MAIN_MAGIC:
        raise _magic_error(magic)
    if version != MAIN_VERSION:
        raise BadVersionError(
            f"main channel version {version} not supported (expected {MAIN_VERSION})"
        )


# --------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class DeviceDescriptor:
    """One device the source migrates (a map inside :class:`Hello`, not a message)."""

    id: str
    driver: str
    idstr: str
    instance_id: int
    version_id: int
    multifd_transfer: bool
    load_config_after_iter: bool
    properties: dict[str, str]


@dataclass(frozen=True, slots=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    protocol_version: int
    migration_id: str
    vm_uuid: str  # canonical lower-case text form
    capabilities: dict[str, bool]
    parameters: dict[str, int | str | bool]
    devices: tuple[DeviceDescriptor, ...]

    def check_version(self) -> None:
        """Raise :class:`BadVersionError` unless the peer speaks our schema version."""
        if self.protocol_version != SCHEMA_VERSION:
            raise BadVersionError(
                f"peer speaks control schema version {self.protocol_version}, "
                f"we speak {SCHEMA_VERSION}"
            )


@dataclass(frozen=True, slots=True)
class SectionStart:
    TYPE: ClassVar[str] = "section-start"
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionPart:
    TYPE: ClassVar[str] = "section-part"
    section_id: int


@dataclass(frozen=True, slots=True)
class SectionEnd:
    TYPE: ClassVar[str] = "section-end"
    section_id: int


@dataclass(frozen=True, slots=True)
class SectionFull:
    TYPE: ClassVar[str] = "section-full"
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionFooter:
    TYPE: ClassVar[str] = "section-footer"
    section_id: int


#: Markers after which raw bytes may follow a :class:`VfioRecord`.
DATA_MARKERS = frozenset({VfioMigFlag.DEV_DATA_STATE, VfioMigFlag.DEV_CONFIG_STATE})


@dataclass(frozen=True, slots=True)
class VfioRecord:
    """A marker inside a VFIO section body; with ``size > 0`` (only after
    DEV_DATA_STATE or DEV_CONFIG_STATE) exactly ``size`` raw bytes follow."""

    TYPE: ClassVar[str] = "vfio"
    marker: VfioMigFlag
    size: int = 0


class CommandType(IntEnum):
    OPEN_RETURN_PATH = 1
    PING = 2
    SWITCHOVER_START = 11


@dataclass(frozen=True, slots=True)
class Command:
    TYPE: ClassVar[str] = "command"
    cmd: CommandType
    value: int = 0  # PING's value; 0 for the others


@dataclass(frozen=True, slots=True)
class Eof:
    """End of the main stream, with the source's per-device state digests (hex)."""

    TYPE: ClassVar[str] = "eof"
    digests: dict[str, str]


@dataclass(frozen=True, slots=True)
class HelloReply:
    TYPE: ClassVar[str] = "hello-reply"
    accepted: bool
    error: str = ""
    code: str = ""


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[str] = "pong"
    value: int


@dataclass(frozen=True, slots=True)
class SwitchoverAck:
    TYPE: ClassVar[str] = "switchover-ack"


@dataclass(frozen=True, slots=True)
class Shut:
    """The destination's last word: success or the error, digests, timing checkpoints."""

    TYPE: ClassVar[str] = "shut"
    ok: bool
    error: str = ""
    code: str = ""
    digests: dict[str, str] = field(default_factory=dict)
    checkpoints: dict[str, float] = field(default_factory=dict)


#: Key of guest RAM's digest in :class:`Eof` and :class:`Shut` digests (device ids
#: start with a letter, so it cannot collide with one).
RAM_DIGEST_KEY = ":ram"

#: Offsets one RAM record may carry (QEMU batches at most 128 pages per packet).
MAX_RAM_OFFSETS = 1024
_PAGE_SIZES = frozenset(1 << n for n in range(10, 20))


@dataclass(frozen=True, slots=True)
class RamSetup:
    """Body of the RAM START section: QEMU's ``RAM_SAVE_FLAG_MEM_SIZE`` record with
    the block list (names and used lengths, in order) and the target page size."""

    TYPE: ClassVar[str] = "ram-setup"
    page_size: int
    blocks: dict[str, int]


@dataclass(frozen=True, slots=True)
class RamPages:
    """Whole pages sent on the main channel (QEMU's ``RAM_SAVE_FLAG_PAGE`` records,
    used when multifd is off): ``size`` = len(offsets) × page size raw bytes follow,
    page by page in the order of ``offsets``."""

    TYPE: ClassVar[str] = "ram-pages"
    block: str
    offsets: tuple[int, ...]
    size: int


@dataclass(frozen=True, slots=True)
class RamZeroPages:
    """Zero pages found by the migration thread (``zero-page-detection=legacy``):
    QEMU's ``RAM_SAVE_FLAG_ZERO`` records, offsets only."""

    TYPE: ClassVar[str] = "ram-zero"
    block: str
    offsets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RamFlush:
    """QEMU's ``RAM_SAVE_FLAG_MULTIFD_FLUSH``: every multifd channel has sent one SYNC
    packet after all the pages queued before this marker."""

    TYPE: ClassVar[str] = "ram-flush"


@dataclass(frozen=True, slots=True)
class RamEos:
    """QEMU's ``RAM_SAVE_FLAG_EOS``: the end of a RAM section body."""

    TYPE: ClassVar[str] = "ram-eos"


ControlMessage: TypeAlias = (
    Hello
    | SectionStart
    | SectionPart
    | SectionEnd
    | SectionFull
    | SectionFooter
    | VfioRecord
    | Command
    | Eof
    | HelloReply
    | Pong
    | SwitchoverAck
    | Shut
    | RamSetup
    | RamPages
    | RamZeroPages
    | RamFlush
    | RamEos
)

#: Messages the source sends on the main channel.
SOURCE_MESSAGES: tuple[type[ControlMessage], ...] = (
    Hello,
    SectionStart,
    SectionPart,
    SectionEnd,
    SectionFull,
    SectionFooter,
    VfioRecord,
    Command,
    Eof,
    RamSetup,
    RamPages,
    RamZeroPages,
    RamFlush,
    RamEos,
)
#: Messages the destination sends on the return path.
DESTINATION_MESSAGES: tuple[type[ControlMessage], ...] = (HelloReply, Pong, SwitchoverAck, Shut)


def message_type(msg: ControlMessage) -> str:
    """The wire type string (``"t"``) of a message."""
    return msg.TYPE


# --------------------------------------------------------------------------------------
# Field validation: one checker per field, shared by the decoder (peer input, raises
# RemoteProtocolError) and the encoder (our input, re-raised as ConfigError) so that
# whatever we encode, our decoder accepts.

_Check = Callable[[object, str], Any]


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _bad(where: str, expected: str, value: object) -> RemoteProtocolError:
    return RemoteProtocolError(f"{where}: expected {expected}, got {_show(value)}")


def _int_in(low: int, high: int, desc: str) -> _Check:
    def check(value: object, where: str) -> int:
        # bool is an int subclass; True must not pass for a section id.
        if type(value) is not int or not low <= value <= high:
            raise _bad(where, desc, value)
        return value

    return check


_u32 = _int_in(0, _U32, "an unsigned 32-bit integer")


def _bool(value: object, where: str) -> bool:
    if type(value) is not bool:
        raise _bad(where, "a boolean", value)
    return value


def _str(max_len: int, *, min_len: int = 0) -> _Check:
    def check(value: object, where: str) -> str:
        if type(value) is not str or not min_len <= len(value) <= max_len:
            raise _bad(where, f"a string of {min_len}..{max_len} characters", value)
        return value

    return check


_name = _str(MAX_NAME_LEN, min_len=1)
_short = _str(MAX_NAME_LEN)
_text = _str(MAX_TEXT_LEN)


def _idstr(value: object, where: str) -> str:
    if type(value) is not str or not value:
        raise _bad(where, "a non-empty idstr", value)
    if "\0" in value or len(value.encode("utf-8", "surrogatepass")) > _IDSTR_MAX_BYTES:
        raise _bad(where, f"an idstr of at most {_IDSTR_MAX_BYTES} UTF-8 bytes without NUL", value)
    return value


def _uuid_text(value: object, where: str) -> str:
    if type(value) is not str or len(value) != 36:
        raise _bad(where, "a UUID in canonical text form", value)
    try:
        canonical = str(_uuid.UUID(value))
    except ValueError:
        raise _bad(where, "a UUID in canonical text form", value) from None
    if canonical != value:
        raise _bad(where, "a UUID in canonical (lower-case) text form", value)
    return value


def _hex_digest(value: object, where: str) -> str:
    if type(value) is not str or not 1 <= len(value) <= MAX_DIGEST_LEN or not _HEX.issuperset(value):
        raise _bad(where, f"a hex digest of 1..{MAX_DIGEST_LEN} characters", value)
    return value


def _finite_float(value: object, where: str) -> float:
    if type(value) is int:
        value = float(value)
    if type(value) is not float or not math.isfinite(value):
        raise _bad(where, "a finite number", value)
    return value


def _parameter(value: object, where: str) -> int | str | bool:
    if type(value) is bool:
        return value
    if type(value) is int:
        if not _I64_MIN <= value <= _U64:
            raise _bad(where, "a 64-bit integer", value)
        return value
    if type(value) is str:
        _text(value, where)
        return value
    raise _bad(where, "an integer, string or boolean", value)


def _enum(cls: type[IntEnum]) -> _Check:
    members = {int(m): m for m in cls}

    def check(value: object, where: str) -> IntEnum:
        if type(value) is not int and not isinstance(value, cls):
            raise _bad(where, f"a {cls.__name__} number", value)
        member = members.get(int(value))
        if member is None:
            raise RemoteProtocolError(f"{where}: unknown {cls.__name__} {int(value):#x}")
        return member

    return check


def _map_of(key: _Check, val: _Check) -> _Check:
    def check(value: object, where: str) -> dict[Any, Any]:
        if type(value) is not dict:
            raise _bad(where, "a map", value)
        if len(value) > MAX_ENTRIES:
            raise LimitExceededError(
                f"{where}: {len(value)} entries exceed the limit of {MAX_ENTRIES}",
                limit=MAX_ENTRIES,
                value=len(value),
            )
        out: dict[Any, Any] = {}
        for k, v in value.items():
            out[key(k, f"{where} key")] = val(v, f"{where}[{k!r}]")
        return out

    return check


@dataclass(frozen=True, slots=True)
class _Schema:
    name: str
    cls: Callable[..., Any]
    fields: tuple[tuple[str, _Check], ...]
    post: Callable[[Any, str], None] | None = None

    def build(self, value: object, where: str) -> Any:
        """Check a decoded map against this schema and build the dataclass."""
        if type(value) is not dict:
            raise _bad(where, "a map", value)
        values: dict[str, Any] = {}
        for name, check in self.fields:
            if name not in value:
                raise RemoteProtocolError(f"{where}: missing field {name!r}")
            values[name] = check(value[name], f"{where}.{name}")
        extra = [k for k in value if k != "t" and k not in values]
        if extra:
            raise RemoteProtocolError(
                f"{where}: unexpected field(s) {', '.join(sorted(map(repr, extra)))}"
            )
        obj = self.cls(**values)
        if self.post is not None:
            self.post(obj, where)
        return obj


def _tuple_of(item: _Check) -> _Check:
    def check(value: object, where: str) -> tuple[Any, ...]:
        if type(value) is not list and type(value) is not tuple:
            raise _bad(where, "a list", value)
        if len(value) > MAX_ENTRIES:
            raise LimitExceededError(
                f"{where}: {len(value)} items exceed the limit of {MAX_ENTRIES}",
                limit=MAX_ENTRIES,
                value=len(value),
            )
        return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

    return check


_DEVICE = _Schema(
    "device",
    DeviceDescriptor,
    (
        ("id", _name),
        ("driver", _name),
        ("idstr", _idstr),
        ("instance_id", _u32),
        ("version_id", _u32),
        ("multifd_transfer", _bool),
        ("load_config_after_iter", _bool),
        ("properties", _map_of(_name, _text)),
    ),
)


def _check_vfio(record: VfioRecord, where: str) -> None:
    if record.size and record.marker not in DATA_MARKERS:
        raise RemoteProtocolError(
            f"{where}.size: marker {record.marker.name} carries no data, got size {record.size}"
        )


def _check_command(command: Command, where: str) -> None:
    if command.cmd is not CommandType.PING and command.value != 0:
        raise RemoteProtocolError(
            f"{where}.value: command {command.cmd.name} takes no value, got {command.value}"
        )


_SECTION_HEAD = (
    ("section_id", _u32),
    ("idstr", _idstr),
    ("instance_id", _u32),
    ("version_id", _u32),
)
_SECTION_ID = (("section_id", _u32),)
_DIGESTS = _map_of(_name, _hex_digest)

def _page_size(value: object, where: str) -> int:
    if type(value) is not int or value not in _PAGE_SIZES:
        raise _bad(where, "a power-of-two page size from 1 KiB to 512 KiB", value)
    return value


def _offsets(value: object, where: str) -> tuple[int, ...]:
    if type(value) is not list and type(value) is not tuple:
        raise _bad(where, "a list of offsets", value)
    if not 1 <= len(value) <= MAX_RAM_OFFSETS:
        raise LimitExceededError(
            f"{where}: {len(value)} offsets, expected 1..{MAX_RAM_OFFSETS}",
            limit=MAX_RAM_OFFSETS, value=len(value))
    if set(map(type, value)) == {int} and min(value) >= 0 and max(value) <= _U64:
        # the usual case, checked in C: a RAM record carries up to 128 offsets, and a
        # Python call (and a field name) per offset cost more than the rest of it
        return tuple(value)
    return tuple(_u64(v, f"{where}[{i}]") for i, v in enumerate(value))  # names the bad one


_u64 = _int_in(0, _U64, "an unsigned 64-bit integer")


def _check_ram_blocks(setup: RamSetup, where: str) -> None:
    for name, length in setup.blocks.items():
        if length == 0 or length % setup.page_size:
            raise RemoteProtocolError(
                f"{where}.blocks[{name!r}]: length {length} is not a positive multiple "
                f"of the page size {setup.page_size}")


def _check_ram_pages(pages: RamPages, where: str) -> None:
    if pages.size % len(pages.offsets):
        raise RemoteProtocolError(
            f"{where}.size: {pages.size} bytes is not a whole page per offset "
            f"({len(pages.offsets)} offsets)")


_SCHEMAS: dict[str, _Schema] = {
    s.name: s
    for s in (
        _Schema(
            Hello.TYPE,
            Hello,
            (
                ("protocol_version", _u32),
                ("migration_id", _name),
                ("vm_uuid", _uuid_text),
                ("capabilities", _map_of(_name, _bool)),
                ("parameters", _map_of(_name, _parameter)),
                ("devices", _tuple_of(_DEVICE.build)),
            ),
        ),
        _Schema(SectionStart.TYPE, SectionStart, _SECTION_HEAD),
        _Schema(SectionPart.TYPE, SectionPart, _SECTION_ID),
        _Schema(SectionEnd.TYPE, SectionEnd, _SECTION_ID),
        _Schema(SectionFull.TYPE, SectionFull, _SECTION_HEAD),
        _Schema(SectionFooter.TYPE, SectionFooter, _SECTION_ID),
        _Schema(
            VfioRecord.TYPE,
            VfioRecord,
            (("marker", _enum(VfioMigFlag)), ("size", _int_in(0, _U64, "a byte count"))),
            _check_vfio,
        ),
        _Schema(
            Command.TYPE, Command, (("cmd", _enum(CommandType)), ("value", _u32)), _check_command
        ),
        _Schema(Eof.TYPE, Eof, (("digests", _DIGESTS),)),
        _Schema(HelloReply.TYPE, HelloReply, (("accepted", _bool), ("error", _text), ("code", _short))),
        _Schema(Pong.TYPE, Pong, (("value", _u32),)),
        _Schema(RamSetup.TYPE, RamSetup,
                (("page_size", _page_size), ("blocks", _map_of(_idstr, _u64))),
                _check_ram_blocks),
        _Schema(RamPages.TYPE, RamPages,
                (("block", _idstr), ("offsets", _offsets),
                 ("size", _int_in(1, _U64, "a byte count"))), _check_ram_pages),
        _Schema(RamZeroPages.TYPE, RamZeroPages, (("block", _idstr), ("offsets", _offsets))),
        _Schema(RamFlush.TYPE, RamFlush, ()),
        _Schema(RamEos.TYPE, RamEos, ()),
        _Schema(SwitchoverAck.TYPE, SwitchoverAck, ()),
        _Schema(
            Shut.TYPE,
            Shut,
            (
                ("ok", _bool),
                ("error", _text),
                ("code", _short),
                ("digests", _DIGESTS),
                ("checkpoints", _map_of(_name, _finite_float)),
            ),
        ),
    )
}


def _to_wire(value: object) -> object:
    """Plain msgpack-able data for a field value (enums as numbers, tuples as lists)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, IntEnum):
        return int(value)
    if isinstance(value, DeviceDescriptor):
        return {f.name: _to_wire(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (tuple, list)):
        if set(map(type, value)) <= {int, str}:
            return value  # msgpack packs a tuple as an array; plain values as they are
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def encode_message(msg: ControlMessage, *, max_message_size: int = MAX_CONTROL_MESSAGE) -> bytes:
    """Length prefix + msgpack map.  For a :class:`VfioRecord` with ``size`` the caller
    sends exactly ``size`` payload bytes right after these."""
    schema = _SCHEMAS.get(getattr(type(msg), "TYPE", ""))
    if schema is None or type(msg) is not schema.cls:
        raise ConfigError(f"not a control message: {_show(msg)}")
    wire: dict[str, object] = {"t": schema.name}
    for name, _check in schema.fields:
        wire[name] = _to_wire(getattr(msg, name))
    try:
        schema.build(wire, schema.name)
    except RemoteProtocolError as exc:
        raise ConfigError(f"cannot encode {schema.name} message: {exc}") from None
    try:
        body: bytes = msgpack.packb(wire, use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a lone surrogate in a str
        raise ConfigError(f"cannot encode {schema.name} message: {exc}") from None
    if len(body) > max_message_size:
        raise ConfigError(
            f"{schema.name} message is {len(body)} bytes, over the {max_message_size}-byte limit"
        )
    return _LENGTH.pack(len(body)) + body


def encode_data_record(marker: VfioMigFlag, payload_len: int) -> bytes:
    """The frame announcing ``payload_len`` raw bytes after a VFIO data/config marker."""
    return encode_message(VfioRecord(marker, payload_len))


def _pairs_hook(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # A repeated key would silently overwrite an earlier value: refuse instead.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise RemoteProtocolError("control message: duplicate key in a map")
    return result


def decode_message(body: bytes | bytearray | memoryview) -> ControlMessage:
    """Decode and validate one message body (the bytes after the length prefix)."""
    limit = len(body)
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_pairs_hook,
            max_str_len=limit,
            max_bin_len=0,  # no field is binary; bulk bytes travel outside msgpack
            max_array_len=min(limit, MAX_ENTRIES),
            max_map_len=min(limit, MAX_ENTRIES),
            max_ext_len=0,
        )
    except RemoteProtocolError:
        raise
    except msgpack.ExtraData:
        raise RemoteProtocolError("control message: junk after the msgpack map") from None
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"control message is not valid msgpack: {exc}") from None
    if type(value) is not dict:
        raise _bad("control message", "a map", value)
    kind = value.get("t")
    if type(kind) is not str:
        raise _bad("control message field 't'", "a message type string", kind)
    schema = _SCHEMAS.get(kind)
    if schema is None:
        raise RemoteProtocolError(f"unknown control message type {kind[:MAX_NAME_LEN]!r}")
    message: ControlMessage = schema.build(value, kind)
    return message


# --------------------------------------------------------------------------------------
# Stream decoder


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """One control message; ``payload`` holds the raw bytes that followed a
    :class:`VfioRecord` with ``size > 0`` (received in place), else None."""

    message: ControlMessage
    payload: memoryview | None


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The peer closed the stream at a message boundary."""


ControlEvent: TypeAlias = MessageReceived | StreamClosed


class _Stage(Enum):
    PREAMBLE = "main channel preamble"
    LENGTH = "control message length"
    BODY = "control message"
    LARGE_BODY = "large control message"
    PAYLOAD = "VFIO record payload"


class ControlDecoder(StreamDecoder[ControlEvent]):
    """Decode the main channel (``expect_preamble=True``) or the return path.

    Same ``buffer()`` / ``advance(n)`` / ``eof()`` contract as
    :class:`protocol.channel.ChannelDecoder`.  Messages that fit the internal buffer
    are parsed from it (several per ``recv``); larger ones (up to
    ``max_message_size``) get a buffer of their exact, already validated size.
    """

    def __init__(
        self,
        *,
        expect_preamble: bool,
        max_message_size: int = MAX_CONTROL_MESSAGE,
        max_data_size: int = MAX_DATA_PAYLOAD,
        allocate: Allocator | None = None,
        channel: str = "",
    ) -> None:
        super().__init__(channel=channel)
        if type(max_message_size) is not int or not 1 <= max_message_size <= _U32:
            raise ConfigError(f"max_message_size must be 1..{_U32}, got {max_message_size!r}")
        if type(max_data_size) is not int or max_data_size < 1:
            raise ConfigError(f"max_data_size must be positive, got {max_data_size!r}")
        self._max_message = max_message_size
        self._max_data = max_data_size
        self._allocate: Allocator = allocate if allocate is not None else default_allocate
        self._stage = _Stage.PREAMBLE if expect_preamble else _Stage.LENGTH
        self._length = 0
        self._record: VfioRecord | RamPages | None = None
        self._messages = 0

    @property
    def messages_received(self) -> int:
        return self._messages

    def _want(self) -> int:
        if self._stage is _Stage.PREAMBLE:
            return PREAMBLE_SIZE
        if self._stage is _Stage.LENGTH:
            return LENGTH_PREFIX_SIZE
        assert self._stage is _Stage.BODY, self._stage
        return self._length

    def _step(self, chunk: memoryview, events: list[ControlEvent]) -> None:
        if self._stage is _Stage.PREAMBLE:
            check_preamble(chunk)
            self._stage = _Stage.LENGTH
        elif self._stage is _Stage.LENGTH:
            (length,) = _LENGTH.unpack(chunk)
            if not 1 <= length <= self._max_message:
                raise LimitExceededError(
                    f"control message length {length} outside 1..{self._max_message}",
                    limit=self._max_message,
                    value=length,
                )
            self._length = length
            if length <= len(self._buf):
                self._stage = _Stage.BODY
            else:
                # Too big for the internal buffer; the size was validated above.
                self._stage = _Stage.LARGE_BODY
                self._start_sink(memoryview(bytearray(length)))
        else:
            self._deliver(decode_message(chunk), events)

    def _deliver(self, message: ControlMessage, events: list[ControlEvent]) -> None:
        self._messages += 1
        if isinstance(message, (VfioRecord, RamPages)) and message.size:
            if message.size > self._max_data:
                what = (f"vfio record ({message.marker.name})"
                        if isinstance(message, VfioRecord) else "ram-pages record")
                raise LimitExceededError(
                    f"{what} announces {message.size} bytes, "
                    f"over the limit of {self._max_data}",
                    limit=self._max_data,
                    value=message.size,
                )
            self._record = message
            self._stage = _Stage.PAYLOAD
            self._start_sink(claim_buffer(self._allocate, message.size))
            return
        self._stage = _Stage.LENGTH
        events.append(MessageReceived(message, None))

    def _sink_done(self, sink: memoryview, events: list[ControlEvent]) -> None:
        if self._stage is _Stage.LARGE_BODY:
            self._deliver(decode_message(sink), events)
            return
        assert self._record is not None
        events.append(MessageReceived(self._record, sink))
        self._record = None
        self._stage = _Stage.LENGTH

    def _at_boundary(self) -> bool:
        return self._stage is _Stage.LENGTH

    def _truncation(self, buffered: int, sink_filled: int) -> tuple[str, int, int]:
        stage = self._stage
        if stage is _Stage.PAYLOAD:
            assert self._record is not None
            return stage.value, sink_filled, self._record.size
        if stage is _Stage.LARGE_BODY:
            return stage.value, sink_filled, self._length
        return stage.value, buffered, self._want()

    def _closed_event(self) -> ControlEvent:
        return StreamClosed()
