"""A QMP server: the management socket of both daemons, wire-compatible with QEMU.

Speaks the QEMU Machine Protocol as described in QEMU's ``qmp-spec``: a greeting on
connect, capabilities negotiation with ``qmp_capabilities``, then one JSON object per
command answered by ``{"return": …}`` or ``{"error": {"class", "desc"}}`` with the
caller's ``id`` echoed, and asynchronous ``{"event": …}`` messages with timestamps.
QEMU's own ``qemu.qmp`` client library and ``migrate-ctl`` both drive it.

Commands of one session run one at a time, in order, as in QEMU.  Lines are bounded
(:data:`MAX_LINE`); a longer line closes the session.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from protocol.errors import MigrationError
from migrate_common.net import Address

__all__ = ["QmpServer", "QmpError", "CommandTable", "MAX_LINE", "require"]

MAX_LINE = 1 << 20
QEMU_VERSION = {"major": 10, "minor": 1, "micro": 0}

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
CommandTable = dict[str, Handler]


class QmpError(Exception):
    """An error reply: ``class`` is QEMU's ErrorClass name."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


def require(args: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """Fetch a mandatory argument, with QEMU's wording for missing or wrong types."""
    if name not in args:
        raise QmpError(f"Parameter '{name}' is missing")
    value = args[name]
    if isinstance(value, bool) and kind is int:
        raise QmpError(f"Invalid parameter type for '{name}', expected: integer")
    if not isinstance(value, kind):
        expected = {str: "string", int: "integer", bool: "boolean", list: "array",
                    dict: "object"}.get(kind if isinstance(kind, type) else kind[0], "value")
        raise QmpError(f"Invalid parameter type for '{name}', expected: {expected}")
    return value


def _timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


class JsonSplitter:
    """Splits a QMP byte stream into top-level JSON texts, like QEMU's streaming parser.

    QMP needs no newline after a command (``qemu.qmp`` sends none), so requests are
    delimited by balancing braces outside strings.  A newline at depth 0 ends any
    stray non-JSON text, which then gets its own parse-error reply.  A text longer
    than ``limit`` bytes raises ``ValueError``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.depth = 0
        self.in_string = False
        self.escape = False

    def feed(self, data: bytes) -> list[bytes]:
        items: list[bytes] = []
        start = 0
        buf = self.buf
        scan_from = len(buf)
        buf += data
        i = scan_from
        while i < len(buf):
            c = buf[i]
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == 0x5C:  # backslash
                    self.escape = True
                elif c == 0x22:
                    self.in_string = False
            elif c == 0x22:
                self.in_string = True
            elif c in (0x7B, 0x5B):
                self.depth += 1
            elif c in (0x7D, 0x5D):
                self.depth -= 1
                if self.depth <= 0:
                    items.append(bytes(buf[start:i + 1]))
                    start, self.depth = i + 1, 0
            elif c == 0x0A and self.depth == 0:
                if buf[start:i].strip():
                    items.append(bytes(buf[start:i]))
                start = i + 1
            i += 1
        del buf[:start]
        if len(buf) > self.limit:
            raise ValueError(f"QMP input line longer than {self.limit} bytes")
        return items


class _Session:
    def __init__(self, server: QmpServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.negotiated = False

    def send(self, obj: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(obj).encode() + b"\r\n")

    async def run(self) -> None:
        self.send({"QMP": {"version": {"qemu": QEMU_VERSION, "package": self.server.package},
                           "capabilities": []}})
        splitter = JsonSplitter(MAX_LINE)
        while True:
            data = await self.reader.read(65536)
            if not data:
                return
            try:
                items = splitter.feed(data)
            except ValueError as exc:
                self.send({"error": {"class": "GenericError", "desc": str(exc)}})
                return
            for item in items:
                reply = await self.handle_line(item)
                if reply is not None:
                    self.send(reply)
                    await self.writer.drain()

    async def handle_line(self, line: bytes) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return {"error": {"class": "GenericError", "desc": f"JSON parse error, {exc}"}}
        if not isinstance(request, dict):
            return {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        reply: dict[str, Any]
        try:
            reply = {"return": await self.dispatch(request)}
        except QmpError as exc:
            reply = {"error": {"class": exc.error_class, "desc": exc.desc}}
        except MigrationError as exc:
            reply = {"error": {"class": "GenericError", "desc": str(exc)}}
        if "id" in request:
            reply["id"] = request["id"]
        return reply

    async def dispatch(self, request: dict[str, Any]) -> Any:
        if "exec-oob" in request:
            raise QmpError("Out-Of-Band execution is not supported by this server")
        name = request.get("execute")
        if not isinstance(name, str):
            raise QmpError("QMP input lacks member 'execute'")
        unknown = set(request) - {"execute", "arguments", "id"}
        if unknown:
            raise QmpError(f"QMP input member '{sorted(unknown)[0]}' is unexpected")
        args = request.get("arguments", {})
        if not isinstance(args, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if name == "qmp_capabilities":
            if self.negotiated:
                raise QmpError("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound")
            enable = args.get("enable", [])
            if enable:
                raise QmpError(f"Capability '{enable[0]}' not available")
            self.negotiated = True
            return {}
        if not self.negotiated:
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           "CommandNotFound")
        if name == "query-commands":
            return [{"name": n} for n in ["qmp_capabilities", "query-commands",
                                          *sorted(self.server.commands)]]
        handler = self.server.commands.get(name)
        if handler is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        return await handler(args)


class QmpServer:
    """Serves a table of command coroutines on a unix or TCP address."""

    def __init__(self, commands: CommandTable, *, package: str = "multifd-migrate",
                 log: Any = None) -> None:
        self.commands = commands
        self.package = package
        self._sessions: set[_Session] = set()
        self._server: asyncio.AbstractServer | None = None
        self._log = log or structlog.get_logger("qmp")
        self.address: Address | None = None

    async def start(self, addr: Address) -> None:
        if addr.transport == "unix":
            if os.path.exists(addr.path):
                os.unlink(addr.path)
            self._server = await asyncio.start_unix_server(self._serve, addr.path, limit=MAX_LINE)
        else:
            self._server = await asyncio.start_server(self._serve, addr.host, addr.port,
                                                      limit=MAX_LINE)
            port = self._server.sockets[0].getsockname()[1]
            addr = Address("tcp", host=addr.host, port=port)
        self.address = addr
        self._log.info("QMP listening", address=str(addr))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(self, reader, writer)
        self._sessions.add(session)
        try:
            await session.run()
        except (ConnectionError, OSError):
            pass
        finally:
            self._sessions.discard(session)
            writer.close()

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every session that completed capabilities negotiation."""
        message: dict[str, Any] = {"event": name, "timestamp": _timestamp()}
        if data is not None:
            message["data"] = data
        for session in list(self._sessions):
            if session.negotiated:
                session.send(message)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for session in list(self._sessions):
                session.writer.close()
            await self._server.wait_closed()
        if self.address is not None and self.address.transport == "unix":
            try:
                os.unlink(self.address.path)
            except FileNotFoundError:
                pass
