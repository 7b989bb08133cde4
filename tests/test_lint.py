"""Static checks the project promises: ruff clean everywhere, mypy --strict on protocol/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_protocol():
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "protocol/"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_protocol_never_imports_asyncio():
    for path in (ROOT / "protocol").glob("*.py"):
        text = path.read_text()
        assert "import asyncio" not in text, path
