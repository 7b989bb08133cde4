"""``--record-channels DIR``: keep the bytes every channel of a migration delivered.

Each incoming attempt records into ``DIR/attempt-<N>/`` in the layout of
``../shared/captures`` (and of ``tools/capture_qemu_multifd.py``), so that
``migrate-analyze`` reads our migrations like QEMU's:

* ``main.bin`` — the main channel as received, from its 8-byte ``MFDM`` preamble on;
* ``multifd-<id>.bin`` — each multifd channel, from its 64-byte init on;
* ``<name>.recv`` — one line per receive call, ``<byte offset> <ns since start>``,
  so a packet's arrival time can be found from its offset;
* ``meta.json`` — who recorded it, the channel count, VM UUID and start time.

Recording copies every received byte once more, so it is meant for debugging and
analysis, not for benchmarks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["ChannelRecorder"]


class ChannelRecorder:
    def __init__(self, root: Path, attempt: int, meta: dict[str, Any]) -> None:
        self.dir = root / f"attempt-{attempt}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._start = time.monotonic_ns()
        self._files: dict[str, tuple[IO[bytes], IO[str], list[int]]] = {}
        self.meta = {"recorder": "multifd-migrate", "format": 1, "attempt": attempt,
                     "started": time.time(), **meta}
        self._write_meta()

    def _write_meta(self) -> None:
        (self.dir / "meta.json").write_text(json.dumps(self.meta, indent=2) + "\n")

    def record(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (what one receive call delivered) to channel ``name``."""
        entry = self._files.get(name)
        if entry is None:
            entry = (open(self.dir / f"{name}.bin", "wb"),
                     open(self.dir / f"{name}.recv", "w"), [0])
            self._files[name] = entry
        data_file, times, offset = entry
        times.write(f"{offset[0]} {time.monotonic_ns() - self._start}\n")
        data_file.write(data)
        offset[0] += len(data)

    def update_meta(self, **items: Any) -> None:
        self.meta.update(items)
        self._write_meta()

    def close(self) -> None:
        for data_file, times, _ in self._files.values():
            data_file.close()
            times.close()
        self._files.clear()
