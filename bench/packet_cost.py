"""The Python cost of one multifd RAM packet on each side, without sockets.

Builds RAM packets the way a source channel thread does (zero-page detection, the
packet header, a view per run of pages) from guest RAM of the given fill, then takes
their bytes through a destination channel decoder with the pages received in place
(the decoder's ``buffers()`` filled as a scatter receive would) and applies them
(zero pages, counters, digest bookkeeping).  Reports microseconds per packet for
each side: the work that holds the GIL per packet, which is what limits RAM made of
scattered pages (``fill=mixed``: half the pages zero, at random).

Run:  python bench/packet_cost.py --fill mixed
      python bench/packet_cost.py --fill random --packets 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from migrate_dst.ram import RamLoadHandler  # noqa: E402
from migrate_src.channels import RamJob  # noqa: E402
from protocol.channel import ChannelDecoder, RamPacketReceived  # noqa: E402
from vm.ram import GuestRam, parse_memory_option  # noqa: E402

PAGES = 128  # per packet: QEMU's 512 KiB of 4 KiB pages


class _Sender:
    """What RamJob.build needs of a MultifdSender."""

    page_count = PAGES

    def __init__(self) -> None:
        self.num = 0

    def next_packet_num(self) -> int:
        self.num += 1
        return self.num


class _Channel:
    compressor = None


def measure(fill: str, packets: int) -> dict[str, Any]:
    size = f"{max(packets * PAGES * 4 // 1024, 1)}M"  # MiB: 4 KiB pages
    src = GuestRam(parse_memory_option(f"{size},fill={fill}"), role="source")
    dst = GuestRam(parse_memory_option(size), role="destination")
    src.prepare_blocking()
    dst.prepare_blocking()
    handler = RamLoadHandler(dst, None, structlog.get_logger())
    handler.setup_seen = True
    block = src.blocks["pc.ram"]
    sender, chan = _Sender(), _Channel()

    started = time.perf_counter()
    wire = [RamJob([(block, range(i * PAGES, (i + 1) * PAGES))], True).build(sender, chan)
            for i in range(packets)]
    source_us = (time.perf_counter() - started) / packets * 1e6

    headers = [bytes(parts[0]) for parts in wire]
    payloads = [b"".join(parts[1:]) for parts in wire]
    runs = sum(len(parts) - 1 for parts in wire) / packets
    decoder = ChannelDecoder(expect_init=False, page_size=4096, block_size=dst.block_size,
                             ram_target=handler.receive_targets)
    copy_s = 0.0
    started = time.perf_counter()
    for header, payload in zip(headers, payloads, strict=True):
        events = decoder.feed(header)
        if payload:
            t = time.perf_counter()
            data, pos = memoryview(payload), 0
            for view in decoder.buffers():  # what one recvmsg_into would fill
                view[:] = data[pos:pos + len(view)]
                pos += len(view)
            copy_s += time.perf_counter() - t
            events = decoder.advance(len(payload))
        for event in events:
            assert isinstance(event, RamPacketReceived)
            handler.apply_in_thread(0, event.packet)
    destination_us = (time.perf_counter() - started - copy_s) / packets * 1e6
    assert src.digest(fresh=True) == dst.digest(fresh=True), "the pages did not arrive"
    return {"fill": fill, "packets": packets, "runs-per-packet": runs,
            "normal-per-packet": sum(len(p) for p in payloads) / packets / 4096,
            "source-us": source_us, "destination-us": destination_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fill", default="mixed", choices=["mixed", "random"])
    ap.add_argument("--packets", type=int, default=512, help="packets (default 512: 256 MiB)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for _ in range(args.repeat):
        r = measure(args.fill, args.packets)
        print(f"fill={r['fill']}: {r['normal-per-packet']:.0f} data pages in "
              f"{r['runs-per-packet']:.1f} runs per packet; source {r['source-us']:.0f} us, "
              f"destination {r['destination-us']:.0f} us per packet (copying the pages "
              "left out)")


if __name__ == "__main__":
    main()
