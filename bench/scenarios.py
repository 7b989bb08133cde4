"""The benchmark scenarios of issue #4: each runs real daemon pairs and returns its results.

A scenario returns a dict ``{"name", "title", "status", "config", "points", "targets",
"notes"}``.  Every point keeps all its raw samples (the full ``query-migrate`` of both
sides plus derived metrics) and a summary (median, min, max) per metric; every target
says what was compared, the limit, the measured value and PASS/FAIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import subprocess
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import pagereport, qemu_peer
from bench.harness import (
    GiB,
    MiB,
    Launch,
    RssSampler,
    SkipScenario,
    daemon_pair,
    derive,
    cpu_counters,
    foreign_processes,
    human,
    iperf3,
    iperf_available,
    APT_IPERF,
    mem_available,
    migrate,
    proc_status,
    shaped_network,
    size_text,
    wait_idle,
)

SCENARIOS = ("device-throughput", "ram-throughput", "downtime-devices", "scaling",
             "dst-memory", "shaped-network")

# the targets of issue #4
DEVICE_RATIO = 0.9         # device-state throughput >= 0.9 x iperf3, same stream count
RAM_RATIO = 0.8            # RAM throughput >= 0.8 x iperf3
QEMU_RATIO = 1.0           # ... and >= QEMU's own (qemu-system-x86 as the peer), same channels
DOWNTIME_RATIO = 0.45      # multifd downtime <= 0.45 x non-multifd, 4 realistic devices
OVERHEAD_MS = 30.0         # downtime <= device bytes / throughput + 30 ms
RSS_FIXED = 64 * MiB       # destination peak RSS <= 64 MiB + cap + channels x 2 MiB ...
RSS_PER_CHANNEL = 2 * MiB  # ... beyond the guest's own RAM and device state
FLAT = 0.15                # cost per byte within +-15 % across the scaling range

REALISTIC = "state-size=100M,stop-copy-latency=50ms,read-bandwidth=2G"


@dataclass
class Sizes:
    """Everything --quick shrinks."""

    device_total: int
    ram: int
    downtime_devices: list[int]
    downtime_state: str
    scaling_sizes: list[int]
    scaling_devices: list[int]
    scaling_devices_total: int
    dst_memory_total: int
    dst_memory_channels: list[int]
    shaped_total: int
    iperf_seconds: float


FULL = Sizes(
    device_total=2 * GiB, ram=2 * GiB, downtime_devices=[1, 2, 4, 8],
    downtime_state=REALISTIC,
    scaling_sizes=[256 * MiB, 512 * MiB, 1 * GiB, 2 * GiB, 4 * GiB, 8 * GiB],
    scaling_devices=[1, 2, 4, 8, 16, 32, 64], scaling_devices_total=1 * GiB,
    dst_memory_total=4 * GiB, dst_memory_channels=[1, 4, 16],
    shaped_total=1 * GiB, iperf_seconds=3)

QUICK = Sizes(
    device_total=128 * MiB, ram=128 * MiB, downtime_devices=[1, 4],
    downtime_state="state-size=16M,stop-copy-latency=50ms,read-bandwidth=2G",
    scaling_sizes=[32 * MiB, 64 * MiB, 128 * MiB], scaling_devices=[1, 4, 16],
    scaling_devices_total=64 * MiB, dst_memory_total=256 * MiB, dst_memory_channels=[4],
    shaped_total=64 * MiB, iperf_seconds=1)


@dataclass
class Context:
    sizes: Sizes
    repeat: int
    channels: list[int]
    iperf: bool
    out: Path
    profile: bool = False
    profile_gil: bool = False               # py-spy --gil: only the thread holding the GIL
    idle_wait: float = 0.0
    retries: int = 0
    max_foreign_cpu: float = 0.25
    downtime_channels: int = 4
    dst_cap: int = 32 * MiB
    link_bits: int = 10_000_000_000
    stream_bits: int = 2_500_000_000
    qemu_channels: list[int] | None = None  # QEMU peer in ram-throughput (0 = main channel
                                            # only); None = main + channels
    log: Callable[[str], None] = print

    def launch(self, scenario: str, key: str, rep: int, **kw: Any) -> Launch:
        launch = Launch(**kw)
        if self.profile and rep == 0:
            launch.profile_dir = self.out / "profiles" / scenario
            launch.profile_name = key
            launch.profile_gil = self.profile_gil
        return launch


# -- statistics --------------------------------------------------------------------------

def clean(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples no other process disturbed, or all of them if every one was."""
    quiet = [s for s in samples if not s.get("foreign-processes")]
    return quiet or samples


def summarize(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min, max and n of every numeric metric over the good, undisturbed samples."""
    good = [s["metrics"] for s in clean(samples) if s.get("verified")]
    keys = sorted({k for m in good for k, v in m.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        vals = [m[k] for m in good if isinstance(m.get(k), (int, float))]
        if vals:
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                      "n": len(vals)}
    return out


def med(point: dict[str, Any], metric: str) -> float | None:
    s = point.get("summary", {}).get(metric)
    return None if s is None else s["median"]


def target(name: str, what: str, value: float | None, limit: float, op: str,
           unit: str = "", **extra: Any) -> dict[str, Any]:
    """A target; it fails when the value is missing or any sample of it failed."""
    ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
    if extra.get("reason"):
        ok = False
    return {"name": name, "what": what, "value": value, "limit": limit, "op": op,
            "unit": unit, "pass": ok, **extra}


def fail_reason(point: dict[str, Any]) -> str | None:
    bad = [s for s in point["samples"] if not s.get("verified")]
    if not bad:
        return None
    s = bad[0]
    return f"{len(bad)}/{len(point['samples'])} failed: {s.get('error') or 'not verified'}"


# -- running points ----------------------------------------------------------------------

Runner = Callable[[dict[str, Any], int], Awaitable[dict[str, Any]]]
#: one iperf3 sample with this many streams
Baseline = Callable[[int], Awaitable[dict[str, Any]]]


async def run_points(ctx: Context, scenario: str, points: list[dict[str, Any]],
                     run: Runner, show: Callable[[dict[str, Any]], str],
                     repeat: int | None = None, baseline: Baseline | None = None,
                     shuffle: bool = False) -> None:
    """Every point ``repeat`` (default ``ctx.repeat``) times, round-robin so drift
    spreads over all points.  With a ``baseline``, every sample of a point that has
    ``streams`` (and is not a peer's) is followed at once by an iperf3 sample with
    as many streams, kept with it as ``sample["iperf3"]``: the machine's slow spells
    last longer than a pair, so the pair's ratio is what the ratio targets use.
    ``shuffle``: each round after the first in its own order (seeded by the round,
    kept as ``sample["order"]``), for points compared with each other — in a fixed
    order whatever a sample leaves behind (the hypervisor taking back 16 GiB after
    the 8 GiB point) always hits the same next point."""
    for p in points:
        p.setdefault("samples", [])
    for rep in range(repeat or ctx.repeat):
        order = list(points)
        if shuffle and rep:
            random.Random(f"bench-round-{rep}").shuffle(order)
        for position, p in enumerate(order):
            t0 = time.monotonic()
            for attempt in range(1 + ctx.retries):
                sample = await _one_sample(ctx, p, rep, run)
                if not sample.get("foreign-processes") or attempt == ctx.retries:
                    break
                p.setdefault("discarded", []).append(sample)
                ctx.log(f"  [{scenario}] {p['key']:<24} #{rep + 1}: discarded, disturbed: "
                        f"{sample['foreign-processes'][0]}")
            if shuffle:
                sample["order"] = position
            p["samples"].append(sample)
            ok = "ok" if sample.get("verified") else f"FAILED ({sample.get('error')})"
            busy = sample.get("foreign-processes")
            ctx.log(f"  [{scenario}] {p['key']:<24} #{rep + 1}: {show(sample)}  {ok}  "
                    f"({time.monotonic() - t0:.1f} s)"
                    + (f"  [machine busy: {len(busy)} other process(es)]" if busy else ""))
            if baseline is not None and "streams" in p and "peer" not in p:
                sample["iperf3"] = await baseline(p["streams"])


async def _one_sample(ctx: Context, p: dict[str, Any], rep: int,
                      run: Runner) -> dict[str, Any]:
    """One sample, watching for other benchmark/test processes while it runs."""
    seen: set[str] = set(await wait_idle(ctx.idle_wait))

    async def watch() -> None:
        while True:
            seen.update(foreign_processes())
            await asyncio.sleep(0.5)

    watcher = asyncio.get_running_loop().create_task(watch())
    busy0, ours0, t0 = *cpu_counters(), time.monotonic()
    try:
        sample = await run(p, rep)
    except (RuntimeError, TimeoutError, OSError) as exc:
        sample = {"verified": False, "error": f"{type(exc).__name__}: {exc}", "metrics": {}}
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    busy1, ours1 = cpu_counters()
    sample["rep"] = rep
    # what the rest of the machine used meanwhile, in CPUs (kernel threads doing our
    # loopback traffic count here too, so a small share is normal)
    wall = max(time.monotonic() - t0, 1e-3)
    sample["foreign-cpu"] = round(max(0.0, (busy1 - busy0) - (ours1 - ours0)) / wall, 3)
    if sample["foreign-cpu"] > ctx.max_foreign_cpu:
        seen.add(f"other processes used {sample['foreign-cpu']:.2f} CPUs on average")
    if why := pagereport.disturbance(sample.get("page-reporting-mib")):
        seen.add(why)
    if seen:
        sample["foreign-processes"] = sorted(seen)
    return sample


def _show_device(s: dict[str, Any]) -> str:
    m = s.get("metrics", {})
    if "device-GBps" not in m:
        return "-"
    return (f"{m['device-GBps']:.2f} GB/s, downtime {m['downtime-ms']:.0f} ms "
            f"(overhead {m['overhead-ms']:.1f} ms)")


def _show_ram(s: dict[str, Any]) -> str:
    m = s.get("metrics", {})
    if "ram-GBps" not in m:
        return "-"
    return (f"{m['ram-GBps']:.2f} GB/s over {m['transfer-ms']:.0f} ms, "
            f"downtime {m['downtime-ms']:.0f} ms")


def _show_downtime(s: dict[str, Any]) -> str:
    m = s.get("metrics", {})
    return f"downtime {m['downtime-ms']:.0f} ms" if "downtime-ms" in m else "-"


def _timeout(total_bytes: int, floor_bps: float = 50e6) -> float:
    return 120.0 + total_bytes / floor_bps


def _channel_points(ctx: Context) -> list[dict[str, Any]]:
    pts = [{"key": "main", "multifd": False, "channels": 1, "streams": 1}]
    pts += [{"key": f"{n} ch", "multifd": True, "channels": n, "streams": n}
            for n in ctx.channels]
    return pts


# -- iperf3 baselines --------------------------------------------------------------------

def iperf_baseline(ctx: Context, kind: str, **kw: Any) -> Baseline | None:
    """The ``baseline`` of :func:`run_points` (None with ``--no-iperf``): one iperf3
    run with ``-l 1M`` and the given number of streams, ``kw`` passed to
    :func:`~bench.harness.iperf3` (the shaped network's namespaces and pacing)."""
    if not ctx.iperf:
        return None
    if not iperf_available():
        raise SkipScenario(f"iperf3 is not installed: {APT_IPERF} (or --no-iperf)")

    async def one(n: int) -> dict[str, Any]:
        for attempt in range(1 + ctx.retries):
            busy = set(await wait_idle(ctx.idle_wait))
            settled = await pagereport.settle()
            reporting = pagereport.Window()
            busy0, ours0, t0 = *cpu_counters(), time.monotonic()
            try:
                r = iperf3(n, ctx.sizes.iperf_seconds, **kw)
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError,
                    KeyError) as exc:  # (ValueError, KeyError: iperf3's JSON)
                # a baseline that failed leaves its sample without a pair, nothing more
                ctx.log(f"  [iperf3 {kind}] -P {n}: FAILED: {exc}")
                return {"error": f"{type(exc).__name__}: {exc}"}
            busy1, ours1 = cpu_counters()
            wall = max(time.monotonic() - t0, 1e-3)
            r["foreign-cpu"] = round(max(0.0, (busy1 - busy0) - (ours1 - ours0)) / wall, 3)
            if r["foreign-cpu"] > ctx.max_foreign_cpu:
                busy.add(f"other processes used {r['foreign-cpu']:.2f} CPUs")
            r["settle-s"] = settled
            reported = reporting.mib()
            if reported is not None:
                r["page-reporting-mib"] = reported
            if why := pagereport.disturbance(reported):
                busy.add(why)
            busy.update(foreign_processes())
            if busy:
                r["foreign-processes"] = sorted(busy)
            if not busy or attempt == ctx.retries:
                break
            ctx.log(f"  [iperf3 {kind}] -P {n}: discarded, disturbed: {sorted(busy)[0]}")
        ctx.log(f"  [iperf3 {kind}] -P {n} -l 1M, right after: {r['Bps'] / 1e9:.2f} GB/s")
        return r

    return one


def iperf_summary(samples: list[dict[str, Any]]) -> dict[str, float]:
    vals = [r["Bps"] for r in clean(samples)]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


# -- device-throughput -------------------------------------------------------------------

async def device_throughput(ctx: Context) -> dict[str, Any]:
    total = ctx.sizes.device_total
    devices = [f"vfio-sim,id=dev{i},state-size={size_text(total // 4)}" for i in range(4)]
    points = _channel_points(ctx)

    async def run(p: dict[str, Any], rep: int) -> dict[str, Any]:
        launch = ctx.launch("device-throughput", p["key"].replace(" ", ""), rep)
        async with daemon_pair(devices, launch=launch) as (src, dst):
            return await migrate(src, dst, multifd=p["multifd"], channels=p["channels"],
                                 timeout=_timeout(total))

    baseline = iperf_baseline(ctx, "loopback")
    await run_points(ctx, "device-throughput", points, run, _show_device, baseline=baseline)
    return {"name": "device-throughput",
            "title": f"Device-state throughput, VM stopped (4 devices, {human(total)})",
            "config": {"devices": devices, "bytes": total, "max-bandwidth": 0},
            "points": points, "measure-notes": _iperf_notes(ctx), "paired": ctx.iperf}


def _iperf_notes(ctx: Context) -> list[str]:
    if not ctx.iperf:
        return ["iperf3 baseline not measured (--no-iperf)"]
    return ["ratio: the median over the samples of each sample's throughput divided by "
            "that of the iperf3 run (-l 1M, as many streams) taken right after it; "
            "iperf3 GB/s: the median of those runs"]


def _quiet_pairs(pairs: list[tuple[float, float, bool]]) -> list[tuple[float, float]]:
    """The pairs (a, b, disturbed) neither side of which other processes disturbed,
    or all of them if every one was (as :func:`clean` does for samples)."""
    quiet = [(a, b) for a, b, busy in pairs if not busy]
    return quiet or [(a, b) for a, b, _ in pairs]


def _pairs(point: dict[str, Any], metric: str) -> list[tuple[float, float]]:
    """(our throughput, iperf3's) in bytes/s of every good sample with its iperf3 run."""
    return _quiet_pairs([
        (s["metrics"][metric] * 1e9, s["iperf3"]["Bps"],
         bool(s.get("foreign-processes") or s["iperf3"].get("foreign-processes")))
        for s in point["samples"]
        if s.get("verified") and s.get("iperf3", {}).get("Bps")
        and s["metrics"].get(metric) is not None])


def _paired_ratio(point: dict[str, Any], metric: str) -> bool:
    """Set the point's ``iperf3-GBps`` and ``ratio`` from its pairs; False without any."""
    pairs = _pairs(point, metric)
    if pairs:
        point["iperf3-GBps"] = statistics.median(b for _, b in pairs) / 1e9
        point["ratio"] = statistics.median(v / b for v, b in pairs)
    return bool(pairs)


def _rep_pairs(p: dict[str, Any], q: dict[str, Any], metric: str
               ) -> list[tuple[float, float]]:
    """(p's, q's) ``metric`` of the repeats where both have a good sample (undisturbed
    ones only, unless no pair is)."""
    def by_rep(point: dict[str, Any]) -> dict[int, tuple[float, bool]]:
        return {s["rep"]: (s["metrics"][metric], bool(s.get("foreign-processes")))
                for s in point["samples"]
                if s.get("verified") and "rep" in s and s.get("metrics", {}).get(metric)}
    ours, theirs = by_rep(p), by_rep(q)
    return _quiet_pairs([(ours[r][0], theirs[r][0], ours[r][1] or theirs[r][1])
                         for r in sorted(ours.keys() & theirs.keys())])


def _eval_ratio(result: dict[str, Any], ratio: float, metric: str, what: str) -> None:
    samples = result.get("iperf3-samples")  # results.json from before the pairing
    if samples:
        result["iperf3"] = {k: iperf_summary(v) for k, v in samples.items()}
    for p in result["points"]:
        if not _paired_ratio(p, metric):
            if samples:
                b = result["iperf3"][str(p["streams"])]["median"] / 1e9
                v = med(p, metric)
                p["iperf3-GBps"] = b
                p["ratio"] = None if v is None else v / b
            elif result.get("paired"):  # measured, but no good sample has its iperf3 run
                p["ratio"] = None
            else:  # --no-iperf: no ratio targets at all
                continue
        if p["multifd"]:
            reason = fail_reason(p) or (None if p["ratio"] is not None else
                                        "no good sample with its iperf3 run beside it")
            result["targets"].append(target(
                f"{result['name']}-ratio",
                f"{p['key']}: {what} / iperf3 -P {p['streams']}", p["ratio"], ratio, ">=",
                "x", point=p["key"], reason=reason))


def _eval_device_throughput(result: dict[str, Any]) -> None:
    _eval_ratio(result, DEVICE_RATIO, "device-GBps", "device-state throughput")
    for p in result["points"]:
        result["targets"].append(target(
            "downtime-overhead", f"{p['key']}: downtime - device bytes / throughput",
            med(p, "overhead-ms"), OVERHEAD_MS, "<=", "ms", point=p["key"],
            reason=fail_reason(p)))


# -- ram-throughput ----------------------------------------------------------------------

async def ram_throughput(ctx: Context) -> dict[str, Any]:
    ram = ctx.sizes.ram
    points = _channel_points(ctx)
    src_args = ["--memory", f"{size_text(ram)},fill=random"]
    dst_args = ["--memory", size_text(ram)]
    qemu_points, image, qemu_notes = await _qemu_setup(ctx, ram)
    # what the end-to-end RAM digest costs, and ours against QEMU like for like (QEMU
    # has no digest): shown at every channel count, not a target
    unverified = [{"key": f"{n} ch, x-verify-ram off", "multifd": True, "channels": n,
                   "streams": n, "parameters": {"x-verify-ram": False}}
                  for n in ctx.channels]

    async def run(p: dict[str, Any], rep: int) -> dict[str, Any]:
        if p.get("peer") == "qemu":
            assert image is not None
            try:
                return await asyncio.to_thread(qemu_peer.migrate_once, image, p["channels"],
                                               multifd=p["multifd"], timeout=_timeout(ram))
            except Exception as exc:  # QEMU must never break the scenario: a failed sample
                return {"peer": "qemu", "verified": False,
                        "error": f"{type(exc).__name__}: {exc}", "metrics": {}}
        launch = ctx.launch("ram-throughput", p["key"].replace(" ", ""), rep)
        async with daemon_pair([], src_args=src_args, dst_args=dst_args,
                               launch=launch) as (src, dst):
            return await migrate(src, dst, multifd=p["multifd"], channels=p["channels"],
                                 timeout=_timeout(ram), parameters=p.get("parameters"))

    # our points and QEMU's round-robin in the same repeats, QEMU's right after ours
    # with as many channels (and that one's iperf3 run)
    order = [x for p in points for x in
             (p, *(q for q in qemu_points
                   if (q["multifd"], q["channels"]) == (p["multifd"], p["channels"])),
              *(u for u in unverified if u["channels"] == p["channels"]))]
    order += [q for q in qemu_points if q not in order]
    try:
        await run_points(ctx, "ram-throughput", order, run, _show_ram,
                         baseline=iperf_baseline(ctx, "loopback"))
    finally:
        if image is not None:
            image.remove()
    result: dict[str, Any] = {
        "name": "ram-throughput",
        "title": f"RAM throughput ({human(ram)} of random content, no devices, idle guest)",
        "config": {"src-args": src_args, "dst-args": dst_args, "max-bandwidth": 0,
                   "downtime-limit": 300},
        "points": points, "qemu-points": qemu_points, "variant-points": unverified,
        "measure-notes": _iperf_notes(ctx) + qemu_notes + (
            ["ours/QEMU: the median over the repeats of our sample divided by QEMU's taken "
             "right after it, so it can differ from the quotient of the two median "
             "columns; a QEMU row's ratio: its median over that of the iperf3 runs beside "
             "our samples with as many streams"] if qemu_points else []),
        "qemu-adjacent": True,  # (results.json from before it: ratio of the medians)
        "paired": ctx.iperf}
    if qemu_points:
        first: dict[str, Any] = next(
            (s for q in qemu_points for s in q["samples"] if s.get("argv")), {})
        result["config"]["qemu"] = {
            "version": first.get("qemu-version") or qemu_peer.qemu_version(),
            "argv": first.get("argv"), "capabilities": first.get("capabilities"),
            "parameters": first.get("parameters"),
            "ram-file-dir": str(image.path.parent) if image else None,
            "ram-digest": image.digest if image else None}
    return result


async def _qemu_setup(ctx: Context, ram: int) -> tuple[list[dict[str, Any]],
                                                       qemu_peer.RamImage | None, list[str]]:
    """The QEMU peer's points and source RAM image, or a note why QEMU is left out."""
    counts = ctx.qemu_channels if ctx.qemu_channels is not None else [0, *ctx.channels]
    counts = sorted({n for n in counts if n >= 0})
    if not counts:
        return [], None, ["QEMU peer not measured (--qemu-channels none)"]
    reason = qemu_peer.unavailable_reason(ram)
    need = 3 * ram + 1 * GiB  # its source image stays while our pair holds 2 x RAM
    if reason is None and mem_available() < need:
        reason = (f"needs ~{human(need)} of memory for the RAM image and a daemon pair, "
                  f"{human(mem_available())} available")
    if reason is not None:
        ctx.log(f"  [ram-throughput] QEMU peer skipped: {reason}")
        return [], None, [f"QEMU peer NOT measured, no ours/QEMU targets: {reason}"]
    image = await asyncio.to_thread(qemu_peer.RamImage.create, ram)
    ctx.log(f"  [ram-throughput] QEMU peer: {qemu_peer.qemu_version()}; source RAM image "
            f"{image.path} ({human(ram)} random, {image.seconds:.1f} s)")
    points = [{"key": f"QEMU {n} ch" if n else "QEMU main", "peer": "qemu", "multifd": n > 0,
               "channels": max(n, 1), "streams": max(n, 1)} for n in counts]
    note = ("QEMU peer: two qemu-system-x86_64 paused (-S), guest RAM a memory-backend-file "
            "in a tmpfs (share=on,prealloc=on on both sides), multifd, return-path, "
            "max-bandwidth unlimited, downtime-limit 300 ms; its wire time is total-time - "
            "setup-time (query-migrate has no channels-drained checkpoint: all its downtime "
            "counts); destination RAM file checked against the source's digest")
    return points, image, [note]


def _eval_ram_throughput(result: dict[str, Any]) -> None:
    _eval_ratio(result, RAM_RATIO, "ram-GBps", "RAM throughput")
    qpts = result.get("qemu-points") or []
    for q in qpts:
        for s in q["samples"]:
            if "src" in s:
                s.setdefault("metrics", {}).update(
                    qemu_peer.derive(s["src"], s.get("trace-checkpoints")))
        q["summary"] = summarize(q["samples"])
        # QEMU's own runs have no iperf3 run beside them: the same stream count's
        # iperf3 runs of this scenario stand in
        base = [b for p in result["points"] if p["streams"] == q["streams"]
                for _, b in _pairs(p, "ram-GBps")]
        old = result.get("iperf3", {}).get(str(q["streams"]))
        v = med(q, "ram-GBps")
        if base or old:
            q["iperf3-GBps"] = (statistics.median(base) if base else old["median"]) / 1e9
            q["ratio"] = None if v is None else v / q["iperf3-GBps"]
    drained = [f"{q['key']} {med(q, 'post-drain-ms'):.1f} ms" for q in qpts
               if med(q, "post-drain-ms") is not None]
    if drained:
        result["notes"].append("QEMU's downtime after its channels drained (from its trace; "
                               "in its wire time, unlike ours): " + ", ".join(drained))
    by = {(q["multifd"], q["channels"]): q for q in qpts}
    version = (result.get("config", {}).get("qemu") or {}).get("version") or ""
    version = version.split(" ")[0]
    variants = result.get("variant-points") or []
    for u in variants:  # like a point, without targets
        u["summary"] = summarize(u["samples"])
        _paired_ratio(u, "ram-GBps")
    for p in [*result["points"], *variants]:
        q = by.get((p["multifd"], p["channels"]))
        if q is None:
            continue
        v, qv = med(p, "ram-GBps"), med(q, "ram-GBps")
        p["qemu-GBps"] = qv
        pairs = _rep_pairs(p, q, "ram-GBps") if result.get("qemu-adjacent") else []
        if pairs:  # each of our samples against QEMU's taken right after it
            p["vs-qemu"] = statistics.median(a / b for a, b in pairs)
        else:
            p["vs-qemu"] = None if v is None or not qv else v / qv
        if not p["multifd"] or any(p is u for u in variants):  # shown; no target
            continue
        qbad = fail_reason(q)
        result["targets"].append(target(
            "ram-vs-qemu", f"{p['key']}: RAM throughput / QEMU {version}, {p['key']}",
            p["vs-qemu"], QEMU_RATIO, ">=", "x",
            point=p["key"], reason=fail_reason(p) or (f"QEMU: {qbad}" if qbad else None)))


# -- downtime-devices --------------------------------------------------------------------

async def downtime_devices(ctx: Context) -> dict[str, Any]:
    state = ctx.sizes.downtime_state
    points = []
    for n in ctx.sizes.downtime_devices:
        for multifd in (True, False):
            points.append({"key": f"{n} dev {'multifd' if multifd else 'main'}",
                           "devices": n, "multifd": multifd,
                           "channels": ctx.downtime_channels if multifd else 1})

    async def run(p: dict[str, Any], rep: int) -> dict[str, Any]:
        devices = [f"vfio-sim,id=dev{i},{state}" for i in range(p["devices"])]
        launch = ctx.launch("downtime-devices", p["key"].replace(" ", "-"), rep)
        async with daemon_pair(devices, launch=launch) as (src, dst):
            return await migrate(src, dst, multifd=p["multifd"], channels=p["channels"],
                                 timeout=120)

    await run_points(ctx, "downtime-devices", points, run, _show_downtime)
    return {"name": "downtime-devices",
            "title": f"Downtime against the number of devices ({state} each; multifd "
                     f"with {ctx.downtime_channels} channels vs main channel only)",
            "config": {"device": state, "multifd-channels": ctx.downtime_channels},
            "points": points, "measure-notes": []}


def _eval_downtime_devices(result: dict[str, Any]) -> None:
    by = {(p["devices"], p["multifd"]): p for p in result["points"]}
    for n in sorted({p["devices"] for p in result["points"]}):
        if (n, True) not in by or (n, False) not in by:
            continue
        a, b = med(by[(n, True)], "downtime-ms"), med(by[(n, False)], "downtime-ms")
        ratio = a / b if a is not None and b else None
        by[(n, True)]["ratio"] = ratio
        if n == 4:
            result["targets"].append(target(
                "downtime-ratio", "4 devices: multifd downtime / main-channel downtime",
                ratio, DOWNTIME_RATIO, "<=", "x", point=by[(n, True)]["key"],
                reason=fail_reason(by[(n, True)]) or fail_reason(by[(n, False)])))


# -- scaling -----------------------------------------------------------------------------

#: Samples per point of the scaling sweeps (unless --repeat asks for more, or is 1).
SCALING_REPEAT = 5


async def scaling(ctx: Context) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    notes: list[str] = []
    avail = mem_available()
    for total in ctx.sizes.scaling_sizes:
        need = 2 * total + 2 * GiB  # the state lives in both daemons, plus headroom
        if need > avail:
            notes.append(f"skipped {human(total)}: needs ~{human(need)} of memory, "
                         f"{human(avail)} available")
            continue
        points.append({"key": f"{size_text(total)} in 4 dev", "sweep": "size", "bytes": total,
                       "devices": 4, "multifd": True, "channels": ctx.downtime_channels})
    total = ctx.sizes.scaling_devices_total
    for n in ctx.sizes.scaling_devices:
        points.append({"key": f"{n} dev of {size_text(total // n)}", "sweep": "devices",
                       "bytes": total, "devices": n, "multifd": True,
                       "channels": ctx.downtime_channels})

    async def run(p: dict[str, Any], rep: int) -> dict[str, Any]:
        each = size_text(p["bytes"] // p["devices"])
        devices = [f"vfio-sim,id=dev{i},state-size={each}" for i in range(p["devices"])]
        launch = ctx.launch("scaling", p["key"].replace(" ", "-"), rep)
        async with daemon_pair(devices, launch=launch) as (src, dst):
            return await migrate(src, dst, multifd=True, channels=p["channels"],
                                 timeout=_timeout(p["bytes"]))

    # its target compares points with each other, where one disturbed sample in three
    # moves a median by 20-40 % on this machine: five samples per point at least
    await run_points(ctx, "scaling", points, run, _show_device,
                     repeat=ctx.repeat if ctx.repeat == 1 else max(ctx.repeat, SCALING_REPEAT),
                     shuffle=True)
    return {"name": "scaling",
            "title": f"Scaling: total device state (4 devices) and device count "
                     f"({human(total)} in all); multifd, {ctx.downtime_channels} channels",
            "config": {"multifd-channels": ctx.downtime_channels},
            "points": points, "measure-notes": notes}


def _eval_scaling(result: dict[str, Any]) -> None:
    for p in result["points"]:
        for s in p["samples"]:
            m = s.get("metrics", {})
            if m.get("device-bytes") and "stopcopy-ms" in m:
                m["downtime-ns-per-B"] = m["downtime-ms"] * 1e6 / m["device-bytes"]
                m["stopcopy-ns-per-B"] = m["stopcopy-ms"] * 1e6 / m["device-bytes"]
        p["summary"] = summarize(p["samples"])
    for sweep, what in (("size", "total device state"), ("devices", "device count")):
        pts = [p for p in result["points"] if p["sweep"] == sweep]
        costs = [med(p, "downtime-ns-per-B") for p in pts]
        good = [c for c in costs if c is not None]
        if not good:
            continue
        centre = statistics.median(good)
        for p, c in zip(pts, costs, strict=True):
            p["cost-vs-median"] = None if c is None else c / centre
        dev = max(abs(c / centre - 1) for c in good)
        failed = [p["key"] for p in pts if fail_reason(p)]
        result["targets"].append(target(
            f"flat-cost-{sweep}",
            f"{what}: largest deviation of downtime per byte from the sweep's median "
            f"({centre:.3f} ns/B)", dev, FLAT, "<=", "",
            reason=f"failed samples in: {', '.join(failed)}" if failed else None))


# -- dst-memory --------------------------------------------------------------------------

async def dst_memory(ctx: Context) -> dict[str, Any]:
    total = ctx.sizes.dst_memory_total
    each = total // 4
    points = []
    for cap in (None, ctx.dst_cap):
        for n in ctx.sizes.dst_memory_channels:
            key = f"{n} ch" + (f", cap {size_text(cap)}/dev" if cap else ", no cap")
            points.append({"key": key, "channels": n, "cap": cap, "devices": 4})

    async def run(p: dict[str, Any], rep: int) -> dict[str, Any]:
        extra = f",x-migration-max-queued-buffers-size={p['cap']}" if p["cap"] else ""
        devices = [f"vfio-sim,id=dev{i},state-size={size_text(each)}{extra}"
                   for i in range(4)]
        launch = ctx.launch("dst-memory", p["key"].replace(" ", "").replace(",", "-")
                            .replace("/", ""), rep)
        async with daemon_pair(devices, launch=launch) as (src, dst):
            pid = dst.pid
            before = proc_status(pid)
            sampler = RssSampler(pid)
            s = await migrate(src, dst, multifd=True, channels=p["channels"],
                              timeout=_timeout(total), rss=sampler)
            after = proc_status(pid)
        m = s["metrics"]
        m["dst-rss-before"] = before.get("VmRSS", 0)
        m["dst-hwm"] = after.get("VmHWM", 0)
        m["dst-sampled-peak"] = sampler.peak
        m["dst-overhead"] = m["dst-hwm"] - total
        if rep == 0:  # one timeline per point for the plot, thinned to <= 400 points
            step = max(1, len(sampler.samples) // 400)
            s["rss-timeline"] = sampler.samples[::step]
        return s

    def show(s: dict[str, Any]) -> str:
        m = s.get("metrics", {})
        if "dst-hwm" not in m:
            return "-"
        return (f"dst peak {human(m['dst-hwm'])} = state + {human(m['dst-overhead'])} "
                f"(sampled {human(m['dst-sampled-peak'])})")

    await run_points(ctx, "dst-memory", points, run, show)
    return {"name": "dst-memory",
            "title": f"Destination memory: peak RSS during a {human(total)} device-state "
                     f"migration (4 devices), without and with a byte cap",
            "config": {"bytes": total, "cap-per-device": ctx.dst_cap},
            "points": points, "measure-notes": [
                "peak = VmHWM of the destination process (its whole life, startup "
                "included); overhead = peak - device state (no guest RAM here)"]}


def _eval_dst_memory(result: dict[str, Any]) -> None:
    for p in result["points"]:
        cap_total = (p["cap"] or 0) * p["devices"]
        limit = RSS_FIXED + cap_total + p["channels"] * RSS_PER_CHANNEL
        p["rss-limit-overhead"] = limit
        result["targets"].append(target(
            "dst-rss", f"{p['key']}: destination peak RSS beyond device state",
            med(p, "dst-overhead"), limit, "<=", "B", point=p["key"],
            reason=fail_reason(p)))


# -- shaped-network ----------------------------------------------------------------------

async def shaped_network_scenario(ctx: Context) -> dict[str, Any]:
    total = ctx.sizes.shaped_total
    devices = [f"vfio-sim,id=dev{i},state-size={size_text(total // 4)}" for i in range(4)]
    points = _channel_points(ctx)
    pacing = ctx.stream_bits // 8
    result: dict[str, Any] = {
        "name": "shaped-network",
        "title": f"Shaped network: veth between two namespaces, link {ctx.link_bits / 1e9:g} "
                 f"Gbit/s (tc tbf), each TCP stream paced to {ctx.stream_bits / 1e9:g} Gbit/s "
                 f"(SO_MAX_PACING_RATE); 4 devices, {human(total)}",
        "config": {"devices": devices, "link-bits": ctx.link_bits,
                   "stream-bits": ctx.stream_bits, "bytes": total},
        "points": points, "measure-notes": _iperf_notes(ctx), "paired": ctx.iperf}
    with shaped_network(ctx.link_bits) as net:
        result["config"]["addresses"] = [net.src_ip, net.dst_ip]

        async def run(p: dict[str, Any], rep: int) -> dict[str, Any]:
            launch = ctx.launch("shaped-network", p["key"].replace(" ", ""), rep,
                                src_prefix=net.prefix("src"), dst_prefix=net.prefix("dst"),
                                incoming_host=net.dst_ip, pacing_rate=pacing)
            async with daemon_pair(devices, launch=launch) as (src, dst):
                return await migrate(src, dst, multifd=p["multifd"], channels=p["channels"],
                                     timeout=_timeout(total, floor_bps=pacing / 2))

        baseline = iperf_baseline(ctx, "shaped", host=net.dst_ip,
                                  client_prefix=net.prefix("src"),
                                  server_prefix=net.prefix("dst"), fq_rate_bits=ctx.stream_bits)
        await run_points(ctx, "shaped-network", points, run, _show_device, baseline=baseline)
    return result


def _eval_shaped_network(result: dict[str, Any]) -> None:
    _eval_ratio(result, DEVICE_RATIO, "device-GBps", "device-state throughput")
    pacing = result["config"]["stream-bits"] / 8
    one = next((p for p in result["points"] if p["multifd"] and p["channels"] == 1), None)
    v = med(one, "device-GBps") if one is not None else None
    if v is not None and v > 1.15 * pacing / 1e9:
        result["notes"].append("1 channel ran faster than the per-stream pacing rate: "
                               "pacing was NOT applied to the daemons' sockets")


EVALUATORS: dict[str, Callable[[dict[str, Any]], None]] = {
    "device-throughput": _eval_device_throughput,
    "ram-throughput": _eval_ram_throughput,
    "downtime-devices": _eval_downtime_devices,
    "scaling": _eval_scaling,
    "dst-memory": _eval_dst_memory,
    "shaped-network": _eval_shaped_network,
}


def evaluate(result: dict[str, Any]) -> dict[str, Any]:
    """Summaries, ratios and targets from the raw samples (again, from a results.json)."""
    if result.get("status", "ok") != "ok" or result["name"] not in EVALUATORS:
        return result
    if "measure-notes" not in result:  # a results.json from before the split
        result["measure-notes"] = [n for n in result.get("notes", []) if "NOT" not in n]
    if "iperf3-samples" not in result and result.get("iperf3"):
        result["iperf3-samples"] = {k: v["samples"] for k, v in result["iperf3"].items()
                                    if "samples" in v}
    for p in [*result["points"], *result.get("variant-points", [])]:
        for s in p["samples"]:
            if "src" in s:  # derived metrics again from the raw query-migrate
                s.setdefault("metrics", {}).update(derive(s["src"]))
    result["targets"] = []
    result["notes"] = list(result.get("measure-notes", []))
    for p in result["points"]:
        p["summary"] = summarize(p["samples"])
    EVALUATORS[result["name"]](result)
    return result


SCENARIO_FUNCS: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]] = {
    "device-throughput": device_throughput,
    "ram-throughput": ram_throughput,
    "downtime-devices": downtime_devices,
    "scaling": scaling,
    "dst-memory": dst_memory,
    "shaped-network": shaped_network_scenario,
}


async def run_scenario(ctx: Context, name: str) -> dict[str, Any]:
    t0 = time.monotonic()
    ctx.log(f"== {name}")
    try:
        result = await SCENARIO_FUNCS[name](ctx)
        result["status"] = "ok"
        evaluate(result)
    except SkipScenario as exc:
        ctx.log(f"  [{name}] SKIPPED: {exc}")
        result = {"name": name, "status": "skipped", "reason": str(exc), "points": [],
                  "targets": [], "notes": []}
    except Exception as exc:  # one broken scenario must not lose the others' results
        ctx.log(f"  [{name}] ERROR: {type(exc).__name__}: {exc}")
        result = {"name": name, "status": "error", "reason": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(), "points": [], "targets": [],
                  "notes": []}
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result
