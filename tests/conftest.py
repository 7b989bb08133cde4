"""Shared fixtures: two in-process endpoints driven over real QMP and loopback TCP."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from migrate_common.log import configure_logging
from migrate_common.net import Address
from migrate_common.qmp_client import QmpClient
from migrate_common.tls import TlsCreds
from migrate_dst.daemon import DestinationDaemon
from migrate_src.daemon import SourceDaemon
from vm.machine import VirtualMachine
from vm.properties import parse_device_option
from vm.ram import parse_memory_option
from vm.workload import parse_workload_option

FINAL = ("completed", "failed", "cancelled")


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    configure_logging("warning")


@dataclass
class Endpoint:
    daemon: Any
    qmp: QmpClient

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(command, arguments)

    async def status(self) -> str:
        return (await self.execute("query-migrate")).get("status", "none")


@dataclass
class Pair:
    src: Endpoint
    dst: Endpoint
    devices: list[str]

    async def configure(self, *, multifd: bool = True, channels: int = 2,
                        return_path: bool = True, switchover_ack: bool = False,
                        extra_params: dict[str, Any] | None = None,
                        side: str = "both") -> None:
        caps = [{"capability": "multifd", "state": multifd},
                {"capability": "return-path", "state": return_path},
                {"capability": "switchover-ack", "state": switchover_ack},
                {"capability": "events", "state": True}]
        params = {"multifd-channels": channels, **(extra_params or {})}
        targets = {"both": (self.src, self.dst), "src": (self.src,), "dst": (self.dst,)}[side]
        for end in targets:
            await end.execute("migrate-set-capabilities", {"capabilities": caps})
            await end.execute("migrate-set-parameters", params)

    async def uri(self) -> str:
        info = await self.dst.execute("query-migrate")
        addr = info["socket-address"][0]
        return f"tcp:{addr['host']}:{addr['port']}"

    async def migrate(self, timeout: float = 60.0) -> dict[str, Any]:
        await self.src.execute("migrate", {"uri": await self.uri()})
        return await wait_final(self.src, timeout)

    async def digests(self) -> tuple[dict[str, str | None], dict[str, str | None]]:
        s = await self.src.execute("x-query-state-digest")
        d = await self.dst.execute("x-query-state-digest")
        src = {x["id"]: x["digest"] for x in s["devices"]}
        dst = {x["id"]: x["digest"] for x in d["devices"]}
        if "ram" in s:
            src[":ram"] = s["ram"]["digest"]
        if "ram" in d:
            dst[":ram"] = d["ram"]["digest"]
        return src, dst


async def wait_final(end: Endpoint, timeout: float = 60.0,
                     states: tuple[str, ...] = FINAL) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await end.execute("query-migrate")
        if info.get("status") in states:
            return dict(info)
        if loop.time() > deadline:
            raise TimeoutError(f"still {info.get('status')} after {timeout} s: {info}")
        await asyncio.sleep(0.01)


async def wait_status(end: Endpoint, wanted: str, timeout: float = 30.0) -> dict[str, Any]:
    return await wait_final(end, timeout, (wanted,))


@asynccontextmanager
async def make_pair(tmp_path: Path, devices: list[str],
                    dst_devices: list[str] | None = None,
                    src_uuid: uuid.UUID | None = None,
                    dst_uuid: uuid.UUID | None = None,
                    memory: str | None = None, dst_memory: str | None = None,
                    workload: str | None = None,
                    dst_workload: str | None = None,
                    src_tls: Path | None = None, dst_tls: Path | None = None,
                    dst_verify_peer: bool = True) -> AsyncIterator[Pair]:
    src_mem = parse_memory_option(memory) if memory else None
    dst_mem_text = dst_memory if dst_memory is not None else memory
    dst_mem = parse_memory_option(dst_mem_text) if dst_mem_text else None
    src_vm = VirtualMachine([parse_device_option(d) for d in devices], role="source",
                            uuid=src_uuid or uuid.UUID(int=0), memory=src_mem,
                            workload=parse_workload_option(workload) if workload else None)
    dst_vm = VirtualMachine([parse_device_option(d) for d in (
        dst_devices if dst_devices is not None else devices)],
                            role="destination", uuid=dst_uuid or uuid.UUID(int=0),
                            memory=dst_mem,
                            workload=parse_workload_option(dst_workload) if dst_workload
                            else None)
    src = SourceDaemon(src_vm, tls_objects={"tls0": TlsCreds("tls0", src_tls)}
                       if src_tls else None)
    dst = DestinationDaemon(dst_vm, incoming="tcp:127.0.0.1:0",
                            tls_objects={"tls0": TlsCreds("tls0", dst_tls, dst_verify_peer)}
                            if dst_tls else None)
    await src.start(Address("unix", path=str(tmp_path / "src.qmp")))
    await dst.start(Address("unix", path=str(tmp_path / "dst.qmp")))
    src_qmp, dst_qmp = QmpClient(), QmpClient()
    await src_qmp.connect(f"unix:{tmp_path / 'src.qmp'}")
    await dst_qmp.connect(f"unix:{tmp_path / 'dst.qmp'}")
    try:
        yield Pair(Endpoint(src, src_qmp), Endpoint(dst, dst_qmp), devices)
    finally:
        await src_qmp.close()
        await dst_qmp.close()
        await src.shutdown()
        await dst.shutdown()


@pytest.fixture
def pair_factory(tmp_path: Path) -> Any:
    return lambda devices, **kw: make_pair(tmp_path, devices, **kw)
