"""A per-packet timeline of each migration, for finding where the time of a downtime goes.

Off unless a daemon was started with ``--timeline PATH``.  Then the channel and load
threads append one tuple per packet sent, received or loaded to :data:`TIMELINE`
(``list.append`` is atomic under the GIL and costs a fraction of a microsecond, so
the timeline barely moves what it measures, unlike ``--trace-packets``, whose log
lines cost tens of microseconds each), and when a migration ends the daemon writes
it to ``PATH`` as JSON lines, replacing what the previous migration wrote.

Times are ``time.monotonic_ns()``, one clock for every process on the machine, so
the source's and the destination's timelines line up.  ``bench/timeline.py`` runs a
migration with both recording and prints what happened when.

Events (the first fields of every line are ``[ns, thread, event]``):

- ``checkpoint NAME``: a downtime checkpoint (as in ``x-downtime-checkpoints``)
- ``queued DEVICE IDX``: a device-state packet handed to the multifd sender
- ``sent CHANNEL START_NS BYTES KIND``: a job written to its socket (one event at
  the end, with the time it started)
- ``header CHANNEL DEVICE PLACED``: a device-state header decoded and its place known
  (PLACED: received straight into the device)
- ``received CHANNEL DEVICE BYTES``: a device-state packet's data complete
- ``ram CHANNEL PAGES``: a RAM packet received (PAGES: its normal pages)
- ``loaded DEVICE START_NS BYTES``: a device-state buffer written into the device
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from migrate_common.log import get_logger
from protocol.errors import ConfigError

__all__ = ["TIMELINE", "Timeline"]


class Timeline:
    """The recorder; hot paths read :attr:`events` once and append when not None."""

    def __init__(self) -> None:
        self.path: str | None = None
        #: None while off; else the events of the current migration
        self.events: list[tuple[Any, ...]] | None = None

    def enable(self, path: str) -> None:
        """Record from now on; ``path``'s directory must exist (checked at once, so a
        typo fails at startup rather than after a migration)."""
        if not Path(path).parent.is_dir():
            raise ConfigError(f"--timeline {path}: no such directory")
        self.path = path
        self.events = []

    def record(self, event: str, *fields: Any) -> None:
        """For the places that are not hot: append one event when recording."""
        events = self.events
        if events is not None:
            events.append((time.monotonic_ns(), threading.current_thread().name, event,
                           *fields))

    def start(self) -> None:
        """A migration begins: forget the previous one's events."""
        if self.events is not None:
            self.events = []

    @contextlib.contextmanager
    def migration(self) -> Iterator[None]:
        """Around one migration: :meth:`start` before, :meth:`write` after, whatever
        the outcome."""
        self.start()
        try:
            yield
        finally:
            self.write()

    def write(self) -> None:
        """A migration ended: write its events (atomically replacing the file)."""
        if self.events is None or self.path is None:
            return
        events, self.events = self.events, []
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as f:
                for event in events:
                    f.write(json.dumps(event, default=str) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:  # the migration's outcome stands; only the record is lost
            get_logger("timeline").warning("could not write the timeline", path=self.path,
                                           error=str(exc))


TIMELINE = Timeline()
