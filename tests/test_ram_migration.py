"""Guest RAM over multifd: rounds, sync, zero pages, convergence, and bad RAM input."""

from __future__ import annotations

import asyncio
import random

import pytest

from migrate_common.net import parse_address
from protocol.control import (
    Command,
    CommandType,
    HelloReply,
    RamEos,
    RamFlush,
    RamSetup,
    SectionFooter,
    SectionPart,
    SectionStart,
    Shut,
)
from protocol.multifd import RamPacket, ram_page_count
from tests.conftest import wait_final, wait_status
from tests.fakesource import DROP, RAM_PACKET_SIZE, FakeSource, refused_hello
from vm.ram import GuestRam

DEV = ["vfio-sim,id=dev0,state-size=2M"]
FAST = {"max-bandwidth": 0, "downtime-limit": 300}


@pytest.mark.parametrize("seed", range(5))
async def test_live_workload_ram_matches(pair_factory, seed):
    """A guest dirtying RAM throughout: the destination ends with exactly the RAM the
    source had when it stopped, so no page rewritten between rounds was lost."""
    pattern = ["random", "sequential", "hotspot"][seed % 3]
    async with pair_factory(DEV, memory=f"24M,fill=mixed,seed={seed}",
                            workload=f"dirty-rate=60M,pattern={pattern},seed={seed}") as pair:
        # a bandwidth cap makes several rounds happen while the guest writes
        await pair.configure(multifd=True, channels=[1, 2, 4, 8, 3][seed],
                             extra_params={"max-bandwidth": 200 << 20, "downtime-limit": 100})
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")
        assert info["ram"]["dirty-sync-count"] >= 2
        src, dst = await pair.digests()
        assert src[":ram"] is not None and src == dst
        assert info["x-digests-verified"]


@pytest.mark.parametrize("multifd,zpd", [(True, "multifd"), (True, "legacy"), (True, "none"),
                                         (False, "multifd"), (False, "legacy"),
                                         (False, "none")])
async def test_zero_page_modes(pair_factory, multifd, zpd):
    async with pair_factory(DEV, memory="8M,fill=mixed,seed=5") as pair:
        await pair.configure(multifd=multifd, channels=2,
                             extra_params={**FAST, "zero-page-detection": zpd})
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")
        src, dst = await pair.digests()
        assert src == dst
        ram = info["ram"]
        pages = 8 * 1024 * 1024 // 4096
        assert ram["normal"] + ram["duplicate"] >= pages
        if zpd == "none":
            assert ram["duplicate"] == 0
        else:
            assert ram["duplicate"] > pages // 4


async def test_zero_pages_are_never_sent_as_data(pair_factory):
    async with pair_factory(DEV, memory="64M") as pair:       # fresh RAM: all zero
        await pair.configure(multifd=True, channels=4, extra_params=FAST)
        info = await pair.migrate()
        assert info["status"] == "completed"
        assert info["ram"]["normal"] == 0
        assert info["ram"]["duplicate"] == 64 * 1024 * 1024 // 4096
        ram_wire = info["ram"]["multifd-bytes"] - info["vfio"]["transferred"]
        assert ram_wire < 1 << 20          # offsets only: ~1.3 KiB per 128 pages


async def test_workload_continues_on_destination(pair_factory):
    async with pair_factory([], memory="8M", workload="dirty-rate=20M,seed=1",
                            dst_workload="dirty-rate=20M,seed=1") as pair:
        await pair.configure(multifd=True, channels=2, extra_params=FAST)
        assert (await pair.migrate())["status"] == "completed"
        first = (await pair.dst.execute("x-query-state-digest"))["ram"]["digest"]
        await asyncio.sleep(0.1)
        later = (await pair.dst.execute("x-query-state-digest"))["ram"]["digest"]
        assert first != later       # the guest runs, and writes, on the destination
        src_digest = (await pair.src.execute("x-query-state-digest"))["ram"]["digest"]
        await asyncio.sleep(0.05)
        assert (await pair.src.execute("x-query-state-digest"))["ram"]["digest"] == src_digest


async def test_not_converging_is_reported_then_fixed_live(pair_factory):
    async with pair_factory([], memory="32M,fill=random",
                            workload="dirty-rate=400M,pattern=random") as pair:
        await pair.configure(multifd=True, channels=2,
                             extra_params={"max-bandwidth": 30 << 20, "downtime-limit": 1})
        await pair.src.execute("migrate", {"uri": await pair.uri()})
        for _ in range(600):
            info = await pair.src.execute("query-migrate")
            if info.get("x-convergence", {}).get("converging") is False:
                break
            await asyncio.sleep(0.02)
        assert info["status"] == "active"
        assert info["x-convergence"]["converging"] is False
        assert "raise max-bandwidth or downtime-limit" in info["x-convergence"]["reason"]
        assert info["expected-downtime"] > 1
        # the operator raises the limits while it runs: it converges and completes
        await pair.src.execute("migrate-set-parameters",
                               {"max-bandwidth": 0, "downtime-limit": 5000})
        info = await wait_final(pair.src)
        assert info["status"] == "completed", info.get("error-desc")
        src, dst = await pair.digests()
        assert src == dst


async def test_memory_size_mismatch_fails_clearly(pair_factory):
    async with pair_factory([], memory="8M", dst_memory="16M") as pair:
        await pair.configure(multifd=True, channels=2, extra_params=FAST)
        info = await pair.migrate()
        assert info["status"] == "failed"
        assert "guest RAM size differs" in info["error-desc"]


async def test_migration_pass_events(pair_factory):
    async with pair_factory([], memory="8M,fill=random", workload="dirty-rate=50M") as pair:
        await pair.configure(multifd=True, channels=2,
                             extra_params={"max-bandwidth": 40 << 20, "downtime-limit": 50})
        assert (await pair.migrate())["status"] == "completed"
        passes = []
        while not pair.src.qmp.events.empty():
            event = pair.src.qmp.events.get_nowait()
            if event["event"] == "MIGRATION_PASS":
                passes.append(event["data"]["pass"])
        assert passes and passes == sorted(passes) and passes[0] == 1


# -- x-verify-ram ----------------------------------------------------------------------

@pytest.mark.parametrize("devices", [DEV, []])
@pytest.mark.parametrize("verify", [True, False])
async def test_x_verify_ram(pair_factory, monkeypatch, verify, devices):
    """Off on both sides: the RAM still arrives whole (checked here from outside), but
    neither side hashes it during the migration and only the devices are compared."""
    hashed: list[str] = []
    prehashed: list[str] = []
    digest, prehash = GuestRam.digest, GuestRam.prehash
    monkeypatch.setattr(GuestRam, "digest", lambda self, fresh=False: (
        hashed.append(self.role), digest(self, fresh))[1])
    monkeypatch.setattr(GuestRam, "prehash", lambda self, *a, **kw: (
        prehashed.append(self.role), prehash(self, *a, **kw))[1])
    async with pair_factory(devices, memory="16M,fill=mixed,seed=3",
                            workload="dirty-rate=30M,seed=3") as pair:
        await pair.configure(multifd=True, channels=2,
                             extra_params={**FAST, "x-verify-ram": verify})
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")
        # the destination confirmed every digest the source sent (the device's, and
        # the RAM's when verified)
        assert info["x-digests-verified"] is True
        assert info["x-ram-verified"] is verify
        expected = ["destination", "source"] if verify else []
        assert sorted(set(hashed)) == expected and sorted(set(prehashed)) == expected
        src, dst = await pair.digests()
        assert src[":ram"] is not None and src == dst


async def test_a_wrong_ram_digest_keeps_the_destination_stopped(pair_factory, monkeypatch):
    digest = GuestRam.digest
    monkeypatch.setattr(GuestRam, "digest", lambda self, fresh=False: (
        "0" * 32 if self.role == "source" and not fresh else digest(self, fresh)))
    async with pair_factory(DEV, memory="8M,fill=mixed,seed=4") as pair:
        await pair.configure(multifd=True, channels=2, extra_params=FAST)
        info = await pair.migrate()
        assert info["status"] == "failed"
        assert "guest RAM: loaded digest" in info["error-desc"]
        assert "does not match the source's " + "0" * 32 in info["error-desc"]
        assert (await pair.dst.execute("query-status"))["status"] == "inmigrate"
        assert (await pair.src.execute("query-status"))["running"]


async def test_x_verify_ram_must_match(pair_factory):
    async with pair_factory([], memory="8M") as pair:
        await pair.configure(multifd=True, channels=2, side="src",
                             extra_params={"x-verify-ram": False})
        await pair.configure(multifd=True, channels=2, side="dst")
        info = await pair.migrate()
        assert info["status"] == "failed"
        assert ("x-verify-ram differs: source off, destination on; set it on both sides"
                in info["error-desc"])
        # the source VM keeps running and migrates once the sides agree
        assert (await pair.src.execute("query-status"))["running"]


async def test_a_source_without_x_verify_ram_counts_as_verifying(pair_factory):
    async with pair_factory([], memory="8M") as pair:
        await pair.configure(multifd=True, channels=2, side="dst",
                             extra_params={"x-verify-ram": False})
        # as an older source: no x-verify-ram in the hello
        reply = await refused_hello(parse_address(await pair.uri()),
                                    {"ram-size": 8 << 20, "x-verify-ram": DROP})
        assert ("x-verify-ram differs: source on (not sent: a source without the "
                "parameter always verifies), destination off") in reply.error


@pytest.mark.parametrize("value", ["off", 0, 1])
async def test_x_verify_ram_from_a_source_must_be_boolean(pair_factory, value):
    async with pair_factory([], memory="8M") as pair:
        await pair.configure(multifd=True, channels=2, side="dst")
        reply = await refused_hello(parse_address(await pair.uri()),
                                    {"ram-size": 8 << 20, "x-verify-ram": value})
        assert reply.code == "protocol-error"  # blamed on the source, not the config
        assert f"x-verify-ram must be a boolean, got {value!r}" in reply.error
        info = await wait_status(pair.dst, "failed")
        assert "x-verify-ram must be a boolean" in info["error-desc"]


# -- a scripted source breaking the RAM rules ------------------------------------------

async def _ram_session(pair, packets, *, flush: bool = True, channels: int = 2):
    """Hello + RAM START section, then ``packets`` (channel, bytes), then a PART with a
    flush marker; returns the destination's SHUT."""
    fake = FakeSource(parse_address(await pair.uri()), channels=channels)
    try:
        await fake.connect_all()
        hello = fake.hello([])
        hello.parameters["ram-size"] = 8 << 20
        hello.parameters["zero-page-detection"] = "multifd"
        await fake.send(hello)
        reply = await fake.receive()
        assert isinstance(reply, HelloReply) and reply.accepted, reply
        await fake.send(Command(CommandType.OPEN_RETURN_PATH))
        await fake.send(SectionStart(0, "ram", 0, 4))
        await fake.send(RamSetup(4096, {"pc.ram": 8 << 20}))
        await fake.send(RamEos())
        await fake.send(SectionFooter(0))
        await fake.send_packets(packets)
        if flush:
            await fake.send(SectionPart(0))
            await fake.send(RamFlush())
        while True:
            msg = await fake.receive(timeout=15)
            if msg is None or isinstance(msg, Shut):
                return msg
    finally:
        fake.close()


def ram_packet(block: str, offsets: list[int], *, num: int = 0, sync: bool = False) -> bytes:
    pc = ram_page_count(4096, RAM_PACKET_SIZE)
    pkt = RamPacket(flags=1 if sync else 0, pages_alloc=pc, normal_pages=len(offsets),
                    next_packet_size=4096 * len(offsets), packet_num=num, zero_pages=0,
                    ramblock=block, offsets=tuple(offsets))
    return pkt.encode(pc) + random.Random(num).randbytes(4096 * len(offsets))


def sync_packet(num: int) -> bytes:
    return RamPacket.sync_packet(num).encode(ram_page_count(4096, RAM_PACKET_SIZE))


@pytest.mark.parametrize("packets,error", [
    ([(0, ram_packet("vga.vram", [0]))], "unknown RAM block"),
    ([(0, ram_packet("pc.ram", [8 << 20]))], "offset"),
    ([(0, ram_packet("pc.ram", [4096 + 1]))], "offset"),
])
async def test_bad_ram_input_fails_clearly(pair_factory, packets, error):
    async with pair_factory([], memory="8M") as pair:
        await pair.configure(multifd=True, channels=2, side="dst")
        shut = await _ram_session(pair, packets, flush=False)
        assert shut is not None and not shut.ok
        assert error in shut.error, shut.error
        info = await wait_status(pair.dst, "failed")
        assert error in info["error-desc"]
        assert (await pair.dst.execute("query-status"))["status"] == "inmigrate"


async def test_flush_without_sync_packets_fails_clearly(pair_factory):
    async with pair_factory([], memory="8M") as pair:
        await pair.configure(multifd=True, channels=2, side="dst",
                             extra_params={"x-switchover-timeout": 300})
        shut = await _ram_session(pair, [(0, sync_packet(1))], flush=True)
        assert shut is not None and not shut.ok
        assert "channel(s) [1] sent no SYNC packet" in shut.error


@pytest.mark.parametrize("method", ["zlib", "zstd"])
async def test_compressed_ram_round_trips(pair_factory, method):
    async with pair_factory(["vfio-sim,id=dev0,state-size=2M"], memory="16M,fill=mixed,seed=9",
                            workload="dirty-rate=30M,seed=2") as pair:
        await pair.configure(multifd=True, channels=3, extra_params={
            "multifd-compression": method, f"multifd-{method}-level": 3,
            "max-bandwidth": 0, "downtime-limit": 300})
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")
        src, dst = await pair.digests()
        assert src == dst
        # device state needs compression off: AUTO fell back to the main channel
        assert info["x-devices"][0]["mode"] == "main"
        # mixed content compresses: fewer bytes on the wire than the normal pages
        assert info["ram"]["multifd-bytes"] < info["ram"]["normal-bytes"]


async def test_mixed_compression_settings_are_refused(pair_factory):
    async with pair_factory([], memory="8M") as pair:
        await pair.configure(multifd=True, channels=2,
                             extra_params={"multifd-compression": "zstd"}, side="src")
        await pair.configure(multifd=True, channels=2,
                             extra_params={"multifd-compression": "zlib"}, side="dst")
        info = await pair.migrate()
        assert info["status"] == "failed"
        assert "multifd-compression differs" in info["error-desc"]


async def test_device_transfer_on_with_compression_fails_clearly(pair_factory):
    async with pair_factory(["vfio-sim,id=dev0,state-size=1M,x-migration-multifd-transfer=on"],
                            memory="8M") as pair:
        await pair.configure(multifd=True, channels=2,
                             extra_params={"multifd-compression": "zlib"})
        with pytest.raises(Exception, match="multifd-compression=none"):
            await pair.src.execute("migrate", {"uri": await pair.uri()})


# -- x-multifd-packet-size: guest bytes per RAM packet --------------------------------

@pytest.mark.parametrize("packet_size", [512 * 1024, 2 * 1024 * 1024])
async def test_ram_packet_size_sets_the_pages_per_packet(pair_factory, packet_size):
    # 8 MiB of random pages: 16 packets of QEMU's 512 KiB, or 4 of 2 MiB
    async with pair_factory([], memory="8M,fill=random,seed=5") as pair:
        await pair.configure(multifd=True, channels=2,
                             extra_params={**FAST, "x-multifd-packet-size": packet_size})
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")
        assert info["x-ram-verified"] is True
        syncs = info["ram"]["dirty-sync-count"] * 2  # one SYNC per channel and round
        packets = sum(c["packets"] for c in info["x-channels"] if c["id"] != "main")
        assert packets - syncs == (8 << 20) // packet_size, info["x-channels"]
        src, dst = await pair.digests()
        assert src == dst


async def test_ram_packet_size_must_match(pair_factory):
    async with pair_factory([], memory="8M") as pair:
        await pair.configure(multifd=True, channels=2, side="src",
                             extra_params={"x-multifd-packet-size": 512 * 1024})
        await pair.configure(multifd=True, channels=2, side="dst")
        info = await pair.migrate()
        assert info["status"] == "failed"
        assert ("x-multifd-packet-size differs: source 524288, destination 2097152; set it "
                "on both sides" in info["error-desc"])
        assert (await pair.src.execute("query-status"))["running"]
        await pair.configure(multifd=True, channels=2, side="src",
                             extra_params={"x-multifd-packet-size": 2 * 1024 * 1024})
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")


async def test_a_source_without_a_packet_size_sends_qemu_packets(pair_factory):
    async with pair_factory([], memory="8M") as pair:
        await pair.configure(multifd=True, channels=2, side="dst")
        # as an older source: no x-multifd-packet-size in the hello
        reply = await refused_hello(parse_address(await pair.uri()),
                                    {"ram-size": 8 << 20, "x-multifd-packet-size": DROP})
        assert reply.code == "config-error"
        assert "x-multifd-packet-size differs: source 524288, destination 2097152" \
            in reply.error


@pytest.mark.parametrize("value", ["2M", True])  # what the control schema carries
async def test_a_packet_size_from_a_source_must_be_an_integer(pair_factory, value):
    async with pair_factory([], memory="8M") as pair:
        await pair.configure(multifd=True, channels=2, side="dst")
        reply = await refused_hello(parse_address(await pair.uri()),
                                    {"ram-size": 8 << 20, "x-multifd-packet-size": value})
        assert reply.code == "protocol-error"
        assert "x-multifd-packet-size must be an integer" in reply.error
