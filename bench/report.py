"""Tables of a run: plain text for the terminal, Markdown for docs/performance.md."""

from __future__ import annotations

import statistics
from typing import Any

from bench.harness import MiB


def _spread(point: dict[str, Any], metric: str, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    s = point.get("summary", {}).get(metric)
    if s is None:
        return "failed" if point.get("samples") else "-"
    med = fmt.format(s["median"] * scale)
    if s["n"] > 1:
        return f"{med} ({fmt.format(s['min'] * scale)}-{fmt.format(s['max'] * scale)})"
    return med


def _num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MiB:.1f}"


def _verdict(t: dict[str, Any] | None) -> str:
    if t is None:
        return ""
    return {True: "PASS", False: "FAIL", None: "FAIL"}[t["pass"]]


def phases(point: dict[str, Any]) -> dict[str, float]:
    """Median ms of each downtime phase (named by the checkpoint that ends it)."""
    per: dict[str, list[float]] = {}
    for s in point.get("samples", []):
        if s.get("verified"):
            for name, ms in s["metrics"].get("breakdown-ms", []):
                per.setdefault(name, []).append(ms)
    return {k: statistics.median(v) for k, v in per.items()}


def _targets_for(result: dict[str, Any], point: str) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in result.get("targets", []) if t.get("point") == point}


def scenario_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    name = result["name"]
    pts = result.get("points", [])
    rows: list[list[str]] = []
    if name in ("device-throughput", "shaped-network"):
        head = ["channels", "device state GB/s", "iperf3 GB/s", "ratio", "target >=0.9",
                "end-to-end GB/s", "downtime ms", "overhead ms", "target <=30"]
        for p in pts:
            t = _targets_for(result, p["key"])
            rows.append([p["key"], _spread(p, "device-GBps"), _num(p.get("iperf3-GBps")),
                         _num(p.get("ratio")), _verdict(t.get(f"{name}-ratio")),
                         _spread(p, "loaded-GBps"), _spread(p, "downtime-ms", "{:.0f}"),
                         _spread(p, "overhead-ms", "{:.1f}"),
                         _verdict(t.get("downtime-overhead"))])
        if name == "shaped-network":
            head, rows = head[:7], [r[:7] for r in rows]
    elif name == "ram-throughput":
        head = ["channels", "RAM GB/s", "iperf3 GB/s", "ratio", "target >=0.8",
                "QEMU GB/s", "ours/QEMU", "target >=1.0", "on the wire ms", "downtime ms"]
        # then the variants (x-verify-ram off), and QEMU's rows last
        for p in [*pts, *result.get("variant-points", []), *result.get("qemu-points", [])]:
            t = _targets_for(result, p["key"])
            qemu = p.get("peer") == "qemu"
            rows.append([p["key"], _spread(p, "ram-GBps"), _num(p.get("iperf3-GBps")),
                         _num(p.get("ratio")), _verdict(t.get("ram-throughput-ratio")),
                         _num(p.get("qemu-GBps")) if not qemu else "",
                         _num(p.get("vs-qemu")) if not qemu else "",
                         _verdict(t.get("ram-vs-qemu")),
                         _spread(p, "transfer-ms", "{:.0f}"), _spread(p, "downtime-ms", "{:.0f}")])
    elif name == "downtime-devices":
        head = ["devices", "mode", "downtime ms", "multifd/main", "target <=0.45",
                "device data ms", "destination finish ms"]
        for p in pts:
            t = _targets_for(result, p["key"])
            ph = phases(p)
            rows.append([str(p["devices"]), f"multifd {p['channels']} ch" if p["multifd"]
                         else "main channel", _spread(p, "downtime-ms", "{:.0f}"),
                         _num(p.get("ratio")) if p["multifd"] else "",
                         _verdict(t.get("downtime-ratio")),
                         _num(ph.get("iterable-saved"), "{:.0f}"),
                         _num(ph.get("shut-received"), "{:.1f}")])
    elif name == "scaling":
        head = ["sweep", "point", "downtime ms", "GB/s stopped", "ns per byte",
                "vs sweep median"]
        for p in pts:
            rows.append([p["sweep"], p["key"], _spread(p, "downtime-ms", "{:.0f}"),
                         _spread(p, "device-GBps"), _spread(p, "downtime-ns-per-B", "{:.3f}"),
                         _num(p.get("cost-vs-median"), "{:.2f}")])
    elif name == "dst-memory":
        head = ["point", "peak RSS MiB", "beyond state MiB", "limit MiB", "target",
                "sampled peak MiB", "downtime ms"]
        for p in pts:
            t = _targets_for(result, p["key"])
            s = p.get("summary", {})
            rows.append([p["key"], _mib(s.get("dst-hwm", {}).get("median")),
                         _spread(p, "dst-overhead", "{:.1f}", 1 / MiB),
                         _mib(p.get("rss-limit-overhead")), _verdict(t.get("dst-rss")),
                         _mib(s.get("dst-sampled-peak", {}).get("median")),
                         _spread(p, "downtime-ms", "{:.0f}")])
    else:
        head = ["point"]
        rows = [[p["key"]] for p in pts]
    return head, rows


def render_text(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render_md(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def _target_value(t: dict[str, Any]) -> str:
    v = t["value"]
    if v is None:
        return "failed"
    if t["unit"] == "B":
        return f"{v / MiB:.1f} MiB"
    if t["unit"] == "ms":
        return f"{v:.1f} ms"
    if t["name"].startswith("flat-cost"):
        return f"{v * 100:.1f} %"
    return f"{v:.2f}"


def _target_limit(t: dict[str, Any]) -> str:
    lim = t["limit"]
    if t["unit"] == "B":
        return f"{t['op']} {lim / MiB:.0f} MiB"
    if t["unit"] == "ms":
        return f"{t['op']} {lim:.0f} ms"
    if t["name"].startswith("flat-cost"):
        return f"{t['op']} {lim * 100:.0f} %"
    return f"{t['op']} {lim:g}"


def targets_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    rows, footnotes = [], []
    for r in results["scenarios"].values():
        for t in r.get("targets", []):
            what = t["what"]
            if t.get("reason"):
                footnotes.append(t["reason"])
                what += f" [{len(footnotes)}]"
            rows.append([r["name"], what, _target_value(t), _target_limit(t), _verdict(t)])
    return ["scenario", "target", "measured", "limit", "result"], rows, footnotes


def render_all(results: dict[str, Any], md: bool = False) -> str:
    render = render_md if md else render_text
    parts = []
    for r in results["scenarios"].values():
        title = r.get("title", r["name"])
        header = f"### {r['name']}: {title}" if md else f"== {r['name']}: {title}"
        if r["status"] != "ok":
            parts.append(f"{header}\n\n{r['status'].upper()}: {r.get('reason')}\n")
            continue
        head, rows = scenario_table(r)
        text = render(head, rows)
        notes = "".join(f"\n{'- ' if md else '  note: '}{n}" for n in r.get("notes", []))
        parts.append(f"{header}\n\n{text}\n{notes}\n" if md else f"{header}\n{text}{notes}\n")
    busy = sum(1 for r in results["scenarios"].values() for p in r.get("points", [])
               for s in p.get("samples", []) if s.get("foreign-processes"))
    if busy:
        parts.append(f"{'**Warning**' if md else 'WARNING'}: {busy} sample(s) ran while other "
                     "processes (migrate daemons, tests, iperf3, or any CPU load) ran on this "
                     "machine, even after retries: see 'foreign-processes' and 'foreign-cpu' in "
                     "results.json.\n")
    head, rows, footnotes = targets_table(results)
    if rows:
        passed = sum(1 for r in rows if r[-1] == "PASS")
        title = f"targets: {passed} of {len(rows)} pass"
        notes = "".join(f"\n[{i}] {n}" for i, n in enumerate(footnotes, 1))
        parts.append((f"### {title}\n\n" if md else f"== {title}\n") + render(head, rows)
                     + ("\n" + notes if md and notes else notes) + "\n")
    return "\n".join(parts)
