"""How fast one TCP stream starts on this machine: its first milliseconds against later.

A bare sender process and receiver process (no daemons, one 1 MiB buffer on each
side, as iperf3 uses) move ``--size`` bytes over loopback after both have slept, and
the receiver timestamps every MiB.  Printed per variant: the rate over the first
``--first-ms`` milliseconds, the rate from 100 ms to the end, and the median of their
ratio over ``--repeat`` alternating runs:

* ``cold``   — as a migration starts after an idle spell (the harness's case);
* ``pinned`` — sender on CPU 0, receiver on CPU 1 (``sched_setaffinity``);
* ``warmed`` — each process first spins for ``--warm-ms`` on its own;
* ``spun``   — two other processes spin on CPU 0 and 1 for ``--warm-ms`` instead.

If ``cold`` starts slower and ``pinned`` or ``warmed`` does not while ``spun`` does,
the slow start is where the scheduler puts two tasks that have been asleep (most
likely the receiver woken on the sender's CPU until the load balancer moves it), not
the CPUs' clock or the TCP window.  Short migrations pay that start in full::

    python bench/ramp.py --repeat 6
    python bench/ramp.py --variants cold pinned --repeat 10 --json /tmp/ramp.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Any

CHUNK = 1 << 20
LATER = 0.1  # s: "later" is from here to the end of the transfer
VARIANTS = ("cold", "pinned", "warmed", "spun")


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _sender(port: int, size: int, go: Any, cpu: int | None, warm: float) -> None:
    _pin(cpu)
    buf = bytearray(os.urandom(CHUNK))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        go.wait()
        _spin(warm)
        for _ in range(size // CHUNK):
            sock.sendall(buf)


def _receiver(listener: socket.socket, size: int, ready: Any, go: Any, marks: Any,
              cpu: int | None, warm: float) -> None:
    _pin(cpu)
    conn, _ = listener.accept()
    view = memoryview(bytearray(CHUNK))
    ready.put(None)
    go.wait()
    _spin(warm)
    start = time.perf_counter()
    got, times = 0, []
    while got < size:
        n = conn.recv_into(view, CHUNK, socket.MSG_WAITALL)
        if n == 0:
            break
        got += n
        times.append(time.perf_counter() - start)
    conn.close()
    marks.put(times)


def run_once(variant: str, size: int, warm: float, idle: float) -> list[float]:
    """One transfer; the receiver's time (s) at each MiB received."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    ready, marks, go = mp.Queue(), mp.Queue(), mp.Event()
    pinned = variant == "pinned"
    own_warm = warm if variant == "warmed" else 0.0
    receiver = mp.Process(target=_receiver, args=(listener, size, ready, go, marks,
                                                  1 if pinned else None, own_warm))
    sender = mp.Process(target=_sender, args=(listener.getsockname()[1], size, go,
                                              0 if pinned else None, own_warm))
    receiver.start()
    sender.start()
    try:
        ready.get(timeout=30)
        time.sleep(idle)  # both asleep, as daemons waiting for a migration are
        if variant == "spun":
            spinners = [mp.Process(target=lambda c=cpu: (_pin(c), _spin(warm)))
                        for cpu in (0, 1)]
            for proc in spinners:
                proc.start()
            for proc in spinners:
                proc.join()
        go.set()
        times: list[float] = marks.get(timeout=120)
    finally:
        sender.join(30)
        receiver.join(30)
        listener.close()
    return times


def rates(times: list[float], first: float) -> tuple[float, float]:
    """GB/s in the first ``first`` seconds, and from 100 ms to the end (0 when the
    transfer was over by then)."""
    early = sum(1 for t in times if t < first) * CHUNK / first / 1e9
    rest = sum(1 for t in times if t >= LATER)
    later = rest * CHUNK / (times[-1] - LATER) / 1e9 if rest > 1 else 0.0
    return early, later


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--repeat", type=int, default=6, help="runs per variant (default 6)")
    ap.add_argument("--size", type=int, default=2048, help="MiB per run (default 2048)")
    ap.add_argument("--first-ms", type=float, default=30.0,
                    help="the early window in ms (default 30)")
    ap.add_argument("--warm-ms", type=float, default=100.0,
                    help="spin before the transfer in 'warmed' and 'spun' (default 100)")
    ap.add_argument("--idle", type=float, default=1.0,
                    help="seconds both sides sleep before each run (default 1)")
    ap.add_argument("--json", metavar="FILE", help="also write every run's rates here")
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2 and "pinned" in args.variants:
        ap.error("'pinned' needs CPUs 0 and 1")
    first = args.first_ms / 1000
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in args.variants}
    for rep in range(args.repeat):
        for variant in args.variants:
            time.sleep(args.idle)
            early, later = rates(run_once(variant, args.size << 20, args.warm_ms / 1000,
                                          args.idle), first)
            results[variant].append((early, later))
            print(f"#{rep + 1} {variant:<7} first {args.first_ms:g} ms {early:5.2f} GB/s, "
                  f"from 100 ms on {later:5.2f} GB/s", flush=True)
    print(f"median over {args.repeat} alternating runs (GB/s; ratio = first / later, "
          "per run):")
    for variant, pairs in results.items():
        ratios = [e / l for e, l in pairs if l > 0]
        shown = f"{statistics.median(ratios):.2f}" if ratios else "- (over within 100 ms)"
        print(f"  {variant:<7} first {statistics.median(e for e, _ in pairs):5.2f}  "
              f"later {statistics.median(l for _, l in pairs):5.2f}  ratio {shown}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "runs": results}, fh, indent=1)


if __name__ == "__main__":
    main()
