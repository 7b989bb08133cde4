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
``load_state_buffer``    a device-state packet from any multifd channel → reassembly
load task                writes buffers strictly by idx into the device, then the
                         config (after CONFIG_LOAD_READY when the interlock is on)
``load_cleanup``         stop the load task, free queued buffers
=======================  ===========================================================
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from typing import Any

from migrate_dst.reassembly import Reassembly
from migrate_common.funnel import Funnel
from protocol.control import VfioRecord
from protocol.errors import DeviceError, SequenceError
from protocol.vfio import VfioMigFlag, decode_config_blob, decode_state_packet
from vm.vfio_sim import DeviceState, VfioSimDevice

__all__ = ["VfioLoadHandler", "SectionKind"]


class SectionKind(enum.Enum):
    START = "start"
    PART = "part"
    END = "end"
    FULL = "full"


class VfioLoadHandler:
    def __init__(self, device: VfioSimDevice, *, multifd_transfer: bool,
                 load_config_after_iter: bool, switchover_ack: bool, funnel: Funnel,
                 log: Any, on_ack: Callable[[], None]) -> None:
        self.device = device
        self.multifd_transfer = multifd_transfer
        self.load_config_after_iter = load_config_after_iter
        self.switchover_ack = switchover_ack
        self.funnel = funnel
        self.log = log.bind(device=device.id)
        self._on_ack = on_ack
        self.reassembly: Reassembly | None = None
        self.load_task: asyncio.Task[None] | None = None
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
                capacity=cfg.precopy_size + cfg.state_size)

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
    def load_state_buffer(self, payload: memoryview, release: Callable[[], None]) -> None:
        """A device-state packet for this device arrived on some multifd channel."""
        if self.reassembly is None:
            raise SequenceError(f"device {self.device.id}: got device state packet but not "
                                "doing multifd transfer")
        header, data = decode_state_packet(payload)
        self.reassembly.put(header.idx, header.is_config, data, release)

    async def switchover_start(self) -> None:
        if self.multifd_transfer and self.load_task is None:
            self.load_task = self.funnel.spawn(self._load_task(), f"load-{self.device.id}")

    async def _load_task(self) -> None:
        """Write buffers strictly in idx order, then load the config."""
        assert self.reassembly is not None
        reassembly = self.reassembly
        while True:
            buf = await reassembly.get()
            if buf.is_config:
                break
            try:
                await self.device.write(buf.data)
                self.bytes_loaded += len(buf.data)
            finally:
                reassembly.done_with(buf)
        try:
            if self.load_config_after_iter:
                await self._config_load_ready.wait()
            self.device.load_config(decode_config_blob(buf.data))
            self._config_loaded = True
        finally:
            reassembly.done_with(buf)
        self.loaded_at = time.monotonic()
        self.log.debug("device loaded", bytes=self.bytes_loaded,
                       queued_high_water=reassembly.high_water_bytes)

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
            self.reassembly.clear()

    def stats(self) -> dict[str, Any]:
        r = self.reassembly
        return {"id": self.device.id, "mode": "multifd" if self.multifd_transfer else "main",
                "state": self.device.state.name.lower().replace("_", "-"),
                "loaded": self.bytes_loaded,
                "queued-bytes": r.queued_bytes if r else 0,
                "queued-high-water": r.high_water_bytes if r else 0,
                "packets": r.packets if r else 0}
