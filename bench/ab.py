"""Alternating A/B runs: the same migration with different parameters, interleaved.

On a shared machine whose speed drifts by a third over tens of seconds, two settings
compared in two separate runs compare two moments as much as two settings.  This
runs variant A, then B (then C ...), then A again, and so on, each on a fresh daemon
pair, and prints every sample and the medians::

    python bench/ab.py --ram 2G --channels 4 --repeat 6 \\
        'on={}' 'off={"x-verify-ram": false}'
    python bench/ab.py --ram 2G --workload dirty-rate=100M 'a={}' 'b={...}'
    python bench/ab.py --devices 4 --state 512M --channels 8 \\
        'auto={}' '1M={"x-socket-buffer-size": 1048576}'

Each variant is ``NAME=JSON``: the ``migrate-set-parameters`` arguments set on both
daemons (on top of the harness's ``multifd-channels`` and ``max-bandwidth=0``); a
``"channels"`` key instead overrides ``--channels`` for that variant (0 = main channel
only), e.g. ``'main={"channels": 0}' 'one={"channels": 1}'``.
Samples whose digests do not match count as failures and are left out of the median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import daemon_pair, migrate, vm_args  # noqa: E402
from migrate_common.qmp_client import QmpCommandError  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=JSON`` -> (name, parameters)."""
    name, sep, params = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME=JSON")
    try:
        value = json.loads(params)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"variant {name!r}: bad JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"variant {name!r}: JSON must be an object")
    return name, value


async def run(args: argparse.Namespace) -> int:
    variants: list[tuple[str, dict[str, Any]]] = args.variants
    devices, src_args, dst_args = vm_args(args.ram, args.devices, args.state, args.workload)
    metric = "ram-GBps" if args.ram else "device-GBps"
    samples: dict[str, list[float]] = {name: [] for name, _ in variants}
    failed = 0
    for rep in range(args.repeat):
        for name, params in variants:
            params = dict(params)
            channels = int(params.pop("channels", args.channels))
            try:
                async with daemon_pair(devices, src_args=src_args,
                                       dst_args=dst_args) as (src, dst):
                    sample = await migrate(src, dst, multifd=channels > 0,
                                           channels=max(channels, 1), timeout=600,
                                           parameters=params)
            except (RuntimeError, TimeoutError, OSError, QmpCommandError) as exc:
                sample = {"verified": False, "error": f"{type(exc).__name__}: {exc}"}
            value = sample.get("metrics", {}).get(metric)
            ok = sample.get("verified") and value is not None
            if ok:
                samples[name].append(value)
            else:
                failed += 1
            shown = f"{value:.2f} GB/s" if value is not None else "-"
            print(f"#{rep + 1} {name:<20} {shown}  downtime "
                  f"{sample.get('metrics', {}).get('downtime-ms', '-')} ms"
                  f"{'' if ok else '  FAILED: ' + str(sample.get('error') or 'not verified')}",
                  flush=True)
            if args.breakdown and ok:
                print("    " + ", ".join(f"{phase} {ms:g}" for phase, ms in
                                         sample["metrics"].get("breakdown-ms", [])), flush=True)
    print(f"{metric}, median (min-max) of the good samples, {args.repeat} alternating runs "
          "each:")
    for name, values in samples.items():
        if values:
            print(f"  {name:<20} {statistics.median(values):.2f} "
                  f"({min(values):.2f}-{max(values):.2f}), {len(values)} good")
        else:
            print(f"  {name:<20} no good sample")
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", type=parse_variant, metavar="NAME=JSON")
    ap.add_argument("--ram", metavar="SIZE",
                    help="guest RAM of random content (SIZE,fill=mixed: half the pages "
                         "zero); no devices unless --devices")
    ap.add_argument("--devices", type=int,
                    help="vfio-sim devices (default 4, or none with --ram)")
    ap.add_argument("--workload", metavar="SPEC",
                    help="with --ram: a guest dirtying its RAM, e.g. dirty-rate=200M")
    ap.add_argument("--state", default="512M", help="state size of each device (default 512M)")
    ap.add_argument("--channels", type=int, default=4, help="multifd channels; 0 = main only")
    ap.add_argument("--breakdown", action="store_true",
                    help="also print each sample's downtime by checkpoint (ms)")
    ap.add_argument("--repeat", type=int, default=5, help="samples per variant (default 5)")
    args = ap.parse_args()
    names = [name for name, _ in args.variants]
    if len(set(names)) != len(names):
        ap.error(f"variant names must differ: {', '.join(names)}")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
