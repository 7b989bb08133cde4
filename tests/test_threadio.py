"""migrate_common.threadio: blocking channel I/O, stopping a blocked thread, the stall
timeout, and the socket buffer sizes of x-socket-buffer-size."""

from __future__ import annotations

import array
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from migrate_common.threadio import (
    IOV_MAX,
    LoopWaker,
    ThreadSignal,
    LOOPBACK_BUDGET,
    LOOPBACK_MIN,
    Stopped,
    Stopper,
    buffer_size,
    hand_to_thread,
    filled_bytes,
    recv_into,
    recv_into_many,
    send_all,
    size_buffers,
)
from protocol.errors import ChannelError

SMALL = 16 * 1024  # socket buffers for the stall tests: fill up quickly


def tcp_pair(family: int = socket.AF_INET, bufsize: int | None = None) -> tuple[socket.socket, socket.socket]:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        if bufsize:  # set before connecting, so the window is small from the start
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        listener.bind((host, 0))
        listener.listen(1)
        a = socket.socket(family, socket.SOCK_STREAM)
        if bufsize:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        a.connect(listener.getsockname()[:2])
        b, _ = listener.accept()
    finally:
        listener.close()
    return a, b


def unix_pair(bufsize: int | None = None) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if bufsize:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    return a, b


PAIRS: dict[str, Callable[..., tuple[socket.socket, socket.socket]]] = {
    "tcp": tcp_pair,
    "unix": unix_pair,
}


@contextmanager
def connected(kind: str, bufsize: int | None = None) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = PAIRS[kind](bufsize=bufsize)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def fill_up(sock: socket.socket) -> int:
    """Send until the peer's receive buffer and our send buffer are full (the peer
    never reads); returns the bytes sent."""
    sock.setblocking(False)
    chunk = b"\xa5" * 65536
    total = 0
    quiet = 0
    while quiet < 3:  # full, and still full a little later (ACKs may free some room)
        try:
            total += sock.send(chunk)
            quiet = 0
        except BlockingIOError:
            quiet += 1
            time.sleep(0.02)
    return total


class InThread:
    """Run ``fn`` in a thread; ``result()`` gives its return value or raises its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self.finished_at = 0.0

        def run() -> None:
            try:
                self._value = fn()
            except BaseException as exc:  # handed to the test
                self._error = exc
            self.finished_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 5.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the thread is still blocked"
        if self._error is not None:
            raise self._error
        return self._value


# -- Stopper ------------------------------------------------------------------------------


def assert_stop_wakes(stopper: Stopper, call: Callable[[], object]) -> None:
    """``call`` blocks in a thread; ``stopper.stop()`` ends it with Stopped at once."""
    blocked = InThread(call)
    time.sleep(0.2)
    assert blocked.thread.is_alive()
    stopped_at = time.monotonic()
    stopper.stop()
    with pytest.raises(Stopped):
        blocked.result()
    assert blocked.finished_at - stopped_at < 1.0
    stopper.close()


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_stop_wakes_a_thread_blocked_in_recv(kind: str, whole: bool) -> None:
    with connected(kind) as (a, b):
        hand_to_thread(b)
        stopper = Stopper(b)
        view = memoryview(bytearray(1000))
        if whole:
            a.sendall(b"x" * 10)  # part of what MSG_WAITALL waits for
        assert_stop_wakes(stopper, lambda: recv_into(b, view, stopper, whole=whole))


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_stop_wakes_a_thread_blocked_in_send(kind: str) -> None:
    with connected(kind, bufsize=SMALL) as (a, b):
        fill_up(a)
        hand_to_thread(a)  # blocking, no stall timeout: would wait forever
        stopper = Stopper(a)
        assert_stop_wakes(stopper, lambda: send_all(a, [b"y" * (1 << 20)], stopper))


def test_after_stop_every_call_raises_stopped() -> None:
    with connected("tcp") as (a, b):
        hand_to_thread(a)
        hand_to_thread(b)
        a.sendall(b"data waiting")
        stopper_a, stopper_b = Stopper(a), Stopper(b)
        stopper_a.stop()
        stopper_a.stop()  # idempotent
        stopper_b.stop()
        assert stopper_a.stopped and stopper_b.stopped
        with pytest.raises(Stopped):
            recv_into(b, memoryview(bytearray(100)), stopper_b)
        with pytest.raises(Stopped):
            send_all(a, [b"more"], stopper_a)
        with pytest.raises(Stopped):
            stopper_b.wait(b, 1, 0.1)
        stopper_a.close()
        stopper_a.close()  # idempotent
        stopper_b.close()


# -- send_all / recv_into -------------------------------------------------------------------


def drain(sock: socket.socket) -> bytes:
    """Everything ``sock`` receives until EOF."""
    parts = []
    while chunk := sock.recv(65536):
        parts.append(chunk)
    return b"".join(parts)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_send_all_gathers_buffers_exactly(kind: str) -> None:
    header = b"HDR" + bytes(range(9))
    payload = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers hold
    words = array.array("Q", range(1000))  # a non-byte buffer is sent as its bytes
    buffers = [header, b"", bytearray(payload), memoryview(words), memoryview(b"tail")]
    expected = header + payload + words.tobytes() + b"tail"
    with connected(kind) as (a, b):
        hand_to_thread(a, stall_timeout=5.0)
        hand_to_thread(b)
        stopper = Stopper(a)

        reader = InThread(lambda: drain(b))
        assert send_all(a, buffers, stopper, 5.0) == len(expected)
        assert send_all(a, [], stopper) == 0
        assert send_all(a, [b"", bytearray()], stopper) == 0
        a.shutdown(socket.SHUT_WR)
        assert reader.result() == expected
        stopper.close()


def test_send_all_takes_more_views_than_one_call_does() -> None:
    # a job of 4 packets of 512 scattered pages: more views than IOV_MAX
    views = [memoryview(bytes([i % 251]) * 64) for i in range(3 * IOV_MAX + 5)]
    expected = b"".join(views)
    with connected("unix") as (a, b):
        hand_to_thread(a, stall_timeout=5.0)
        hand_to_thread(b)
        stopper = Stopper(a)

        reader = InThread(lambda: drain(b))
        assert send_all(a, views, stopper, 5.0) == len(expected)
        a.shutdown(socket.SHUT_WR)
        assert reader.result() == expected
        stopper.close()


def dribble(sock: socket.socket, data: bytes, piece: int) -> InThread:
    """Send ``data`` from a thread in pieces of ``piece`` bytes, 10 ms apart."""
    def send() -> None:
        for i in range(0, len(data), piece):
            sock.sendall(data[i : i + piece])
            time.sleep(0.01)
    return InThread(send)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_recv_into_whole_fills_the_view(kind: str) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes, sent in dribbles
    with connected(kind) as (a, b):
        hand_to_thread(b)
        stopper = Stopper(b)

        writer = dribble(a, data, 1024)
        view = memoryview(bytearray(len(data)))
        assert recv_into(b, view, stopper, whole=True) == len(data)
        assert view == data
        writer.result()
        # at EOF: what there is, then 0
        a.sendall(b"last")
        a.shutdown(socket.SHUT_WR)
        assert recv_into(b, view, stopper, whole=True) == 4 and view[:4] == b"last"
        assert recv_into(b, view, stopper, whole=True) == 0
        assert recv_into(b, view, stopper) == 0
        stopper.close()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_recv_into_many_fills_the_views_in_order(kind: str) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes, sent in dribbles
    sizes = [1, 4096, 3000, 7, 3136]
    with connected(kind) as (a, b):
        hand_to_thread(b)
        stopper = Stopper(b)

        writer = dribble(a, data, 1000)
        mem = memoryview(bytearray(len(data)))
        views, at = [], 0
        for size in sizes:
            views.append(mem[at : at + size])
            at += size
        # one call waits for all of them, like recv_into(whole=True) for one view
        assert recv_into_many(b, views, stopper) == len(data)
        assert mem == data and filled_bytes(views, len(data)) == data
        writer.result()
        # at EOF: what there is, then 0
        a.sendall(b"last!")
        a.shutdown(socket.SHUT_WR)
        assert recv_into_many(b, views, stopper) == 5 and filled_bytes(views, 5) == b"last!"
        assert mem[:2] == b"la" and mem[1:4] == b"ast"  # the first view holds one byte
        assert recv_into_many(b, views, stopper) == 0
        stopper.close()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_stop_wakes_a_thread_blocked_in_recv_into_many(kind: str) -> None:
    with connected(kind) as (a, b):
        hand_to_thread(b)
        stopper = Stopper(b)
        mem = memoryview(bytearray(1000))
        a.sendall(b"x" * 10)  # part of what MSG_WAITALL waits for
        assert_stop_wakes(stopper, lambda: recv_into_many(b, [mem[:500], mem[500:]], stopper))


def test_recv_into_partial_without_whole() -> None:
    with connected("unix") as (a, b):
        hand_to_thread(b)
        stopper = Stopper(b)
        a.sendall(b"12345")
        view = memoryview(bytearray(100))
        assert recv_into(b, view, stopper) == 5 and view[:5] == b"12345"
        stopper.close()


# -- the stall timeout ----------------------------------------------------------------------

STALL = 0.3


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_send_to_a_full_peer_stalls_after_the_timeout(kind: str) -> None:
    """Note: over TCP this takes about twice the timeout even from a full socket: the
    kernel still takes a few bytes, so the first sendmsg returns a partial count only
    when SO_SNDTIMEO ends, and the next one waits the whole timeout again."""
    with connected(kind, bufsize=SMALL) as (a, b):
        fill_up(a)
        hand_to_thread(a, stall_timeout=STALL)
        stopper = Stopper(a)
        start = time.monotonic()
        with pytest.raises(ChannelError, match="x-channel-stall-timeout") as info:
            send_all(a, [b"h" * 12, b"p" * 65536], stopper, STALL, what="multifd 1")
        elapsed = time.monotonic() - start
        assert str(info.value) == ("multifd 1: the peer accepted no data for 0.3 s "
                                   "(x-channel-stall-timeout)")
        assert info.value.channel == "multifd 1"
        assert STALL * 0.8 <= elapsed < 2 * STALL + 1.0
        stopper.close()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_send_to_a_peer_that_never_reads_stalls(kind: str) -> None:
    """From an empty socket: the buffers fill, then no byte is accepted for the timeout
    (the partial send before it may add one more timeout)."""
    with connected(kind, bufsize=SMALL) as (a, b):
        hand_to_thread(a, stall_timeout=STALL)
        stopper = Stopper(a)
        start = time.monotonic()
        with pytest.raises(ChannelError, match="x-channel-stall-timeout"):
            send_all(a, [b"h" * 12, b"p" * (4 << 20)], stopper, STALL)
        elapsed = time.monotonic() - start
        assert STALL * 0.8 <= elapsed < 2 * STALL + 1.0
        stopper.close()


def test_slow_reader_is_not_a_stall() -> None:
    """A peer that keeps taking bytes, however slowly, never trips the timeout."""
    payload = b"s" * (256 * 1024)
    with connected("tcp", bufsize=SMALL) as (a, b):
        hand_to_thread(a, stall_timeout=STALL)
        stopper = Stopper(a)

        def slow_reader() -> int:
            got = 0
            while chunk := b.recv(32 * 1024):
                got += len(chunk)
                time.sleep(0.05)  # well under the stall timeout between reads
            return got

        reader = InThread(slow_reader)
        assert send_all(a, [payload], stopper, STALL) == len(payload)
        a.shutdown(socket.SHUT_WR)
        assert reader.result(timeout=10) == len(payload)
        stopper.close()


# -- x-socket-buffer-size ------------------------------------------------------------------


def _auto(channels: int) -> int:
    return 0 if channels <= 1 else max(LOOPBACK_MIN, LOOPBACK_BUDGET // channels)


def _families() -> list[int]:
    families = [socket.AF_INET]
    try:
        tcp_pair(socket.AF_INET6)[0].close()
        families.append(socket.AF_INET6)
    except OSError:
        pass
    return families


@pytest.mark.parametrize("family", _families(), ids=lambda f: socket.AddressFamily(f).name)
def test_buffer_size_on_loopback_tcp(family: int) -> None:
    a, b = tcp_pair(family)
    try:
        for sock in (a, b):  # either end: the peer is loopback
            # golden values: 512 KiB over the channels, at least 64 KiB, autotuning for one
            assert [buffer_size(sock, -1, n) for n in (1, 2, 3, 4, 8, 9, 16, 255)] == [
                0, 256 * 1024, 174762, 128 * 1024, 64 * 1024, 64 * 1024, 64 * 1024, 64 * 1024]
            for n in range(1, 40):
                assert buffer_size(sock, -1, n) == _auto(n)
                assert buffer_size(sock, 0, n) == 0
                assert buffer_size(sock, 262144, n) == 262144
                assert buffer_size(sock, 4096, n) == 4096
    finally:
        a.close()
        b.close()


def test_buffer_size_unix_and_unconnected() -> None:
    a, b = unix_pair()
    lone = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no peer: not loopback
    try:
        for setting in (-1, 0, 262144):
            for n in (1, 2, 8):
                assert buffer_size(a, setting, n) == 0
                assert size_buffers(b, setting, n) == 0
        assert buffer_size(lone, -1, 4) == 0
        assert buffer_size(lone, 65536, 4) == 65536  # explicit sizes apply to any TCP peer
    finally:
        a.close()
        b.close()
        lone.close()


def _buffers(sock: socket.socket) -> tuple[int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


@pytest.mark.parametrize(("setting", "channels", "size"),
                         [(65536, 1, 65536), (262144, 4, 262144), (-1, 2, 256 * 1024),
                          (-1, 4, 128 * 1024), (-1, 16, 64 * 1024)])
def test_size_buffers_sets_both(setting: int, channels: int, size: int) -> None:
    a, b = tcp_pair()
    try:
        assert size_buffers(a, setting, channels) == size
        send, recv = _buffers(a)
        # Linux reports twice the value set (bookkeeping overhead)
        assert send >= size and recv >= size
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(("setting", "channels"), [(0, 4), (-1, 1)])
def test_size_buffers_leaves_autotuning_alone(setting: int, channels: int) -> None:
    a, b = tcp_pair()
    try:
        before = _buffers(a)
        assert size_buffers(a, setting, channels) == 0
        assert _buffers(a) == before
    finally:
        a.close()
        b.close()


async def test_loop_waker_runs_the_callback_on_the_loop() -> None:
    import asyncio
    loop = asyncio.get_running_loop()
    calls: list[int] = []
    ran = asyncio.Event()

    def callback() -> None:
        calls.append(threading.get_ident())
        ran.set()
    waker = LoopWaker(loop, callback)
    threads = [threading.Thread(target=waker.wake) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    await asyncio.wait_for(ran.wait(), 5)
    await asyncio.sleep(0.05)
    # on the loop's thread, and the wakes made before it ran are merged
    assert calls and set(calls) == {threading.get_ident()} and len(calls) <= 8
    ran.clear()
    waker.wake()
    await asyncio.wait_for(ran.wait(), 5)
    waker.close()
    waker.close()
    waker.wake()  # after close: nothing written, nothing run
    count = len(calls)
    await asyncio.sleep(0.05)
    assert len(calls) == count


def test_thread_signal_wakes_a_waiting_thread_and_keeps_early_sets() -> None:
    signal = ThreadSignal()
    assert signal.wait(0.01) is False                # nothing set: times out
    signal.set()
    signal.set()
    assert signal.wait(5) is True                    # set before the wait: kept, merged
    assert signal.wait(0.01) is False
    woke: list[float] = []
    waiter = threading.Thread(target=lambda: woke.append(time.monotonic())
                              if signal.wait(5) else None)
    waiter.start()
    time.sleep(0.05)
    assert not woke                                  # blocked
    signal.set()
    waiter.join(5)
    assert len(woke) == 1 and not waiter.is_alive()
