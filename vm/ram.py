"""Guest RAM of the simulated VM: RAM blocks, dirty tracking, and page apply.

This module is responsible for the memory a live migration moves, modelled on
QEMU's ``RAMBlock`` list plus the two bitmaps that drive pre-copy (spec §2.5,
§2.9, §3):

* configuration -- :func:`parse_memory_option` (``-m``-like: ``1G``,
  ``size=1G,fill=random,seed=3,block=vga.vram:16M``) into a
  :class:`MemoryConfig`, and :func:`parse_memory_backend` (``anonymous`` or
  ``file:DIR[,share=on|off]``) into a :class:`BackendConfig`;
* memory -- one :class:`RamBlock` per named block, each its own mapping
  (anonymous, or one file per block under a directory so migrated RAM can be
  inspected afterwards, e.g. under ``/dev/shm``), allocated and filled
  (source) or pre-faulted (destination) off the event loop by
  :meth:`GuestRam.prepare`;
* dirty tracking on the source -- a *live log* (KVM's dirty log: every guest
  write marks a byte) and the *migration bitmap* (QEMU's
  ``RAMBlock.bmap``), one byte per page so that scans and merges run in C
  (``bytearray.find``, big-int OR) instead of Python loops over pages;
  :meth:`GuestRam.next_dirty_batch` hands out up to 128 dirty pages of one
  block at a time, the unit of a multifd RAM packet;
* applying pages on the destination -- :meth:`GuestRam.write_pages` and
  :meth:`GuestRam.zero_pages` with QEMU's "received" bitmap, so a zero page is
  only written when it overwrites something received earlier;
* verification -- an xxh3-128 :meth:`GuestRam.digest` over every block.

Threading: the bitmaps are plain ``bytearray``s without locks.  Dirty
tracking and page apply are meant to be called from one thread (the event
loop); :meth:`GuestRam.prepare` and :meth:`GuestRam.digest_async` run in
worker threads while nothing else touches the memory.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import itertools
import mmap
import os
import random
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import reduce
from operator import itemgetter, or_
from pathlib import Path
from typing import Final, Literal

import xxhash

from protocol.errors import ConfigError, DeviceError, StateError
from vm.properties import BOOL_WORDS, GiB, MiB, format_size, parse_size
from vm.memory import allocate_anonymous, prefault
from vm.vfio_sim import Role

__all__ = [
    "TARGET_PAGE_SIZE",
    "ZERO_PAGE",
    "MAX_RAM_SIZE",
    "MAIN_BLOCK",
    "FILL_KINDS",
    "BACKEND_KINDS",
    "MemoryConfig",
    "BackendConfig",
    "ANONYMOUS_BACKEND",
    "parse_memory_option",
    "parse_memory_backend",
    "block_file_name",
    "is_zero_page",
    "RamBlock",
    "GuestRam",
]

#: QEMU's ``TARGET_PAGE_SIZE`` for x86: the unit of dirty tracking and of RAM packets.
TARGET_PAGE_SIZE: Final = 4096
#: One page of zeros; :func:`is_zero_page` compares against it with ``memcmp``.
ZERO_PAGE: Final = bytes(TARGET_PAGE_SIZE)
#: Upper bound for the total guest RAM (all blocks): a typo like ``1T`` must fail
#: at parse time, not as an allocation failure during ``prepare``.
MAX_RAM_SIZE: Final = 64 * GiB
#: The name of the main RAM block (QEMU's pc machine), always the first block.
MAIN_BLOCK: Final = "pc.ram"
FILL_KINDS: Final = ("zero", "random", "mixed")
BACKEND_KINDS: Final = ("anonymous", "file")
#: Longest block name: the wire carries it as a counted string (u8 length) and in
#: a 256-byte NUL-terminated field (spec §2.5, §2.9).
_MAX_NAME_BYTES: Final = 255
_UINT64_MAX: Final = (1 << 64) - 1
_TILE_SIZE: Final = 1 * MiB


def page_runs(offsets: Sequence[int], page_size: int) -> list[tuple[int, int, int, int]]:
    """Maximal runs of consecutive page offsets: (first index, end index, start byte,
    stop byte) — one memcpy, one receive or one send view per run; the first round
    and sequential writers give long runs."""
    n = len(offsets)
    if n > 1 and offsets[-1] - offsets[0] == (n - 1) * page_size and \
            tuple(offsets) == tuple(range(offsets[0], offsets[-1] + 1, page_size)):
        return [(0, n, offsets[0], offsets[-1] + page_size)]  # one run, compared in C
    runs = []
    i = 0
    while i < n:
        start = offsets[i]
        j = i + 1
        stop = start + page_size
        while j < n and offsets[j] == stop:
            j += 1
            stop += page_size
        runs.append((i, j, start, stop))
        i = j
    return runs


def run_is_normal(words: memoryview, first: int, n: int, page_size: int) -> bool:
    """Whether none of the ``n`` pages from index ``first`` starts with a zero word
    (``words``: the block cast to ``'Q'``): then every one of them is a normal page.

    The first words are gathered through one strided view and searched as bytes
    (``0 in view`` would make a Python int of every word: twice as slow).
    """
    step = page_size // 8
    return not has_zero_word(words[first * step:(first + n) * step:step].tobytes())


_ZERO_WORD: Final = bytes(8)
#: zeros to compare a stretch of zero-looking pages with, a piece at a time
_ZERO_RUN: Final = bytes(512 * 1024)
_ZERO_RUN_LEN: Final = len(_ZERO_RUN)


def has_zero_word(data: bytes) -> bool:
    """Whether an aligned 8-byte word of ``data`` is zero (zero bytes straddling two
    words do not count)."""
    at = data.find(_ZERO_WORD)
    while at >= 0:
        if not at & 7:
            return True
        at = data.find(_ZERO_WORD, (at | 7) + 1)  # the next aligned word on
    return False


def split_zero_pages(view: memoryview, pages: Sequence[int], page_size: int,
                     words: memoryview) -> tuple[list[int], list[int]]:
    """Byte offsets of the normal and of the all-zero pages among page indices
    ``pages`` of a block (``view``, and ``words``: the same memory cast to ``'Q'``).

    A page whose first or last 8 bytes are not zero is normal without looking
    further: that settles almost every page of real data with two word reads; only
    the others get the full compare.
    """
    normal: list[int] = []
    zero: list[int] = []
    step = page_size // 8
    n = len(pages)
    first = pages[0] if n else 0
    if n > 1 and ((type(pages) is range and pages.step == 1) or (
            pages[-1] - first == n - 1 and tuple(pages) == tuple(range(first, first + n)))):
        # a run (the usual case): when no page starts with a zero word, every page
        # is normal — no Python loop over the pages
        if run_is_normal(words, first, n, page_size):
            return list(range(first * page_size, (first + n) * page_size, page_size)), zero
        return _split_run(view, first, n, page_size, words)
    for index in pages:
        w = index * step
        off = index * page_size
        if words[w] or words[w + step - 1] or not ZERO_PAGE.startswith(view[off:off + page_size]):
            normal.append(off)
        else:
            zero.append(off)
    return normal, zero


def _split_run(view: memoryview, first: int, n: int, page_size: int,
               words: memoryview) -> tuple[list[int], list[int]]:
    """:func:`split_zero_pages` of the ``n`` pages from index ``first``, some of which
    start with a zero word: their first words gathered in C, and each stretch of
    such pages compared with zeros in one go (in guest RAM that mixes data and zero
    pages, zero pages come in stretches)."""
    step = page_size // 8
    lo = first * step
    heads = words[lo:lo + n * step:step].tolist()
    base = first * page_size
    normal: list[int] = []
    zero: list[int] = []
    i = 0
    while i < n:
        if heads[i]:
            normal.append(base + i * page_size)
            i += 1
            continue
        j = i + 1
        while j < n and not heads[j]:
            j += 1
        start, stop = base + i * page_size, base + j * page_size
        if all(_ZERO_RUN.startswith(view[at:min(at + _ZERO_RUN_LEN, stop)])
               for at in range(start, stop, _ZERO_RUN_LEN)):
            zero.extend(range(start, stop, page_size))
        else:  # a page that starts with a zero word but is not all zero
            for off in range(start, stop, page_size):
                if ZERO_PAGE.startswith(view[off:off + page_size]):
                    zero.append(off)
                else:
                    normal.append(off)
        i = j
    return normal, zero


def is_zero_page(view: memoryview | bytes | bytearray) -> bool:
    """Whether ``view`` (normally one page) is all zero bytes.

    ``memoryview == bytes`` compares item by item (~7 us per page);
    ``ZERO_PAGE.startswith(view)`` is a single ``memcmp`` (~0.1 us).  Views longer
    than a page are checked page by page.
    """
    n = len(view) if not isinstance(view, memoryview) else view.nbytes
    if n <= TARGET_PAGE_SIZE:
        return ZERO_PAGE.startswith(view)
    mv = memoryview(view).cast("B") if isinstance(view, memoryview) else memoryview(view)
    for start in range(0, n, TARGET_PAGE_SIZE):
        if not ZERO_PAGE.startswith(mv[start : start + TARGET_PAGE_SIZE]):
            return False
    return True


# -- configuration ---------------------------------------------------------------


def _check_block_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"invalid RAM block name {name!r}: must be a non-empty string")
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        raise ConfigError(
            f"invalid RAM block name {name!r}: longer than {_MAX_NAME_BYTES} bytes"
        )
    if "\0" in name or "," in name:
        raise ConfigError(f"invalid RAM block name {name!r}: must not contain NUL or ','")
    return name


def _check_block_size(name: str, size: object, text: str | None = None) -> int:
    shown = text if text is not None else repr(size)
    if isinstance(size, bool) or not isinstance(size, int):
        raise ConfigError(f"RAM block {name!r}: invalid size {shown}: must be an integer")
    if size <= 0:
        raise ConfigError(f"RAM block {name!r}: invalid size {shown}: must be greater than 0")
    if size % TARGET_PAGE_SIZE:
        raise ConfigError(
            f"RAM block {name!r}: invalid size {shown}: "
            f"must be a multiple of the {TARGET_PAGE_SIZE}-byte page size"
        )
    if size > MAX_RAM_SIZE:
        raise ConfigError(
            f"RAM block {name!r}: invalid size {shown}: at most {format_size(MAX_RAM_SIZE)}"
        )
    return size


def _parse_seed(text: str) -> int:
    try:
        number = int(text, 0)
    except ValueError:
        raise ConfigError(f"invalid seed {text!r}: expected an integer in 0..2^64-1") from None
    if not 0 <= number <= _UINT64_MAX:
        raise ConfigError(f"invalid seed {text!r}: expected an integer in 0..2^64-1")
    return number


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    """The validated guest RAM layout: named blocks, and how the source fills them.

    ``size`` is the main RAM (``-m``), block :data:`MAIN_BLOCK`; ``blocks`` is the
    complete ordered block list and must start with ``("pc.ram", size)`` --
    leave it empty to get exactly that one block.  Extra blocks (``vga.vram``,
    ``rom``...) come *in addition* to ``size``; :attr:`total_size` is the sum.

    ``fill`` is the source's initial content: ``zero`` (fresh memory),
    ``random`` (every page random and distinct, from ``seed``) or ``mixed``
    (deterministically from ``seed``, about half the pages zero and the rest
    random -- exercises zero-page detection).
    """

    size: int
    blocks: tuple[tuple[str, int], ...] = ()
    fill: str = "zero"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_block_size(MAIN_BLOCK, self.size)
        blocks = tuple(tuple(b) for b in self.blocks)
        if not blocks:
            blocks = ((MAIN_BLOCK, self.size),)
        seen: set[str] = set()
        total = 0
        for entry in blocks:
            if len(entry) != 2:
                raise ConfigError(f"invalid RAM block {entry!r}: expected (name, size)")
            name = _check_block_name(entry[0])
            if name in seen:
                raise ConfigError(f"duplicate RAM block name {name!r}")
            seen.add(name)
            total += _check_block_size(name, entry[1])
        if blocks[0] != (MAIN_BLOCK, self.size):
            raise ConfigError(
                f"invalid RAM layout: the first block must be ({MAIN_BLOCK!r}, {self.size}) "
                f"(the size), got {blocks[0]!r}"
            )
        if total > MAX_RAM_SIZE:
            raise ConfigError(
                f"invalid RAM layout: total size {format_size(total)} exceeds "
                f"{format_size(MAX_RAM_SIZE)}"
            )
        object.__setattr__(self, "blocks", blocks)
        if self.fill not in FILL_KINDS:
            raise ConfigError(
                f"invalid fill {self.fill!r}: expected one of {', '.join(FILL_KINDS)}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
            0 <= self.seed <= _UINT64_MAX
        ):
            raise ConfigError(f"invalid seed {self.seed!r}: expected an integer in 0..2^64-1")

    @property
    def total_size(self) -> int:
        """Bytes of guest RAM over all blocks."""
        return sum(size for _, size in self.blocks)

    def to_option(self) -> str:
        """The option text; :func:`parse_memory_option` gives this config back."""
        parts = [format_size(self.size)]
        if self.fill != "zero":
            parts.append(f"fill={self.fill}")
        if self.seed != 0:
            parts.append(f"seed={self.seed}")
        parts.extend(f"block={name}:{format_size(size)}" for name, size in self.blocks[1:])
        return ",".join(parts)


def parse_memory_option(text: str) -> MemoryConfig:
    """Parse a guest RAM option: ``1G``, ``size=1G,fill=random,seed=3``,
    ``1G,block=vga.vram:16M,block=rom:2M``.

    A bare size is only allowed first.  ``block=NAME:SIZE`` (split at the last
    ``:``, so names may contain colons) adds a block after ``pc.ram``; it may
    repeat, every other key may not.  Sizes use :func:`vm.properties.parse_size`
    syntax and must be positive multiples of 4096.  Every rejection is a
    :class:`ConfigError` quoting the offending text.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"invalid memory option {text!r}: expected e.g. '1G' or 'size=1G'")
    size: int | None = None
    fill: str | None = None
    seed: int | None = None
    extra: list[tuple[str, int]] = []
    for i, part in enumerate(text.strip().split(",")):
        if not part:
            raise ConfigError(f"invalid memory option {text!r}: empty property (stray ',')")
        key, sep, value = part.partition("=")
        if not sep:
            if i == 0:
                key, value = "size", part
            else:
                raise ConfigError(
                    f"invalid memory option {text!r}: {part!r} has no value (expected name=value)"
                )
        if key == "size":
            if size is not None:
                raise ConfigError(f"invalid memory option {text!r}: duplicate property 'size'")
            size = _check_block_size(MAIN_BLOCK, parse_size(value), repr(value))
        elif key == "fill":
            if fill is not None:
                raise ConfigError(f"invalid memory option {text!r}: duplicate property 'fill'")
            if value not in FILL_KINDS:
                raise ConfigError(
                    f"invalid fill {value!r}: expected one of {', '.join(FILL_KINDS)}"
                )
            fill = value
        elif key == "seed":
            if seed is not None:
                raise ConfigError(f"invalid memory option {text!r}: duplicate property 'seed'")
            seed = _parse_seed(value)
        elif key == "block":
            name, colon, size_text = value.rpartition(":")
            if not colon or not name:
                raise ConfigError(
                    f"invalid memory block {value!r}: expected block=NAME:SIZE, e.g. vga.vram:16M"
                )
            _check_block_name(name)
            try:
                block_size = parse_size(size_text)
            except ConfigError as exc:
                raise ConfigError(f"invalid memory block {value!r}: {exc}") from None
            extra.append((name, _check_block_size(name, block_size, repr(size_text))))
        else:
            raise ConfigError(
                f"invalid memory option {text!r}: unknown property {key!r}; "
                "valid properties: size, fill, seed, block"
            )
    if size is None:
        raise ConfigError(f"invalid memory option {text!r}: the size is required (e.g. '1G')")
    return MemoryConfig(
        size=size,
        blocks=((MAIN_BLOCK, size), *extra),
        fill=fill if fill is not None else "zero",
        seed=seed if seed is not None else 0,
    )


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """Where guest RAM lives.

    ``anonymous``: private anonymous memory (transparent huge pages when the
    kernel allows it).  ``file``: ``path`` is a directory (created if missing)
    holding one file per block, named by :func:`block_file_name`; mapped
    ``MAP_SHARED`` when ``share`` (the file *is* the RAM: after a migration the
    destination's files hold the migrated content) else ``MAP_PRIVATE``.
    """

    kind: str = "anonymous"
    path: str = ""
    share: bool = False

    def __post_init__(self) -> None:
        if self.kind not in BACKEND_KINDS:
            raise ConfigError(
                f"invalid memory backend {self.kind!r}: expected 'anonymous' or 'file:PATH'"
            )
        if not isinstance(self.share, bool):
            raise ConfigError(f"invalid memory backend share={self.share!r}: expected a bool")
        if not isinstance(self.path, str) or "\0" in self.path:
            raise ConfigError(f"invalid memory backend path {self.path!r}")
        if self.kind == "file" and not self.path:
            raise ConfigError("invalid memory backend: 'file' needs a directory, file:PATH")
        if self.kind == "anonymous" and (self.path or self.share):
            raise ConfigError(
                "invalid memory backend: path and share apply only to 'file:PATH' backends"
            )

    def to_option(self) -> str:
        """The option text; :func:`parse_memory_backend` gives this config back."""
        if self.kind == "anonymous":
            return "anonymous"
        text = "file:" + self.path.replace(",", ",,")
        return text + ",share=on" if self.share else text


#: The default backend.
ANONYMOUS_BACKEND: Final = BackendConfig("anonymous")


def parse_memory_backend(text: str) -> BackendConfig:
    """Parse ``anonymous`` or ``file:PATH[,share=on|off]``.

    A comma inside PATH is written ``,,`` (QEMU's escaping).  ``share`` also
    accepts yes/no/true/false.
    """
    if not isinstance(text, str) or not text.strip() or "\0" in text:
        raise ConfigError(
            f"invalid memory backend {text!r}: expected 'anonymous' or 'file:PATH[,share=on|off]'"
        )
    text = text.strip()
    if text == "anonymous":
        return ANONYMOUS_BACKEND
    kind, colon, rest = text.partition(":")
    if kind != "file" or not colon:
        raise ConfigError(
            f"invalid memory backend {text!r}: expected 'anonymous' or 'file:PATH[,share=on|off]'"
        )
    parts = [p.replace("\0", ",") for p in rest.replace(",,", "\0").split(",")]
    path, options = parts[0], parts[1:]
    if not path:
        raise ConfigError(f"invalid memory backend {text!r}: empty PATH after 'file:'")
    share: bool | None = None
    for option in options:
        key, sep, value = option.partition("=")
        if key != "share" or not sep:
            raise ConfigError(
                f"invalid memory backend {text!r}: unknown option {option!r} (only share=on|off)"
            )
        if share is not None:
            raise ConfigError(f"invalid memory backend {text!r}: duplicate option 'share'")
        word = BOOL_WORDS.get(value.lower())
        if word is None:
            raise ConfigError(f"invalid memory backend {text!r}: share={value!r}, expected on|off")
        share = word
    return BackendConfig("file", path, bool(share))


def block_file_name(name: str) -> str:
    """The file name of a block in a ``file:`` backend directory.

    ``%`` and ``/`` are percent-escaped (``0000:00:02.0/vga.vram`` ->
    ``0000:00:02.0%2Fvga.vram``), and so is a leading ``.`` (no hidden files, no
    ``.``/``..``); the mapping is reversible, so distinct blocks get distinct files.
    """
    escaped = name.replace("%", "%25").replace("/", "%2F")
    if escaped.startswith("."):
        escaped = "%2E" + escaped[1:]
    if len(escaped.encode("utf-8")) > _MAX_NAME_BYTES:
        raise ConfigError(
            f"RAM block {name!r}: escaped file name is longer than {_MAX_NAME_BYTES} bytes"
        )
    return escaped


# -- blocks ---------------------------------------------------------------------


#: RAM digest: content is hashed in chunks of this size, by this many threads.
DIGEST_CHUNK: Final = 64 * MiB
DIGEST_THREADS: Final = max(1, min(4, os.cpu_count() or 1))
#: :meth:`GuestRam.prehash`: a chunk is hashed once nothing wrote to it for this long.
PREHASH_SETTLE: Final = 0.05


class RamBlock:
    """One named region of guest RAM (QEMU's ``RAMBlock``).

    Pages are addressed by *index* inside the block (``offset_of`` gives the
    byte offset that travels in a RAM packet).  ``base_page`` is the index of
    the block's first page in the guest-wide page numbering the bitmaps use.
    :attr:`view` is valid between :meth:`GuestRam.prepare` and
    :meth:`GuestRam.close`.
    """

    __slots__ = ("name", "used_length", "page_size", "npages", "base_page", "path", "_map",
                 "_view", "_words")

    def __init__(self, name: str, used_length: int, base_page: int,
                 page_size: int = TARGET_PAGE_SIZE) -> None:
        self.name: str = name
        self.used_length: int = used_length
        self.page_size: int = page_size
        self.npages: int = used_length // page_size
        self.base_page: int = base_page
        #: the backing file for a ``file:`` backend, else None
        self.path: Path | None = None
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._words: memoryview | None = None

    def __repr__(self) -> str:
        return f"RamBlock({self.name!r}, {format_size(self.used_length)})"

    @property
    def mapped(self) -> bool:
        return self._view is not None

    @property
    def view(self) -> memoryview:
        """Writable ``'B'`` view of the whole block."""
        view = self._view
        if view is None:
            raise StateError(
                f"RAM block {self.name!r} is not mapped (call GuestRam.prepare() first, "
                "and not after close())"
            )
        return view

    @property
    def words(self) -> memoryview:
        """The block as native 64-bit words (for quick zero-page tests)."""
        words = self._words
        if words is None:
            words = self._words = self.view.cast("Q")
        return words

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.npages:
            raise DeviceError(
                f"RAM block {self.name!r}: page index {index} out of range 0..{self.npages - 1}"
            )

    def page(self, index: int) -> memoryview:
        """Writable view of page ``index`` (zero-copy)."""
        self._check_index(index)
        start = index * self.page_size
        return self.view[start : start + self.page_size]

    def offset_of(self, index: int) -> int:
        """Byte offset of page ``index`` inside the block."""
        self._check_index(index)
        return index * self.page_size

    def index_of(self, offset: int) -> int:
        """Page index of a byte ``offset``; must be page-aligned and inside the block."""
        if offset % self.page_size or not 0 <= offset <= self.used_length - self.page_size:
            raise DeviceError(
                f"RAM block {self.name!r}: bad page offset {offset:#x} "
                f"(used_length {self.used_length:#x}, page size {self.page_size})"
            )
        return offset // self.page_size


# -- the guest RAM ---------------------------------------------------------------


def _new_mapping(block: RamBlock, backend: BackendConfig, directory: Path | None) -> mmap.mmap:
    """Map one block: private anonymous memory, or its own freshly truncated file."""
    if directory is None:
        return allocate_anonymous(block.used_length)
    path = directory / block_file_name(block.name)
    # O_TRUNC: guest RAM starts zeroed like anonymous memory, whatever the file
    # held before (the destination's zero-page optimisation relies on it).
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        os.ftruncate(fd, block.used_length)
        flags = mmap.MAP_SHARED if backend.share else mmap.MAP_PRIVATE
        buf = mmap.mmap(fd, block.used_length, flags=flags,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # mmap keeps its own duplicate
    block.path = path
    return buf


def _runs(bitmap: bytes | bytearray, start: int, end: int) -> list[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of 1 bytes in ``bitmap[start:end]``, found with ``find``."""
    out: list[tuple[int, int]] = []
    pos = bitmap.find(1, start, end)
    while pos >= 0:
        stop = bitmap.find(0, pos, end)
        if stop < 0:
            stop = end
        out.append((pos, stop))
        pos = bitmap.find(1, stop, end)
    return out


class GuestRam:
    """The guest's RAM blocks on the source or the destination, plus migration bookkeeping.

    Lifecycle: construct (instant, nothing mapped) -> ``await prepare()``
    (map, fill or pre-fault) -> use -> :meth:`close`.

    Source side, per migration: :meth:`start_migration` (everything dirty),
    then rounds of :meth:`begin_round` + :meth:`next_dirty_batch` until None,
    with :meth:`sync_dirty_log` merging what the guest wrote meanwhile (it
    calls :meth:`mark_dirty` per page), and :meth:`stop_dirty_tracking` at the
    end.  Destination side: :meth:`write_pages` / :meth:`zero_pages` per
    received packet; :meth:`reset_received` before a new incoming migration.
    """

    def __init__(
        self,
        config: MemoryConfig,
        *,
        backend: BackendConfig = ANONYMOUS_BACKEND,
        role: Role,
    ) -> None:
        if role not in ("source", "destination"):
            raise ConfigError(f"RAM role must be 'source' or 'destination', not {role!r}")
        self.config: MemoryConfig = config
        self.backend: BackendConfig = backend
        self.role: Role = role
        self.page_size: int = TARGET_PAGE_SIZE
        self.blocks: dict[str, RamBlock] = {}
        base = 0
        for name, size in config.blocks:
            if backend.kind == "file":
                block_file_name(name)  # reject unrepresentable names now
            block = RamBlock(name, size, base, self.page_size)
            self.blocks[name] = block
            base += block.npages
        self._block_list: tuple[RamBlock, ...] = tuple(self.blocks.values())
        self._bases: list[int] = [b.base_page for b in self._block_list]
        self.total_size: int = config.total_size
        self.npages_total: int = base
        self._state: Literal["created", "prepared", "closed"] = "created"
        self._prepare_lock = threading.Lock()
        self._zeros = bytes(self.npages_total)  # source of cheap clears
        self._zeros_view = memoryview(self._zeros)
        self._ones_view = memoryview(b"\x01" * self.npages_total)
        # dirty tracking (None = not tracking)
        self._live: bytearray | None = None
        self._live_count = 0
        self._spare: bytearray | None = None
        self._bitmap: bytearray | None = None
        self._dirty_count = 0
        self._cursor = 0  # guest-wide page index of the next page to scan
        self._cursor_block = 0
        #: number of :meth:`sync_dirty_log` calls since :meth:`start_migration`
        self.dirty_sync_count: int = 0
        # destination: pages received during the current incoming migration
        self._received = bytearray(self.npages_total)
        self._received_count = 0
        # receive threads mark pages they fill in place (see receive_targets)
        self._count_lock = threading.Lock()
        # digest cache: every DIGEST_CHUNK of every block has a write generation,
        # set from one counter by every writer *after* its write (receivers also
        # before); a chunk's hash is reused while its generation is what it was when
        # the hash began (see digest and prehash)
        self._chunk_first: dict[str, int] = {}
        nchunks = 0
        for block in self._block_list:
            self._chunk_first[block.name] = nchunks
            nchunks += -(-block.used_length // DIGEST_CHUNK)
        self._generations = itertools.count(1)
        self._chunk_gen = [0] * nchunks
        self._chunk_hash: list[tuple[int, bytes] | None] = [None] * nchunks

    def __repr__(self) -> str:
        return (
            f"GuestRam({self.role}, {format_size(self.total_size)}, "
            f"{len(self.blocks)} blocks, {self._state})"
        )

    # -- layout ------------------------------------------------------------------

    def block_size(self, name: str) -> int | None:
        """``used_length`` of block ``name``, None if there is no such block.

        Shaped as the RAM packet decoder's ``block_size`` callback.
        """
        block = self.blocks.get(name)
        return None if block is None else block.used_length

    def locate(self, page: int) -> tuple[RamBlock, int]:
        """The block and in-block index of guest-wide page number ``page``."""
        if not 0 <= page < self.npages_total:
            raise DeviceError(f"guest page {page} out of range 0..{self.npages_total - 1}")
        block = self._block_list[bisect.bisect_right(self._bases, page) - 1]
        return block, page - block.base_page

    def _own(self, block: RamBlock) -> RamBlock:
        if self.blocks.get(block.name) is not block:
            raise DeviceError(f"RAM block {block.name!r} does not belong to this guest")
        return block

    # -- memory ------------------------------------------------------------------

    @property
    def prepared(self) -> bool:
        return self._state == "prepared"

    async def prepare(self) -> None:
        """Map every block and fill (source) or pre-fault (destination) it, in a thread.

        Idempotent.  Source: content per ``config.fill``.  Destination: every
        page touched now, so receiving never pays first-touch faults (with a
        ``file:...,share=on`` backend the destination's files then hold the
        migrated RAM).
        """
        await asyncio.to_thread(self.prepare_blocking)

    def prepare_blocking(self) -> None:
        """:meth:`prepare` without the thread hop (tests, benchmarks, worker threads)."""
        with self._prepare_lock:
            if self._state == "prepared":
                return
            if self._state == "closed":
                raise StateError("guest RAM is closed", state="closed")
            directory: Path | None = None
            if self.backend.kind == "file":
                directory = Path(self.backend.path)
                directory.mkdir(parents=True, exist_ok=True)
            try:
                for block in self._block_list:
                    buf = _new_mapping(block, self.backend, directory)
                    block._map = buf
                    block._view = memoryview(buf)
                if self.role == "source":
                    self._fill()
                else:
                    for block in self._block_list:
                        assert block._map is not None and block._view is not None
                        prefault(block._map, block._view)
            except BaseException:
                self._unmap()
                raise
            self._forget_hashes()
            self._state = "prepared"

    def _forget_hashes(self) -> None:
        gen = next(self._generations)
        self._chunk_gen = [gen] * len(self._chunk_gen)
        self._chunk_hash = [None] * len(self._chunk_hash)

    def _fill(self) -> None:
        fill, seed = self.config.fill, self.config.seed
        if fill == "zero":
            return  # fresh mappings are zero
        largest = max(b.used_length for b in self._block_list)
        tile = random.Random(seed).randbytes(min(_TILE_SIZE, largest))
        words_per_page = self.page_size // 8
        for block in self._block_list:
            view = block.view
            size = block.used_length
            for offset in range(0, size, len(tile)):
                n = min(len(tile), size - offset)
                view[offset : offset + n] = tile if n == len(tile) else tile[:n]
            # Stamp guest-wide page number + seed into the first 16 bytes of every
            # page, so that no two pages are equal (the tile repeats every 1 MiB).
            numbers = array.array("Q", range(block.base_page, block.base_page + block.npages))
            seeds = array.array("Q", [seed]) * block.npages
            if sys.byteorder == "big":
                numbers.byteswap()
                seeds.byteswap()
            words = view.cast("Q")
            words[0::words_per_page] = numbers
            words[1::words_per_page] = seeds
            words.release()
        if fill == "mixed":
            # About half the pages zero, chosen per guest-wide page from the seed.
            choice = random.Random(f"guest-ram-mixed:{seed}").randbytes(self.npages_total)
            zero_map = choice.translate(_LOW_HALF)
            ps = self.page_size
            for block in self._block_list:
                view = block.view
                base = block.base_page
                for start, stop in _runs(zero_map, base, base + block.npages):
                    a, b = (start - base) * ps, (stop - base) * ps
                    view[a:b] = bytes(b - a) if b - a > _TILE_SIZE else _ZERO_TILE[: b - a]

    def _unmap(self) -> None:
        for block in self._block_list:
            view, buf = block._view, block._map
            block._view = None
            block._map = None
            if block._words is not None:
                block._words.release()
                block._words = None
            if view is not None:
                view.release()
            if buf is not None:
                try:
                    buf.close()
                except BufferError:
                    # Someone still holds a page view (e.g. a queued packet): the
                    # mapping goes away when the last view is dropped.
                    pass

    def close(self) -> None:
        """Unmap every block (files of a ``file:`` backend stay); idempotent."""
        with self._prepare_lock:
            self._unmap()
            self._state = "closed"
            self.stop_dirty_tracking()

    # -- dirty tracking (source) -------------------------------------------------

    @property
    def tracking(self) -> bool:
        """Whether dirty tracking is on (between start_migration and stop_dirty_tracking)."""
        return self._bitmap is not None

    def mark_dirty(self, block: RamBlock, index: int) -> None:
        """The guest wrote page ``index`` of ``block``: set its byte in the live log
        (a no-op while dirty tracking is off: no migration running) and make the
        digest hash that page's chunk again."""
        if not 0 <= index < block.npages:
            raise DeviceError(
                f"RAM block {block.name!r}: page index {index} out of range 0..{block.npages - 1}"
            )
        live = self._live
        if live is not None:
            page = block.base_page + index
            if not live[page]:
                live[page] = 1
                self._live_count += 1
        self._chunk_gen[self._chunk_first[block.name]
                        + index * self.page_size // DIGEST_CHUNK] = next(self._generations)

    def _touch(self, block: RamBlock, start: int, stop: int) -> None:
        """Bytes ``[start, stop)`` of ``block`` are being or were written: a new
        generation for their chunks (``next`` on the counter is atomic under the GIL)."""
        if stop <= start:
            return
        first = self._chunk_first[block.name]
        gen = next(self._generations)
        chunk_gen = self._chunk_gen
        for c in range(first + start // DIGEST_CHUNK, first + (stop - 1) // DIGEST_CHUNK + 1):
            chunk_gen[c] = gen

    def written(self, block: RamBlock, offsets: Sequence[int], run: bool = False) -> None:
        """Pages at ``offsets`` were received in place (after :meth:`receive_targets`):
        their chunks get a generation newer than any hash begun meanwhile.  ``run``:
        the offsets are consecutive, so the first and last bound them."""
        if offsets:
            if run:
                self._touch(block, offsets[0], offsets[-1] + self.page_size)
            else:
                self._touch(block, min(offsets), max(offsets) + self.page_size)

    def start_migration(self) -> None:
        """Start dirty tracking: every page dirty (the first round), live log empty.

        Also resets the scan cursor and :attr:`dirty_sync_count`.  Calling it
        again restarts from "all dirty".
        """
        n = self.npages_total
        self._bitmap = bytearray(b"\x01") * n
        self._dirty_count = n
        self._live = bytearray(n)
        self._live_count = 0
        self._spare = bytearray(n)
        self.dirty_sync_count = 0
        self.begin_round()

    def _require_tracking(self) -> bytearray:
        bitmap = self._bitmap
        if bitmap is None:
            raise StateError(
                "dirty tracking is off: call start_migration() first", state="not-tracking"
            )
        return bitmap

    def sync_dirty_log(self) -> int:
        """Merge the live log into the migration bitmap (QEMU's ``migration_bitmap_sync``).

        Returns how many pages the live log had -- the pages the guest dirtied
        since the previous sync.  Pages ahead of the scan cursor are sent in
        this round, pages behind it in the next.  The merge is a big-int OR of
        the two byte maps (each byte is 0 or 1): ~0.6 ms for 1 GiB of RAM.
        """
        bitmap = self._require_tracking()
        live, spare = self._live, self._spare
        assert live is not None and spare is not None
        # Swap first, so a mark landing during the merge goes into the next log.
        self._live, self._spare = spare, live
        self._live_count = 0
        live_bits = int.from_bytes(live, "little")
        logged = live_bits.bit_count()
        if logged:
            merged = int.from_bytes(bitmap, "little") | live_bits
            bitmap[:] = merged.to_bytes(len(bitmap), "little")
            self._dirty_count = merged.bit_count()
            live[:] = self._zeros
        self.dirty_sync_count += 1
        return logged

    def begin_round(self) -> None:
        """Put the scan cursor on page 0 of the first block (a new pass over RAM)."""
        self._cursor = 0
        self._cursor_block = 0

    def next_dirty_batch(self, max_pages: int = 128) -> tuple[RamBlock, Sequence[int]] | None:
        """The next up to ``max_pages`` dirty pages of *one* block, from the cursor.

        Page indexes are in increasing order; their migration-bitmap bytes are
        cleared (the pages now count as sent).  A batch of consecutive pages (the
        first round's, a sequential writer's) is a ``range``, so the sender can
        take it as one span.  Returns None once the cursor is past the last
        block: the round is over (QEMU then flushes and syncs).  Cost is O(runs
        of dirty pages): runs are found with ``bytearray.find``.
        """
        if max_pages < 1:
            raise ConfigError(f"next_dirty_batch: max_pages must be at least 1, got {max_pages}")
        bitmap = self._require_tracking()
        blocks = self._block_list
        zeros = self._zeros_view
        while self._cursor_block < len(blocks):
            block = blocks[self._cursor_block]
            base = block.base_page
            end = base + block.npages
            pos = bitmap.find(1, self._cursor, end)
            if pos < 0:
                self._cursor_block += 1
                self._cursor = end
                continue
            pages: list[int] = []
            room = max_pages
            while True:
                limit = min(end, pos + room)
                stop = bitmap.find(0, pos, limit)
                if stop < 0:
                    stop = limit
                bitmap[pos:stop] = zeros[: stop - pos]
                span = range(pos - base, stop - base)
                room -= stop - pos
                self._cursor = stop
                if room == 0 or stop >= end:
                    pos = -1
                else:
                    pos = bitmap.find(1, stop, end)
                    if pos < 0:
                        self._cursor = end
                if pos < 0 and not pages:  # the batch is one run
                    self._dirty_count -= len(span)
                    return block, span
                pages.extend(span)
                if pos < 0:
                    break
            self._dirty_count -= len(pages)
            return block, pages
        return None

    def dirty_pages(self) -> int:
        """Pages set in the migration bitmap (still to send); 0 when not tracking."""
        return self._dirty_count if self._bitmap is not None else 0

    def live_dirty_pages(self) -> int:
        """Pages in the live log (dirtied since the last sync); 0 when not tracking.
        Counted by :meth:`mark_dirty` (popcounting the log cost ~0.15 ms per GiB on
        every ``query-migrate``); exact while marks come from one thread at a time."""
        return self._live_count if self._live is not None else 0

    def stop_dirty_tracking(self) -> None:
        """Stop tracking and free the bitmaps; :meth:`mark_dirty` becomes a no-op."""
        self._bitmap = None
        self._live = None
        self._spare = None
        self._dirty_count = 0
        self.begin_round()

    # -- applying pages (destination) ------------------------------------------

    def _check_runs(self, block: RamBlock, offsets: Sequence[int],
                    runs: list[tuple[int, int, int, int]]) -> None:
        """:meth:`_check_offsets`, cheaper when the pages form one run (the usual case:
        a run is valid when its start is aligned and it lies inside the block)."""
        if len(runs) == 1:
            start, stop = runs[0][2], runs[0][3]
            if start >= 0 and not start % self.page_size and stop <= block.used_length:
                return
        self._check_offsets(block, offsets)

    def _check_offsets(self, block: RamBlock, offsets: Sequence[int]) -> None:
        ps, last = self.page_size, block.used_length - self.page_size
        # whole-batch checks in C first (page sizes are powers of two); the loop
        # below only finds the culprit for the message
        if offsets and (min(offsets) >= 0 and max(offsets) <= last
                        and not reduce(or_, offsets) & (ps - 1)):
            return
        for offset in offsets:
            if offset % ps or not 0 <= offset <= last:
                raise DeviceError(
                    f"RAM block {block.name!r}: bad page offset {offset:#x} "
                    f"(used_length {block.used_length:#x}, page size {ps})"
                )

    def write_pages(self, block: RamBlock, offsets: Sequence[int],
                    payload: memoryview | bytes | bytearray) -> None:
        """Copy ``payload`` page ``i`` to byte offset ``offsets[i]`` of ``block``; mark received.

        Offsets and payload length are checked before anything is written, so a
        :class:`DeviceError` leaves the memory untouched.
        """
        self._own(block)
        data = memoryview(payload)
        if data.format != "B" or data.ndim != 1:
            data = data.cast("B")
        ps = self.page_size
        if data.nbytes != len(offsets) * ps:
            raise DeviceError(
                f"RAM block {block.name!r}: payload of {data.nbytes} bytes for "
                f"{len(offsets)} pages of {ps} bytes"
            )
        runs = page_runs(offsets, ps)
        self._check_runs(block, offsets, runs)
        view = block.view
        for i, j, start, stop in runs:
            view[start:stop] = data[i * ps : j * ps]
        self._mark_runs(block, runs)

    def receive_targets(self, block: RamBlock, offsets: Sequence[int],
                        run: bool = False, validated: bool = False) -> list[memoryview]:
        """Where the pages at ``offsets`` go, as views of guest memory (one per run of
        consecutive pages), for a receiver that fills them straight from its socket.
        ``run``: the caller knows the offsets are consecutive (a decoded packet's
        ``normal_run``), so only the ends are looked at.  ``validated``: the offsets
        were checked against this block already (a packet decoded with its
        ``block_size``), so they are not checked again.

        The pages are marked received first, so even if the receive is cut short they
        count as possibly holding data (a later zero page for them is then written).
        Thread-safe against the other writers as long as no two of them write the
        same page concurrently, which the multifd sync barrier guarantees.
        """
        self._own(block)
        if run and offsets:
            runs = [(0, len(offsets), offsets[0], offsets[-1] + self.page_size)]
        else:
            runs = page_runs(offsets, self.page_size)
        if not validated:
            self._check_runs(block, offsets, runs)
        view = block.view
        self._mark_runs(block, runs)
        return [view[start:stop] for _, _, start, stop in runs]

    def _mark_runs(self, block: RamBlock, runs: list[tuple[int, int, int, int]]) -> None:
        # (before a receive into them; after a write_pages copy)
        if not runs:
            return
        lo, hi = runs[0][2], runs[-1][3]
        if len(runs) > 1:
            lo, hi = min(lo, *(r[2] for r in runs)), max(hi, *(r[3] for r in runs))
        if lo // DIGEST_CHUNK == (hi - 1) // DIGEST_CHUNK:
            self._touch(block, lo, hi)  # the usual packet: all in one digest chunk
        else:
            for run in runs:
                self._touch(block, run[2], run[3])
        received = self._received
        base = block.base_page
        ones = self._ones_view
        ps = self.page_size
        fresh = 0
        for i, j, start, _ in runs:
            first = base + start // ps
            if j - i == 1:
                if not received[first]:
                    received[first] = 1
                    fresh += 1
            else:
                last = first + (j - i)
                fresh += received.count(0, first, last)
                received[first:last] = ones[: last - first]
        with self._count_lock:
            self._received_count += fresh

    def zero_pages(self, block: RamBlock, offsets: Sequence[int],
                   validated: bool = False) -> None:
        """Apply zero pages: memset only pages received before; mark all received.

        Fresh destination memory is already zero (QEMU's optimisation), so a
        never-received page is left alone.  ``validated``: as for
        :meth:`receive_targets`.
        """
        self._own(block)
        if not validated:
            self._check_offsets(block, offsets)
        if not offsets:
            return
        received = self._received
        base = block.base_page
        ps = self.page_size
        pages = [base + offset // ps for offset in offsets]
        # one C-level gather of the pages' received flags; the Python loops below
        # only run over the pages that need them
        seen = itemgetter(*pages)(received) if len(pages) > 1 else (received[pages[0]],)
        fresh = seen.count(0)
        if fresh != len(pages):
            view = block.view
            for offset, was in zip(offsets, seen, strict=True):
                if was:
                    view[offset : offset + ps] = ZERO_PAGE
        if fresh:
            if fresh > 1 and len(set(pages)) != len(pages):  # a page named twice
                fresh = len({page for page, was in zip(pages, seen, strict=True) if not was})
            for page in pages:
                received[page] = 1
            with self._count_lock:
                self._received_count += fresh
        self.written(block, offsets)

    def reset_received(self) -> None:
        """Forget which pages were received (a new incoming migration).

        Note: a later zero page then skips the memset, which is only correct
        when the memory really is zero -- as it is before the first migration.
        """
        self._received[:] = self._zeros
        self._received_count = 0

    def received_pages(self) -> int:
        """Distinct pages written or zeroed since the last :meth:`reset_received`."""
        return self._received_count

    # -- digests -----------------------------------------------------------------

    def _chunks(self) -> list[memoryview]:
        return [block.view[start:start + DIGEST_CHUNK]
                for block in self._block_list
                for start in range(0, block.used_length, DIGEST_CHUNK)]

    def _hash_chunk(self, c: int, view: memoryview) -> bytes:
        """Chunk ``c``'s hash, from the cache when nothing wrote to it since."""
        gen = self._chunk_gen[c]
        cached = self._chunk_hash[c]
        if cached is not None and cached[0] == gen:
            return cached[1]
        digest = _chunk_digest(view)
        if self._chunk_gen[c] == gen:  # no write began meanwhile: keep it
            self._chunk_hash[c] = (gen, digest)
        return digest

    def digest(self, fresh: bool = False) -> str:
        """Hex xxh3-128 over every block in order: name, length, then the xxh3-128 of
        each DIGEST_CHUNK of its content.

        A chunk nothing wrote to since its last hash is not hashed again (every
        writer of guest memory goes through this class or the workload, which sets
        the chunk's write generation; :meth:`prehash` fills the cache while a
        migration runs); the others are hashed by up to DIGEST_THREADS threads at once
        (xxhash releases the GIL).  ``fresh`` hashes everything, trusting no cache:
        what an independent check (``x-query-state-digest``) wants — a write that went
        around this class, like a flipped bit, is only seen that way.  Call it with
        the writers quiet (VM stopped, every page received): a chunk written during
        the call may be hashed with part of the write.
        """
        if self._state != "prepared":
            raise StateError(f"guest RAM is {self._state}, not prepared", state=self._state)
        chunks = self._chunks()

        def uncached(c: int) -> bytes:
            return _chunk_digest(chunks[c])

        def cached(c: int) -> bytes:
            return self._hash_chunk(c, chunks[c])

        hash_one = uncached if fresh else cached
        indexes = range(len(chunks))
        workers = min(DIGEST_THREADS, sum(1 for c in indexes if fresh or not self._cached(c)))
        if workers > 1:  # (cached chunks cost the pool a function call each)
            with ThreadPoolExecutor(workers, thread_name_prefix="ram-digest") as pool:
                parts = list(pool.map(hash_one, indexes))
        else:
            parts = [hash_one(c) for c in indexes]
        h = xxhash.xxh3_128()
        it = iter(parts)
        for block in self._block_list:
            name = block.name.encode("utf-8")
            h.update(len(name).to_bytes(1, "big") + name + block.used_length.to_bytes(8, "big"))
            for _ in range(0, block.used_length, DIGEST_CHUNK):
                h.update(next(it))
        return h.hexdigest()

    def _cached(self, c: int) -> bool:
        cached = self._chunk_hash[c]
        return cached is not None and cached[0] == self._chunk_gen[c]

    def generation(self) -> int:
        """A write generation newer than every write so far."""
        return next(self._generations)

    def prehash(self, stop: threading.Event, settle: float = PREHASH_SETTLE,
                written_after: int = 0) -> int:
        """Hash chunks ahead of :meth:`digest` while writers are busy, until ``stop``.

        Every ``settle`` seconds, hashes the chunks that nothing wrote to since the
        previous look (a chunk being filled, or hot in the guest, waits), so that
        the digest at the end — in the downtime — only has to hash what changed
        last.  ``written_after`` (a :meth:`generation`): only chunks written since,
        for a destination whose other chunks are still to come.  Runs in a thread
        of its own; returns how many chunks it hashed.
        """
        if self._state != "prepared":
            return 0
        chunks = self._chunks()
        seen = list(self._chunk_gen)
        hashed = 0
        while not stop.wait(settle):
            for c, view in enumerate(chunks):
                if stop.is_set():
                    break
                gen = self._chunk_gen[c]
                if gen == seen[c] and gen > written_after and not self._cached(c):
                    self._hash_chunk(c, view)
                    hashed += 1
                seen[c] = gen
        return hashed

    async def digest_async(self, fresh: bool = False) -> str:
        """:meth:`digest` in a worker thread (~30 ms per GiB on one core)."""
        return await asyncio.to_thread(self.digest, fresh)


class Prehasher:
    """Runs :meth:`GuestRam.prehash` in a thread of its own for one migration (on a
    destination: ``incoming``, only chunks written from :meth:`start` on)."""

    def __init__(self, ram: GuestRam, incoming: bool = False) -> None:
        self.ram = ram
        self.incoming = incoming
        self._after = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hashed = 0

    def start(self) -> None:
        if self._thread is None and self.ram.prepared:
            self._after = self.ram.generation() if self.incoming else 0
            self._thread = threading.Thread(target=self._run, name="ram-prehash", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self.hashed = self.ram.prehash(self._stop, written_after=self._after)
        except ValueError:  # the memory was unmapped under it (daemon shutting down)
            pass

    async def stop(self) -> None:
        """Stop and wait (a chunk in progress takes a few milliseconds)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join)


def _chunk_digest(view: memoryview) -> bytes:
    return xxhash.xxh3_128_digest(view)


# bytes < 128 -> 1 ("make this page zero"), else 0: about half of a random byte map.
_LOW_HALF: Final = bytes(1 if b < 128 else 0 for b in range(256))
_ZERO_TILE: Final = memoryview(bytes(_TILE_SIZE))
