"""A walker for QEMU's native main migration stream (``QEVM``, file version 3).

Reads what a QEMU source writes on its main channel (see ../shared/spec/qemu-multifd.md
§2.8-§2.10) far enough to analyse a multifd migration:

* the header, the configuration section (machine type and the ``target-page-bits``,
  ``capabilities`` and ``uuid`` subsections), every ``QEMU_VM_COMMAND``;
* every section header (START / PART / END / FULL) with its footer;
* the body of the RAM sections record by record (``RAM_SAVE_FLAG_*``: the MEM_SIZE
  block list, ZERO and PAGE records, MULTIFD_FLUSH and EOS);
* the body of iterable VFIO sections (``VFIO_MIG_FLAG_*`` markers);
* the body of every other device section by the sizes the source itself recorded in
  the ``QEMU_VM_VMDESCRIPTION`` JSON at the end of the stream (the same information
  QEMU's ``scripts/analyze-migration.py`` relies on).  Without a usable vmdesc, the
  walker looks for the section's footer (``0x7e`` + section id) followed by something
  that parses as the next item, and says so (``parsed: "footer-scan"``);
* ``QEMU_VM_EOF`` and the vmdesc.

Everything is bounded by the input: every read checks the bytes left and every length
field is checked against a limit before it is used.  Truncated input raises
:class:`~protocol.errors.ChannelError`, malformed input a
:class:`~protocol.errors.RemoteProtocolError` subclass; :func:`walk_qemu_main` catches
both and returns what was parsed up to there together with the error.  Features the
walker does not understand (postcopy packaged commands, XBZRLE, RDMA hooks,
mapped-ram) stop the walk with a reason instead.
"""

from __future__ import annotations

import json
import struct
import uuid as _uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import (
    BadMagicError,
    BadVersionError,
    ChannelError,
    LimitExceededError,
    MigrationError,
    RemoteProtocolError,
)
from protocol.vfio import VfioMigFlag

__all__ = [
    "QEVM_MAGIC",
    "QEVM_VERSION",
    "RamFlag",
    "COMMANDS",
    "QemuSection",
    "QemuMainStream",
    "PageCallback",
    "walk_qemu_main",
    "find_vmdesc",
]

QEVM_MAGIC = 0x5145564D
QEVM_VERSION = 3
_VERSION_COMPAT = 2

EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
SECTION_FOOTER = 0x7E

SECTION_KINDS = {SECTION_START: "start", SECTION_PART: "part", SECTION_END: "end",
                 SECTION_FULL: "full"}


class RamFlag:
    ZERO = 0x002
    MEM_SIZE = 0x004
    PAGE = 0x008
    EOS = 0x010
    CONTINUE = 0x020
    XBZRLE = 0x040
    HOOK = 0x080
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


#: cmd number -> (name, fixed length or None for variable)
COMMANDS: dict[int, tuple[str, int | None]] = {
    1: ("OPEN_RETURN_PATH", 0),
    2: ("PING", 4),
    3: ("POSTCOPY_ADVISE", None),
    4: ("POSTCOPY_LISTEN", 0),
    5: ("POSTCOPY_RUN", 0),
    6: ("POSTCOPY_RAM_DISCARD", None),
    7: ("PACKAGED", 4),
    8: ("ENABLE_COLO", 0),
    9: ("POSTCOPY_RESUME", 0),
    10: ("RECV_BITMAP", None),
    11: ("SWITCHOVER_START", 0),
}

#: bounds (all far above anything QEMU writes)
MAX_MACHINE_NAME = 1024
MAX_CAPABILITIES = 256
MAX_RAM_BLOCKS = 4096
MAX_VMDESC = 64 * 1024 * 1024
MAX_VMDESC_DEPTH = 64
MAX_SECTIONS = 1 << 20
_MIN_PAGE_BITS, _MAX_PAGE_BITS = 10, 30

#: on_page(kind, block, offset, data, fill, eos_before, flush_before): kind is "zero" or
#: "page"; data is the page (a view into the stream) for "page", else None; fill is the
#: ZERO record's fill byte; eos_before / flush_before count the RAM EOS and
#: MULTIFD_FLUSH records before this one (the sync rounds, see migrate_analyze.extract).
PageCallback = Callable[[str, str, int, "memoryview | None", int, int, int], None]


_VFIO_MARKERS = {int(m): m for m in VfioMigFlag}
MAX_VFIO_DATA = 1 << 40


class _Stop(Exception):
    """The walk cannot continue for a reason that is not the stream's fault."""


@dataclass
class QemuSection:
    kind: str  # start / part / end / full
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int  # of the section type byte
    body_offset: int = 0
    body_size: int | None = None
    parsed: str = ""  # ram / vfio / vmdesc / footer-scan / "" (not walked)
    footer: bool = False
    records: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind, "section_id": self.section_id, "idstr": self.idstr,
            "instance_id": self.instance_id, "version_id": self.version_id,
            "offset": self.offset, "body_size": self.body_size, "parsed": self.parsed,
            "footer": self.footer,
        }
        if self.records:
            out["records"] = dict(self.records)
        return out


@dataclass
class QemuMainStream:
    size: int
    version: int | None = None
    machine: str | None = None
    config_subsections: list[str] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    uuid: str | None = None
    target_page_bits: int | None = None
    page_size: int = 4096
    page_size_source: str = "default"
    commands: list[dict[str, Any]] = field(default_factory=list)
    sections: list[QemuSection] = field(default_factory=list)
    ram_total: int | None = None
    ram_blocks: dict[str, int] = field(default_factory=dict)
    ram_counts: dict[str, int] = field(default_factory=lambda: {
        "mem_size": 0, "zero": 0, "page": 0, "flush": 0, "eos": 0})
    ram_pages_by_block: dict[str, dict[str, int]] = field(default_factory=dict)
    eof_offset: int | None = None
    vmdesc_offset: int | None = None
    vmdesc_size: int | None = None
    vmdesc: dict[str, Any] | None = None
    vmdesc_note: str | None = None
    trailing_bytes: int = 0
    stopped: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    not_walked: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.eof_offset is not None and self.error is None and self.stopped is None

    def device_sections(self) -> list[QemuSection]:
        return [s for s in self.sections if s.kind in ("start", "full") and s.idstr != "ram"]

    def as_dict(self) -> dict[str, Any]:
        vmdesc_devices = len(self.vmdesc.get("devices", [])) if self.vmdesc else None
        return {
            "format": "qemu",
            "bytes": self.size,
            "version": self.version,
            "machine": self.machine,
            "configuration": {"subsections": self.config_subsections,
                              "capabilities": self.capabilities, "uuid": self.uuid,
                              "target_page_bits": self.target_page_bits},
            "page_size": self.page_size,
            "page_size_source": self.page_size_source,
            "commands": self.commands,
            "sections": [s.as_dict() for s in self.sections],
            "ram": {
                "total": self.ram_total,
                "blocks": dict(self.ram_blocks),
                "flush": self.ram_counts["flush"],
                "eos": self.ram_counts["eos"],
                "zero_pages": self.ram_counts["zero"],
                "normal_pages": self.ram_counts["page"],
                "by_block": {k: dict(v) for k, v in self.ram_pages_by_block.items()},
            },
            "devices": [
                {"idstr": s.idstr, "instance_id": s.instance_id, "version_id": s.version_id,
                 "kind": s.kind, "body_size": s.body_size, "parsed": s.parsed}
                for s in self.device_sections()
            ],
            "eof_offset": self.eof_offset,
            "vmdesc": None if self.vmdesc_offset is None else {
                "offset": self.vmdesc_offset, "bytes": self.vmdesc_size,
                "devices": vmdesc_devices},
            "vmdesc_note": self.vmdesc_note,
            "trailing_bytes": self.trailing_bytes,
            "complete": self.complete,
            "stopped": self.stopped,
            "not_walked": self.not_walked,
            "error": self.error,
            "warnings": self.warnings,
        }


# ----------------------------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: memoryview, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    @property
    def left(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.end - self.pos < n:
            raise ChannelError(
                f"truncated main stream: {what} at offset {self.pos} needs {n} bytes, "
                f"only {max(self.end - self.pos, 0)} left", channel="main")

    def peek(self) -> int | None:
        return self.data[self.pos] if self.pos < self.end else None

    def u8(self, what: str) -> int:
        self.need(1, what)
        value = self.data[self.pos]
        self.pos += 1
        return value

    def _unpack(self, fmt: struct.Struct, what: str) -> int:
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return int(value)

    def be16(self, what: str) -> int:
        return self._unpack(_BE16, what)

    def be32(self, what: str) -> int:
        return self._unpack(_BE32, what)

    def be64(self, what: str) -> int:
        return self._unpack(_BE64, what)

    def take(self, n: int, what: str) -> memoryview:
        self.need(n, what)
        view = self.data[self.pos:self.pos + n]
        self.pos += n
        return view

    def counted(self, what: str) -> str:
        n = self.u8(f"{what} length")
        raw = bytes(self.take(n, what))
        return _text(raw, what, self.pos - n)


_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def _text(raw: bytes, what: str, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} at offset {offset} is not UTF-8: {raw[:40]!r}") from None


def find_vmdesc(raw: Any) -> int | None:
    """Offset of the ``QEMU_VM_VMDESCRIPTION`` byte if the stream ends with one.

    ``raw`` is ``bytes``, ``bytearray`` or an ``mmap``.  The vmdesc is the last thing
    QEMU writes: ``0x00`` (EOF) ``0x06`` ``BE32 len`` and exactly ``len`` bytes of JSON
    up to the end of the stream.
    """
    n = len(raw)
    lo = max(0, n - MAX_VMDESC - 6)
    hi = n
    while True:
        pos = int(raw.rfind(b"\x00\x06", lo, hi))
        if pos < 0:
            return None
        p = pos + 1
        if p + 5 <= n:
            (length,) = _BE32.unpack_from(raw, p + 1)
            if length == n - p - 5 and length > 0:
                return p
        hi = pos + 1  # keep searching before this candidate


def _vmsd_size(desc: Any, where: str, depth: int = 0) -> int:
    """Bytes a vmstate body occupies on the wire, from its vmdesc description."""
    if depth > MAX_VMDESC_DEPTH:
        raise LimitExceededError(f"vmdesc {where}: nested deeper than {MAX_VMDESC_DEPTH}",
                                 limit=MAX_VMDESC_DEPTH, value=depth)
    if not isinstance(desc, dict):
        raise RemoteProtocolError(f"vmdesc {where}: not an object")
    total = 0
    fields = desc.get("fields", [])
    if not isinstance(fields, list):
        raise RemoteProtocolError(f"vmdesc {where}: 'fields' is not a list")
    for f in fields:
        if not isinstance(f, dict):
            raise RemoteProtocolError(f"vmdesc {where}: a field is not an object")
        size = f.get("size")
        count = f.get("array_len", 1)
        if type(size) is not int or size < 0 or type(count) is not int or count < 0:
            raise RemoteProtocolError(
                f"vmdesc {where}: field {f.get('name')!r} has no valid size/array_len")
        total += size * count
    subs = desc.get("subsections", [])
    if not isinstance(subs, list):
        raise RemoteProtocolError(f"vmdesc {where}: 'subsections' is not a list")
    for sub in subs:
        if not isinstance(sub, dict) or not isinstance(sub.get("vmsd_name"), str):
            raise RemoteProtocolError(f"vmdesc {where}: a subsection has no vmsd_name")
        name_len = len(sub["vmsd_name"].encode("utf-8"))
        # 0x05, u8 name length, name, BE32 version_id, body
        total += 2 + name_len + 4 + _vmsd_size(sub, f"{where}/{sub['vmsd_name']}", depth + 1)
    return total


class _Walker:
    def __init__(self, raw: Any, on_page: PageCallback | None) -> None:
        self.raw = raw
        data = memoryview(raw).cast("B")
        self.data = data
        self.r = _Reader(data)
        self.out = QemuMainStream(size=len(data))
        self.on_page = on_page
        self.ids: dict[int, QemuSection] = {}
        self.vmdesc_devices: list[dict[str, Any]] = []
        self.vmdesc_cursor = 0
        self.footers: bool | None = None
        self.postcopy_advised = False
        self.limit = len(data)  # where the vmdesc starts, if there is one
        self.last_block: str | None = None
        self.current: QemuSection | None = None

    # -- vmdesc ----------------------------------------------------------------------
    def load_vmdesc(self) -> None:
        pos = find_vmdesc(self.raw)
        if pos is None:
            self.out.vmdesc_note = "no QEMU_VM_VMDESCRIPTION at the end of the stream"
            return
        length = len(self.data) - pos - 5
        try:
            desc = json.loads(bytes(self.data[pos + 5:]))
        except (ValueError, RecursionError) as exc:
            self.out.vmdesc_note = f"vmdesc at offset {pos} is not valid JSON ({exc})"
            return
        if not isinstance(desc, dict) or not isinstance(desc.get("devices", []), list):
            self.out.vmdesc_note = f"vmdesc at offset {pos} has no device list"
            return
        self.out.vmdesc = desc
        self.out.vmdesc_offset = pos
        self.out.vmdesc_size = length
        self.limit = pos - 1  # the EOF byte before it
        self.vmdesc_devices = [d for d in desc.get("devices", []) if isinstance(d, dict)]
        page_size = desc.get("page_size")
        if type(page_size) is int and _pow2(page_size):
            self.out.page_size = page_size
            self.out.page_size_source = "vmdesc"

    def vmdesc_entry(self, idstr: str, instance_id: int) -> dict[str, Any] | None:
        for k in range(self.vmdesc_cursor, len(self.vmdesc_devices)):
            dev = self.vmdesc_devices[k]
            if dev.get("name") == idstr and dev.get("instance_id") == instance_id:
                self.vmdesc_cursor = k + 1
                return dev
        return None

    # -- top level ---------------------------------------------------------------------
    def walk(self) -> None:
        r = self.r
        magic = r.be32("file magic")
        if magic != QEVM_MAGIC:
            raise BadMagicError(f"main stream: magic {magic:#010x} is not QEVM ({QEVM_MAGIC:#010x})")
        version = r.be32("file version")
        self.out.version = version
        if version == _VERSION_COMPAT:
            raise BadVersionError("main stream: file version 2 is obsolete (QEMU rejects it)")
        if version != QEVM_VERSION:
            raise BadVersionError(f"main stream: unsupported file version {version}")
        self.load_vmdesc()
        while True:
            if len(self.out.sections) > MAX_SECTIONS:
                raise LimitExceededError(f"main stream: more than {MAX_SECTIONS} sections",
                                         limit=MAX_SECTIONS, value=len(self.out.sections))
            offset = r.pos
            if r.left == 0:
                raise ChannelError(f"truncated main stream: ends at offset {offset} before "
                                   "QEMU_VM_EOF", channel="main")
            kind = r.u8("section type")
            if kind == EOF:
                self.out.eof_offset = offset
                self.after_eof()
                return
            if kind == CONFIGURATION:
                if offset != 8:
                    raise RemoteProtocolError(
                        f"main stream: configuration section at offset {offset}; it may only "
                        "follow the header")
                self.configuration()
            elif kind == COMMAND:
                self.command(offset)
            elif kind in (SECTION_START, SECTION_FULL):
                self.section_with_header(kind, offset)
            elif kind in (SECTION_PART, SECTION_END):
                self.section_by_id(kind, offset)
            elif kind == VMDESCRIPTION:
                raise RemoteProtocolError(
                    f"main stream: QEMU_VM_VMDESCRIPTION at offset {offset} before QEMU_VM_EOF")
            else:
                raise RemoteProtocolError(
                    f"main stream: unknown section type {kind:#04x} at offset {offset}")

    def after_eof(self) -> None:
        r = self.r
        if r.left == 0:
            if self.out.vmdesc is None:
                self.out.warnings.append("no vmdesc after QEMU_VM_EOF (QEMU only warns)")
            return
        if r.peek() == VMDESCRIPTION and self.out.vmdesc_offset == r.pos:
            return  # parsed up front
        if r.peek() == VMDESCRIPTION:
            r.u8("vmdesc type")
            length = r.be32("vmdesc length")
            if length > MAX_VMDESC:
                raise LimitExceededError(f"vmdesc of {length} bytes exceeds {MAX_VMDESC}",
                                         limit=MAX_VMDESC, value=length)
            r.take(length, "vmdesc JSON")
            self.out.warnings.append("vmdesc found after EOF but it is not the stream's tail")
        self.out.trailing_bytes = r.left
        if r.left:
            self.out.warnings.append(f"{r.left} bytes after the end of the stream")

    def configuration(self) -> None:
        r = self.r
        length = r.be32("configuration name length")
        if length > MAX_MACHINE_NAME:
            raise LimitExceededError(
                f"configuration: machine name length {length} exceeds {MAX_MACHINE_NAME}",
                limit=MAX_MACHINE_NAME, value=length)
        self.out.machine = _text(bytes(r.take(length, "machine name")), "machine name", r.pos)
        config_desc = (self.out.vmdesc or {}).get("configuration")
        while r.peek() == SUBSECTION:
            r.u8("subsection marker")
            name = r.counted("configuration subsection name")
            r.be32(f"subsection {name} version")
            self.out.config_subsections.append(name)
            if name == "configuration/target-page-bits":
                bits = r.be32("target-page-bits")
                if not _MIN_PAGE_BITS <= bits <= _MAX_PAGE_BITS:
                    raise RemoteProtocolError(f"configuration: target-page-bits {bits} out of range")
                self.out.target_page_bits = bits
                self.out.page_size = 1 << bits
                self.out.page_size_source = "configuration"
            elif name == "configuration/capabilities":
                count = r.be32("capability count")
                if count > MAX_CAPABILITIES:
                    raise LimitExceededError(f"configuration: {count} capabilities",
                                             limit=MAX_CAPABILITIES, value=count)
                self.out.capabilities = [r.counted("capability name") for _ in range(count)]
            elif name == "configuration/uuid":
                raw = bytes(r.take(16, "configuration uuid"))
                self.out.uuid = str(_uuid.UUID(bytes=raw))
            else:
                size = self._config_subsection_size(config_desc, name)
                if size is None:
                    raise _Stop(f"configuration subsection {name!r} is unknown and the vmdesc "
                                "does not describe it")
                r.take(size, f"configuration subsection {name}")
        if "mapped-ram" in self.out.capabilities:
            raise _Stop("mapped-ram streams (file migration) are not supported")

    def _config_subsection_size(self, desc: Any, name: str) -> int | None:
        if not isinstance(desc, dict):
            return None
        for sub in desc.get("subsections", []) or []:
            if isinstance(sub, dict) and sub.get("vmsd_name") == name:
                return _vmsd_size(sub, name)
        return None

    def command(self, offset: int) -> None:
        r = self.r
        cmd = r.be16("command number")
        length = r.be16("command length")
        spec = COMMANDS.get(cmd)
        if spec is None:
            raise RemoteProtocolError(f"main stream: unknown command {cmd:#x} at offset {offset}")
        name, fixed = spec
        if fixed is not None and length != fixed:
            raise RemoteProtocolError(
                f"main stream: command {name} at offset {offset} has length {length}, "
                f"expected {fixed}")
        data = bytes(r.take(length, f"command {name} data"))
        entry: dict[str, Any] = {"cmd": name, "offset": offset, "len": length}
        if name in ("PING", "PACKAGED"):
            entry["value"] = _BE32.unpack(data)[0]
        self.out.commands.append(entry)
        if name == "POSTCOPY_ADVISE":
            self.postcopy_advised = True
        if name == "PACKAGED":
            raise _Stop(f"command PACKAGED at offset {offset}: postcopy packaged streams are "
                        "not walked")

    # -- sections ----------------------------------------------------------------------
    def section_with_header(self, kind: int, offset: int) -> None:
        r = self.r
        section_id = r.be32("section id")
        idstr = r.counted("section idstr")
        instance_id = r.be32("instance id")
        version_id = r.be32("version id")
        if not idstr:
            raise RemoteProtocolError(f"main stream: empty idstr in section at offset {offset}")
        sec = QemuSection(SECTION_KINDS[kind], section_id, idstr, instance_id, version_id,
                          offset)
        if kind == SECTION_START:
            if section_id in self.ids:
                raise RemoteProtocolError(
                    f"main stream: section id {section_id} started twice (offset {offset})")
            self.ids[section_id] = sec
        self.body(sec)

    def section_by_id(self, kind: int, offset: int) -> None:
        r = self.r
        section_id = r.be32("section id")
        start = self.ids.get(section_id)
        if start is None:
            raise RemoteProtocolError(
                f"main stream: {SECTION_KINDS[kind].upper()} section at offset {offset} names "
                f"section id {section_id}, which no START section introduced")
        sec = QemuSection(SECTION_KINDS[kind], section_id, start.idstr, start.instance_id,
                          start.version_id, offset)
        self.body(sec)

    def body(self, sec: QemuSection) -> None:
        r = self.r
        self.out.sections.append(sec)
        self.current = sec
        sec.body_offset = r.pos
        idstr = sec.idstr
        if idstr == "ram":
            self.ram_body(sec)
            sec.parsed = "ram"
        elif _is_vfio(idstr) and sec.kind != "full":
            self.vfio_body(sec)
            sec.parsed = "vfio"
        elif sec.kind == "full":
            self.full_body(sec)
        else:
            self.scan_body(sec, f"no parser for the body of iterable section {idstr!r}")
        if sec.parsed != "footer-scan":
            sec.body_size = r.pos - sec.body_offset
            self.footer(sec)

    def footer(self, sec: QemuSection) -> None:
        r = self.r
        if r.peek() == SECTION_FOOTER:
            r.u8("section footer")
            fid = r.be32("section footer id")
            if fid != sec.section_id:
                raise RemoteProtocolError(
                    f"main stream: section {sec.idstr!r} (id {sec.section_id}) at offset "
                    f"{sec.offset} ends with the footer of section {fid}")
            sec.footer = True
            if self.footers is None:
                self.footers = True
        elif self.footers or r.left == 0:
            if r.left == 0:
                raise ChannelError(f"truncated main stream: section {sec.idstr!r} footer at "
                                   f"offset {r.pos}", channel="main")
            raise RemoteProtocolError(
                f"main stream: section {sec.idstr!r} (id {sec.section_id}) has no footer at "
                f"offset {r.pos} (byte {r.peek():#04x})")
        else:
            self.footers = False

    def full_body(self, sec: QemuSection) -> None:
        r = self.r
        desc = self.vmdesc_entry(sec.idstr, sec.instance_id) if self.vmdesc_devices else None
        if desc is not None:
            try:
                size = _vmsd_size(desc, sec.idstr)
            except RemoteProtocolError as exc:
                self.out.warnings.append(str(exc))
                size = None
            if size is not None:
                end = sec.body_offset + size
                if end + 5 <= r.end and self.data[end] == SECTION_FOOTER and \
                        _BE32.unpack_from(self.data, end + 1)[0] == sec.section_id:
                    r.take(size, f"section {sec.idstr} body")
                    sec.parsed = "vmdesc"
                    return
                self.out.warnings.append(
                    f"section {sec.idstr!r}: the vmdesc size {size} does not end at its footer")
        if _is_vfio(sec.idstr):
            # multifd mode: a FULL VFIO body is a lone marker; anything else needs the vmdesc
            save = r.pos
            try:
                self.vfio_body(sec)
                if r.peek() == SECTION_FOOTER:
                    sec.parsed = "vfio"
                    return
            except (MigrationError, _Stop):
                pass
            r.pos = save
            sec.records.clear()
        self.scan_body(sec, "not described by the vmdesc" if self.vmdesc_devices
                       else "no vmdesc to size the body")

    def scan_body(self, sec: QemuSection, why: str) -> None:
        """Find the section's footer followed by a plausible next item (heuristic)."""
        r = self.r
        needle = bytes([SECTION_FOOTER]) + _BE32.pack(sec.section_id)
        pos = sec.body_offset
        if self.footers is False:
            raise _Stop(f"section {sec.idstr!r} (id {sec.section_id}) at offset {sec.offset}: "
                        f"{why}, and this stream has no section footers to look for")
        candidates = 0
        while True:
            q = int(self.raw.find(needle, pos, self.limit))
            if q < 0 and candidates == 0:
                raise ChannelError(
                    f"truncated main stream: section {sec.idstr!r} (id {sec.section_id}) at "
                    f"offset {sec.offset} has no footer anywhere before the end of the stream "
                    f"({why})", channel="main")
            if q < 0:
                raise _Stop(f"section {sec.idstr!r} (id {sec.section_id}) at offset "
                            f"{sec.offset}: {why}, and no footer followed by a valid next item "
                            "was found")
            candidates += 1
            if q + 5 >= len(self.data):
                raise ChannelError(
                    f"truncated main stream: ends right after the footer of section "
                    f"{sec.idstr!r} (id {sec.section_id}), before QEMU_VM_EOF", channel="main")
            if self._plausible_next(q + 5, sec.section_id):
                sec.body_size = q - sec.body_offset
                sec.parsed = "footer-scan"
                r.pos = q + 5
                sec.footer = True
                self.out.warnings.append(
                    f"section {sec.idstr!r} (id {sec.section_id}) body ({why}) delimited by "
                    "scanning for its footer")
                return
            pos = q + 1

    def _plausible_next(self, p: int, section_id: int) -> bool:
        d = self.data
        n = len(d)
        if p >= n:
            return False
        t = d[p]
        if t == EOF:
            return p + 1 == n or d[p + 1] == VMDESCRIPTION
        if t in (SECTION_START, SECTION_FULL):
            if p + 6 > n:
                return False
            sid = _BE32.unpack_from(d, p + 1)[0]
            idlen = d[p + 5]
            if idlen == 0 or p + 6 + idlen + 8 > n or sid == section_id:
                return False
            name = bytes(d[p + 6:p + 6 + idlen])
            return all(0x20 <= c < 0x7F for c in name)
        if t in (SECTION_PART, SECTION_END):
            return p + 5 <= n and _BE32.unpack_from(d, p + 1)[0] in self.ids
        if t == COMMAND:
            if p + 5 > n:
                return False
            cmd, length = struct.unpack_from(">HH", d, p + 1)
            spec = COMMANDS.get(cmd)
            return spec is not None and (spec[1] is None or spec[1] == length)
        return False

    def vfio_body(self, sec: QemuSection) -> None:
        r = self.r
        recs = sec.records
        while True:
            at = r.pos
            value = r.be64("VFIO marker")
            marker = _VFIO_MARKERS.get(value)
            if marker is None:
                raise RemoteProtocolError(
                    f"VFIO section {sec.idstr!r} at offset {at}: unknown marker {value:#018x}")
            recs[marker.name] = recs.get(marker.name, 0) + 1
            if marker is VfioMigFlag.END_OF_STATE:
                return
            if marker is VfioMigFlag.DEV_DATA_STATE:
                size = r.be64("VFIO data size")
                if size > MAX_VFIO_DATA:
                    raise LimitExceededError(f"VFIO data of {size} bytes at offset {at}",
                                             limit=MAX_VFIO_DATA, value=size)
                r.take(size, "VFIO device data")
                recs["data_bytes"] = recs.get("data_bytes", 0) + size
            elif marker in (VfioMigFlag.DEV_INIT_DATA_SENT, VfioMigFlag.DEV_CONFIG_LOAD_READY):
                return  # no END_OF_STATE follows these
            elif marker is VfioMigFlag.DEV_CONFIG_STATE:
                raise _Stop(f"VFIO section {sec.idstr!r} at offset {at}: a device config vmstate "
                            "cannot be sized without the vmdesc")

    # -- RAM -----------------------------------------------------------------------------
    def ram_body(self, sec: QemuSection) -> None:
        r = self.r
        out = self.out
        page = out.page_size
        mask = page - 1
        counts = out.ram_counts
        recs = sec.records
        while True:
            at = r.pos
            header = r.be64("RAM record header")
            flags = header & mask
            addr = header & ~mask
            kind = flags & ~RamFlag.CONTINUE
            if kind == RamFlag.EOS:
                counts["eos"] += 1
                recs["eos"] = recs.get("eos", 0) + 1
                return
            if kind == RamFlag.MULTIFD_FLUSH:
                counts["flush"] += 1
                recs["flush"] = recs.get("flush", 0) + 1
            elif kind == RamFlag.MEM_SIZE:
                self.mem_size(addr, at)
                counts["mem_size"] += 1
                recs["mem_size"] = recs.get("mem_size", 0) + 1
            elif kind in (RamFlag.ZERO, RamFlag.PAGE):
                block = self.ram_block_name(flags, at)
                used = out.ram_blocks.get(block)
                if used is None:
                    raise RemoteProtocolError(
                        f"RAM record at offset {at} names unknown block {block!r}")
                if addr > used - page:
                    raise RemoteProtocolError(
                        f"RAM record at offset {at}: offset {addr:#x} beyond block {block!r} "
                        f"of {used:#x} bytes")
                per = out.ram_pages_by_block.setdefault(block, {"zero": 0, "normal": 0})
                if kind == RamFlag.ZERO:
                    fill = r.u8("zero page fill byte")
                    counts["zero"] += 1
                    per["zero"] += 1
                    recs["zero"] = recs.get("zero", 0) + 1
                    if fill:
                        out.warnings.append(f"ZERO record at offset {at} has fill byte "
                                            f"{fill:#04x} (QEMU 9.0+ rejects non-zero fills)")
                    if self.on_page is not None:
                        self.on_page("zero", block, addr, None, fill, counts["eos"],
                                     counts["flush"])
                else:
                    data = r.take(page, "RAM page data")
                    counts["page"] += 1
                    per["normal"] += 1
                    recs["page"] = recs.get("page", 0) + 1
                    if self.on_page is not None:
                        self.on_page("page", block, addr, data, 0, counts["eos"],
                                     counts["flush"])
            elif kind == RamFlag.XBZRLE:
                raise _Stop(f"XBZRLE page at offset {at}: XBZRLE is not decoded")
            elif kind == RamFlag.COMPRESS_PAGE:
                raise _Stop(f"compressed page (pre-9.1 compress threads) at offset {at}: "
                            "not decoded")
            elif kind == RamFlag.HOOK:
                raise _Stop(f"RDMA hook record at offset {at}: RDMA streams are not decoded")
            else:
                raise RemoteProtocolError(
                    f"RAM record at offset {at}: unknown flags {flags:#x} (header {header:#018x})")

    def ram_block_name(self, flags: int, at: int) -> str:
        if flags & RamFlag.CONTINUE:
            if self.last_block is None:
                raise RemoteProtocolError(
                    f"RAM record at offset {at}: CONTINUE flag but no earlier block")
            return self.last_block
        name = self.r.counted("RAM block idstr")
        self.last_block = name
        return name

    def mem_size(self, total: int, at: int) -> None:
        r = self.r
        out = self.out
        if out.ram_blocks:
            raise RemoteProtocolError(f"RAM MEM_SIZE record at offset {at}: block list sent twice")
        out.ram_total = total
        ignore_shared = "x-ignore-shared" in out.capabilities
        remaining = total
        while remaining > 0:
            if len(out.ram_blocks) >= MAX_RAM_BLOCKS:
                raise LimitExceededError(f"RAM block list: more than {MAX_RAM_BLOCKS} blocks",
                                         limit=MAX_RAM_BLOCKS, value=len(out.ram_blocks))
            name = r.counted("RAM block idstr")
            used = r.be64(f"RAM block {name} used_length")
            if not name:
                raise RemoteProtocolError(f"RAM block list at offset {at}: empty block name")
            if name in out.ram_blocks:
                raise RemoteProtocolError(f"RAM block list: block {name!r} listed twice")
            if used > remaining or used == 0:
                raise RemoteProtocolError(
                    f"RAM block {name!r}: used_length {used:#x} does not fit the remaining "
                    f"{remaining:#x} of the announced total {total:#x}")
            if used % out.page_size:
                raise RemoteProtocolError(
                    f"RAM block {name!r}: used_length {used:#x} is not a multiple of the page "
                    f"size {out.page_size}")
            out.ram_blocks[name] = used
            remaining -= used
            if self.postcopy_advised and r.left >= 8:
                # present only if the block's page size differs from the host's: a value
                # that no record header and no next block entry can take
                peek = _BE64.unpack_from(self.data, r.pos)[0]
                if _pow2(peek) and out.page_size <= peek <= 1 << 30:
                    r.be64("RAM block page size")
            if ignore_shared:
                r.be64("RAM block mr addr")


def _pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _is_vfio(idstr: str) -> bool:
    return idstr == "vfio" or idstr.endswith("/vfio")




def walk_qemu_main(data: Any,
                   on_page: PageCallback | None = None) -> QemuMainStream:
    """Walk a whole QEMU main stream (``bytes``, ``bytearray`` or an ``mmap``).

    Never raises for bad input: the result's ``error`` holds the first typed error
    (with its class and message), ``stopped`` the reason the walk could not go on.
    """
    raw = bytes(data) if isinstance(data, memoryview) else data
    walker = _Walker(raw, on_page)
    try:
        walker.walk()
    except _Stop as stop:
        walker.out.stopped = {"offset": walker.r.pos, "reason": str(stop)}
    except MigrationError as exc:
        walker.out.error = {"type": type(exc).__name__, "message": str(exc),
                            "offset": walker.r.pos}
    out = walker.out
    if (out.stopped or out.error) and walker.vmdesc_devices:
        walked = {(s.idstr, s.instance_id) for s in out.sections if s.kind == "full"}
        out.not_walked = [
            {"idstr": d.get("name"), "instance_id": d.get("instance_id"),
             "version_id": d.get("version")}
            for d in walker.vmdesc_devices[walker.vmdesc_cursor:]
            if (d.get("name"), d.get("instance_id")) not in walked
        ]
    return out
