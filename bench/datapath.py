"""Choose the data path by measurement: one event loop vs. one thread per channel.

Moves ``--size`` bytes from a sender process to a receiver process over N loopback
TCP streams in ``--packet``-sized packets (a 12-byte header + payload, like a
multifd packet), receiving into preallocated buffers, and reports GB/s for:

* ``loop``    — each process runs one uvloop event loop; non-blocking sockets,
                ``sendmsg`` / ``sock_recv_into`` (today's daemons);
* ``threads`` — each process runs one thread per stream with blocking
                ``sendmsg`` / ``recv_into`` (both release the GIL during the copy);
* ``procs``   — as ``threads``, but a process of its own per stream on each side
                (no GIL shared between streams; ``--spread`` memory is shared);
* ``pool``    — ``--pool K`` threads on each side (default 2), each serving every
                K-th stream with non-blocking sockets and ``poll``: fewer threads
                than streams, so fewer sleeps and wake-ups per packet.

``--work US`` adds US microseconds of Python per packet on each side, holding the
GIL (a migration decodes, checks and places every packet): how much of the threads'
speed survives it, and what processes would win back.

Run:  python bench/datapath.py --streams 1 2 4 8 --size 2G
      python bench/datapath.py --modes threads --spread 2G --streams 1 4   # distinct memory
      python bench/datapath.py --modes threads procs --spread 2G --packet 512K \
          --streams 4 16 --work 20
      python bench/datapath.py --modes threads pool --spread 2G --streams 4 16 --bufsize 64K
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

HEADER = struct.Struct(">III")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def _shares(total: int, streams: int, packet: int) -> list[int]:
    packets = total // packet
    return [packets // streams + (1 if i < packets % streams else 0) for i in range(streams)]


WORK = 0.0  # --work: seconds of Python per packet on each side


def _python_work() -> None:
    """Hold the GIL for WORK seconds, running bytecode, as per-packet code does."""
    if WORK:
        end = time.perf_counter() + WORK
        while time.perf_counter() < end:
            pass


def _advance(views: list[memoryview], sent: int) -> None:
    """Drop the ``sent`` bytes a ``sendmsg`` took from the front of ``views``."""
    while sent:
        if sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0


# -- blocking, one thread (or process) per stream ------------------------------------------
def _send_blocking(sock: socket.socket, packets: int, payload: memoryview,
                   region: memoryview | None = None, start: int = 0) -> None:
    hdr = HEADER.pack(0x11223344, 1, 0x40)
    size = len(payload)
    pos = start
    for _ in range(packets):
        _python_work()
        if region is not None:  # --spread: every packet from the next place
            if pos + size > len(region):
                pos = 0
            payload = region[pos:pos + size]
            pos += size
        views = [memoryview(hdr), payload]
        while views:
            _advance(views, sock.sendmsg(views))
    sock.shutdown(socket.SHUT_WR)


def _send_process(sock: socket.socket, packets: int, payload: memoryview,
                  region: memoryview | None, start: int) -> None:
    if region is not None:
        _touch(region, 0, len(region))  # (a forked child faults its pages in again)
    _send_blocking(sock, packets, payload, region, start)


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


SPREAD: memoryview | None = None  # --spread: receive into one big region, like guest RAM
_spread_pos = [0]


def _spread_view(packet: int) -> memoryview:
    """The next ``packet`` bytes of SPREAD at the streams' shared running position."""
    assert SPREAD is not None
    pos = _spread_pos[0]
    _spread_pos[0] = (pos + packet) % (len(SPREAD) - packet + 1)
    return SPREAD[pos:pos + packet]


def _recv_blocking(sock: socket.socket, packet: int, counter: list[int],
                   start: int | None = None) -> None:
    """Receive packets until EOF; ``start``: this stream's own place in SPREAD (a
    process per stream), else the streams share one running position."""
    hdr = memoryview(bytearray(HEADER.size))
    buf = memoryview(bytearray(packet))
    total = 0
    own = start
    while _recv_exact(sock, hdr):
        HEADER.unpack(hdr)
        _python_work()
        if SPREAD is not None:
            if own is None:
                buf = _spread_view(packet)
            else:
                buf = SPREAD[own:own + packet]
                own = (own + packet) % (len(SPREAD) - packet + 1)
        _recv_exact(sock, buf)
        total += packet
    counter.append(total)


def _touch(region: memoryview | None, start: int, size: int) -> None:
    """Map a forked child's share of a shared region before its clock starts (a
    long-lived worker process would have done it once, long before)."""
    if region is not None:
        sum(region[start:start + size:4096])


def _recv_process(sock: socket.socket, packet: int, start: int, part: int,
                  done: mp.Queue) -> None:
    _touch(SPREAD, start, part)
    hdr = memoryview(bytearray(HEADER.size))
    _recv_exact(sock, hdr)  # the first packet starts this stream's clock
    first = time.perf_counter()
    buf = SPREAD[start:start + packet] if SPREAD is not None else memoryview(bytearray(packet))
    _recv_exact(sock, buf)
    counter: list[int] = []
    _recv_blocking(sock, packet, counter, start + packet if SPREAD is not None else None)
    done.put((counter[0] + packet, first, time.perf_counter()))


# -- K threads, each polling several non-blocking streams ---------------------------------
POOL = 2  # --pool: threads per side in the pool mode


def _polled(socks: list[socket.socket], event: int
            ) -> tuple[select.poll, dict[int, socket.socket]]:
    """``socks`` made non-blocking and registered for ``event``; the poll object and
    the sockets by file descriptor."""
    poller = select.poll()
    for s in socks:
        s.setblocking(False)
        poller.register(s, event)
    return poller, {s.fileno(): s for s in socks}


def _send_polling(socks: list[socket.socket], counts: list[int], payload: memoryview,
                  region: memoryview | None, starts: list[int]) -> None:
    """Send ``counts[i]`` packets on ``socks[i]``, all from this one thread."""
    hdr = memoryview(HEADER.pack(0x11223344, 1, 0x40))
    size = len(payload)
    left = dict(zip(socks, counts, strict=True))
    pos = dict(zip(socks, starts, strict=True))
    pending: dict[socket.socket, list[memoryview]] = {s: [] for s in socks}
    poller, fds = _polled(socks, select.POLLOUT)
    while fds:
        for fd, _ in poller.poll():
            sock = fds[fd]
            views = pending[sock]
            while True:
                if not views:
                    if not left[sock]:
                        poller.unregister(fd)
                        del fds[fd]
                        sock.setblocking(True)
                        sock.shutdown(socket.SHUT_WR)
                        break
                    _python_work()
                    left[sock] -= 1
                    data = payload
                    if region is not None:
                        if pos[sock] + size > len(region):
                            pos[sock] = 0
                        data = region[pos[sock]:pos[sock] + size]
                        pos[sock] += size
                    views[:] = [hdr, data]
                try:
                    sent = sock.sendmsg(views)
                except BlockingIOError:
                    break
                _advance(views, sent)


def _recv_polling(socks: list[socket.socket], packet: int, counter: list[int]) -> None:
    """Receive packets from every one of ``socks`` until each reaches EOF."""
    total = 0
    # per socket: the view being filled, and whether it is a header
    headers = {s: memoryview(bytearray(HEADER.size)) for s in socks}
    state: dict[socket.socket, tuple[memoryview, bool]] = {s: (headers[s], True) for s in socks}
    own_buf = {s: memoryview(bytearray(packet)) for s in socks}
    poller, fds = _polled(socks, select.POLLIN)
    while fds:
        for fd, _ in poller.poll():
            sock = fds[fd]
            view, is_header = state[sock]
            while True:
                try:
                    n = sock.recv_into(view)
                except BlockingIOError:
                    break
                if n == 0:
                    poller.unregister(fd)
                    del fds[fd]
                    break
                if n < len(view):
                    view = view[n:]
                    continue
                if is_header:  # header complete: the payload goes to its place
                    _python_work()
                    view = _spread_view(packet) if SPREAD is not None else own_buf[sock]
                    is_header = False
                else:
                    total += packet
                    view, is_header = headers[sock], True
            state[sock] = (view, is_header)
    counter.append(total)


def _pool(target: Callable[..., None], groups: list[tuple[object, ...]]) -> None:
    """Run ``target`` in a thread per argument tuple and wait for them all."""
    threads = [threading.Thread(target=target, args=args) for args in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- one uvloop event loop ---------------------------------------------------------------
async def _send_loop(socks: list[socket.socket], shares: list[int], payload: memoryview) -> None:
    from migrate_common.net import sendmsg_all

    hdr = HEADER.pack(0x11223344, 1, 0x40)

    async def one(sock: socket.socket, packets: int) -> None:
        for _ in range(packets):
            await sendmsg_all(sock, [hdr, payload])
        sock.shutdown(socket.SHUT_WR)

    await asyncio.gather(*(one(s, n) for s, n in zip(socks, shares, strict=True)))


async def _recv_loop(socks: list[socket.socket], packet: int) -> int:
    loop = asyncio.get_running_loop()

    async def exact(sock: socket.socket, view: memoryview) -> bool:
        got = 0
        while got < len(view):
            n = await loop.sock_recv_into(sock, view[got:])
            if n == 0:
                return False
            got += n
        return True

    async def one(sock: socket.socket) -> int:
        hdr = memoryview(bytearray(HEADER.size))
        buf = memoryview(bytearray(packet))
        total = 0
        while await exact(sock, hdr):
            await exact(sock, buf)
            total += packet
        return total

    return sum(await asyncio.gather(*(one(s) for s in socks)))


# -- processes ---------------------------------------------------------------------------
SPREAD_SIZE = 0
SHARED_MEMORY = False
BUFSIZE = 0  # SO_SNDBUF / SO_RCVBUF of every stream; 0 = the kernel's autotuning


def _size_buffers(sock: socket.socket, option: int) -> None:
    if BUFSIZE:
        sock.setsockopt(socket.SOL_SOCKET, option, BUFSIZE)


def _receiver(mode: str, port_q: mp.Queue, result_q: mp.Queue, streams: int,
              packet: int) -> None:
    global SPREAD
    if SPREAD_SIZE:
        import mmap
        # shared, so that a process per stream receives into the same memory (without
        # transparent huge pages unless shmem_enabled allows them: --shared-memory
        # gives threads the same kind of memory)
        shared = mode == "procs" or SHARED_MEMORY
        region = mmap.mmap(-1, SPREAD_SIZE,
                           flags=mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE)
        region.madvise(mmap.MADV_HUGEPAGE)
        memoryview(region)[:] = bytes(SPREAD_SIZE)  # pre-faulted, like the daemons' RAM
        SPREAD = memoryview(region)
    lsock = socket.socket()
    _size_buffers(lsock, socket.SO_RCVBUF)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(streams)
    port_q.put(lsock.getsockname()[1])
    socks = [lsock.accept()[0] for _ in range(streams)]
    start = time.perf_counter()
    if mode == "threads":
        counter: list[int] = []
        threads = [threading.Thread(target=_recv_blocking, args=(s, packet, counter))
                   for s in socks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = sum(counter)
    elif mode == "pool":
        counter = []
        k = min(POOL, streams)
        _pool(_recv_polling, [(socks[i::k], packet, counter) for i in range(k)])
        total = sum(counter)
    elif mode == "procs":
        ctx = mp.get_context("fork")
        done: mp.Queue = ctx.Queue()
        part = (SPREAD_SIZE // streams) // packet * packet
        procs = [ctx.Process(target=_recv_process, args=(s, packet, i * part, part, done))
                 for i, s in enumerate(socks)]
        for p in procs:
            p.start()
        results = [done.get(timeout=300) for _ in procs]
        for p in procs:
            p.join()
        total = sum(r[0] for r in results)
        result_q.put((total, max(r[2] for r in results) - min(r[1] for r in results)))
        return
    else:
        import uvloop

        for s in socks:
            s.setblocking(False)
        total = uvloop.run(_recv_loop(socks, packet))
    result_q.put((total, time.perf_counter() - start))


def _sender(mode: str, port: int, streams: int, size: int, packet: int) -> None:
    payload = memoryview(bytearray(b"\x5a" * packet))
    region: memoryview | None = None
    if SPREAD_SIZE:  # before connecting: the receiver's clock starts at the accept
        import mmap
        buf = mmap.mmap(-1, SPREAD_SIZE)
        region = memoryview(buf)
        for pos in range(0, SPREAD_SIZE, packet):  # written, so every page is its own
            region[pos:pos + packet] = payload[:min(packet, SPREAD_SIZE - pos)]
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _size_buffers(s, socket.SO_SNDBUF)
    shares = _shares(size, streams, packet)
    part = (SPREAD_SIZE // max(1, streams)) // packet * packet  # each stream's own place
    starts = [i * part for i in range(streams)]
    if mode == "pool":
        k = min(POOL, streams)
        _pool(_send_polling, [(socks[i::k], shares[i::k], payload, region, starts[i::k])
                              for i in range(k)])
    elif mode in ("threads", "procs"):
        runner = (threading.Thread if mode == "threads"
                  else mp.get_context("fork").Process)
        target = _send_blocking if mode == "threads" else _send_process
        workers = [runner(target=target, args=(s, n, payload, region, start))
                   for s, n, start in zip(socks, shares, starts, strict=True)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    else:
        import uvloop

        for s in socks:
            s.setblocking(False)
        uvloop.run(_send_loop(socks, shares, payload))


def measure(mode: str, streams: int, size: int, packet: int) -> float:
    ctx = mp.get_context("fork")
    port_q: mp.Queue = ctx.Queue()
    result_q: mp.Queue = ctx.Queue()
    recv = ctx.Process(target=_receiver, args=(mode, port_q, result_q, streams, packet))
    recv.start()
    port = port_q.get(timeout=10)
    send = ctx.Process(target=_sender, args=(mode, port, streams, size, packet))
    send.start()
    total, seconds = result_q.get(timeout=300)
    send.join()
    recv.join()
    expected = sum(_shares(size, streams, packet)) * packet
    if total != expected:
        raise RuntimeError(f"{mode}: the receiver got {total} bytes, {expected} were sent")
    return total / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--packet", default="1M")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["loop", "threads"])
    parser.add_argument("--bufsize", default="0",
                        help="SO_SNDBUF/SO_RCVBUF of every stream (0: kernel autotuning)")
    parser.add_argument("--work", type=float, default=0.0, metavar="US",
                        help="threads and procs modes: microseconds of Python (holding "
                             "the GIL) per packet on each side")
    parser.add_argument("--shared-memory", action="store_true",
                        help="threads mode: receive --spread into shared memory, as procs do")
    parser.add_argument("--spread", default="0",
                        help="threads and procs modes: send from and receive into this much pre-faulted "
                             "memory, each packet at the next place (like guest RAM or "
                             "device state), not one buffer that stays in the caches")
    parser.add_argument("--pool", type=int, default=2, metavar="K",
                        help="pool mode: threads per side, each polling every K-th stream")
    args = parser.parse_args()
    global BUFSIZE, SPREAD_SIZE, WORK, SHARED_MEMORY, POOL
    POOL = max(1, args.pool)
    WORK = args.work / 1e6
    SHARED_MEMORY = args.shared_memory
    BUFSIZE = parse_size(args.bufsize)
    SPREAD_SIZE = parse_size(args.spread)
    size, packet = parse_size(args.size), parse_size(args.packet)
    print(f"{'streams':>7} " + " ".join(f"{m:>16}" for m in args.modes) + "   (GB/s, median)")
    for streams in args.streams:
        cells = []
        for mode in args.modes:
            runs = sorted(measure(mode, streams, size, packet) for _ in range(args.repeat))
            cells.append(f"{runs[len(runs) // 2]:6.2f} ({runs[0]:.2f}-{runs[-1]:.2f})")
        print(f"{streams:>7} " + " ".join(f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
