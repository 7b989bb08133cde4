"""Whole migrations between two in-process endpoints over QMP and loopback TCP."""

from __future__ import annotations

import asyncio

import pytest

from migrate_common.net import parse_address
from tests.conftest import wait_final, wait_status
from tests.fakesource import refused_hello
from vm.properties import parse_device_option


def devs(n: int, size: str = "3M", extra: str = "") -> list[str]:
    return [f"vfio-sim,id=dev{i},state-size={size}{extra}" for i in range(n)]


@pytest.mark.parametrize("multifd", [True, False], ids=["multifd", "main-channel"])
@pytest.mark.parametrize("channels", [1, 2, 8])
@pytest.mark.parametrize("ndev", [1, 4])
async def test_migration_modes_channels_devices(pair_factory, multifd, channels, ndev):
    async with pair_factory(devs(ndev)) as pair:
        await pair.configure(multifd=multifd, channels=channels)
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")
        src, dst = await pair.digests()
        assert None not in dst.values()
        assert src == dst
        assert (await pair.dst.execute("query-status"))["status"] == "running"
        assert (await pair.src.execute("query-status"))["status"] == "postmigrate"
        modes = {d["mode"] for d in info["x-devices"]}
        assert modes == {"multifd" if multifd else "main"}
        channel_ids = [c["id"] for c in info["x-channels"]]
        assert channel_ids == ["main"] + ([str(i) for i in range(channels)] if multifd else [])
        if multifd:
            # device state went over the multifd channels, not the main channel
            multifd_bytes = sum(c["bytes"] for c in info["x-channels"][1:])
            assert multifd_bytes >= ndev * 3 * 1024 * 1024
            assert info["x-channels"][0]["bytes"] < 64 * 1024
        assert info["downtime"] >= 0
        assert info["vfio"]["transferred"] >= ndev * 3 * 1024 * 1024


async def test_status_sequences_and_events(pair_factory):
    async with pair_factory(devs(2)) as pair:
        await pair.configure(multifd=True, channels=2)
        info = await pair.migrate()
        assert info["status"] == "completed"
        assert [s.value for s in pair.src.daemon.status.history] == [
            "none", "setup", "active", "device", "completed"]
        await wait_status(pair.dst, "completed")
        assert [s.value for s in pair.dst.daemon.status.history] == [
            "none", "setup", "active", "completed"]
        events = []
        while not pair.src.qmp.events.empty():
            events.append(pair.src.qmp.events.get_nowait())
        assert [e["data"]["status"] for e in events if e["event"] == "MIGRATION"] == [
            "setup", "active", "device", "completed"]


async def test_device_state_sequences(pair_factory):
    async with pair_factory(devs(1)) as pair:
        await pair.configure(multifd=True, channels=2)
        assert (await pair.migrate())["status"] == "completed"
        src_dev = pair.src.daemon.vm.devices["dev0"]
        dst_dev = pair.dst.daemon.vm.devices["dev0"]
        names = lambda dev: [s.name for s in dev.history]  # noqa: E731
        assert names(src_dev) == ["RUNNING", "RUNNING_P2P", "STOP", "STOP_COPY", "STOP"]
        # with P2P support RUNNING reaches STOP only through RUNNING_P2P (kernel arcs)
        assert names(dst_dev) == ["RUNNING", "RUNNING_P2P", "STOP", "RESUMING", "STOP",
                                  "RUNNING_P2P", "RUNNING"]


async def test_precopy_and_switchover_ack(pair_factory):
    devices = devs(2, extra=",precopy-size=2M")
    async with pair_factory(devices) as pair:
        await pair.configure(multifd=True, channels=2, switchover_ack=True,
                             extra_params={"max-bandwidth": 0})
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")
        for dev in info["x-devices"]:
            assert dev["precopy-bytes"] == 2 * 1024 * 1024
            assert dev["stopcopy-bytes"] == 3 * 1024 * 1024
        src, dst = await pair.digests()
        assert src == dst
        src_dev = pair.src.daemon.vm.devices["dev0"]
        assert [s.name for s in src_dev.history] == [
            "RUNNING", "PRE_COPY", "PRE_COPY_P2P", "STOP_COPY", "STOP"]


async def test_interlock_on_both_sides(pair_factory):
    devices = devs(2, extra=",x-migration-load-config-after-iter=on")
    async with pair_factory(devices) as pair:
        await pair.configure(multifd=True, channels=2)
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")


async def test_interlock_mismatch_fails_clearly(pair_factory):
    async with pair_factory(devs(1, extra=",x-migration-load-config-after-iter=on"),
                            dst_devices=devs(1)) as pair:
        await pair.configure(multifd=True, channels=2)
        info = await pair.migrate()
        assert info["status"] == "failed"
        assert "x-migration-load-config-after-iter" in info["error-desc"]
        dst = await wait_status(pair.dst, "failed")
        assert "load-config-after-iter" in dst["error-desc"]


async def test_mode_mismatch_fails_clearly(pair_factory):
    async with pair_factory(devs(1), dst_devices=devs(
            1, extra=",x-migration-multifd-transfer=off")) as pair:
        await pair.configure(multifd=True, channels=2)
        info = await pair.migrate()
        assert info["status"] == "failed"
        assert "multifd channels" in info["error-desc"]
        assert "main channel" in info["error-desc"]
        # the source VM runs again, devices back in RUNNING
        assert (await pair.src.execute("query-status"))["status"] == "running"
        assert all(d.state.name == "RUNNING" for d in pair.src.daemon.vm.devices.values())


async def test_capability_mismatch_fails_clearly(pair_factory):
    async with pair_factory(devs(1)) as pair:
        await pair.configure(multifd=True, channels=4, side="src")
        await pair.configure(multifd=True, channels=2, side="dst")
        info = await pair.migrate()
        assert info["status"] == "failed"
        # the destination rejects the extra channel ids, or the hello's channel count
        assert "channel" in info["error-desc"]


async def test_multifd_transfer_on_without_multifd_is_refused(pair_factory):
    async with pair_factory(devs(1, extra=",x-migration-multifd-transfer=on")) as pair:
        await pair.configure(multifd=False)
        with pytest.raises(Exception, match="unsupported in the current config"):
            await pair.src.execute("migrate", {"uri": await pair.uri()})


@pytest.mark.parametrize("cap,expect", [
    ("x-migration-max-queued-buffers=2", "x-migration-max-queued-buffers=2"),
    ("x-migration-max-queued-buffers-size=1M", "x-migration-max-queued-buffers-size=1048576"),
])
async def test_caps_trip_and_destination_recovers(pair_factory, cap, expect):
    # the destination device writes slowly, so buffers pile up in reassembly (8
    # packets of 4 MiB)
    src_devices = devs(1, size="32M")
    dst_devices = devs(1, size="32M", extra=f",write-bandwidth=16M,{cap}")
    async with pair_factory(src_devices, dst_devices=dst_devices) as pair:
        await pair.configure(multifd=True, channels=4)
        info = await pair.migrate()
        assert info["status"] == "failed"
        dst = await wait_status(pair.dst, "failed")
        assert expect in dst["error-desc"]
        assert expect in info["error-desc"]
        assert (await pair.src.execute("query-status"))["status"] == "running"
        # lift the cap: the same destination accepts the next migration
        await pair.dst.execute("qom-set", {"path": "/machine/peripheral/dev0",
                                           "property": cap.split("=")[0],
                                           "value": "unlimited"})
        await pair.dst.execute("qom-set", {"path": "/machine/peripheral/dev0",
                                           "property": "write-bandwidth", "value": 0})
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")
        src, dst_d = await pair.digests()
        assert src == dst_d


async def test_cancel_mid_transfer_then_migrate_again(pair_factory):
    # slow devices so the cancel lands while device state is moving
    devices = devs(2, size="16M", extra=",read-bandwidth=32M")
    async with pair_factory(devices) as pair:
        await pair.configure(multifd=True, channels=4)
        await pair.src.execute("migrate", {"uri": await pair.uri()})
        await wait_status(pair.src, "device")
        await asyncio.sleep(0.05)
        await pair.src.execute("migrate_cancel")
        info = await wait_final(pair.src)
        assert info["status"] == "cancelled"
        assert [s.value for s in pair.src.daemon.status.history][-3:] == [
            "device", "cancelling", "cancelled"]
        assert (await pair.src.execute("query-status"))["status"] == "running"
        assert all(d.state.name == "RUNNING" for d in pair.src.daemon.vm.devices.values())
        dst = await wait_status(pair.dst, "failed")
        assert dst["error-desc"]
        assert (await pair.dst.execute("query-status"))["status"] == "inmigrate"
        # no task of the failed attempt is left behind on either side
        assert not pair.src.daemon.migration.funnel._tasks
        assert not pair.dst.daemon.attempt.funnel._tasks
        # a second migration to the same destination succeeds
        for dev in pair.src.daemon.vm.devices.values():
            dev.set_config(dev.config.with_property("read-bandwidth", 0))
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")
        src, dst_d = await pair.digests()
        assert src == dst_d


async def test_cancel_is_idempotent_and_harmless_when_idle(pair_factory):
    async with pair_factory(devs(1)) as pair:
        await pair.src.execute("migrate_cancel")
        await pair.src.execute("migrate_cancel")
        assert await pair.src.execute("query-migrate") == {}


async def test_migrate_while_migrating_is_refused(pair_factory):
    devices = devs(1, size="8M", extra=",read-bandwidth=16M")
    async with pair_factory(devices) as pair:
        await pair.configure(multifd=True, channels=2)
        uri = await pair.uri()
        await pair.src.execute("migrate", {"uri": uri})
        with pytest.raises(Exception, match="migration process in progress"):
            await pair.src.execute("migrate", {"uri": uri})
        await pair.src.execute("migrate_cancel")
        await wait_final(pair.src)


async def test_destination_unreachable_fails_and_source_keeps_running(pair_factory):
    async with pair_factory(devs(1)) as pair:
        await pair.configure(multifd=True, channels=2,
                             extra_params={"x-connect-timeout": 1000})
        await pair.src.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        info = await wait_final(pair.src)
        assert info["status"] == "failed"
        assert "cannot connect" in info["error-desc"]
        assert (await pair.src.execute("query-status"))["status"] == "running"


async def test_uuid_mismatch_is_rejected(pair_factory):
    import uuid

    async with pair_factory(devs(1), src_uuid=uuid.UUID(int=1),
                            dst_uuid=uuid.UUID(int=2)) as pair:
        await pair.configure(multifd=True, channels=2)
        info = await pair.migrate()
        assert info["status"] == "failed"
        dst = await wait_status(pair.dst, "failed")
        assert "UUID" in dst["error-desc"] or "uuid" in dst["error-desc"].lower()


async def test_source_can_migrate_again_after_cont(pair_factory):
    async with pair_factory(devs(1)) as pair:
        await pair.configure(multifd=True, channels=2)
        assert (await pair.migrate())["status"] == "completed"
        with pytest.raises(Exception, match="cont"):
            await pair.src.execute("migrate", {"uri": await pair.uri()})
        await pair.src.execute("cont")
        assert (await pair.src.execute("query-status"))["status"] == "running"


async def test_a_device_that_reads_short_mid_stream_fails_the_source(pair_factory, monkeypatch):
    """The source promises the destination uniform device-state packets: a device
    read that comes back short and is not the last one is a local error, and the
    source VM keeps running."""
    from vm.vfio_sim import DeviceState, VfioSimDevice

    real = VfioSimDevice.read
    reads: list[int] = []

    async def short_second_read(self: VfioSimDevice, max_bytes: int) -> memoryview:
        if self.state is DeviceState.STOP_COPY:
            reads.append(max_bytes)
            if len(reads) == 2:
                return await real(self, max_bytes // 2)
        return await real(self, max_bytes)

    monkeypatch.setattr(VfioSimDevice, "read", short_second_read)
    async with pair_factory(["vfio-sim,id=dev0,state-size=16M"]) as pair:
        await pair.configure(multifd=True, channels=2)
        info = await pair.migrate()
        assert info["status"] == "failed"
        # x-device-state-packet-size: 4 MiB by default
        assert "after a short read: data packets must hold 4194304 bytes" in info["error-desc"]
        assert (await pair.src.execute("query-status"))["status"] == "running"


# -- x-device-state-packet-size: data bytes per device-state packet ---------------------

@pytest.mark.parametrize("packet_size, packets", [
    (1 << 20, 8 + 1),       # QEMU's 1 MiB pieces, and the config packet
    (4 << 20, 2 + 1),       # the default
    (3 << 20, 3 + 1),       # any size: two of 3 MiB and a short last one
])
async def test_device_state_packet_size_sets_the_packets_per_device(pair_factory, packet_size,
                                                                    packets):
    async with pair_factory(devs(2, size="8M")) as pair:
        await pair.configure(multifd=True, channels=2, side="src",
                             extra_params={"x-device-state-packet-size": packet_size})
        await pair.configure(multifd=True, channels=2, side="dst")
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")
        assert [d["packets"] for d in info["x-devices"]] == [packets, packets]
        src, dst = await pair.digests()
        assert src == dst


async def test_device_state_packets_larger_than_the_destination_takes_are_refused(
        pair_factory):
    async with pair_factory(devs(1, size="8M")) as pair:
        await pair.configure(multifd=True, channels=2, side="src",
                             extra_params={"x-device-state-packet-size": 8 << 20})
        await pair.configure(multifd=True, channels=2, side="dst")
        info = await pair.migrate()
        assert info["status"] == "failed"
        assert ("x-device-state-packet-size: the source sends device-state packets of up to "
                "8388608 bytes, this destination accepts at most 4194304" in info["error-desc"])
        assert (await pair.src.execute("query-status"))["running"]
        await pair.configure(multifd=True, channels=2, side="dst",
                             extra_params={"x-device-state-packet-size": 8 << 20})
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")
        assert info["x-devices"][0]["packets"] == 1 + 1


@pytest.mark.parametrize("value", ["4M", True, 0])
async def test_a_device_state_packet_size_from_a_source_must_be_a_positive_integer(
        pair_factory, value):
    async with pair_factory(devs(1)) as pair:
        await pair.configure(multifd=True, channels=2, side="dst")
        reply = await refused_hello(parse_address(await pair.uri()),
                                    {"x-device-state-packet-size": value},
                                    devices=[parse_device_option(devs(1)[0])])
        assert reply.code == "protocol-error"
        assert "x-device-state-packet-size must be a positive integer" in reply.error
