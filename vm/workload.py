"""A guest program that keeps writing RAM while the VM runs.

This module is responsible for making live migration *live*: without a guest
that dirties memory, pre-copy would converge after one round.  A
:class:`Workload` writes pages of :class:`~vm.ram.GuestRam` at a configured
rate (``--workload dirty-rate=200M,pattern=hotspot``), marks every written page
in the dirty log like KVM would, and stops completely while paused (the VM is
stopped for the switchover, or has not been started yet on the destination).

Patterns, over the guest-wide page numbering (all blocks, in order):

* ``random`` -- uniform over every page;
* ``sequential`` -- a cursor marching through the pages, wrapping around;
* ``hotspot`` -- 90 % of the writes go to the first ``hotspot`` fraction of the
  pages, the rest uniformly to the other pages (a working set that stays hot,
  the case that makes pre-copy converge slowly).

Every write stores a 16-byte record (a global write counter starting at 1, and
the seed) at offset 0 of the page and the inverted counter in its last 8
bytes, so a written page is never zero and every write changes it.  Time is
injectable (``clock``/``sleep``) so tests can drive it with a fake clock.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import struct
import time
from dataclasses import dataclass
from typing import Final

from protocol.errors import ConfigError
from vm.properties import UINT64_MAX, format_size, parse_bandwidth
from vm.ram import GuestRam
from vm.vfio_sim import Clock, Sleep

__all__ = [
    "PATTERNS",
    "HOT_WRITE_SHARE",
    "WorkloadConfig",
    "parse_workload_option",
    "Workload",
]

PATTERNS: Final = ("random", "sequential", "hotspot")
#: Share of writes that go to the hot region with ``pattern=hotspot``.
HOT_WRITE_SHARE: Final = 0.9
#: Longest stretch of time one tick accounts for: after a stall of the event
#: loop the guest does not write a burst of several seconds' worth of pages at
#: once (a vCPU that did not run did not write).
MAX_TICK_CATCHUP: Final = 0.25

_RECORD: Final = struct.Struct("<QQ")
_TRAILER: Final = struct.Struct("<Q")
_MASK64: Final = (1 << 64) - 1
_BYTE_EPSILON: Final = 1e-6


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """The validated configuration of the guest workload.

    ``dirty_rate`` is bytes/s of page writes (0 = an idle guest); ``hotspot``
    is the fraction of pages that receives 90 % of the writes with
    ``pattern=hotspot`` (ignored by the other patterns).
    """

    dirty_rate: int
    pattern: str = "random"
    seed: int = 0
    hotspot: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.dirty_rate, bool) or not isinstance(self.dirty_rate, int) or not (
            0 <= self.dirty_rate <= UINT64_MAX
        ):
            raise ConfigError(
                f"invalid workload dirty-rate {self.dirty_rate!r}: expected bytes/s >= 0"
            )
        if self.pattern not in PATTERNS:
            raise ConfigError(
                f"invalid workload pattern {self.pattern!r}: expected one of {', '.join(PATTERNS)}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
            0 <= self.seed <= UINT64_MAX
        ):
            raise ConfigError(f"invalid workload seed {self.seed!r}: expected 0..2^64-1")
        if isinstance(self.hotspot, bool) or not isinstance(self.hotspot, (int, float)) or not (
            0 < self.hotspot <= 1
        ):
            raise ConfigError(
                f"invalid workload hotspot {self.hotspot!r}: expected a fraction in (0, 1]"
            )
        object.__setattr__(self, "hotspot", float(self.hotspot))

    def to_option(self) -> str:
        """The option text; :func:`parse_workload_option` gives this config back."""
        parts = [f"dirty-rate={format_size(self.dirty_rate)}", f"pattern={self.pattern}"]
        if self.seed:
            parts.append(f"seed={self.seed}")
        if self.pattern == "hotspot" or self.hotspot != 0.1:
            parts.append(f"hotspot={self.hotspot!r}")
        return ",".join(parts)


def parse_workload_option(text: str) -> WorkloadConfig:
    """Parse ``dirty-rate=200M,pattern=random|sequential|hotspot,seed=N[,hotspot=0.1]``.

    ``dirty-rate`` (bytes/s, K/M/G suffixes, optional ``/s``) is required.
    Unknown or duplicate keys are rejected with a :class:`ConfigError`
    quoting the text.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"invalid workload option {text!r}: expected e.g. 'dirty-rate=200M'")
    values: dict[str, str] = {}
    for part in text.strip().split(","):
        if not part:
            raise ConfigError(f"invalid workload option {text!r}: empty property (stray ',')")
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(
                f"invalid workload option {text!r}: {part!r} has no value (expected name=value)"
            )
        if key not in ("dirty-rate", "pattern", "seed", "hotspot"):
            raise ConfigError(
                f"invalid workload option {text!r}: unknown property {key!r}; "
                "valid properties: dirty-rate, pattern, seed, hotspot"
            )
        if key in values:
            raise ConfigError(f"invalid workload option {text!r}: duplicate property {key!r}")
        values[key] = value
    if "dirty-rate" not in values:
        raise ConfigError(f"invalid workload option {text!r}: dirty-rate=RATE is required")
    rate = parse_bandwidth(values["dirty-rate"])
    pattern = values.get("pattern", "random")
    if pattern not in PATTERNS:
        raise ConfigError(
            f"invalid workload pattern {pattern!r}: expected one of {', '.join(PATTERNS)}"
        )
    seed = 0
    if "seed" in values:
        try:
            seed = int(values["seed"], 0)
        except ValueError:
            raise ConfigError(
                f"invalid workload seed {values['seed']!r}: expected an integer in 0..2^64-1"
            ) from None
    hotspot = 0.1
    if "hotspot" in values:
        try:
            hotspot = float(values["hotspot"])
        except ValueError:
            raise ConfigError(
                f"invalid workload hotspot {values['hotspot']!r}: expected a fraction in (0, 1]"
            ) from None
        if not 0 < hotspot <= 1:  # also rejects nan
            raise ConfigError(
                f"invalid workload hotspot {values['hotspot']!r}: expected a fraction in (0, 1]"
            )
    return WorkloadConfig(dirty_rate=rate, pattern=pattern, seed=seed, hotspot=hotspot)


class Workload:
    """Writes guest pages at ``config.dirty_rate`` bytes/s while not paused.

    :meth:`run` loops forever: sleep one ``tick``, then write the pages the
    elapsed time is worth (whole pages; the fraction carries over to the next
    tick).  :meth:`pause` stops all writes until :meth:`resume`; time spent
    paused is not made up for.  Cancel the task running :meth:`run` to end it.
    """

    def __init__(
        self,
        ram: GuestRam,
        config: WorkloadConfig,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        tick: float = 0.01,
    ) -> None:
        if not tick > 0:
            raise ConfigError(f"workload tick must be positive, got {tick!r}")
        self.ram = ram
        self.config = config
        self.tick = tick
        self._clock = clock
        self._sleep = sleep
        self._running = asyncio.Event()
        self._running.set()
        self._rng = random.Random(config.seed)
        self._total = ram.npages_total
        self._hot = min(self._total, max(1, int(self._total * config.hotspot)))
        self._blocks = list(ram.blocks.values())
        self._bases = [b.base_page for b in self._blocks]
        self._cursor = 0  # sequential pattern: next guest-wide page
        self._carry = 0.0  # bytes owed from previous ticks (less than a page)
        self._last: float | None = None
        #: total page writes so far; also the last write counter stored in a page
        self.pages_written = 0

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def pause(self) -> None:
        """Stop writing (the vCPUs stop).  Takes effect immediately: no write
        happens after this returns until :meth:`resume`."""
        self._running.clear()

    def resume(self) -> None:
        """Start writing again; the paused time does not count as elapsed."""
        if not self._running.is_set():
            self._last = None
            self._carry = 0.0
            self._running.set()

    async def run(self) -> None:
        """Write pages forever (until cancelled), one batch per tick while running."""
        while True:
            if not self._running.is_set():
                await self._running.wait()
                continue
            if self._last is None:
                self._last = self._clock()
            await self._sleep(self.tick)
            if not self._running.is_set() or self._last is None:
                continue  # paused (and maybe resumed) during the sleep
            now = self._clock()
            elapsed = now - self._last
            self._last = now
            self.advance(elapsed)

    def advance(self, elapsed: float) -> int:
        """Write what ``elapsed`` seconds are worth at the configured rate; returns pages.

        Elapsed time is capped at :data:`MAX_TICK_CATCHUP`.  Does nothing while paused.
        """
        if self.paused or elapsed <= 0:
            return 0
        page_size = self.ram.page_size
        budget = self._carry + self.config.dirty_rate * min(elapsed, MAX_TICK_CATCHUP)
        # The tolerance absorbs float noise in clock differences (1000.01 - 1000.0
        # is a hair under 0.01), which would otherwise lose a page now and then.
        count = int((budget + _BYTE_EPSILON) // page_size)
        self._carry = budget - count * page_size
        if count:
            self.write_pages(count)
        return count

    def _pick(self, count: int) -> list[int]:
        """``count`` guest-wide page numbers according to the pattern."""
        total = self._total
        pattern = self.config.pattern
        if pattern == "sequential":
            start = self._cursor
            self._cursor = (start + count) % total
            return [(start + i) % total for i in range(count)]
        rng = self._rng
        if pattern == "random":
            return [rng.randrange(total) for _ in range(count)]
        hot = self._hot
        if hot >= total:
            return [rng.randrange(total) for _ in range(count)]
        rand = rng.random
        return [
            rng.randrange(hot) if rand() < HOT_WRITE_SHARE else rng.randrange(hot, total)
            for _ in range(count)
        ]

    def write_pages(self, count: int) -> None:
        """Write ``count`` pages chosen by the pattern and mark each one dirty."""
        ram = self.ram
        blocks, bases = self._blocks, self._bases
        views = [b.view for b in blocks]
        mark = ram.mark_dirty
        pack_record, pack_trailer = _RECORD.pack_into, _TRAILER.pack_into
        page_size = ram.page_size
        trailer = page_size - _TRAILER.size
        seed = self.config.seed
        counter = self.pages_written
        single = len(blocks) == 1
        for page in self._pick(count):
            k = 0 if single else bisect.bisect_right(bases, page) - 1
            index = page - bases[k]
            offset = index * page_size
            counter += 1
            view = views[k]
            pack_record(view, offset, counter & _MASK64, seed)
            pack_trailer(view, offset + trailer, ~counter & _MASK64)
            mark(blocks[k], index)
        self.pages_written = counter
