"""The incoming listener: accept connections and classify them like QEMU does.

Every accepted connection is read for its first 4 bytes within the connect timeout:
``MFDM`` is a main channel (its 8-byte preamble is checked), ``0x11223344`` a multifd
channel (its 64-byte init is read and decoded; the attempt validates UUID and id),
QEMU's own ``QEVM`` and anything else are refused with a clear error.  Connections
may arrive in any order.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from migrate_common.net import Address, address_info, listen, recv_into, tune_socket
from migrate_common.tls import handshake
from protocol.control import ChannelKind, check_preamble, classify_channel
from protocol.errors import ChannelError
from protocol.multifd import INIT_SIZE, ChannelInit

__all__ = ["IncomingListener", "Classified", "classify_connection"]

#: the kind, the socket, the decoded init (multifd), the bytes read to classify it
Classified = tuple[ChannelKind, socket.socket, ChannelInit | None, bytes]


async def _read_exactly(sock: socket.socket, size: int, what: str) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = await recv_into(sock, view[got:])
        if n == 0:
            raise ChannelError(f"{what}: connection closed after {got} of {size} bytes",
                               channel=what)
        got += n
    return bytes(buf)


async def classify_connection(sock: socket.socket, timeout: float,
                              tls: ssl.SSLContext | None = None) -> Classified:
    """Read the first bytes of a new connection and tell what channel it is.

    With TLS the handshake comes first and the magic is read inside the session
    (QEMU cannot peek under TLS and relies on the order instead; we need not)."""
    if tls is not None:
        sock = await handshake(sock, tls, server_side=True, server_hostname=None,
                               timeout=timeout, what="new connection")
    try:
        async with asyncio.timeout(timeout):
            first = await _read_exactly(sock, 4, "new connection")
            kind = classify_channel(first)
            if kind is ChannelKind.MAIN:
                preamble = first + await _read_exactly(sock, 4, "main channel")
                check_preamble(preamble)
                return kind, sock, None, preamble
            raw = first + await _read_exactly(sock, INIT_SIZE - 4, "multifd channel")
            return kind, sock, ChannelInit.decode(raw), raw
    except TimeoutError:
        raise ChannelError(f"a new connection sent no complete handshake within "
                           f"{timeout:g} s (x-connect-timeout)", channel="handshake") from None


class IncomingListener:
    """A listening socket whose accepted connections go to ``on_connection``."""

    def __init__(self, address: Address,
                 on_connection: Callable[[socket.socket, Any], Awaitable[None]],
                 log: Any) -> None:
        self.address = address
        self.sock = listen(address)
        self.socket_address = address_info(self.sock, address)
        self._on_connection = on_connection
        self._log = log
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._accept_loop(),
                                                            name="incoming-accept")

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self.sock)
            except OSError as exc:
                self._log.warning("accept failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            tune_socket(conn)
            await self._on_connection(conn, peer)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.sock.close()
