"""protocol against real QEMU 7.2 and 10.0 multifd channel recordings.

The captures (``/work/shared/captures``, see its README) are byte-exact recordings of
what an unmodified QEMU source writes: one 64-byte init, then RAM and SYNC packets.
Every packet of every channel must decode with :class:`ChannelDecoder` in the layout
of its QEMU version, page offsets must lie inside the RAM blocks announced on the
main channel, and the totals must agree with QEMU's own ``query-migrate`` numbers.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from protocol.channel import ChannelClosed, ChannelDecoder, InitReceived, RamPacketReceived
from protocol.control import ChannelKind, classify_channel
from protocol.errors import BadMagicError, HandshakeError, RemoteProtocolError
from protocol.multifd import ChannelInit, PacketFlags, RamLayout, RamPacket

CAPTURES = Path(__file__).resolve().parents[1].parent / "shared" / "captures"
VM_UUID = uuid.UUID("5c2f7a4e-3b1d-4e8a-9f60-0123456789ab").bytes
PAGE = 4096
LAYOUTS = {"qemu-7.2": RamLayout.V1, "qemu-10.0": RamLayout.V2}
METHODS = {"none": 0, "zlib": PacketFlags.ZLIB, "zstd": PacketFlags.ZSTD}


def capture_dirs() -> list[Path]:
    if not CAPTURES.is_dir():
        return []
    return sorted(p.parent for p in CAPTURES.glob("qemu-*/*/meta.json"))


DIRS = capture_dirs()
needs_captures = pytest.mark.skipif(
    not DIRS, reason=f"QEMU captures not found at {CAPTURES} (recorded by tools/capture_qemu_multifd.py)"
)


def ram_blocks(main: bytes) -> dict[str, int]:
    """RAM block sizes from the RAM setup section of a QEVM main stream.

    Only what these captures contain: header, a configuration section without
    subsections, then the START section of "ram" whose body begins with
    ``BE64 total | MEM_SIZE`` and the (idstr, used_length) list.
    """
    magic, version = struct.unpack_from(">II", main, 0)
    assert (magic, version) == (0x5145564D, 3)
    pos = 8
    assert main[pos] == 0x07  # QEMU_VM_CONFIGURATION
    (name_len,) = struct.unpack_from(">I", main, pos + 1)
    pos += 5 + name_len
    assert main[pos] == 0x01  # QEMU_VM_SECTION_START
    idlen = main[pos + 5]
    assert main[pos + 6 : pos + 6 + idlen] == b"ram"
    pos += 6 + idlen + 8
    (total,) = struct.unpack_from(">Q", main, pos)
    assert total & 0x004  # RAM_SAVE_FLAG_MEM_SIZE
    total &= ~0xFFF
    pos += 8
    blocks: dict[str, int] = {}
    while sum(blocks.values()) < total:
        n = main[pos]
        name = main[pos + 1 : pos + 1 + n].decode()
        (used,) = struct.unpack_from(">Q", main, pos + 1 + n)
        blocks[name] = used
        pos += 1 + n + 8
    assert sum(blocks.values()) == total
    return blocks


@dataclass
class Channel:
    path: Path
    init: ChannelInit
    packets: list[RamPacket]
    payload_bytes: int
    events: int


def decode_dir(directory: Path) -> Iterator[Channel]:
    layout = LAYOUTS[directory.parent.name]
    method = METHODS[directory.name.split("-")[0]]
    blocks = ram_blocks((directory / "main.bin").read_bytes())
    for path in sorted(directory.glob("multifd-*.bin")):
        decoder = ChannelDecoder(
            page_size=PAGE, ram_layout=layout, compression=method, block_size=blocks.get
        )
        data = path.read_bytes()
        events = decoder.feed(data) + decoder.eof()
        assert isinstance(events[0], InitReceived)
        assert events[-1] == ChannelClosed()
        ram = [e for e in events[1:-1] if isinstance(e, RamPacketReceived)]
        assert len(ram) == len(events) - 2 == decoder.packets_received
        assert decoder.bytes_received == len(data)
        yield Channel(
            path,
            events[0].init,
            [e.packet for e in ram],
            sum(len(e.payload) for e in ram),
            len(events),
        )


@needs_captures
@pytest.mark.parametrize("directory", DIRS, ids=[f"{d.parent.name}/{d.name}" for d in DIRS])
def test_capture_decodes(directory: Path) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    layout = LAYOUTS[directory.parent.name]
    method = METHODS[directory.name.split("-")[0]]
    channels = list(decode_dir(directory))
    assert len(channels) == meta["multifd_channels"] == 2

    connected: set[int] = set()
    for ch in channels:
        ch.init.validate(expected_uuid=VM_UUID, channels=2, connected=connected)
        connected.add(ch.init.channel_id)
        assert ch.path.name == f"multifd-{ch.init.channel_id}.bin"
        # the wire init is exactly what our encoder writes
        assert ch.path.read_bytes()[:64] == ch.init.encode()
        with pytest.raises(HandshakeError, match="already set up"):
            ch.init.validate(expected_uuid=VM_UUID, channels=2, connected=connected)

        syncs = [p for p in ch.packets if p.is_sync]
        # one SYNC for the setup flush and one per completed RAM section / round
        assert len(syncs) == 3
        for packet in ch.packets:
            if packet.normal_pages:
                assert packet.compression == method
            if method == 0:
                assert packet.next_packet_size == packet.normal_pages * PAGE
            if layout is RamLayout.V2 and packet.is_sync:
                # 9.0+: SYNC packets carry no pages and nothing else but the SYNC bit
                assert packet == RamPacket.sync_packet(packet.packet_num)
            if layout is RamLayout.V1:
                assert packet.zero_pages == 0 and packet.pages_alloc == 128

    total_normal = sum(p.normal_pages for ch in channels for p in ch.packets)
    total_zero = sum(p.zero_pages for ch in channels for p in ch.packets)
    ram = meta["status"]["ram"]
    if layout is RamLayout.V2:
        # QEMU's own accounting: normal pages, zero pages ("duplicate") and every
        # byte written on the multifd channels (inits included)
        assert total_normal == ram["normal"]
        assert total_zero == ram["duplicate"]
        assert sum(ch.path.stat().st_size for ch in channels) == ram["multifd-bytes"]
    else:
        # 7.2 sends zero pages on the main channel; its zstd run sent one page twice
        assert total_normal in (ram["normal"], ram["normal"] + 1)
        assert total_zero == 0
    if method == 0:
        assert sum(ch.payload_bytes for ch in channels) == total_normal * PAGE == ram["normal-bytes"]


@needs_captures
def test_capture_72_quirks() -> None:
    """What QEMU 7.2 leaves in fields the spec does not pin down."""
    directory = CAPTURES / "qemu-7.2" / "zlib-2ch"
    if not directory.is_dir():
        pytest.skip(f"{directory} missing")
    packets = [p for ch in decode_dir(directory) for p in ch.packets]
    # a SYNC packet may carry pages (the pending batch is merged with the sync)...
    assert any(p.is_sync and p.normal_pages for p in packets)
    # ...empty packets drop the compression bits and keep a stale block name...
    assert any(p.flags == 0 and not p.normal_pages and p.ramblock for p in packets)
    # ...and packet_num is not unique (informational only)
    nums = [p.packet_num for p in packets]
    assert len(nums) != len(set(nums))


@needs_captures
def test_capture_72_needs_v1_layout() -> None:
    """Decoded with the 9.0+ layout, 7.2's stale next_packet_size is an error."""
    path = CAPTURES / "qemu-7.2" / "none-2ch" / "multifd-0.bin"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    decoder = ChannelDecoder(ram_layout=RamLayout.V2)
    with pytest.raises(RemoteProtocolError, match="next_packet_size"):
        decoder.feed(path.read_bytes())


@needs_captures
@pytest.mark.parametrize("directory", DIRS, ids=[f"{d.parent.name}/{d.name}" for d in DIRS])
def test_capture_channel_classification(directory: Path) -> None:
    for path in directory.glob("multifd-*.bin"):
        assert classify_channel(path.read_bytes()[:4]) is ChannelKind.MULTIFD
    with pytest.raises(BadMagicError, match="QEVM"):
        classify_channel((directory / "main.bin").read_bytes()[:4])


@needs_captures
def test_capture_in_small_chunks_matches() -> None:
    path = CAPTURES / "qemu-10.0" / "zstd-2ch" / "multifd-1.bin"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    data = path.read_bytes()
    whole = ChannelDecoder(compression=PacketFlags.ZSTD).feed(data)
    chunked = ChannelDecoder(compression=PacketFlags.ZSTD)
    events = []
    pos = 0
    step = 1
    while pos < len(data):
        target = chunked.buffer()
        take = min(len(target), step, len(data) - pos)
        target[:take] = data[pos : pos + take]
        events.extend(chunked.advance(take))
        pos += take
        step = step * 3 % 7919 + 1  # irregular sizes, 1..7919 bytes

    def key(e: object) -> object:
        if isinstance(e, RamPacketReceived):
            return (e.packet, bytes(e.payload))
        return e

    assert [key(e) for e in events] == [key(e) for e in whole]
