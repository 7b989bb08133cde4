#!/usr/bin/env python3
"""One entry point for a fresh machine that has only Python 3.

    python3 dev.py demo [ARGS...]   set up, then run a real demo migration
    python3 dev.py test [ARGS...]   set up, then run the whole test suite

Setting up means: create ``.venv`` beside this file (once) and install the project
with its test extras into it (again whenever ``pyproject.toml`` changes).  Nothing
is installed outside ``.venv``.  Extra arguments go to ``migrate-demo`` or pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".installed-from"


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _wanted_stamp() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def setup() -> Path:
    """Create the virtualenv and install the project into it when needed."""
    py = _venv_python()
    if not py.exists():
        print(f"[dev] creating virtualenv in {VENV}", flush=True)
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        except Exception as exc:  # ensurepip missing on some distributions
            sys.exit(
                f"[dev] could not create a virtualenv ({exc}).\n"
                "      On Debian/Ubuntu install it first: apt-get install python3-venv"
            )
    stamp = _wanted_stamp()
    if not STAMP.exists() or STAMP.read_text().strip() != stamp:
        print("[dev] installing multifd-migrate and its test tools into .venv", flush=True)
        pip = [str(py), "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "install", "-e", f"{ROOT}[test]"], check=True)
        STAMP.write_text(stamp + "\n")
    return py


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__.strip())
        return 2
    cmd, rest = argv[0], argv[1:]
    py = setup()
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if cmd == "setup":
        return 0
    if cmd == "demo":
        return subprocess.call([str(VENV / "bin" / "migrate-demo"), *rest], cwd=ROOT, env=env)
    return subprocess.call([str(py), "-m", "pytest", *rest], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
