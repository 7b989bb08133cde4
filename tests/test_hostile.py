"""A hostile source against a real destination process.

Every case gets the protocol wrong on purpose.  For each one: the destination
reports a clear error in ``query-migrate``'s ``error-desc``, stays up with bounded
memory, never starts its VM, and then completes a good migration from a scripted
source that does everything right.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from migrate_common.net import Address, connect, parse_address, sendmsg_all
from migrate_ctl.pair import DaemonProcess, start_daemon
from protocol.control import (
    Command,
    CommandType,
    Eof,
    HelloReply,
    SectionPart,
    Shut,
    VfioRecord,
    encode_preamble,
)
from protocol.vfio import VfioMigFlag
from protocol.multifd import ChannelInit, DeviceStateHeader
from tests.fakesource import FakeSource, device_packets, packet_bytes, shuffled_schedule
from vm.properties import parse_device_option

pytestmark = pytest.mark.e2e

DEVICE = "vfio-sim,id=dev0,state-size=2M"
CONFIG = parse_device_option(DEVICE)
CHANNELS = 2
RSS_LIMIT = 160 << 20          # the daemon idles at ~50 MiB with this small VM


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def raw(addr: Address, data: bytes, *, close: bool = True) -> socket.socket:
    sock = await connect(addr, 5, "hostile")
    await sendmsg_all(sock, [data])
    if close:
        sock.close()
    return sock


async def fake_after_hello(addr: Address, **parameters: object) -> FakeSource:
    """A fake source past the hello (``parameters``: hello parameters to set) and
    SWITCHOVER_START."""
    fake = FakeSource(addr, channels=CHANNELS)
    await fake.connect_all()
    hello = fake.hello([CONFIG])
    hello.parameters.update(parameters)
    await fake.send(hello)
    reply = await fake.receive()
    assert isinstance(reply, HelloReply) and reply.accepted, reply
    await fake.setup_sections([CONFIG])
    await fake.send(Command(CommandType.SWITCHOVER_START))
    return fake


async def good_migration(addr: Address) -> Shut:
    packets = [await device_packets(CONFIG, chunk=65536)]
    fake = await fake_after_hello(addr)
    try:
        await fake.end_sections([CONFIG])
        await fake.send_packets(shuffled_schedule(packets, CHANNELS, random.Random(3)))
        await fake.full_sections([CONFIG])
        await fake.eof({"dev0": packets[0].digest})
        shut = await fake.receive()
        assert isinstance(shut, Shut)
        return shut
    finally:
        fake.close()


def device_packet(idx: int, data: bytes = b"x" * 100, flags: int = 0,
                  idstr: str = "dev0/vfio") -> bytes:
    return packet_bytes(idstr, idx, flags, data)


Case = Callable[[Address], Awaitable[None]]


async def bad_magic(addr: Address) -> None:
    await raw(addr, b"GET / HTTP/1.1\r\n\r\n")


async def qemu_main_stream(addr: Address) -> None:
    await raw(addr, bytes.fromhex("5145564d00000003"))


async def bad_multifd_version(addr: Address) -> None:
    init = bytearray(ChannelInit(bytes(16), 0).encode())
    init[4:8] = struct.pack(">I", 7)
    await raw(addr, bytes(init))


async def bad_main_version(addr: Address) -> None:
    await raw(addr, encode_preamble()[:4] + struct.pack(">I", 99))


async def wrong_uuid(addr: Address) -> None:
    await raw(addr, ChannelInit(b"\x01" * 16, 0).encode())


async def duplicate_channel(addr: Address) -> None:
    s1 = await raw(addr, ChannelInit(bytes(16), 0).encode(), close=False)
    await raw(addr, ChannelInit(bytes(16), 0).encode())
    await asyncio.sleep(0.2)
    s1.close()


async def channel_out_of_range(addr: Address) -> None:
    await raw(addr, ChannelInit(bytes(16), CHANNELS).encode())


async def too_few_channels_then_silence(addr: Address) -> None:
    fake = FakeSource(addr, channels=CHANNELS)
    await fake.connect_all(ids=[0])
    await asyncio.sleep(1.5)            # x-connect-timeout is 1 s in these tests
    fake.close()


async def slow_loris(addr: Address) -> None:
    sock = await connect(addr, 5, "slow")
    for byte in ChannelInit(bytes(16), 0).encode()[:5]:
        await sendmsg_all(sock, [bytes([byte])])
        await asyncio.sleep(0.3)
    sock.close()


def during_switchover(*packets: tuple[int, bytes], **parameters: object) -> Case:
    async def case(addr: Address) -> None:
        fake = await fake_after_hello(addr, **parameters)
        try:
            await fake.send_packets(list(packets))
            await fake.receive(timeout=10)       # the SHUT with the error
        finally:
            fake.close()
    return case


def header_only(next_packet_size: int) -> bytes:
    hdr = bytearray(DeviceStateHeader("dev0/vfio", 0, 100).encode())
    hdr[272:276] = struct.pack(">I", next_packet_size)
    return bytes(hdr)


def idstr_without_nul() -> bytes:
    hdr = bytearray(DeviceStateHeader("dev0/vfio", 0, 100).encode())
    hdr[12:268] = b"A" * 256
    return bytes(hdr) + b"x" * 100


def idx_invalid() -> bytes:
    # our encoder refuses to write it, so build it by hand
    payload = struct.pack(">III", 0, 0xFFFFFFFF, 0) + b"x" * 100
    return DeviceStateHeader("dev0/vfio", 0, len(payload)).encode() + payload


async def truncated_packet(addr: Address) -> None:
    fake = await fake_after_hello(addr)
    try:
        await fake.send_packets([(0, device_packet(0)[:200])])
        fake.multifd[0].close()                  # the channel ends mid-packet
        await fake.receive(timeout=10)
    finally:
        fake.close()


async def garbage_msgpack(addr: Address) -> None:
    sock = await connect(addr, 5, "main")
    await sendmsg_all(sock, [encode_preamble(), struct.pack(">I", 5), b"\xc1\xc1\xc1\xc1\xc1"])
    for cid in range(CHANNELS):
        await raw(addr, ChannelInit(bytes(16), cid).encode(), close=False)
    await asyncio.sleep(0.5)
    sock.close()


async def oversized_msgpack(addr: Address) -> None:
    sock = await connect(addr, 5, "main")
    for cid in range(CHANNELS):
        await raw(addr, ChannelInit(bytes(16), cid).encode(), close=False)
    await sendmsg_all(sock, [encode_preamble(), struct.pack(">I", 0xFFFFFFF0)])
    await asyncio.sleep(0.5)
    sock.close()


async def config_never_comes(addr: Address) -> None:
    fake = await fake_after_hello(addr)
    try:
        await fake.send_packets([(0, device_packet(0, b"y" * 4096))])
        await fake.end_sections([CONFIG])
        await fake.full_sections([CONFIG])
        await fake.send(Eof({"dev0": "00"}))
        await fake.receive(timeout=10)
    finally:
        fake.close()


async def data_after_config(addr: Address) -> None:
    packets = [await device_packets(CONFIG, chunk=1 << 20)]
    fake = await fake_after_hello(addr)
    try:
        await fake.send_packets(shuffled_schedule(packets, CHANNELS, random.Random(1)))
        last = packets[0].packets[-1][0]
        await fake.send_packets([(1, device_packet(last + 1))])
        await fake.receive(timeout=10)
    finally:
        fake.close()


async def data_record_without_data(addr: Address) -> None:
    fake = await fake_after_hello(addr)
    try:
        await fake.send(SectionPart(1))
        await fake.send(VfioRecord(VfioMigFlag.DEV_DATA_STATE))
        await fake.receive(timeout=10)
    finally:
        fake.close()


async def no_hello(addr: Address) -> None:
    fake = FakeSource(addr, channels=CHANNELS)
    await fake.connect_all()
    await asyncio.sleep(1.5)             # all channels there, but never a hello
    fake.close()


def oversized_vfio_chunk() -> bytes:
    return device_packet(0, b"z" * ((1 << 20) + 1))


async def tiny_packet_flood(addr: Address) -> None:
    """1-byte data packets that never come in order (idx 0 is never sent): without
    caps, only the device's size bounds how many wait."""
    fake = await fake_after_hello(addr)
    try:
        batch = 64
        for start in range(1, 3000, batch):
            await fake.send_packets([(i % CHANNELS, device_packet(i, b"t"))
                                     for i in range(start, start + batch)])
        await fake.receive(timeout=10)
    except OSError:  # the destination gave up and closed the channels: expected
        pass
    finally:
        fake.close()


CASES: dict[str, tuple[Case, str]] = {
    "bad-magic": (bad_magic, "unknown channel magic"),
    "qemu-main-stream": (qemu_main_stream, "QEVM"),
    "bad-multifd-version": (bad_multifd_version, "version"),
    "bad-main-version": (bad_main_version, "version"),
    "wrong-uuid": (wrong_uuid, "UUID"),
    "duplicate-channel": (duplicate_channel, "already set up"),
    "channel-id-out-of-range": (channel_out_of_range, "out of range"),
    "too-few-channels": (too_few_channels_then_silence, "only 1 of 2 multifd channels"),
    "slow-loris-handshake": (slow_loris, "no complete handshake"),
    "oversized-next-packet-size": (during_switchover((0, header_only(1 << 30))), "limit"),
    "empty-payload": (during_switchover((0, header_only(0))), "empty"),
    "idstr-without-nul": (during_switchover((0, idstr_without_nul())), "NUL"),
    "unknown-device": (during_switchover((0, device_packet(0, idstr="nope/vfio"))),
                       "unknown device"),
    "idx-invalid": (during_switchover((0, idx_invalid())), "idx"),
    "duplicate-idx": (during_switchover((0, device_packet(1)), (1, device_packet(1))),
                      "received twice"),
    "huge-idx-gap": (during_switchover((0, device_packet(0xFFFFFFF0))),
                     "x-switchover-timeout"),
    "config-never-comes": (config_never_comes, "x-switchover-timeout"),
    "truncated-packet": (truncated_packet, "truncated"),
    "garbage-msgpack": (garbage_msgpack, "msgpack"),
    "oversized-msgpack": (oversized_msgpack, "length 4294967280 outside 1..1048576"),
    "data-after-config": (data_after_config, "after the config packet"),
    "data-record-without-data": (data_record_without_data, "without data"),
    "no-hello": (no_hello, "sent no hello"),
    "vfio-chunk-over-1MiB": (during_switchover((0, oversized_vfio_chunk())), "1048576"),
    # the limit is the packet size the source announced, not the destination's own
    # larger one (4 MiB by default)
    "vfio-chunk-over-announced-size": (
        during_switchover((0, device_packet(0, b"z" * (512 * 1024 + 1))),
                          **{"x-device-state-packet-size": 512 * 1024}),
        "524289 bytes of data exceed the limit of 524288"),
    "tiny-packet-flood": (tiny_packet_flood, "waiting for their turn"),
}


@pytest.fixture
async def dst(tmp_path: Path):
    daemon = await start_daemon("dst", tmp_path, [
        "--device", DEVICE, "--incoming", "tcp:127.0.0.1:0",
        "--capability", "multifd=on", "--capability", "return-path=on",
        "--parameter", f"multifd-channels={CHANNELS}",
        "--parameter", "x-connect-timeout=1000", "--parameter", "x-switchover-timeout=1500"])
    yield daemon
    await daemon.stop()


async def wait_attempt(daemon: DaemonProcess, attempts: int, timeout: float = 10) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await daemon.execute("query-migrate")
        if info.get("x-attempts", 0) >= attempts and info["status"] in ("failed", "completed"):
            return info
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"destination still {info}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("name", list(CASES))
async def test_hostile_source(dst: DaemonProcess, name: str) -> None:
    case, expected = CASES[name]
    info = await dst.execute("query-migrate")
    addr = parse_address(f"tcp:127.0.0.1:{info['socket-address'][0]['port']}")
    try:
        await case(addr)
    except (OSError, TimeoutError, AssertionError) as exc:
        if isinstance(exc, AssertionError):
            raise
        # the destination may close on us first; what it reports is what counts
    info = await wait_attempt(dst, 1)
    assert info["status"] == "failed", info
    assert expected.lower() in info["error-desc"].lower(), info["error-desc"]
    assert dst.proc.returncode is None
    assert (await dst.execute("query-status"))["status"] == "inmigrate"
    peak = rss(dst.proc.pid)
    if os.environ.get("MIGRATE_TEST_REPORT"):       # collect the worst RSS for the notes
        with open(os.environ["MIGRATE_TEST_REPORT"], "a") as report:
            report.write(f"hostile {name} peak-rss {peak}\n")
    assert peak < RSS_LIMIT
    # ...and the same destination completes the next, good migration
    shut = await good_migration(addr)
    assert shut.ok, shut.error
    info = await wait_attempt(dst, 2)
    assert info["status"] == "completed"
    assert (await dst.execute("query-status"))["status"] == "running"
