"""Sockets for both daemons: addresses, connect/listen, and the zero-copy byte movers.

The data path uses raw non-blocking sockets owned by one task each, so received
bytes land straight in buffers chosen by the sans-I/O decoders
(``sock_recv_into``) and a packet's header and payload views leave in one
``sendmsg`` call without being joined first.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.errors import ChannelError, ConfigError

__all__ = [
    "Address",
    "parse_address",
    "connect",
    "listen",
    "sendmsg_all",
    "recv_into",
    "tune_socket",
    "address_info",
    "wait_readable",
    "wait_writable",
]

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Address:
    """A ``tcp:HOST:PORT`` or ``unix:PATH`` address, QEMU style."""

    transport: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.transport == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(uri: str) -> Address:
    """Parse ``tcp:HOST:PORT``, ``tcp:[V6]:PORT`` or ``unix:PATH``."""
    if not isinstance(uri, str) or not uri:
        raise ConfigError(f"invalid address {uri!r}: expected tcp:HOST:PORT or unix:PATH")
    kind, sep, rest = uri.partition(":")
    if not sep:
        raise ConfigError(f"invalid address {uri!r}: expected tcp:HOST:PORT or unix:PATH")
    if kind == "unix":
        if not rest:
            raise ConfigError(f"invalid address {uri!r}: unix: needs a path")
        return Address("unix", path=rest)
    if kind != "tcp":
        raise ConfigError(f"unsupported transport {kind!r} in {uri!r}: use tcp: or unix:")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ConfigError(f"invalid address {uri!r}: expected tcp:[V6ADDR]:PORT")
        port_text = port_text[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise ConfigError(f"invalid address {uri!r}: missing :PORT")
    if not host:
        raise ConfigError(f"invalid address {uri!r}: missing host")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"invalid port {port_text!r} in {uri!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} out of range in {uri!r}")
    return Address("tcp", host=host, port=port)


#: TCP keepalive: a peer that vanished without a FIN or RST (a dead host, a cut link)
#: is noticed after about KEEPALIVE_IDLE + KEEPALIVE_COUNT × KEEPALIVE_INTERVAL seconds
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3


def tune_socket(sock: socket.socket) -> None:
    """Settings every migration socket gets: non-blocking, no Nagle delay, keepalive."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE),
                            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                            ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


async def connect(addr: Address, timeout: float, what: str = "channel") -> socket.socket:
    """Open one connection to ``addr`` within ``timeout`` seconds.

    Every address the host name resolves to is tried in turn (a name may resolve to
    IPv6 first while the peer listens on IPv4 only).
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            if addr.transport == "unix":
                targets: list[tuple[int, int, int, object]] = [
                    (socket.AF_UNIX, socket.SOCK_STREAM, 0, addr.path)]
            else:
                infos = await loop.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
                targets = [(f, t, p, a) for f, t, p, _, a in infos]
            last: OSError | None = None
            for family, stype, proto, target in targets:
                sock = socket.socket(family, stype, proto)
                tune_socket(sock)
                try:
                    await loop.sock_connect(sock, target)  # type: ignore[arg-type]
                    return sock
                except OSError as exc:
                    sock.close()
                    last = exc
                except BaseException:
                    sock.close()
                    raise
            assert last is not None
            raise last
    except TimeoutError:
        raise ChannelError(f"{what}: connecting to {addr} timed out after {timeout:g} s",
                           channel=what) from None
    except OSError as exc:
        raise ChannelError(f"{what}: cannot connect to {addr}: {exc.strerror or exc}",
                           channel=what) from exc


def listen(addr: Address, backlog: int = 64) -> socket.socket:
    """Bind and listen on ``addr``; for unix sockets a stale file is replaced."""
    try:
        if addr.transport == "unix":
            if os.path.exists(addr.path):
                os.unlink(addr.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(addr.path)
        else:
            infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, stype, proto, _, target = infos[0]
            sock = socket.socket(family, stype, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(target)
        sock.listen(backlog)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {addr}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def address_info(sock: socket.socket, addr: Address) -> dict[str, str]:
    """QEMU's ``SocketAddress`` for a listening socket, with the real port."""
    if addr.transport == "unix":
        return {"type": "unix", "path": addr.path}
    host, port = sock.getsockname()[:2]
    return {"type": "inet", "host": str(host), "port": str(port)}


async def wait_writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


def drop_sent(views: list[memoryview], sent: int) -> None:
    """Remove the first ``sent`` bytes from a list of views that a gathered send took."""
    while sent:
        head = views[0]
        if sent >= len(head):
            sent -= len(head)
            views.pop(0)
        else:
            views[0] = head[sent:]
            sent = 0


def stall_error(what: str, timeout: float) -> ChannelError:
    """The failure of a send that made no progress for ``x-channel-stall-timeout``."""
    return ChannelError(f"{what}: the peer accepted no data for {timeout:g} s "
                        "(x-channel-stall-timeout)", channel=what)


async def sendmsg_all(sock: socket.socket, buffers: Sequence[Buffer],
                      stall_timeout: float | None = None, what: str = "channel") -> int:
    """Send every byte of ``buffers`` (gathered, no joining); return the count.

    With ``stall_timeout``, a peer that accepts no byte at all for that many seconds
    raises :class:`ChannelError` (slow is fine; stalled is not).
    """
    loop = asyncio.get_running_loop()
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(len(v) for v in views)
    if isinstance(sock, ssl.SSLSocket):
        await _ssl_send_all(sock, views, stall_timeout, what)
        return total
    while views:
        try:
            sent = sock.sendmsg(views)
        except (BlockingIOError, InterruptedError):
            if stall_timeout is None:
                await wait_writable(loop, sock)
                continue
            try:
                async with asyncio.timeout(stall_timeout):
                    await wait_writable(loop, sock)
            except TimeoutError:
                raise stall_error(what, stall_timeout) from None
            continue
        drop_sent(views, sent)
    return total


async def wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def recv_into(sock: socket.socket, view: memoryview) -> int:
    """One receive into ``view``; returns 0 at EOF."""
    loop = asyncio.get_running_loop()
    if not isinstance(sock, ssl.SSLSocket):
        return await loop.sock_recv_into(sock, view)
    while True:
        try:
            return sock.recv_into(view)
        except ssl.SSLWantReadError:
            await wait_readable(loop, sock)
        except ssl.SSLWantWriteError:
            await wait_writable(loop, sock)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # close_notify, or a peer that closed without one: the decoders decide
            # whether the stream ended at a boundary or was cut short
            return 0


async def _ssl_send_all(sock: ssl.SSLSocket, views: list[memoryview],
                        stall_timeout: float | None, what: str) -> None:
    """TLS has no gathered write: send the views one after the other."""
    loop = asyncio.get_running_loop()
    for view in views:
        while view:
            try:
                sent = sock.send(view)
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
                raise ChannelError(f"{what}: TLS connection closed by the peer ({exc})",
                                   channel=what) from None
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
                wait = (wait_writable(loop, sock) if isinstance(exc, ssl.SSLWantWriteError)
                        else wait_readable(loop, sock))
                try:
                    async with asyncio.timeout(stall_timeout):
                        await wait
                except TimeoutError:
                    assert stall_timeout is not None
                    raise stall_error(what, stall_timeout) from None
                continue
            view = view[sent:]
