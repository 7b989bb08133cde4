"""The benchmark harness: a smoke run of bench/run.py --quick on one scenario with real
daemons, how the ratios are taken from the samples, the waits for the hypervisor, the
timeline and packet-cost tools, and every mode of the bare data-path tool (bench/datapath.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
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
        # (query-migrate's downtime is in whole milliseconds, rounded: up to 0.5 short)
        assert m["stopcopy-ms"] <= m["downtime-ms"] + 0.5
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


# -- ratios from paired samples (no daemons) ----------------------------------------------

def _sample(gbps: float, iperf_gbps: float | None, rep: int, *, busy: bool = False,
            verified: bool = True) -> dict:
    s = {"verified": verified, "rep": rep, "metrics": {"device-GBps": gbps, "ram-GBps": gbps}}
    if iperf_gbps is not None:
        s["iperf3"] = {"Bps": iperf_gbps * 1e9}
    if busy:
        s["foreign-processes"] = ["pytest"]
    return s


def _point(key: str, samples: list[dict], channels: int = 4, multifd: bool = True) -> dict:
    return {"key": key, "multifd": multifd, "channels": channels, "streams": channels,
            "samples": samples}


def test_ratio_is_the_median_of_each_sample_over_the_iperf3_run_beside_it():
    from bench.scenarios import DEVICE_RATIO, evaluate

    # a slow spell halves both a sample and its iperf3 run: the pairs say 0.9 every time,
    # the medians of each column alone would say 2/3.4 = 0.59 (a FAIL)
    point = _point("4 ch", [_sample(3.6, 4.0, 0), _sample(1.8, 2.0, 1), _sample(1.8, 2.0, 2),
                            _sample(0.5, 5.0, 3, verified=False)])
    result = evaluate({"name": "device-throughput", "points": [point], "measure-notes": []})
    assert point["ratio"] == pytest.approx(0.9)
    assert point["iperf3-GBps"] == pytest.approx(2.0)  # median of the three good runs
    (ratio,) = [t for t in result["targets"] if t["name"] == "device-throughput-ratio"]
    assert ratio["value"] == pytest.approx(0.9) and ratio["limit"] == DEVICE_RATIO
    assert ratio["pass"] is False  # a sample failed: the target fails, whatever the ratio


def test_disturbed_pairs_are_left_out_unless_all_are():
    from bench.scenarios import _pairs

    quiet = _sample(3.0, 4.0, 0)
    noisy = _sample(1.0, 4.0, 1, busy=True)
    assert _pairs(_point("4 ch", [quiet, noisy]), "device-GBps") == [(3e9, 4e9)]
    assert _pairs(_point("4 ch", [noisy]), "device-GBps") == [(1e9, 4e9)]
    assert _pairs(_point("4 ch", [_sample(3.0, None, 0)]), "device-GBps") == []
    failed_iperf = {**_sample(3.0, None, 0), "iperf3": {"error": "RuntimeError: no server"}}
    assert _pairs(_point("4 ch", [failed_iperf]), "device-GBps") == []


def test_results_from_before_the_pairing_keep_their_ratio_of_medians():
    from bench.scenarios import evaluate

    point = _point("2 ch", [_sample(3.0, None, 0), _sample(2.0, None, 1)], channels=2)
    iperf = {"2": [{"Bps": 4e9}, {"Bps": 6e9}, {"Bps": 5e9}]}
    evaluate({"name": "device-throughput", "points": [point], "measure-notes": [],
              "iperf3-samples": iperf})
    assert point["iperf3-GBps"] == pytest.approx(5.0)
    assert point["ratio"] == pytest.approx(2.5 / 5.0)


def test_ours_against_qemu_pairs_the_samples_of_each_repeat():
    from bench.scenarios import evaluate

    ours = _point("4 ch", [_sample(3.0, 4.0, 0), _sample(1.5, 2.0, 1), _sample(3.2, 4.0, 2)])
    qemu = {**_point("QEMU 4 ch", [_sample(4.0, None, 0), _sample(2.0, None, 1),
                                   _sample(2.0, None, 2, verified=False)]), "peer": "qemu"}
    unverified = _point("4 ch, x-verify-ram off", [_sample(3.6, 4.0, 0), _sample(1.8, 2.0, 1)])
    result = evaluate({"name": "ram-throughput", "points": [ours], "qemu-points": [qemu],
                       "variant-points": [unverified], "measure-notes": [],
                       "qemu-adjacent": True, "config": {"qemu": {"version": "7.2.22"}}})
    assert ours["vs-qemu"] == pytest.approx(0.75)  # repeats 0 and 1; QEMU's #2 failed
    assert qemu["iperf3-GBps"] == pytest.approx(4.0)  # our 4-stream iperf3 runs
    (vs,) = [t for t in result["targets"] if t["name"] == "ram-vs-qemu"]
    assert vs["value"] == pytest.approx(0.75) and vs["pass"] is False
    # the variant is measured like a point but is no target
    assert unverified["ratio"] == pytest.approx(0.9)
    assert unverified["vs-qemu"] == pytest.approx(0.9)
    assert all(t.get("point") != unverified["key"] for t in result["targets"])


def test_the_ram_plot_pairs_qemu_and_the_unverified_runs_by_channel_count(tmp_path):
    from bench.plots import _matching, plot_all
    from bench.scenarios import evaluate

    main = _point("main", [_sample(1.0, 2.0, 0)], channels=1, multifd=False)
    one = _point("1 ch", [_sample(2.0, 4.0, 0)], channels=1)
    four = _point("4 ch", [_sample(3.0, 4.0, 0)])
    qemu_main = {**_point("QEMU main", [_sample(1.0, None, 0)], channels=1, multifd=False),
                 "peer": "qemu"}
    qemu_four = {**_point("QEMU 4 ch", [_sample(2.0, None, 0)]), "peer": "qemu"}
    unverified_four = _point("4 ch, x-verify-ram off", [_sample(4.0, 4.0, 0)])
    # the same channel count as the main channel's, but multifd: never its match
    assert _matching([main, one, four], [qemu_four, qemu_main]) == [qemu_main, None, qemu_four]
    assert _matching([main, one, four], [unverified_four]) == [None, None, unverified_four]
    result = evaluate({"name": "ram-throughput", "points": [main, one, four],
                       "qemu-points": [qemu_main, qemu_four], "variant-points": [unverified_four],
                       "measure-notes": [], "qemu-adjacent": True, "status": "ok",
                       "config": {"qemu": {"version": "7.2.22"}}})
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is the harness's own extra (bench/requirements.txt)")
    assert plot_all({"scenarios": {"ram-throughput": result}}, tmp_path) == ["ram-throughput.png"]
    assert (tmp_path / "ram-throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ab_variants_parse():
    import argparse

    from bench.ab import parse_variant

    assert parse_variant('off={"x-verify-ram": false}') == ("off", {"x-verify-ram": False})
    assert parse_variant("a={}") == ("a", {})
    for bad in ("nothing", "={}", "a=[1]", "a={bad json"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)


def test_vm_args_of_the_tools_ram_and_devices_options():
    from bench.harness import vm_args
    assert vm_args("2G", None, "64M") == ([], ["--memory", "2G,fill=random"],
                                          ["--memory", "2G"])
    assert vm_args("2G,fill=mixed", None, "64M", "dirty-rate=64M") == (
        [], ["--memory", "2G,fill=mixed", "--workload", "dirty-rate=64M"], ["--memory", "2G"])
    two = ["vfio-sim,id=dev0,state-size=8M", "vfio-sim,id=dev1,state-size=8M"]
    assert vm_args(None, 2, "8M") == (two, [], [])
    assert len(vm_args(None, None, "8M")[0]) == 4
    assert vm_args("1G", 2, "8M") == (two, ["--memory", "1G,fill=random"], ["--memory", "1G"])


def test_a_measured_point_without_any_pair_fails_its_ratio_target():
    from bench.scenarios import evaluate

    failed = _sample(0.0, None, 0, verified=False)
    failed["error"] = "RuntimeError: daemon died"
    unpaired = {**_sample(3.0, None, 1), "iperf3": {"error": "RuntimeError: no server"}}
    points = [_point("4 ch", [failed]), _point("8 ch", [unpaired], channels=8)]
    result = evaluate({"name": "device-throughput", "points": points, "measure-notes": [],
                       "paired": True})
    ratios = {t["point"]: t for t in result["targets"] if t["name"].endswith("-ratio")}
    assert ratios["4 ch"]["pass"] is False and "daemon died" in ratios["4 ch"]["reason"]
    assert ratios["8 ch"]["pass"] is False
    assert ratios["8 ch"]["reason"] == "no good sample with its iperf3 run beside it"
    # --no-iperf: no ratio target at all
    result = evaluate({"name": "device-throughput", "points": [_point("4 ch", [failed])],
                       "measure-notes": [], "paired": False})
    assert not [t for t in result["targets"] if t["name"].endswith("-ratio")]


def _fresh_pagereport(monkeypatch, path):
    from bench import pagereport

    monkeypatch.setattr(pagereport, "REPORTED_KIB", path)
    monkeypatch.setattr(pagereport, "_watch", None)
    monkeypatch.setattr(pagereport, "_freed", 0.0)
    return pagereport


def test_page_reporting_window_counts_what_was_reported(tmp_path, monkeypatch):
    counter = tmp_path / "reported_kib"
    counter.write_text("1000\n")
    pagereport = _fresh_pagereport(monkeypatch, counter)
    window = pagereport.Window()
    counter.write_text(str(1000 + 640 * 1024))
    assert window.mib() == 640.0
    assert pagereport.Window().mib() == 0.0


def test_without_the_counter_nothing_is_waited_for_or_known(tmp_path, monkeypatch):
    pagereport = _fresh_pagereport(monkeypatch, tmp_path / "missing")
    assert not pagereport.available()
    assert pagereport.Window().mib() is None
    assert pagereport.settle_sync(quiet=5.0) == 0.0


def test_settle_waits_until_a_pass_is_over(tmp_path, monkeypatch):
    import threading
    import time

    counter = tmp_path / "reported_kib"
    counter.write_text("0")
    pagereport = _fresh_pagereport(monkeypatch, counter)
    stop = threading.Event()

    def reporting_pass() -> None:  # the counter moves every 20 ms for 0.4 s
        for i in range(20):
            new = tmp_path / "new"  # replaced whole, as a sysfs file reads
            new.write_text(str(i * 2048))
            new.replace(counter)
            time.sleep(0.02)
        stop.set()

    threading.Thread(target=reporting_pass, daemon=True).start()
    t0 = time.monotonic()
    waited = pagereport.settle_sync(quiet=0.2, limit=5.0)
    assert stop.is_set()  # it did not start while the counter still moved
    assert time.monotonic() - t0 >= 0.4 and waited >= 0.4
    # and once it has been quiet, there is nothing more to wait for
    time.sleep(0.25)
    assert pagereport.settle_sync(quiet=0.2, limit=5.0) == 0.0


def test_settle_waits_after_a_big_free_for_the_pass_it_brings(tmp_path, monkeypatch):
    import time

    counter = tmp_path / "reported_kib"
    counter.write_text("0")
    pagereport = _fresh_pagereport(monkeypatch, counter)
    pagereport.settle_sync(quiet=0.1)
    t0 = time.monotonic()
    pagereport.note_freed()  # a daemon pair exited
    waited = pagereport.settle_sync(quiet=0.3, limit=5.0)
    assert time.monotonic() - t0 >= 0.3 and waited >= 0.29


async def test_settle_on_the_loop_waits_and_stops_at_once_when_cancelled(tmp_path, monkeypatch):
    import asyncio
    import time

    counter = tmp_path / "reported_kib"
    counter.write_text("0")
    pagereport = _fresh_pagereport(monkeypatch, counter)
    await pagereport.settle(quiet=0.1)
    pagereport.note_freed()
    t0 = time.monotonic()
    assert await pagereport.settle(quiet=0.3, limit=5.0) >= 0.29
    assert time.monotonic() - t0 >= 0.29
    # an interrupted benchmark (Ctrl-C, SIGTERM) does not sit out the wait
    pagereport.note_freed()
    task = asyncio.ensure_future(pagereport.settle(quiet=20.0, limit=30.0))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 0.5


# -- the per-packet timeline ----------------------------------------------------------------

@pytest.mark.e2e
def test_timeline_lines_up_both_daemons_packets(tmp_path):
    out = tmp_path / "tl"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "timeline.py"), "--devices", "2", "--state",
         "16M", "--channels", "2", "--slice", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "verified True" in run.stdout and "busy %" in run.stdout

    from bench.timeline import analyse, read_timeline

    src, dst = read_timeline(out / "src.timeline"), read_timeline(out / "dst.timeline")
    events = {side: [e[2] for e in tl] for side, tl in (("src", src), ("dst", dst))}
    # 2 devices x 4 packets of 4 MiB (x-device-state-packet-size) + a config packet
    # each, on both sides
    assert events["src"].count("queued") == 10
    assert events["dst"].count("received") == 10
    assert events["dst"].count("header") == 10
    assert events["dst"].count("loaded") == 8
    src_points = [e[3] for e in src if e[2] == "checkpoint"]
    assert src_points[0] == "downtime-start" and "shut-received" in src_points
    assert "vm-started" in [e[3] for e in dst if e[2] == "checkpoint"]
    result = analyse(src, dst, 1.0)
    assert sorted(result["channels"]) == [0, 1]
    assert sorted(result["receivers"]) == [0, 1]
    assert sum(r["packets"] for r in result["receivers"].values()) == 10
    sent = sum(c["MB"] for c in result["channels"].values())
    assert sum(r.get("sent MB", 0) for r in result["slices"]) == pytest.approx(sent)
    # the source stops the VM before anything goes out, and the destination
    # receives nothing before it was sent
    first_sent = min(c["first-ms"] for c in result["channels"].values())
    first_received = min(e[0] for e in dst if e[2] == "received")
    assert 0 < first_sent
    assert first_received > min(e[4] for e in src if e[2] == "sent")


def test_timeline_slices_share_each_write_by_its_time():
    from bench.timeline import analyse

    ms = 1_000_000
    src = [[0, "MainThread", "checkpoint", "downtime-start"],
           [1 * ms, "MainThread", "queued", "dev0/vfio", 0],
           # one write of 3 MB from 1 ms to 4 ms: a MB in each of three 1-ms slices
           [4 * ms, "multifd-send-0", "sent", 0, 1 * ms, 3_000_000, "device-state"],
           [5 * ms, "multifd-send-0", "sent", 0, 5 * ms, 1_000_000, "device-state"]]
    dst = [[2 * ms, "multifd-recv-0", "header", 0, "dev0/vfio", True],
           [4 * ms, "multifd-recv-0", "received", 0, "dev0/vfio", 3_000_000],
           # 1.5 ms between that packet's data and the next header's place
           [int(5.5 * ms), "multifd-recv-0", "header", 0, "dev0/vfio", True],
           [6 * ms, "multifd-recv-0", "received", 0, "dev0/vfio", 1_000_000],
           [6 * ms, "vfio-load-dev0", "loaded", "dev0", 4 * ms, 2_000_000],
           [6 * ms, "MainThread", "checkpoint", "vm-started"]]
    result = analyse(src, dst, 1.0)
    rows = {int(r["ms"]): r for r in result["slices"]}
    assert [rows[i]["sent MB"] for i in (1, 2, 3)] == pytest.approx([1.0, 1.0, 1.0])
    assert [rows[i]["busy %"] for i in (1, 2, 3, 4)] == pytest.approx([100, 100, 100, 0])
    assert rows[5]["sent MB"] == pytest.approx(1.0)  # a zero-length write: its end slice
    assert rows[4]["received MB"] == pytest.approx(3.0)
    assert result["receivers"] == {0: {"packets": 2, "body-ms": 2.5, "between-ms": 1.5}}
    assert rows[4]["loaded MB"] + rows[5]["loaded MB"] == pytest.approx(2.0)
    assert result["channels"][0] == {"first-ms": 1.0, "last-ms": 5.0, "MB": 4.0, "jobs": 2,
                                     "busy-ms": 3.0, "idle-ms": 1.0}
    assert result["checkpoints"] == [(0.0, "source", "downtime-start"),
                                     (6.0, "destination", "vm-started")]
    assert result["jobs"] == [{"phase": "stopped", "kind": "device-state", "jobs": 2,
                               "MB": 4.0, "channel-ms": 3.0,
                               "GBps-per-channel": pytest.approx(4 / 3)}]


def test_timeline_jobs_by_kind_before_and_after_the_vm_stopped():
    from bench.timeline import analyse, render

    ms = 1_000_000
    src = [[-3 * ms, "multifd-send-1", "sent", 1, -5 * ms, 500_000, "ram"],
           [0, "MainThread", "checkpoint", "downtime-start"],
           [2 * ms, "multifd-send-0", "sent", 0, 1 * ms, 100_000, "ram"],
           [3 * ms, "multifd-send-1", "sent", 1, 1 * ms, 2_000_000, "device-state"],
           [4 * ms, "multifd-send-0", "sent", 0, 3 * ms, 300_000, "ram"]]
    result = analyse(src, [], 1.0)
    assert result["jobs"] == [
        {"phase": "live", "kind": "ram", "jobs": 1, "MB": 0.5, "channel-ms": 2.0,
         "GBps-per-channel": 0.25},
        {"phase": "stopped", "kind": "device-state", "jobs": 1, "MB": 2.0,
         "channel-ms": 2.0, "GBps-per-channel": 1.0},
        {"phase": "stopped", "kind": "ram", "jobs": 2, "MB": pytest.approx(0.4),
         "channel-ms": 2.0, "GBps-per-channel": pytest.approx(0.2)}]
    text = render(result)
    assert "stopped  ram                2       0.4         2.0              0.20" in text


def test_packet_cost_takes_scattered_pages_through_both_sides():
    from bench.packet_cost import measure

    for fill in ("mixed", "random"):
        r = measure(fill, 8)  # asserts that the destination's RAM equals the source's
        assert r["packets"] == 8 and r["source-us"] > 0 and r["destination-us"] > 0
        if fill == "random":
            assert r["runs-per-packet"] == 1 and r["normal-per-packet"] == 128
        else:  # about half the pages zero, at random: many short runs
            assert 20 < r["normal-per-packet"] < 108 and r["runs-per-packet"] > 10


# -- bench/datapath.py ------------------------------------------------------------------------

@pytest.mark.parametrize("mode, extra", [
    ("loop", []),
    ("threads", []),
    ("pool", ["--pool", "2"]),            # 3 streams over 2 polling threads: uneven
    ("pool", ["--pool", "2", "--spread", "4M"]),
])
def test_datapath_modes_move_every_byte(mode, extra):
    cmd = [sys.executable, str(ROOT / "bench" / "datapath.py"), "--modes", mode,
           "--streams", "3", "--size", "8M", "--packet", "64K", "--repeat", "1",
           "--bufsize", "64K", *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    row = run.stdout.strip().splitlines()[-1].split()
    assert row[0] == "3" and float(row[1]) > 0


# -- bench/ramp.py ----------------------------------------------------------------------------

def test_ramp_times_every_variant_and_writes_its_runs(tmp_path):
    out = tmp_path / "ramp.json"
    cmd = [sys.executable, str(ROOT / "bench" / "ramp.py"), "--repeat", "1", "--size", "256",
           "--idle", "0.05", "--warm-ms", "5", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert sorted(runs) == ["cold", "pinned", "spun", "warmed"]
    for (early, later), in runs.values():
        assert early > 0 and later >= 0   # 256 MiB may be done before 100 ms
    assert run.stdout.count("ratio") == 5  # the header and one line per variant
