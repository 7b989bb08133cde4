"""Smoke test of the benchmark harness: bench/run.py --quick on one scenario, real daemons."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_device_throughput(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--scenario",
           "device-throughput", "--repeat", "1", "--no-iperf", "--out", str(out)]
    plots = importlib.util.find_spec("matplotlib") is not None
    if not plots:  # matplotlib is the harness's own extra (bench/requirements.txt)
        cmd.append("--no-plots")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "device-throughput" in run.stdout and "targets:" in run.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == 1
    assert "--no-iperf" in results["command"]
    for key in ("nproc", "cpu-model", "kernel", "python", "uvloop"):
        assert key in results["machine"]
    assert results["options"]["repeat"] == 1

    scenario = results["scenarios"]["device-throughput"]
    assert scenario["status"] == "ok", scenario.get("reason")
    keys = [p["key"] for p in scenario["points"]]
    assert keys == ["main", "1 ch", "2 ch", "4 ch", "8 ch", "16 ch"]
    for point in scenario["points"]:
        (sample,) = point["samples"]
        assert sample["verified"], sample.get("error")
        assert sample["src"]["status"] == "completed"
        m = sample["metrics"]
        state = 128 * 1024 * 1024  # --quick: 4 devices of 32 MiB (plus headers, config)
        assert state <= m["device-bytes"] < state * 1.01
        assert m["device-GBps"] > 0 and m["downtime-ms"] > 0
        assert m["stopcopy-ms"] <= m["downtime-ms"]
        assert [name for name, _ in m["breakdown-ms"]][-1] in ("shut-received", "rest")
        assert point["summary"]["device-GBps"]["n"] == 1
    # without iperf3 there is no ratio target, but the downtime-overhead targets remain
    names = {t["name"] for t in scenario["targets"]}
    assert names == {"downtime-overhead"}
    assert all(t["pass"] in (True, False) for t in scenario["targets"])
    assert any("--no-iperf" in n for n in scenario["notes"])
    assert (out / "table.md").read_text().startswith("### device-throughput")
    if plots:
        assert results["plots"] == ["device-throughput.png"]
        assert (out / "device-throughput.png").read_bytes()[:4] == b"\x89PNG"
