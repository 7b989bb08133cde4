"""In-order reassembly of one device's multifd device-state buffers, with hard bounds.

Device-state packets of one device arrive on any channel in any order; the device
must receive them strictly by ``idx``.  :class:`Reassembly` is shared by the receive
threads (which :meth:`~Reassembly.claim` a packet when its header arrives and
:meth:`~Reassembly.put` it when its data has) and the device's load thread (which
takes packets in idx order with :meth:`~Reassembly.get`), under one lock.  One
thread loads at a time: a receive thread whose packet is the next in order while
nobody loads takes it from :meth:`~Reassembly.put` and loads it itself; the load
thread loads the packets that arrived ahead of their turn, and the config packet.

Placing data: every claim tells the size of a packet, so once the sizes of all
earlier packets are known, a packet's place in the device's resume image is known
too — the sum of theirs.  Such a packet is received straight into the device
(``target``), and loading it is only a matter of hashing it; one whose place is not
known yet (an earlier header is still on its way, or the load thread has not
started: before SWITCHOVER_START the image may still grow from the main channel) waits for them a
little — that is the flow control that keeps a lagging channel from letting the
others fill memory — and only then falls back to a pooled buffer, copied in when its
turn comes.

A source that announces uniform packets (ours: hello parameter
``x-uniform-device-packets``) promises that every data packet of a device but its
last holds exactly the device's packet data size (``uniform_size``) and the last no
more.  Then a packet's place is ``idx × uniform_size`` from the start of the stream
without waiting for the headers before it; each header is checked against the
promise as it comes (a larger packet, a second short one, or a data packet after the
short one is a protocol error), and the load still writes strictly in order at the
write cursor, so a broken promise fails the migration instead of misplacing data.
A QEMU source, whose packets may have any size, keeps the waiting.

Every packet is checked before anything is kept: duplicates and already-loaded
indexes, data after the config packet, a second config packet, and three bounds —
the count cap (``x-migration-max-queued-buffers``), the byte cap
(``x-migration-max-queued-buffers-size``, payload bytes received but not yet loaded;
placed packets count too), and the device's own capacity (no device takes more data
than its pre-copy plus stop-copy size), which bounds memory even when both caps are
unlimited; queued packets count as at least 4 KiB each there, so a flood of tiny ones
cannot grow the bookkeeping either.  Near a cap, a packet ahead of its turn first
waits a little at its header for the load to make room (flow control, as for the
places), and only then trips it.  Per-packet bookkeeping lives in dicts, so a
hostile ``idx`` far ahead costs nothing (QEMU grows an array to ``idx + 1`` first and
only then checks its cap).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from migrate_common.threadio import ThreadSignal
from protocol.errors import LimitExceededError, SequenceError

__all__ = ["Reassembly", "QueuedBuffer", "Target"]

#: How long a packet may wait for the headers before it to learn its place.
PLACE_WAIT = 0.05

#: How long a packet ahead of its turn may wait for the load to make room under the
#: caps before it is counted anyway (and then trips them): a load held back for a
#: moment must not fail the migration.  With 16 channels on two CPUs, the 4 MiB packet
#: the load waits for can take longer than 50 ms to come in (``bench/results/full-25``
#: lost a migration under a 32 MiB cap that way); for an in-order sender the wait
#: ends as soon as it has, so only a source that reorders ever waits this long.
ROOM_WAIT = 0.5

#: Queued packets count as at least this many bytes against the device's capacity
#: (plus CHARGE_SLACK for a short last data packet and the config packet), so their
#: number — and the few hundred bytes of bookkeeping each — stays bounded by the
#: device's size even when a hostile source sends 1-byte packets out of order.
MIN_CHARGE = 4096
CHARGE_SLACK = 64 * 1024

#: ``target(offset, size)``: a view of the device at that absolute offset, or None
Target = Callable[[int, int], "memoryview | None"]


@dataclass(slots=True)
class QueuedBuffer:
    idx: int
    is_config: bool
    size: int                         # payload bytes after the 12-byte VFIO header
    data: memoryview | None          # None: already in place in the device
    offset: int | None               # where in the image (absolute), when in place
    release: Callable[[], None]      # gives the receive buffer back to its pool


def _nothing() -> None:
    pass


def _charge(is_config: bool, size: int) -> int:
    # the one config packet is bounded by itself (config-size); data is the capacity's
    return 0 if is_config else max(size, MIN_CHARGE)


class _Guard:
    """``with reassembly._guard:`` holds its lock, and on the way out releases it
    before waking the claims it made placeable (see ``Reassembly._release_and_wake``)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: Reassembly) -> None:
        self._owner = owner

    def __enter__(self) -> None:
        self._owner._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._owner._release_and_wake()


_local = threading.local()


def _thread_signal() -> ThreadSignal:
    """This thread's signal for waiting on a place (one eventfd per receive thread)."""
    signal: ThreadSignal | None = getattr(_local, "signal", None)
    if signal is None:
        signal = _local.signal = ThreadSignal()
    return signal


class Reassembly:
    def __init__(self, device_id: str, *, max_count: int | None, max_bytes: int | None,
                 capacity: int, target: Target | None = None,
                 uniform_size: int | None = None) -> None:
        self.device_id = device_id
        #: every data packet but the last holds exactly this many bytes (the source
        #: promised it): places are known from ``idx`` alone
        self.uniform_size = uniform_size
        self._short_idx: int | None = None    # the one data packet below uniform_size
        self._top_data_idx = -1               # the highest data packet idx claimed
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.capacity = capacity
        self._target = target
        self._lock = threading.Lock()
        self._guard = _Guard(self)
        # the load thread's wake-up: a Condition's notify would wake it holding the GIL
        self._arrived = ThreadSignal()
        # claims waiting for their place (idx → the waiting thread's signal), claims
        # waiting for the load to free room under a cap, and the signals to set once
        # the lock is released
        self._place_waiters: dict[int, ThreadSignal] = {}
        self._room_waiters: list[ThreadSignal] = []
        self._wakes: list[ThreadSignal] = []
        #: seconds a claim waits for its place before taking a buffer instead
        self.place_wait = PLACE_WAIT
        #: seconds a claim waits for room under the caps before counting anyway
        self.room_wait = ROOM_WAIT
        # data packets claimed (their room reserved under the caps), not yet put
        self._inflight: dict[int, int] = {}
        self._largest = 0                     # the largest data packet claimed so far
        self.next_idx = 0
        self.last_idx: int | None = None        # idx of the config packet, once seen
        self._claimed: dict[int, int | None] = {}   # idx → offset in the stream, if known
        self._sizes: dict[int, int] = {}      # sizes of claimed packets not yet placed
        self._given: set[int] = set()         # claimed packets handed a place in the device
        self._placed_idx = 0                  # every idx below this has a known offset
        self._placed_end = 0                  # the stream offset of _placed_idx
        self._base: int | None = None         # where the stream starts in the image
        # the hole (first unplaced idx, before SWITCHOVER_START?) a claim last waited
        # for in vain: later claims behind the same hole take a buffer at once
        self._gave_up: tuple[int, bool] | None = None
        self._slots: dict[int, QueuedBuffer] = {}
        self._loading = False                 # a thread is loading a packet now
        self._closed = False
        self.queued_bytes = 0
        self._queued_charge = 0               # queued, each counted as >= MIN_CHARGE
        self.announced_data_bytes = 0
        self.high_water_bytes = 0
        self.high_water_count = 0
        self.packets = 0
        self.in_place_packets = 0
        self.unplaced_packets = 0    # data packets that waited for a place in vain

    @property
    def queued_count(self) -> int:
        return len(self._slots)

    # -- receive threads ---------------------------------------------------------------
    def claim(self, idx: int, is_config: bool, size: int, *, place: bool = True
              ) -> memoryview | None:
        """A packet's header arrived: check it, note its size, and return where in the
        device its ``size`` bytes should go, or None to receive them into a buffer."""
        with self._guard:
            self._check_closed()
            self._claim(idx, is_config, size)
            self._wait_for_room(idx, size)  # the config too: it takes a slot and bytes
            if not place or is_config or self._target is None:
                return None
            if self.uniform_size is not None and self._claimed[idx] is None:
                # every packet before this one holds uniform_size bytes (checked as
                # their headers come): its place is known now
                self._claimed[idx] = (self._placed_end
                                      + (idx - self._placed_idx) * self.uniform_size)
            deadline = time.monotonic() + self.place_wait
            if self._gave_up == (self._placed_idx, self._base is None):
                deadline = 0.0  # this hole already made a claim wait in vain
            while (offset := self._claimed[idx]) is None or self._base is None:
                # An earlier header is still on its way on another channel (or
                # SWITCHOVER_START on the main channel): wait for it rather than take
                # memory.  A sender that queues each device's packets in idx order
                # on FIFO channels cannot make the waits circular — every awaited
                # header was queued before the waiting one — so the timeout only
                # matters for senders that reorder.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.unplaced_packets += 1
                    self._gave_up = (self._placed_idx, self._base is None)
                    return None
                signal = _thread_signal()
                self._place_waiters[idx] = signal
                self._release_and_wake()
                try:
                    signal.wait(remaining)
                finally:
                    self._lock.acquire()
                    self._place_waiters.pop(idx, None)
                self._check_closed()
            target = self._target(self._base + offset, size)
            if target is not None:
                self._given.add(idx)
            return target

    def _over_caps(self, idx: int, size: int) -> bool:
        """(Lock held.)  Whether a packet of ``size`` bytes ahead of its turn would
        leave too little room under a cap for the packets the load needs first; never
        for the packet the load waits for itself.  The byte cap keeps room for two of
        the largest data packets seen: the one the load waits for, and the one before
        it, which counts until it is loaded.  (The count cap does not count a packet
        being loaded: room for one.)"""
        if idx == self.next_idx:
            return False
        if self.max_bytes is not None:
            room = 2 * max(self._largest, size)
            inflight = sum(self._inflight.values())  # at most one per channel
            if self.queued_bytes + inflight + size + room > self.max_bytes:
                return True
        return (self.max_count is not None
                and len(self._slots) + len(self._inflight) + 2 > self.max_count)

    def _wait_for_room(self, idx: int, size: int) -> None:
        """(Lock held.)  Flow control under the caps: a packet ahead of its turn that
        would break a cap waits a little for the load to catch up — its channel stops
        reading meanwhile and TCP holds its sender back — then reserves its room.
        The waits cannot go round in a circle for a sender that queues packets in idx
        order on FIFO channels (a claim waits for packets queued before it); for
        others ``room_wait`` bounds them, and ``put`` then enforces the caps."""
        deadline = time.monotonic() + self.room_wait
        while self._over_caps(idx, size):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            signal = _thread_signal()
            self._room_waiters.append(signal)
            self._release_and_wake()
            try:
                signal.wait(remaining)
            finally:
                self._lock.acquire()
                if signal in self._room_waiters:
                    self._room_waiters.remove(signal)
            self._check_closed()
        self._inflight[idx] = size

    def _release_and_wake(self) -> None:
        """Release the lock, then wake the claims it made placeable (a thread woken
        while the lock is held would only wait for the lock, and a lock's release
        wakes its waiter holding the GIL)."""
        wakes, self._wakes = self._wakes, []
        self._lock.release()
        for signal in wakes:
            signal.set()

    def _wake_claims(self, every: bool = False) -> None:
        """(Lock held.)  Note the waiting claims whose place is now known (``every``:
        all of them, as at SWITCHOVER_START or when closed), to be woken once the
        lock is released."""
        waiters = self._place_waiters
        if waiters:
            ready = [i for i in waiters if every or i < self._placed_idx]
            self._wakes.extend(waiters.pop(i) for i in ready)

    def _claim(self, idx: int, is_config: bool, size: int) -> None:
        dev = self.device_id
        if idx < self.next_idx:
            raise SequenceError(f"device {dev}: device-state buffer idx {idx} was already "
                                "loaded (duplicate packet)")
        if idx in self._claimed:
            raise SequenceError(f"device {dev}: device-state buffer idx {idx} received twice")
        if self.last_idx is not None:
            if is_config:
                raise SequenceError(f"device {dev}: second config packet (idx {idx}; the "
                                    f"first had idx {self.last_idx})")
            if idx > self.last_idx:
                raise SequenceError(f"device {dev}: data packet idx {idx} after the config "
                                    f"packet idx {self.last_idx}, which must be the last")
        elif is_config and self._claimed and max(self._claimed) > idx:
            raise SequenceError(f"device {dev}: config packet idx {idx} is not the last: "
                                f"idx {max(self._claimed)} was already received")
        if not is_config and self.announced_data_bytes + size > self.capacity:
            raise LimitExceededError(
                f"device {dev}: source sent more than the device's {self.capacity} bytes "
                "of stop-copy state", limit=self.capacity,
                value=self.announced_data_bytes + size)
        if not is_config and self.uniform_size is not None:
            self._check_uniform(idx, size)
        if is_config:
            self.last_idx = idx
        else:
            self.announced_data_bytes += size
            self._largest = max(self._largest, size)
        self._claimed[idx] = None
        self._sizes[idx] = 0 if is_config else size
        # place every packet whose predecessors' sizes are now all known
        sizes, claimed = self._sizes, self._claimed
        if self._placed_idx in sizes:
            while self._placed_idx in sizes:
                early = claimed[self._placed_idx]
                if early is not None and early != self._placed_end:  # (uniform packets)
                    raise SequenceError(
                        f"device {dev}: device-state buffer idx {self._placed_idx} was "
                        f"placed at {early} from its idx, but the packets before it end "
                        f"at {self._placed_end}")
                claimed[self._placed_idx] = self._placed_end
                self._placed_end += sizes.pop(self._placed_idx)
                self._placed_idx += 1
            self._wake_claims()

    def _check_uniform(self, idx: int, size: int) -> None:
        """(Lock held.)  A data packet against the source's promise of uniform packets."""
        dev, uniform = self.device_id, self.uniform_size
        assert uniform is not None
        if size > uniform:
            raise SequenceError(f"device {dev}: device-state buffer idx {idx} holds {size} "
                                f"bytes, more than the {uniform} the source announced "
                                "(x-uniform-device-packets)")
        short = self._short_idx
        if short is not None and idx > short:
            raise SequenceError(f"device {dev}: device-state buffer idx {idx} after idx "
                                f"{short}, which was short and so announced the last data "
                                "(x-uniform-device-packets)")
        if size < uniform:
            if short is not None or self._top_data_idx > idx:
                raise SequenceError(
                    f"device {dev}: device-state buffer idx {idx} holds {size} of "
                    f"{uniform} bytes but is not the last data packet (idx "
                    f"{max(self._top_data_idx, short or 0)} came) "
                    "(x-uniform-device-packets)")
            self._short_idx = idx
        self._top_data_idx = max(self._top_data_idx, idx)

    def put(self, idx: int, is_config: bool, size: int, data: memoryview | None,
            release: Callable[[], None] | None = None, *, take: bool = False
            ) -> QueuedBuffer | None:
        """A packet's data arrived: in ``data``, or (None) where :meth:`claim` said.
        Raises a RemoteProtocolError subclass when it breaks a rule.

        With ``take``, a packet that is the next to load while no thread is loading
        one is not queued for the load thread but returned: the caller loads it at
        once (or, the config, hands it to the load task) and then calls
        :meth:`done_with`, as the load thread would.  The receive thread that has
        just received a packet finds its bytes still in its CPU's caches, and no
        thread has to be woken for it."""
        dev = self.device_id
        with self._guard:
            self._check_closed()
            if idx not in self._claimed:
                self._claim(idx, is_config, size)
            self._inflight.pop(idx, None)
            if idx in self._slots or idx < self.next_idx:
                raise SequenceError(f"device {dev}: device-state buffer idx {idx} received "
                                    "twice")
            if self.max_count is not None and len(self._slots) + 1 > self.max_count:
                raise LimitExceededError(
                    f"device {dev}: {len(self._slots) + 1} queued device-state buffers "
                    f"exceed x-migration-max-queued-buffers={self.max_count}",
                    limit=self.max_count, value=len(self._slots) + 1)
            charge = _charge(is_config, size)
            if self._queued_charge + charge > self.capacity + CHARGE_SLACK:
                # tiny packets that never come in order: their bookkeeping would grow
                # with the bytes received even where both caps are unlimited
                raise LimitExceededError(
                    f"device {dev}: {len(self._slots) + 1} device-state packets waiting "
                    f"for their turn, {self._queued_charge + charge} bytes counting each as "
                    f"at least {MIN_CHARGE}, exceed the device's {self.capacity} bytes",
                    limit=self.capacity + CHARGE_SLACK, value=self._queued_charge + charge)
            if self.max_bytes is not None and self.queued_bytes + size > self.max_bytes:
                raise LimitExceededError(
                    f"device {dev}: {self.queued_bytes + size} queued device-state bytes "
                    f"exceed x-migration-max-queued-buffers-size={self.max_bytes}",
                    limit=self.max_bytes, value=self.queued_bytes + size)
            offset = None
            if data is None:
                stream_offset = self._claimed[idx]
                if idx not in self._given or stream_offset is None or self._base is None:
                    raise SequenceError(f"device {dev}: idx {idx} has no data and no place")
                offset = self._base + stream_offset
                self.in_place_packets += 1
            self._slots[idx] = QueuedBuffer(idx, is_config, size, data, offset,
                                            release or _nothing)
            self.queued_bytes += size
            self._queued_charge += charge
            self.packets += 1
            self.high_water_bytes = max(self.high_water_bytes, self.queued_bytes)
            self.high_water_count = max(self.high_water_count, len(self._slots))
            wake = idx == self.next_idx
            taken = None
            if wake and take and not self._loading and self._base is not None:
                taken = self._take_next()
                wake = False
        if wake:
            self._arrived.set()
        return taken

    # -- load thread ---------------------------------------------------------------------
    def start(self, base: int) -> None:
        """SWITCHOVER_START: the device's image is complete up to ``base``; from now on
        packets are placed after it."""
        with self._guard:
            self._base = base
            self._wake_claims(every=True)
        self._arrived.set()

    def get(self) -> QueuedBuffer | None:
        """The buffer with the next idx, waiting until it arrives, :meth:`start` was
        called and no receive thread is loading the one before; None once closed."""
        while True:
            with self._lock:
                if self._closed:
                    return None
                if (self._base is not None and not self._loading
                        and self.next_idx in self._slots):
                    return self._take_next()
            self._arrived.wait()

    def _take_next(self) -> QueuedBuffer:
        """(Lock held.)  Hand the next buffer to a loader, who loads alone until
        :meth:`done_with`."""
        buf = self._slots.pop(self.next_idx)
        self.next_idx += 1
        self._loading = True
        return buf

    def done_with(self, buf: QueuedBuffer, *, take_config: bool = False
                  ) -> QueuedBuffer | None:
        """``buf`` is loaded into the device: unqueue it and recycle its buffer, and
        wake the load thread when the next one is already waiting.

        With ``take_config``, a config packet waiting as the next one is returned
        instead (marked as being loaded, as by :meth:`get`): a receive thread that
        has just loaded the last data packet hands the config to the load task
        itself, rather than waking the load thread only for that (with 64 devices,
        64 threads wanting the GIL at the very end of the downtime)."""
        taken = None
        with self._lock:
            self.queued_bytes -= buf.size
            self._queued_charge -= _charge(buf.is_config, buf.size)
            self._claimed.pop(buf.idx, None)
            self._given.discard(buf.idx)
            self._loading = False
            nxt = self._slots.get(self.next_idx)
            wake = nxt is not None
            if wake and take_config and nxt.is_config and not self._closed:
                taken = self._take_next()
                wake = False
            room, self._room_waiters = self._room_waiters, []
        buf.release()
        if wake:
            self._arrived.set()
        for signal in room:  # they check the caps again
            signal.set()
        return taken

    def pause(self, seconds: float) -> bool:
        """Sleep like a slow device, waking early when closed; False once closed."""
        deadline = time.monotonic() + seconds
        # arrivals wake this wait too: sleep on until the deadline
        while not self._closed and (remaining := deadline - time.monotonic()) > 0:
            self._arrived.wait(remaining)
        return not self._closed

    def close(self) -> None:
        """Release every queued buffer and wake the load thread; later calls fail."""
        with self._guard:
            self._closed = True
            slots = list(self._slots.values())
            self._slots.clear()
            self.queued_bytes = 0
            self._queued_charge = 0
            self._inflight.clear()
            self._wake_claims(every=True)
            self._wakes.extend(self._room_waiters)
            self._room_waiters = []
        self._arrived.set()
        for buf in slots:
            buf.release()

    def _check_closed(self) -> None:
        if self._closed:
            raise SequenceError(f"device {self.device_id}: device-state packet after its "
                                "load was ended")
