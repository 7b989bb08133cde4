"""Summaries of py-spy raw (collapsed-stack) profiles written with ``--profile``."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    """'send (migrate_src/channels.py:120)' -> 'send (migrate_src/channels.py)'."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('func')} ({path})"


#: frames that only run while a daemon starts (imports, generating or pre-faulting the
#: VM's memory before QMP opens): left out of the summary, which is about migrating
STARTUP = ("_find_and_load", "prefault (", "generate_stream (", "GuestRam._fill (",
           "VirtualMachine.prepare (", "build_vm (", "_compile_bytecode (")


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = startup = 0
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        count = int(m.group("count"))
        frames = [_frame_name(f) for f in m.group("stack").split(";")
                  if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if any(f.startswith(STARTUP) for f in frames):
            startup += count
            continue
        total += count
        self_time[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count
    pct = (lambda c: round(100 * c / total, 1)) if total else (lambda c: 0.0)
    return {
        "file": path.name, "samples": total, "startup-samples": startup,
        "self": [(f, pct(c)) for f, c in self_time.most_common(top)],
        "inclusive": [(f, pct(c)) for f, c in inclusive.most_common(top * 2)],
    }


def summarize_dir(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(root.rglob("*.txt")):
        if path.name == "summary.txt":
            continue
        try:
            out[str(path.relative_to(root))] = summarize_profile(path)
        except OSError:
            continue
    return out


def render(summaries: dict[str, Any]) -> str:
    parts = []
    for name, s in summaries.items():
        lines = [f"== {name}: {s['samples']} on-CPU samples at 500 Hz while serving "
                 f"({s['startup-samples']} more at startup, left out)", "  self time:"]
        lines += [f"    {pct:5.1f} %  {f}" for f, pct in s["self"]]
        lines.append("  inclusive:")
        lines += [f"    {pct:5.1f} %  {f}" for f, pct in s["inclusive"]]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
