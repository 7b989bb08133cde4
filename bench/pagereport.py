"""The hypervisor taking free memory back: waiting for a pass to end before a
measurement, and noticing one during it.

This VM's kernel hands free memory back to the host (virtio-balloon free page
reporting).  About 2.4 s after a process frees a lot of memory, and every 2 s after
that while more is waiting, a *pass* reports up to ~2 GiB of free pages to the host
within ~0.4 s.  Every benchmark sample frees its daemons' memory when they exit, so
without care the passes that follow land in the next sample: migrations of 1 GiB of
device state that overlapped a pass (640-1022 MiB reported during the migration)
took 0.30-0.34 ns per byte against 0.21-0.26 for the same configuration without one
(``docs/performance.md``, "Free page reporting").

So the harness counts what was reported during every measured migration, iperf3
run and QEMU sample (:class:`Window`): one during which memory was reported is
disturbed, and taken again like one during which another process ran.  Before each
it also waits for a pass in progress to end (:func:`settle`: no change of the
counter for :data:`QUIET` s, watched by a thread that polls it every 50 ms).  Waiting
out every pass a free may still bring is not worth it: after a 2 GiB sample the
passes come while the next pair starts (ten alternating samples of 4 × 512 MiB, with
and without waiting 3 s past the last pass and the last exit: none overlapped a
pass either way, medians 0.246 and 0.242 ns per byte), and after freeing 16 GiB
they go on for ~20 s.

The counter is the kernel's ``reported_kib`` (``/sys/module/page_reporting/
parameters/``, this machine's kernel); where it does not exist nothing is waited for
or detected, and the samples say so (``page-reporting-mib`` is absent).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

__all__ = ["QUIET", "available", "reported_kib", "settle", "settle_sync", "Window"]

REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")

#: Seconds without a change of the counter before a measurement may start: a pass
#: changes it every ~50 ms while it lasts (~0.4 s), and the next comes ~2 s later.
QUIET = 0.6

#: Longest wait; after it the measurement starts anyway (and is retaken if disturbed).
LIMIT = 10.0

_POLL = 0.05


def reported_kib() -> int | None:
    """KiB of free memory the kernel has reported to the host since boot (None: this
    kernel does not say)."""
    try:
        return int(REPORTED_KIB.read_text())
    except (OSError, ValueError):
        return None


def available() -> bool:
    return REPORTED_KIB.exists()


class _Watch(threading.Thread):
    """Polls the counter, so that :func:`settle` knows when it last changed without
    watching for :data:`QUIET` s itself."""

    def __init__(self) -> None:
        super().__init__(name="page-reporting-watch", daemon=True)
        self.value = reported_kib()
        self.changed = time.monotonic()

    def run(self) -> None:
        while True:
            time.sleep(_POLL)
            value = reported_kib()
            if value != self.value:
                self.value = value
                self.changed = time.monotonic()


_watch: _Watch | None = None
_watch_lock = threading.Lock()


def _quiet_for() -> float:
    """Seconds since the counter last changed (infinite where there is none)."""
    global _watch
    if not available():
        return float("inf")
    with _watch_lock:
        if _watch is None:
            _watch = _Watch()
            _watch.start()
            return 0.0  # not watched before: wait QUIET to know
    return time.monotonic() - _watch.changed


def settle_sync(quiet: float = QUIET, limit: float = LIMIT) -> float:
    """Block until the counter has not changed for ``quiet`` s (at most ``limit``);
    the seconds waited."""
    t0 = time.monotonic()
    while (left := quiet - _quiet_for()) > 0 and time.monotonic() - t0 < limit:
        time.sleep(min(left, _POLL))
    return round(time.monotonic() - t0, 3)


async def settle(quiet: float = QUIET, limit: float = LIMIT) -> float:
    """:func:`settle_sync` without blocking the event loop."""
    t0 = time.monotonic()
    while (left := quiet - _quiet_for()) > 0 and time.monotonic() - t0 < limit:
        await asyncio.sleep(min(left, _POLL))
    return round(time.monotonic() - t0, 3)


class Window:
    """What was reported between its creation and :meth:`mib` (None: not known)."""

    def __init__(self) -> None:
        self._start = reported_kib()

    def mib(self) -> float | None:
        end = reported_kib()
        if self._start is None or end is None:
            return None
        return round((end - self._start) / 1024, 1)
