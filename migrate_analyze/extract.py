"""Rebuild one RAM block from a recording: ``migrate-analyze DIR --extract-ram BLOCK OUT``.

Sources of page content, in the recording:

* the block's size: the main channel's block list (QEMU ``RAM_SAVE_FLAG_MEM_SIZE``, our
  ``ram-setup``);
* normal pages: multifd RAM packets (decompressed with one
  :class:`~protocol.compression.PacketDecompressor` per channel, fed the channel's
  packets in channel order) and main-channel PAGE records / ``ram-pages``;
* zero pages: the zero offsets of 9.0+ multifd packets, main-channel ZERO records
  (QEMU before 9.0, or ``zero-page-detection=legacy``) / ``ram-zero``;
* pages never sent are zero.

Order.  A page can be sent more than once (the guest dirtied it again, or, as QEMU
7.2 did in the zstd capture, the sender queued it twice).  The destination's only
ordering guarantee is the sync: every SYNC packet of a channel parks that channel until
the main channel reaches the matching sync marker (``RAM_SAVE_FLAG_MULTIFD_FLUSH`` since
8.1 machine types; ``RAM_SAVE_FLAG_EOS`` in the older per-section mode, e.g. QEMU 7.2),
and the main channel waits there until every channel has parked.  So:

* a multifd packet belongs to round *N* = the number of SYNC packets its channel sent
  before it (a 7.2 SYNC packet carrying pages belongs with the pages before it);
* a main-channel page record belongs to round *N* = the number of sync markers before it
  on the main channel;
* rounds are applied in order; within a round packets of different channels race on a
  real destination, so the last write by ``packet_num`` (the sender's global counter,
  taken when the batch was handed to a channel) wins, then main-channel records come
  before multifd packets of the same round.

Only the final content matters, so the rebuild first computes each page's last write
from the packet metadata, then decodes every channel once, in channel order, and
writes a page only when the write is that last one.  The output is a sparse file of
the block's size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrate_analyze.analyze import (
    Analysis,
    PacketInfo,
    analyze,
    scan_channel,
    walk_main,
)
from protocol.errors import ConfigError, MigrationError, RemoteProtocolError
from protocol.multifd import RamLayout

__all__ = ["ExtractResult", "extract_ram", "file_sha256"]

# a write's place in the application order: (round, source, packet_num, channel, seq);
# source 0 = main channel (packet_num = -1, channel = -1, seq = record index), 1 = multifd
WriteKey = tuple[int, int, int, int, int]


@dataclass
class ExtractResult:
    block: str
    size: int
    out: str
    sha256: str
    page_size: int
    sync_marker: str
    pages: dict[str, int] = field(default_factory=dict)
    resent: list[dict[str, Any]] = field(default_factory=list)
    meta_ram_sha256: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def matches_meta(self) -> bool | None:
        return None if self.meta_ram_sha256 is None else self.sha256 == self.meta_ram_sha256

    def as_dict(self) -> dict[str, Any]:
        return {"block": self.block, "bytes": self.size, "out": self.out,
                "sha256": self.sha256, "page_size": self.page_size,
                "sync_marker": self.sync_marker, "pages": dict(self.pages),
                "resent": self.resent, "meta_ram_sha256": self.meta_ram_sha256,
                "matches_meta": self.matches_meta, "warnings": self.warnings}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_usable(a: Analysis, block: str) -> None:
    """Refuse to rebuild from a recording whose RAM part did not decode."""
    problems = [e for e in a.errors if not e.startswith("main.bin")]
    if a.main is None:
        raise ConfigError(f"{a.capture.path}: no main.bin, so the size of block {block!r} is "
                          "unknown")
    if a.main.error or a.main.summary.get("stopped"):
        # fine if the RAM END section (the last RAM records) was fully walked
        sections = a.main.summary.get("sections", [])
        ram_done = any(s.get("idstr") == "ram" and s.get("kind") == "end" and s.get("footer")
                       for s in sections)
        if not ram_done:
            problems.insert(0, next(e for e in a.errors if e.startswith("main.bin"))
                            if a.main.error else "main.bin: walk stopped before the RAM END "
                            "section: " + a.main.summary["stopped"]["reason"])
    if problems:
        raise RemoteProtocolError(f"cannot rebuild block {block!r}: " + "; ".join(problems))


def extract_ram(path: str | Path, block: str, out: str | Path, *,
                layout: RamLayout | None = None) -> ExtractResult:
    """Rebuild ``block`` into the file ``out``; raises typed errors for unusable input."""
    a = analyze(path, layout=layout, verify=False)
    _check_usable(a, block)
    assert a.main is not None
    blocks = a.main.blocks
    if block not in blocks:
        raise ConfigError(f"no RAM block {block!r} in {a.capture.path}; the main channel lists "
                          f"{', '.join(f'{n} ({s} bytes)' for n, s in blocks.items()) or 'none'}")
    size = blocks[block]
    page = a.main.page_size
    by_flush = a.main.sync_marker_kind in ("MULTIFD_FLUSH", "ram-flush")

    # -- pass 1: the last write of every page, from metadata ---------------------------
    winner: dict[int, WriteKey] = {}
    writes: dict[int, int] = {}

    def note(index: int, key: WriteKey) -> None:
        writes[index] = writes.get(index, 0) + 1
        old = winner.get(index)
        if old is None or key > old:
            winner[index] = key

    main_seq = 0

    def main_meta(kind: str, blk: str, off: int, data: Any, fill: int, eos: int,
                  flush: int) -> None:
        nonlocal main_seq
        if blk == block:
            note(off // page, (flush if by_flush else eos, 0, -1, -1, main_seq))
        main_seq += 1

    walk_main(a.capture.main, main_meta)
    main_count = main_seq
    packets: list[PacketInfo] = [p for ch in a.channels for p in ch.packets
                                 if p.ramblock == block and (p.normal or p.zero)]
    for p in packets:
        key = (p.round, 1, p.packet_num, p.channel, p.seq)
        for off in p.normal_offsets + p.zero_offsets:
            note(off // page, key)

    multi = {i for i, n in writes.items() if n > 1}
    versions: dict[int, list[tuple[WriteKey, str]]] = {i: [] for i in multi}
    zero_digest = hashlib.sha256(bytes(page)).hexdigest()

    # -- pass 2: write the winners ------------------------------------------------------
    out_path = Path(out)
    counts = {"pages": size // page, "written_normal": 0, "zero": 0, "not_sent": 0,
              "sent_more_than_once": len(multi)}
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        main_seq = 0

        def main_data(kind: str, blk: str, off: int, data: Any, fill: int, eos: int,
                      flush: int) -> None:
            nonlocal main_seq
            seq = main_seq
            main_seq += 1
            if blk != block:
                return
            index = off // page
            key: WriteKey = (flush if by_flush else eos, 0, -1, -1, seq)
            content = data if kind == "page" else (bytes([fill]) * page if fill else None)
            if index in versions:
                versions[index].append((key, hashlib.sha256(content).hexdigest()
                                        if content is not None else zero_digest))
            if winner.get(index) == key:
                if content is not None:
                    os.pwrite(fd, content, off)
                    counts["written_normal" if kind == "page" else "zero"] += 1
                else:
                    counts["zero"] += 1

        walk_main(a.capture.main, main_data)
        if main_seq != main_count:
            raise RemoteProtocolError("main.bin changed while it was read")

        def pages_cb(info: PacketInfo, data: memoryview) -> None:
            if info.ramblock != block:
                return
            key: WriteKey = (info.round, 1, info.packet_num, info.channel, info.seq)
            for i, off in enumerate(info.normal_offsets):
                index = off // page
                chunk = data[i * page:(i + 1) * page]
                if index in versions:
                    versions[index].append((key, hashlib.sha256(chunk).hexdigest()))
                if winner.get(index) == key:
                    os.pwrite(fd, chunk, off)
                    counts["written_normal"] += 1

        for ch in a.channels:
            file_id = ch.file_id
            scan = scan_channel(a.capture.channels[file_id], file_id, page_size=page,
                                layout=a.layout, block_size=blocks.get, verify=True,
                                on_pages=pages_cb, packet_size=a.main.packet_size)
            if scan.error:
                e = scan.error
                raise RemoteProtocolError(f"{scan.name}: {e['type']} at offset {e['offset']}: "
                                          f"{e['message']}")
        # zero winners from multifd packets need no write: the file is sparse zeros
        for p in packets:
            key = (p.round, 1, p.packet_num, p.channel, p.seq)
            for off in p.zero_offsets:
                index = off // page
                if index in versions:
                    versions[index].append((key, zero_digest))
                if winner.get(index) == key:
                    counts["zero"] += 1
    except MigrationError:
        os.close(fd)
        fd = -1
        out_path.unlink(missing_ok=True)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    counts["not_sent"] = counts["pages"] - len(winner)

    resent = []
    for index in sorted(multi)[:64]:
        vs = sorted(versions[index])
        rounds = [k[0] for k, _ in vs]
        resent.append({
            "offset": index * page,
            "writes": [{"round": k[0], "source": "main" if k[1] == 0 else f"multifd-{k[3]}",
                        "packet_num": k[2] if k[1] else None} for k, _ in vs],
            "same_round": len(set(rounds)) < len(rounds),
            "identical": len({d for _, d in vs}) == 1,
        })
    result = ExtractResult(block, size, str(out_path), file_sha256(out_path), page,
                           a.main.sync_marker_kind or "none", counts, resent)
    meta = a.capture.meta or {}
    if isinstance(meta.get("ram_sha256"), str) and meta.get("ram_bytes") == size:
        result.meta_ram_sha256 = meta["ram_sha256"]
    for r in resent:
        if r["same_round"] and not r["identical"]:
            result.warnings.append(
                f"page {r['offset']:#x} was sent twice in one round with different content: a "
                "real destination's result depends on thread timing; packet_num decided here")
    return result
