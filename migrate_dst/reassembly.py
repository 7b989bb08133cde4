"""In-order reassembly of one device's multifd device-state buffers, with hard bounds.

Device-state packets of one device arrive on any channel in any order; the device
must receive them strictly by ``idx``.  :class:`Reassembly` parks early buffers in a
sparse map (a dict, so a hostile ``idx`` far ahead costs nothing — QEMU grows an
array to ``idx + 1`` first and only then checks its cap) and hands them to the load
task in order.

Every ``put`` is checked before anything is kept: duplicates and already-loaded
indexes, data after the config packet, a second config packet, and three bounds —
the count cap (``x-migration-max-queued-buffers``), the byte cap
(``x-migration-max-queued-buffers-size``, payload bytes queued but not yet written),
and the device's own capacity (no device takes more data than its pre-copy plus
stop-copy size), which bounds memory even when both caps are unlimited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from protocol.errors import LimitExceededError, SequenceError

__all__ = ["Reassembly", "QueuedBuffer"]


@dataclass(slots=True)
class QueuedBuffer:
    idx: int
    is_config: bool
    data: memoryview                 # payload after the 12-byte VFIO header
    release: Callable[[], None]      # gives the receive buffer back to its pool


class Reassembly:
    def __init__(self, device_id: str, *, max_count: int | None, max_bytes: int | None,
                 capacity: int) -> None:
        self.device_id = device_id
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.capacity = capacity
        self.next_idx = 0
        self.last_idx: int | None = None        # idx of the config packet, once seen
        self._slots: dict[int, QueuedBuffer] = {}
        self.queued_bytes = 0
        self.received_data_bytes = 0
        self.high_water_bytes = 0
        self.high_water_count = 0
        self._ready = asyncio.Event()
        self.packets = 0

    @property
    def queued_count(self) -> int:
        return len(self._slots)

    def put(self, idx: int, is_config: bool, data: memoryview,
            release: Callable[[], None]) -> None:
        """Queue one buffer; raises a RemoteProtocolError subclass when it breaks a rule."""
        dev = self.device_id
        if idx < self.next_idx:
            raise SequenceError(f"device {dev}: device-state buffer idx {idx} was already "
                                "loaded (duplicate packet)")
        if idx in self._slots:
            raise SequenceError(f"device {dev}: device-state buffer idx {idx} received twice")
        if self.last_idx is not None:
            if is_config:
                raise SequenceError(f"device {dev}: second config packet (idx {idx}; the "
                                    f"first had idx {self.last_idx})")
            if idx > self.last_idx:
                raise SequenceError(f"device {dev}: data packet idx {idx} after the config "
                                    f"packet idx {self.last_idx}, which must be the last")
        elif is_config and self._slots and max(self._slots) > idx:
            raise SequenceError(f"device {dev}: config packet idx {idx} is not the last: "
                                f"idx {max(self._slots)} was already received")
        size = len(data)
        if self.max_count is not None and len(self._slots) + 1 > self.max_count:
            raise LimitExceededError(
                f"device {dev}: {len(self._slots) + 1} queued device-state buffers exceed "
                f"x-migration-max-queued-buffers={self.max_count}",
                limit=self.max_count, value=len(self._slots) + 1)
        if self.max_bytes is not None and self.queued_bytes + size > self.max_bytes:
            raise LimitExceededError(
                f"device {dev}: {self.queued_bytes + size} queued device-state bytes exceed "
                f"x-migration-max-queued-buffers-size={self.max_bytes}",
                limit=self.max_bytes, value=self.queued_bytes + size)
        if not is_config and self.received_data_bytes + size > self.capacity:
            raise LimitExceededError(
                f"device {dev}: source sent more than the device's {self.capacity} bytes "
                "of stop-copy state", limit=self.capacity,
                value=self.received_data_bytes + size)
        if is_config:
            self.last_idx = idx
        else:
            self.received_data_bytes += size
        self._slots[idx] = QueuedBuffer(idx, is_config, data, release)
        self.queued_bytes += size
        self.packets += 1
        self.high_water_bytes = max(self.high_water_bytes, self.queued_bytes)
        self.high_water_count = max(self.high_water_count, len(self._slots))
        if idx == self.next_idx:
            self._ready.set()

    async def get(self) -> QueuedBuffer:
        """The buffer with the next idx, waiting until it has arrived."""
        while True:
            buf = self._slots.pop(self.next_idx, None)
            if buf is not None:
                self.next_idx += 1
                return buf
            self._ready.clear()
            await self._ready.wait()

    def done_with(self, buf: QueuedBuffer) -> None:
        """The load task wrote ``buf`` into the device: unqueue it and recycle it."""
        self.queued_bytes -= len(buf.data)
        buf.release()

    def clear(self) -> None:
        for buf in self._slots.values():
            buf.release()
        self._slots.clear()
        self.queued_bytes = 0
