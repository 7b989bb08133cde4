"""migrate-ctl's rendering: a progress bar that never runs backwards, and summaries."""

from __future__ import annotations

from migrate_ctl.progress import Bar, human_bytes, progress_line, summary_lines


def test_bar_never_runs_backwards_when_remaining_grows():
    bar = Bar(width=10)
    assert bar.render(0, 100, False) == "[" + "." * 10 + "]"
    assert bar.render(50, 50, False) == "[#####.....]"
    # re-dirtied data makes "remaining" grow: the bar pauses instead of shrinking
    assert bar.render(60, 140, False) == "[#####.....]"
    assert bar.render(60, 0, True) == "[##########]"


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert human_bytes(1.5 * 1024**3) == "1.5 GiB"


def test_progress_line_and_summary():
    info = {"status": "completed", "total-time": 1234, "setup-time": 10, "downtime": 42,
            "ram": {"transferred": 2 << 20}, "vfio": {"transferred": 2 << 20},
            "x-channels": [{"id": "main", "bytes": 100, "packets": 3},
                           {"id": "0", "bytes": 2 << 20, "packets": 2}],
            "x-devices": [{"id": "gpu0", "mode": "multifd", "transferred": 2 << 20}],
            "x-downtime-checkpoints": {"vm-stopped": 0.1, "channels-drained": 40.0}}
    line = progress_line(info, 1e9, Bar())
    assert "completed" in line and "2.0 MiB" in line and "1.00 GB/s" in line
    text = "\n".join(summary_lines(info, verified=True))
    for fragment in ("downtime:      42 ms", "gpu0 (multifd, 2.0 MiB)", "0=2.0 MiB",
                     "verified, all devices match", "throughput:"):
        assert fragment in text, fragment
    assert "guest RAM:" not in text
    unverified = "\n".join(summary_lines({**info, "x-ram-verified": False}))
    assert "guest RAM:     not compared by the migration (x-verify-ram off" in unverified
    failed = "\n".join(summary_lines({"status": "failed", "error-desc": "boom"}))
    assert "error:         boom" in failed
