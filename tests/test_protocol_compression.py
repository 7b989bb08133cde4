"""Compression streams: round trips, bounds, and real QEMU zlib/zstd payloads."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.channel import ChannelDecoder, RamPacketReceived
from protocol.compression import PacketCompressor, PacketDecompressor, method_flag
from protocol.errors import ConfigError, LimitExceededError, MigrationError
from protocol.multifd import PacketFlags, RamLayout

CAPTURES = Path(__file__).resolve().parents[1].parent / "shared" / "captures"


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_stream_runs_across_packets(method):
    comp, decomp = PacketCompressor(method, 1), PacketDecompressor(method)
    rng = random.Random(1)
    for _ in range(20):
        pages = [bytes(4096) if rng.random() < 0.3 else rng.randbytes(64) * 64
                 for _ in range(rng.randint(1, 16))]
        data = comp.compress(pages)
        assert decomp.decompress(data, 4096 * len(pages)) == b"".join(pages)


@settings(max_examples=50, deadline=None)
@given(method=st.sampled_from(["zlib", "zstd"]), junk=st.binary(max_size=2000),
       expected=st.integers(1, 1 << 20))
def test_garbage_never_escapes_typed_errors_or_the_bound(method, junk, expected):
    try:
        out = PacketDecompressor(method).decompress(junk, expected)
    except MigrationError:
        return
    assert len(out) == expected


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_bomb_is_cut_at_the_packet_size(method):
    bomb = PacketCompressor(method, 9).compress([bytes(1 << 20)] * 64)  # 64 MiB of zeros
    with pytest.raises(LimitExceededError, match="more than the packet's 4096 bytes"):
        PacketDecompressor(method).decompress(bomb, 4096)


def test_levels_and_methods_are_checked():
    with pytest.raises(ConfigError):
        PacketCompressor("zlib", 10)
    with pytest.raises(ConfigError):
        method_flag("lz4")
    assert method_flag("zstd") == PacketFlags.ZSTD


@pytest.mark.parametrize("version,layout", [("qemu-10.0", RamLayout.V2),
                                            ("qemu-7.2", RamLayout.V1)])
@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_real_qemu_payloads_decompress(version, layout, method):
    folder = CAPTURES / version / f"{method}-2ch"
    if not folder.exists():
        pytest.skip(f"captures not found at {folder}")
    pages = 0
    for path in sorted(folder.glob("multifd-*.bin")):
        dec = ChannelDecoder(ram_layout=layout)
        stream = PacketDecompressor(method)
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            view = dec.buffer()
            n = min(len(view), len(data) - pos)
            view[:n] = data[pos:pos + n]
            pos += n
            for event in dec.advance(n):
                if isinstance(event, RamPacketReceived) and event.packet.normal_pages:
                    stream.decompress(event.payload, event.packet.normal_pages * 4096)
                    pages += event.packet.normal_pages
    assert pages >= 649  # QEMU's own count for this RAM content (meta.json)
