"""Multifd RAM compression: one zlib or zstd stream per channel, as QEMU does it.

A channel keeps one compression stream for the whole migration.  Each RAM packet's
payload is the compressed data of its normal pages, ending at a flush point
(zlib ``Z_SYNC_FLUSH``; zstd ``ZSTD_e_flush``), so the receiver can decompress
each packet completely as it arrives — but only in channel order, with its own
long-lived stream, because later packets refer back to earlier ones.

The decompressor is bounded: it never produces more than the packet's
``normal_pages × page_size`` bytes (plus one to detect excess), whatever the input,
so a hostile peer cannot make it allocate more than one packet's pages.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Protocol

import pyzstd

from protocol.errors import ConfigError, LimitExceededError, RemoteProtocolError
from protocol.multifd import PacketFlags

__all__ = [
    "METHODS",
    "method_flag",
    "method_name",
    "LEVEL_RANGES",
    "PacketCompressor",
    "PacketDecompressor",
]

Buffer = bytes | bytearray | memoryview

#: method name → the packet header flag QEMU uses for it
METHODS: dict[str, int] = {"none": 0, "zlib": int(PacketFlags.ZLIB),
                           "zstd": int(PacketFlags.ZSTD)}
#: valid compression levels per method (QEMU's multifd-zlib-level / -zstd-level)
LEVEL_RANGES: dict[str, tuple[int, int]] = {"zlib": (0, 9), "zstd": (0, 20)}


def method_flag(name: str) -> int:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown multifd compression {name!r}: use "
                          f"{', '.join(METHODS)}") from None


def method_name(flag: int) -> str:
    for name, value in METHODS.items():
        if value == flag:
            return name
    raise RemoteProtocolError(f"unsupported multifd compression flags {flag:#x}")


class _Stream(Protocol):
    def compress(self, parts: Sequence[Buffer]) -> bytes: ...


class PacketCompressor:
    """The sending end of one channel's compression stream."""

    def __init__(self, method: str, level: int = 1) -> None:
        if method not in LEVEL_RANGES:
            raise ConfigError(f"no compressor for multifd compression {method!r}")
        lo, hi = LEVEL_RANGES[method]
        if not lo <= level <= hi:
            raise ConfigError(f"multifd-{method}-level must be {lo}..{hi}, got {level}")
        self.method = method
        self.flag = METHODS[method]
        self._zlib = zlib.compressobj(level) if method == "zlib" else None
        self._zstd = pyzstd.ZstdCompressor(level) if method == "zstd" else None

    def compress(self, parts: Sequence[Buffer]) -> bytes:
        """Compress one packet's pages; the output ends at a flush point."""
        if self._zlib is not None:
            out = [self._zlib.compress(p) for p in parts]
            out.append(self._zlib.flush(zlib.Z_SYNC_FLUSH))
            return b"".join(out)
        assert self._zstd is not None
        mode = pyzstd.ZstdCompressor.CONTINUE
        out = [self._zstd.compress(p, mode) for p in parts[:-1]]
        out.append(self._zstd.compress(parts[-1] if parts else b"",
                                       pyzstd.ZstdCompressor.FLUSH_BLOCK))
        return b"".join(out)


class PacketDecompressor:
    """The receiving end of one channel's compression stream."""

    def __init__(self, method: str) -> None:
        if method not in LEVEL_RANGES:
            raise ConfigError(f"no decompressor for multifd compression {method!r}")
        self.method = method
        self.flag = METHODS[method]
        self._zlib = zlib.decompressobj() if method == "zlib" else None
        self._zstd = pyzstd.ZstdDecompressor() if method == "zstd" else None

    def decompress(self, data: Buffer, expected: int) -> bytes:
        """Exactly ``expected`` bytes from one packet's payload, or a typed error."""
        try:
            if self._zlib is not None:
                out = self._zlib.decompress(data, expected + 1)
                leftover = len(self._zlib.unconsumed_tail)
            else:
                assert self._zstd is not None
                out = self._zstd.decompress(data, expected + 1)
                leftover = 0 if self._zstd.needs_input else 1
        except (zlib.error, pyzstd.ZstdError) as exc:
            raise RemoteProtocolError(f"{self.method} payload does not decompress: {exc}") \
                from None
        if len(out) > expected or leftover:
            raise LimitExceededError(f"{self.method} payload decompresses to more than the "
                                     f"packet's {expected} bytes of pages", limit=expected,
                                     value=len(out))
        if len(out) != expected:
            raise RemoteProtocolError(f"{self.method} payload decompresses to {len(out)} "
                                      f"bytes; the packet's pages need {expected}")
        return out
