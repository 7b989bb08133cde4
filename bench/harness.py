"""The pieces every scenario uses: daemons, one measured migration, iperf3, netns, machine.

Everything here drives the daemons the way a user does: separate processes started
from their command lines, configured and migrated over QMP, measured from what
``query-migrate`` reports.  Nothing imports daemon internals except the QMP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import pagereport  # noqa: E402
from migrate_common.qmp_client import QmpClient, QmpConnectionError  # noqa: E402
from migrate_ctl.pair import DaemonProcess  # noqa: E402
from migrate_ctl.progress import human_bytes  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
FINAL = ("completed", "failed", "cancelled")
APT_IPERF = "apt-get update && apt-get install -y iperf3"


class SkipScenario(Exception):
    """A scenario cannot run on this machine; the message says why and what to do."""


# -- sizes and rates ---------------------------------------------------------------------

def size_text(n: int) -> str:
    """Bytes as the daemons' option syntax: 512M, 2G, 100M, 1536K."""
    for unit, scale in (("G", GiB), ("M", MiB), ("K", 1024)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def human(n: float) -> str:
    return human_bytes(n, ".4g")


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(bit|bps)?\s*$", re.IGNORECASE)


def parse_bits(text: str) -> int:
    """'10gbit', '2.5G', '800mbit' -> bits per second (decimal units, as tc and iperf3)."""
    m = _RATE_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse rate {text!r}: expected e.g. 10gbit or 2.5gbit")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


# -- the machine ------------------------------------------------------------------------

def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_head() -> str | None:
    """The checked-out commit, read from .git without running git (best effort)."""
    head = ROOT / ".git" / "HEAD"
    try:
        text = head.read_text().strip()
        if text.startswith("ref: "):
            ref = text[5:]
            path = ROOT / ".git" / ref
            if path.exists():
                return path.read_text().strip()
            packed = ROOT / ".git" / "packed-refs"
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
            return None
        return text
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpus-usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu-model": cpu,
        "memory-bytes": mem_total,
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "python-executable": sys.executable,
        "uvloop": _version("uvloop"),
        "multifd-migrate": _version("multifd-migrate"),
        "matplotlib": _version("matplotlib"),
        "iperf3": _first_line(["iperf3", "--version"]) if shutil.which("iperf3") else None,
        "qemu": _qemu_version(),
        "py-spy": _version("py-spy"),
        "git-head": _git_head(),
        "loadavg-at-start": _loadavg(),
    }


def _qemu_version() -> str | None:
    from bench import qemu_peer

    return qemu_peer.qemu_version()


def _loadavg() -> str | None:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


_BUSY = ("migrate_src", "migrate_dst", "migrate-src", "migrate-dst", "migrate-demo",
         "pytest", "iperf3", "qemu-system-", "qemu_peer.py")


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = child_pids(todo.pop())
        out += kids
        todo += kids
    return out


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        out.append(pid)
    return out


async def wait_idle(max_wait: float) -> list[str]:
    """Wait up to ``max_wait`` s for the others to finish; returns who is still there."""
    deadline = time.monotonic() + max_wait
    busy = foreign_processes()
    while busy and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        busy = foreign_processes()
    return busy


def foreign_processes() -> list[str]:
    """Other benchmarks, daemons or test runs on this machine that would skew a sample."""
    me = os.getpid()
    mine = {me, *descendants(me), *_ancestors(me)}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(word in cmd for word in _BUSY) and "bench/run.py" not in cmd:
            found.append(f"{entry}: {cmd[:120]}")
    return found


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_counters() -> tuple[float, float]:
    """(CPU seconds the whole machine was busy, CPU seconds of this process and its
    reaped children): their difference over a sample is what others used meanwhile."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
        busy = (user + nice + system + irq + softirq) / _TICK
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ours = sum(int(x) for x in stat[11:15]) / _TICK  # utime stime cutime cstime
        return busy, ours
    except (OSError, ValueError):
        return 0.0, 0.0


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# -- processes --------------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of one process in bytes (empty once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def child_pids(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


@dataclass
class Daemon(DaemonProcess):
    """One daemon process (maybe under ``ip netns exec`` and/or py-spy) and its QMP."""

    profiled: bool = False

    @property
    def pid(self) -> int:
        """The Python daemon itself (py-spy's child when profiled)."""
        if self.profiled:
            kids = child_pids(self.proc.pid)
            if kids:
                return kids[0]
        return self.proc.pid

    async def stop(self, timeout: float = 30.0) -> None:  # type: ignore[override]
        await self.client.close()
        if self.proc.returncode is not None:
            return
        # SIGTERM the daemon itself: under py-spy that lets py-spy write its profile
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


@dataclass
class Launch:
    """How to start the daemons: network namespace, kernel pacing, profiling."""

    src_prefix: list[str] = field(default_factory=list)   # e.g. ["ip", "netns", "exec", NS]
    dst_prefix: list[str] = field(default_factory=list)
    incoming_host: str = "127.0.0.1"
    pacing_rate: int = 0                                   # bytes/s per TCP stream, 0 = none
    profile_dir: Path | None = None                        # py-spy raw profiles go here
    profile_name: str = "run"
    profile_gil: bool = False        # sample only the thread holding the GIL (py-spy --gil)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the harness dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def start_daemon(side: str, workdir: Path, args: list[str], launch: Launch,
                       startup_timeout: float = 300.0) -> Daemon:
    qmp_path = workdir / f"{side}.qmp"
    log_path = workdir / f"{side}.log"
    with contextlib.suppress(FileNotFoundError):
        qmp_path.unlink()
    if launch.pacing_rate > 0:
        base = [sys.executable, str(Path(__file__).with_name("paced_daemon.py")),
                "--pacing-rate", str(launch.pacing_rate), side, "--"]
    else:
        base = [sys.executable, "-m", "migrate_src" if side == "src" else "migrate_dst"]
    cmd = [*base, "--qmp", f"unix:{qmp_path}", *args]
    profiled = False
    if launch.profile_dir is not None:
        spy = _py_spy()
        if spy is None:
            raise RuntimeError("--profile needs py-spy: pip install -r bench/requirements.txt")
        launch.profile_dir.mkdir(parents=True, exist_ok=True)
        out = launch.profile_dir / f"{launch.profile_name}-{side}.txt"
        cmd = [spy, "record", "-o", str(out), "-f", "raw", "-r", "500", "--nonblocking",
               *(["--gil"] if launch.profile_gil else []), "--", *cmd]
        profiled = True
    cmd = [*(launch.src_prefix if side == "src" else launch.dst_prefix), *cmd]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    with open(log_path, "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(ROOT),
            env=env, preexec_fn=_die_with_parent)
    daemon = Daemon(side, proc, qmp_path, log_path, profiled=profiled)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + startup_timeout
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"migrate-{side} exited with {proc.returncode} at startup "
                               f"({' '.join(cmd)}):\n{daemon.log_tail()}")
        if qmp_path.exists():
            try:
                await daemon.client.connect(f"unix:{qmp_path}", timeout=5)
                return daemon
            except QmpConnectionError:
                daemon.client = QmpClient()
        if loop.time() > deadline:
            await daemon.stop(5)
            raise RuntimeError(f"migrate-{side} did not open QMP within "
                               f"{startup_timeout:g} s:\n{daemon.log_tail()}")
        await asyncio.sleep(0.05)


def vm_args(ram: str | None, devices: int | None, state: str, workload: str | None = None
            ) -> tuple[list[str], list[str], list[str]]:
    """The VM of the tools' ``--ram SIZE[,fill=KIND]`` (random content unless said;
    ``workload`` on the source) and ``--devices N --state SIZE`` options, for
    :func:`daemon_pair`: (devices, source args, destination args).  Without
    ``--devices`` a VM has 4 devices, or none when it has ``--ram``."""
    if devices is None:
        devices = 0 if ram else 4
    device_options = [f"vfio-sim,id=dev{i},state-size={state}" for i in range(devices)]
    if not ram:
        return device_options, [], []
    size, _, fill = ram.partition(",fill=")
    src_args = ["--memory", f"{size},fill={fill or 'random'}"]
    if workload:
        src_args += ["--workload", workload]
    return device_options, src_args, ["--memory", size]


@contextlib.asynccontextmanager
async def daemon_pair(devices: list[str], *, src_args: list[str] | None = None,
                      dst_args: list[str] | None = None,
                      launch: Launch | None = None) -> AsyncIterator[tuple[Daemon, Daemon]]:
    """A fresh source and destination with the same devices, stopped on exit."""
    launch = launch or Launch()
    dev = [a for d in devices for a in ("--device", d)] if devices else ["--nodefaults"]
    workdir = Path(tempfile.mkdtemp(prefix="mfm-bench-"))
    src: Daemon | None = None
    dst: Daemon | None = None
    try:
        started = await asyncio.gather(
            start_daemon("dst", workdir, [*dev, "--incoming", f"tcp:{launch.incoming_host}:0",
                                          *(dst_args or [])], launch),
            start_daemon("src", workdir, [*dev, *(src_args or [])], launch),
            return_exceptions=True)
        for item in started:
            if isinstance(item, Daemon):
                if item.side == "src":
                    src = item
                else:
                    dst = item
        for item in started:
            if isinstance(item, BaseException):
                raise item
        assert src is not None and dst is not None
        yield src, dst
    except BaseException:
        for d in (src, dst):
            if d is not None:
                tail = d.log_tail(15)
                if tail:
                    print(f"--- migrate-{d.side} log tail ---\n{tail}", file=sys.stderr)
        raise
    finally:
        for d in (src, dst):
            if d is not None:
                await d.stop()
        pagereport.note_freed()
        shutil.rmtree(workdir, ignore_errors=True)


# -- one measured migration -------------------------------------------------------------

@dataclass
class RssSampler:
    pid: int
    interval: float = 0.01
    samples: list[tuple[float, int]] = field(default_factory=list)
    peak: int = 0
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        t0 = time.monotonic()
        while True:
            rss = proc_status(self.pid).get("VmRSS")
            if rss is not None:
                self.peak = max(self.peak, rss)
                self.samples.append((round(time.monotonic() - t0, 4), rss))
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def migrate(src: Daemon, dst: Daemon, *, multifd: bool, channels: int,
                  timeout: float, parameters: dict[str, Any] | None = None,
                  rss: RssSampler | None = None, poll: float = 0.05,
                  verify: bool = True) -> dict[str, Any]:
    """Configure both sides, migrate, wait, verify digests (unless ``verify`` is
    False: the caller does it later); returns the raw sample.

    The migration starts once the kernel has not handed free memory to the host for
    a while (:mod:`bench.pagereport`); what it handed over meanwhile is kept as
    ``page-reporting-mib`` (``settle-s``: how long that wait took)."""
    caps = [{"capability": "multifd", "state": multifd},
            {"capability": "return-path", "state": True}]
    params = {"multifd-channels": channels, "max-bandwidth": 0, **(parameters or {})}
    for d in (src, dst):
        await d.execute("migrate-set-capabilities", {"capabilities": caps})
        await d.execute("migrate-set-parameters", params)
    where = await dst.execute("query-migrate")
    addr = where["socket-address"][0]
    uri = f"tcp:{addr['host']}:{addr['port']}"
    settled = await pagereport.settle()
    reporting = pagereport.Window()
    if rss is not None:
        rss.start()
    wall0 = time.monotonic()
    await src.execute("migrate", {"uri": uri})
    try:
        while True:
            info = await src.execute("query-migrate")
            if info.get("status") in FINAL:
                break
            if time.monotonic() - wall0 > timeout:
                with contextlib.suppress(Exception):
                    await src.execute("migrate_cancel")
                raise TimeoutError(f"migration still {info.get('status')} after {timeout:g} s")
            await asyncio.sleep(poll)
        wall = time.monotonic() - wall0
    finally:
        if rss is not None:
            await rss.stop()
    reported = reporting.mib()
    dst_info = await dst.execute("query-migrate")
    sample: dict[str, Any] = {"src": info, "dst": dst_info, "wall-s": round(wall, 4),
                              "settle-s": settled}
    if reported is not None:
        sample["page-reporting-mib"] = reported
    if info.get("status") == "completed":
        if verify:
            sample["verified"] = await digests_match(src, dst)
    else:
        sample["verified"] = False
        sample["error"] = info.get("error-desc", info.get("status"))
    sample["metrics"] = derive(info)
    return sample


async def digests_match(src: Daemon, dst: Daemon) -> bool:
    """Both daemons' state digests (devices and RAM) agree, and the destination runs."""
    s = await src.execute("x-query-state-digest")
    d = await dst.execute("x-query-state-digest")
    smap = {x["id"]: x["digest"] for x in s.get("devices", [])}
    dmap = {x["id"]: x["digest"] for x in d.get("devices", [])}
    if "ram" in s or "ram" in d:
        smap[":ram"] = s.get("ram", {}).get("digest")
        dmap[":ram"] = d.get("ram", {}).get("digest")
    return bool(smap == dmap and None not in dmap.values()
                and d.get("vm-status") == "running")


def derive(info: dict[str, Any]) -> dict[str, Any]:
    """The numbers the scenarios compare, from one source ``query-migrate``.

    * ``stopcopy-ms``: VM stopped -> every channel drained (device state moves then);
    * ``device-GBps``: device-state bytes / stopcopy-ms (decimal GB/s);
    * ``loaded-GBps``: the same bytes over VM stopped -> the destination loaded every
      device (end to end: excludes nothing still sitting in socket buffers);
    * ``transfer-ms``: the whole migration minus setup and minus what follows the
      drain (the destination's load/verify/start and the SHUT reply): the time the
      bytes were on the wire, live and stopped;
    * ``ram-GBps``: bytes sent / transfer-ms;
    * ``overhead-ms``: downtime not spent moving bytes (downtime - stopcopy-ms).
    """
    m: dict[str, Any] = {"status": info.get("status")}
    if info.get("status") != "completed":
        return m
    cp = info.get("x-downtime-checkpoints", {})
    downtime = float(info.get("downtime", 0))
    total = float(info.get("total-time", 0))
    setup = float(info.get("setup-time", 0))
    dev_bytes = int(info.get("vfio", {}).get("transferred", 0))
    sent = int(info.get("ram", {}).get("transferred", 0))
    m.update({"downtime-ms": downtime, "total-ms": total, "setup-ms": setup,
              "device-bytes": dev_bytes, "bytes-sent": sent,
              "ram-bytes": int(info.get("ram", {}).get("normal-bytes", 0))})
    if "channels-drained" in cp and "vm-stopped" in cp:
        stopcopy = cp["channels-drained"] - cp["vm-stopped"]
        m["stopcopy-ms"] = round(stopcopy, 3)
        if stopcopy > 0:
            m["device-GBps"] = dev_bytes / (stopcopy / 1000) / 1e9
        m["overhead-ms"] = round(downtime - stopcopy, 3)
        dcp = info.get("x-destination-checkpoints", {})
        if "devices-loaded" in dcp and "switchover-start-sent" in cp:
            # the destination's clock starts when SWITCHOVER_START arrives, i.e. about
            # when the source sent it: this is "VM stopped -> every device loaded"
            loaded = cp["switchover-start-sent"] + dcp["devices-loaded"] - cp["vm-stopped"]
            m["loaded-ms"] = round(loaded, 3)
            if loaded > 0 and dev_bytes:
                m["loaded-GBps"] = dev_bytes / (loaded / 1000) / 1e9
        transfer = total - setup - (downtime - cp["channels-drained"])
        m["transfer-ms"] = round(transfer, 3)
        if transfer > 0:
            m["ram-GBps"] = sent / (transfer / 1000) / 1e9
    m["breakdown-ms"] = breakdown(cp, downtime)
    return m


def breakdown(cp: dict[str, float], downtime: float) -> list[tuple[str, float]]:
    """Downtime cut at the checkpoints: [(phase ending at checkpoint, ms), ...]."""
    points = sorted(cp.items(), key=lambda kv: kv[1])
    out: list[tuple[str, float]] = []
    prev = 0.0
    for name, t in points:
        out.append((name, round(max(0.0, t - prev), 3)))
        prev = t
    if downtime > prev:
        out.append(("rest", round(downtime - prev, 3)))
    return out


# -- iperf3 -----------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def iperf_available() -> bool:
    return shutil.which("iperf3") is not None


def iperf3(streams: int, seconds: float, *, host: str = "127.0.0.1",
           client_prefix: list[str] | None = None, server_prefix: list[str] | None = None,
           fq_rate_bits: int = 0, port: int | None = None) -> dict[str, Any]:
    """One iperf3 run with ``-P streams -l 1M``; bytes/s received, plus the raw summary."""
    if not iperf_available():
        raise SkipScenario(f"iperf3 is not installed: {APT_IPERF}")
    cmd_tail = ["-P", str(streams), "-l", "1M", "-t", f"{seconds:g}", "-J"]
    if fq_rate_bits:
        cmd_tail += ["--fq-rate", str(fq_rate_bits)]
    last = ""
    for _attempt in range(5):
        p = port or free_port()
        server = subprocess.Popen(
            [*(server_prefix or []), "iperf3", "-s", "-1", "-p", str(p), "-B", host],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            out = None
            for _ in range(50):  # until the server listens
                time.sleep(0.1)
                if server.poll() is not None:
                    break
                out = subprocess.run(
                    [*(client_prefix or []), "iperf3", "-c", host, "-p", str(p), *cmd_tail],
                    capture_output=True, text=True, timeout=seconds + 60)
                if out.returncode == 0 or "unable to connect" not in out.stdout + out.stderr:
                    break
            if out is not None and out.returncode == 0:
                end = json.loads(out.stdout)["end"]
                return {
                    "streams": streams, "seconds": seconds,
                    "Bps": end["sum_received"]["bits_per_second"] / 8,
                    "sent-Bps": end["sum_sent"]["bits_per_second"] / 8,
                    "retransmits": end["sum_sent"].get("retransmits"),
                    "cpu": end.get("cpu_utilization_percent"),
                }
            last = (out.stdout + out.stderr)[-500:] if out is not None else ""
            if server.poll() is None:
                raise RuntimeError(f"iperf3 -c failed: {last}")
            # the server exited: most likely the port was taken meanwhile; another one
        finally:
            if server.poll() is None:
                server.kill()
            _, err = server.communicate()
            last = last or (err or "")[-500:]
    raise RuntimeError(f"iperf3 did not run: {last}")


# -- network namespaces -----------------------------------------------------------------

NS_PREFIX = "mfmb"


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {(out.stderr or out.stdout).strip()}")


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def cleanup_stale_namespaces() -> list[str]:
    """Delete namespaces an earlier, killed harness run left (theirs only: by prefix+pid)."""
    removed: list[str] = []
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return removed
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(NS_PREFIX + r"-(src|dst)-(\d+)", name)
        if m and not _pid_alive(int(m.group(2))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
            removed.append(name)
    return removed


@dataclass
class ShapedNetwork:
    """Two namespaces joined by a veth pair, both directions capped with tc tbf."""

    link_bits: int
    src_ns: str = ""
    dst_ns: str = ""
    src_ip: str = "10.77.0.1"
    dst_ip: str = "10.77.0.2"

    def prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.src_ns if side == "src" else self.dst_ns]


def netns_preflight() -> None:
    if os.geteuid() != 0:
        raise SkipScenario("shaped-network needs root (network namespaces, tc): run the "
                           "harness as root, e.g. sudo .venv/bin/python bench/run.py "
                           "--scenario shaped-network")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise SkipScenario(f"shaped-network needs '{tool}': apt-get install -y iproute2")


@contextlib.contextmanager
def shaped_network(link_bits: int) -> Iterator[ShapedNetwork]:
    """Create the namespace pair (10.77.0.1 <-> 10.77.0.2, private to them) and remove it."""
    netns_preflight()
    cleanup_stale_namespaces()
    pid = os.getpid()
    net = ShapedNetwork(link_bits, f"{NS_PREFIX}-src-{pid}", f"{NS_PREFIX}-dst-{pid}")
    veth_src, veth_dst = f"mfmbs{pid}"[:15], f"mfmbd{pid}"[:15]
    # burst: what the link may send back to back; >= one GSO packet, ~1 ms at the rate
    burst = max(256 * 1024, link_bits // 8 // 1000)
    created: list[str] = []
    try:
        try:
            for ns in (net.src_ns, net.dst_ns):
                _run(["ip", "netns", "add", ns])
                created.append(ns)
            _run(["ip", "link", "add", veth_src, "netns", net.src_ns, "type", "veth",
                  "peer", "name", veth_dst, "netns", net.dst_ns])
            for ns, dev, ip in ((net.src_ns, veth_src, net.src_ip),
                                (net.dst_ns, veth_dst, net.dst_ip)):
                _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
                _run(["ip", "-n", ns, "link", "set", dev, "up"])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                      "tbf", "rate", f"{link_bits}bit", "burst", str(burst),
                      "latency", "20ms"])
        except RuntimeError as exc:
            raise SkipScenario(f"cannot build the shaped network here: {exc}") from exc
        yield net
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
