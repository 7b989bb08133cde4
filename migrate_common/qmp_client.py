"""A small asyncio QMP client, used by ``migrate-ctl``, the demo and the tests.

It connects, checks the greeting, negotiates capabilities, and then sends commands
with increasing ids; a reader task matches replies to their ids and queues events.
(QEMU's ``qemu.qmp`` library drives the daemons just as well; this one has no
dependency and is enough for scripts.)
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from migrate_common.net import Address, parse_address
from migrate_common.qmp import MAX_LINE

__all__ = ["QmpClient", "QmpCommandError", "QmpConnectionError"]


class QmpCommandError(Exception):
    """The server answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpConnectionError(Exception):
    """The QMP socket could not be reached, or it closed."""


class QmpClient:
    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 1
        self._reader_task: asyncio.Task[None] | None = None
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.greeting: dict[str, Any] = {}

    async def connect(self, address: str | Address, timeout: float = 10.0) -> None:
        addr = parse_address(address) if isinstance(address, str) else address
        try:
            async with asyncio.timeout(timeout):
                if addr.transport == "unix":
                    self._reader, self._writer = await asyncio.open_unix_connection(
                        addr.path, limit=MAX_LINE)
                else:
                    self._reader, self._writer = await asyncio.open_connection(
                        addr.host, addr.port, limit=MAX_LINE)
                line = await self._reader.readline()
        except (OSError, TimeoutError) as exc:
            raise QmpConnectionError(f"cannot reach QMP at {addr}: {exc or 'timeout'}") from exc
        try:
            self.greeting = json.loads(line)
        except ValueError:
            raise QmpConnectionError(f"{addr} did not send a QMP greeting") from None
        if "QMP" not in self.greeting:
            raise QmpConnectionError(f"{addr} did not send a QMP greeting")
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())
        await self.execute("qmp_capabilities")

    async def _read_loop(self) -> None:
        assert self._reader is not None
        error: Exception = QmpConnectionError("QMP connection closed")
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                message = json.loads(line)
                if "event" in message:
                    self.events.put_nowait(message)
                    continue
                fut = self._pending.pop(message.get("id", -1), None)
                if fut is not None and not fut.done():
                    fut.set_result(message)
        except (OSError, ValueError) as exc:
            error = QmpConnectionError(f"QMP connection failed: {exc}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self._writer is None:
            raise QmpConnectionError("not connected")
        ident = self._next_id
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        reply = await fut
        if "error" in reply:
            err = reply["error"]
            raise QmpCommandError(command, err.get("class", "GenericError"), err.get("desc", ""))
        return reply.get("return")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except asyncio.CancelledError:
                pass
        self._writer = None

    async def __aenter__(self) -> QmpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
