"""Faults in a real migration: reset and stalled channels, cancel in every phase.

Each time the source must report failed or cancelled with the cause, run its VM
again (devices back in RUNNING, RAM intact, the guest writing again), leave no task
behind, and then migrate successfully; the destination never starts from partial
state.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import Pair, wait_final, wait_status
from tests.faultproxy import FaultProxy

DEVICES = ["vfio-sim,id=gpu0,state-size=8M", "vfio-sim,id=gpu1,state-size=8M"]
MEMORY = "24M,fill=random"
WORKLOAD = "dirty-rate=40M,pattern=random"


async def through_proxy(pair: Pair) -> FaultProxy:
    uri = await pair.uri()
    port = int(uri.rsplit(":", 1)[1])
    proxy = FaultProxy("127.0.0.1", port)
    await proxy.start()
    return proxy


async def wait_for(pair: Pair, status: str, min_bytes: int = 0) -> dict:
    for _ in range(2000):
        info = await pair.src.execute("query-migrate")
        if info.get("status") == status and info.get("ram", {}).get("transferred", 0) >= min_bytes:
            return info
        if info.get("status") in ("failed", "completed", "cancelled"):
            raise AssertionError(f"migration ended early: {info}")
        await asyncio.sleep(0.005)
    raise TimeoutError(f"never reached {status}")


async def assert_source_recovered(pair: Pair) -> None:
    src = pair.src.daemon
    assert (await pair.src.execute("query-status"))["status"] == "running"
    assert all(d.state.name == "RUNNING" for d in src.vm.devices.values())
    assert not src.migration.funnel._tasks
    # the guest runs again: its RAM keeps changing
    first = (await pair.src.execute("x-query-state-digest"))["ram"]["digest"]
    await asyncio.sleep(0.05)
    assert (await pair.src.execute("x-query-state-digest"))["ram"]["digest"] != first
    assert (await pair.dst.execute("query-status"))["status"] == "inmigrate"


async def migrate_again(pair: Pair) -> None:
    """Lift the throttles and migrate straight to the (same, still waiting) destination."""
    await pair.src.execute("migrate-set-parameters", {"max-bandwidth": 0})
    for dev in pair.src.daemon.vm.devices.values():
        dev.set_config(dev.config.with_property("read-bandwidth", 0))
    if (await pair.dst.execute("query-migrate")).get("x-attempts"):
        await wait_final(pair.dst, 15, ("failed",))
    info = await pair.migrate()
    assert info["status"] == "completed", info.get("error-desc")
    assert info["x-digests-verified"]


@pytest.mark.parametrize("phase", ["active", "device"])
async def test_channel_reset(pair_factory, phase):
    devices = [d + ",read-bandwidth=40M" for d in DEVICES]
    async with pair_factory(devices, dst_devices=DEVICES, memory=MEMORY,
                            workload=WORKLOAD) as pair:
        await pair.configure(multifd=True, channels=3,
                             extra_params={"max-bandwidth": 60 << 20, "downtime-limit": 300})
        proxy = await through_proxy(pair)
        try:
            await pair.src.execute("migrate", {"uri": proxy.uri})
            await wait_for(pair, phase, min_bytes=2 << 20)
            proxy.link("multifd-1").reset()
            info = await wait_final(pair.src)
        finally:
            await proxy.close()
        assert info["status"] == "failed"
        assert "reset" in info["error-desc"] or "closed" in info["error-desc"] \
            or "channel" in info["error-desc"], info["error-desc"]
        await assert_source_recovered(pair)
        await migrate_again(pair)


async def test_stalled_channel_fails_after_the_stall_timeout(pair_factory):
    async with pair_factory(DEVICES, memory=MEMORY, workload=WORKLOAD) as pair:
        await pair.configure(multifd=True, channels=2, extra_params={
            "max-bandwidth": 0, "downtime-limit": 1, "x-channel-stall-timeout": 500})
        proxy = await through_proxy(pair)
        try:
            await pair.src.execute("migrate", {"uri": proxy.uri})
            await wait_for(pair, "active", min_bytes=1 << 20)
            proxy.link("multifd-0").stalled.clear()        # stop forwarding, keep it open
            info = await wait_final(pair.src, 30)
        finally:
            await proxy.close()
        assert info["status"] == "failed"
        assert "x-channel-stall-timeout" in info["error-desc"]
        await assert_source_recovered(pair)
        await migrate_again(pair)


@pytest.mark.parametrize("phase", ["setup", "active", "device"])
async def test_cancel_in_each_phase(pair_factory, phase):
    devices = [d + ",read-bandwidth=40M" for d in DEVICES]
    async with pair_factory(devices, dst_devices=DEVICES, memory=MEMORY,
                            workload=WORKLOAD) as pair:
        await pair.configure(multifd=True, channels=2,
                             extra_params={"max-bandwidth": 60 << 20, "downtime-limit": 300})
        await pair.src.execute("migrate", {"uri": await pair.uri()})
        if phase != "setup":
            await wait_for(pair, phase, min_bytes=1 << 20)
        await pair.src.execute("migrate_cancel")
        info = await wait_final(pair.src)
        assert info["status"] == "cancelled"
        history = [s.value for s in pair.src.daemon.status.history]
        assert history[-2:] == ["cancelling", "cancelled"]
        assert phase in history
        await assert_source_recovered(pair)
        if phase != "setup":  # cancelled in setup, the source may not have connected yet
            dst = await wait_status(pair.dst, "failed")
            assert dst["error-desc"]
        await migrate_again(pair)
