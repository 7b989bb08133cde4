"""Load side of a VFIO device: QEMU's VFIO load handlers, and the per-device load task.

=======================  ===========================================================
handler                  role
=======================  ===========================================================
``load_setup``           check the mode agrees with the source; device → RESUMING;
                         in multifd mode create the :class:`Reassembly`
``load_state``           one main-channel record of a VFIO section body (§2.10):
                         SETUP, pre-copy DATA, INIT_DATA_SENT, CONFIG (non-multifd),
                         CONFIG_LOAD_READY (interlock), EOS
``switchover_start``     multifd mode: start the load task
``load_state_buffer``    a device-state packet from any multifd channel → reassembly;
                         the receive thread loads it itself when it is next in order
                         (and hands the config to the load task when it is next)
load thread, load task   write the other buffers strictly by idx into the device,
                         then the config (after CONFIG_LOAD_READY when the interlock
                         is on)
``load_cleanup``         stop the load task, free queued buffers
=======================  ===========================================================
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable
from typing import Any

from migrate_dst.reassembly import QueuedBuffer, Reassembly
from migrate_common.funnel import Funnel
from migrate_common.timeline import TIMELINE
from protocol.control import VfioRecord
from protocol.errors import DeviceError, LimitExceededError, SequenceError
from protocol.vfio import (
    MAX_DATA_BUFFER_SIZE,
    VfioMigFlag,
    VfioStatePacketHeader,
    decode_config_blob,
    decode_state_packet,
)
from vm.vfio_sim import DeviceState, VfioSimDevice

__all__ = ["VfioLoadHandler", "SectionKind"]


def _settle(future: asyncio.Future[QueuedBuffer], outcome: QueuedBuffer | BaseException
            ) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class SectionKind(enum.Enum):
    START = "start"
    PART = "part"
    END = "end"
    FULL = "full"


class VfioLoadHandler:
    def __init__(self, device: VfioSimDevice, *, multifd_transfer: bool,
                 load_config_after_iter: bool, switchover_ack: bool, funnel: Funnel,
                 log: Any, on_ack: Callable[[], None], uniform_packets: bool = False,
                 packet_size: int = MAX_DATA_BUFFER_SIZE) -> None:
        self.device = device
        self.multifd_transfer = multifd_transfer
        # the source promised that every data packet but the last holds exactly the
        # device's packet data size (x-uniform-device-packets): see Reassembly
        self.uniform_packets = uniform_packets
        # the most data a device-state packet may carry: the source's announced
        # x-device-state-packet-size, which the hello check kept within ours
        self.packet_size = packet_size
        self.load_config_after_iter = load_config_after_iter
        self.switchover_ack = switchover_ack
        self.funnel = funnel
        self.log = log.bind(device=device.id)
        self._on_ack = on_ack
        self.reassembly: Reassembly | None = None
        self.load_task: asyncio.Task[None] | None = None
        self._load_thread: threading.Thread | None = None
        self._config: asyncio.Future[QueuedBuffer] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._config_load_ready = asyncio.Event()
        self._config_loaded = False
        self._init_data_seen = False
        self.bytes_loaded = 0
        self.loaded_at: float | None = None

    @property
    def idstr(self) -> str:
        return self.device.idstr

    @property
    def version_id(self) -> int:
        return self.device.version_id

    def switchover_ack_needed(self) -> bool:
        return self.switchover_ack and self.device.config.precopy_size > 0

    async def load_setup(self) -> None:
        await self.device.set_state(DeviceState.RESUMING)
        if self.multifd_transfer:
            cfg = self.device.config
            self.reassembly = Reassembly(
                self.device.id, max_count=cfg.max_queued_buffers,
                max_bytes=cfg.max_queued_buffers_size,
                capacity=cfg.precopy_size + cfg.state_size, target=self.device.resume_target,
                uniform_size=(self.device.buffer_size(self.packet_size)
                              if self.uniform_packets else None))
            # The load thread starts now and waits for SWITCHOVER_START inside the
            # reassembly: starting 64 threads when the VM is already stopped cost
            # milliseconds of downtime each on a busy machine.
            loop = self._loop = asyncio.get_running_loop()
            self._config = loop.create_future()
            self._load_thread = threading.Thread(
                target=self._load_data,
                name=f"vfio-load-{self.device.id}", daemon=True)
            self._load_thread.start()

    # -- main channel -------------------------------------------------------------------
    async def load_state(self, kind: SectionKind, record: VfioRecord,
                         payload: memoryview | None) -> bool:
        """Apply one record of a section body; True when the body is complete."""
        if not isinstance(record, VfioRecord):
            raise SequenceError(f"device {self.device.id}: {type(record).__name__} record in "
                                "a VFIO section")
        marker = record.marker
        dev = self.device.id
        if marker is VfioMigFlag.END_OF_STATE:
            return True
        if marker is VfioMigFlag.DEV_SETUP_STATE:
            if kind is not SectionKind.START:
                raise SequenceError(f"device {dev}: SETUP marker outside the START section")
            return False
        if marker in (VfioMigFlag.DEV_DATA_STATE, VfioMigFlag.DEV_CONFIG_STATE) and \
                not payload:
            raise SequenceError(f"device {dev}: {marker.name} record without data")
        if marker is VfioMigFlag.DEV_DATA_STATE:
            assert payload is not None
            if self.multifd_transfer and kind is not SectionKind.PART:
                raise SequenceError(f"device {dev}: stop-copy data on the main channel but "
                                    "the device transfers its state over multifd")
            await self.device.write(payload)
            self.bytes_loaded += len(payload)
            return False
        if marker is VfioMigFlag.DEV_INIT_DATA_SENT:
            if not self.switchover_ack_needed():
                raise SequenceError(f"device {dev}: INIT_DATA_SENT but switchover-ack is not "
                                    "in use for this device")
            if not self._init_data_seen:
                self._init_data_seen = True
                self._on_ack()
            return True
        if marker is VfioMigFlag.DEV_CONFIG_STATE:
            if self.multifd_transfer:
                raise SequenceError(f"device {dev}: got DEV_CONFIG_STATE in main migration "
                                    "channel but doing multifd transfer")
            assert payload is not None
            self.device.load_config(payload)
            self._config_loaded = True
            return False  # the EOS that follows ends the body
        if marker is VfioMigFlag.DEV_CONFIG_LOAD_READY:
            if not self.multifd_transfer or not self.load_config_after_iter:
                raise SequenceError(f"device {dev}: CONFIG_LOAD_READY but the "
                                    "load-config-after-iter interlock is off here")
            if self._config_load_ready.is_set():
                raise SequenceError(f"device {dev}: duplicate CONFIG_LOAD_READY")
            self._config_load_ready.set()
            return True
        raise SequenceError(f"device {dev}: unknown VFIO marker {marker!r}")

    # -- multifd ------------------------------------------------------------------------
    def claim(self, prefix: memoryview, payload_size: int) -> memoryview | None:
        """A device-state packet's VFIO header arrived (receive thread): where its data
        goes in the device, or None to receive it into a buffer."""
        header = VfioStatePacketHeader.decode(prefix)
        size = self._data_size(header, payload_size - len(prefix))
        return self._reassembly().claim(header.idx, header.is_config, size)

    def load_state_buffer(self, payload: memoryview, release: Callable[[], None]) -> None:
        """A device-state packet for this device arrived in a buffer on some multifd
        channel (receive thread).  ``release`` gives the buffer back: it is called
        exactly once, when the packet is loaded or when it is refused."""
        try:
            header, data = decode_state_packet(payload, max_data=self.packet_size)
        except BaseException:
            release()
            raise
        self._put(header, len(data), data, release)

    def load_state_placed(self, prefix: memoryview, payload_size: int) -> None:
        """A device-state packet whose data went where :meth:`claim` said (receive
        thread); ``prefix`` is its VFIO header."""
        header = VfioStatePacketHeader.decode(prefix)
        size = self._data_size(header, payload_size - len(prefix))
        self._put(header, size, None)

    def _put(self, header: VfioStatePacketHeader, size: int, data: memoryview | None,
             release: Callable[[], None] | None = None) -> None:
        """Hand a packet to the reassembly (receive thread), and load it here and now
        when it is the next one and no thread is loading: measured, that beats waking
        the load thread for it (docs/performance.md, session 7).  A device that paces
        its writes (``write-bandwidth``) is always loaded by its load thread, which
        may sleep."""
        try:
            reassembly = self._reassembly()
            buf = reassembly.put(header.idx, header.is_config, size, data, release,
                                 take=self.device.config.write_bandwidth == 0)
        except BaseException:
            if release is not None:  # refused: put() keeps nothing when it raises
                release()
            raise
        while buf is not None:  # done_with() below gives the buffer back
            if buf.is_config:
                self._to_load_task(buf)
                return
            try:
                # the delay is 0 here (unpaced device), unless write-bandwidth was set
                # between the check above and this load: one packet then goes unpaced
                self._load(buf)
            except BaseException:
                reassembly.done_with(buf)
                raise
            buf = reassembly.done_with(buf, take_config=True)

    def _to_load_task(self, outcome: QueuedBuffer | BaseException) -> None:
        """(A loading thread.)  The config buffer, in its turn, or the load's error:
        to the load task, which loads the config or raises the error."""
        assert self._loop is not None and self._config is not None
        try:
            self._loop.call_soon_threadsafe(_settle, self._config, outcome)
        except RuntimeError:  # the loop is gone: so is the migration
            if isinstance(outcome, QueuedBuffer):
                self._reassembly().done_with(outcome)

    def _load(self, buf: QueuedBuffer) -> float:
        """Write one data buffer into the device (by whichever thread loads it); the
        seconds the device's write pacing asks to wait."""
        offset = self.device.write_offset if buf.offset is None else buf.offset
        started = time.monotonic_ns()
        delay = self.device.commit(offset, buf.size, buf.data)
        TIMELINE.record("loaded", self.device.id, started, buf.size)
        self.bytes_loaded += buf.size
        return delay

    def _reassembly(self) -> Reassembly:
        if self.reassembly is None:
            raise SequenceError(f"device {self.device.id}: got device state packet but not "
                                "doing multifd transfer")
        return self.reassembly

    def _data_size(self, header: VfioStatePacketHeader, size: int) -> int:
        limit = self.packet_size
        if not header.is_config and size > limit:
            raise LimitExceededError(
                f"VFIO device-state packet idx {header.idx}: {size} bytes of data exceed "
                f"the limit of {limit} (x-device-state-packet-size)", limit=limit, value=size)
        return size

    async def switchover_start(self) -> None:
        if self.multifd_transfer and self.load_task is None:
            assert self.reassembly is not None
            # the image holds the pre-copy data now: the stop-copy data follows it
            self.reassembly.start(self.device.write_offset)
            self.load_task = self.funnel.spawn(self._load_task(), f"load-{self.device.id}")

    async def _load_task(self) -> None:
        """Wait for the load thread to load every data buffer, then load the config
        (after CONFIG_LOAD_READY when the interlock is on)."""
        assert self.reassembly is not None and self._config is not None
        reassembly = self.reassembly
        config = self._config
        try:
            buf = await config
        finally:
            if not config.done():  # cancelled: stop the thread (it may be sleeping)
                reassembly.close()
        try:
            if self.load_config_after_iter:
                await self._config_load_ready.wait()
            assert buf.data is not None
            self.device.load_config(decode_config_blob(buf.data))
            self._config_loaded = True
        finally:
            reassembly.done_with(buf)
        self.loaded_at = time.monotonic()
        self.log.debug("device loaded", bytes=self.bytes_loaded,
                       in_place=reassembly.in_place_packets, packets=reassembly.packets,
                       queued_high_water=reassembly.high_water_bytes)

    def _load_data(self) -> None:
        """The load thread: from SWITCHOVER_START on, write the data buffers strictly by
        idx into the device, then hand the config buffer to the load task."""
        assert self.reassembly is not None
        reassembly = self.reassembly
        outcome: QueuedBuffer | BaseException | None = None
        try:
            while True:
                buf = reassembly.get()
                if buf is None:  # closed: the migration is over
                    return
                if buf.is_config:
                    outcome = buf
                    return
                try:
                    delay = self._load(buf)
                finally:
                    reassembly.done_with(buf)
                if delay > 0 and not reassembly.pause(delay):
                    return
        except BaseException as exc:  # raised by the load task, into the funnel
            outcome = exc
        finally:
            if outcome is not None:
                self._to_load_task(outcome)

    async def wait_loaded(self) -> None:
        """After EOF: the device must be fully loaded (joins the load task)."""
        if self.multifd_transfer:
            if self.load_task is None:
                raise SequenceError(f"device {self.device.id}: end of stream without "
                                    "SWITCHOVER_START")
            await self.load_task
        if not self._config_loaded:
            raise DeviceError(f"device {self.device.id}: end of stream but its config "
                              "was never received")

    def load_cleanup(self) -> None:
        if self.load_task is not None and not self.load_task.done():
            self.load_task.cancel()
        if self.reassembly is not None:
            self.reassembly.close()
        if self._load_thread is not None:
            # it ends at its next buffer; the one it is loading takes a millisecond
            self._load_thread.join(timeout=5)
            self._load_thread = None
        if self._config is not None and self._config.done() and not self._config.cancelled():
            self._config.exception()  # the funnel has the error already; mark it seen

    def stats(self) -> dict[str, Any]:
        r = self.reassembly
        return {"id": self.device.id, "mode": "multifd" if self.multifd_transfer else "main",
                "state": self.device.state.name.lower().replace("_", "-"),
                "loaded": self.bytes_loaded,
                "queued-bytes": r.queued_bytes if r else 0,
                "queued-high-water": r.high_water_bytes if r else 0,
                "packets": r.packets if r else 0,
                "in-place-packets": r.in_place_packets if r else 0}
