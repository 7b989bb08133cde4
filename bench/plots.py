"""PNG plots of a run (matplotlib, Agg backend): one file per scenario."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from bench.harness import MiB, size_text
from bench.report import phases

DPI = 80


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(result: dict[str, Any], width: int = 100) -> str:
    return "\n".join(textwrap.wrap(result.get("title", result["name"]), width))


def _err(points: list[dict[str, Any]], metric: str, scale: float = 1.0) -> tuple[
        list[float], list[list[float]]]:
    meds, lo, hi = [], [], []
    for p in points:
        s = p.get("summary", {}).get(metric)
        if s is None:
            meds.append(float("nan"))
            lo.append(0.0)
            hi.append(0.0)
        else:
            meds.append(s["median"] * scale)
            lo.append((s["median"] - s["min"]) * scale)
            hi.append((s["max"] - s["median"]) * scale)
    return meds, [lo, hi]


def _matching(points: list[dict[str, Any]], others: list[dict[str, Any]]) -> list[
        dict[str, Any] | None]:
    """For each of ``points``, the one of ``others`` with the same mode and channels."""
    by_mode = {(o.get("multifd"), o.get("channels")): o for o in others}
    return [by_mode.get((p.get("multifd"), p.get("channels"))) for p in points]


def _value(point: dict[str, Any] | None, key: str) -> float:
    """``point[key]`` (a ratio), NaN where there is no such point or value."""
    value = None if point is None else point.get(key)
    return float("nan") if value is None else float(value)


def _median(point: dict[str, Any] | None, metric: str) -> float:
    """The median of ``metric`` over a point's samples, NaN where there is none."""
    summary = None if point is None else point.get("summary", {}).get(metric)
    return float("nan") if summary is None else float(summary["median"])


def _ratio_bars(ax: Any, x: list[int], points: list[dict[str, Any]],
                unverified: list[dict[str, Any] | None], key: str, target: float,
                label: str) -> None:
    """Our ratios as bars, beside those without the RAM digest where there are any."""
    ours = [_value(p, key) for p in points]
    if any(u is not None for u in unverified):
        width = 0.4
        ax.bar([i - width / 2 for i in x], ours, width, color="tab:blue",
               label="multifd-migrate")
        ax.bar([i + width / 2 for i in x], [_value(u, key) for u in unverified], width,
               color="tab:cyan", label="x-verify-ram off")
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.bar(x, ours, color="tab:blue")
    ax.axhline(target, color="red", linestyle=":")
    ax.set_ylabel(label)


def _throughput(result: dict[str, Any], metric: str, ratio: float, path: Path,
                with_downtime: bool = False) -> None:
    plt = _plt()
    pts = result["points"]
    labels = [p["key"].replace(" ch", "") for p in pts]
    x = list(range(len(pts)))
    # RAM: QEMU as the peer, and our runs without the digest (QEMU has none)
    qemu = _matching(pts, result.get("qemu-points", []))
    unverified = _matching(pts, result.get("variant-points", []))
    with_qemu = any(q is not None for q in qemu)
    panels = 2 + with_downtime + with_qemu
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.6 * panels), sharex=True)
    ax = axes[0]
    meds, err = _err(pts, metric)
    ax.errorbar(x, meds, yerr=err, fmt="o-", capsize=3, label="multifd-migrate (median, min-max)")
    if any(u is not None for u in unverified):
        ax.plot(x, [_median(u, metric) for u in unverified], "o-", color="tab:cyan",
                label="multifd-migrate, x-verify-ram off (median)")
    if with_qemu:
        ax.plot(x, [_median(q, metric) for q in qemu], "^-", color="tab:green",
                label="QEMU (median)")
    base = [p.get("iperf3-GBps") for p in pts]
    if any(b is not None for b in base):
        ax.plot(x, [b if b is not None else float("nan") for b in base], "s--", color="grey",
                label="iperf3 -l 1M, same streams")
        ax.plot(x, [b * ratio if b is not None else float("nan") for b in base], ":",
                color="red", label=f"target {ratio:g} x iperf3")
    ax.set_ylabel("GB/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="lower center", ncol=2 if with_qemu else 1)
    ax.set_title(_title(result), fontsize=8)
    _ratio_bars(axes[1], x, pts, unverified, "ratio", ratio, "ratio to iperf3")
    if with_qemu:
        _ratio_bars(axes[2], x, pts, unverified, "vs-qemu", 1.0, "ratio to QEMU")
    if with_downtime:
        ax = axes[-1]
        meds, err = _err(pts, "downtime-ms")
        ax.errorbar(x, meds, yerr=err, fmt="o-", capsize=3, color="tab:orange")
        ax.set_ylabel("downtime ms")
        ax.set_ylim(bottom=0)
    axes[-1].set_xticks(x, labels)
    axes[-1].set_xlabel("multifd channels ('main' = non-multifd, main channel only)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


PHASE_LABELS = {
    "downtime-start": "decide", "vm-stopped": "stop VM", "switchover-start-sent": "switchover",
    "iterable-saved": "device data (save tasks)", "non-iterable-saved": "config/FULL",
    "eof-sent": "EOF", "channels-drained": "drain channels",
    "shut-received": "destination load+verify+start", "rest": "rest",
}


def _downtime(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    pts = result["points"]
    counts = sorted({p["devices"] for p in pts})
    names: list[str] = []
    for p in pts:
        for n in phases(p):
            if n not in names:
                names.append(n)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    colors = plt.get_cmap("tab10")
    for j, multifd in enumerate((True, False)):
        for i, n in enumerate(counts):
            p = next((q for q in pts if q["devices"] == n and q["multifd"] is multifd), None)
            if p is None:
                continue
            ph = phases(p)
            bottom = 0.0
            xpos = i + (j - 0.5) * width
            for k, name in enumerate(names):
                v = ph.get(name, 0.0)
                ax.bar(xpos, v, width * 0.95, bottom=bottom, color=colors(k % 10),
                       edgecolor="black" if not multifd else None, linewidth=0.4,
                       label=PHASE_LABELS.get(name, name) if (i == 0 and j == 0) else None)
                bottom += v
            ax.text(xpos, bottom, "mfd" if multifd else "main", ha="center", va="bottom",
                    fontsize=6)
    ax.set_xticks(range(len(counts)), [str(c) for c in counts])
    ax.set_xlabel("devices (left bar: multifd, right bar: main channel only)")
    ax.set_ylabel("downtime ms (stacked by checkpoint)")
    ax.set_title(_title(result), fontsize=7)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _scaling(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, sweep, xlabel in ((axes[0], "size", "total device state (4 devices)"),
                              (axes[1], "devices", "devices (same total)")):
        pts = [p for p in result["points"] if p["sweep"] == sweep]
        if not pts:
            continue
        xs = [p["bytes"] / MiB if sweep == "size" else p["devices"] for p in pts]
        meds, err = _err(pts, "downtime-ns-per-B")
        ax.errorbar(xs, meds, yerr=err, fmt="o-", capsize=3)
        good = sorted(m for m in meds if m == m)
        if good:
            centre = good[len(good) // 2] if len(good) % 2 else \
                (good[len(good) // 2 - 1] + good[len(good) // 2]) / 2
            ax.axhspan(centre * 0.85, centre * 1.15, color="green", alpha=0.12,
                       label="median +-15 %")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [size_text(p["bytes"]) if sweep == "size" else str(p["devices"])
                           for p in pts], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("downtime per byte, ns")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle(_title(result), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _dst_memory(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    pts = result["points"]
    total = result["config"]["bytes"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    ax = axes[0]
    x = list(range(len(pts)))
    meds, err = _err(pts, "dst-overhead", 1 / MiB)
    ax.bar([i - 0.2 for i in x], [m if m == m else 0 for m in meds], 0.4, yerr=err,
           label="peak RSS beyond device state")
    ax.bar([i + 0.2 for i in x], [p["rss-limit-overhead"] / MiB for p in pts], 0.4,
           color="lightgrey", label="target limit")
    ax.set_xticks(x, [p["key"].replace(", ", "\n") for p in pts], fontsize=7)
    ax.set_ylabel("MiB")
    ax.legend(fontsize=7)
    ax = axes[1]
    for p in pts:
        first = next((s for s in p["samples"] if "rss-timeline" in s), None)
        if first and first["rss-timeline"]:
            ts = [t for t, _ in first["rss-timeline"]]
            vs = [(v - total) / MiB for _, v in first["rss-timeline"]]
            ax.plot(ts, vs, label=p["key"], linewidth=1)
    ax.set_xlabel("s since migrate")
    ax.set_ylabel("destination RSS - device state, MiB")
    ax.legend(fontsize=6)
    fig.suptitle(_title(result), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_all(results: dict[str, Any], out: Path) -> list[str]:
    """Write one PNG per finished scenario into ``out``; returns the file names."""
    written = []
    for name, r in results["scenarios"].items():
        if r.get("status") != "ok" or not r.get("points"):
            continue
        path = out / f"{name}.png"
        if name == "device-throughput":
            _throughput(r, "device-GBps", 0.9, path)
        elif name == "ram-throughput":
            _throughput(r, "ram-GBps", 0.8, path)
        elif name == "shaped-network":
            _throughput(r, "device-GBps", 0.9, path, with_downtime=True)
        elif name == "downtime-devices":
            _downtime(r, path)
        elif name == "scaling":
            _scaling(r, path)
        elif name == "dst-memory":
            _dst_memory(r, path)
        else:
            continue
        r["plot"] = path.name
        written.append(path.name)
    return written
