"""Save side of a VFIO device: QEMU's VFIO ``SaveVMHandlers`` as coroutines.

One :class:`VfioSaveHandler` per device.  The orchestrator (``migration.py``) calls
them in QEMU's order and writes the section headers and footers; the handlers write
the section bodies (``VFIO_MIG_FLAG_*`` records) on the main channel, and in multifd
mode ``save_complete_precopy_thread`` moves the device's stop-copy data through the
multifd channels as device-state packets:

=================================  =============================  ==========================
handler                            non-multifd mode               multifd mode
=================================  =============================  ==========================
``save_setup`` (START)             SETUP, EOS; → PRE_COPY         same
``save_live_iterate`` (PART)       one pre-copy chunk, then       same
                                   INIT_DATA_SENT or EOS
``save_complete`` (END)            → STOP_COPY, all data, EOS     EOS only (dummy)
``save_complete_precopy_thread``   nothing                        → STOP_COPY, data packets,
                                                                  then the config packet
``save_state`` (FULL)              CONFIG_STATE, config, EOS      CONFIG_LOAD_READY or EOS
``save_cleanup``                   STOP_COPY → STOP               same
=================================  =============================  ==========================
"""

from __future__ import annotations

import asyncio
from typing import Any

from migrate_common.timeline import TIMELINE
from migrate_src.channels import MainChannel, MultifdSender
from protocol.control import VfioRecord
from protocol.errors import StateError
from protocol.multifd import DeviceStateHeader
from protocol.vfio import (
    MAX_DATA_BUFFER_SIZE,
    VFIO_STATE_PACKET_HEADER,
    VfioMigFlag,
    VfioPacketFlags,
    VfioStatePacketHeader,
    encode_config_blob,
)
from vm.vfio_sim import DeviceState, VfioSimDevice

__all__ = ["VfioSaveHandler"]

PRECOPY_STATES = (DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P)


class VfioSaveHandler:
    """Saves one VFIO device; ``multifd_transfer`` is decided once, at setup."""

    def __init__(self, device: VfioSimDevice, section_id: int, *, multifd_transfer: bool,
                 load_config_after_iter: bool, switchover_ack: bool, main: MainChannel,
                 log: Any, packet_size: int = MAX_DATA_BUFFER_SIZE) -> None:
        self.device = device
        self.section_id = section_id
        self.multifd_transfer = multifd_transfer
        self.load_config_after_iter = load_config_after_iter
        self.switchover_ack = switchover_ack
        self.main = main
        self.log = log.bind(device=device.id)
        self.transferred = 0          # QEMU's vfio.transferred share of this device
        self.precopy_bytes = 0
        self.stopcopy_bytes = 0
        self.packets = 0
        self.buffer_size = 1          # main channel: QEMU's read size
        self.packet_size = packet_size  # x-device-state-packet-size
        self.packet_data_size = 1     # multifd: data bytes per device-state packet
        self._init_data_sent = False
        self._precopy_done = False

    @property
    def idstr(self) -> str:
        return self.device.idstr

    @property
    def instance_id(self) -> int:
        return self.device.instance_id

    @property
    def version_id(self) -> int:
        return self.device.version_id

    # -- setup and live phase -----------------------------------------------------------
    async def save_setup(self) -> None:
        self.buffer_size = self.device.data_buffer_size
        self.packet_data_size = self.device.buffer_size(self.packet_size)
        await self.main.send(VfioRecord(VfioMigFlag.DEV_SETUP_STATE))
        await self.main.send(VfioRecord(VfioMigFlag.END_OF_STATE))
        if self.device.config.precopy_size > 0:
            await self.device.set_state(DeviceState.PRE_COPY)
        else:
            self._precopy_done = True

    def is_active_iterate(self) -> bool:
        return self.device.state in PRECOPY_STATES and not self._precopy_done

    def pending_precopy(self) -> int:
        if self.device.state not in PRECOPY_STATES:
            return 0
        initial, dirty = self.device.precopy_info()
        return initial + dirty

    def pending_exact(self) -> int:
        """Everything still to send: pre-copy bytes plus the stop-copy size."""
        return self.device.stop_copy_size()

    def needs_switchover_ack(self) -> bool:
        return self.switchover_ack and self.device.config.precopy_size > 0

    async def save_live_iterate(self) -> None:
        """Send one pre-copy chunk (at most the data buffer size) on the main channel."""
        chunk = await self.device.read(self.buffer_size)
        if len(chunk):
            await self.main.send(VfioRecord(VfioMigFlag.DEV_DATA_STATE, len(chunk)), chunk)
            self.transferred += len(chunk)
            self.precopy_bytes += len(chunk)
        initial, dirty = self.device.precopy_info()
        if not len(chunk) or initial + dirty == 0:
            self._precopy_done = True
        if self.needs_switchover_ack() and not self._init_data_sent and initial == 0:
            self._init_data_sent = True
            await self.main.send(VfioRecord(VfioMigFlag.DEV_INIT_DATA_SENT))
            return
        await self.main.send(VfioRecord(VfioMigFlag.END_OF_STATE))

    # -- switchover ---------------------------------------------------------------------
    async def on_vm_stop(self) -> None:
        """The VM-state callback: quiesce through the P2P state, then stop or stop-copy."""
        state = self.device.state
        if state in PRECOPY_STATES:
            await self.device.set_state(DeviceState.PRE_COPY_P2P)
            await self.device.set_state(DeviceState.STOP_COPY)
        elif state is DeviceState.RUNNING:
            await self.device.set_state(DeviceState.RUNNING_P2P)
            await self.device.set_state(DeviceState.STOP)

    async def _ensure_stop_copy(self) -> None:
        if self.device.state is not DeviceState.STOP_COPY:
            await self.device.set_state(DeviceState.STOP_COPY)

    async def save_complete(self) -> None:
        """END section body; in non-multifd mode all stop-copy data goes here, serially."""
        if not self.multifd_transfer:
            await self._ensure_stop_copy()
            while True:
                chunk = await self.device.read(self.buffer_size)
                if not len(chunk):
                    break
                await self.main.send(VfioRecord(VfioMigFlag.DEV_DATA_STATE, len(chunk)), chunk)
                self.transferred += len(chunk)
                self.stopcopy_bytes += len(chunk)
        await self.main.send(VfioRecord(VfioMigFlag.END_OF_STATE))

    async def save_complete_precopy_thread(self, sender: MultifdSender,
                                           abort: asyncio.Event) -> None:
        """Stream the stop-copy data as device-state packets, then the config packet."""
        if not self.multifd_transfer:
            return
        await self._ensure_stop_copy()
        idx = 0
        short = False
        while True:
            if abort.is_set():
                return
            chunk = await self.device.read(self.packet_data_size)
            if not len(chunk):
                break
            if short:  # the hello promised the destination uniform packets
                raise StateError(f"device {self.device.id}: read {len(chunk)} bytes after a "
                                 f"short read: data packets must hold "
                                 f"{self.packet_data_size} bytes but the last")
            short = len(chunk) < self.packet_data_size
            await self._queue_packet(sender, idx, 0, chunk)
            self.stopcopy_bytes += len(chunk)
            idx += 1
        blob = encode_config_blob(self.device.config_blob())
        await self._queue_packet(sender, idx, VfioPacketFlags.CONFIG_STATE, blob)
        self.log.debug("device state queued", packets=idx + 1, bytes=self.stopcopy_bytes)

    # One packet per job, unlike RAM's four: the destination places a packet in its
    # device once the headers of all lower idx have arrived, and packets sent back to
    # back on one channel deliver their headers a whole packet apart — with four per
    # job, 8 and 16 channels lost up to a third of their throughput waiting
    # (bench/results/full-5, docs/performance.md).
    async def _queue_packet(self, sender: MultifdSender, idx: int, flags: int,
                            data: bytes | memoryview) -> None:
        size = VFIO_STATE_PACKET_HEADER.size + len(data)
        header = (DeviceStateHeader(self.idstr, self.instance_id, size).encode()
                  + VfioStatePacketHeader(idx, flags).encode())
        # the device is stopped, so its data view stays valid until the channel sent it
        await sender.submit((header, data))
        TIMELINE.record("queued", self.idstr, idx)
        self.transferred += size
        self.packets += 1

    async def save_state(self) -> None:
        """FULL section body: the config space, or only a marker in multifd mode."""
        if self.multifd_transfer:
            marker = (VfioMigFlag.DEV_CONFIG_LOAD_READY if self.load_config_after_iter
                      else VfioMigFlag.END_OF_STATE)
            await self.main.send(VfioRecord(marker))
            return
        config = self.device.config_blob()
        await self.main.send(VfioRecord(VfioMigFlag.DEV_CONFIG_STATE, len(config)), config)
        self.transferred += len(config)
        await self.main.send(VfioRecord(VfioMigFlag.END_OF_STATE))

    async def save_cleanup(self, completed: bool) -> None:
        """After success leave the device stopped (STOP_COPY → STOP, outside downtime)."""
        if completed and self.device.state is DeviceState.STOP_COPY:
            await self.device.set_state(DeviceState.STOP)
