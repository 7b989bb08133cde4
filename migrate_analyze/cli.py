"""``migrate-analyze``: read a folder of recorded migration channels.

    migrate-analyze DIR [--json] [--timeline] [--layout v1|v2]
    migrate-analyze DIR --extract-ram BLOCK OUT [--json] [--layout v1|v2]

Exit status: 0 when everything decoded, 1 when some input is malformed or truncated
(the report still shows what could be read), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any, TextIO

from migrate_analyze.analyze import Analysis, analyze, as_layout
from migrate_analyze.extract import extract_ram
from protocol.errors import LocalError, MigrationError

__all__ = ["main", "render"]


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n // div} {unit}" if n % div == 0 else f"{n / div:.2f} {unit}"
    return f"{n} B"


def _wrap(head: str, text: str) -> str:
    return textwrap.fill(text, width=100, initial_indent=head,
                         subsequent_indent=" " * len(head), break_on_hyphens=False) + "\n"


def _counts(items: dict[str, int], sep: str = "×") -> str:
    return " ".join(f"{k}{sep}{v}" for k, v in items.items())


def _blocks(by_block: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{name} {v['normal']}+{v['zero']}" for name, v in by_block.items())


def _sections_line(sections: list[dict[str, Any]]) -> str:
    ram = [s for s in sections if s["idstr"] == "ram"]
    other_iter = [s for s in sections if s["idstr"] != "ram" and s["kind"] != "full"]
    full = [s for s in sections if s["idstr"] != "ram" and s["kind"] == "full"]
    parts = []
    if ram:
        kinds: dict[str, int] = {}
        for s in ram:
            kinds[s["kind"].upper()] = kinds.get(s["kind"].upper(), 0) + 1
        parts.append(f"ram (id {ram[0]['section_id']}) "
                     + " ".join(k if v == 1 else f"{k}×{v}" for k, v in kinds.items()))
    if other_iter:
        names: dict[str, list[str]] = {}
        for s in other_iter:
            names.setdefault(s["idstr"], []).append(s["kind"].upper())
        parts.extend(f"{n} {' '.join(k)}" for n, k in names.items())
    if full:
        n = len(full)
        label = f"{n} FULL device section{'s' if n > 1 else ''}"
        how: dict[str, int] = {}
        for s in full:
            key = s.get("parsed") or ""
            if key:
                how[key] = how.get(key, 0) + 1
        if how:
            label += " (" + ", ".join(f"{v} sized by {k}" for k, v in how.items()) + ")"
        parts.append(label)
    return "; ".join(parts) or "none"


def _render_qemu_main(m: dict[str, Any], w: TextIO) -> None:
    w.write(f"main.bin  {m['bytes']} B  QEVM v{m['version']}  machine {m['machine']}  "
            f"page {m['page_size']} ({m['page_size_source']})\n")
    conf = m["configuration"]
    extra = []
    if conf["subsections"]:
        extra.append("subsections " + ", ".join(conf["subsections"]))
    if conf["capabilities"]:
        extra.append("capabilities " + ", ".join(conf["capabilities"]))
    if extra:
        w.write(f"  config     {'; '.join(extra)}\n")
    cmds = [c["cmd"] + (f" {c['value']}" if "value" in c else "") for c in m["commands"]]
    w.write(f"  commands   {', '.join(cmds) or 'none'}\n")
    tail = []
    if m["eof_offset"] is not None:
        tail.append(f"EOF @{m['eof_offset']}")
    if m["vmdesc"]:
        tail.append(f"vmdesc {m['vmdesc']['bytes']} B ({m['vmdesc']['devices']} devices)")
    elif m.get("vmdesc_note"):
        tail.append(m["vmdesc_note"])
    w.write(f"  sections   {_sections_line(m['sections'])}"
            + (f"; {', '.join(tail)}" if tail else "") + "\n")
    _render_ram(m["ram"], "MULTIFD_FLUSH", "EOS", w)
    devices = [d["idstr"] + (f"#{d['instance_id']}" if d["instance_id"] else "")
               for d in m["devices"]]
    w.write(_wrap("  devices    ", ", ".join(devices) or "none"))
    if m["stopped"]:
        w.write(f"  STOPPED    at offset {m['stopped']['offset']}: {m['stopped']['reason']}\n")
    if m["not_walked"]:
        names = ", ".join(d["idstr"] for d in m["not_walked"])
        w.write(f"  not walked (from the vmdesc) {names}\n")
    if m["error"]:
        e = m["error"]
        w.write(f"  ERROR      {e['type']} at offset {e['offset']}: {e['message']}\n")


def _render_ram(r: dict[str, Any], flush: str, eos: str, w: TextIO) -> None:
    if r["blocks"]:
        blocks = ", ".join(f"{n} {_size(s)}" for n, s in r["blocks"].items())
        w.write(_wrap("  RAM blocks ", f"{blocks} (total {_size(sum(r['blocks'].values()))})"))
    w.write(f"  RAM records {r['flush']} {flush}, {r['eos']} {eos}, "
            f"{r['zero_pages']} zero pages, {r['normal_pages']} normal pages"
            + (f" ({_blocks(r['by_block'])})" if r["by_block"] else "") + "\n")


def _render_our_main(m: dict[str, Any], w: TextIO) -> None:
    w.write(f"main.bin  {m['bytes']} B  MFDM (multifd-migrate msgpack main channel)  "
            f"{m['messages']} messages\n")
    h = m["hello"]
    if h:
        devs = ", ".join(f"{d['id']} ({d['driver']}, {d['idstr']}"
                         + (", multifd" if d["multifd_transfer"] else "") + ")"
                         for d in h["devices"])
        w.write(f"  hello      migration {h['migration_id']}, VM {h['vm_uuid']}, schema "
                f"v{h['protocol_version']}, caps {', '.join(h['capabilities']) or 'none'}; "
                f"devices: {devs or 'none'}\n")
    cmds = [c["cmd"] + (f" {c['value']}" if "value" in c else "") for c in m["commands"]]
    w.write(f"  commands   {', '.join(cmds) or 'none'}\n")
    w.write(f"  sections   {_sections_line(m['sections'])}\n")
    r = m["ram"]
    if r["page_size"]:
        w.write(f"  RAM page   {r['page_size']}\n")
    _render_ram(r, "ram-flush", "ram-eos", w)
    for idstr, v in m["vfio"].items():
        w.write(f"  vfio       {idstr}: {_counts(v['markers'])}; data {v['data_bytes']} B, "
                f"config {v['config_bytes']} B on the main channel\n")
    if m["eof"]:
        w.write(f"  eof        digests for {', '.join(m['eof']['digests']) or 'nothing'}\n")
    w.write(f"  complete   {'yes' if m['complete'] else 'no'}\n")
    if m["error"]:
        e = m["error"]
        w.write(f"  ERROR      {e['type']} at offset {e['offset']}: {e['message']}\n")


def _render_channel(c: dict[str, Any], w: TextIO) -> None:
    init = c["init"] or {}
    bd = c["bytes_detail"]
    w.write(f"{c['file']}  channel {init.get('id', '?')}  uuid {init.get('uuid', '?')}  "
            f"{c['bytes']} B ({bd['init']} init + {bd['headers']} headers + "
            f"{bd['payload']} payload)\n")
    p = c["packets"]
    kinds = ", ".join(f"{v} {k}" for k, v in p["by_kind"].items())
    comp = c["compression"]
    if comp != "none":
        comp += f" ({c['decompressed_payloads']} payloads decompressed)"
    w.write(f"  packets    {p['total']}: {kinds or 'none'}; flags {_counts(p['by_flags'])}; "
            f"compression {comp}\n")
    pg = c["pages"]
    w.write(f"  pages      {pg['normal']} normal + {pg['zero']} zero"
            + (f": {_blocks(pg['by_block'])}" if pg["by_block"] else "") + "\n")
    if c["syncs"]:
        rounds = " | ".join(f"{r['normal']}+{r['zero']}" for r in c["rounds"])
        w.write(f"  syncs      packet_num {', '.join(str(s['packet_num']) for s in c['syncs'])}"
                f"  (pages per round: {rounds})\n")
    if c["packet_num"]:
        w.write(f"  packet_num {c['packet_num']['min']}..{c['packet_num']['max']}\n")
    if c["error"]:
        e = c["error"]
        w.write(f"  ERROR      {e['type']} at offset {e['offset']} (packet {e['packet']}): "
                f"{e['message']}\n")
    elif not c["closed_cleanly"]:
        w.write("  (did not end at a packet boundary)\n")


def _render_devices(devs: dict[str, Any], w: TextIO) -> None:
    w.write("device state (multifd device-state packets)\n")
    for key, d in devs.items():
        cfg = d.get("config")
        cfg_text = (f"config packet idx {cfg['idx']} on channel {cfg['channel']}, "
                    f"{cfg['config_bytes']} B of config" if cfg else "no config packet")
        sizes = d["sizes"]
        size_text = f"data packets {sizes['min']}..{sizes['max']} B" if sizes else "no data"
        per_channel = ("in idx order per channel" if d["in_order_per_channel"]
                       else "out of idx order on some channel")
        if d["in_order_overall"] is None:
            order = per_channel + " (no .recv timestamps for the order across channels)"
        elif d["in_order_overall"]:
            order = "in idx order (by .recv timestamps)"
        else:
            order = "out of idx order (by .recv timestamps), " + per_channel
        w.write(f"  {key}: {d['packets']} packets, {d['data_bytes']} B of data; {size_text}; "
                f"{cfg_text}; arrived {order}\n")
        per = "; ".join(f"ch{ch}: {', '.join(str(i) for i in idxs)}"
                        for ch, idxs in d["by_channel"].items())
        w.write(f"    idx by channel  {per}\n")
        if d["missing_idx"] or d["duplicate_idx"]:
            w.write(f"    missing idx {d['missing_idx']}  duplicate idx {d['duplicate_idx']}\n")
        for err in d["errors"]:
            w.write(f"    ! {err}\n")


def _render_timeline(t: dict[str, list[dict[str, Any]]], w: TextIO) -> None:
    w.write(f"timeline: {len(t['ram'])} RAM packets by packet_num\n")
    w.write("   pnum  ch   seq  kind         flags  block                    normal  zero  "
            "payload  round\n")
    for e in t["ram"]:
        w.write(f"  {e['packet_num']:5d}  {e['channel']:2d}  {e['seq']:4d}  {e['kind']:<11s}  "
                f"{e['flags']:#04x}   {e['block'][:23]:<23s}  {e['normal']:6d}  {e['zero']:4d}  "
                f"{e['payload']:7d}  {e['round']:5d}\n")
    if t["device_state"]:
        w.write(f"device-state packets (no packet_num), per channel in arrival order: "
                f"{len(t['device_state'])}\n")
        w.write("    ch   seq  device                          idx  config     size\n")
        for e in sorted(t["device_state"], key=lambda e: (e["channel"], e["seq"])):
            dev = f"{e['idstr']}/{e['instance_id']}"
            idx = "?" if e["idx"] is None else str(e["idx"])
            w.write(f"    {e['channel']:2d}  {e['seq']:4d}  {dev[:30]:<30s}  {idx:>4s}  "
                    f"{'yes' if e['config'] else 'no':<6s}  {e['size']:7d}\n")


def render(a: Analysis, w: TextIO, *, timeline: bool = False) -> None:
    d = a.as_dict(timeline=timeline)
    w.write(f"{d['dir']}\n")
    if d["recorder"] == "qemu":
        version = d["qemu_version"] or "version unknown"
        pkg = f" ({d['qemu_package']})" if d["qemu_package"] else ""
        w.write(f"  source     QEMU {version}{pkg}\n")
    else:
        w.write(f"  source     {d['recorder']}\n")
    w.write(f"  RAM layout {d['layout']} ({d['layout_source']})\n")
    if d["note"]:
        w.write(f"  note       {d['note']}\n")
    w.write("\n")
    m = d["main"]
    if m is None:
        w.write("main.bin   missing\n")
    elif m["format"] == "qemu":
        _render_qemu_main(m, w)
    elif m["format"] == "multifd-migrate":
        _render_our_main(m, w)
    else:
        w.write(f"main.bin  {m['bytes']} B  ERROR {m['error']['message']}\n")
    for c in d["channels"]:
        w.write("\n")
        _render_channel(c, w)
    devs = d.get("device_state") or {}
    if devs:
        w.write("\n")
        _render_devices(devs, w)
    t = d["totals"]
    w.write("\n")
    w.write(f"totals     normal {t['normal_pages']} (multifd {t['multifd_normal_pages']}, main "
            f"{t['main_normal_pages']}), zero {t['zero_pages']} (multifd "
            f"{t['multifd_zero_pages']}, main {t['main_zero_pages']}); {t['distinct_pages']} "
            f"distinct pages, {t['pages_sent_more_than_once']} sent more than once"
            + (f" ({t['pages_sent_twice_in_one_round']} within one round)"
               if t["pages_sent_twice_in_one_round"] else "") + "\n")
    if t["packet_num_duplicates"] or t["packet_num_missing"]:
        w.write(f"           packet_num: {t['packet_num_missing']} missing in the range"
                + (f", repeated: {t['packet_num_duplicates']}" if t["packet_num_duplicates"]
                   else "") + "\n")
    for r in t["resent_examples"]:
        w.write(f"           re-sent: {r['block']} {r['offset']:#x} in rounds {r['rounds']}\n")
    w.write("checks\n")
    for c in d["checks"]:
        w.write(f"  {'ok      ' if c['ok'] else 'MISMATCH'}  {c['check']}: {c['detail']}\n")
    for warning in d["warnings"]:
        w.write(f"warning: {warning}\n")
    for error in d["errors"]:
        w.write(f"error: {error}\n")
    if timeline:
        w.write("\n")
        _render_timeline(d["timeline"], w)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="migrate-analyze",
        description="Analyse recorded migration channels (QEMU captures or migrate-dst "
                    "--record-channels folders).")
    p.add_argument("dir", help="folder with main.bin, multifd-<id>.bin and meta.json "
                               "(or with attempt-N folders holding them)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeline", action="store_true",
                   help="list the RAM packets of all channels in packet_num order, then the "
                        "device-state packets per channel")
    p.add_argument("--layout", choices=["v1", "v2"],
                   help="RAM packet layout: v1 before QEMU 9.0, v2 from 9.0 (default: "
                        "meta.json's QEMU version, else autodetect)")
    p.add_argument("--extract-ram", nargs=2, metavar=("BLOCK", "OUT"),
                   help="rebuild RAM block BLOCK into file OUT and print its sha256")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout
    try:
        layout = as_layout(args.layout) if args.layout else None
        if args.extract_ram:
            block, target = args.extract_ram
            result = extract_ram(args.dir, block, target, layout=layout)
            if args.json:
                json.dump(result.as_dict(), out, indent=2)
                out.write("\n")
            else:
                pg = result.pages
                out.write(f"{result.block}: {result.size} bytes -> {result.out}\n")
                out.write(f"  sha256 {result.sha256}\n")
                out.write(f"  pages  {pg['pages']}: {pg['written_normal']} normal, {pg['zero']} "
                          f"zero, {pg['not_sent']} never sent, {pg['sent_more_than_once']} "
                          f"sent more than once (ordered by {result.sync_marker} rounds, then "
                          "packet_num)\n")
                for r in result.resent[:8]:
                    ws = ", ".join(f"round {x['round']} {x['source']}"
                                   + (f" #{x['packet_num']}" if x["packet_num"] is not None
                                      else "") for x in r["writes"])
                    out.write(f"  re-sent {r['offset']:#x}: {ws}"
                              f" ({'identical' if r['identical'] else 'different'} content)\n")
                if result.meta_ram_sha256 is not None:
                    out.write(f"  meta.json ram_sha256 "
                              f"{'matches' if result.matches_meta else 'DIFFERS'}\n")
                for warning in result.warnings:
                    out.write(f"warning: {warning}\n")
            return 0 if result.matches_meta is not False else 1
        a = analyze(args.dir, layout=layout)
        if args.json:
            json.dump(a.as_dict(timeline=args.timeline), out, indent=2)
            out.write("\n")
        else:
            render(a, out, timeline=args.timeline)
        for error in a.errors:
            print(f"migrate-analyze: {error}", file=sys.stderr)
        return 1 if a.errors else 0
    except LocalError as exc:
        print(f"migrate-analyze: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:
        print(f"migrate-analyze: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"migrate-analyze: {exc}", file=sys.stderr)
        return 2

