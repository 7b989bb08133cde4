"""Device-state packets that arrive out of order across channels still load in order.

A scripted source sends every packet of two devices in a random global order on
random channels; the destination must reassemble each device by idx, and the
digests it computes must equal the source device's.
"""

from __future__ import annotations

import random

import pytest

from migrate_common.net import parse_address
from tests.conftest import wait_status
from tests.fakesource import FakeSource, device_packets, refused_hello, shuffled_schedule
from protocol.control import Command, CommandType, HelloReply, Shut
from vm.properties import parse_device_option

DEVICES = ["vfio-sim,id=dev0,state-size=512K", "vfio-sim,id=dev1,state-size=300K,seed=7"]


@pytest.mark.parametrize("seed", range(6))
async def test_shuffled_packets_load_in_order(pair_factory, seed):
    configs = [parse_device_option(d) for d in DEVICES]
    rng = random.Random(seed)
    packets = [await device_packets(c, chunk=rng.choice([4096, 16384, 65536]))
               for c in configs]
    async with pair_factory(DEVICES) as pair:
        await pair.configure(multifd=True, channels=4, side="dst")
        fake = FakeSource(parse_address(await pair.uri()), channels=4)
        try:
            await fake.connect_all(ids=[3, 1, 0, 2])  # any connection order works
            await fake.send(fake.hello(configs))
            reply = await fake.receive()
            assert isinstance(reply, HelloReply) and reply.accepted, reply
            await fake.setup_sections(configs)
            await fake.send(Command(CommandType.SWITCHOVER_START))
            await fake.end_sections(configs)
            schedule = shuffled_schedule(packets, 4, rng)
            await fake.send_packets(schedule)
            await fake.full_sections(configs)
            await fake.eof({p.config.id: p.digest for p in packets})
            shut = await fake.receive()
            assert isinstance(shut, Shut), shut
            assert shut.ok, shut.error
            assert shut.digests == {p.config.id: p.digest for p in packets}
        finally:
            fake.close()
        info = await wait_status(pair.dst, "completed")
        # the reassembly really had to park early packets
        assert max(d["queued-high-water"] for d in info["x-devices"]) > 0
        assert (await pair.dst.execute("query-status"))["status"] == "running"


async def test_wrong_digest_never_starts_the_vm(pair_factory):
    configs = [parse_device_option(DEVICES[0])]
    packets = [await device_packets(configs[0], chunk=65536)]
    async with pair_factory(DEVICES[:1]) as pair:
        await pair.configure(multifd=True, channels=2, side="dst")
        fake = FakeSource(parse_address(await pair.uri()), channels=2)
        try:
            await fake.connect_all()
            await fake.send(fake.hello(configs))
            assert (await fake.receive()).accepted
            await fake.setup_sections(configs)
            await fake.send(Command(CommandType.SWITCHOVER_START))
            await fake.end_sections(configs)
            # swap two data packets' payloads: same idx order, wrong content
            p = packets[0].packets
            p[0], p[1] = (0, 0, p[1][2]), (1, 0, p[0][2])
            await fake.send_packets(shuffled_schedule(packets, 2, random.Random(1)))
            await fake.full_sections(configs)
            await fake.eof({"dev0": packets[0].digest})
            shut = await fake.receive()
            assert isinstance(shut, Shut) and not shut.ok
            assert "digest" in shut.error
        finally:
            fake.close()
        info = await wait_status(pair.dst, "failed")
        assert "does not match" in info["error-desc"]
        assert (await pair.dst.execute("query-status"))["status"] == "inmigrate"


async def test_source_stalling_in_switchover_times_out(pair_factory):
    configs = [parse_device_option(DEVICES[0])]
    async with pair_factory(DEVICES[:1]) as pair:
        await pair.configure(multifd=True, channels=2, side="dst",
                             extra_params={"x-switchover-timeout": 300})
        fake = FakeSource(parse_address(await pair.uri()), channels=2)
        try:
            await fake.connect_all()
            await fake.send(fake.hello(configs))
            assert (await fake.receive()).accepted
            await fake.setup_sections(configs)
            await fake.send(Command(CommandType.SWITCHOVER_START))
            # ... and then nothing: a stalled (or slow-loris) source
            shut = await fake.receive(timeout=10)
            assert isinstance(shut, Shut) and not shut.ok
            assert "x-switchover-timeout" in shut.error
        finally:
            fake.close()
        info = await wait_status(pair.dst, "failed")
        assert "did not finish the switchover" in info["error-desc"]


# -- a source that announces uniform packets (x-uniform-device-packets) -----------------

UNIFORM_DEVICES = ["vfio-sim,id=dev0,state-size=3M", "vfio-sim,id=dev1,state-size=2600K,seed=3"]


async def _uniform_session(pair_factory, chunk: int, seed: int, *, uniform: bool = True,
                           packet_size: int | None = None) -> tuple[Shut, dict]:
    """A scripted source announcing uniform packets (unless ``uniform`` is False) sends
    two devices' packets of ``chunk`` bytes (uniform when it is their packet data size:
    1 MiB, or the ``packet_size`` it announces) in a shuffled order on 4 channels; the
    destination's Shut and query-migrate."""
    configs = [parse_device_option(d) for d in UNIFORM_DEVICES]
    packets = [await device_packets(c, chunk=chunk) for c in configs]
    async with pair_factory(UNIFORM_DEVICES) as pair:
        await pair.configure(multifd=True, channels=4, side="dst")
        fake = FakeSource(parse_address(await pair.uri()), channels=4)
        try:
            await fake.connect_all()
            hello = fake.hello(configs)
            hello.parameters["x-uniform-device-packets"] = uniform
            if packet_size is not None:
                hello.parameters["x-device-state-packet-size"] = packet_size
            await fake.send(hello)
            assert (await fake.receive()).accepted
            await fake.setup_sections(configs)
            await fake.send(Command(CommandType.SWITCHOVER_START))
            await fake.end_sections(configs)
            await fake.send_packets(shuffled_schedule(packets, 4, random.Random(seed)))
            await fake.full_sections(configs)
            await fake.eof({p.config.id: p.digest for p in packets})
            shut = await fake.receive()
            assert isinstance(shut, Shut), shut
        finally:
            fake.close()
        info = await wait_status(pair.dst, "completed" if shut.ok else "failed")
    return shut, info


@pytest.mark.parametrize("seed", range(3))
async def test_uniform_packets_in_any_order_are_placed_and_load(pair_factory, seed):
    shut, info = await _uniform_session(pair_factory, 1 << 20, seed)
    assert shut.ok, shut.error
    # every data packet went straight into its device, wherever it came in the order
    assert [d["in-place-packets"] for d in info["x-devices"]] == [3, 3]


@pytest.mark.parametrize("uniform", [True, False])
async def test_packets_of_the_announced_size_load(pair_factory, uniform):
    # 2 MiB packets, more than QEMU's 1 MiB, from a source that announced them
    shut, info = await _uniform_session(pair_factory, 2 << 20, 1, uniform=uniform,
                                        packet_size=2 << 20)
    assert shut.ok, shut.error
    assert [d["in-place-packets"] for d in info["x-devices"]] == [2, 2]


async def test_a_broken_promise_of_uniform_packets_fails_the_migration(pair_factory):
    shut, info = await _uniform_session(pair_factory, 65536, 0)
    assert not shut.ok
    assert "x-uniform-device-packets" in info["error-desc"]
    assert "65536 of 1048576 bytes" in info["error-desc"] or "which was short" in \
        info["error-desc"]


async def test_x_uniform_device_packets_from_a_source_must_be_boolean(pair_factory):
    configs = [parse_device_option(UNIFORM_DEVICES[0])]
    async with pair_factory(UNIFORM_DEVICES[:1]) as pair:
        await pair.configure(multifd=True, channels=2, side="dst")
        reply = await refused_hello(parse_address(await pair.uri()),
                                    {"x-uniform-device-packets": "yes"}, configs)
        assert reply.code == "protocol-error"
        assert "x-uniform-device-packets must be a boolean, got 'yes'" in reply.error
        await wait_status(pair.dst, "failed")
