"""Analyse a folder of migration channel recordings.

A folder holds ``main.bin`` (the main channel), ``multifd-<id>.bin`` (one file per
multifd channel, from its 64-byte init on) and usually ``meta.json``.  Two producers
write such folders:

* ``../shared/tools/capture_qemu_multifd.py``: a real QEMU source (main channel =
  QEMU's ``QEVM`` stream, walked by :mod:`migrate_analyze.qemu_stream`);
* ``migrate-dst --record-channels DIR``: our destination (main channel = our ``MFDM``
  preamble + msgpack messages, walked with :class:`protocol.control.ControlDecoder`).

The multifd channels are byte-compatible in both cases and are decoded with
:class:`protocol.channel.ChannelDecoder`; compressed payloads are checked with one
:class:`protocol.compression.PacketDecompressor` per channel, in channel order.
Nothing here writes anything; :mod:`migrate_analyze.extract` rebuilds RAM.
"""

from __future__ import annotations

import bisect
import io
import json
import mmap
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrate_analyze.qemu_stream import PageCallback, walk_qemu_main
from protocol.channel import (
    ChannelClosed,
    ChannelDecoder,
    DeviceStateReceived,
    InitReceived,
    RamPacketReceived,
)
from protocol.compression import PacketDecompressor, method_name
from protocol.control import (
    MAIN_MAGIC,
    QEMU_VM_FILE_MAGIC,
    Command,
    ControlDecoder,
    Eof,
    Hello,
    MessageReceived,
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
    StreamClosed,
    VfioRecord,
    message_type,
)
from protocol.errors import (
    BadMagicError,
    ChannelError,
    ConfigError,
    MigrationError,
    RemoteProtocolError,
)
from protocol.multifd import (
    DEFAULT_MAX_DEVICE_PAYLOAD,
    DEVICE_STATE_HEADER_SIZE,
    INIT_SIZE,
    MULTIFD_MAGIC,
    MULTIFD_PACKET_SIZE,
    RamLayout,
    RamPacket,
    ram_packet_size,
    ram_page_count,
)
from protocol.vfio import VfioMigFlag, decode_config_blob, decode_state_packet

__all__ = [
    "Capture",
    "PacketInfo",
    "DevicePacketInfo",
    "ChannelScan",
    "Analysis",
    "open_capture",
    "scan_channel",
    "walk_our_main",
    "walk_main",
    "analyze",
]

MAX_META = 16 * 1024 * 1024
_CHANNEL_FILE = re.compile(r"^multifd-(\d{1,3})\.bin$")
_ATTEMPT_DIR = re.compile(r"^attempt-(\d+)$")


# ----------------------------------------------------------------------------------------
# the folder


@dataclass
class Capture:
    """Which files a recording folder holds and who wrote it."""

    path: Path
    main: Path | None
    channels: dict[int, Path]  # by the id in the file name
    meta: dict[str, Any] | None
    note: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def recorder(self) -> str:
        """``qemu`` (capture_qemu_multifd.py), ``multifd-migrate`` or ``unknown``."""
        if self.meta and self.meta.get("recorder") == "multifd-migrate":
            return "multifd-migrate"
        if self.meta and isinstance(self.meta.get("qemu"), dict):
            return "qemu"
        magic = _magic(self.main) if self.main else None
        if magic == QEMU_VM_FILE_MAGIC:
            return "qemu"
        if magic == MAIN_MAGIC:
            return "multifd-migrate"
        return "unknown"

    @property
    def qemu_version(self) -> tuple[int, int, int] | None:
        q = (self.meta or {}).get("qemu")
        if isinstance(q, dict) and isinstance(q.get("qemu"), dict):
            v = q["qemu"]
            try:
                return int(v["major"]), int(v["minor"]), int(v.get("micro", 0))
            except (KeyError, TypeError, ValueError):
                return None
        return None

    @property
    def qemu_package(self) -> str | None:
        q = (self.meta or {}).get("qemu")
        package = q.get("package") if isinstance(q, dict) else None
        return package if isinstance(package, str) else None


def _magic(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    return int.from_bytes(head, "big") if len(head) == 4 else None


def open_capture(path: str | Path) -> Capture:
    """Find the channel files of a recording folder (or of its latest ``attempt-N``)."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory")
    note = ""
    if not _has_channels(root):
        attempts = sorted(
            ((int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _ATTEMPT_DIR.match(p.name))),
        )
        attempts = [(n, p) for n, p in attempts if _has_channels(p)]
        if not attempts:
            raise ConfigError(f"{root}: no main.bin or multifd-<id>.bin files (nor attempt-N "
                              "folders holding them)")
        if len(attempts) > 1:
            note = (f"{len(attempts)} recorded attempts; analysing the latest, "
                    f"{attempts[-1][1].name} (pass {root}/attempt-N for another)")
        root = attempts[-1][1]
    main = root / "main.bin"
    channels: dict[int, Path] = {}
    for p in sorted(root.iterdir()):
        m = _CHANNEL_FILE.match(p.name)
        if m and p.is_file():
            channels[int(m.group(1))] = p
    cap = Capture(root, main if main.is_file() else None, dict(sorted(channels.items())),
                  None, note)
    meta_path = root / "meta.json"
    if meta_path.is_file():
        try:
            if meta_path.stat().st_size > MAX_META:
                raise ValueError(f"larger than {MAX_META} bytes")
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            cap.meta = meta
        except (OSError, ValueError) as exc:
            cap.warnings.append(f"meta.json ignored: {exc}")
    if cap.main is None:
        cap.warnings.append("no main.bin: RAM block sizes and main-channel records unknown")
    for p in root.iterdir():
        if p.suffix == ".bin" and p.name != "main.bin" and not _CHANNEL_FILE.match(p.name):
            cap.warnings.append(f"{p.name}: not a channel file name this tool knows; ignored")
    return cap


def _has_channels(path: Path) -> bool:
    return (path / "main.bin").is_file() or any(
        _CHANNEL_FILE.match(p.name) for p in path.iterdir())


def _read_file(path: Path) -> Any:
    """The file's bytes as an mmap (b"" for an empty file)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _feed_file(decoder: ChannelDecoder | ControlDecoder, f: io.BufferedReader) -> Iterator[Any]:
    """Run a sans-I/O decoder over a file, receiving straight into its buffers."""
    while True:
        buf = decoder.buffer()
        n = f.readinto(buf)
        if not n:
            yield from decoder.eof()
            return
        yield from decoder.advance(n)


# ----------------------------------------------------------------------------------------
# multifd channels


@dataclass
class PacketInfo:
    """One RAM packet of one channel (offsets kept for extraction and duplicates)."""

    channel: int
    seq: int  # arrival index among this channel's packets (init excluded)
    offset: int  # byte offset of the packet in the channel file
    flags: int
    packet_num: int
    ramblock: str
    normal: int
    zero: int
    payload: int  # bytes of payload that followed
    round: int  # SYNC packets of this channel before this one
    normal_offsets: tuple[int, ...]
    zero_offsets: tuple[int, ...]
    arrival_ns: int | None = None  # from <channel>.recv, when the recorder wrote one

    @property
    def is_sync(self) -> bool:
        return bool(self.flags & 0x01)

    @property
    def kind(self) -> str:
        if self.is_sync:
            return "sync+pages" if self.normal or self.zero else "sync"
        if self.normal:
            return "normal"
        if self.zero:
            return "zero-only"
        return "empty"


@dataclass
class DevicePacketInfo:
    channel: int
    seq: int
    offset: int
    idstr: str
    instance_id: int
    size: int  # next_packet_size: the VFIO header + data
    idx: int | None = None
    config: bool = False
    data: int = 0
    config_bytes: int | None = None
    error: str | None = None
    arrival_ns: int | None = None


@dataclass
class ChannelScan:
    name: str
    file_id: int
    bytes: int
    init: dict[str, Any] | None = None
    channel_id: int | None = None
    uuid: str | None = None
    packets: list[PacketInfo] = field(default_factory=list)
    devices: list[DevicePacketInfo] = field(default_factory=list)
    methods: set[str] = field(default_factory=set)
    decompressed: int = 0
    header_bytes: int = 0
    payload_bytes: int = 0
    closed: bool = False
    error: dict[str, Any] | None = None

    @property
    def syncs(self) -> list[PacketInfo]:
        return [p for p in self.packets if p.is_sync]

    def summary(self) -> dict[str, Any]:
        by_kind: dict[str, int] = {}
        by_flags: dict[str, int] = {}
        by_block: dict[str, dict[str, int]] = {}
        rounds: list[dict[str, int]] = []
        for p in self.packets:
            by_kind[p.kind] = by_kind.get(p.kind, 0) + 1
            key = f"{p.flags:#04x}"
            by_flags[key] = by_flags.get(key, 0) + 1
            if p.normal or p.zero:
                b = by_block.setdefault(p.ramblock, {"normal": 0, "zero": 0})
                b["normal"] += p.normal
                b["zero"] += p.zero
            while len(rounds) <= p.round:
                rounds.append({"packets": 0, "normal": 0, "zero": 0})
            rounds[p.round]["packets"] += 1
            rounds[p.round]["normal"] += p.normal
            rounds[p.round]["zero"] += p.zero
        if self.devices:
            by_kind["device-state"] = len(self.devices)
            by_flags["0x40"] = by_flags.get("0x40", 0) + len(self.devices)
        nums = [p.packet_num for p in self.packets]
        return {
            "file": self.name,
            "bytes": self.bytes,
            "init": self.init,
            "packets": {
                "total": len(self.packets) + len(self.devices),
                "ram": len(self.packets),
                "sync": len(self.syncs),
                "device_state": len(self.devices),
                "by_kind": by_kind,
                "by_flags": dict(sorted(by_flags.items())),
            },
            "compression": _method_text(self.methods),
            "decompressed_payloads": self.decompressed,
            "pages": {
                "normal": sum(p.normal for p in self.packets),
                "zero": sum(p.zero for p in self.packets),
                "by_block": by_block,
            },
            "syncs": [{"seq": p.seq, "packet_num": p.packet_num, "pages": p.normal + p.zero}
                      for p in self.syncs],
            "rounds": rounds,
            "packet_num": {"min": min(nums), "max": max(nums)} if nums else None,
            "bytes_detail": {"init": INIT_SIZE if self.init else 0,
                             "headers": self.header_bytes, "payload": self.payload_bytes},
            "device_state": device_summary(self.devices) if self.devices else {},
            "closed_cleanly": self.closed,
            "error": self.error,
        }


def _method_text(methods: set[str]) -> str:
    if not methods:
        return "none"
    return "+".join(sorted(methods)) if len(methods) > 1 else next(iter(methods))


#: on_pages(info, page_bytes) for every RAM packet with normal pages: the decompressed
#: (or raw) normal pages in the order of info.normal_offsets
PagesCallback = Callable[[PacketInfo, memoryview], None]


def scan_channel(path: Path, file_id: int, *, page_size: int, layout: RamLayout,
                 block_size: Callable[[str], int | None] | None = None,
                 verify: bool = True, on_pages: PagesCallback | None = None,
                 packet_size: int = MULTIFD_PACKET_SIZE) -> ChannelScan:
    """Decode one multifd channel file; never raises for bad input (see ``error``)."""
    size = path.stat().st_size
    scan = ChannelScan(path.name, file_id, size)
    page_count = ram_page_count(page_size, packet_size)
    fixed = ram_packet_size(page_count)
    decoder = ChannelDecoder(page_size=page_size, ram_packet_bytes=packet_size,
                             ram_layout=layout, block_size=block_size, channel=path.name)
    decompressor: PacketDecompressor | None = None
    arrival = _arrival_times(path)
    pos = 0
    rnd = 0
    seq = 0
    try:
        with open(path, "rb") as f:
            for event in _feed_file(decoder, f):
                if isinstance(event, InitReceived):
                    init = event.init
                    scan.channel_id = init.channel_id
                    scan.uuid = init.uuid_text
                    scan.init = {"uuid": init.uuid_text, "id": init.channel_id}
                    pos = INIT_SIZE
                elif isinstance(event, RamPacketReceived):
                    p: RamPacket = event.packet
                    info = PacketInfo(scan.file_id if scan.channel_id is None else scan.channel_id,
                                      seq, pos, p.flags, p.packet_num, p.ramblock,
                                      p.normal_pages, p.zero_pages, len(event.payload), rnd,
                                      p.normal_offsets, p.zero_offsets)
                    scan.packets.append(info)
                    scan.header_bytes += fixed
                    scan.payload_bytes += len(event.payload)
                    pos += fixed + len(event.payload)
                    seq += 1
                    info.arrival_ns = arrival(pos)
                    if p.is_sync:
                        rnd += 1
                    if p.normal_pages:
                        method = method_name(p.compression)
                        scan.methods.add(method)
                        if method == "none":
                            pages = event.payload
                        elif verify or on_pages is not None:
                            if decompressor is None:
                                decompressor = PacketDecompressor(method)
                            elif decompressor.method != method:
                                raise RemoteProtocolError(
                                    f"packet {info.seq} (packet_num {p.packet_num}) uses "
                                    f"{method}, earlier packets {decompressor.method}")
                            pages = memoryview(decompressor.decompress(
                                event.payload, p.normal_pages * page_size))
                            scan.decompressed += 1
                        if on_pages is not None:
                            on_pages(info, pages)
                elif isinstance(event, DeviceStateReceived):
                    h = event.header
                    dev = DevicePacketInfo(
                        scan.file_id if scan.channel_id is None else scan.channel_id, seq,
                        pos, h.idstr, h.instance_id, h.payload_size)
                    _decode_device_payload(dev, event.payload)
                    scan.devices.append(dev)
                    scan.header_bytes += DEVICE_STATE_HEADER_SIZE
                    scan.payload_bytes += h.payload_size
                    pos += DEVICE_STATE_HEADER_SIZE + h.payload_size
                    seq += 1
                    dev.arrival_ns = arrival(pos)
                elif isinstance(event, ChannelClosed):
                    scan.closed = True
    except MigrationError as exc:
        where = pos if not isinstance(exc, ChannelError) else decoder.bytes_received
        scan.error = {"type": type(exc).__name__, "message": str(exc),
                      "offset": where, "packet": seq}
    return scan


MAX_RECV_LINES = 10_000_000


def _arrival_times(path: Path) -> Callable[[int], int | None]:
    """When the byte before ``end`` arrived, from ``<name>.recv`` (``offset ns`` per
    receive call, written by migrate-dst --record-channels); None without the file."""
    recv = path.with_suffix(".recv")
    starts: list[int] = []
    times: list[int] = []
    try:
        with open(recv) as f:
            for n, line in enumerate(f):
                if n >= MAX_RECV_LINES:
                    break
                off, ns = line.split()
                starts.append(int(off))
                times.append(int(ns))
    except (OSError, ValueError):
        return lambda end: None
    if not starts or starts != sorted(starts):
        return lambda end: None

    def at(end: int) -> int | None:
        i = bisect.bisect_right(starts, end - 1) - 1
        return times[i] if i >= 0 else None

    return at


def _decode_device_payload(dev: DevicePacketInfo, payload: memoryview) -> None:
    try:
        # our sources send up to x-device-state-packet-size (4 MiB by default, at most
        # 8 MiB), QEMU 1 MiB; the channel decoder already bounded the payload
        header, data = decode_state_packet(payload, max_data=DEFAULT_MAX_DEVICE_PAYLOAD)
        dev.idx = header.idx
        dev.config = header.is_config
        dev.data = len(data)
        if header.is_config:
            dev.config_bytes = len(decode_config_blob(data))
    except MigrationError as exc:
        dev.error = f"{type(exc).__name__}: {exc}"


def device_summary(packets: list[DevicePacketInfo]) -> dict[str, Any]:
    """Per device (idstr/instance): idx order, sizes, the config packet, channels."""
    out: dict[str, Any] = {}
    timed = bool(packets) and all(d.arrival_ns is not None for d in packets)
    if timed:
        packets = sorted(packets, key=lambda d: (d.arrival_ns or 0, d.channel, d.seq))
    for dev in packets:
        key = f"{dev.idstr}/{dev.instance_id}"
        d = out.setdefault(key, {"idstr": dev.idstr, "instance_id": dev.instance_id,
                                 "packets": 0, "bytes": 0, "data_bytes": 0, "arrival": [],
                                 "by_channel": {}, "errors": []})
        d["packets"] += 1
        d["bytes"] += dev.size
        d["data_bytes"] += dev.data
        d["arrival"].append({"channel": dev.channel, "seq": dev.seq, "idx": dev.idx,
                             "size": dev.size, "config": dev.config,
                             "arrival_ns": dev.arrival_ns})
        d["by_channel"].setdefault(str(dev.channel), []).append(dev.idx)
        if dev.error:
            d["errors"].append(f"channel {dev.channel} packet {dev.seq}: {dev.error}")
        if dev.config:
            if "config" in d:
                d["errors"].append(f"second config packet (idx {dev.idx})")
            d["config"] = {"idx": dev.idx, "size": dev.size, "config_bytes": dev.config_bytes,
                           "channel": dev.channel}
    for d in out.values():
        idxs = [a["idx"] for a in d["arrival"] if a["idx"] is not None]
        sizes = [a["size"] for a in d["arrival"] if not a["config"]]
        d["data_packets"] = len(sizes)
        d["sizes"] = {"min": min(sizes), "max": max(sizes)} if sizes else None
        seen = set(idxs)
        top = max(idxs) if idxs else -1
        d["missing_idx"] = [i for i in range(top + 1) if i not in seen][:64]
        d["duplicate_idx"] = sorted({i for i in idxs if idxs.count(i) > 1})[:64]
        # across channels the order is only known from the recorder's timestamps
        d["order_basis"] = "recv timestamps" if timed else "per channel only"
        d["in_order_overall"] = idxs == sorted(idxs) if timed else None
        d["in_order_per_channel"] = all(
            [i for i in v if i is not None] == sorted(i for i in v if i is not None)
            for v in d["by_channel"].values())
        cfg = d.get("config")
        d["config_last"] = cfg is not None and cfg["idx"] == top
        if cfg is None:
            d["errors"].append("no config packet (VFIO's last packet carries the config)")
        elif cfg["idx"] != d["data_packets"]:
            d["errors"].append(f"config packet idx {cfg['idx']} but {d['data_packets']} data "
                               "packets")
    return out


# ----------------------------------------------------------------------------------------
# our main channel


def walk_our_main(path: Path, on_page: PageCallback | None = None) -> dict[str, Any]:
    """Walk a multifd-migrate main channel recording (MFDM preamble + msgpack messages)."""
    out: dict[str, Any] = {
        "format": "multifd-migrate", "bytes": path.stat().st_size, "messages": 0,
        "by_type": {}, "hello": None, "commands": [], "sections": [],
        "ram": {"page_size": None, "blocks": {}, "flush": 0, "eos": 0, "zero_pages": 0,
                "normal_pages": 0, "by_block": {}},
        "devices": [], "vfio": {}, "eof": None, "closed_cleanly": False, "complete": False,
        "error": None, "warnings": [],
    }
    decoder = ControlDecoder(expect_preamble=True, channel="main")
    ids: dict[int, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    try:
        with open(path, "rb") as f:
            for event in _feed_file(decoder, f):
                if isinstance(event, StreamClosed):
                    out["closed_cleanly"] = True
                    continue
                assert isinstance(event, MessageReceived)
                msg, payload = event.message, event.payload
                out["messages"] += 1
                t = message_type(msg)
                out["by_type"][t] = out["by_type"].get(t, 0) + 1
                if isinstance(msg, Hello):
                    out["hello"] = {
                        "protocol_version": msg.protocol_version,
                        "migration_id": msg.migration_id, "vm_uuid": msg.vm_uuid,
                        "capabilities": sorted(k for k, v in msg.capabilities.items() if v),
                        "parameters": dict(msg.parameters),
                        "devices": [{"id": d.id, "driver": d.driver, "idstr": d.idstr,
                                     "instance_id": d.instance_id,
                                     "multifd_transfer": d.multifd_transfer}
                                    for d in msg.devices],
                    }
                elif isinstance(msg, Command):
                    entry: dict[str, Any] = {"cmd": msg.cmd.name}
                    if msg.value:
                        entry["value"] = msg.value
                    out["commands"].append(entry)
                elif isinstance(msg, (SectionStart, SectionFull)):
                    kind = "start" if isinstance(msg, SectionStart) else "full"
                    current = {"kind": kind, "section_id": msg.section_id, "idstr": msg.idstr,
                               "instance_id": msg.instance_id, "version_id": msg.version_id,
                               "records": {}, "payload_bytes": 0, "footer": False}
                    out["sections"].append(current)
                    if kind == "start":
                        ids[msg.section_id] = current
                    if msg.idstr != "ram":
                        out["devices"].append({"idstr": msg.idstr, "instance_id": msg.instance_id,
                                               "version_id": msg.version_id, "kind": kind})
                elif isinstance(msg, (SectionPart, SectionEnd)):
                    start = ids.get(msg.section_id)
                    if start is None:
                        raise RemoteProtocolError(
                            f"{message_type(msg)} names section id {msg.section_id}, which no "
                            "section-start introduced")
                    current = {"kind": "part" if isinstance(msg, SectionPart) else "end",
                               "section_id": msg.section_id, "idstr": start["idstr"],
                               "instance_id": start["instance_id"],
                               "version_id": start["version_id"], "records": {},
                               "payload_bytes": 0, "footer": False}
                    out["sections"].append(current)
                elif isinstance(msg, SectionFooter):
                    if current is None or current["section_id"] != msg.section_id:
                        out["warnings"].append(
                            f"section-footer for id {msg.section_id} outside that section")
                    else:
                        current["footer"] = True
                    current = None
                elif isinstance(msg, Eof):
                    out["eof"] = {"digests": sorted(msg.digests)}
                else:
                    _our_record(out, current, msg, payload, on_page)
    except MigrationError as exc:
        out["error"] = {"type": type(exc).__name__, "message": str(exc),
                        "offset": decoder.bytes_received, "message_index": out["messages"]}
    out["complete"] = bool(out["eof"] and out["closed_cleanly"] and out["error"] is None)
    return out


def _our_record(out: dict[str, Any], current: dict[str, Any] | None, msg: Any,
                payload: memoryview | None, on_page: PageCallback | None) -> None:
    ram = out["ram"]
    t = message_type(msg)
    if current is None:
        out["warnings"].append(f"{t} record outside any section")
        recs: dict[str, int] = {}
    else:
        recs = current["records"]
    key = t if not isinstance(msg, VfioRecord) else f"vfio:{msg.marker.name}"
    recs[key] = recs.get(key, 0) + 1
    if payload is not None and current is not None:
        current["payload_bytes"] += len(payload)
    if isinstance(msg, RamSetup):
        ram["page_size"] = msg.page_size
        ram["blocks"] = dict(msg.blocks)
    elif isinstance(msg, RamFlush):
        ram["flush"] += 1
    elif isinstance(msg, RamEos):
        ram["eos"] += 1
    elif isinstance(msg, (RamPages, RamZeroPages)):
        size = ram["page_size"]
        used = ram["blocks"].get(msg.block)
        if size is None or used is None:
            raise RemoteProtocolError(f"{t} for block {msg.block!r} before a ram-setup naming it")
        for off in msg.offsets:
            if off % size or off > used - size:
                raise RemoteProtocolError(
                    f"{t}: offset {off:#x} is not a page inside block {msg.block!r}")
        per = ram["by_block"].setdefault(msg.block, {"normal": 0, "zero": 0})
        if isinstance(msg, RamPages):
            assert payload is not None
            if len(payload) != len(msg.offsets) * size:
                raise RemoteProtocolError(
                    f"ram-pages: {len(payload)} bytes for {len(msg.offsets)} pages of {size}")
            ram["normal_pages"] += len(msg.offsets)
            per["normal"] += len(msg.offsets)
            if on_page is not None:
                for i, off in enumerate(msg.offsets):
                    on_page("page", msg.block, off, payload[i * size:(i + 1) * size], 0,
                            ram["eos"], ram["flush"])
        else:
            ram["zero_pages"] += len(msg.offsets)
            per["zero"] += len(msg.offsets)
            if on_page is not None:
                for off in msg.offsets:
                    on_page("zero", msg.block, off, None, 0, ram["eos"], ram["flush"])
    elif isinstance(msg, VfioRecord) and current is not None:
        v = out["vfio"].setdefault(current["idstr"], {"markers": {}, "data_bytes": 0,
                                                      "config_bytes": 0})
        v["markers"][msg.marker.name] = v["markers"].get(msg.marker.name, 0) + 1
        if msg.marker is VfioMigFlag.DEV_DATA_STATE:
            v["data_bytes"] += msg.size
        elif msg.marker is VfioMigFlag.DEV_CONFIG_STATE:
            v["config_bytes"] += msg.size


# ----------------------------------------------------------------------------------------
# both main formats


@dataclass
class MainInfo:
    summary: dict[str, Any]
    blocks: dict[str, int]
    page_size: int
    sync_markers: int  # the main-channel records the destination syncs on
    sync_marker_kind: str  # "MULTIFD_FLUSH" / "EOS" (QEMU) or "ram-flush" / "ram-eos" (ours)
    error: dict[str, Any] | None
    #: guest bytes per RAM packet: QEMU's fixed 512 KiB, or what our hello announced
    packet_size: int = MULTIFD_PACKET_SIZE


def _announced_packet_size(hello: dict[str, Any] | None, page_size: int) -> int:
    """The RAM packet size our source's hello announced, if it is a usable one."""
    size = (hello or {}).get("parameters", {}).get("x-multifd-packet-size")
    if type(size) is not int:
        return MULTIFD_PACKET_SIZE  # a source before the parameter: QEMU's size
    try:
        ram_page_count(page_size, size)
    except ConfigError:
        return MULTIFD_PACKET_SIZE  # the channels' decoders report what does not fit
    return size


def walk_main(path: Path | None, on_page: PageCallback | None = None) -> MainInfo | None:
    """Walk ``main.bin`` in whichever format it is; None without a main channel."""
    if path is None:
        return None
    magic = _magic(path)
    if magic == MAIN_MAGIC:
        s = walk_our_main(path, on_page)
        r = s["ram"]
        flush = r["flush"] > 0
        page_size = r["page_size"] or 4096
        return MainInfo(s, dict(r["blocks"]), page_size,
                        r["flush"] if flush else r["eos"], "ram-flush" if flush else "ram-eos",
                        s["error"], _announced_packet_size(s["hello"], page_size))
    if magic == QEMU_VM_FILE_MAGIC or magic is None:
        data = _read_file(path)
        q = walk_qemu_main(data, on_page)
        s = q.as_dict()
        flush = q.ram_counts["flush"] > 0
        return MainInfo(s, dict(q.ram_blocks), q.page_size,
                        q.ram_counts["flush"] if flush else q.ram_counts["eos"],
                        "MULTIFD_FLUSH" if flush else "EOS", q.error)
    if magic == MULTIFD_MAGIC:
        err = BadMagicError("main.bin starts with the multifd magic: it is a multifd channel")
    else:
        err = BadMagicError(f"main.bin: unknown magic {magic:#010x} (neither QEVM nor MFDM)")
    error: dict[str, Any] = {"type": type(err).__name__, "message": str(err), "offset": 0}
    summary = {"format": "unknown", "bytes": path.stat().st_size, "error": error,
               "complete": False}
    return MainInfo(summary, {}, 4096, 0, "", error)


# ----------------------------------------------------------------------------------------
# the whole folder


@dataclass
class Analysis:
    capture: Capture
    layout: RamLayout
    layout_source: str
    main: MainInfo | None
    channels: list[ChannelScan]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: ((block, offset), round) of every page record on the main channel
    main_page_writes: list[tuple[tuple[str, int], int]] = field(default_factory=list)

    def timeline(self) -> dict[str, list[dict[str, Any]]]:
        ram = [p for ch in self.channels for p in ch.packets]
        ram.sort(key=lambda p: (p.packet_num, p.channel, p.seq))
        return {
            "ram": [{"packet_num": p.packet_num, "channel": p.channel, "seq": p.seq,
                     "offset": p.offset, "kind": p.kind, "flags": p.flags,
                     "block": p.ramblock if (p.normal or p.zero) else "",
                     "normal": p.normal, "zero": p.zero, "payload": p.payload,
                     "round": p.round, "arrival_ns": p.arrival_ns} for p in ram],
            "device_state": [{"channel": d.channel, "seq": d.seq, "offset": d.offset,
                              "idstr": d.idstr, "instance_id": d.instance_id, "idx": d.idx,
                              "config": d.config, "size": d.size,
                              "arrival_ns": d.arrival_ns}
                             for ch in self.channels for d in ch.devices],
        }

    def totals(self) -> dict[str, Any]:
        writes: dict[tuple[str, int], list[int]] = {}
        for ch in self.channels:
            for p in ch.packets:
                for off in p.normal_offsets + p.zero_offsets:
                    writes.setdefault((p.ramblock, off), []).append(p.round)
        main = self.main.summary if self.main else {}
        mram = main.get("ram", {}) if isinstance(main.get("ram"), dict) else {}
        for key, rnd in self.main_page_writes:
            writes.setdefault(key, []).append(rnd)
        twice = {k: v for k, v in writes.items() if len(v) > 1}
        same_round = sum(1 for v in twice.values() if len(set(v)) < len(v))
        mf_normal = sum(p.normal for ch in self.channels for p in ch.packets)
        mf_zero = sum(p.zero for ch in self.channels for p in ch.packets)
        main_normal = int(mram.get("normal_pages", 0) or 0)
        main_zero = int(mram.get("zero_pages", 0) or 0)
        nums = sorted(p.packet_num for ch in self.channels for p in ch.packets)
        dup_nums = sorted({n for i, n in enumerate(nums) if i and nums[i - 1] == n})
        missing_nums = (nums[-1] - nums[0] + 1 - len(set(nums))) if nums else 0
        return {
            "packet_num_duplicates": dup_nums[:32],
            "packet_num_missing": missing_nums,
            "channels": len(self.channels),
            "multifd_bytes": sum(ch.bytes for ch in self.channels),
            "normal_pages": mf_normal + main_normal,
            "zero_pages": mf_zero + main_zero,
            "multifd_normal_pages": mf_normal,
            "multifd_zero_pages": mf_zero,
            "main_normal_pages": main_normal,
            "main_zero_pages": main_zero,
            "distinct_pages": len(writes),
            "pages_sent_more_than_once": len(twice),
            "pages_sent_twice_in_one_round": same_round,
            "resent_examples": [
                {"block": k[0], "offset": k[1], "rounds": sorted(v)}
                for k, v in sorted(twice.items())[:8]],
            "device_state_packets": sum(len(ch.devices) for ch in self.channels),
        }

    def checks(self) -> list[dict[str, Any]]:
        return run_checks(self)

    def as_dict(self, *, timeline: bool = False) -> dict[str, Any]:
        cap = self.capture
        out: dict[str, Any] = {
            "dir": str(cap.path),
            "note": cap.note or None,
            "recorder": cap.recorder,
            "qemu_version": ".".join(map(str, cap.qemu_version)) if cap.qemu_version else None,
            "qemu_package": cap.qemu_package,
            "layout": self.layout.name,
            "layout_source": self.layout_source,
            "main": self.main.summary if self.main else None,
            "channels": [ch.summary() for ch in self.channels],
            "device_state": device_summary([d for ch in self.channels for d in ch.devices]),
            "totals": self.totals(),
            "checks": self.checks(),
            "errors": list(self.errors),
            "warnings": list(self.warnings),
        }
        if timeline:
            out["timeline"] = self.timeline()
        return out


def _choose_layout(cap: Capture, forced: RamLayout | None) -> tuple[RamLayout | None, str]:
    if forced is not None:
        return forced, "--layout"
    v = cap.qemu_version
    if v is not None:
        layout = RamLayout.V2 if v[:2] >= (9, 0) else RamLayout.V1
        return layout, f"meta.json: QEMU {'.'.join(map(str, v))}"
    if cap.recorder == "multifd-migrate":
        return RamLayout.V2, "multifd-migrate recording (our source writes the 9.0+ layout)"
    return None, ""


def analyze(path: str | Path, *, layout: RamLayout | None = None, verify: bool = True,
            on_main_page: PageCallback | None = None) -> Analysis:
    """Analyse a recording folder.  Raises only :class:`ConfigError` (no such folder)."""
    cap = open_capture(path)
    main_writes: list[tuple[str, int, int, int]] = []

    def record(kind: str, block: str, off: int, data: Any, fill: int, eos: int,
               flush: int) -> None:
        main_writes.append((block, off, eos, flush))
        if on_main_page is not None:
            on_main_page(kind, block, off, data, fill, eos, flush)

    main = walk_main(cap.main, record)
    chosen, source = _choose_layout(cap, layout)
    page_size = main.page_size if main else 4096
    packet_size = main.packet_size if main else MULTIFD_PACKET_SIZE
    block_size = main.blocks.get if main and main.blocks else None

    def scan_all(lay: RamLayout) -> list[ChannelScan]:
        return [scan_channel(p, i, page_size=page_size, layout=lay, block_size=block_size,
                             verify=verify, packet_size=packet_size)
                for i, p in cap.channels.items()]

    if chosen is not None:
        channels = scan_all(chosen)
    else:
        v2 = scan_all(RamLayout.V2)
        bad2 = sum(1 for c in v2 if c.error and c.error["type"] != "ChannelError")
        chosen, source, channels = RamLayout.V2, "autodetected: V2 (9.0+) decodes", v2
        if bad2:
            v1 = scan_all(RamLayout.V1)
            bad1 = sum(1 for c in v1 if c.error and c.error["type"] != "ChannelError")
            if bad1 < bad2:
                chosen, channels = RamLayout.V1, v1
                source = (f"autodetected: {bad2} channel(s) fail as V2 (9.0+), "
                          f"{'none' if not bad1 else bad1} as V1 (pre-9.0)")
            else:
                source = "autodetected: neither layout decodes every channel; showing V2"

    result = Analysis(cap, chosen, source, main, channels)
    # a main-channel record belongs to the round of the sync markers before it
    by_flush = main is not None and main.sync_marker_kind in ("MULTIFD_FLUSH", "ram-flush")
    result.main_page_writes = [((b, o), f if by_flush else e) for b, o, e, f in main_writes]
    if cap.note:
        result.warnings.append(cap.note)
    result.warnings.extend(cap.warnings)
    if main is not None:
        if main.error:
            e = main.error
            result.errors.append(f"main.bin: {e['type']} at offset {e.get('offset')}: "
                                 f"{e['message']}")
        result.warnings.extend(f"main.bin: {w}" for w in main.summary.get("warnings", []))
        stopped = main.summary.get("stopped")
        if stopped:
            result.warnings.append(f"main.bin: walk stopped at offset {stopped['offset']}: "
                                   f"{stopped['reason']}")
    for ch in channels:
        if ch.error:
            e = ch.error
            result.errors.append(f"{ch.name}: {e['type']} at offset {e['offset']} (packet "
                                 f"{e['packet']}): {e['message']}")
        if not ch.init and not ch.error:
            result.errors.append(f"{ch.name}: empty file (no channel init)")
        for dev in ch.devices:
            if dev.error:
                result.errors.append(f"{ch.name}: device-state packet {dev.seq} for "
                                     f"{dev.idstr!r}: {dev.error}")
    if not cap.channels and cap.main is None:
        result.errors.append("no channel files")
    return result


# ----------------------------------------------------------------------------------------
# cross-checks


def run_checks(a: Analysis) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        checks.append({"check": name, "ok": ok, "detail": detail})

    cap = a.capture
    meta = cap.meta or {}
    chans = [c for c in a.channels if c.init]
    if chans:
        ids = sorted(c.channel_id for c in chans if c.channel_id is not None)
        n = len(a.channels)
        names_ok = all(c.channel_id == c.file_id for c in chans)
        add("channel ids", ids == list(range(n)) and names_ok,
            f"ids {ids} for {n} channel file(s)"
            + ("" if names_ok else "; a file name does not match the id in its init"))
        expected_n = meta.get("multifd_channels", meta.get("channels"))
        if isinstance(expected_n, int):
            add("channel count", expected_n == n, f"meta.json says {expected_n}, found {n}")
        uuids = sorted({c.uuid for c in chans if c.uuid})
        ref = meta.get("uuid") or meta.get("vm_uuid")
        main = a.main.summary if a.main else {}
        if main.get("format") == "qemu" and main.get("configuration", {}).get("uuid"):
            ref = ref or main["configuration"]["uuid"]
        if main.get("format") == "multifd-migrate" and main.get("hello"):
            ref = ref or main["hello"]["vm_uuid"]
        detail = f"channel inits carry {', '.join(uuids)}"
        if ref:
            detail += f"; expected {ref}"
        add("VM UUID", len(uuids) == 1 and (not ref or uuids[0] == ref), detail)
        syncs = {c.name: len(c.syncs) for c in a.channels}
        same = len(set(syncs.values())) == 1
        if a.main is not None and a.main.sync_marker_kind:
            ok = same and set(syncs.values()) == {a.main.sync_markers}
            add("sync points", ok,
                f"SYNC packets per channel {syncs}; main channel has {a.main.sync_markers} "
                f"{a.main.sync_marker_kind} marker(s) (the destination syncs on those)")
        else:
            add("sync points", same, f"SYNC packets per channel {syncs}")
        methods = set().union(*(c.methods for c in a.channels)) if a.channels else set()
        want = meta.get("multifd_compression", meta.get("compression"))
        if isinstance(want, str):
            add("compression", methods <= {want},
                f"packets use {_method_text(methods)}; meta.json says {want}")
    if a.main is not None:
        s = a.main.summary
        complete = bool(s.get("complete"))
        add("main channel walked to the end", complete,
            "EOF reached" if complete else
            (s.get("error") or {}).get("message") or (s.get("stopped") or {}).get("reason")
            or "did not reach the end")
    status = meta.get("status")
    ram = status.get("ram") if isinstance(status, dict) else None
    if isinstance(ram, dict):
        t = a.totals()
        if isinstance(ram.get("normal"), int):
            normal_once = t["normal_pages"] - _resent_normal(a)
            add("query-migrate normal", normal_once == ram["normal"],
                f"QEMU counted {ram['normal']} normal pages; the stream carries "
                f"{t['normal_pages']} ({normal_once} without re-sent copies)")
        if isinstance(ram.get("duplicate"), int):
            add("query-migrate duplicate", t["zero_pages"] == ram["duplicate"],
                f"QEMU counted {ram['duplicate']} zero pages; the stream carries "
                f"{t['zero_pages']} (multifd {t['multifd_zero_pages']}, main "
                f"{t['main_zero_pages']})")
        if isinstance(ram.get("multifd-bytes"), int):
            total = t["multifd_bytes"]
            page = a.main.page_size if a.main else 4096
            # before 9.0 QEMU counted each packet's fixed part plus its pages uncompressed
            # (normal_pages x page size), and not the inits
            legacy = sum(ch.header_bytes for ch in a.channels) + t["multifd_normal_pages"] * page
            if total == ram["multifd-bytes"]:
                add("query-migrate multifd-bytes", True,
                    f"{total} bytes = every byte of the channel files")
            elif legacy == ram["multifd-bytes"]:
                add("query-migrate multifd-bytes", True,
                    f"QEMU counted {ram['multifd-bytes']} = packet headers + uncompressed "
                    f"pages (pre-9.0 accounting); the files hold {total}")
            else:
                add("query-migrate multifd-bytes", False,
                    f"QEMU counted {ram['multifd-bytes']}; the files hold {total}, packet "
                    f"headers + uncompressed pages make {legacy}")
    return checks


def _resent_normal(a: Analysis) -> int:
    seen: set[tuple[str, int]] = set()
    again = 0
    for ch in a.channels:
        for p in ch.packets:
            for off in p.normal_offsets:
                k = (p.ramblock, off)
                if k in seen:
                    again += 1
                seen.add(k)
    return again


def as_layout(text: str) -> RamLayout:
    try:
        return {"v1": RamLayout.V1, "v2": RamLayout.V2}[text.lower()]
    except KeyError:
        raise ConfigError(f"--layout must be v1 or v2, got {text!r}") from None

