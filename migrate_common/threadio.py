"""Socket I/O for the per-channel threads of the multifd data path.

Each multifd channel moves its bytes in a thread of its own (see
``docs/performance.md``: one event loop driving several sockets reached about half
the loopback limit, one thread per socket came close to it, because ``sendmsg`` and
``recv_into`` release the GIL for the whole kernel copy).  The sockets stay
non-blocking; a thread that has to wait polls its socket *and* a :class:`Stopper`,
so the event loop can end a thread that is blocked on a silent peer at any moment,
without closing a descriptor under it.

Nothing here touches the event loop: the callers (``migrate_src.channels``,
``migrate_dst.channels``) hand results back with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
from collections.abc import Sequence

from protocol.errors import ChannelError

__all__ = ["Stopper", "Stopped", "send_all", "recv_into", "size_buffers"]

Buffer = bytes | bytearray | memoryview


class Stopped(Exception):
    """The owner asked the channel thread to stop (the migration ends or failed)."""


class Stopper:
    """A wake-up pipe: once :meth:`stop` is called every wait in this module raises
    :class:`Stopped`."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.stopped = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            os.write(self._w, b"x")
        except OSError:  # closed already, or the pipe is full: either way it is set
            pass

    def close(self) -> None:
        self.stopped = True
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    def wait(self, sock: socket.socket, events: int, timeout: float | None) -> bool:
        """Wait until ``sock`` is ready for ``events``; False when ``timeout`` passed."""
        if self.stopped:
            raise Stopped
        poller = select.poll()
        poller.register(sock.fileno(), events)
        poller.register(self._r, select.POLLIN)
        ready = poller.poll(None if timeout is None else timeout * 1000)
        if self.stopped:
            raise Stopped
        return bool(ready)


_OUT = select.POLLOUT
_IN = select.POLLIN


def _stalled(what: str, timeout: float) -> ChannelError:
    return ChannelError(f"{what}: the peer accepted no data for {timeout:g} s "
                        "(x-channel-stall-timeout)", channel=what)


def send_all(sock: socket.socket, buffers: Sequence[Buffer], stopper: Stopper,
             stall_timeout: float | None = None, what: str = "channel") -> int:
    """Send every byte of ``buffers`` (gathered into one ``sendmsg`` where the socket
    takes it, never joined); return the count.

    A peer that accepts no byte at all for ``stall_timeout`` seconds raises
    :class:`ChannelError`; slow is fine, stalled is not.
    """
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(len(v) for v in views)
    if isinstance(sock, ssl.SSLSocket):
        _ssl_send_all(sock, views, stopper, stall_timeout, what)
        return total
    while views:
        try:
            sent = sock.sendmsg(views)
        except (BlockingIOError, InterruptedError):
            if not stopper.wait(sock, _OUT, stall_timeout):
                assert stall_timeout is not None
                raise _stalled(what, stall_timeout) from None
            continue
        while sent:
            head = views[0]
            if sent >= len(head):
                sent -= len(head)
                views.pop(0)
            else:
                views[0] = head[sent:]
                sent = 0
    return total


def _ssl_send_all(sock: ssl.SSLSocket, views: list[memoryview], stopper: Stopper,
                  stall_timeout: float | None, what: str) -> None:
    """TLS has no gathered write: send the views one after the other."""
    for view in views:
        while view:
            try:
                sent = sock.send(view)
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
                raise ChannelError(f"{what}: TLS connection closed by the peer ({exc})",
                                   channel=what) from None
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
                events = _OUT if isinstance(exc, ssl.SSLWantWriteError) else _IN
                if not stopper.wait(sock, events, stall_timeout):
                    assert stall_timeout is not None
                    raise _stalled(what, stall_timeout) from None
                continue
            view = view[sent:]


def recv_into(sock: socket.socket, view: memoryview, stopper: Stopper) -> int:
    """One receive into ``view``, waiting as long as it takes; 0 at EOF."""
    tls = isinstance(sock, ssl.SSLSocket)
    while True:
        try:
            return sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            events = _IN
        except ssl.SSLWantReadError:
            events = _IN
        except ssl.SSLWantWriteError:
            events = _OUT
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # close_notify, or a peer that closed without one: the decoder decides
            # whether the stream ended at a boundary or was cut short
            return 0
        if tls and sock.pending():
            continue
        stopper.wait(sock, events, None)


def size_buffers(sock: socket.socket, size: int) -> None:
    """Fix the kernel socket buffers of ``sock`` at ``size`` bytes (0 keeps the kernel's
    autotuning).  Both directions: a multifd socket mostly sends or mostly receives,
    and which one depends on the side."""
    if size <= 0 or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, size)
