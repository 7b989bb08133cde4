"""Progress and summary rendering for ``migrate-ctl`` and ``migrate-demo``.

The live view shows only numbers that never run backwards (bytes sent, elapsed time,
iterations) next to estimates that may move either way (remaining bytes, rate,
expected downtime); it never shows a percentage computed from a total that can grow.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO

from migrate_common.qmp_client import QmpClient

__all__ = ["Bar", "human_bytes", "progress_line", "watch", "summary_lines", "FINAL_STATES"]

FINAL_STATES = ("completed", "failed", "cancelled")


def human_bytes(n: float, fmt: str = ".1f") -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:{fmt}} {unit}"
        n /= 1024
    return f"{n:{fmt}} TiB"


def _rate(n_bytes: float, seconds: float) -> str:
    if seconds <= 0:
        return "-"
    return f"{n_bytes / seconds / 1e9:.2f} GB/s"


class Bar:
    """A bar of sent / (sent + remaining) that never moves backwards.

    ``remaining`` is an estimate that can grow (re-dirtied data), so the bar keeps
    the largest fraction seen: it may pause, but never runs backwards.
    """

    def __init__(self, width: int = 24) -> None:
        self.width = width
        self.best = 0.0

    def render(self, sent: int, remaining: int | None, done: bool) -> str:
        if done:
            self.best = 1.0
        elif remaining is not None and sent + remaining > 0:
            self.best = max(self.best, sent / (sent + remaining))
        filled = int(self.best * self.width)
        return "[" + "#" * filled + "." * (self.width - filled) + "]"


def progress_line(info: dict[str, Any], rate_bps: float | None = None,
                  bar: Bar | None = None) -> str:
    status = info.get("status", "none")
    sent = info.get("ram", {}).get("transferred", 0)
    elapsed = info.get("total-time", 0) / 1000
    parts = [f"{status:<10}", f"{elapsed:6.1f}s"]
    if bar is not None:
        parts.append(bar.render(sent, info.get("x-remaining"), status == "completed"))
    parts.append(f"sent {human_bytes(sent):>10}")
    if rate_bps is not None:
        parts.append(f"{rate_bps / 1e9:5.2f} GB/s")
    if "x-remaining" in info and status in ("setup", "active", "device"):
        parts.append(f"remaining ~{human_bytes(info['x-remaining'])}")
    if info.get("x-iterations"):
        parts.append(f"iter {info['x-iterations']}")
    if "expected-downtime" in info:
        parts.append(f"expected downtime {info['expected-downtime']} ms")
    return "  ".join(parts)


async def watch(client: QmpClient, out: TextIO = sys.stdout, interval: float = 0.1,
                timeout: float | None = None) -> dict[str, Any]:
    """Poll ``query-migrate`` and draw a progress line until the migration ends."""
    tty = out.isatty()
    start = time.monotonic()
    last_sent, last_t = 0, start
    rate: float | None = None
    last_printed = 0.0
    bar = Bar()
    first = True  # a watch started mid-migration has no rate until its second sample
    while True:
        info = await client.execute("query-migrate")
        now = time.monotonic()
        sent = info.get("ram", {}).get("transferred", 0)
        if now > last_t and not first:
            rate = (sent - last_sent) / (now - last_t)
        first = False
        last_sent, last_t = sent, now
        status = info.get("status", "none")
        if tty:
            out.write("\r\033[K" + progress_line(info, rate, bar))
            out.flush()
        elif now - last_printed >= 1.0 or status in FINAL_STATES:
            out.write(progress_line(info, rate, bar) + "\n")
            last_printed = now
        if status in FINAL_STATES:
            if tty:
                out.write("\n")
            return dict(info)
        if timeout is not None and now - start > timeout:
            raise TimeoutError(f"migration still {status} after {timeout:g} s")
        await asyncio.sleep(interval)


def summary_lines(info: dict[str, Any], verified: bool | None = None) -> list[str]:
    """A human summary of a finished migration (source-side ``query-migrate``)."""
    lines = [f"status:        {info.get('status')}"]
    if "error-desc" in info:
        lines.append(f"error:         {info['error-desc']}")
    total_ms = info.get("total-time", 0)
    lines.append(f"total time:    {total_ms} ms (setup {info.get('setup-time', '-')} ms)")
    if "downtime" in info:
        lines.append(f"downtime:      {info['downtime']} ms  (VM stopped on the source until "
                     "it ran on the destination)")
        if "x-expected-downtime" in info:
            lines.append(f"expected:      {info['x-expected-downtime']} ms  (the estimate when "
                         "the switchover was decided)")
    ram = info.get("ram", {})
    sent = ram.get("transferred", 0)
    if "total" in ram:
        lines.append(f"guest RAM:     {human_bytes(ram['total'])}, "
                     f"{ram.get('dirty-sync-count', 0)} dirty-log syncs (rounds), "
                     f"{ram.get('normal', 0)} pages sent whole, {ram.get('duplicate', 0)} zero "
                     f"pages as offsets only; {human_bytes(ram.get('precopy-bytes', 0))} "
                     f"live, {human_bytes(ram.get('downtime-bytes', 0))} while stopped")
    dev_bytes = info.get("vfio", {}).get("transferred", 0)
    lines.append(f"transferred:   {human_bytes(sent)} in all, device state "
                 f"{human_bytes(dev_bytes)}; average {_rate(sent, total_ms / 1000)} over the "
                 "whole migration")
    checkpoints = info.get("x-downtime-checkpoints", {})
    if checkpoints and "downtime" in info:
        span = checkpoints.get("channels-drained", 0) - checkpoints.get("vm-stopped", 0)
        if span > 0:
            lines.append(f"throughput:    {_rate(dev_bytes, span / 1000)} while stopped "
                         f"({human_bytes(dev_bytes)} in {span:.0f} ms)")
    channels = info.get("x-channels", [])
    if channels:
        lines.append("channels:      " + ", ".join(
            f"{c['id']}={human_bytes(c['bytes'])}" for c in channels))
    devices = info.get("x-devices", [])
    if devices:
        lines.append("devices:       " + ", ".join(
            f"{d['id']} ({d['mode']}, {human_bytes(d.get('transferred', d.get('loaded', 0)))})"
            for d in devices))
    if checkpoints:
        origin = ("SWITCHOVER_START" if "socket-address" in info  # a destination's view
                  else "VM stop")
        lines.append(f"downtime breakdown (ms from {origin}): " + ", ".join(
            f"{k} {v:.1f}" for k, v in checkpoints.items()))
    dst = info.get("x-destination-checkpoints", {})
    if dst:
        lines.append("destination (ms from SWITCHOVER_START): " + ", ".join(
            f"{k} {v:.1f}" for k, v in dst.items()))
    if verified is not None:
        lines.append(f"digests:       {'verified, all devices match' if verified else 'MISMATCH'}")
    if info.get("x-ram-verified") is False:
        lines.append("guest RAM:     not compared by the migration (x-verify-ram off, or "
                     "no return path)")
    return lines
