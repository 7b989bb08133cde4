"""atheris (libFuzzer) target: the multifd channel decoder and the control decoder.

Whatever the bytes and however they are split across receive calls, the decoders
may only raise this project's MigrationError subclasses, and never hand out a
buffer larger than the bound they were given.

    python fuzz/fuzz_channel.py -max_total_time=60 -rss_limit_mb=1024
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from protocol.channel import ChannelDecoder
    from protocol.control import ControlDecoder
    from protocol.errors import MigrationError
    from protocol.multifd import RamLayout, max_compressed_size

MAX_PAYLOAD = 1 << 20
#: the largest buffer any decoder here may ask for: a device payload (MAX_PAYLOAD) or a
#: RAM packet's payload, compressed data included
BOUND = max(MAX_PAYLOAD, max_compressed_size(128, 4096))


def _allocate(size: int) -> bytearray:
    if size > BOUND:
        raise AssertionError(f"decoder asked for {size} bytes, over its bound")
    return bytearray(size)


def _feed(decoder: ChannelDecoder | ControlDecoder, data: bytes, cuts: list[int]) -> None:
    pos = 0
    cut_iter = iter(cuts)
    while pos < len(data):
        view = decoder.buffer()
        n = min(len(view), len(data) - pos, next(cut_iter, len(data)) or 1)
        view[:n] = data[pos:pos + n]
        pos += n
        decoder.advance(n)
    decoder.eof()


def TestOneInput(raw: bytes) -> None:  # noqa: N802 - libFuzzer's name
    fdp = atheris.FuzzedDataProvider(raw)
    which = fdp.ConsumeIntInRange(0, 2)
    cuts = [fdp.ConsumeIntInRange(1, 4096) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        if which == 2:
            _feed(ControlDecoder(expect_preamble=True, max_data_size=MAX_PAYLOAD,
                                 allocate=_allocate), data, cuts)
        else:
            layout = RamLayout.V2 if which == 0 else RamLayout.V1
            _feed(ChannelDecoder(ram_layout=layout, max_device_payload=MAX_PAYLOAD,
                                 allocate=_allocate,
                                 block_size=lambda name: 1 << 20 if name == "pc.ram" else None),
                  data, cuts)
    except MigrationError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
