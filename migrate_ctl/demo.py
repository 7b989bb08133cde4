"""``migrate-demo``: a real migration of the embedded default VM between two daemons.

Starts ``migrate-dst`` and ``migrate-src`` as separate processes on this machine
(QMP on unix sockets in a temporary directory, migration over TCP loopback), sets
the same capabilities and parameters on both, migrates, shows live progress, and
prints a summary whose digests were read back from both daemons.  By default it then
repeats the migration with device state on the main channel only (QEMU 9.x style)
and compares the downtimes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, TextIO

from migrate_ctl.pair import DaemonPair
from migrate_ctl.progress import summary_lines, watch
from vm.machine import DEFAULT_DEVICE_OPTIONS, DEFAULT_MEMORY_OPTION, DEFAULT_WORKLOAD_OPTION


async def migrate_once(pair: DaemonPair, *, multifd: bool, channels: int,
                       timeout: float, parameters: dict[str, Any] | None = None,
                       out: TextIO | None = None) -> tuple[dict[str, Any], bool]:
    """Configure both sides, migrate, wait; returns (source info, digests match)."""
    assert pair.src is not None and pair.dst is not None
    caps = [{"capability": "multifd", "state": multifd},
            {"capability": "return-path", "state": True},
            {"capability": "events", "state": True}]
    for daemon in (pair.src, pair.dst):
        await daemon.execute("migrate-set-capabilities", {"capabilities": caps})
        await daemon.execute("migrate-set-parameters",
                             {"multifd-channels": channels, **(parameters or {})})
    uri = await pair.destination_uri()
    await pair.src.execute("migrate", {"uri": uri})
    info = await watch(pair.src.client, out=out or sys.stdout, timeout=timeout)
    src_digest = await pair.src.execute("x-query-state-digest")
    dst_digest = await pair.dst.execute("x-query-state-digest")
    src_map = {d["id"]: d["digest"] for d in src_digest["devices"]}
    dst_map = {d["id"]: d["digest"] for d in dst_digest["devices"]}
    if "ram" in src_digest or "ram" in dst_digest:
        # read back from both daemons: the source's frozen RAM and the destination's
        # (the demo runs no workload on the destination, so its RAM is still as loaded)
        src_map["ram"] = src_digest.get("ram", {}).get("digest")
        dst_map["ram"] = dst_digest.get("ram", {}).get("digest")
    verified = (info.get("status") == "completed" and src_map == dst_map
                and None not in dst_map.values()
                and dst_digest["vm-status"] == "running")
    return info, verified


async def _demo(args: argparse.Namespace) -> int:
    devices = [] if args.no_devices else (args.device or list(DEFAULT_DEVICE_OPTIONS))
    modes = {"multifd": [True], "main": [False], "both": [True, False]}[args.mode]
    ram_args = [] if args.memory == "none" else ["--memory", args.memory]
    src_extra = list(ram_args)
    if ram_args and args.workload != "none":
        src_extra += ["--workload", args.workload]
    print(f"VM: {len(devices)} device(s): " + "; ".join(devices))
    if ram_args:
        print(f"guest RAM: {args.memory}; guest workload on the source: {args.workload}")
    print("starting migrate-src and migrate-dst ...", flush=True)
    results: list[tuple[str, dict[str, Any], bool]] = []
    pair = DaemonPair(devices, keep_workdir=args.keep, src_args=src_extra, dst_args=ram_args)
    parameters = {"max-bandwidth": args.max_bandwidth, "downtime-limit": args.downtime_limit}
    await pair.start()
    try:
        for i, multifd in enumerate(modes):
            label = (f"multifd, {args.channels} channels" if multifd
                     else "main channel only (non-multifd, QEMU 9.x style)")
            if i > 0:  # a fresh destination, and the source VM running again
                await pair.restart_destination()
                await pair.src.execute("cont")  # type: ignore[union-attr]
            print(f"\n== migration {i + 1}: {label}")
            info, verified = await migrate_once(pair, multifd=multifd, channels=args.channels,
                                                timeout=args.timeout, parameters=parameters)
            print("\n".join(summary_lines(info, verified)))
            results.append((label, info, verified))
            if info.get("status") != "completed" or not verified:
                print("\nmigration did not complete correctly; daemon logs:")
                for daemon in (pair.src, pair.dst):
                    if daemon is not None:
                        print(f"--- migrate-{daemon.side} ---\n{daemon.log_tail()}")
                return 1
    finally:
        await pair.stop()
        if args.keep:
            print(f"\nlogs kept in {pair.workdir}")
    if len(results) == 2:
        a, b = results[0][1].get("downtime", 0), results[1][1].get("downtime", 0)
        print("\n== comparison")
        print(f"downtime with multifd:     {a} ms")
        print(f"downtime main channel:     {b} ms")
        if b:
            print(f"ratio multifd / main:      {a / b:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="migrate-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("multifd", "main", "both"), default="both",
                        help="multifd, non-multifd, or both for a comparison (default)")
    parser.add_argument("--channels", type=int, default=4, help="multifd channels (default 4)")
    parser.add_argument("--device", action="append", default=[],
                        help="a device instead of the default VM (repeatable), e.g. "
                             "vfio-sim,id=gpu0,state-size=512M")
    parser.add_argument("--no-devices", action="store_true",
                        help="a VM with guest RAM only (no VFIO devices)")
    parser.add_argument("--memory", default=DEFAULT_MEMORY_OPTION,
                        help=f"guest RAM (default {DEFAULT_MEMORY_OPTION}; 'none' for a VM "
                             "with devices only)")
    parser.add_argument("--workload", default=DEFAULT_WORKLOAD_OPTION,
                        help=f"the guest's writes while it runs (default "
                             f"{DEFAULT_WORKLOAD_OPTION}; 'none' for an idle guest)")
    parser.add_argument("--max-bandwidth", type=int, default=0,
                        help="live-phase cap in bytes/s (default 0 = unlimited)")
    parser.add_argument("--downtime-limit", type=int, default=300,
                        help="ms of downtime the switchover may aim for (default 300)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="give up after this many seconds per migration")
    parser.add_argument("--keep", action="store_true", help="keep the daemons' logs")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_demo(args))
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
