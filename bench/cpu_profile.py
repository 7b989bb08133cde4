"""Where the CPU goes during one migration: kernel, interpreter, hashing — per daemon.

Starts the real daemons (as the harness does), records the whole machine with
``perf record -a`` (Debian's ``linux-perf``; run as root) while one migration runs,
and prints, for the source, the destination and everything else, the CPU seconds
spent in each shared object: ``[kernel.kallsyms]`` is the kernel (socket copies,
TCP, page faults), ``libpython`` the interpreter running our Python code,
``_xxhash`` the digests, ``swapper`` an idle CPU.  With two CPUs, the sum of the
busy rows against ``2 × wall`` says whether the run was CPU-bound.  py-spy cannot
tell this apart (it counts a thread blocked in ``recv_into`` as running).

    python bench/cpu_profile.py ram --channels 4        # 2 GiB of random guest RAM
    python bench/cpu_profile.py devices --channels 4    # 4 devices, 2 GiB of state

The daemons' digests are compared afterwards (``x-query-state-digest``), outside the
recorded window; the digests the migration itself checks are inside it.

It also counts each daemon's context switches during the migration (from
``/proc/PID/task/*/status``, read every 10 ms, since the channel threads end with
it): a voluntary one is a thread that went to sleep — on a socket, the GIL, a
lock or an eventfd — and had to be woken again, which in a VM is often an
interrupt between CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import pagereport  # noqa: E402
from bench.harness import GiB, daemon_pair, digests_match, migrate  # noqa: E402
from migrate_common.settings import PARAMETER_DEFAULTS  # noqa: E402

KINDS = {
    "ram": ([], ["--memory", "2G,fill=random"], ["--memory", "2G"]),
    "ram-mixed": ([], ["--memory", "2G,fill=mixed"], ["--memory", "2G"]),
    "devices": ([f"vfio-sim,id=dev{i},state-size=512M" for i in range(4)], [], []),
}


def perf_samples(data: Path) -> list[tuple[int, int, str, str, str]]:
    """(pid, tid, comm, dso, symbol) of every sample."""
    # (dso is only printed next to an address)
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,pid,tid,ip,sym,dso"],
                         capture_output=True, text=True, check=True).stdout
    samples = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        comm = parts[0]
        try:
            pid_s, tid_s = parts[1].split("/")
            pid, tid = int(pid_s), int(tid_s)
        except ValueError:
            continue
        dso = parts[-1].strip("()") if len(parts) > 3 else "?"
        symbol = " ".join(parts[3:-1]).split("+0x")[0] if len(parts) > 4 else "?"
        samples.append((pid, tid, comm, os.path.basename(dso), symbol))
    return samples


_SHORT_DSO = {"[kernel.kallsyms]": "kernel", "libpython3.11.so.1.0": "python"}


class SwitchCounter:
    """Context switches of every thread of some processes while :meth:`watch` runs."""

    def __init__(self, pids: dict[int, str]) -> None:
        self.pids = pids
        self._first: dict[tuple[int, str], tuple[int, int]] = {}
        self._last: dict[tuple[int, str], tuple[int, int]] = {}

    def _read(self) -> dict[tuple[int, str], tuple[int, int]]:
        now = {}
        for pid in self.pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except FileNotFoundError:
                continue
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/status") as f:
                        fields = dict(line.split(":", 1) for line in f if ":" in line)
                    now[(pid, tid)] = (int(fields["voluntary_ctxt_switches"]),
                                       int(fields["nonvoluntary_ctxt_switches"]))
                except (FileNotFoundError, KeyError, ValueError):
                    continue  # the thread ended meanwhile
        return now

    def start(self) -> None:
        self._first = self._read()

    async def watch(self, interval: float = 0.01) -> None:
        """Until cancelled: keep the latest counts of every thread, including the
        ones that end before the migration does."""
        while True:
            self._last.update(self._read())
            await asyncio.sleep(interval)

    def totals(self) -> dict[str, tuple[int, int, int]]:
        """Per daemon: (voluntary, involuntary, threads that switched)."""
        out: dict[str, list[int]] = {name: [0, 0, 0] for name in self.pids.values()}
        for key, (vol, invol) in self._last.items():
            vol0, invol0 = self._first.get(key, (0, 0))
            row = out[self.pids[key[0]]]
            row[0] += vol - vol0
            row[1] += invol - invol0
            row[2] += (vol - vol0 + invol - invol0) > 0
        return {name: (v, i, t) for name, (v, i, t) in out.items()}


def summarise(samples: list[tuple[int, int, str, str, str]], freq: int,
              names: dict[int, str], *,
              by_symbol: bool = False) -> dict[str, collections.Counter[str]]:
    """CPU seconds per daemon and shared object (or function, with ``by_symbol``)."""
    table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for pid, _tid, comm, dso, symbol in samples:
        who = names.get(pid, "idle" if comm == "swapper" else "other")
        if by_symbol:
            table[who][f"{symbol}  ({_SHORT_DSO.get(dso, dso)})"] += 1
        else:
            table[who][dso] += 1
    return {who: collections.Counter({d: n / freq for d, n in c.items()})
            for who, c in table.items()}


async def run(kind: str, channels: int, freq: int, symbols: int = 0,
              device_count: int = 4, parameters: dict[str, Any] | None = None) -> None:
    devices, src_args, dst_args = KINDS[kind]
    if kind == "devices" and device_count != len(devices):  # the same 2 GiB, split
        devices = [f"vfio-sim,id=dev{i},state-size={2048 // device_count}M"
                   for i in range(device_count)]
    workdir = Path(tempfile.mkdtemp(prefix="mfm-cpu-"))
    data = workdir / "perf.data"
    try:
        async with daemon_pair(devices, src_args=src_args, dst_args=dst_args) as (src, dst):
            await asyncio.sleep(1)  # let start-up work (filling, pre-faulting) settle
            # and the hypervisor's reclaiming (migrate() waits for it too, but then
            # inside the recording)
            await pagereport.settle()
            perf = subprocess.Popen(["perf", "record", "-a", "-F", str(freq), "-o", str(data),
                                     "--", "sleep", "600"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(0.5)
            switches = SwitchCounter({src.pid: "source", dst.pid: "destination"})
            switches.start()
            watcher = asyncio.create_task(switches.watch())
            t0 = time.monotonic()
            try:
                sample = await migrate(src, dst, multifd=channels > 0,
                                       channels=max(channels, 1), timeout=120, verify=False,
                                       parameters=parameters)
            finally:
                watcher.cancel()
            wall = time.monotonic() - t0
            perf.send_signal(signal.SIGINT)
            perf.wait()
            names = {src.pid: "source", dst.pid: "destination"}
            verified = (sample["src"].get("status") == "completed"
                        and await digests_match(src, dst))
        m = sample["metrics"]
        rate = m.get("ram-GBps") if kind == "ram" else m.get("device-GBps")
        what = f"{kind} ({len(devices)})" if devices else kind
        print(f"{what}, {channels or 'main'} channel(s): {rate:.2f} GB/s, downtime "
              f"{m.get('downtime-ms')} ms, migrate() took {wall:.2f} s "
              f"(recording {wall + 0.5:.2f} s on {os.cpu_count()} CPUs), digests "
              f"{'match' if verified else 'DO NOT MATCH'}")
        samples = perf_samples(data)
        table = summarise(samples, freq, names)
        for who in ("source", "destination", "other", "idle"):
            row = table.get(who)
            if not row:
                continue
            total = sum(row.values())
            top = ", ".join(f"{dso} {sec:.2f}" for dso, sec in row.most_common(5))
            print(f"  {who:<12} {total:5.2f} CPU s: {top}")
        # device-state or RAM packets: their size parameter, as set or by default
        size_parameter = ("x-device-state-packet-size" if kind == "devices"
                          else "x-multifd-packet-size")
        packet = int((parameters or {}).get(size_parameter, PARAMETER_DEFAULTS[size_parameter]))
        packets = 2 * GiB // packet
        for who, (vol, invol, threads) in switches.totals().items():
            print(f"  {who:<12} {vol} voluntary + {invol} involuntary context switches in "
                  f"{threads} threads, {vol / packets:.1f} voluntary per packet")
        if symbols:
            by_symbol = summarise(samples, freq, names, by_symbol=True)
            for who in ("source", "destination"):
                row = by_symbol.get(who, collections.Counter())
                print(f"  {who}: the {symbols} functions with most CPU s")
                for symbol, sec in row.most_common(symbols):
                    print(f"    {sec:5.3f}  {symbol}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("--channels", type=int, default=4, help="multifd channels (0: main only)")
    ap.add_argument("--freq", type=int, default=1999, help="samples per second per CPU")
    ap.add_argument("--devices", type=int, default=4, metavar="N",
                    help="devices: how many devices share the 2 GiB (a power of two)")
    ap.add_argument("--symbols", type=int, default=0, metavar="N",
                    help="also list the N functions (kernel, interpreter, libraries) each "
                         "daemon spent most CPU time in")
    ap.add_argument("--parameter", action="append", default=[], metavar="NAME=JSON",
                    help="a migration parameter, set on both daemons as ab.py does, e.g. "
                         "'x-verify-ram=false' or 'x-multifd-packet-size=524288'; repeatable")
    args = ap.parse_args()
    parameters: dict[str, Any] = {}
    for item in args.parameter:
        name, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--parameter {item!r}: expected NAME=JSON")
        try:
            parameters[name] = json.loads(value)
        except json.JSONDecodeError:
            sys.exit(f"--parameter {name}: {value!r} is not JSON (a string needs quotes)")
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (Debian: apt-get install linux-perf)")
    if args.kind != "devices" and args.devices != 4:
        sys.exit("--devices is for the 'devices' kind")
    if args.devices < 1 or 2048 % args.devices:
        sys.exit("--devices must divide 2048 (MiB): 1, 2, 4, ... 2048")
    asyncio.run(run(args.kind, args.channels, args.freq, args.symbols, args.devices,
                    parameters))


if __name__ == "__main__":
    main()
