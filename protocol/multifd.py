"""Multifd channel packets: byte layouts, encoders and validating decoders.

This module owns the bytes that travel on a multifd channel, byte-identical with
QEMU 10.x (and, for RAM packets, readable from QEMU before 9.0 as well):

* :class:`ChannelInit` -- the 64-byte handshake every channel starts with;
* :class:`PacketHeader` -- the 12-byte header in front of every later packet;
* :class:`RamPacket` -- a RAM page packet (fixed header + offset array), in the
  9.0+ layout (:attr:`RamLayout.V2`) or the older one (:attr:`RamLayout.V1`);
* :class:`DeviceStateHeader` -- the 276-byte header of a 10.0+ device-state packet.

It is pure: it turns values into bytes and bytes into values, nothing else.  Streaming
(splitting a byte stream into packets, receiving payloads in place) lives in
:mod:`protocol.channel`.  Every decoder validates every field it reads and raises a
:class:`~protocol.errors.RemoteProtocolError` subclass naming the field and the value;
every encoder rejects bad local input with :class:`~protocol.errors.ConfigError`.
"""

from __future__ import annotations

import functools
import struct
import uuid as _uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from functools import reduce
from operator import or_

from protocol.errors import (
    BadFlagsError,
    BadMagicError,
    BadVersionError,
    ConfigError,
    HandshakeError,
    LimitExceededError,
    RemoteProtocolError,
    UnknownDeviceError,
)

__all__ = [
    "MULTIFD_MAGIC",
    "MULTIFD_VERSION",
    "MULTIFD_PACKET_SIZE",
    "INIT_SIZE",
    "PACKET_HEADER_SIZE",
    "DEVICE_STATE_HEADER_SIZE",
    "DEVICE_STATE_BODY_SIZE",
    "RAM_PACKET_FIXED_SIZE",
    "RAM_BODY_FIXED_SIZE",
    "RAMBLOCK_NAME_SIZE",
    "DEFAULT_MAX_DEVICE_PAYLOAD",
    "MAX_CHANNELS",
    "MIN_PAGE_SIZE",
    "MAX_PAGE_COUNT",
    "COMPRESSED_SLACK",
    "PacketFlags",
    "COMPRESSION_MASK",
    "COMPRESSION_MASK_V1",
    "KNOWN_FLAGS",
    "RamLayout",
    "ram_page_count",
    "ram_packet_size",
    "max_compressed_size",
    "ChannelInit",
    "PacketHeader",
    "DeviceStateHeader",
    "RamPacket",
    "encode_ram_run",
]

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
#: Bytes of guest RAM one RAM packet describes at most (QEMU's batch size).
MULTIFD_PACKET_SIZE = 512 * 1024
INIT_SIZE = 64
PACKET_HEADER_SIZE = 12
DEVICE_STATE_HEADER_SIZE = 276
DEVICE_STATE_BODY_SIZE = DEVICE_STATE_HEADER_SIZE - PACKET_HEADER_SIZE  # 264
#: RAM packet bytes before the offset array (header included).
RAM_PACKET_FIXED_SIZE = 320
RAM_BODY_FIXED_SIZE = RAM_PACKET_FIXED_SIZE - PACKET_HEADER_SIZE  # 308
RAMBLOCK_NAME_SIZE = 256
#: Default bound on a device-state packet's payload.  QEMU's VFIO sender uses at most
#: 1 MiB of data per packet; 16 MiB leaves room for other devices' buffers while
#: keeping one hostile header from making us allocate gigabytes.
DEFAULT_MAX_DEVICE_PAYLOAD = 16 * 1024 * 1024
#: The channel id is a uint8 and QEMU caps multifd-channels at 255.
MAX_CHANNELS = 255
#: RAM_SAVE_FLAG_* live in the low 10 bits of page offsets, so target pages are >= 1 KiB.
MIN_PAGE_SIZE = 1024
MAX_PAGE_COUNT = MULTIFD_PACKET_SIZE // MIN_PAGE_SIZE  # 512
#: Extra bytes a compressed payload may take beyond twice its input (stream framing,
#: flush markers); QEMU's own receive buffers are about twice the batch size.
COMPRESSED_SLACK = 64 * 1024

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


class PacketFlags(IntFlag):
    """Bits of the ``flags`` word of a multifd packet header."""

    SYNC = 0x01
    ZLIB = 0x02
    ZSTD = 0x04
    QPL = 0x08
    UADK = 0x10
    QATZIP = 0x20
    DEVICE_STATE = 0x40


#: The compression-method field (5 bits since 9.1; a value, not a set of options).
COMPRESSION_MASK = 0x3E
#: Before 9.0 the method field had 3 bits (none, zlib, zstd).
COMPRESSION_MASK_V1 = 0x0E
KNOWN_FLAGS = 0x7F
_KNOWN_FLAGS_V1 = PacketFlags.SYNC | COMPRESSION_MASK_V1
# Plain ints for the per-packet tests: ``int & IntFlag`` builds an IntFlag each time,
# a microsecond in enum's Python code.
_SYNC = int(PacketFlags.SYNC)
_DEVICE_STATE = int(PacketFlags.DEVICE_STATE)
_COMPRESSION_METHODS = frozenset(
    {0, PacketFlags.ZLIB, PacketFlags.ZSTD, PacketFlags.QPL, PacketFlags.UADK, PacketFlags.QATZIP}
)
_COMPRESSION_METHODS_V1 = frozenset({0, PacketFlags.ZLIB, PacketFlags.ZSTD})


class RamLayout(IntEnum):
    """Which RAM packet layout the peer writes."""

    V1 = 1  # before QEMU 9.0: bytes 32..63 unused, offsets = normal pages only
    V2 = 2  # 9.0+: zero_pages at 32, offsets = normal pages then zero pages


_INIT = struct.Struct(">II16sB7x32x")
_HEADER = struct.Struct(">III")
_DEVICE_BODY = struct.Struct(">256sII")
# pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages, unused32[1],
# unused64[3], ramblock.  Before 9.0 the 32 bytes from zero_pages on were unused64[4].
_RAM_BODY = struct.Struct(">IIIQI4x24x256s")

assert _INIT.size == INIT_SIZE
assert _HEADER.size == PACKET_HEADER_SIZE
assert _DEVICE_BODY.size == DEVICE_STATE_BODY_SIZE
assert _RAM_BODY.size == RAM_BODY_FIXED_SIZE


@functools.lru_cache(maxsize=MAX_PAGE_COUNT + 1)
def _offsets(count: int) -> struct.Struct:
    # One precompiled Struct per array length; counts are bounded by MAX_PAGE_COUNT.
    return struct.Struct(f">{count}Q")


@functools.lru_cache(maxsize=4 * MAX_PAGE_COUNT)
def _run_terms(count: int, page_size: int) -> tuple[int, int]:
    """(K, C) such that ``first * K + C``, as ``8 * count`` big-endian bytes, is the
    offset array of ``count`` pages at consecutive offsets from ``first`` (as long as
    the last offset fits a uint64, no lane carries into the next): one big-int
    operation instead of ``count`` Python ints, to build that array or to recognise it."""
    k = c = 0
    for i in range(count):
        k = (k << 64) | 1
        c = (c << 64) | (i * page_size)
    return k, c


def _check_page_size(page_size: int) -> None:
    if (
        type(page_size) is not int
        or page_size < MIN_PAGE_SIZE
        or page_size > MULTIFD_PACKET_SIZE
        or page_size & (page_size - 1)
    ):
        raise ConfigError(
            f"page_size must be a power of two between {MIN_PAGE_SIZE} and "
            f"{MULTIFD_PACKET_SIZE}, got {page_size!r}"
        )


def _check_page_count(page_count: int) -> None:
    if type(page_count) is not int or not 1 <= page_count <= MAX_PAGE_COUNT:
        raise ConfigError(f"page_count must be 1..{MAX_PAGE_COUNT}, got {page_count!r}")


def ram_page_count(page_size: int, packet_size: int = MULTIFD_PACKET_SIZE) -> int:
    """Pages per RAM packet for a target page size: ``packet_size // page_size``.

    QEMU's packets describe :data:`MULTIFD_PACKET_SIZE` bytes (128 pages of 4 KiB);
    ours may describe more when both ends agree (``x-multifd-packet-size``).  The
    count sets the length of every RAM packet's offset array, so both ends must use
    the same one.
    """
    _check_page_size(page_size)
    if (type(packet_size) is not int or packet_size < page_size
            or packet_size & (packet_size - 1)):
        raise ConfigError(f"RAM packet size must be a power of two of at least the page "
                          f"size ({page_size}), got {packet_size!r}")
    count = packet_size // page_size
    if count > MAX_PAGE_COUNT:
        raise ConfigError(f"RAM packet size {packet_size} holds {count} pages of "
                          f"{page_size} bytes; at most {MAX_PAGE_COUNT} fit a packet")
    return count


def ram_packet_size(page_count: int) -> int:
    """Wire size of a RAM packet without payload: fixed part plus full offset array."""
    _check_page_count(page_count)
    return RAM_PACKET_FIXED_SIZE + 8 * page_count


def max_compressed_size(normal_pages: int, page_size: int) -> int:
    """Largest compressed payload accepted for ``normal_pages`` pages.

    Incompressible pages grow a little under zlib or zstd (the 10.0 captures show
    524455 bytes for 524288 of input); twice the input plus a fixed slack is far above
    any real codec's worst case yet still bounds the allocation.
    """
    return normal_pages * page_size * 2 + COMPRESSED_SLACK


def _u32_arg(value: int, what: str, *, low: int = 0) -> None:
    if type(value) is not int or not low <= value <= _U32:
        raise ConfigError(f"{what} must be an integer in {low}..{_U32}, got {value!r}")


def _encode_name(name: str, what: str) -> bytes:
    """Encode a name for a 256-byte NUL-terminated field, rejecting what won't fit."""
    if not isinstance(name, str):
        raise ConfigError(f"{what} must be a str, got {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what} {name!r} is not encodable as UTF-8 ({exc.reason})") from None
    if len(raw) > RAMBLOCK_NAME_SIZE - 1:
        raise ConfigError(
            f"{what} {name!r} is {len(raw)} bytes in UTF-8; at most {RAMBLOCK_NAME_SIZE - 1} fit"
        )
    if b"\0" in raw:
        raise ConfigError(f"{what} {name!r} contains a NUL character")
    return raw


def _decode_name(raw: bytes, what: str) -> str:
    """Decode a 256-byte NUL-terminated, zero-padded name field."""
    # QEMU merely overwrites the last byte with NUL; a peer that fills all 256 bytes
    # is broken, so we refuse rather than silently truncate its name.
    if raw[-1] != 0:
        raise RemoteProtocolError(f"{what} not NUL-terminated (byte {len(raw) - 1} is {raw[-1]:#04x})")
    name = raw[: raw.index(0)]
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"{what} {name!r} is not valid UTF-8 ({exc.reason})") from None


def _check_magic_version(magic: int, version: int, what: str) -> None:
    if magic != MULTIFD_MAGIC:
        raise BadMagicError(f"{what}: bad magic {magic:#010x} (expected {MULTIFD_MAGIC:#010x})")
    if version != MULTIFD_VERSION:
        raise BadVersionError(f"{what}: unsupported version {version} (expected {MULTIFD_VERSION})")


def _check_known_flags(flags: int, known: int, what: str) -> None:
    unknown = flags & ~known
    if unknown:
        raise BadFlagsError(f"{what}: unknown flag bits {unknown:#x} in flags {flags:#x}")


@dataclass(frozen=True, slots=True)
class ChannelInit:
    """The handshake a source writes once at the start of each multifd channel."""

    uuid: bytes  # 16 raw bytes of the source VM's UUID (all zero if it has none)
    channel_id: int

    def encode(self) -> bytes:
        if not isinstance(self.uuid, bytes) or len(self.uuid) != 16:
            raise ConfigError(f"channel init uuid must be 16 raw bytes, got {self.uuid!r}")
        if type(self.channel_id) is not int or not 0 <= self.channel_id < MAX_CHANNELS:
            raise ConfigError(f"channel_id must be 0..{MAX_CHANNELS - 1}, got {self.channel_id!r}")
        return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, self.uuid, self.channel_id)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> ChannelInit:
        if len(data) != INIT_SIZE:
            message = f"multifd channel init must be {INIT_SIZE} bytes, got {len(data)}"
            if len(data) > INIT_SIZE:
                raise LimitExceededError(message, limit=INIT_SIZE, value=len(data))
            raise RemoteProtocolError(message)
        magic, version, raw_uuid, channel_id = _INIT.unpack(data)
        _check_magic_version(magic, version, "multifd channel init")
        # The 39 unused bytes are not checked: QEMU neither checks nor promises them.
        return cls(uuid=raw_uuid, channel_id=channel_id)

    @property
    def uuid_text(self) -> str:
        """The UUID in canonical text form (for messages and logs)."""
        return str(_uuid.UUID(bytes=bytes(self.uuid)))

    def validate(self, *, expected_uuid: bytes, channels: int, connected: Collection[int]) -> None:
        """Check this init against the destination's VM and the channels already set up.

        Same order as QEMU (UUID, id range, duplicate) except that ``channel_id ==
        channels`` is rejected too: QEMU's ``id > channels`` test lets it index one
        past its array.
        """
        if type(channels) is not int or not 1 <= channels <= MAX_CHANNELS:
            raise ConfigError(f"channels must be 1..{MAX_CHANNELS}, got {channels!r}")
        if not isinstance(expected_uuid, bytes) or len(expected_uuid) != 16:
            raise ConfigError(f"expected_uuid must be 16 raw bytes, got {expected_uuid!r}")
        if self.uuid != expected_uuid:
            raise HandshakeError(
                f"multifd channel {self.channel_id}: source VM UUID {self.uuid_text} does not "
                f"match ours {_uuid.UUID(bytes=expected_uuid)}"
            )
        if self.channel_id >= channels:
            raise HandshakeError(
                f"multifd channel id {self.channel_id} out of range: only {channels} channels "
                f"(ids 0..{channels - 1}) are configured"
            )
        if self.channel_id in connected:
            raise HandshakeError(f"multifd channel {self.channel_id} already set up")


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """The 12-byte header in front of every packet after the init message."""

    flags: int

    def encode(self) -> bytes:
        if type(self.flags) is not int and not isinstance(self.flags, PacketFlags):
            raise ConfigError(f"flags must be an int, got {self.flags!r}")
        if self.flags < 0 or self.flags & ~KNOWN_FLAGS:
            raise ConfigError(f"flags {self.flags:#x} has bits outside {KNOWN_FLAGS:#x}")
        return _HEADER.pack(MULTIFD_MAGIC, MULTIFD_VERSION, self.flags)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> PacketHeader:
        if len(data) != PACKET_HEADER_SIZE:
            raise RemoteProtocolError(
                f"multifd packet header must be {PACKET_HEADER_SIZE} bytes, got {len(data)}"
            )
        magic, version, flags = _HEADER.unpack(data)
        _check_magic_version(magic, version, "multifd packet header")
        _check_known_flags(flags, KNOWN_FLAGS, "multifd packet header")
        return cls(flags=flags)

    @property
    def is_device_state(self) -> bool:
        return bool(self.flags & _DEVICE_STATE)


@dataclass(frozen=True, slots=True)
class DeviceStateHeader:
    """A 10.0+ device-state packet header (flags exactly DEVICE_STATE, 276 bytes).

    ``payload_size`` is the wire's ``next_packet_size``: the opaque device payload that
    follows (for VFIO, a :class:`protocol.vfio.VfioStatePacketHeader` plus data).
    """

    idstr: str
    instance_id: int
    payload_size: int

    def encode(self) -> bytes:
        raw = _encode_name(self.idstr, "device-state idstr")
        if not raw:
            raise ConfigError("device-state idstr must not be empty")
        _u32_arg(self.instance_id, "device-state instance_id")
        _u32_arg(self.payload_size, "device-state payload_size", low=1)
        return _HEADER.pack(
            MULTIFD_MAGIC, MULTIFD_VERSION, PacketFlags.DEVICE_STATE
        ) + _DEVICE_BODY.pack(raw, self.instance_id, self.payload_size)

    @classmethod
    def decode_body(
        cls,
        flags: int,
        body: bytes | bytearray | memoryview,
        *,
        max_payload: int = DEFAULT_MAX_DEVICE_PAYLOAD,
    ) -> DeviceStateHeader:
        """Decode the 264 bytes that follow a header whose flags announce device state."""
        _u32_arg(max_payload, "max_payload", low=1)
        what = "device-state packet"
        _check_known_flags(flags, KNOWN_FLAGS, what)
        if not flags & _DEVICE_STATE:
            raise BadFlagsError(f"{what}: flags {flags:#x} lack DEVICE_STATE ({PacketFlags.DEVICE_STATE:#x})")
        if flags & _SYNC:
            raise BadFlagsError(f"{what}: SYNC flag set (flags {flags:#x}); device state is never synced")
        if flags & COMPRESSION_MASK:
            raise BadFlagsError(
                f"{what}: compression bits {flags & COMPRESSION_MASK:#x} set (flags {flags:#x}); "
                "device state is never compressed"
            )
        if len(body) != DEVICE_STATE_BODY_SIZE:
            raise RemoteProtocolError(
                f"{what} body must be {DEVICE_STATE_BODY_SIZE} bytes, got {len(body)}"
            )
        raw_idstr, instance_id, payload_size = _DEVICE_BODY.unpack(body)
        idstr = _decode_name(raw_idstr, f"{what} idstr")
        if not idstr:
            raise RemoteProtocolError(f"{what}: empty idstr")
        if payload_size == 0:
            raise RemoteProtocolError(f"{what} for {idstr!r}/{instance_id}: empty device-state payload")
        if payload_size > max_payload:
            raise LimitExceededError(
                f"{what} for {idstr!r}/{instance_id}: payload of {payload_size} bytes exceeds "
                f"the limit of {max_payload}",
                limit=max_payload,
                value=payload_size,
            )
        return cls(idstr=idstr, instance_id=instance_id, payload_size=payload_size)

    @classmethod
    def decode(
        cls,
        data: bytes | bytearray | memoryview,
        *,
        max_payload: int = DEFAULT_MAX_DEVICE_PAYLOAD,
    ) -> DeviceStateHeader:
        """Decode all 276 bytes (packet header included)."""
        if len(data) != DEVICE_STATE_HEADER_SIZE:
            raise RemoteProtocolError(
                f"device-state packet header must be {DEVICE_STATE_HEADER_SIZE} bytes, got {len(data)}"
            )
        view = memoryview(data)
        header = PacketHeader.decode(view[:PACKET_HEADER_SIZE])
        return cls.decode_body(header.flags, view[PACKET_HEADER_SIZE:], max_payload=max_payload)


@dataclass(frozen=True, slots=True)
class RamPacket:
    """A RAM page packet: which pages of one RAMBlock follow, and how many bytes.

    ``offsets`` holds the ``normal_pages + zero_pages`` meaningful entries of the
    wire's offset array (normal pages first, then zero pages); the rest of the array
    is padding.  ``next_packet_size`` is the number of payload bytes that follow.
    """

    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    zero_pages: int
    ramblock: str
    offsets: tuple[int, ...]
    #: the normal pages lie at consecutive offsets (one span of guest memory): found
    #: by :meth:`decode_body`, so that receivers skip looking at each offset; a
    #: packet built by hand leaves it False, which only costs that look
    normal_run: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def sync_packet(cls, packet_num: int) -> RamPacket:
        """An empty SYNC packet exactly as QEMU 9.0+ writes it."""
        return cls(
            flags=PacketFlags.SYNC,
            pages_alloc=0,
            normal_pages=0,
            next_packet_size=0,
            packet_num=packet_num,
            zero_pages=0,
            ramblock="",
            offsets=(),
        )

    @property
    def is_sync(self) -> bool:
        return bool(self.flags & _SYNC)

    @property
    def compression(self) -> int:
        """The compression-method bits of ``flags`` (0 = none)."""
        return self.flags & COMPRESSION_MASK

    @property
    def normal_offsets(self) -> tuple[int, ...]:
        return self.offsets[: self.normal_pages]

    @property
    def zero_offsets(self) -> tuple[int, ...]:
        return self.offsets[self.normal_pages :]

    def encode(self, page_count: int) -> bytes:
        """The full packet (header, fixed fields, ``page_count`` offsets), no payload."""
        _check_page_count(page_count)
        flags = self.flags
        if type(flags) is not int and not isinstance(flags, PacketFlags):
            raise ConfigError(f"RAM packet flags must be an int, got {flags!r}")
        if flags < 0 or flags & ~KNOWN_FLAGS or flags & _DEVICE_STATE:
            raise ConfigError(f"RAM packet flags {flags:#x} invalid for a RAM packet")
        if flags & COMPRESSION_MASK not in _COMPRESSION_METHODS:
            raise ConfigError(f"RAM packet flags {flags:#x} name more than one compression method")
        for what, value in (
            ("pages_alloc", self.pages_alloc),
            ("normal_pages", self.normal_pages),
            ("zero_pages", self.zero_pages),
            ("next_packet_size", self.next_packet_size),
        ):
            _u32_arg(value, f"RAM packet {what}")
        if type(self.packet_num) is not int or not 0 <= self.packet_num <= _U64:
            raise ConfigError(f"RAM packet packet_num must be a uint64, got {self.packet_num!r}")
        if self.pages_alloc > page_count:
            raise ConfigError(f"RAM packet pages_alloc {self.pages_alloc} > page_count {page_count}")
        count = self.normal_pages + self.zero_pages
        if count > self.pages_alloc:
            raise ConfigError(
                f"RAM packet carries {count} pages but pages_alloc is {self.pages_alloc}"
            )
        if len(self.offsets) != count:
            raise ConfigError(
                f"RAM packet has {len(self.offsets)} offsets for {count} pages "
                f"({self.normal_pages} normal + {self.zero_pages} zero)"
            )
        name = _encode_name(self.ramblock, "RAM packet ramblock")
        if count and not name:
            raise ConfigError("RAM packet carries pages but names no ramblock")
        out = bytearray(RAM_PACKET_FIXED_SIZE + 8 * page_count)
        _HEADER.pack_into(out, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags)
        _RAM_BODY.pack_into(
            out,
            PACKET_HEADER_SIZE,
            self.pages_alloc,
            self.normal_pages,
            self.next_packet_size,
            self.packet_num,
            self.zero_pages,
            name,
        )
        if count:
            try:  # struct rejects what is not an integer in range
                _offsets(count).pack_into(out, RAM_PACKET_FIXED_SIZE, *self.offsets)
            except struct.error:
                bad = next(o for o in self.offsets if type(o) is not int or not 0 <= o <= _U64)
                raise ConfigError(f"RAM packet offset {bad!r} is not a uint64") from None
        return bytes(out)

    @classmethod
    def decode_body(
        cls,
        flags: int,
        body: bytes | bytearray | memoryview,
        *,
        page_count: int,
        page_size: int,
        layout: RamLayout = RamLayout.V2,
        block_size: Callable[[str], int | None] | None = None,
        compression: int | None = None,
    ) -> RamPacket:
        """Decode the bytes after the 12-byte header (``308 + 8*page_count`` of them).

        ``block_size(name)`` returns a RAMBlock's used length or None when there is no
        such block; without it block names and offset bounds are not checked.
        ``compression`` (the method bits this migration negotiated, 0 for none) makes
        packets with pages in another method an error, as QEMU's receiver does.

        Pre-9.0 senders (:attr:`RamLayout.V1`) leave ``next_packet_size``, the block
        name and the offset array stale in packets without normal pages; QEMU never
        reads a payload for those, so we report ``next_packet_size`` 0 for them.
        """
        _check_page_count(page_count)
        _check_page_size(page_size)
        layout = RamLayout(layout)
        what = "RAM packet"
        known = KNOWN_FLAGS if layout is RamLayout.V2 else _KNOWN_FLAGS_V1
        if flags & _DEVICE_STATE:
            raise BadFlagsError(f"{what}: DEVICE_STATE flag set (flags {flags:#x})")
        _check_known_flags(flags, known, f"{what} ({layout.name} layout)")
        method = flags & COMPRESSION_MASK
        if method not in _COMPRESSION_METHODS:
            raise BadFlagsError(f"{what}: flags {flags:#x} name more than one compression method")
        if layout is RamLayout.V1 and method not in _COMPRESSION_METHODS_V1:
            raise BadFlagsError(
                f"{what} (V1 layout): compression method {method:#x} did not exist before QEMU 9.0"
            )
        if len(body) != RAM_BODY_FIXED_SIZE + 8 * page_count:
            raise RemoteProtocolError(
                f"{what} body must be {RAM_BODY_FIXED_SIZE + 8 * page_count} bytes for "
                f"{page_count} pages, got {len(body)}"
            )
        (
            pages_alloc,
            normal_pages,
            next_packet_size,
            packet_num,
            zero_pages,
            raw_block,
        ) = _RAM_BODY.unpack_from(body, 0)
        if layout is RamLayout.V1:
            zero_pages = 0  # those bytes were unused before 9.0: not ours to interpret
        if pages_alloc > page_count:
            raise LimitExceededError(
                f"{what}: pages_alloc {pages_alloc} exceeds the {page_count} pages per packet",
                limit=page_count,
                value=pages_alloc,
            )
        if normal_pages > pages_alloc:
            raise LimitExceededError(
                f"{what}: normal_pages {normal_pages} exceeds pages_alloc {pages_alloc}",
                limit=pages_alloc,
                value=normal_pages,
            )
        if zero_pages > pages_alloc - normal_pages:
            raise LimitExceededError(
                f"{what}: zero_pages {zero_pages} exceeds pages_alloc {pages_alloc} "
                f"minus normal_pages {normal_pages}",
                limit=pages_alloc - normal_pages,
                value=zero_pages,
            )
        ramblock = _decode_name(raw_block, f"{what} ramblock")

        if compression is not None:
            # QEMU only checks the method when it has something to decompress; with no
            # normal pages <9.0 senders write 0 while 9.0+ senders keep the method.
            if method != compression and (normal_pages or method):
                raise BadFlagsError(
                    f"{what}: compression bits {method:#x} but this migration uses {compression:#x}"
                )

        if layout is RamLayout.V1 and normal_pages == 0:
            next_packet_size = 0  # stale from the sender's previous packet (see docstring)
        elif method == 0:
            if next_packet_size != normal_pages * page_size:
                raise RemoteProtocolError(
                    f"{what}: next_packet_size {next_packet_size} does not match "
                    f"{normal_pages} normal pages of {page_size} bytes"
                )
        elif normal_pages == 0:
            if next_packet_size != 0:
                raise RemoteProtocolError(
                    f"{what}: next_packet_size {next_packet_size} with no normal pages"
                )
        else:
            limit = max_compressed_size(normal_pages, page_size)
            if next_packet_size == 0:
                raise RemoteProtocolError(
                    f"{what}: empty compressed payload for {normal_pages} normal pages"
                )
            if next_packet_size > limit:
                raise LimitExceededError(
                    f"{what}: compressed next_packet_size {next_packet_size} exceeds the limit "
                    f"of {limit} for {normal_pages} normal pages",
                    limit=limit,
                    value=next_packet_size,
                )

        count = normal_pages + zero_pages
        offsets: tuple[int, ...] = ()
        normal_run = normal_pages == 1
        if count:
            if not ramblock:
                raise RemoteProtocolError(f"{what}: {count} pages but an empty ramblock name")
            offsets = _offsets(count).unpack_from(body, RAM_BODY_FIXED_SIZE)
            used: int | None = None
            if block_size is not None:
                used = block_size(ramblock)
                if used is None:
                    raise UnknownDeviceError(f"{what}: unknown RAM block {ramblock!r}")
            if normal_pages > 1:
                # the usual packet: consecutive normal pages, recognised without a
                # Python int per offset, so receivers take them as one span
                first = offsets[0]
                k, c = _run_terms(normal_pages, page_size)
                normal_run = (first <= _U64 - (normal_pages - 1) * page_size
                              and int.from_bytes(body[RAM_BODY_FIXED_SIZE:RAM_BODY_FIXED_SIZE
                                                      + 8 * normal_pages], "big")
                              == first * k + c)
            # whole-array checks in C (page sizes are powers of two); the loop below
            # only names the first bad offset.  A run's middle lies between its ends.
            checked = ((offsets[0], offsets[normal_pages - 1], *offsets[normal_pages:])
                       if normal_run else offsets)
            if (reduce(or_, checked) & (page_size - 1)
                    or (used is not None and max(checked) > used - page_size)):
                cls._reject_offsets(offsets, page_size, used, ramblock)
        return cls(
            flags=flags,
            pages_alloc=pages_alloc,
            normal_pages=normal_pages,
            next_packet_size=next_packet_size,
            packet_num=packet_num,
            zero_pages=zero_pages,
            ramblock=ramblock,
            offsets=offsets,
            normal_run=normal_run,
        )

    @staticmethod
    def _reject_offsets(offsets: tuple[int, ...], page_size: int, used: int | None,
                        ramblock: str) -> None:
        what = "RAM packet"
        for index, offset in enumerate(offsets):
            if offset % page_size:
                raise RemoteProtocolError(
                    f"{what}: offset[{index}] {offset:#x} in {ramblock!r} is not aligned "
                    f"to the {page_size}-byte page size"
                )
            if used is not None and offset > used - page_size:
                raise RemoteProtocolError(
                    f"{what}: offset[{index}] {offset:#x} is beyond RAM block {ramblock!r} "
                    f"of {used:#x} bytes"
                )

    @classmethod
    def decode(
        cls,
        data: bytes | bytearray | memoryview,
        *,
        page_count: int,
        page_size: int,
        layout: RamLayout = RamLayout.V2,
        block_size: Callable[[str], int | None] | None = None,
        compression: int | None = None,
    ) -> RamPacket:
        """Decode a whole RAM packet (header included, payload excluded)."""
        _check_page_count(page_count)
        expected = RAM_PACKET_FIXED_SIZE + 8 * page_count
        if len(data) != expected:
            raise RemoteProtocolError(
                f"RAM packet must be {expected} bytes for {page_count} pages, got {len(data)}"
            )
        view = memoryview(data)
        header = PacketHeader.decode(view[:PACKET_HEADER_SIZE])
        return cls.decode_body(
            header.flags,
            view[PACKET_HEADER_SIZE:],
            page_count=page_count,
            page_size=page_size,
            layout=layout,
            block_size=block_size,
            compression=compression,
        )


@functools.lru_cache(maxsize=64)
def _name_field(name: str) -> bytes:
    return _encode_name(name, "RAM packet ramblock")


def encode_ram_run(*, page_count: int, page_size: int, packet_num: int, ramblock: str,
                   first: int, pages: int, flags: int = 0) -> bytes:
    """The bytes ``RamPacket(...).encode(page_count)`` gives for ``pages`` normal pages
    at consecutive offsets from byte ``first`` of ``ramblock`` (no zero pages, raw
    payload of ``pages * page_size`` bytes to follow): the sender's common packet,
    built without a Python int per page."""
    _check_page_count(page_count)
    _check_page_size(page_size)
    if flags & ~KNOWN_FLAGS or flags & (_DEVICE_STATE | _SYNC | COMPRESSION_MASK):
        raise ConfigError(f"RAM run flags {flags:#x} invalid for an uncompressed run")
    if type(pages) is not int or not 1 <= pages <= page_count:
        raise ConfigError(f"RAM run of {pages!r} pages; 1..{page_count} fit a packet")
    if (type(first) is not int or first < 0 or first & (page_size - 1)
            or first > _U64 - (pages - 1) * page_size):
        raise ConfigError(f"RAM run offset {first!r} is not a page-aligned uint64")
    if type(packet_num) is not int or not 0 <= packet_num <= _U64:
        raise ConfigError(f"RAM packet packet_num must be a uint64, got {packet_num!r}")
    if not isinstance(ramblock, str):
        raise ConfigError(f"RAM packet ramblock must be a str, got {type(ramblock).__name__}")
    name = _name_field(ramblock)
    if not name:
        raise ConfigError("RAM packet carries pages but names no ramblock")
    out = bytearray(RAM_PACKET_FIXED_SIZE + 8 * page_count)
    _HEADER.pack_into(out, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags)
    _RAM_BODY.pack_into(out, PACKET_HEADER_SIZE, page_count, pages, pages * page_size,
                        packet_num, 0, name)
    k, c = _run_terms(pages, page_size)
    out[RAM_PACKET_FIXED_SIZE:RAM_PACKET_FIXED_SIZE + 8 * pages] = \
        (first * k + c).to_bytes(8 * pages, "big")
    return bytes(out)
