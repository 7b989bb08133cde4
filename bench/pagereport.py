"""The hypervisor taking free memory back: waiting for it to be done before a
measurement, and noticing it during one.

This VM's kernel hands free memory back to the host (virtio-balloon free page
reporting).  About 2.4 s after a process frees a lot of memory, and every 2 s after
that while more is waiting, a *pass* reports up to ~2 GiB of free pages to the host
within ~0.4 s.  Every benchmark sample frees its daemons' memory when they exit, so
without care the passes that follow land in the next sample: migrations of 1 GiB of
device state that overlapped a pass (640-1022 MiB reported during the migration)
took 0.30-0.34 ns per byte against 0.21-0.26 for the same configuration without one
(``docs/performance.md``, "Free page reporting").

So before every measured migration, iperf3 run and QEMU sample the harness waits
until neither a pass nor a big free (:func:`note_freed`: a daemon pair or a QEMU
exited) happened for :data:`QUIET` s (:func:`settle`; a thread polls the counter
every 50 ms), and it counts what was reported during the measurement
(:class:`Window`): one during which :data:`DISTURBING_MIB` or more were reported
anyway is disturbed, and taken again like one during which another process ran.  Waiting for a pass in
progress only is not enough: the iperf3 run right after a sample then met the pass
that its daemons' exit brought, three tries in a row.

The counter is the kernel's ``reported_kib`` (``/sys/module/page_reporting/
parameters/``, this machine's kernel); where it does not exist nothing is waited for
or detected, and the samples say so (``page-reporting-mib`` is absent).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

__all__ = ["QUIET", "DISTURBING_MIB", "available", "reported_kib", "note_freed", "settle",
           "settle_sync", "disturbance", "Window"]

REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")

#: Seconds without a pass or a big free before a measurement may start: longer than
#: the ~2.4 s from a free to its first pass and the ~2 s between passes
#: (``bench/run.py --quick`` sets 0: it checks the harness, not the numbers).
QUIET = 2.5

#: MiB reported during a measurement that make it disturbed: the small passes that
#: iperf3's own traffic brings (16-96 MiB, a few milliseconds) do not count.
DISTURBING_MIB = 128

#: Longest wait (16 GiB freed take ~20 s of passes); after it the measurement starts
#: anyway, and is taken again if a pass disturbed it.
LIMIT = 30.0

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
_freed = 0.0


def note_freed() -> None:
    """A process the harness ran has exited, or a big file was removed: its memory is
    free, and reporting passes may follow within seconds."""
    global _freed
    _freed = time.monotonic()


def _quiet_for() -> float:
    """Seconds since the counter last changed or memory was last freed (infinite
    where there is no counter)."""
    global _watch
    if not available():
        return float("inf")
    with _watch_lock:
        if _watch is None:
            _watch = _Watch()
            _watch.start()
            return 0.0  # not watched before: wait QUIET to know
    return time.monotonic() - max(_watch.changed, _freed)


def _next_wait(quiet: float, t0: float, limit: float) -> float:
    """Seconds to sleep before looking again, or 0 when the wait begun at ``t0`` is
    over (quiet long enough, or ``limit`` reached)."""
    left = quiet - _quiet_for()
    if left <= 0 or time.monotonic() - t0 >= limit:
        return 0.0
    return min(left, _POLL)


def settle_sync(quiet: float | None = None, limit: float = LIMIT) -> float:
    """Block until no pass and no big free for ``quiet`` s (default :data:`QUIET`; at
    most ``limit``); the seconds waited."""
    t0 = time.monotonic()
    while (step := _next_wait(QUIET if quiet is None else quiet, t0, limit)) > 0:
        time.sleep(step)
    return round(time.monotonic() - t0, 3)


async def settle(quiet: float | None = None, limit: float = LIMIT) -> float:
    """:func:`settle_sync` on the event loop: polls with ``asyncio.sleep``, so that an
    interrupted benchmark stops at once (a worker thread would hold ``asyncio.run``
    until the wait ended, up to :data:`LIMIT` s)."""
    t0 = time.monotonic()
    while (step := _next_wait(QUIET if quiet is None else quiet, t0, limit)) > 0:
        await asyncio.sleep(step)
    return round(time.monotonic() - t0, 3)


def disturbance(mib: float | None) -> str | None:
    """Why a measurement during which ``mib`` MiB were reported must be taken again
    (None: it need not)."""
    if mib is None or mib < DISTURBING_MIB:
        return None
    return (f"the kernel handed {mib} MiB of free memory to the hypervisor meanwhile "
            "(free page reporting)")


class Window:
    """What was reported between its creation and :meth:`mib` (None: not known)."""

    def __init__(self) -> None:
        self._start = reported_kib()

    def mib(self) -> float | None:
        end = reported_kib()
        if self._start is None or end is None:
            return None
        return round((end - self._start) / 1024, 1)
