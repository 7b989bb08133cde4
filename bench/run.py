#!/usr/bin/env python3
"""Benchmark harness for multifd-migrate (issue #4).

Starts the real ``migrate-src`` / ``migrate-dst`` daemons as processes, runs the
scenarios, and writes ``results.json`` (the machine, the exact command, every raw
sample), one PNG plot per scenario and a table with the targets marked PASS/FAIL.

    .venv/bin/pip install -r bench/requirements.txt      # matplotlib (and py-spy)
    apt-get install -y iperf3                            # the loopback baselines
    .venv/bin/python bench/run.py                        # everything, ~15 minutes
    .venv/bin/python bench/run.py --quick                # a smoke run, < 1 minute

Scenarios: device-throughput, ram-throughput, downtime-devices, scaling, dst-memory,
shaped-network (root only: two network namespaces and a veth pair).
See docs/performance.md for what each measures and the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness, pagereport, scenarios  # noqa: E402
from bench.report import render_all  # noqa: E402

REQS = "pip install -r bench/requirements.txt"


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", action="append", choices=scenarios.SCENARIOS, metavar="NAME",
                   help="run only this scenario (repeatable): " + ", ".join(scenarios.SCENARIOS))
    p.add_argument("--quick", action="store_true",
                   help="small sizes and 1 repeat: a smoke run of the harness (< 1 minute)")
    p.add_argument("--repeat", type=int, default=None,
                   help="samples per measurement (default 3; 1 with --quick); the tables "
                        "show the median and the min-max spread")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default bench/results/YYYY-MM-DDTHH-MM-SS)")
    p.add_argument("--channels", default="1,2,4,8,16",
                   help="multifd channel counts for the throughput scenarios (default "
                        "1,2,4,8,16)")
    p.add_argument("--qemu-channels", default=None, metavar="LIST",
                   help="ram-throughput: where real QEMU (qemu-system-x86_64 migrating to "
                        "itself) is measured as the peer, in the same run: multifd channel "
                        "counts and/or 'main' (default: main and the --channels counts; "
                        "'none' to skip QEMU); left out with a note when QEMU is not "
                        "installed")
    p.add_argument("--reevaluate", type=Path, metavar="DIR",
                   help="measure nothing: recompute the summaries, targets, tables and plots "
                        "of DIR/results.json from its raw samples")
    p.add_argument("--no-iperf", action="store_true",
                   help="skip the iperf3 baselines (no ratios, no ratio targets)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--profile", action="store_true",
                   help="record py-spy raw profiles of both daemons (first repeat of every "
                        "point) into OUT/profiles/, with a summary; the numbers of a "
                        "profiled run are perturbed")
    p.add_argument("--profile-gil", action="store_true",
                   help="with --profile (implied): sample only the thread holding the GIL "
                        "(py-spy --gil), which shows where Python threads wait on each "
                        "other rather than where they run")
    p.add_argument("--idle-wait", type=float, default=None,
                   help="before each sample, wait up to this many seconds while other "
                        "migrate daemons, pytest or iperf3 run on the machine (default 120; "
                        "0 with --quick); samples taken while they run are flagged")
    p.add_argument("--retries", type=int, default=None,
                   help="take a sample again (up to this many times) when other migrate "
                        "daemons, pytest or iperf3 ran during it (default 2; 0 with --quick)")
    p.add_argument("--max-foreign-cpu", type=float, default=0.25,
                   help="a sample during which the rest of the machine used more than this "
                        "many CPUs on average counts as disturbed (default 0.25)")
    p.add_argument("--downtime-channels", type=int, default=4,
                   help="multifd channels for downtime-devices, scaling (default 4)")
    p.add_argument("--dst-cap", default="32M",
                   help="per-device x-migration-max-queued-buffers-size for dst-memory "
                        "(default 32M)")
    p.add_argument("--link-rate", default="10gbit",
                   help="shaped-network: the veth link rate, tc tbf (default 10gbit)")
    p.add_argument("--stream-rate", default="2.5gbit",
                   help="shaped-network: SO_MAX_PACING_RATE of every TCP stream (default "
                        "2.5gbit)")
    return p.parse_args(argv)


async def _run(args: argparse.Namespace, ctx: scenarios.Context,
               results: dict[str, Any], out: Path) -> None:
    for name in args.scenario or scenarios.SCENARIOS:
        results["scenarios"][name] = await scenarios.run_scenario(ctx, name)
        _write(results, out)  # after every scenario: a crash later keeps what ran


def _write(results: dict[str, Any], out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out / "results.json")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.no_plots and not _have_matplotlib():
        print(f"error: the plots need matplotlib: {sys.executable} -m {REQS}\n"
              "       (or run with --no-plots)", file=sys.stderr)
        return 2
    if not args.no_iperf and not harness.iperf_available():
        print(f"error: the baselines need iperf3: {harness.APT_IPERF}\n"
              "       (or run with --no-iperf)", file=sys.stderr)
        return 2
    args.profile = args.profile or args.profile_gil
    if args.profile and harness._py_spy() is None:
        print(f"error: --profile needs py-spy: {sys.executable} -m {REQS}", file=sys.stderr)
        return 2
    if args.reevaluate:
        return reevaluate(args.reevaluate, plots=not args.no_plots)
    sizes = scenarios.QUICK if args.quick else scenarios.FULL
    repeat = args.repeat or (1 if args.quick else 3)
    if args.quick:
        pagereport.QUIET = 0.0
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    out = args.out or (harness.ROOT / "bench" / "results" / stamp)
    out.mkdir(parents=True, exist_ok=True)
    try:
        channels = [int(x) for x in args.channels.split(",") if x.strip()]
        qemu_channels = None if args.qemu_channels is None else (
            [] if args.qemu_channels.strip().lower() in ("none", "no", "")
            else [0 if x.strip().lower() == "main" else int(x)
                  for x in args.qemu_channels.split(",") if x.strip()])
        ctx = scenarios.Context(
            sizes=sizes, repeat=repeat, channels=channels, iperf=not args.no_iperf, out=out,
            profile=args.profile, profile_gil=args.profile_gil,
            idle_wait=args.idle_wait if args.idle_wait is not None else (0 if args.quick else 120),
            retries=args.retries if args.retries is not None else (0 if args.quick else 2),
            max_foreign_cpu=args.max_foreign_cpu,
            downtime_channels=args.downtime_channels,
            dst_cap=_size(args.dst_cap), link_bits=harness.parse_bits(args.link_rate),
            stream_bits=harness.parse_bits(args.stream_rate),
            qemu_channels=qemu_channels,
            log=lambda s: print(s, flush=True))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "bench/run.py", *argv])
    results: dict[str, Any] = {
        "schema": 1,
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "argv": [sys.executable, sys.argv[0], *argv],
        "options": {"quick": args.quick, "repeat": repeat, "channels": channels,
                    "iperf": not args.no_iperf, "profile": args.profile,
                    "profile-gil": args.profile_gil,
                    "downtime-channels": args.downtime_channels, "dst-cap": ctx.dst_cap,
                    "link-bits": ctx.link_bits, "stream-bits": ctx.stream_bits,
                    "qemu-channels": [0, *channels] if qemu_channels is None
                    else qemu_channels},
        "machine": harness.machine_info(),
        "units": {"GBps": "1e9 bytes/s", "ms": "milliseconds", "B": "bytes"},
        "scenarios": {},
    }
    print(f"multifd-migrate benchmark -> {out}")
    m = results["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu-model']}), kernel {m['kernel']}, "
          f"Python {m['python']}, uvloop {m['uvloop']}; {repeat} sample(s) per point")
    t0 = time.monotonic()

    def _terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # stop the daemons and namespaces on the way out

    signal.signal(signal.SIGTERM, _terminated)
    try:
        asyncio.run(_run(args, ctx, results, out))
    except KeyboardInterrupt:
        print("interrupted: writing what ran so far", file=sys.stderr)
        results["interrupted"] = True
    results["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    results["seconds"] = round(time.monotonic() - t0, 1)
    results["machine"]["loadavg-at-end"] = harness._loadavg()
    if args.profile:
        from bench import profiles

        summaries = profiles.summarize_dir(out / "profiles")
        results["profiles"] = summaries
        if summaries:
            (out / "profiles" / "summary.txt").write_text(profiles.render(summaries))
    _finish(results, out, plots=not args.no_plots)
    print(f"results: {out / 'results.json'}  (table.md, {len(results.get('plots', []))} "
          f"plot(s){', profiles/summary.txt' if args.profile else ''}); "
          f"{results['seconds']:.0f} s")
    bad = [n for n, r in results["scenarios"].items() if r["status"] == "error"]
    return 1 if bad or results.get("interrupted") else 0


def _finish(results: dict[str, Any], out: Path, plots: bool) -> None:
    """Plots, results.json, table.txt / table.md, and the table on stdout."""
    if plots:
        from bench.plots import plot_all

        results["plots"] = plot_all(results, out)
    _write(results, out)
    text = render_all(results)
    (out / "table.txt").write_text(text)
    (out / "table.md").write_text(render_all(results, md=True))
    print()
    print(text)


def reevaluate(out: Path, plots: bool) -> int:
    path = out / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    for r in results["scenarios"].values():
        scenarios.evaluate(r)
    results["reevaluated"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    _finish(results, out, plots)
    print(f"results: {path} (re-evaluated)")
    return 0


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B")
    unit = t[-1:] if t[-1:] in units and t[-1:] != "" else ""
    return int(float(t[: len(t) - len(unit)]) * units[unit])


if __name__ == "__main__":
    sys.exit(main())
