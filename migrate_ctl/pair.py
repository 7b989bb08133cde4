"""Start a real ``migrate-src`` / ``migrate-dst`` pair as processes, over loopback.

Used by ``migrate-demo``, the end-to-end tests and the benchmarks: each daemon runs
as its own Python process with a unix QMP socket in a private directory and its log
in a file there; the destination listens on ``tcp:127.0.0.1:0`` and the real port is
read back from ``query-migrate``'s ``socket-address``, as QEMU's tests do.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrate_common.qmp_client import QmpClient, QmpConnectionError

__all__ = ["DaemonProcess", "DaemonPair", "start_daemon"]


@dataclass
class DaemonProcess:
    side: str
    proc: asyncio.subprocess.Process
    qmp_path: Path
    log_path: Path
    client: QmpClient = field(default_factory=QmpClient)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.client.execute(command, arguments)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, timeout: float = 10.0) -> int | None:
        await self.client.close()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


async def start_daemon(side: str, workdir: Path, args: list[str],
                       startup_timeout: float = 60.0) -> DaemonProcess:
    qmp_path = workdir / f"{side}.qmp"
    log_path = workdir / f"{side}.log"
    module = "migrate_src" if side == "src" else "migrate_dst"
    log = open(log_path, "wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, "--qmp", f"unix:{qmp_path}", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    finally:
        log.close()
    daemon = DaemonProcess(side, proc, qmp_path, log_path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + startup_timeout
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"migrate-{side} exited with {proc.returncode} at startup:\n"
                               + daemon.log_tail())
        if qmp_path.exists():
            try:
                await daemon.client.connect(f"unix:{qmp_path}", timeout=5)
                return daemon
            except QmpConnectionError:
                daemon.client = QmpClient()
        if loop.time() > deadline:
            proc.kill()
            raise RuntimeError(f"migrate-{side} did not open its QMP socket within "
                               f"{startup_timeout:g} s:\n" + daemon.log_tail())
        await asyncio.sleep(0.05)


class DaemonPair:
    """A source and a destination with the same device list; use ``async with``."""

    def __init__(self, devices: list[str] | None = None, *, src_args: list[str] | None = None,
                 dst_args: list[str] | None = None, workdir: Path | None = None,
                 keep_workdir: bool = False) -> None:
        self.devices = devices or []
        self.src_args = src_args or []
        self.dst_args = dst_args or []
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="multifd-migrate-"))
        self.keep_workdir = keep_workdir
        self.src: DaemonProcess | None = None
        self.dst: DaemonProcess | None = None

    def _device_args(self) -> list[str]:
        if not self.devices:
            return ["--nodefaults"]
        return [a for d in self.devices for a in ("--device", d)]

    async def start(self) -> None:
        dev = self._device_args()
        self.src, self.dst = await asyncio.gather(
            start_daemon("src", self.workdir, [*dev, *self.src_args]),
            start_daemon("dst", self.workdir, [*dev, "--incoming", "tcp:127.0.0.1:0",
                                               *self.dst_args]))

    async def restart_destination(self, extra: list[str] | None = None) -> None:
        if self.dst is not None:
            await self.dst.stop()
        self.dst = await start_daemon(
            "dst", self.workdir, [*self._device_args(), "--incoming", "tcp:127.0.0.1:0",
                                  *(extra if extra is not None else self.dst_args)])

    async def destination_uri(self) -> str:
        assert self.dst is not None
        info = await self.dst.execute("query-migrate")
        addr = info["socket-address"][0]
        return f"tcp:{addr['host']}:{addr['port']}"

    async def stop(self) -> None:
        for daemon in (self.src, self.dst):
            if daemon is not None:
                await daemon.stop()
        if self._own_dir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> DaemonPair:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

