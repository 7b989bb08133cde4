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
from tests.fakesource import FakeSource, device_packets, shuffled_schedule
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
