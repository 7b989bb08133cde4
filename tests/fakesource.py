"""A scripted source that speaks the wire protocol byte by byte, for tests.

Unlike ``migrate_src`` it does exactly what a test tells it, in the order it is told
— packets out of order across channels, or (for hostile-peer tests) things a real
source never does.  Everything is built with ``protocol``'s encoders.
"""

from __future__ import annotations

import asyncio
import random
import socket
import uuid
from dataclasses import dataclass, field

from migrate_common.net import Address, connect, recv_into, sendmsg_all
from migrate_common.settings import PARAMETER_DEFAULTS
from protocol.control import (
    SCHEMA_VERSION,
    Command,
    CommandType,
    ControlDecoder,
    ControlMessage,
    DeviceDescriptor,
    Eof,
    Hello,
    MessageReceived,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionStart,
    Shut,
    StreamClosed,
    VfioRecord,
    encode_message,
    encode_preamble,
)
from protocol.multifd import ChannelInit, DeviceStateHeader
from protocol.vfio import VfioMigFlag, VfioPacketFlags, VfioStatePacketHeader, encode_config_blob
from vm.properties import DeviceConfig
from vm.vfio_sim import DeviceState, VfioSimDevice

#: Guest bytes per RAM packet the fake announces (the destination's default)
RAM_PACKET_SIZE: int = PARAMETER_DEFAULTS["x-multifd-packet-size"]


@dataclass
class DevicePackets:
    config: DeviceConfig
    packets: list[tuple[int, int, bytes]]   # (idx, flags, vfio payload data)
    digest: str


async def device_packets(config: DeviceConfig, chunk: int) -> DevicePackets:
    """Read a source-role device completely, in ``chunk``-sized VFIO packets."""
    dev = VfioSimDevice(config, role="source")
    digest = await dev.digest_async()
    await dev.set_state(DeviceState.STOP_COPY)
    packets = []
    idx = 0
    while True:
        data = await dev.read(chunk)
        if not len(data):
            break
        packets.append((idx, 0, bytes(data)))
        idx += 1
    packets.append((idx, int(VfioPacketFlags.CONFIG_STATE),
                    encode_config_blob(dev.config_blob())))
    return DevicePackets(config, packets, digest)


def packet_bytes(idstr: str, idx: int, flags: int, data: bytes, instance_id: int = 0) -> bytes:
    payload = VfioStatePacketHeader(idx, flags).encode() + data
    return DeviceStateHeader(idstr, instance_id, len(payload)).encode() + payload


@dataclass
class FakeSource:
    address: Address
    channels: int
    vm_uuid: uuid.UUID = field(default_factory=lambda: uuid.UUID(int=0))
    main: socket.socket | None = None
    multifd: list[socket.socket] = field(default_factory=list)
    decoder: ControlDecoder = field(default_factory=lambda: ControlDecoder(
        expect_preamble=False))

    async def connect_all(self, ids: list[int] | None = None) -> None:
        self.main = await connect(self.address, 5, "fake main")
        for cid in (range(self.channels) if ids is None else ids):
            sock = await connect(self.address, 5, f"fake multifd {cid}")
            await sendmsg_all(sock, [ChannelInit(self.vm_uuid.bytes, cid).encode()])
            self.multifd.append(sock)
        await sendmsg_all(self.main, [encode_preamble()])

    async def send(self, message: ControlMessage, payload: bytes | None = None) -> None:
        assert self.main is not None
        await sendmsg_all(self.main, [encode_message(message), *([payload] if payload else [])])

    async def receive(self, timeout: float = 10.0) -> ControlMessage | None:
        """The next return-path message, or None at EOF."""
        assert self.main is not None
        async with asyncio.timeout(timeout):
            while True:
                if self._queued:
                    return self._queued.pop(0)
                n = await recv_into(self.main, self.decoder.buffer())
                events = self.decoder.eof() if n == 0 else self.decoder.advance(n)
                for event in events:
                    if isinstance(event, StreamClosed):
                        self._queued.append(None)
                    elif isinstance(event, MessageReceived):
                        self._queued.append(event.message)

    def __post_init__(self) -> None:
        self._queued: list[ControlMessage | None] = []

    def hello(self, devices: list[DeviceConfig], *, multifd: bool = True,
              return_path: bool = True) -> Hello:
        return Hello(
            protocol_version=SCHEMA_VERSION, migration_id=str(uuid.uuid4()),
            vm_uuid=str(self.vm_uuid),
            capabilities={"multifd": multifd, "return-path": return_path,
                          "switchover-ack": False, "validate-uuid": False},
            parameters={"multifd-channels": self.channels if multifd else 0,
                        "multifd-compression": "none",
                        "x-multifd-packet-size": RAM_PACKET_SIZE},
            devices=tuple(DeviceDescriptor(
                id=c.id, driver=c.driver, idstr=f"{c.id}/vfio", instance_id=0, version_id=1,
                multifd_transfer=multifd, load_config_after_iter=False,
                properties=c.properties()) for c in devices))

    async def setup_sections(self, devices: list[DeviceConfig]) -> None:
        await self.send(Command(CommandType.OPEN_RETURN_PATH))
        for sid, cfg in enumerate(devices, start=1):
            await self.send(SectionStart(sid, f"{cfg.id}/vfio", 0, 1))
            await self.send(VfioRecord(VfioMigFlag.DEV_SETUP_STATE))
            await self.send(VfioRecord(VfioMigFlag.END_OF_STATE))
            await self.send(SectionFooter(sid))

    async def end_sections(self, devices: list[DeviceConfig]) -> None:
        for sid, _ in enumerate(devices, start=1):
            await self.send(SectionEnd(sid))
            await self.send(VfioRecord(VfioMigFlag.END_OF_STATE))
            await self.send(SectionFooter(sid))

    async def full_sections(self, devices: list[DeviceConfig]) -> None:
        for sid, cfg in enumerate(devices, start=1):
            await self.send(SectionFull(sid, f"{cfg.id}/vfio", 0, 1))
            await self.send(VfioRecord(VfioMigFlag.END_OF_STATE))
            await self.send(SectionFooter(sid))

    async def send_packets(self, packets: list[tuple[int, bytes]]) -> None:
        """Send (channel, bytes) pairs strictly in the order given."""
        for cid, data in packets:
            await sendmsg_all(self.multifd[cid], [data])

    async def eof(self, digests: dict[str, str]) -> None:
        await self.send(Eof(digests=digests))

    def close(self) -> None:
        for sock in [self.main, *self.multifd]:
            if sock is not None:
                sock.close()


#: a hello parameter :func:`refused_hello` leaves out, as a source before it would
DROP = object()


async def refused_hello(uri: Address, parameters: dict[str, object],
                        devices: list[DeviceConfig] | None = None, channels: int = 2) -> Shut:
    """Send a hello with ``parameters`` changed (:data:`DROP` removes one) and return
    the destination's refusal."""
    fake = FakeSource(uri, channels=channels)
    try:
        await fake.connect_all()
        hello = fake.hello(devices or [])
        for name, value in parameters.items():
            if value is DROP:
                hello.parameters.pop(name, None)
            else:
                hello.parameters[name] = value
        await fake.send(hello)
        reply = await fake.receive()
        assert isinstance(reply, Shut) and not reply.ok, reply
        return reply
    finally:
        fake.close()


def shuffled_schedule(devices: list[DevicePackets], channels: int,
                      rng: random.Random) -> list[tuple[int, bytes]]:
    """Every packet of every device, in a random global order on random channels."""
    items = [(d.config.id, idx, flags, data) for d in devices for idx, flags, data in d.packets]
    rng.shuffle(items)
    return [(rng.randrange(channels), packet_bytes(f"{dev}/vfio", idx, flags, data))
            for dev, idx, flags, data in items]
