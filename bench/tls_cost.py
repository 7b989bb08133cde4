"""What TLS costs: the same migration with and without TLS on every channel.

Starts the real daemons (as ``migrate-demo`` does), migrates a devices-only VM and a
RAM-only VM with ``multifd`` over N channels, plaintext and then TLS (a test PKI
made with ``scripts/make-test-certs.py``), and prints the medians and the ratio.

    python bench/tls_cost.py [--channels 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from migrate_ctl.demo import migrate_once
from migrate_ctl.pair import DaemonPair

ROOT = Path(__file__).resolve().parents[1]

VMS = {
    "devices 4x256M": (["vfio-sim,id=d0,state-size=256M", "vfio-sim,id=d1,state-size=256M",
                        "vfio-sim,id=d2,state-size=256M", "vfio-sim,id=d3,state-size=256M"],
                       []),
    "RAM 1G random": ([], ["--memory", "1G,fill=random"]),
}


async def one(devices: list[str], extra: list[str], channels: int, pki: Path | None) -> float:
    tls_args = ["--object", f"tls-creds-x509,id=tls0,dir={pki}"] if pki else []
    params = {"max-bandwidth": 0, "downtime-limit": 300, "x-switchover-timeout": 600_000}
    if pki:
        params["tls-creds"] = "tls0"
    async with DaemonPair(devices, src_args=[*extra, *tls_args],
                          dst_args=[*extra, *tls_args]) as pair:
        info, verified = await migrate_once(pair, multifd=True, channels=channels,
                                            timeout=600, parameters=params, out=io.StringIO())
    if info.get("status") != "completed" or not verified:
        raise RuntimeError(f"migration failed: {info.get('error-desc')}")
    return info["ram"]["transferred"] / (info["total-time"] / 1000) / 1e9


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp) / "pki"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make-test-certs.py"),
                        str(pki)], check=True, capture_output=True)
        print(f"{'VM':<16} {'plaintext GB/s':>15} {'TLS GB/s':>10} {'TLS/plain':>10}"
              f"   ({args.channels} channels, median of {args.repeat})")
        for name, (devices, extra) in VMS.items():
            plain = [await one(devices, extra, args.channels, None) for _ in range(args.repeat)]
            tls = [await one(devices, extra, args.channels, pki) for _ in range(args.repeat)]
            p, t = statistics.median(plain), statistics.median(tls)
            print(f"{name:<16} {p:>15.2f} {t:>10.2f} {t / p:>10.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
