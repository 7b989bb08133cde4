"""Socket I/O for the per-channel threads of the multifd data path.

Each multifd channel moves its bytes in a thread of its own (see
``docs/performance.md``: one event loop driving several sockets reached about half
the loopback limit, one thread per socket came close to it, because ``sendmsg`` and
``recv_into`` release the GIL for the whole kernel copy).

Plain TCP sockets are switched to blocking mode for their thread: one ``sendmsg``
hands a whole packet to the kernel, and a payload is received with one
``recv_into(MSG_WAITALL)``, so the thread sleeps in the kernel instead of waking for
every few kilobytes (polling a non-blocking socket cost a third of the CPU).  The
stall timeout is the socket's ``SO_SNDTIMEO``.  :meth:`Stopper.stop` shuts the socket
down, which ends a blocked call at once without closing a descriptor under it.
TLS sockets stay non-blocking and poll the socket and the stopper's pipe.

Apart from :class:`LoopWaker`, nothing here touches the event loop: the callers
(``migrate_src.channels``, ``migrate_dst.channels``) hand results back through it or
with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import select
import socket
import ssl
import struct
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from migrate_common.net import Buffer, drop_sent, stall_error
from protocol.errors import ChannelError

R = TypeVar("R")

__all__ = ["Stopper", "Stopped", "LoopWaker", "ThreadSignal", "hand_to_thread", "send_all",
           "recv_into", "recv_into_many", "filled_bytes", "size_buffers"]


class ThreadSignal:
    """Wakes a thread waiting in :meth:`wait` when another calls :meth:`set`; sets
    made before the wait are kept (merged into one), so a waiter that checks its
    condition first, then waits, never misses one — and may wake for an old one.

    A ``threading.Condition`` wakes its waiter by releasing a lock, a system call
    made holding the GIL, which the woken thread then waits for at once; an eventfd
    is written and waited on with the GIL released.  The descriptor is closed when
    the signal is garbage, so never under a thread still using it.
    """

    def __init__(self) -> None:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fd = fd
        weakref.finalize(self, os.close, fd)

    def fileno(self) -> int:
        return self._fd

    def set(self) -> None:
        os.eventfd_write(self._fd, 1)

    def clear(self) -> bool:
        """Take the sets made so far (without waiting); whether there were any."""
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            return False
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set (True) or ``timeout`` seconds passed (False)."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
        if not poller.poll(ms):
            return False
        self.clear()
        return True


class LoopWaker:
    """Runs ``callback`` on the event loop when a channel thread calls :meth:`wake`.

    uvloop's ``call_soon_threadsafe`` makes its wake-up system call holding the GIL,
    so the loop thread it wakes at once blocks on the GIL, and the two threads trade
    it back and forth; a :class:`ThreadSignal` watched by the loop is set with the
    GIL released.  Wakes before the callback ran are merged into one.  Must be created
    and closed on the loop's thread; :meth:`wake` after :meth:`close` runs nothing.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._signal = ThreadSignal()
        self._callback = callback
        self._loop = loop
        self._closed = False
        loop.add_reader(self._signal.fileno(), self._on_readable)

    def wake(self) -> None:
        """From any thread: run the callback on the loop soon."""
        self._signal.set()

    def _on_readable(self) -> None:
        if self._signal.clear():
            self._callback()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._signal.fileno())


class Stopped(Exception):
    """The owner asked the channel thread to stop (the migration ends or failed)."""


class Stopper:
    """Ends the I/O of one channel thread: once :meth:`stop` is called every call of
    this module on ``sock`` raises :class:`Stopped`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
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
        try:
            # wakes a thread blocked in sendmsg / recv_into on this socket
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        except OSError:
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


def hand_to_thread(sock: socket.socket, stall_timeout: float | None = None) -> None:
    """Prepare a connected socket for its channel thread (see the module docstring)."""
    if isinstance(sock, ssl.SSLSocket):
        # a blocking SSLSocket would wait inside OpenSSL's write loop, deaf to
        # SO_SNDTIMEO and to the stopper: TLS threads poll instead
        sock.setblocking(False)
        return
    sock.setblocking(True)
    if stall_timeout is not None:
        seconds = int(stall_timeout)
        micros = int((stall_timeout - seconds) * 1_000_000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", seconds, micros))


#: Most views one gathered send or scatter receive takes (Linux's IOV_MAX); the rest
#: waits for the next call.
IOV_MAX = 1024


def send_all(sock: socket.socket, buffers: Sequence[Buffer], stopper: Stopper,
             stall_timeout: float | None = None, what: str = "channel") -> int:
    """Send every byte of ``buffers`` (gathered into one ``sendmsg``, never joined);
    return the count.

    A peer that accepts no byte at all for ``stall_timeout`` seconds raises
    :class:`ChannelError`; slow is fine, stalled is not.
    """
    # byte views, so that lengths count bytes (a RAM job of scattered pages has a
    # view per run of pages: those are byte views already, and pass as they are)
    views = [b if type(b) is memoryview and b.format == "B" and b.ndim == 1
             else memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(map(len, views))
    if isinstance(sock, ssl.SSLSocket):
        _ssl_send_all(sock, views, stopper, stall_timeout, what)
        return total
    while views:
        try:
            # (a job of scattered pages may hold more views than one call takes)
            sent = sock.sendmsg(views if len(views) <= IOV_MAX else views[:IOV_MAX])
        except InterruptedError:
            continue
        except BlockingIOError:  # SO_SNDTIMEO passed without a byte accepted
            if stopper.stopped:
                raise Stopped from None
            assert stall_timeout is not None
            raise stall_error(what, stall_timeout) from None
        except OSError:
            if stopper.stopped:
                raise Stopped from None
            raise
        drop_sent(views, sent)
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
                    raise stall_error(what, stall_timeout) from None
                continue
            view = view[sent:]


def recv_into(sock: socket.socket, view: memoryview, stopper: Stopper,
              whole: bool = False) -> int:
    """One receive into ``view``, waiting as long as it takes; 0 at EOF.  With
    ``whole`` a plain socket waits until all of ``view`` is filled (or EOF)."""
    tls = isinstance(sock, ssl.SSLSocket)
    if not tls:
        return _blocking_receive(stopper, sock.recv_into, view, 0,
                                 socket.MSG_WAITALL if whole else 0)
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




def recv_into_many(sock: socket.socket, views: list[memoryview], stopper: Stopper) -> int:
    """One receive that fills ``views`` in order, waiting until all of them are full
    (or EOF); 0 at EOF.  One system call for a RAM packet of scattered pages, where a
    receive per page would cost a call — and, when its data has not come yet, a sleep
    and a wake-up — for every 4 KiB.  TLS sockets have no scatter receive: they take
    the first view only."""
    if len(views) == 1 or isinstance(sock, ssl.SSLSocket):
        return recv_into(sock, views[0], stopper, True)
    received: tuple[int, Any, int, Any] = _blocking_receive(
        stopper, sock.recvmsg_into, views[:IOV_MAX], 0, socket.MSG_WAITALL)
    return received[0]


def _blocking_receive(stopper: Stopper, receive: Callable[..., R], *args: Any) -> R:
    """A blocking receive call; the stopper's shutdown ends it with :class:`Stopped`."""
    try:
        result = receive(*args)
    except OSError:
        if stopper.stopped:
            raise Stopped from None
        raise
    if stopper.stopped:
        raise Stopped
    return result


def filled_bytes(views: list[memoryview], n: int) -> memoryview | bytes:
    """The first ``n`` bytes a receive put into ``views``, in order."""
    if n <= len(views[0]):
        return views[0][:n]
    parts = []
    for view in views:
        parts.append(view[:n])
        n -= len(parts[-1])
        if not n:
            break
    return b"".join(parts)


#: ``x-socket-buffer-size=-1`` (auto) for a multifd socket whose peer is on the same
#: host: LOOPBACK_BUDGET split over the channels, at least LOOPBACK_MIN each, and the
#: kernel's autotuning for a single channel.  Over loopback the kernel copies straight
#: from the sender's to the receiver's buffers; autotuned multi-megabyte buffers on
#: several streams no longer fit in the CPU caches, while one stream needs large
#: buffers to keep the sender busy.  Measured here with 4 devices and 2 GiB (device
#: throughput, GB/s): 4 channels 64K/128K/512K/autotuned 3.6/3.5/3.1/2.1; 1 channel
#: 256K/autotuned 2.8/3.7-4.0 (docs/performance.md).
LOOPBACK_BUDGET = 512 * 1024
LOOPBACK_MIN = 64 * 1024


def is_loopback(sock: socket.socket) -> bool:
    try:
        host = sock.getpeername()[0]
    except (OSError, IndexError):
        return False
    return isinstance(host, str) and ipaddress.ip_address(host.split("%")[0]).is_loopback


def buffer_size(sock: socket.socket, setting: int, channels: int) -> int:
    """The socket buffer size ``x-socket-buffer-size=setting`` means for ``sock``, one
    of ``channels`` multifd channels: 0 keeps the kernel's autotuning (the right
    choice across a real network, where buffers must cover the bandwidth-delay
    product); -1 (auto) is the loopback rule above, and autotuning for other peers."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return 0
    if setting < 0:
        if channels <= 1 or not is_loopback(sock):
            return 0
        return max(LOOPBACK_MIN, LOOPBACK_BUDGET // channels)
    return setting


def size_buffers(sock: socket.socket, setting: int, channels: int) -> int:
    """Apply ``x-socket-buffer-size`` to both buffers of a connected ``sock`` (a
    multifd socket mostly sends or mostly receives, and which depends on the side);
    returns the size set, 0 when the kernel keeps autotuning."""
    size = buffer_size(sock, setting, channels)
    if size:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, size)
    return size
