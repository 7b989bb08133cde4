"""Run the atheris fuzz target for a bounded time, seeded with real channel bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAPTURES = ROOT.parent / "shared" / "captures"


def test_channel_decoders_survive_fuzzing(tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, path in enumerate(sorted(CAPTURES.glob("*/*/multifd-*.bin"))):
        # selector byte 0 (V2) or 1 (V1), no cuts, then the channel's first packets
        selector = b"\x00" if "10.0" in str(path) else b"\x01"
        (corpus / f"seed-{i}").write_bytes(selector + b"\x00" + path.read_bytes()[:6000])
    out = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz_channel.py"), str(corpus),
         "-max_total_time=15", "-rss_limit_mb=1024", "-print_final_stats=1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done" in out.stderr
