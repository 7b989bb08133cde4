"""The simulated VFIO migration device (``vfio-sim``), identical on both ends.

This module is responsible for behaving like a VFIO variant driver implementing
the kernel's migration uAPI v2 (``linux/vfio.h``, spec §5), close enough that
the daemons can drive it exactly the way QEMU's ``hw/vfio/migration.c`` drives
real hardware:

* the device state machine -- :class:`DeviceState`, the kernel's direct arcs
  (:data:`DIRECT_ARCS`) and its rule for combination transitions
  (:func:`transition_path`), with every state entered recorded in
  :attr:`VfioSimDevice.history`;
* the save data session (source): ``read()`` in PRE_COPY/PRE_COPY_P2P returns
  the pre-copy "initial bytes", in STOP_COPY everything that is left, an empty
  read ends the data (QEMU's ENOMSG / EOF cases); ``stop_copy_size()`` and
  ``precopy_info()`` stand in for ``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`` and
  ``VFIO_MIG_GET_PRECOPY_INFO``;
* the resume data session (destination): ``write()`` and ``load_config()`` in
  RESUMING, validated when the device leaves RESUMING (RESUMING -> STOP), which
  is where a real driver rejects a truncated or oversized image;
* the *content*: a deterministic byte stream per device (from its seed) plus a
  config-space blob, and an xxh3-128 :meth:`~VfioSimDevice.digest` over both, so
  the end-to-end tests can prove that every byte arrived, in order, exactly once.

What the device does *not* model: dirty pages (``dirty_bytes`` is always 0, so
the content never changes and the source digest can be cached) and real DMA.
Time is injectable (``clock``/``sleep``) so bandwidth pacing and stop-copy
latency can be tested with a fake clock.
"""

from __future__ import annotations

import array
import asyncio
import mmap
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from enum import IntEnum, IntFlag
from typing import Final, Literal

import xxhash

from protocol.errors import ConfigError, DeviceError, StateError
from vm.memory import allocate_anonymous, copy_into, prefault
from vm.properties import MiB, DeviceConfig

__all__ = [
    "DeviceState",
    "MigrationFeature",
    "ALL_FEATURES",
    "DIRECT_ARCS",
    "SAVING_STATES",
    "PRE_COPY_STATES",
    "PAGE_SIZE",
    "MAX_DATA_BUFFER_SIZE",
    "Role",
    "Clock",
    "Sleep",
    "TransitionCallback",
    "state_supported",
    "transition_path",
    "generate_stream",
    "generate_config_blob",
    "VfioSimDevice",
]


class DeviceState(IntEnum):
    """``enum vfio_device_mig_state`` -- values are the kernel's."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigrationFeature(IntFlag):
    """``VFIO_MIGRATION_*`` flags reported by ``VFIO_DEVICE_FEATURE_MIGRATION``."""

    STOP_COPY = 1 << 0  # mandatory: STOP, STOP_COPY, RESUMING
    P2P = 1 << 1  # RUNNING_P2P (and PRE_COPY_P2P together with PRE_COPY)
    PRE_COPY = 1 << 2  # PRE_COPY (and PRE_COPY_P2P together with P2P)


ALL_FEATURES: Final = MigrationFeature.STOP_COPY | MigrationFeature.P2P | MigrationFeature.PRE_COPY

_S = DeviceState

#: The arcs a driver implements directly (``linux/vfio.h``, spec §5.1).  Every
#: other transition is a combination of these, chosen by :func:`transition_path`.
DIRECT_ARCS: Final[frozenset[tuple[DeviceState, DeviceState]]] = frozenset(
    {
        (_S.RUNNING_P2P, _S.STOP),
        (_S.STOP_COPY, _S.STOP),  # ends the save session
        (_S.RESUMING, _S.STOP),  # ends the resume session; the device validates the data
        (_S.PRE_COPY, _S.RUNNING),
        (_S.RUNNING_P2P, _S.RUNNING),
        (_S.PRE_COPY_P2P, _S.RUNNING_P2P),
        (_S.RUNNING, _S.RUNNING_P2P),
        (_S.STOP, _S.RUNNING_P2P),
        (_S.RUNNING, _S.PRE_COPY),  # opens a save session
        (_S.RUNNING_P2P, _S.PRE_COPY_P2P),  # opens a save session
        (_S.STOP, _S.STOP_COPY),  # opens a save session
        (_S.PRE_COPY, _S.PRE_COPY_P2P),
        (_S.PRE_COPY_P2P, _S.PRE_COPY),
        (_S.PRE_COPY_P2P, _S.STOP_COPY),
        (_S.STOP, _S.RESUMING),  # opens a resume session
    }
)

#: The "saving group": these three share one save data session (one data FD).
SAVING_STATES: Final = frozenset({_S.PRE_COPY, _S.PRE_COPY_P2P, _S.STOP_COPY})
PRE_COPY_STATES: Final = frozenset({_S.PRE_COPY, _S.PRE_COPY_P2P})

# Feature flags a state needs (the kernel's state_flags_table).
_STATE_NEEDS: Final[dict[DeviceState, MigrationFeature]] = {
    _S.STOP: MigrationFeature.STOP_COPY,
    _S.RUNNING: MigrationFeature.STOP_COPY,
    _S.STOP_COPY: MigrationFeature.STOP_COPY,
    _S.RESUMING: MigrationFeature.STOP_COPY,
    _S.RUNNING_P2P: MigrationFeature.STOP_COPY | MigrationFeature.P2P,
    _S.PRE_COPY: MigrationFeature.STOP_COPY | MigrationFeature.PRE_COPY,
    _S.PRE_COPY_P2P: ALL_FEATURES,
}


def state_supported(state: DeviceState, features: MigrationFeature) -> bool:
    """Whether a device with ``features`` has ``state`` (ERROR is never requestable)."""
    needs = _STATE_NEEDS.get(state)
    return needs is not None and needs & features == needs


def _path_allowed(path: tuple[DeviceState, ...]) -> bool:
    """The kernel's constraints on a combination path (``vfio_mig_get_next_state``).

    * A saving-group state may be an *intermediate* only while the path is still
      inside the session it started in (PRE_COPY -> PRE_COPY_P2P -> STOP_COPY keeps
      one data stream); entering the group at an intermediate would open a
      session nobody reads.
    * A path that starts in a session and leaves it never enters the group
      again: that would silently start a new stream.  This is what blocks
      STOP_COPY -> PRE_COPY / PRE_COPY_P2P -- a drained stop-copy stream cannot
      turn back into pre-copy.
    """
    starts_in_session = path[0] in SAVING_STATES
    still_in_session = starts_in_session
    last = len(path) - 1
    for i, state in enumerate(path[1:], start=1):
        if state not in SAVING_STATES:
            still_in_session = False
        elif still_in_session:
            continue  # same session, same data stream
        elif starts_in_session:
            return False  # left the session, would open a new one
        elif i != last:
            return False  # would open a session at an intermediate state
    return True


def _best_full_path(cur: DeviceState, new: DeviceState) -> tuple[DeviceState, ...] | None:
    """Shortest allowed path cur -> new over DIRECT_ARCS with every optional state present.

    Among equally short paths the one with fewer saving-group intermediates wins
    (PRE_COPY -> RUNNING -> RUNNING_P2P rather than via PRE_COPY_P2P), which is the
    kernel's table; tests compare all 64 pairs against a copy of that table.
    """
    best: tuple[DeviceState, ...] | None = None
    best_key: tuple[int, int, tuple[int, ...]] | None = None

    def visit(path: tuple[DeviceState, ...]) -> None:
        nonlocal best, best_key
        if path[-1] == new:
            if _path_allowed(path):
                interior_saving = sum(1 for s in path[1:-1] if s in SAVING_STATES)
                key = (len(path), interior_saving, tuple(int(s) for s in path))
                if best_key is None or key < best_key:
                    best, best_key = path, key
            return
        for src, dst in DIRECT_ARCS:
            if src == path[-1] and dst not in path:
                visit(path + (dst,))

    visit((cur,))
    return best


# The graph has 7 states: precompute every pair once at import.
_FULL_PATHS: Final[dict[tuple[DeviceState, DeviceState], tuple[DeviceState, ...] | None]] = {
    (a, b): _best_full_path(a, b)
    for a in DeviceState
    for b in DeviceState
    if a != b and a is not DeviceState.ERROR and b is not DeviceState.ERROR
}


def transition_path(
    cur: DeviceState, new: DeviceState, features: MigrationFeature = ALL_FEATURES
) -> list[DeviceState]:
    """The states a device passes through (excluding ``cur``, ending at ``new``).

    Implements the kernel rule: the shortest combination of direct arcs that
    does not pass through a saving-group state (except to continue the session
    it started in).  Optional states the device lacks are skipped, exactly like
    the kernel's loop does: a device without P2P goes RUNNING -> STOP directly.
    ``cur == new`` is a no-op (``[]``).  Raises ``DeviceError("illegal arc X -> Y")``
    when nothing is reachable: ERROR as source or target, a target the device
    does not support, STOP_COPY -> PRE_COPY*.
    """
    cur, new = DeviceState(cur), DeviceState(new)
    if cur == new:
        return []
    if not state_supported(cur, features) or not state_supported(new, features):
        raise DeviceError(f"illegal arc {cur.name} -> {new.name}")
    full = _FULL_PATHS.get((cur, new))
    if full is None:
        raise DeviceError(f"illegal arc {cur.name} -> {new.name}")
    return [s for s in full[1:] if state_supported(s, features)]


# -- content ---------------------------------------------------------------------

PAGE_SIZE: Final = 4096
#: QEMU sizes its read buffer as min(1 MiB, stop_copy_length).
MAX_DATA_BUFFER_SIZE: Final = 1 * MiB
_TILE_SIZE: Final = 1 * MiB
# Above this, allocation/generation runs in a worker thread so the event loop
# keeps serving channels and QMP (page-faulting 1 GiB takes ~0.7 s here).
_OFFLOAD_THRESHOLD: Final = 8 * MiB


def _allocate(capacity: int) -> mmap.mmap | bytearray:
    """Zeroed, untouched memory of ``capacity`` bytes (see :mod:`vm.memory`)."""
    if capacity == 0:
        return bytearray()
    return allocate_anonymous(capacity)


def generate_stream(size: int, seed: int) -> memoryview:
    """The deterministic migratable state of a device: ``size`` bytes from ``seed``.

    Generating 1 GiB from a PRNG byte by byte would take minutes in Python, and
    ``randbytes(1 GiB)`` alone is several seconds; so one 1 MiB random block is
    generated and *tiled* (memcpy speed), then every 4 KiB page gets its page
    number and the seed stamped into its first 16 bytes (little-endian u64 each).
    The stamps make every page distinct -- tiling alone would repeat each 1 MiB,
    so a swapped or duplicated chunk would go unnoticed by the digest.  The
    stamping is two strided memoryview assignments, not a Python loop over pages.
    Cost is dominated by page faults: ~0.7 s per GiB on the reference machine.

    Returns a writable view of exactly ``size`` bytes (the backing buffer is
    rounded up to whole pages).
    """
    capacity = -(-size // PAGE_SIZE) * PAGE_SIZE
    buf = _allocate(capacity)
    if capacity == 0:
        return memoryview(buf)
    view = memoryview(buf)
    block = random.Random(seed).randbytes(min(_TILE_SIZE, capacity))
    for offset in range(0, capacity, len(block)):
        n = min(len(block), capacity - offset)
        view[offset : offset + n] = block[:n] if n < len(block) else block
    pages = capacity // PAGE_SIZE
    words_per_page = PAGE_SIZE // 8
    page_numbers = array.array("Q", range(pages))
    seeds = array.array("Q", [seed]) * pages
    if sys.byteorder == "big":  # the content must not depend on the host
        page_numbers.byteswap()
        seeds.byteswap()
    words = view.cast("Q")
    words[0::words_per_page] = page_numbers
    words[1::words_per_page] = seeds
    words.release()
    return view[:size]


def generate_config_blob(size: int, seed: int) -> bytes:
    """The device's config-space blob: ``size`` bytes from ``seed`` (independent of the stream)."""
    return random.Random(f"vfio-sim-config:{seed}").randbytes(size)


# -- pacing ------------------------------------------------------------------------

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class _Pacer:
    """Token-bucket style rate limiter with an empty bucket (a.k.a. GCRA).

    Each transfer of ``n`` bytes occupies ``n / rate`` seconds of a virtual
    timeline; the caller sleeps until its transfer would have completed.  No
    credit accumulates while idle, so the average rate never exceeds ``rate``
    over any window starting at the first transfer -- the simulated device can
    be slower than its link, never faster.  With a fake clock that only moves
    inside ``sleep``, the total slept time is exactly ``bytes / rate``.
    """

    __slots__ = ("rate", "_clock", "_sleep", "_free_at")

    def __init__(self, rate: int, clock: Clock, sleep: Sleep) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._free_at = float("-inf")

    def reserve(self, nbytes: int) -> float:
        """Book ``nbytes`` on the timeline; the seconds to wait before going on."""
        if self.rate <= 0 or nbytes <= 0:
            return 0.0
        now = self._clock()
        self._free_at = max(now, self._free_at) + nbytes / self.rate
        return max(0.0, self._free_at - now)

    async def pace(self, nbytes: int) -> None:
        delay = self.reserve(nbytes)
        if delay > 0:
            await self._sleep(delay)


# -- the device --------------------------------------------------------------------

Role = Literal["source", "destination"]
TransitionCallback = Callable[["VfioSimDevice", DeviceState, DeviceState], None]


class VfioSimDevice:
    """One simulated VFIO device (one ``--device``) on the source or the destination.

    State: starts RUNNING; :meth:`set_state` walks :func:`transition_path` arc by
    arc, appending each state entered to :attr:`history` and calling
    ``on_transition(device, old, new)`` per arc.  :meth:`reset` recovers from
    anything (including ERROR) to RUNNING, like ``VFIO_DEVICE_RESET``.

    Memory: the source holds its whole stream in memory (generated on first use
    -- opening a save session, :meth:`prepare`, or :meth:`digest`); reads hand
    out zero-copy views of it.  The destination allocates a buffer of the same
    capacity and pre-faults it on :meth:`prepare` or when the first resume
    session opens (writing into never-touched memory is ~10x slower than into
    faulted memory here, and that cost would otherwise land in the downtime),
    then keeps it for later sessions.
    """

    #: ``SaveStateEntry`` instance id; one entry per device, like QEMU's vfio.
    instance_id: Final = 0
    #: ``SaveStateEntry`` version id of the vfio section.
    version_id: Final = 1

    def __init__(
        self,
        config: DeviceConfig,
        *,
        role: Role,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        if role not in ("source", "destination"):
            raise ConfigError(f"device role must be 'source' or 'destination', not {role!r}")
        self._config = config
        self.role: Role = role
        self._clock = clock
        self._sleep = sleep
        self.on_transition = on_transition
        self._state = DeviceState.RUNNING
        #: every state entered, in order, starting with the initial RUNNING
        self.history: list[DeviceState] = [DeviceState.RUNNING]
        # Bumped on every state change: a set_state() that awaited (latency,
        # buffer preparation) checks it to notice a concurrent reset().
        self._epoch = 0
        # Serialises set_state() calls like the kernel's per-device state mutex.
        self._state_lock = asyncio.Lock()
        # Content generation/allocation may run in a worker thread.
        self._content_lock = threading.Lock()
        #: cumulative payload bytes read (source) / written (destination)
        self.bytes_read = 0
        self.bytes_written = 0
        self._reset_content()
        self._read_pacer = _Pacer(config.read_bandwidth, clock, sleep)
        self._write_pacer = _Pacer(config.write_bandwidth, clock, sleep)

    def _reset_content(self) -> None:
        # save side
        self._stream: memoryview | None = None
        self._config_blob: bytes | None = None
        self._source_digest: str | None = None
        self._save_open = False
        self._read_pos = 0
        # load side
        self._resume_buf: memoryview | None = None
        self._resume_open = False
        self._write_pos = 0
        self._hasher: xxhash.xxh3_128 | None = None
        self._loaded_config: bytes | None = None
        self._loaded_digest: str | None = None

    # -- identity and configuration ----------------------------------------------

    @property
    def id(self) -> str:
        return self._config.id

    @property
    def idstr(self) -> str:
        """The ``SaveStateEntry`` idstr: ``"<id>/vfio"``."""
        return f"{self._config.id}/vfio"

    @property
    def config(self) -> DeviceConfig:
        return self._config

    @property
    def features(self) -> MigrationFeature:
        """STOP_COPY | P2P, plus PRE_COPY when the device has pre-copy initial bytes."""
        features = MigrationFeature.STOP_COPY | MigrationFeature.P2P
        if self._config.precopy_size > 0:
            features |= MigrationFeature.PRE_COPY
        return features

    @property
    def state(self) -> DeviceState:
        return self._state

    @property
    def total_size(self) -> int:
        """Bytes in the data stream: pre-copy part + stop-copy part."""
        return self._config.total_size

    @property
    def save_session_open(self) -> bool:
        return self._save_open

    @property
    def resume_session_open(self) -> bool:
        return self._resume_open

    @property
    def read_offset(self) -> int:
        """Position of the read cursor in the open save session (0 when none is open)."""
        return self._read_pos

    @property
    def write_offset(self) -> int:
        """Position of the write cursor in the open (or last) resume session."""
        return self._write_pos

    def set_config(self, config: DeviceConfig) -> None:
        """Replace the configuration (``qom-set``).

        Properties that only steer the migration (bandwidths, latency,
        ``x-migration-*``) can change at any time; like QEMU they are sampled when
        a migration sets up.  Properties that define the content (sizes, seed)
        can change only while no save or resume session is open, and discard
        the generated content / loaded state.
        """
        if config.id != self._config.id or config.driver != self._config.driver:
            raise ConfigError(
                f"device {self.id!r}: set_config() cannot change id or driver "
                f"(got {config.driver},id={config.id})"
            )
        old = self._config
        content_changed = (
            old.state_size != config.state_size
            or old.precopy_size != config.precopy_size
            or old.config_size != config.config_size
            or old.seed != config.seed
        )
        if content_changed:
            if self._save_open or self._resume_open:
                raise StateError(
                    f"device {self.id!r}: cannot change size or seed properties while a "
                    f"migration session is open (state {self._state.name})",
                    state=self._state.name,
                )
            self._reset_content()
        self._config = config
        if old.read_bandwidth != config.read_bandwidth:
            self._read_pacer = _Pacer(config.read_bandwidth, self._clock, self._sleep)
        if old.write_bandwidth != config.write_bandwidth:
            self._write_pacer = _Pacer(config.write_bandwidth, self._clock, self._sleep)

    # -- state machine -------------------------------------------------------------

    async def set_state(self, new: DeviceState) -> None:
        """Move to ``new`` along the kernel's path, one recorded arc at a time.

        Entering STOP_COPY first awaits ``sleep(stop_copy_latency)`` (the device
        quiescing); if the task is cancelled there, the device stays where it
        was.  Leaving RESUMING validates the loaded image; on failure the device
        enters ERROR and :class:`DeviceError` is raised.
        """
        new = DeviceState(new)
        async with self._state_lock:
            try:
                path = transition_path(self._state, new, self.features)
            except DeviceError as exc:
                raise DeviceError(f"device {self.id}: {exc}") from None
            for step in path:
                await self._step(step)

    async def _step(self, nxt: DeviceState) -> None:
        cur = self._state
        epoch = self._epoch
        # --- slow, awaitable part: nothing observable changes here ---
        if nxt is DeviceState.STOP_COPY and self._config.stop_copy_latency > 0:
            await self._sleep(self._config.stop_copy_latency)
        opens_save = nxt in SAVING_STATES and cur not in SAVING_STATES
        # prepared devices skip the trip through a worker thread: entering STOP_COPY
        # is inside the downtime, and the hop cost ~0.5 ms per device there
        if opens_save and self.role == "source" and self._stream is None:
            await self._run_maybe_offloaded(self._ensure_stream)
        if (nxt is DeviceState.RESUMING and self.role == "destination"
                and self._resume_buf is None):
            await self._run_maybe_offloaded(self._ensure_resume_buffer)
        if self._epoch != epoch:
            raise DeviceError(
                f"device {self.id}: state changed to {self._state.name} while entering "
                f"{nxt.name}; transition abandoned"
            )
        # --- the arc itself: synchronous, so it is atomic for other tasks ---
        if cur is DeviceState.RESUMING:
            problem = self._resume_problem()
            self._resume_open = False
            if problem is not None:
                self._hasher = None
                self._enter(DeviceState.ERROR)
                raise DeviceError(f"device {self.id}: resume data rejected: {problem}")
            assert self._hasher is not None and self._loaded_config is not None
            final = self._hasher.copy()
            final.update(self._loaded_config)
            self._loaded_digest = final.hexdigest()
            self._hasher = None
        if opens_save:
            self._save_open = True
            self._read_pos = 0
        elif cur in SAVING_STATES and nxt not in SAVING_STATES:
            self._save_open = False
            self._read_pos = 0
        if nxt is DeviceState.RESUMING:
            self._resume_open = True
            self._write_pos = 0
            self._hasher = xxhash.xxh3_128()
            self._loaded_config = None
            self._loaded_digest = None
        self._enter(nxt)

    def _enter(self, nxt: DeviceState) -> None:
        old = self._state
        self._state = nxt
        self._epoch += 1
        self.history.append(nxt)
        if self.on_transition is not None:
            self.on_transition(self, old, nxt)

    def _resume_problem(self) -> str | None:
        expected = self.total_size
        if self._write_pos != expected:
            return f"received {self._write_pos} of {expected} bytes of device state"
        if self._loaded_config is None:
            return "the config space was never loaded"
        return None

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: from any state (ERROR included) back to RUNNING.

        Open sessions are dropped without validation, and a destination forgets
        what it had loaded.  Recorded in :attr:`history` like any other entry.
        """
        self._save_open = False
        self._read_pos = 0
        self._resume_open = False
        self._hasher = None
        self._loaded_config = None
        self._loaded_digest = None
        self._enter(DeviceState.RUNNING)

    # -- content management ------------------------------------------------------

    async def _run_maybe_offloaded(self, fn: Callable[[], object]) -> None:
        if self.total_size > _OFFLOAD_THRESHOLD:
            await asyncio.to_thread(fn)
        else:
            fn()

    def _ensure_stream(self) -> memoryview:
        stream = self._stream
        if stream is None:
            with self._content_lock:
                stream = self._stream
                if stream is None:
                    stream = generate_stream(self.total_size, self._config.seed)
                    self._stream = stream
        return stream

    def _ensure_resume_buffer(self) -> memoryview:
        buf = self._resume_buf
        if buf is None:
            with self._content_lock:
                buf = self._resume_buf
                if buf is None:
                    capacity = self.total_size
                    raw = _allocate(-(-capacity // PAGE_SIZE) * PAGE_SIZE)
                    buf = memoryview(raw)
                    # fault every page in now, so the copies during the migration
                    # never take a page fault
                    if isinstance(raw, mmap.mmap):
                        prefault(raw, buf)
                    buf = buf[:capacity]
                    self._resume_buf = buf
        return buf

    async def prepare(self) -> None:
        """Generate the source content / pre-fault the destination buffer, off the loop.

        Optional: everything is also done lazily.  Daemons call it at startup so
        the first migration does not pay for page faults.
        """
        if self.role == "source":
            await asyncio.to_thread(self._ensure_stream)
            await asyncio.to_thread(self.config_blob)
        else:
            await asyncio.to_thread(self._ensure_resume_buffer)

    # -- save side (source) ------------------------------------------------------------

    def _require_role(self, role: Role, what: str) -> None:
        if self.role != role:
            raise DeviceError(f"device {self.id}: {what} is not available on a {self.role} device")

    @property
    def data_buffer_size(self) -> int:
        """QEMU's read buffer size: ``min(1 MiB, stop_copy_length)``, at least 1."""
        return self.buffer_size(MAX_DATA_BUFFER_SIZE)

    def buffer_size(self, limit: int) -> int:
        """The read size for pieces of at most ``limit`` bytes: ``min(limit,
        stop_copy_length)``, at least 1 (multifd device-state packets use
        ``x-device-state-packet-size`` as the limit)."""
        return max(1, min(limit, self.total_size))

    def stop_copy_size(self) -> int:
        """``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``: bytes still to read in stop-copy.

        Total minus what the open save session already read; the whole stream
        when no session is open (the next one starts from the beginning).
        """
        consumed = self._read_pos if self._save_open else 0
        return self.total_size - consumed

    def precopy_info(self) -> tuple[int, int]:
        """``VFIO_MIG_GET_PRECOPY_INFO``: ``(initial_bytes, dirty_bytes)``.

        ``initial_bytes`` is what remains of the pre-copy part of the stream
        (for the open save session, or all of it when none is open);
        ``dirty_bytes`` is always 0 in this model.  The kernel answers only in
        PRE_COPY states; this model answers anywhere, which is harmless.
        """
        consumed = self._read_pos if self._save_open else 0
        return max(0, self._config.precopy_size - consumed), 0

    async def read(self, max_bytes: int) -> memoryview:
        """Read the next chunk (at most ``max_bytes``) of the save data stream.

        In PRE_COPY / PRE_COPY_P2P: the rest of the pre-copy part; an empty view
        means the initial bytes are exhausted for now (the kernel's ENOMSG).
        In STOP_COPY: the rest of the whole stream; an empty view is the end.

        Zero-copy: the result is a read-only view into the device's memory.  It
        stays valid as long as the device is stopped (a running device could
        dirty it; in this model content never changes, so it stays valid).
        Read bandwidth is paced with the injected clock/sleep.
        """
        self._require_role("source", "read()")
        state = self._state
        if state in PRE_COPY_STATES:
            limit = self._config.precopy_size
        elif state is DeviceState.STOP_COPY:
            limit = self.total_size
        else:
            raise DeviceError(
                f"device {self.id}: read() in state {state.name}; only allowed in "
                "PRE_COPY, PRE_COPY_P2P or STOP_COPY"
            )
        if max_bytes <= 0:
            raise DeviceError(f"device {self.id}: read() size must be positive, got {max_bytes}")
        stream = self._ensure_stream()
        start = self._read_pos
        n = max(0, min(max_bytes, limit - start))
        chunk = stream[start : start + n].toreadonly()
        self._read_pos = start + n
        self.bytes_read += n
        await self._read_pacer.pace(n)
        return chunk

    def config_blob(self) -> bytes:
        """The device config space (the config vmstate's payload).

        On a destination that has loaded a config, the loaded one; otherwise
        the device's own, generated from its seed.
        """
        if self._loaded_config is not None:
            return self._loaded_config
        blob = self._config_blob
        if blob is None:
            blob = generate_config_blob(self._config.config_size, self._config.seed)
            self._config_blob = blob
        return blob

    # -- load side (destination) ---------------------------------------------------

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the resume image (only in RESUMING).

        The bytes are copied into the pre-faulted buffer and fed to the
        incremental digest.  Writing past ``precopy_size + state_size`` is an
        overrun: nothing is written and :class:`DeviceError` is raised.
        """
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        delay = self.commit(self._write_pos, view.nbytes, view)
        if delay > 0:
            await self._sleep(delay)

    def resume_target(self, offset: int, size: int) -> memoryview | None:
        """A writable view of ``[offset, offset + size)`` of the resume image, where a
        receiver may put data before :meth:`commit` appends it; None when that range
        is not ahead of the write cursor inside the image, or no session is open."""
        if (self.role != "destination" or self._state is not DeviceState.RESUMING
                or size <= 0 or offset < self._write_pos or offset + size > self.total_size):
            return None
        return self._ensure_resume_buffer()[offset : offset + size]

    def commit(self, offset: int, size: int, data: memoryview | None = None) -> float:
        """Append ``size`` bytes at the write cursor ``offset`` (only in RESUMING).

        ``data`` is copied in (without holding the GIL); None means the bytes were
        already put there through :meth:`resume_target`.  Either way they are fed to
        the incremental digest (xxhash also releases the GIL), so this is what a
        load thread calls.  Returns the seconds the caller must wait to keep the
        device's ``write-bandwidth``.  One writer at a time.
        """
        self._require_role("destination", "write()")
        if self._state is not DeviceState.RESUMING:
            raise DeviceError(
                f"device {self.id}: write() in state {self._state.name}; only allowed in RESUMING"
            )
        start = self._write_pos
        if offset != start:
            raise DeviceError(f"device {self.id}: write at offset {offset} but the resume "
                              f"image is filled up to {start}")
        if start + size > self.total_size:
            raise DeviceError(
                f"device {self.id}: resume data overrun: {start} + {size} bytes exceeds the "
                f"device's {self.total_size} bytes of state"
            )
        if size <= 0:
            return 0.0
        hasher = self._hasher
        assert hasher is not None
        target = self._ensure_resume_buffer()[start : start + size]
        if data is not None:
            if len(data) != size:
                raise DeviceError(f"device {self.id}: write of {len(data)} bytes announced "
                                  f"as {size}")
            copy_into(target, data)
        hasher.update(target)
        self._write_pos = start + size
        self.bytes_written += size
        return self._write_pacer.reserve(size)

    def load_config(self, blob: bytes | bytearray | memoryview) -> None:
        """Load the config space (only in RESUMING, exactly ``config_size`` bytes, once)."""
        self._require_role("destination", "load_config()")
        if self._state is not DeviceState.RESUMING:
            raise DeviceError(
                f"device {self.id}: load_config() in state {self._state.name}; "
                "only allowed in RESUMING"
            )
        if self._loaded_config is not None:
            raise DeviceError(f"device {self.id}: config space loaded twice")
        data = bytes(blob)
        if len(data) != self._config.config_size:
            raise DeviceError(
                f"device {self.id}: config blob is {len(data)} bytes, "
                f"expected config-size {self._config.config_size}"
            )
        self._loaded_config = data

    # -- verification ------------------------------------------------------------------

    def _compute_source_digest(self) -> str:
        digest = self._source_digest
        if digest is None:
            hasher = xxhash.xxh3_128()
            hasher.update(self._ensure_stream())
            hasher.update(self.config_blob())
            digest = hasher.hexdigest()
            self._source_digest = digest
        return digest

    def digest(self) -> str:
        """Hex xxh3-128 over (stream || config space).

        Source: over its content (cached: it never changes in this model).
        Destination: over what was written plus the loaded config, available
        only after a resume session completed successfully (else
        :class:`StateError`).  Equal content gives equal digests on both ends.
        """
        if self.role == "source":
            return self._compute_source_digest()
        if self._loaded_digest is None:
            raise StateError(
                f"device {self.id}: no completed resume session, digest unavailable",
                state=self._state.name,
            )
        return self._loaded_digest

    async def digest_async(self) -> str:
        """:meth:`digest`, hashing (and generating) in a worker thread when not cached."""
        if self.role == "source" and self._source_digest is None:
            return await asyncio.to_thread(self._compute_source_digest)
        return self.digest()

    def __repr__(self) -> str:
        return (
            f"<VfioSimDevice {self.id} role={self.role} state={self._state.name} "
            f"size={self.total_size}>"
        )
