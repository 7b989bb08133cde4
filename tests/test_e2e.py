"""End to end: the real daemons as separate processes, over loopback TCP."""

from __future__ import annotations

import subprocess
import sys

import pytest

from migrate_ctl.demo import migrate_once
from migrate_ctl.pair import DaemonPair

pytestmark = pytest.mark.e2e

DEVICES = ["vfio-sim,id=gpu0,state-size=24M", "vfio-sim,id=gpu1,state-size=8M,precopy-size=1M",
           "vfio-sim,id=nic0,state-size=2M,config-size=64K"]


@pytest.mark.parametrize("multifd,channels", [(True, 1), (True, 4), (False, 4)])
async def test_real_daemons_migrate(multifd, channels):
    async with DaemonPair(DEVICES) as pair:
        info, verified = await migrate_once(pair, multifd=multifd, channels=channels,
                                            timeout=60)
        assert info["status"] == "completed", info.get("error-desc")
        assert verified
        assert info["downtime"] > 0
        assert len(info["x-channels"]) == 1 + (channels if multifd else 0)
        status = await pair.dst.execute("query-status")
        assert status == {"status": "running", "running": True, "singlestep": False}


async def test_destination_killed_mid_migration_source_recovers():
    devices = ["vfio-sim,id=gpu0,state-size=64M,read-bandwidth=64M"]
    async with DaemonPair(devices) as pair:
        for daemon in (pair.src, pair.dst):
            await daemon.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "multifd", "state": True},
                {"capability": "return-path", "state": True}]})
        await pair.src.execute("migrate", {"uri": await pair.destination_uri()})
        import asyncio

        while (await pair.src.execute("query-migrate"))["status"] != "device":
            await asyncio.sleep(0.01)
        pair.dst.proc.kill()
        await pair.dst.proc.wait()
        while True:
            info = await pair.src.execute("query-migrate")
            if info["status"] in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.02)
        assert info["status"] == "failed"
        assert info["error-desc"]
        assert (await pair.src.execute("query-status"))["status"] == "running"
        # a new destination, and the same source migrates successfully
        await pair.restart_destination()
        await pair.src.execute("qom-set", {"path": "/machine/peripheral/gpu0",
                                           "property": "read-bandwidth", "value": 0})
        info, verified = await migrate_once(pair, multifd=True, channels=2, timeout=60)
        assert info["status"] == "completed" and verified


def test_demo_command_runs_both_modes():
    out = subprocess.run(
        [sys.executable, "-m", "migrate_ctl.demo", "--device", "vfio-sim,id=a,state-size=8M",
         "--device", "vfio-sim,id=b,state-size=8M", "--channels", "2",
         "--memory", "16M,fill=mixed", "--workload", "dirty-rate=20M"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("digests:       verified, all devices match") == 2
    assert "ratio multifd / main" in out.stdout
    assert "downtime:" in out.stdout
    assert "guest RAM:     16.0 MiB" in out.stdout


def test_migrate_ctl_reports_errors_clearly(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "migrate_ctl.cli", "--qmp", f"unix:{tmp_path}/nothing.qmp",
         "status"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "cannot reach QMP" in out.stderr


async def test_destination_records_its_channels(tmp_path):
    record = tmp_path / "rec"
    async with DaemonPair(["vfio-sim,id=gpu0,state-size=3M"],
                          src_args=["--memory", "4M,fill=mixed"],
                          dst_args=["--memory", "4M,fill=mixed",
                                    "--record-channels", str(record)]) as pair:
        info, verified = await migrate_once(pair, multifd=True, channels=2, timeout=60)
        assert info["status"] == "completed" and verified
        dst = await pair.dst.execute("query-migrate")
    folder = record / "attempt-1"
    assert dst["x-recording"] == str(folder)
    import json

    meta = json.loads((folder / "meta.json").read_text())
    assert meta["recorder"] == "multifd-migrate" and meta["channels"] == 2
    assert (folder / "main.bin").read_bytes()[:4] == b"MFDM"
    by_id = {c["id"]: c["bytes"] for c in dst["x-channels"]}
    for cid in ("0", "1"):
        data = (folder / f"multifd-{cid}.bin").read_bytes()
        assert data[:4] == bytes.fromhex("11223344")
        assert len(data) == 64 + by_id[cid]          # the init is read before the channel task
        offsets = [int(line.split()[0]) for line in
                   (folder / f"multifd-{cid}.recv").read_text().splitlines()]
        assert offsets == sorted(offsets) and offsets[0] == 0
