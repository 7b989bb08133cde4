"""Where the time of one migration goes: both daemons' per-packet timelines, lined up.

Runs one migration on a fresh daemon pair started with ``--timeline`` (see
:mod:`migrate_common.timeline`) and prints, on one clock from the moment the source
stopped the VM:

- every downtime checkpoint of both sides;
- per time slice: device-state packets queued, MB written to the sockets, how busy
  the source's channel threads were (100 % = every channel writing all the time),
  MB of device state received and loaded on the destination, RAM received;
- per channel: its first and last write, bytes, busy and idle time in between;
- per kind of job (RAM, device state, SYNC), before and after the VM stopped: the
  channel time the jobs took, and so the rate a channel moves each kind at;
- per channel on the destination: the time spent receiving device-state data and the
  time between packets (reading the next header and waiting until the headers of the
  packets before it, on other channels, have come).

::

    python bench/timeline.py --devices 4 --state 64M --channels 4
    python bench/timeline.py --devices 4 --state 512M --channels 16 --slice 20
    python bench/timeline.py --ram 2G --channels 4 --slice 50 --out /tmp/tl
    python bench/timeline.py --ram 1G,fill=mixed --workload dirty-rate=64M,pattern=hotspot \
        --devices 4 --state 256M --channels 4 --slice 20   # RAM and devices together

``--out DIR`` keeps the two raw timelines (JSON lines) and the sample.  A debug log
line per packet (``--trace-packets``) would cost tens of microseconds each; the
timeline costs well under one, so this is the tool for finding milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import daemon_pair, migrate, vm_args  # noqa: E402

Event = list[Any]  # [ns, thread, event, *fields]


def read_timeline(path: Path) -> list[Event]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Slices:
    """Per-slice sums on a millisecond axis starting at ``t0``."""

    t0: int
    width_ms: float
    rows: dict[str, defaultdict[int, float]] = field(default_factory=dict)

    def add(self, column: str, ns: int, value: float = 1.0) -> None:
        self.rows.setdefault(column, defaultdict(float))[self._index(ns)] += value

    def spread(self, column: str, start: int, end: int, value: float) -> None:
        """Add ``value`` over [start, end], each slice its share of the interval."""
        if end <= start:
            self.add(column, end, value)
            return
        width = self.width_ms * 1e6
        first, last = self._index(start), self._index(end)
        for i in range(first, last + 1):
            lo = max(start, self.t0 + i * width)
            hi = min(end, self.t0 + (i + 1) * width)
            if hi > lo:
                self.add(column, int(lo), value * (hi - lo) / (end - start))

    def _index(self, ns: int) -> int:
        return int((ns - self.t0) // (self.width_ms * 1e6))

    def span(self) -> range:
        keys = [k for col in self.rows.values() for k in col]
        return range(min(keys), max(keys) + 1) if keys else range(0)


def analyse(src: list[Event], dst: list[Event], slice_ms: float) -> dict[str, Any]:
    """Line up the two timelines; everything in ms from the source's downtime start
    (or from its first event when the migration never stopped the VM)."""
    starts = [e[0] for e in src if e[2] == "checkpoint" and e[3] == "downtime-start"]
    t0 = starts[0] if starts else min(e[0] for e in src + dst)

    def ms(ns: int) -> float:
        return (ns - t0) / 1e6

    checkpoints = sorted([(ms(e[0]), "source", e[3]) for e in src if e[2] == "checkpoint"]
                         + [(ms(e[0]), "destination", e[3]) for e in dst
                            if e[2] == "checkpoint"])
    sl = Slices(t0, slice_ms)
    channels: dict[int, dict[str, Any]] = {}
    kinds: dict[tuple[str, str], dict[str, float]] = {}
    for e in src:
        if e[2] == "queued":
            sl.add("queued", e[0])
        elif e[2] == "sent":
            end, (chan, start, n, kind) = e[0], e[3:7]
            k = kinds.setdefault(("live" if start < t0 else "stopped", kind),
                                 {"jobs": 0, "MB": 0.0, "channel-ms": 0.0})
            k["jobs"] += 1
            k["MB"] += n / 1e6
            k["channel-ms"] += (end - start) / 1e6
            sl.spread("sent MB", start, end, n / 1e6)
            sl.spread("busy", start, end, (end - start) / 1e6)
            c = channels.setdefault(chan, {"first": start, "last": None, "bytes": 0,
                                           "busy": 0.0, "jobs": 0, "idle": 0.0})
            if c["last"] is not None and start > c["last"]:
                c["idle"] += (start - c["last"]) / 1e6
            c["last"] = end
            c["bytes"] += n
            c["busy"] += (end - start) / 1e6
            c["jobs"] += 1
    receivers: dict[int, dict[str, float]] = {}
    header_at: dict[int, int] = {}
    received_at: dict[int, int] = {}
    for e in dst:
        if e[2] == "header":
            chan = e[3]
            r = receivers.setdefault(chan, {"packets": 0, "body-ms": 0.0, "between-ms": 0.0})
            if chan in received_at:
                r["between-ms"] += (e[0] - received_at[chan]) / 1e6
            header_at[chan] = e[0]
        elif e[2] == "received":
            chan = e[3]
            sl.add("received MB", e[0], e[5] / 1e6)
            if chan in header_at:
                r = receivers[chan]
                r["packets"] += 1
                r["body-ms"] += (e[0] - header_at[chan]) / 1e6
            received_at[chan] = e[0]
        elif e[2] == "loaded":
            sl.spread("loaded MB", e[4], e[0], e[5] / 1e6)
        elif e[2] == "ram":
            sl.add("RAM pages", e[0], e[4])
    n_channels = max(len(channels), 1)
    table = []
    for i in sl.span():
        row: dict[str, float] = {"ms": i * slice_ms}
        for column, values in sl.rows.items():
            row[column] = values.get(i, 0.0)
        row["busy %"] = 100 * row.pop("busy", 0.0) / (slice_ms * n_channels)
        table.append(row)
    per_channel = {
        chan: {"first-ms": ms(c["first"]), "last-ms": ms(c["last"]), "MB": c["bytes"] / 1e6,
               "jobs": c["jobs"], "busy-ms": c["busy"], "idle-ms": c["idle"]}
        for chan, c in sorted(channels.items())}
    jobs = [{"phase": phase, "kind": kind, **k,
             "GBps-per-channel": k["MB"] / k["channel-ms"] if k["channel-ms"] else 0.0}
            for (phase, kind), k in sorted(kinds.items())]
    return {"checkpoints": checkpoints, "slices": table, "channels": per_channel,
            "jobs": jobs, "receivers": dict(sorted(receivers.items()))}


def render(result: dict[str, Any]) -> str:
    out = ["checkpoints (ms from the source's downtime start):"]
    out += [f"  {t:9.3f}  {side:<11} {name}" for t, side, name in result["checkpoints"]]
    rows = result["slices"]
    if rows:
        columns = ["ms"] + [c for c in ("queued", "sent MB", "busy %", "received MB",
                                        "loaded MB", "RAM pages") if c in rows[0]]
        out.append("")
        out.append("  ".join(f"{c:>11}" for c in columns))
        for row in rows:
            out.append("  ".join(f"{row.get(c, 0):11.0f}" if c in ("ms", "queued", "RAM pages")
                                 else f"{row.get(c, 0):11.1f}" for c in columns))
    if result["channels"]:
        out.append("")
        out.append("channel   first ms    last ms       MB   jobs   busy ms   idle ms")
        for chan, c in result["channels"].items():
            out.append(f"{chan:>7} {c['first-ms']:10.2f} {c['last-ms']:10.2f} {c['MB']:8.1f} "
                       f"{c['jobs']:6d} {c['busy-ms']:9.1f} {c['idle-ms']:9.1f}")
    if result.get("jobs"):
        out.append("")
        out.append("source jobs by kind, while the VM ran (live) and once it stopped: the "
                   "channel time they took")
        out.append("phase    kind            jobs        MB  channel ms  GB/s per channel")
        for j in result["jobs"]:
            out.append(f"{j['phase']:<8} {j['kind']:<12} {j['jobs']:7.0f} {j['MB']:9.1f} "
                       f"{j['channel-ms']:11.1f} {j['GBps-per-channel']:17.2f}")
    if result["receivers"]:
        out.append("")
        out.append("destination, device-state packets per channel: receiving their data, and "
                   "between packets")
        out.append("(a packet's data complete -> the next header read and its place in the "
                   "device known)")
        out.append("channel  packets   data ms   between ms")
        for chan, r in result["receivers"].items():
            out.append(f"{chan:>7} {r['packets']:8.0f} {r['body-ms']:9.1f} "
                       f"{r['between-ms']:12.1f}")
    return "\n".join(out)


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="mfm-timeline-"))
    src_path, dst_path = workdir / "src.timeline", workdir / "dst.timeline"
    devices, src_args, dst_args = vm_args(args.ram, args.devices, args.state, args.workload)
    try:
        async with daemon_pair(devices, src_args=[*src_args, "--timeline", str(src_path)],
                               dst_args=[*dst_args, "--timeline", str(dst_path)]) as (src, dst):
            sample = await migrate(src, dst, multifd=args.channels > 0,
                                   channels=max(args.channels, 1), timeout=600)
            # the destination writes its timeline when its side of the migration ends,
            # which may be a moment after the source reports completion
            for _ in range(100):
                if src_path.exists() and dst_path.exists():
                    break
                await asyncio.sleep(0.05)
        if not (src_path.exists() and dst_path.exists()):
            print("error: a daemon wrote no timeline", file=sys.stderr)
            return 1
        result = analyse(read_timeline(src_path), read_timeline(dst_path), args.slice)
        metrics = sample.get("metrics", {})
        what = "RAM" if args.ram else "device state"
        rate = metrics.get("ram-GBps" if args.ram else "device-GBps")
        print(f"{what}: {rate:.2f} GB/s, downtime {metrics.get('downtime-ms')} ms, "
              f"verified {sample.get('verified')}" if rate is not None
              else f"migration failed: {sample.get('error')}")
        print(render(result))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(src_path, out / "src.timeline")
            shutil.copy(dst_path, out / "dst.timeline")
            (out / "sample.json").write_text(json.dumps(sample, indent=1, default=str))
        return 0 if sample.get("verified") else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram", metavar="SIZE",
                    help="guest RAM of random content (SIZE,fill=mixed: half the pages "
                         "zero); no devices unless --devices")
    ap.add_argument("--devices", type=int,
                    help="vfio-sim devices (default 4, or none with --ram)")
    ap.add_argument("--state", default="64M", help="state size of each device (default 64M)")
    ap.add_argument("--workload", metavar="SPEC",
                    help="with --ram: a guest writing RAM on the source during the "
                         "migration, e.g. dirty-rate=64M,pattern=hotspot")
    ap.add_argument("--channels", type=int, default=4, help="multifd channels; 0 = main only")
    ap.add_argument("--slice", type=float, default=5.0, help="ms per table row (default 5)")
    ap.add_argument("--out", metavar="DIR", help="keep the raw timelines and the sample here")
    sys.exit(asyncio.run(run(ap.parse_args())))


if __name__ == "__main__":
    main()
