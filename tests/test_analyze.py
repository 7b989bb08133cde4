"""migrate-analyze over the real QEMU captures and over a synthetic recording of ours."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from migrate_analyze.analyze import analyze
from migrate_analyze.cli import main
from migrate_analyze.extract import extract_ram
from migrate_analyze.qemu_stream import walk_qemu_main
from protocol.control import (
    Command,
    CommandType,
    DeviceDescriptor,
    Eof,
    Hello,
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
    VfioRecord,
    encode_message,
    encode_preamble,
)
from protocol.errors import MigrationError
from protocol.multifd import ChannelInit, DeviceStateHeader, RamPacket
from protocol.vfio import VfioMigFlag, VfioStatePacketHeader, encode_config_blob

CAPTURES = Path(__file__).resolve().parents[1].parent / "shared" / "captures"
DIRS = sorted(p.parent for p in CAPTURES.glob("qemu-*/*/meta.json")) if CAPTURES.is_dir() else []
IDS = [f"{d.parent.name}/{d.name}" for d in DIRS]
needs_captures = pytest.mark.skipif(not DIRS, reason=f"no QEMU captures at {CAPTURES}")
PAGE = 4096


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------------
# QEMU captures


@needs_captures
@pytest.mark.parametrize("directory", DIRS, ids=IDS)
def test_capture_analysis_counts(directory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    rc, out, err = run_cli(capsys, directory, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["errors"] == []
    is_72 = directory.parent.name == "qemu-7.2"
    method = directory.name.split("-")[0]
    assert report["layout"] == ("V1" if is_72 else "V2")
    assert report["recorder"] == "qemu"

    main_ch = report["main"]
    assert main_ch["complete"] and main_ch["version"] == 3
    assert main_ch["machine"] == ("pc-i440fx-7.2" if is_72 else "pc-i440fx-10.0")
    assert main_ch["ram"]["blocks"]["mem"] == meta["ram_bytes"] == 32 << 20
    assert sum(main_ch["ram"]["blocks"].values()) == main_ch["ram"]["total"]
    # every device section is walked (sized by the vmdesc) and listed by idstr
    assert len(main_ch["devices"]) == main_ch["vmdesc"]["devices"] == 30
    assert {"timer", "cpu", "globalstate", "0000:00:01.3/piix4_pm"} <= {
        d["idstr"] for d in main_ch["devices"]}
    assert all(d["parsed"] == "vmdesc" for d in main_ch["devices"])
    assert [s["kind"] for s in main_ch["sections"] if s["idstr"] == "ram"] == \
        ["start", "part", "end"]
    if is_72:
        # per-section sync: no MULTIFD_FLUSH, zero pages on the main channel
        assert main_ch["ram"]["flush"] == 0 and main_ch["ram"]["eos"] == 3
        assert main_ch["ram"]["zero_pages"] == meta["status"]["ram"]["duplicate"] == 7673
        assert main_ch["commands"] == []
    else:
        assert main_ch["ram"]["flush"] == 3 and main_ch["ram"]["eos"] == 3
        assert main_ch["ram"]["zero_pages"] == 0
        assert [c["cmd"] for c in main_ch["commands"]] == ["SWITCHOVER_START"]

    channels = report["channels"]
    assert [c["init"]["id"] for c in channels] == [0, 1]
    assert {c["init"]["uuid"] for c in channels} == {meta["uuid"]}
    for c in channels:
        assert c["compression"] == method
        assert c["packets"]["sync"] == 3
        assert c["packets"]["device_state"] == 0
        assert c["error"] is None and c["closed_cleanly"]
        if method != "none":
            assert c["decompressed_payloads"] == c["packets"]["by_kind"].get("normal", 0) + \
                c["packets"]["by_kind"].get("sync+pages", 0)

    totals = report["totals"]
    if is_72:
        # the zstd run queued page 0xff000 of "mem" twice (both copies in round 1)
        assert totals["normal_pages"] == (650 if method == "zstd" else 649)
        assert totals["pages_sent_more_than_once"] == (1 if method == "zstd" else 0)
        assert totals["multifd_zero_pages"] == 0 and totals["main_zero_pages"] == 7673
    else:
        assert totals["normal_pages"] == 651
        assert totals["multifd_zero_pages"] == 7671 and totals["main_zero_pages"] == 0
        assert totals["pages_sent_more_than_once"] == 0
    assert totals["distinct_pages"] == sum(main_ch["ram"]["blocks"].values()) // PAGE
    assert all(c["ok"] for c in report["checks"]), report["checks"]


@needs_captures
@pytest.mark.parametrize("directory", DIRS, ids=IDS)
def test_capture_extract_ram_matches_meta(directory: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    out = tmp_path / "mem.bin"
    rc, text, err = run_cli(capsys, directory, "--extract-ram", "mem", out, "--json")
    assert rc == 0, err
    result = json.loads(text)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert digest == result["sha256"] == meta["ram_sha256"]
    assert result["matches_meta"] is True
    assert out.stat().st_size == meta["ram_bytes"]
    if directory.name == "zstd-2ch" and directory.parent.name == "qemu-7.2":
        [resent] = result["resent"]
        assert resent["offset"] == 0xFF000 and resent["same_round"] and resent["identical"]


@needs_captures
@pytest.mark.parametrize("directory", DIRS, ids=IDS)
def test_capture_timeline_is_ordered(directory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, directory, "--json", "--timeline")
    assert rc == 0
    report = json.loads(out)
    ram = report["timeline"]["ram"]
    assert len(ram) == sum(c["packets"]["ram"] for c in report["channels"])
    keys = [(e["packet_num"], e["channel"], e["seq"]) for e in ram]
    assert keys == sorted(keys)
    rc, text, _ = run_cli(capsys, directory, "--timeline")
    assert rc == 0 and "timeline:" in text


@needs_captures
def test_capture_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, CAPTURES / "qemu-10.0" / "zstd-2ch")
    assert rc == 0
    assert "machine pc-i440fx-10.0" in out
    assert "3 MULTIFD_FLUSH, 3 EOS" in out
    assert "compression zstd" in out
    assert "MISMATCH" not in out


@needs_captures
@pytest.mark.parametrize("version,layout", [("qemu-7.2", "V1"), ("qemu-10.0", "V2")])
def test_layout_autodetect_without_meta(version: str, layout: str, tmp_path: Path) -> None:
    src = CAPTURES / version / "none-2ch"
    for f in src.glob("*.bin"):
        shutil.copy(f, tmp_path / f.name)
    a = analyze(tmp_path)
    assert a.layout.name == layout and a.layout_source.startswith("autodetected")
    assert a.errors == []
    b = analyze(tmp_path, layout=a.layout)  # explicit override agrees
    assert b.layout_source == "--layout"


@needs_captures
def test_layout_override_v2_on_72_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(capsys, CAPTURES / "qemu-7.2" / "none-2ch", "--layout", "v2")
    assert rc == 1
    assert "next_packet_size" in err


@needs_captures
def test_main_stream_without_vmdesc_uses_footers() -> None:
    data = (CAPTURES / "qemu-10.0" / "none-2ch" / "main.bin").read_bytes()
    full = walk_qemu_main(data)
    assert full.complete and full.vmdesc_offset is not None
    cut = walk_qemu_main(data[:full.vmdesc_offset])  # EOF kept, vmdesc dropped
    assert cut.complete
    assert [(s.idstr, s.body_size) for s in cut.sections] == \
        [(s.idstr, s.body_size) for s in full.sections]
    assert {s.parsed for s in cut.device_sections()} == {"footer-scan"}


@needs_captures
def test_main_stream_truncated_and_mangled_never_crash() -> None:
    data = (CAPTURES / "qemu-7.2" / "none-2ch" / "main.bin").read_bytes()
    full = walk_qemu_main(data)
    for cut in (0, 3, 8, 9, 40, 200, 5000, full.vmdesc_offset - 3, len(data) - 1):
        s = walk_qemu_main(data[:cut])
        assert not s.complete
        assert s.error is not None and s.error["type"] == "ChannelError", (cut, s.error)
        assert "truncated" in s.error["message"]
    rnd = random.Random(7)
    for _ in range(300):
        mangled = bytearray(data)
        for _ in range(rnd.randrange(1, 4)):
            mangled[rnd.randrange(0, full.vmdesc_offset)] = rnd.randrange(256)
        try:
            walk_qemu_main(bytes(mangled))
        except MigrationError:  # pragma: no cover - the walker reports, never raises
            pytest.fail("walk_qemu_main raised")


@needs_captures
def test_truncated_main_bin_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = CAPTURES / "qemu-7.2" / "zlib-2ch"
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    data = (src / "main.bin").read_bytes()
    (tmp_path / "main.bin").write_bytes(data[:4000])
    rc, out, err = run_cli(capsys, tmp_path)
    assert rc == 1
    assert "main.bin: ChannelError" in err and "truncated main stream" in err
    # the multifd channels are still analysed
    assert "multifd-0.bin  channel 0" in out
    rc, _, err = run_cli(capsys, tmp_path, "--extract-ram", "mem", tmp_path / "out.bin")
    assert rc == 1 and "cannot rebuild" in err
    assert not (tmp_path / "out.bin").exists()


@needs_captures
def test_garbage_multifd_file_exits_nonzero(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = CAPTURES / "qemu-10.0" / "none-2ch"
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "multifd-1.bin").write_bytes(random.Random(3).randbytes(5000))
    rc, out, err = run_cli(capsys, tmp_path, "--json")
    assert rc == 1
    report = json.loads(out)
    bad = report["channels"][1]
    assert bad["error"]["type"] == "BadMagicError" and bad["init"] is None
    assert report["channels"][0]["error"] is None
    assert "multifd-1.bin: BadMagicError" in err
    # a channel cut in the middle of a packet
    good = (src / "multifd-1.bin").read_bytes()
    (tmp_path / "multifd-1.bin").write_bytes(good[:100_000])
    rc, _, err = run_cli(capsys, tmp_path)
    assert rc == 1 and "ChannelError" in err and "truncated RAM packet payload" in err


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(capsys, tmp_path / "nope")
    assert rc == 2 and "not a directory" in err
    rc, _, err = run_cli(capsys, tmp_path)
    assert rc == 2 and "no main.bin" in err


@needs_captures
def test_unknown_block(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, CAPTURES / "qemu-10.0" / "none-2ch", "--extract-ram", "pc.ram",
                         tmp_path / "x")
    assert rc == 2 and "no RAM block 'pc.ram'" in err and "mem (33554432 bytes)" in err


@needs_captures
def test_console_script_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "migrate_analyze",
                          str(CAPTURES / "qemu-10.0" / "none-2ch")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "QEMU 10.0" in out.stdout


# ----------------------------------------------------------------------------------------
# our own recordings (migrate-dst --record-channels), built here from protocol encoders

VM_UUID = "5c2f7a4e-3b1d-4e8a-9f60-0123456789ab"
VFIO = "0000:00:02.0/vfio"
BLOCK = "pc.ram"
BLOCK_SIZE = 16 * PAGE
P, Q, R, S, Z = 1 * PAGE, 2 * PAGE, 3 * PAGE, 4 * PAGE, 5 * PAGE


def _page(fill: int) -> bytes:
    return bytes([fill]) * PAGE


def _ram(packet_num: int, normal: list[tuple[int, bytes]], zero: tuple[int, ...] = (),
         pages: int = 128) -> bytes:
    offsets = tuple(o for o, _ in normal) + zero
    payload = b"".join(d for _, d in normal)
    packet = RamPacket(flags=0, pages_alloc=pages, normal_pages=len(normal),
                       next_packet_size=len(payload), packet_num=packet_num,
                       zero_pages=len(zero), ramblock=BLOCK, offsets=offsets)
    return packet.encode(pages) + payload


def _sync(packet_num: int, pages: int = 128) -> bytes:
    return RamPacket.sync_packet(packet_num).encode(pages)


def _device(idx: int, data: bytes, *, config: bool = False) -> bytes:
    body = VfioStatePacketHeader(idx, 1 if config else 0).encode() + data
    return DeviceStateHeader(VFIO, 0, len(body)).encode() + body


def make_recording(root: Path, *, timed: bool = False, packet_size: int | None = None,
                   first_device_bytes: int = 100) -> tuple[Path, bytes]:
    """An attempt folder as migrate-dst --record-channels writes it, and the RAM block
    it must rebuild to.  ``packet_size``: the RAM packet size the hello announces
    (None: a source before x-multifd-packet-size, with QEMU's 128 pages of 4 KiB).

    Pages: P is sent in round 1 (channel 0, packet_num 9) and again in round 2 (channel
    1, packet_num 5): the round decides, not packet_num.  Q is sent twice in round 1
    (channel 1 #3, channel 0 #4): packet_num decides.  R is a main-channel zero page in
    round 1, then a multifd normal page in round 2.  S travels on the main channel as a
    ram-pages record (round 2).  Z is a multifd zero page.
    """
    folder = root / "attempt-1"
    folder.mkdir(parents=True)
    msgs: list[bytes] = [encode_preamble()]

    def send(msg: Any, payload: bytes = b"") -> None:
        msgs.append(encode_message(msg) + payload)

    params: dict[str, Any] = {"multifd-channels": 2}
    if packet_size is not None:
        params["x-multifd-packet-size"] = packet_size
    n = (packet_size or 128 * PAGE) // PAGE
    send(Hello(1, "0123456789abcdef0123456789abcdef", VM_UUID,
               {"multifd": True, "return-path": True}, params,
               (DeviceDescriptor("vfio0", "vfio-pci-sim", VFIO, 0, 1, True, False, {}),)))
    send(Command(CommandType.OPEN_RETURN_PATH))
    send(Command(CommandType.PING, 1))
    send(SectionStart(0, "ram", 0, 4))
    send(RamSetup(PAGE, {BLOCK: BLOCK_SIZE}))
    send(RamFlush())                        # sync 1: ends round 0
    send(RamEos())
    send(SectionFooter(0))
    send(SectionStart(1, VFIO, 0, 1))
    send(VfioRecord(VfioMigFlag.DEV_SETUP_STATE))
    send(VfioRecord(VfioMigFlag.END_OF_STATE))
    send(SectionFooter(1))
    send(SectionPart(0))
    send(RamZeroPages(BLOCK, (R,)))         # round 1
    send(RamFlush())                        # sync 2: ends round 1
    send(RamEos())
    send(SectionFooter(0))
    send(Command(CommandType.SWITCHOVER_START))
    send(SectionEnd(0))
    send(RamPages(BLOCK, (S,), PAGE), _page(0x66))  # round 2
    send(RamFlush())                        # sync 3: ends round 2
    send(RamEos())
    send(SectionFooter(0))
    send(SectionEnd(1))
    send(VfioRecord(VfioMigFlag.END_OF_STATE))
    send(SectionFooter(1))
    send(SectionFull(1, VFIO, 0, 1))
    send(VfioRecord(VfioMigFlag.END_OF_STATE))
    send(SectionFooter(1))
    send(Eof({":ram": "ab" * 16, "vfio0": "cd" * 16}))
    (folder / "main.bin").write_bytes(b"".join(msgs))

    raw_uuid = uuid.UUID(VM_UUID).bytes
    config = encode_config_blob(b"\x01\x02config-space")
    ch0 = [ChannelInit(raw_uuid, 0).encode(), _sync(0, n),
           _ram(4, [(Q, _page(0xD0))], pages=n), _ram(9, [(P, _page(0xA0))], zero=(Z,), pages=n),
           _sync(10, n), _sync(12, n),
           _device(0, b"x" * first_device_bytes), _device(1, b"y" * 70)]
    ch1 = [ChannelInit(raw_uuid, 1).encode(), _sync(1, n),
           _ram(3, [(Q, _page(0xC0))], pages=n), _sync(11, n),
           _ram(5, [(P, _page(0xB0)), (R, _page(0xE0))], pages=n), _sync(13, n),
           _device(2, b"z" * 50), _device(3, config, config=True)]
    (folder / "multifd-0.bin").write_bytes(b"".join(ch0))
    (folder / "multifd-1.bin").write_bytes(b"".join(ch1))
    (folder / "main.recv").write_text("0 1000\n")
    if timed:
        # one receive call per device-state packet: idx 0 (ch0), 2 (ch1), 1 (ch0), 3 (ch1)
        for name, parts, times in (("multifd-0", ch0, (100, 300)), ("multifd-1", ch1, (200, 400))):
            first = len(b"".join(parts[:-2]))
            second = first + len(parts[-2])
            (folder / f"{name}.recv").write_text(
                f"0 10\n{first} {times[0]}\n{second} {times[1]}\n")
    (folder / "meta.json").write_text(json.dumps({
        "recorder": "multifd-migrate", "format": 1, "version": "0.1.0", "attempt": 1,
        "side": "destination", "channels": 2, "vm_uuid": VM_UUID, "compression": "none"}))

    expected = bytearray(BLOCK_SIZE)
    for off, fill in ((P, 0xB0), (Q, 0xD0), (R, 0xE0), (S, 0x66)):
        expected[off:off + PAGE] = _page(fill)
    return folder, bytes(expected)


def test_our_recording_analysis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = make_recording(tmp_path)
    rc, out, err = run_cli(capsys, tmp_path, "--json", "--timeline")  # finds attempt-1
    assert rc == 0, err
    report = json.loads(out)
    assert report["recorder"] == "multifd-migrate"
    assert report["layout"] == "V2" and report["errors"] == []
    assert report["dir"] == str(folder)

    m = report["main"]
    assert m["format"] == "multifd-migrate" and m["complete"]
    assert m["hello"]["vm_uuid"] == VM_UUID
    assert m["hello"]["devices"][0]["idstr"] == VFIO
    assert [c["cmd"] for c in m["commands"]] == ["OPEN_RETURN_PATH", "PING", "SWITCHOVER_START"]
    assert m["ram"]["blocks"] == {BLOCK: BLOCK_SIZE} and m["ram"]["page_size"] == PAGE
    assert (m["ram"]["flush"], m["ram"]["eos"]) == (3, 3)
    assert (m["ram"]["zero_pages"], m["ram"]["normal_pages"]) == (1, 1)
    assert [(s["kind"], s["idstr"]) for s in m["sections"]] == [
        ("start", "ram"), ("start", VFIO), ("part", "ram"), ("end", "ram"), ("end", VFIO),
        ("full", VFIO)]
    assert all(s["footer"] for s in m["sections"])
    assert m["vfio"][VFIO]["markers"] == {"DEV_SETUP_STATE": 1, "END_OF_STATE": 3}
    assert m["eof"]["digests"] == [":ram", "vfio0"]

    ch0, ch1 = report["channels"]
    assert ch0["packets"]["by_kind"] == {"sync": 3, "normal": 2, "device-state": 2}
    assert ch1["packets"]["device_state"] == 2
    assert ch0["pages"] == {"normal": 2, "zero": 1,
                            "by_block": {BLOCK: {"normal": 2, "zero": 1}}}

    dev = report["device_state"][f"{VFIO}/0"]
    assert [a["idx"] for a in dev["arrival"]] == [0, 1, 2, 3]  # channel 0 first, then 1
    assert dev["by_channel"] == {"0": [0, 1], "1": [2, 3]}
    assert dev["config"]["idx"] == 3 and dev["config"]["channel"] == 1
    assert dev["config"]["config_bytes"] == len(b"\x01\x02config-space")
    blob = len(encode_config_blob(b"\x01\x02config-space"))
    assert dev["data_packets"] == 3 and dev["data_bytes"] == 100 + 70 + 50 + blob
    assert dev["missing_idx"] == [] and dev["duplicate_idx"] == [] and dev["errors"] == []
    assert dev["sizes"] == {"min": 12 + 50, "max": 12 + 100}

    t = report["totals"]
    assert t["pages_sent_more_than_once"] == 3  # P, Q, R
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["VM UUID"]["ok"] and checks["sync points"]["ok"]
    assert checks["channel count"]["ok"] and checks["compression"]["ok"]

    timeline = report["timeline"]
    assert [e["packet_num"] for e in timeline["ram"]] == sorted(
        e["packet_num"] for e in timeline["ram"])
    assert [(e["channel"], e["idx"]) for e in timeline["device_state"]] == \
        [(0, 0), (0, 1), (1, 2), (1, 3)]

    rc, text, _ = run_cli(capsys, folder, "--timeline")
    assert rc == 0
    assert "MFDM" in text and "device state" in text and "config packet idx 3" in text


def test_our_recording_with_device_state_packets_over_1mib(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # x-device-state-packet-size: our source's packets carry 4 MiB by default
    make_recording(tmp_path, first_device_bytes=4 << 20)
    rc, out, err = run_cli(capsys, tmp_path, "--json")
    assert rc == 0, err
    dev = json.loads(out)["device_state"][f"{VFIO}/0"]
    assert dev["errors"] == [] and dev["sizes"]["max"] == 12 + (4 << 20)


@pytest.mark.parametrize("packet_size", [None, 512 * PAGE])
def test_our_recording_extract_follows_rounds(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              packet_size: int | None) -> None:
    # None: packets of QEMU's 128 pages; 512 pages when the hello announces 2 MiB
    folder, expected = make_recording(tmp_path, packet_size=packet_size)
    out = tmp_path / "ram.bin"
    result = extract_ram(folder, BLOCK, out)
    assert out.read_bytes() == expected
    assert result.sha256 == hashlib.sha256(expected).hexdigest()
    assert result.sync_marker == "ram-flush"
    assert result.pages["sent_more_than_once"] == 3
    by_offset = {r["offset"]: r for r in result.resent}
    assert not by_offset[P]["same_round"]           # rounds 1 and 2
    assert by_offset[Q]["same_round"] and not by_offset[Q]["identical"]
    assert [w["source"] for w in by_offset[R]["writes"]] == ["main", "multifd-1"]
    assert any("0x2000" in w for w in result.warnings)
    rc, text, _ = run_cli(capsys, folder, "--extract-ram", BLOCK, out)
    assert rc == 0 and result.sha256 in text


def test_our_recording_malformed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = make_recording(tmp_path)
    main_bin = folder / "main.bin"
    data = main_bin.read_bytes()
    main_bin.write_bytes(data[:-3])
    rc, out, err = run_cli(capsys, folder, "--json")
    assert rc == 1 and "truncated" in err
    assert json.loads(out)["main"]["complete"] is False
    main_bin.write_bytes(data[:8] + b"\xff" * 40)
    rc, _, err = run_cli(capsys, folder)
    assert rc == 1 and "main.bin" in err


def test_our_recording_recv_timestamps(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = make_recording(tmp_path, timed=True)
    rc, out, _ = run_cli(capsys, folder, "--json", "--timeline")
    assert rc == 0
    report = json.loads(out)
    dev = report["device_state"][f"{VFIO}/0"]
    assert dev["order_basis"] == "recv timestamps"
    assert [a["idx"] for a in dev["arrival"]] == [0, 2, 1, 3]
    assert [a["channel"] for a in dev["arrival"]] == [0, 1, 0, 1]
    assert dev["in_order_overall"] is False and dev["in_order_per_channel"] is True
    rc, text, _ = run_cli(capsys, folder)
    assert "out of idx order (by .recv timestamps)" in text


# ----------------------------------------------------------------------------------------
# a synthetic QEVM stream: the records the captures do not contain


def _counted(text: str) -> bytes:
    return bytes([len(text)]) + text.encode()


def _be(fmt: str, *values: int) -> bytes:
    return struct.pack(">" + fmt, *values)


def make_qevm(page_data: bytes) -> bytes:
    vfio = "0000:00:02.0/vfio"
    flag = {m.name: int(m) for m in VfioMigFlag}
    out = [b"QEVM", _be("I", 3),
           b"\x07", _be("I", 7), b"pc-test",
           b"\x05", _counted("configuration/target-page-bits"), _be("II", 1, 12),
           b"\x08", _be("HH", 1, 0), b"\x08", _be("HHI", 2, 4, 1),
           # RAM START: block list, flush, EOS
           b"\x01", _be("I", 1), _counted("ram"), _be("II", 0, 4),
           _be("Q", 2 * PAGE | 0x4), _counted("blk"), _be("Q", 2 * PAGE),
           _be("QQ", 0x200, 0x10), b"\x7e", _be("I", 1),
           # VFIO START
           b"\x01", _be("I", 2), _counted(vfio), _be("II", 0, 1),
           _be("QQ", flag["DEV_SETUP_STATE"], flag["END_OF_STATE"]), b"\x7e", _be("I", 2),
           # RAM PART: a PAGE record, a ZERO record with CONTINUE, flush, EOS
           b"\x02", _be("I", 1), _be("Q", 0 | 0x8), _counted("blk"), page_data,
           _be("Q", PAGE | 0x2 | 0x20), b"\x00", _be("QQ", 0x200, 0x10), b"\x7e", _be("I", 1),
           # VFIO PART: data, then INIT_DATA_SENT (no EOS after it)
           b"\x02", _be("I", 2), _be("QQ", flag["DEV_DATA_STATE"], 5), b"hello",
           _be("Q", flag["DEV_INIT_DATA_SENT"]), b"\x7e", _be("I", 2),
           b"\x08", _be("HH", 11, 0),
           b"\x03", _be("I", 1), _be("Q", 0x10), b"\x7e", _be("I", 1),
           b"\x03", _be("I", 2), _be("Q", flag["END_OF_STATE"]), b"\x7e", _be("I", 2),
           # a device described by the vmdesc, and VFIO's FULL section (a lone EOS)
           b"\x04", _be("I", 3), _counted("dev"), _be("II", 0, 1), b"abc", b"\x7e", _be("I", 3),
           b"\x04", _be("I", 2), _counted(vfio), _be("II", 0, 1), _be("Q", flag["END_OF_STATE"]),
           b"\x7e", _be("I", 2),
           b"\x00"]
    desc = json.dumps({"page_size": PAGE, "devices": [
        {"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1,
         "fields": [{"name": "x", "type": "buffer", "size": 3}]}]}).encode()
    out += [b"\x06", _be("I", len(desc)), desc]
    return b"".join(out)


def test_qevm_records(tmp_path: Path) -> None:
    page_data = random.Random(1).randbytes(PAGE)
    data = make_qevm(page_data)
    pages: list[tuple[Any, ...]] = []
    s = walk_qemu_main(data, lambda *a: pages.append(
        (a[0], a[1], a[2], bytes(a[3]) if a[3] is not None else None, a[4], a[5], a[6])))
    assert s.complete, (s.error, s.stopped)
    assert s.machine == "pc-test" and s.target_page_bits == 12
    assert s.page_size_source == "configuration"
    assert [c["cmd"] for c in s.commands] == ["OPEN_RETURN_PATH", "PING", "SWITCHOVER_START"]
    assert s.commands[1]["value"] == 1
    assert s.ram_blocks == {"blk": 2 * PAGE}
    assert s.ram_counts == {"mem_size": 1, "zero": 1, "page": 1, "flush": 2, "eos": 3}
    assert pages == [("page", "blk", 0, page_data, 0, 1, 1), ("zero", "blk", PAGE, None, 0, 1, 1)]
    vfio = [x for x in s.sections if x.idstr.endswith("/vfio")]
    assert [(x.kind, x.parsed) for x in vfio] == [("start", "vfio"), ("part", "vfio"),
                                                  ("end", "vfio"), ("full", "vfio")]
    assert vfio[1].records == {"DEV_DATA_STATE": 1, "data_bytes": 5, "DEV_INIT_DATA_SENT": 1}
    [dev] = [x for x in s.sections if x.idstr == "dev"]
    assert dev.parsed == "vmdesc" and dev.body_size == 3

    # a folder with only this main channel: PAGE and ZERO records rebuild the block
    (tmp_path / "main.bin").write_bytes(data)
    result = extract_ram(tmp_path, "blk", tmp_path / "blk.bin")
    assert (tmp_path / "blk.bin").read_bytes() == page_data + bytes(PAGE)
    assert result.pages["written_normal"] == 1 and result.pages["zero"] == 1

    # a ZERO record naming a block that does not exist, and one beyond its block
    bad = data.replace(_be("Q", 0 | 0x8) + _counted("blk"), _be("Q", 0 | 0x8) + _counted("xyz"))
    assert "unknown block 'xyz'" in walk_qemu_main(bad).error["message"]
    bad = data.replace(_be("Q", PAGE | 0x2 | 0x20), _be("Q", 4 * PAGE | 0x2 | 0x20))
    assert "beyond block" in walk_qemu_main(bad).error["message"]
