"""VFIO device-state framing: the multifd payload header and the main-channel markers.

Two small formats belong to VFIO migration:

* :class:`VfioStatePacketHeader` -- the 12-byte header QEMU 10.0+ puts in front of
  every chunk of a VFIO device's stop-copy state inside a multifd device-state packet
  (``version``, per-device sequence ``idx``, ``flags``);
* :class:`VfioMigFlag` -- the BE64 markers of a VFIO section body on the main channel,
  and the ``DEV_CONFIG_STATE ... END_OF_STATE`` framing of the device config blob that
  the last device-state packet carries (:func:`encode_config_blob`,
  :func:`decode_config_blob`).

Pure encoding and validation; reassembly by ``idx`` and loading belong to the daemons.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from protocol.errors import (
    BadFlagsError,
    BadMagicError,
    BadVersionError,
    ConfigError,
    LimitExceededError,
    RemoteProtocolError,
)

__all__ = [
    "VFIO_STATE_PACKET_HEADER",
    "VFIO_STATE_PACKET_VERSION",
    "IDX_INVALID",
    "MAX_DATA_BUFFER_SIZE",
    "VfioPacketFlags",
    "VfioStatePacketHeader",
    "VfioMigFlag",
    "MARKER",
    "encode_state_packet",
    "decode_state_packet",
    "encode_config_blob",
    "decode_config_blob",
]

#: version, idx, flags -- all BE32.
VFIO_STATE_PACKET_HEADER = struct.Struct(">III")
VFIO_STATE_PACKET_VERSION = 0
IDX_INVALID = 0xFFFFFFFF
#: QEMU reads the device's migration FD in chunks of at most this many bytes.
MAX_DATA_BUFFER_SIZE = 1024 * 1024
#: One BE64 VFIO migration marker.
MARKER = struct.Struct(">Q")


class VfioPacketFlags(IntFlag):
    CONFIG_STATE = 1  # this packet carries the device config and is the device's last


_CONFIG_STATE = int(VfioPacketFlags.CONFIG_STATE)  # a plain int: no IntFlag per packet
_KNOWN_PACKET_FLAGS = _CONFIG_STATE


class VfioMigFlag(IntEnum):
    """BE64 markers of a VFIO section body (top 32 bits set, then 0xef10, then a tag)."""

    END_OF_STATE = 0xFFFFFFFFEF100001
    DEV_CONFIG_STATE = 0xFFFFFFFFEF100002
    DEV_SETUP_STATE = 0xFFFFFFFFEF100003
    DEV_DATA_STATE = 0xFFFFFFFFEF100004
    DEV_INIT_DATA_SENT = 0xFFFFFFFFEF100005
    DEV_CONFIG_LOAD_READY = 0xFFFFFFFFEF100006


@dataclass(frozen=True, slots=True)
class VfioStatePacketHeader:
    """Header of one VFIO device-state chunk (the payload of a multifd device-state packet)."""

    idx: int
    flags: int

    @property
    def is_config(self) -> bool:
        return bool(self.flags & _CONFIG_STATE)

    def encode(self) -> bytes:
        if type(self.idx) is not int or not 0 <= self.idx < IDX_INVALID:
            raise ConfigError(f"VFIO state packet idx must be 0..{IDX_INVALID - 1}, got {self.idx!r}")
        if not isinstance(self.flags, int) or self.flags < 0 or self.flags & ~_KNOWN_PACKET_FLAGS:
            raise ConfigError(f"VFIO state packet flags {self.flags!r} invalid")
        return VFIO_STATE_PACKET_HEADER.pack(VFIO_STATE_PACKET_VERSION, self.idx, self.flags)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> VfioStatePacketHeader:
        """Decode the first 12 bytes of ``data`` (the whole payload may be passed)."""
        if len(data) < VFIO_STATE_PACKET_HEADER.size:
            raise RemoteProtocolError(
                f"device-state packet too short: {len(data)} bytes, the VFIO header alone is "
                f"{VFIO_STATE_PACKET_HEADER.size}"
            )
        version, idx, flags = VFIO_STATE_PACKET_HEADER.unpack_from(data, 0)
        if version != VFIO_STATE_PACKET_VERSION:
            raise BadVersionError(
                f"VFIO device-state packet: unsupported version {version} "
                f"(expected {VFIO_STATE_PACKET_VERSION})"
            )
        if idx == IDX_INVALID:
            raise RemoteProtocolError(f"VFIO device-state packet: invalid idx {idx:#x}")
        unknown = flags & ~_KNOWN_PACKET_FLAGS
        if unknown:
            raise BadFlagsError(
                f"VFIO device-state packet idx {idx}: unknown flag bits {unknown:#x} in flags {flags:#x}"
            )
        return cls(idx=idx, flags=flags)


def encode_state_packet(idx: int, data: bytes | bytearray | memoryview, *, config: bool = False) -> bytes:
    """A whole VFIO device-state chunk: header plus data (config chunks: a config blob)."""
    flags = VfioPacketFlags.CONFIG_STATE if config else 0
    if not config and not 0 < len(data) <= MAX_DATA_BUFFER_SIZE:
        raise ConfigError(f"VFIO data chunk must be 1..{MAX_DATA_BUFFER_SIZE} bytes, got {len(data)}")
    return VfioStatePacketHeader(idx, int(flags)).encode() + bytes(data)


def decode_state_packet(
    payload: bytes | bytearray | memoryview,
    *,
    max_data: int = MAX_DATA_BUFFER_SIZE,
) -> tuple[VfioStatePacketHeader, memoryview]:
    """Split a device-state payload into its VFIO header and a view of its data.

    A data chunk must carry 1..``max_data`` bytes (QEMU never sends an empty read);
    the config chunk's data is the config blob, see :func:`decode_config_blob`.
    """
    header = VfioStatePacketHeader.decode(payload)
    data = memoryview(payload).cast("B")[VFIO_STATE_PACKET_HEADER.size :]
    if not header.is_config:
        if not data:
            raise RemoteProtocolError(f"VFIO device-state packet idx {header.idx}: no data")
        if len(data) > max_data:
            raise LimitExceededError(
                f"VFIO device-state packet idx {header.idx}: {len(data)} bytes of data exceed "
                f"the limit of {max_data}",
                limit=max_data,
                value=len(data),
            )
    return header, data


def encode_config_blob(config: bytes | bytearray | memoryview) -> bytes:
    """``DEV_CONFIG_STATE`` + config + ``END_OF_STATE``, as in the last device-state chunk."""
    return (
        MARKER.pack(VfioMigFlag.DEV_CONFIG_STATE)
        + bytes(config)
        + MARKER.pack(VfioMigFlag.END_OF_STATE)
    )


def decode_config_blob(data: bytes | bytearray | memoryview) -> memoryview:
    """Check the markers around a config blob and return a view of the config bytes."""
    view = memoryview(data).cast("B")
    if len(view) < 2 * MARKER.size:
        raise RemoteProtocolError(
            f"VFIO config blob too short: {len(view)} bytes, the two markers alone are {2 * MARKER.size}"
        )
    (first,) = MARKER.unpack_from(view, 0)
    if first != VfioMigFlag.DEV_CONFIG_STATE:
        raise BadMagicError(
            f"VFIO config blob starts with marker {first:#018x}, expected DEV_CONFIG_STATE "
            f"{VfioMigFlag.DEV_CONFIG_STATE:#018x}"
        )
    (last,) = MARKER.unpack_from(view, len(view) - MARKER.size)
    if last != VfioMigFlag.END_OF_STATE:
        raise BadMagicError(
            f"VFIO config blob ends with marker {last:#018x}, expected END_OF_STATE "
            f"{VfioMigFlag.END_OF_STATE:#018x}"
        )
    return view[MARKER.size : len(view) - MARKER.size]
