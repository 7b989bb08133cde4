"""A TCP proxy between source and destination that breaks chosen connections.

It forwards every connection to the destination and tells them apart by their
first bytes (the main channel's preamble, or a multifd init and its channel id),
so a test can reset or stall exactly "multifd channel 1" at the moment it wants.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field

MULTIFD_MAGIC = bytes.fromhex("11223344")


@dataclass
class Link:
    name: str = "?"
    client: asyncio.StreamWriter | None = None
    upstream: asyncio.StreamWriter | None = None
    stalled: asyncio.Event = field(default_factory=asyncio.Event)   # set = forwarding
    forwarded: int = 0

    def reset(self) -> None:
        """Abort both sides with a TCP reset, as a crashed peer or a middlebox would."""
        for writer in (self.client, self.upstream):
            if writer is None or writer.transport.is_closing():
                continue
            sock = writer.get_extra_info("socket")
            try:
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            writer.transport.abort()


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.links: list[Link] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def link(self, name: str) -> Link:
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(f"no connection {name!r} (have {[l.name for l in self.links]})")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(client=writer)
        link.stalled.set()
        self.links.append(link)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        link.upstream = up_writer
        up = asyncio.ensure_future(self._pump(reader, up_writer, link, identify=True))
        down = asyncio.ensure_future(self._pump(up_reader, writer, link, identify=False))
        self._tasks.update((up, down))
        await asyncio.gather(up, down, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    link: Link, identify: bool) -> None:
        head = b""
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                if identify and link.name == "?":
                    head += data
                    if head[:4] == MULTIFD_MAGIC and len(head) >= 25:
                        link.name = f"multifd-{head[24]}"
                    elif len(head) >= 4 and head[:4] != MULTIFD_MAGIC:
                        link.name = "main"
                await link.stalled.wait()
                writer.write(data)
                link.forwarded += len(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, asyncio.IncompleteReadError):
            pass

    async def close(self) -> None:
        for link in self.links:
            link.stalled.set()
            link.reset()
        for task in self._tasks:
            task.cancel()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
