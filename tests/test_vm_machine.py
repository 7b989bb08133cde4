"""Tests for vm.machine: device registry and run-state bookkeeping."""

from __future__ import annotations

import uuid

import pytest

from protocol.errors import ConfigError, StateError
from vm import (
    DEFAULT_DEVICE_OPTIONS,
    DeviceConfig,
    DeviceState,
    RunState,
    VirtualMachine,
    default_device_configs,
    parse_device_option,
)
from vm.properties import KiB, MiB

R = RunState


def small(*ids: str) -> list[DeviceConfig]:
    return [DeviceConfig(id=i, state_size=4 * KiB) for i in ids]


def test_devices_keep_command_line_order() -> None:
    vm = VirtualMachine(small("zeta", "alpha", "mid"), role="source")
    assert list(vm.devices) == ["zeta", "alpha", "mid"]
    assert all(d.role == "source" for d in vm.devices.values())
    assert vm.total_state_size == 12 * KiB


def test_duplicate_ids_are_rejected() -> None:
    with pytest.raises(ConfigError, match="duplicate device id 'a'"):
        VirtualMachine(small("a", "b", "a"), role="source")


def test_bad_role() -> None:
    with pytest.raises(ConfigError, match="role"):
        VirtualMachine([], role="both")  # type: ignore[arg-type]


def test_device_by_idstr() -> None:
    vm = VirtualMachine(small("gpu0", "gpu1"), role="destination")
    assert vm.device_by_idstr("gpu1/vfio", 0) is vm.devices["gpu1"]
    assert vm.device_by_idstr("gpu1/vfio", 1) is None
    assert vm.device_by_idstr("gpu1", 0) is None
    assert vm.device_by_idstr("ram", 0) is None


def test_uuid() -> None:
    fixed = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert VirtualMachine([], role="source", uuid=fixed).uuid == fixed
    a, b = VirtualMachine([], role="source"), VirtualMachine([], role="source")
    assert a.uuid != b.uuid


def test_default_vm() -> None:
    assert DEFAULT_DEVICE_OPTIONS == [
        f"vfio-sim,id=dev{i},state-size=256M,stop-copy-latency=50ms,read-bandwidth=2G"
        for i in range(4)
    ]
    configs = default_device_configs()
    assert [c.id for c in configs] == ["dev0", "dev1", "dev2", "dev3"]
    assert all(c.state_size == 256 * MiB for c in configs)
    assert all(c.stop_copy_latency == 0.05 and c.read_bandwidth == 2048 * MiB
               for c in configs)
    # lazily generated: building the 1 GiB default VM is instant
    vm = VirtualMachine.from_options(DEFAULT_DEVICE_OPTIONS, role="source")
    assert vm.total_state_size == 1024 * MiB
    assert len({d.config.seed for d in vm.devices.values()}) == 4


def test_from_options_rejects_bad_options() -> None:
    with pytest.raises(ConfigError, match="unknown property 'bogus'"):
        VirtualMachine.from_options(["vfio-sim,id=a,bogus=1"], role="source")


@pytest.mark.parametrize(("role", "initial"), [("source", R.RUNNING), ("destination", R.INMIGRATE)])
def test_initial_run_state(role: str, initial: RunState) -> None:
    vm = VirtualMachine([], role=role)  # type: ignore[arg-type]
    assert vm.run_state is initial
    assert vm.running is (initial is R.RUNNING)
    assert vm.run_state_history == [initial]


def test_initial_run_state_override() -> None:
    vm = VirtualMachine([], role="source", initial_run_state=RunState.PRELAUNCH)
    assert vm.run_state is R.PRELAUNCH and not vm.running


def test_run_state_names_are_qemus() -> None:
    assert [s.value for s in RunState] == [
        "running", "paused", "inmigrate", "finish-migrate", "postmigrate", "prelaunch",
    ]
    assert str(R.FINISH_MIGRATE) == "finish-migrate"


@pytest.mark.parametrize(
    ("role", "steps"),
    [
        ("source", [R.FINISH_MIGRATE, R.POSTMIGRATE]),  # migration completed
        ("source", [R.FINISH_MIGRATE, R.RUNNING]),  # failed or cancelled: resume the guest
        ("source", [R.FINISH_MIGRATE, R.POSTMIGRATE, R.RUNNING]),  # "cont" after completion
        ("source", [R.PAUSED, R.FINISH_MIGRATE, R.PAUSED]),  # migrating a paused guest
        ("destination", [R.RUNNING]),  # autostart
        ("destination", [R.PAUSED, R.RUNNING]),  # -S, then "cont"
    ],
)
def test_legal_run_state_paths(role: str, steps: list[RunState]) -> None:
    vm = VirtualMachine([], role=role)  # type: ignore[arg-type]
    initial = vm.run_state
    for step in steps:
        vm.set_run_state(step)
    assert vm.run_state_history == [initial, *steps]
    assert vm.running is (steps[-1] is R.RUNNING)


@pytest.mark.parametrize(
    ("role", "target"),
    [
        ("source", R.INMIGRATE),
        ("source", R.POSTMIGRATE),  # must pass finish-migrate first
        ("source", R.PRELAUNCH),
    ],
)
def test_illegal_run_state_changes(role: str, target: RunState) -> None:
    vm = VirtualMachine([], role=role)  # type: ignore[arg-type]
    with pytest.raises(StateError) as info:
        vm.set_run_state(target)
    assert f"invalid run state transition running -> {target.value}" in str(info.value)
    assert info.value.state == "running"
    assert vm.run_state is R.RUNNING
    assert vm.run_state_history == [R.RUNNING]


def test_same_run_state_is_a_no_op() -> None:
    vm = VirtualMachine([], role="source")
    vm.set_run_state(R.RUNNING)
    assert vm.run_state_history == [R.RUNNING]


def test_postmigrate_cannot_go_back_to_inmigrate() -> None:
    vm = VirtualMachine([], role="destination")
    vm.set_run_state(R.RUNNING)
    with pytest.raises(StateError, match="running -> inmigrate"):
        vm.set_run_state(R.INMIGRATE)


async def test_migrate_a_whole_vm_by_hand() -> None:
    """Walk both VMs through a migration the way the daemons will, and compare digests."""
    options = ["vfio-sim,id=a,state-size=1M,precopy-size=64K", "vfio-sim,id=b,state-size=300K"]
    events: list[tuple[str, DeviceState]] = []
    src = VirtualMachine.from_options(
        options, role="source", on_device_transition=lambda d, old, new: events.append((d.id, new))
    )
    dst = VirtualMachine.from_options(options, role="destination")
    await src.prepare()
    await dst.prepare()
    for dev in dst.devices.values():
        await dev.set_state(DeviceState.RESUMING)
    for dev in src.devices.values():
        if dev.config.supports_precopy:
            await dev.set_state(DeviceState.PRE_COPY)
            while chunk := await dev.read(dev.data_buffer_size):
                await dst.devices[dev.id].write(chunk)
    src.set_run_state(R.FINISH_MIGRATE)
    for dev in src.devices.values():
        await dev.set_state(DeviceState.STOP_COPY)
        target = dst.device_by_idstr(dev.idstr, dev.instance_id)
        assert target is not None
        while chunk := await dev.read(dev.data_buffer_size):
            await target.write(chunk)
        target.load_config(dev.config_blob())
        await dev.set_state(DeviceState.STOP)
    for dev in dst.devices.values():
        await dev.set_state(DeviceState.RUNNING)
    src.set_run_state(R.POSTMIGRATE)
    dst.set_run_state(R.RUNNING)
    assert await src.digests() == await dst.digests()
    assert events[0] == ("a", DeviceState.PRE_COPY)
    assert ("b", DeviceState.STOP_COPY) in events


def test_parse_then_build() -> None:
    cfg = parse_device_option("vfio-sim,id=x,state-size=8K")
    vm = VirtualMachine([cfg], role="source")
    assert vm.devices["x"].config is cfg
    assert "x" in repr(vm)
