"""Sans-I/O decoder for the receiving end of one multifd channel.

:class:`ChannelDecoder` turns the bytes of a multifd connection into events: the
channel init, RAM packets with their page payload, device-state packets with their
payload, and the clean end of the channel.  It is shaped like
:class:`asyncio.BufferedProtocol`: the caller asks :meth:`ChannelDecoder.buffer` where
to put the next bytes (``sock.recv_into(decoder.buffer())``), then reports how many
arrived with :meth:`ChannelDecoder.advance`.

Headers are gathered in a small fixed internal buffer; payloads are received in place
into buffers obtained from the caller's ``allocate`` callback, so page data and device
state are never copied by this layer beyond the few bytes that happened to arrive in
the same ``recv`` as their header.  Every header is validated (see
:mod:`protocol.multifd`) before anything is allocated for its payload, so memory use
is bounded by ``max(internal buffer, validated payload size)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeAlias

from protocol._stream import Allocator, StreamDecoder, claim_buffer, default_allocate
from protocol.errors import ConfigError
from protocol.multifd import (
    _DEVICE_STATE,
    COMPRESSION_MASK,
    DEFAULT_MAX_DEVICE_PAYLOAD,
    DEVICE_STATE_BODY_SIZE,
    DEVICE_STATE_HEADER_SIZE,
    INIT_SIZE,
    MULTIFD_PACKET_SIZE,
    PACKET_HEADER_SIZE,
    ChannelInit,
    DeviceStateHeader,
    PacketHeader,
    RamLayout,
    RamPacket,
    ram_packet_size,
    ram_page_count,
)

__all__ = [
    "InitReceived",
    "DeviceStateReceived",
    "RamPacketReceived",
    "ChannelClosed",
    "ChannelEvent",
    "ChannelDecoder",
]


@dataclass(frozen=True, slots=True)
class InitReceived:
    """The 64-byte channel init arrived (not yet checked against UUID or id range:
    that needs the destination's state, see :meth:`ChannelInit.validate`)."""

    init: ChannelInit


@dataclass(frozen=True, slots=True)
class DeviceStateReceived:
    """A device-state packet; ``payload`` is exactly ``header.payload_size`` bytes, a
    view of the buffer obtained from ``allocate``.  ``in_place``: the payload's first
    ``device_prefix`` bytes are in ``payload`` (a copy) and the rest went straight to
    the view ``device_target`` gave for this packet."""

    header: DeviceStateHeader
    payload: memoryview
    in_place: bool = False


@dataclass(frozen=True, slots=True)
class RamPacketReceived:
    """A RAM packet; ``payload`` is ``packet.next_packet_size`` bytes (maybe empty):
    raw pages in the order of ``packet.normal_offsets``, or one compressed chunk.
    ``in_place``: the pages went straight to the views ``ram_target`` gave for this
    packet, and ``payload`` is empty."""

    packet: RamPacket
    payload: memoryview
    in_place: bool = False


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """The peer closed the channel at a packet boundary."""


ChannelEvent: TypeAlias = InitReceived | DeviceStateReceived | RamPacketReceived | ChannelClosed

_EMPTY = memoryview(b"")


def _target_view(target: memoryview) -> memoryview:
    """Check a ``ram_target`` view like an allocated buffer (writable flat bytes)."""
    if (type(target) is memoryview and target.format == "B" and not target.readonly
            and target.c_contiguous and target.ndim == 1):
        return target  # what GuestRam gives: a slice of a block (checked in one step)
    return claim_buffer(lambda _size: target, len(target))


class _Stage(Enum):
    INIT = "channel init"
    HEADER = "packet header"
    DEVICE_BODY = "device-state packet header"
    DEVICE_PREFIX = "device-state payload prefix"
    RAM_BODY = "RAM packet"
    DEVICE_PAYLOAD = "device-state payload"
    RAM_PAYLOAD = "RAM packet payload"


class ChannelDecoder(StreamDecoder[ChannelEvent]):
    """Decode one multifd channel (destination side).

    ``page_size``, ``ram_layout`` and ``ram_packet_bytes`` (guest bytes per RAM
    packet) must match the sender: 4 KiB, :attr:`RamLayout.V2` and 512 KiB for QEMU
    9.0+ on x86; our source sends bigger RAM packets, as both ends' settings of
    ``x-multifd-packet-size`` agree on.  ``block_size`` and ``compression``
    enable the optional checks of :meth:`RamPacket.decode_body`.  ``expect_init=False``
    starts directly with packets.  ``channel`` only labels errors.  After
    :class:`ChannelClosed` or any error every call raises
    :class:`~protocol.errors.SequenceError`.
    """

    def __init__(
        self,
        *,
        page_size: int = 4096,
        ram_packet_bytes: int = MULTIFD_PACKET_SIZE,
        ram_layout: RamLayout = RamLayout.V2,
        max_device_payload: int = DEFAULT_MAX_DEVICE_PAYLOAD,
        allocate: Allocator | None = None,
        expect_init: bool = True,
        block_size: Callable[[str], int | None] | None = None,
        compression: int | None = None,
        channel: str = "",
        ram_target: Callable[[RamPacket], Sequence[memoryview] | None] | None = None,
        device_target: Callable[[DeviceStateHeader, memoryview], memoryview | None]
        | None = None,
        device_prefix: int = 0,
    ) -> None:
        super().__init__(channel=channel)
        self._ram_target = ram_target
        if device_target is not None and (type(device_prefix) is not int
                                          or not 0 < device_prefix <= 4096):
            raise ConfigError(f"device_prefix must be 1..4096 with a device_target, "
                              f"got {device_prefix!r}")
        self._device_target = device_target
        self._device_prefix = device_prefix
        self._device_buf: memoryview | None = None  # the whole payload, when allocated
        self._in_place = False
        self._page_count = ram_page_count(page_size, ram_packet_bytes)
        self._page_size = page_size
        self._layout = RamLayout(ram_layout)
        if type(max_device_payload) is not int or not 1 <= max_device_payload <= 0xFFFFFFFF:
            raise ConfigError(f"max_device_payload must be 1..{0xFFFFFFFF}, got {max_device_payload!r}")
        self._max_device_payload = max_device_payload
        self._allocate: Allocator = allocate if allocate is not None else default_allocate
        self._block_size = block_size
        self._compression = compression
        self._ram_body_size = ram_packet_size(self._page_count) - PACKET_HEADER_SIZE
        self._stage = _Stage.INIT if expect_init else _Stage.HEADER
        self._flags = 0
        self._device: DeviceStateHeader | None = None
        self._ram: RamPacket | None = None
        self._packets = 0
        self._init: ChannelInit | None = None

    @property
    def packets_received(self) -> int:
        """Complete packets (RAM and device state, not the init) decoded so far."""
        return self._packets

    @property
    def ram_header_size(self) -> int:
        """Bytes of a RAM packet before its payload (packet header and offset array)."""
        return PACKET_HEADER_SIZE + self._ram_body_size

    @property
    def init(self) -> ChannelInit | None:
        """The channel init, once received."""
        return self._init

    def _want(self) -> int:
        stage = self._stage
        if stage is _Stage.INIT:
            return INIT_SIZE
        if stage is _Stage.HEADER:
            return PACKET_HEADER_SIZE
        if stage is _Stage.DEVICE_BODY:
            return DEVICE_STATE_BODY_SIZE
        if stage is _Stage.DEVICE_PREFIX:
            return self._device_prefix
        assert stage is _Stage.RAM_BODY, stage
        return self._ram_body_size

    def _step(self, chunk: memoryview, events: list[ChannelEvent]) -> None:
        stage = self._stage
        if stage is _Stage.INIT:
            self._init = ChannelInit.decode(chunk)
            events.append(InitReceived(self._init))
            self._stage = _Stage.HEADER
        elif stage is _Stage.HEADER:
            self._flags = PacketHeader.decode(chunk).flags
            self._stage = (
                _Stage.DEVICE_BODY if self._flags & _DEVICE_STATE else _Stage.RAM_BODY
            )
        elif stage is _Stage.DEVICE_BODY:
            header = DeviceStateHeader.decode_body(
                self._flags, chunk, max_payload=self._max_device_payload
            )
            self._device = header
            if self._device_target is not None and header.payload_size > self._device_prefix:
                # the payload's own header says where its data belongs
                self._stage = _Stage.DEVICE_PREFIX
            else:
                self._stage = _Stage.DEVICE_PAYLOAD
                self._start_sink(claim_buffer(self._allocate, header.payload_size))
        elif stage is _Stage.DEVICE_PREFIX:
            self._device_prefix_received(chunk)
        else:
            packet = RamPacket.decode_body(
                self._flags,
                chunk,
                page_count=self._page_count,
                page_size=self._page_size,
                layout=self._layout,
                block_size=self._block_size,
                compression=self._compression,
            )
            if packet.next_packet_size == 0:
                self._packets += 1
                self._stage = _Stage.HEADER
                events.append(RamPacketReceived(packet, _EMPTY))
            else:
                self._ram = packet
                self._stage = _Stage.RAM_PAYLOAD
                targets = None
                if self._ram_target is not None and not packet.flags & COMPRESSION_MASK:
                    targets = self._ram_target(packet)
                if targets is None:
                    self._start_sink(claim_buffer(self._allocate, packet.next_packet_size))
                else:
                    views = [v for v in map(_target_view, targets) if len(v)]  # no empty sinks
                    if sum(len(v) for v in views) != packet.next_packet_size or not views:
                        raise ConfigError(f"ram_target gave {sum(len(v) for v in views)} bytes "
                                          f"for a {packet.next_packet_size}-byte payload")
                    self._in_place = True
                    self._start_sinks(views)

    def _device_prefix_received(self, prefix: memoryview) -> None:
        header = self._device
        assert header is not None and self._device_target is not None
        rest = header.payload_size - len(prefix)
        self._stage = _Stage.DEVICE_PAYLOAD
        target = self._device_target(header, prefix)
        if target is None:
            whole = claim_buffer(self._allocate, header.payload_size)
            whole[: len(prefix)] = prefix
            self._device_buf = whole
            self._start_sink(whole[len(prefix) :])
            return
        view = _target_view(target)
        if len(view) != rest:
            raise ConfigError(f"device_target gave {len(view)} bytes for the {rest} bytes "
                              "after the payload's prefix")
        self._device_buf = memoryview(bytes(prefix))
        self._start_sink(view)

    def _sink_done(self, sink: memoryview, events: list[ChannelEvent]) -> None:
        if self._stage is _Stage.DEVICE_PAYLOAD:
            assert self._device is not None
            whole = self._device_buf
            if whole is None:
                events.append(DeviceStateReceived(self._device, sink))
            else:
                in_place = len(whole) != self._device.payload_size
                events.append(DeviceStateReceived(self._device, whole, in_place=in_place))
                self._device_buf = None
            self._device = None
        else:
            assert self._ram is not None
            if self._in_place:
                events.append(RamPacketReceived(self._ram, _EMPTY, in_place=True))
            else:
                events.append(RamPacketReceived(self._ram, sink))
            self._ram = None
            self._in_place = False
        self._packets += 1
        self._stage = _Stage.HEADER

    def _at_boundary(self) -> bool:
        return self._stage is _Stage.HEADER

    def _truncation(self, buffered: int, sink_filled: int) -> tuple[str, int, int]:
        stage = self._stage
        if stage is _Stage.DEVICE_BODY:
            return stage.value, PACKET_HEADER_SIZE + buffered, DEVICE_STATE_HEADER_SIZE
        if stage is _Stage.RAM_BODY:
            return stage.value, PACKET_HEADER_SIZE + buffered, PACKET_HEADER_SIZE + self._ram_body_size
        if stage is _Stage.DEVICE_PREFIX:
            assert self._device is not None
            return _Stage.DEVICE_PAYLOAD.value, buffered, self._device.payload_size
        if stage is _Stage.DEVICE_PAYLOAD:
            assert self._device is not None
            if self._device_buf is not None:  # the prefix came first
                sink_filled += self._device_prefix
            return stage.value, sink_filled, self._device.payload_size
        if stage is _Stage.RAM_PAYLOAD:
            assert self._ram is not None
            total = self._ram.next_packet_size
            if self._in_place:
                return stage.value, total - self._body_left(), total
            return stage.value, sink_filled, total
        return stage.value, buffered, self._want()

    def _closed_event(self) -> ChannelEvent:
        return ChannelClosed()
