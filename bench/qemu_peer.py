#!/usr/bin/env python3
"""Real QEMU as the peer of the ram-throughput benchmark: QEMU migrating to QEMU.

Two unmodified ``qemu-system-x86_64`` processes on this machine, both paused from the
start (``-S``: no guest code ever runs, so TCG without KVM is fine), guest RAM from a
``memory-backend-file`` with ``share=on,prealloc=on`` in a tmpfs (pre-faulted on both
sides).  The source's RAM file is filled with random bytes once; the destination's is
a new file that QEMU creates.  Both get the multifd capability, ``multifd-channels N``,
an unlimited ``max-bandwidth`` (QEMU's default is 128 MiB/s) and the same
``downtime-limit`` as our daemons; the destination listens (``-incoming defer`` then
``migrate-incoming``), the source migrates, the harness polls ``query-migrate`` until
both sides say ``completed``, and then checks that the destination's RAM file holds
exactly the source's content.  A migration that fails or whose RAM differs is kept
but never counted.

Metric (what ``bench/harness.derive`` calls ``ram-GBps`` for our daemons):
``ram.transferred / (total-time - setup-time)``, in 10^9 bytes/s.  QEMU 7.2 reports no
checkpoint at which the channels drained, so the whole downtime (the stop-and-copy of
what was left, and what follows it) counts as wire time; see docs/performance.md.

    python bench/qemu_peer.py --channels 4 --size 2G --repeat 3

The harness (bench/scenarios.py, scenario ram-throughput) calls :func:`migrate_once`
with one :class:`RamImage` per run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import pagereport  # noqa: E402

QEMU = "qemu-system-x86_64"
APT_QEMU = "apt-get update && apt-get install -y --no-install-recommends qemu-system-x86"
MiB = 1 << 20
GiB = 1 << 30
MAX_BANDWIDTH = 1 << 40   # bytes/s: "unlimited" (QEMU's default max-bandwidth is 128 MiB/s)
DOWNTIME_LIMIT = 300      # ms, QEMU's default and what the harness gives our daemons
CHUNK = 16 * MiB


# -- the binary -------------------------------------------------------------------------

def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def qemu_version(binary: str | None = None) -> str | None:
    binary = binary or qemu_binary()
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0] if lines else None


def unavailable_reason(size: int, directory: str | Path | None = None) -> str | None:
    """Why QEMU cannot be the peer here (None: it can)."""
    if qemu_binary() is None:
        return f"{QEMU} is not installed: {APT_QEMU}"
    d = Path(directory or default_dir())
    try:
        st = os.statvfs(d)
    except OSError as exc:
        return f"cannot use {d} for the guest RAM files: {exc}"
    free = st.f_bavail * st.f_frsize
    need = 2 * size + 256 * MiB   # source image + destination file
    if free < need:
        return (f"{d} has {free / GiB:.1f} GiB free, the two guest RAM files need "
                f"{need / GiB:.1f} GiB")
    return None


def default_dir() -> str:
    """A tmpfs when there is one, so guest RAM files are RAM."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


# -- the guest RAM ----------------------------------------------------------------------

def _hasher() -> tuple[str, Any]:
    try:
        import xxhash

        return "xxh3_128", xxhash.xxh3_128
    except ImportError:
        return "sha256", hashlib.sha256


def file_digest(path: str | Path, length: int | None = None) -> str:
    """Digest of the first ``length`` bytes of a file (all of it by default)."""
    name, new = _hasher()
    h = new()
    left = length if length is not None else os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while left > 0:
            n = f.readinto(view[:min(CHUNK, left)])
            if not n:
                break
            h.update(view[:n])
            left -= n
    if left:
        return f"{name}:short-by-{left}"
    return f"{name}:{h.hexdigest()}"


@dataclass
class RamImage:
    """The source's guest RAM: a file of random bytes and its digest."""

    path: Path
    size: int
    digest: str
    seconds: float = 0.0

    @classmethod
    def create(cls, size: int, directory: str | Path | None = None) -> RamImage:
        if size % (2 * MiB):
            raise ValueError("the guest RAM size must be a multiple of 2 MiB")
        fd, name = tempfile.mkstemp(prefix="qemu-peer-src-", suffix=".ram",
                                    dir=str(directory or default_dir()))
        t0 = time.monotonic()
        try:
            os.ftruncate(fd, size)

            def fill(off: int) -> None:   # os.urandom releases the GIL: 2 threads, 2x
                n = min(CHUNK, size - off)
                os.pwrite(fd, os.urandom(n), off)

            with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:
                list(ex.map(fill, range(0, size, CHUNK)))
        except BaseException:
            os.close(fd)
            os.unlink(name)
            raise
        os.close(fd)
        digest = file_digest(name, size)
        return cls(Path(name), size, digest, round(time.monotonic() - t0, 2))

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
            pagereport.note_freed()

    def __enter__(self) -> RamImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# -- QMP --------------------------------------------------------------------------------

class QmpError(RuntimeError):
    pass


class Qmp:
    """A minimal synchronous QMP client over a unix socket (events are kept, not used)."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise QmpError(f"QEMU exited with {proc.returncode} before QMP opened")
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(path))
                break
            except OSError as exc:
                s.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {path} did not open within {timeout:g} s"
                                   ) from exc
                time.sleep(0.02)
        # the greeting comes once QEMU's main loop runs: after the RAM is pre-faulted
        s.settimeout(max(1.0, deadline - time.monotonic()))
        self.sock = s
        self.file = s.makefile("rwb", buffering=0)
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        self.version = greeting.get("QMP", {}).get("version", {})
        s.settimeout(60)
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise QmpError("QMP connection closed")
        return json.loads(line)

    def execute(self, name: str, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise QmpError(f"{name}: {r['error'].get('desc', r['error'])}")
            return r.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.sock.close()


# -- one QEMU ---------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when this process dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


# QEMU trace events (the "log" backend of Debian's build) the source writes with
# wall-clock timestamps: they give the checkpoints query-migrate does not report
TRACE_EVENTS = ("migrate_set_state", "runstate_set", "multifd_send_sync_main",
                "migration_thread_after_loop")


def qemu_argv(ram_path: str | Path, size: int, qmp_path: str | Path, *,
              incoming: bool, binary: str = QEMU,
              trace_log: str | Path | None = None) -> list[str]:
    """The command line of one side; the destination gets ``-incoming defer``."""
    mib = size // MiB
    argv = [binary, "-machine", "pc,accel=tcg,memory-backend=ram0",
            "-no-user-config", "-nodefaults", "-display", "none", "-S", "-m", f"{mib}M",
            "-object", f"memory-backend-file,id=ram0,size={mib}M,mem-path={ram_path},"
                       "share=on,prealloc=on",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    if incoming:
        argv += ["-incoming", "defer"]
    if trace_log is not None:
        for event in TRACE_EVENTS:
            argv += ["-trace", f"enable={event}"]
        argv += ["-D", str(trace_log), "-msg", "timestamp=on"]
    return argv


def trace_checkpoints(log: str | Path) -> dict[str, float]:
    """ms since the migration's setup began, from the source's trace log:

    * ``active``: setup done; ``vm-stopped``: runstate finish-migrate (downtime starts);
    * ``channels-drained``: the last ``multifd_send_sync_main`` (in ``ram_save_complete``
      every channel has written all its pages to its socket) - multifd only;
    * ``completed``: the thread left its loop (QEMU's total-time ends there), after the
      destination's SHUT on the return path.
    """
    times: dict[str, float] = {}
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        head, sep, rest = line.partition(":")
        if not sep or "@" not in head:
            continue
        try:
            ts = float(head.split("@", 1)[1]) * 1000
        except ValueError:
            continue
        if rest.startswith("migrate_set_state new state setup"):
            times = {"setup": ts}
        elif not times:
            continue
        elif rest.startswith("migrate_set_state new state active"):
            times.setdefault("active", ts)
        elif rest.startswith("runstate_set") and "(finish-migrate)" in rest.split("new_state")[-1]:
            times["vm-stopped"] = ts
        elif rest.startswith("multifd_send_sync_main ") and "vm-stopped" in times:
            times["channels-drained"] = ts
        elif rest.startswith("migration_thread_after_loop"):
            times["completed"] = ts
    t0 = times.pop("setup", None)
    if t0 is None:
        return {}
    return {k: round(v - t0, 3) for k, v in times.items()}


@dataclass
class Qemu:
    side: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    qmp: Qmp | None = None

    @classmethod
    def start(cls, side: str, argv: list[str], log_path: Path) -> Qemu:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    preexec_fn=_die_with_parent)
        return cls(side, argv, proc, log_path)

    def connect(self, qmp_path: Path, timeout: float) -> Qmp:
        try:
            self.qmp = Qmp(qmp_path, self.proc, timeout)
        except (QmpError, OSError) as exc:
            raise QmpError(f"{self.side} QEMU: {exc}; log: {self.log_tail()}") from exc
        return self.qmp

    def log_tail(self, n: int = 10) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.execute("quit")
            self.qmp.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- one migration ----------------------------------------------------------------------

FINAL = ("completed", "failed", "cancelled")


def derive(info: dict[str, Any], trace: dict[str, float] | None = None) -> dict[str, Any]:
    """The harness's metrics from QEMU's source ``query-migrate``.

    * ``transfer-ms`` = ``total-time`` - ``setup-time``: query-migrate has no checkpoint
      for "channels drained", so the downtime counts in full (our daemons' measure
      leaves out the part of the downtime after the channels drained);
    * ``ram-GBps`` = ``ram.transferred`` / transfer-ms (10^9 bytes/s);
    * from the source's trace (:func:`trace_checkpoints`), for information:
      ``post-drain-ms`` (channels drained -> completed: what counts for QEMU but not for
      ours), ``stopcopy-ms`` (VM stopped -> channels drained).
    """
    m: dict[str, Any] = {"status": info.get("status")}
    if info.get("status") != "completed":
        return m
    ram = info.get("ram", {})
    total = float(info.get("total-time", 0))
    setup = float(info.get("setup-time", 0))
    m.update({"downtime-ms": float(info.get("downtime", 0)), "total-ms": total,
              "setup-ms": setup, "bytes-sent": int(ram.get("transferred", 0)),
              "ram-bytes": int(ram.get("normal-bytes", 0)),
              "multifd-bytes": int(ram.get("multifd-bytes", 0)),
              "downtime-bytes": int(ram.get("downtime-bytes", 0)),
              "dirty-sync-count": int(ram.get("dirty-sync-count", 0))})
    transfer = total - setup
    m["transfer-ms"] = round(transfer, 3)
    if transfer > 0:
        m["ram-GBps"] = m["bytes-sent"] / (transfer / 1000) / 1e9
    cp = trace or {}
    if "channels-drained" in cp and "completed" in cp:
        m["post-drain-ms"] = round(cp["completed"] - cp["channels-drained"], 3)
    if "channels-drained" in cp and "vm-stopped" in cp:
        m["stopcopy-ms"] = round(cp["channels-drained"] - cp["vm-stopped"], 3)
    return m


def migrate_once(image: RamImage, channels: int, *, workdir: str | Path | None = None,
                 multifd: bool = True, return_path: bool = True,
                 downtime_limit: int = DOWNTIME_LIMIT, timeout: float | None = None,
                 startup_timeout: float = 300.0, poll: float = 0.05,
                 verify: bool = True) -> dict[str, Any]:
    """Start a destination and a source QEMU on ``image``, migrate, verify; the sample.

    The sample has the harness's shape: ``src`` / ``dst`` (their ``query-migrate``),
    ``verified``, ``error``, ``metrics`` (see :func:`derive`), ``wall-s``, plus ``argv``
    and the timings of the parts not measured (startup, verification).
    """
    binary = qemu_binary()
    if binary is None:
        raise RuntimeError(f"{QEMU} is not installed: {APT_QEMU}")
    timeout = timeout if timeout is not None else 120.0 + image.size / 50e6
    base = Path(workdir or image.path.parent)
    tmp = Path(tempfile.mkdtemp(prefix="qemu-peer-"))
    dst_ram = base / f"qemu-peer-dst-{os.getpid()}-{threading.get_ident()}.ram"
    with contextlib.suppress(FileNotFoundError):
        dst_ram.unlink()
    sides: list[Qemu] = []
    sample: dict[str, Any] = {"peer": "qemu", "channels": channels, "multifd": multifd}
    try:
        t0 = time.monotonic()
        dst = Qemu.start("dst", qemu_argv(dst_ram, image.size, tmp / "dst.qmp",
                                          incoming=True, binary=binary), tmp / "dst.log")
        sides.append(dst)
        src = Qemu.start("src", qemu_argv(image.path, image.size, tmp / "src.qmp",
                                          incoming=False, binary=binary,
                                          trace_log=tmp / "src-trace.log"), tmp / "src.log")
        sides.append(src)
        dq = dst.connect(tmp / "dst.qmp", startup_timeout)
        sq = src.connect(tmp / "src.qmp", startup_timeout)
        sample["startup-s"] = round(time.monotonic() - t0, 3)
        sample["argv"] = {"src": src.argv, "dst": dst.argv}
        v = sq.version.get("qemu", {})
        sample["qemu-version"] = f"{v.get('major')}.{v.get('minor')}.{v.get('micro')}" + (
            f" ({sq.version.get('package').strip()})" if sq.version.get("package") else "")
        caps = [{"capability": "multifd", "state": multifd},
                {"capability": "return-path", "state": return_path}]
        params = {"multifd-channels": channels, "max-bandwidth": MAX_BANDWIDTH,
                  "downtime-limit": downtime_limit}
        for client in (dq, sq):
            client.execute("migrate-set-capabilities", capabilities=caps)
            client.execute("migrate-set-parameters", **params)
        sample["capabilities"] = caps
        sample["parameters"] = params
        port = _listen(dq)
        sample["settle-s"] = pagereport.settle_sync()
        reporting = pagereport.Window()
        wall0 = time.monotonic()
        sq.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            info = sq.execute("query-migrate")
            if info.get("status") in FINAL:
                break
            if time.monotonic() - wall0 > timeout:
                with contextlib.suppress(Exception):
                    sq.execute("migrate_cancel")
                raise TimeoutError(f"QEMU migration still {info.get('status')} after "
                                   f"{timeout:g} s")
            time.sleep(poll)
        sample["wall-s"] = round(time.monotonic() - wall0, 4)
        reported = reporting.mib()
        if reported is not None:
            sample["page-reporting-mib"] = reported
        sample["src"] = info
        # the destination finishes loading (and, with the return path, has already
        # answered) once it says completed too
        dinfo: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            dinfo = dq.execute("query-migrate")
            if dinfo.get("status") in FINAL or info.get("status") != "completed":
                break
            time.sleep(poll)
        sample["dst"] = dinfo
        sample["dst-runstate"] = dq.execute("query-status").get("status")
        if info.get("status") != "completed":
            sample["verified"] = False
            sample["error"] = info.get("error-desc", info.get("status"))
        elif dinfo.get("status") != "completed":
            sample["verified"] = False
            sample["error"] = f"destination {dinfo.get('status')}: {dst.log_tail()}"
        for q in sides:
            q.stop()
        sample["trace-checkpoints"] = trace_checkpoints(tmp / "src-trace.log")
        if "verified" not in sample:
            if verify:
                t1 = time.monotonic()
                got = file_digest(dst_ram, image.size)
                sample["verify-s"] = round(time.monotonic() - t1, 3)
                sample["ram-digest"] = {"src": image.digest, "dst": got}
                sample["verified"] = got == image.digest
                if not sample["verified"]:
                    sample["error"] = "destination RAM differs from the source's"
            else:
                sample["verified"] = True
        sample["metrics"] = derive(info, sample["trace-checkpoints"])
        return sample
    finally:
        for q in sides:
            if q.proc.poll() is None:
                q.stop()
        with contextlib.suppress(FileNotFoundError):
            dst_ram.unlink()
        pagereport.note_freed()
        shutil.rmtree(tmp, ignore_errors=True)


def _listen(dq: Qmp) -> int:
    """``migrate-incoming`` on an ephemeral port; the port QEMU got."""
    dq.execute("migrate-incoming", uri="tcp:127.0.0.1:0")
    info = dq.execute("query-migrate")
    for addr in info.get("socket-address", []):
        if addr.get("type") in ("inet", "tcp") and int(addr.get("port", 0)):
            return int(addr["port"])
    raise QmpError(f"destination QEMU did not report its listening port: {info}")


# -- command line -----------------------------------------------------------------------

def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t[-1:] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/qemu_peer.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", default="4",
                   help="multifd channels, or a comma-separated list (default 4); 0 = no "
                        "multifd, main channel only")
    p.add_argument("--size", default="2G", help="guest RAM (default 2G)")
    p.add_argument("--repeat", type=int, default=1, help="migrations per channel count")
    p.add_argument("--dir", default=None,
                   help="where the guest RAM files go (default /dev/shm: RAM)")
    p.add_argument("--no-return-path", action="store_true",
                   help="QEMU's default: no return path (the harness enables it, as for "
                        "our daemons)")
    p.add_argument("--downtime-limit", type=int, default=DOWNTIME_LIMIT,
                   help=f"ms (default {DOWNTIME_LIMIT})")
    p.add_argument("--json", type=Path, default=None, help="write every sample here")
    a = p.parse_args(argv)
    size = _size(a.size)
    counts = [int(x) for x in a.channels.split(",") if x.strip()]
    reason = unavailable_reason(size, a.dir)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    print(f"{qemu_version()}; guest RAM {size / GiB:g} GiB of random bytes in "
          f"{a.dir or default_dir()}, pre-faulted on both sides")
    samples: list[dict[str, Any]] = []
    with RamImage.create(size, a.dir) as image:
        print(f"source RAM image: {image.path} ({image.seconds:.1f} s to write), "
              f"{image.digest[:40]}...")
        for rep in range(a.repeat):
            for n in counts:
                s = migrate_once(image, max(n, 1), multifd=n > 0,
                                 return_path=not a.no_return_path,
                                 downtime_limit=a.downtime_limit)
                s["rep"] = rep
                samples.append(s)
                m = s.get("metrics", {})
                what = f"{n} ch" if n else "main"
                if "ram-GBps" in m:
                    print(f"  {what:<6} #{rep + 1}: {m['ram-GBps']:.2f} GB/s  "
                          f"(ram.transferred {m['bytes-sent'] / GiB:.3f} GiB over "
                          f"total {m['total-ms']:.0f} - setup {m['setup-ms']:.0f} ms; "
                          f"downtime {m['downtime-ms']:.0f} ms"
                          + (f", of it {m['post-drain-ms']:.1f} ms after the channels "
                             "drained" if "post-drain-ms" in m else "") + ")  "
                          f"{'verified' if s['verified'] else 'FAILED: ' + str(s.get('error'))}",
                          flush=True)
                else:
                    print(f"  {what:<6} #{rep + 1}: FAILED: {s.get('error')}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(samples, indent=1))
    ok = True
    for n in counts:
        vals = [s["metrics"]["ram-GBps"] for s in samples
                if s["channels"] == max(n, 1) and s["multifd"] == (n > 0) and s.get("verified")
                and "ram-GBps" in s["metrics"]]
        what = f"{n} multifd channel(s)" if n else "main channel only"
        if vals:
            print(f"{what}: median {statistics.median(vals):.2f} GB/s "
                  f"(min {min(vals):.2f}, max {max(vals):.2f}, n={len(vals)})")
        else:
            print(f"{what}: no verified migration")
            ok = False
    if samples:
        print("source: " + " ".join(samples[0].get("argv", {}).get("src", [])))
        print("destination: " + " ".join(samples[0].get("argv", {}).get("dst", [])))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
