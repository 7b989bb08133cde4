"""The receive-buffer machinery shared by the sans-I/O stream decoders.

:class:`StreamDecoder` owns the mechanics of turning ``recv_into``-sized pieces of a
byte stream into parse steps, so that :class:`protocol.channel.ChannelDecoder` and
:class:`protocol.control.ControlDecoder` only describe *what* to parse:

* small structures (init messages, headers, control messages) are gathered in one
  fixed internal buffer, so that several of them can arrive in a single ``recv``;
* a large body (a page payload, device state) is received *in place* into a buffer
  the subclass provides (a "sink"): bytes that already sit in the internal buffer are
  copied over once, and from then on :meth:`StreamDecoder.buffer` hands out the rest
  of the sink itself, so the bulk of the data is written by the kernel exactly where
  it will be used;
* a body may also go to several sinks in a row (the scattered pages of one RAM
  packet, each run of pages at its own place in guest memory):
  :meth:`StreamDecoder.buffers` then hands out all that is left of them at once, so a
  receiver fills them with one scatter receive (``recvmsg_into``) instead of one
  receive, and one trip through the decoder, per run.

The internal buffer is allocated once and never grows; sinks are sized by the subclass
from lengths it has already validated.  Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from protocol.errors import ChannelError, ConfigError, SequenceError

__all__ = ["StreamDecoder", "INTERNAL_BUFFER_SIZE", "Allocator", "default_allocate", "claim_buffer"]

#: Size of the internal receive buffer of every stream decoder.
INTERNAL_BUFFER_SIZE = 64 * 1024

#: Provides the buffer a large body is received into; it must be writable and at
#: least the requested size (longer buffers are cut to size).
Allocator = Callable[[int], bytearray | memoryview]

E = TypeVar("E")

_OPEN, _CLOSED, _FAILED = "open", "closed", "failed"


def default_allocate(size: int) -> bytearray:
    return bytearray(size)


def claim_buffer(allocate: Allocator, size: int) -> memoryview:
    """Get a writable byte view of exactly ``size`` bytes from a caller's allocator."""
    buf = allocate(size)
    try:
        view = memoryview(buf)
    except TypeError:
        raise ConfigError(f"allocate({size}) returned {type(buf).__name__}, not a buffer") from None
    if view.readonly:
        raise ConfigError(f"allocate({size}) returned a read-only buffer")
    if not view.c_contiguous or view.ndim != 1 or view.itemsize != 1:
        raise ConfigError(f"allocate({size}) returned a buffer that is not flat bytes")
    if view.format != "B":
        view = view.cast("B")
    if view.nbytes < size:
        raise ConfigError(f"allocate({size}) returned only {view.nbytes} bytes")
    return view[:size]


class StreamDecoder(Generic[E]):
    """Base of the sans-I/O decoders: ``buffer()`` / ``advance(n)`` / ``eof()``.

    Subclasses implement :meth:`_want`, :meth:`_step`, :meth:`_sink_done`,
    :meth:`_at_boundary`, :meth:`_truncation` and :meth:`_closed_event`, and call
    :meth:`_start_sink` from :meth:`_step` to receive a body in place.
    """

    def __init__(self, *, channel: str = "", buffer_size: int = INTERNAL_BUFFER_SIZE) -> None:
        self._channel = channel
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte in the internal buffer
        self._end = 0  # end of the received bytes in the internal buffer
        self._sink: memoryview | None = None
        self._sink_filled = 0
        # the sinks after the current one, for a body spread over several
        self._chain: list[memoryview] = []
        self._chain_at = 0
        self._chain_left = 0  # bytes in self._chain[self._chain_at:]
        self._state = _OPEN
        self._failure = ""
        self._bytes_received = 0

    # -- subclass hooks --------------------------------------------------------

    def _want(self) -> int:
        """Bytes the next parse step needs from the internal buffer (≤ its size)."""
        raise NotImplementedError

    def _step(self, chunk: memoryview, events: list[E]) -> None:
        """Parse exactly ``_want()`` bytes; may call :meth:`_start_sink`."""
        raise NotImplementedError

    def _sink_done(self, sink: memoryview, events: list[E]) -> None:
        """The body announced by the last :meth:`_start_sink` is complete."""
        raise NotImplementedError

    def _at_boundary(self) -> bool:
        """Whether the stream may end cleanly here (internal buffer is empty)."""
        raise NotImplementedError

    def _truncation(self, buffered: int, sink_filled: int) -> tuple[str, int, int]:
        """What was cut short by EOF: (description, bytes got, bytes needed)."""
        raise NotImplementedError

    def _closed_event(self) -> E:
        raise NotImplementedError

    # -- helpers for subclasses --------------------------------------------------

    def _start_sink(self, view: memoryview) -> None:
        """Receive the next ``len(view)`` (> 0) bytes of the stream into ``view``."""
        self._sink = view
        self._sink_filled = 0

    def _start_sinks(self, views: list[memoryview]) -> None:
        """Receive one body into ``views`` (non-empty, none of them empty), filled in
        order; :meth:`_sink_done` follows once, when the last one is full."""
        self._sink = views[0]
        self._sink_filled = 0
        if len(views) > 1:
            self._chain = views
            self._chain_at = 1
            self._chain_left = sum(map(len, views)) - len(views[0])

    def _body_left(self) -> int:
        """Bytes of the body being received that are still missing (0 between bodies)."""
        sink = self._sink
        return len(sink) - self._sink_filled + self._chain_left if sink is not None else 0

    # -- public API ----------------------------------------------------------------

    @property
    def receiving_body(self) -> bool:
        """Whether :meth:`buffer` is the rest of a body: every byte of it is wanted, so
        a blocking receiver may wait for all of it (``MSG_WAITALL``)."""
        return self._sink is not None

    @property
    def bytes_received(self) -> int:
        """Bytes passed to :meth:`advance` so far."""
        return self._bytes_received

    def buffer(self) -> memoryview:
        """Writable view where the next received bytes must be put; never empty."""
        self._check_open()
        if self._sink is not None:
            return self._sink[self._sink_filled :]
        return self._view[self._end :]

    def buffers(self) -> list[memoryview]:
        """Like :meth:`buffer`, but while a body spread over several sinks is being
        received, every sink that is left of it, in stream order: a receiver may fill
        them with one scatter receive and pass the total to :meth:`advance`."""
        first = self.buffer()
        if self._sink is None or self._chain_at >= len(self._chain):
            return [first]
        return [first, *self._chain[self._chain_at :]]

    def advance(self, nbytes: int) -> list[E]:
        """``nbytes`` were written at the start of the last :meth:`buffer` (or, in
        order, into the views of the last :meth:`buffers`)."""
        self._check_open()
        room = self._body_left() if self._sink is not None else len(self._buf) - self._end
        if type(nbytes) is not int or not 0 <= nbytes <= room:
            raise ConfigError(f"advance({nbytes!r}): must be 0..{room}, the size of buffers()")
        self._bytes_received += nbytes
        events: list[E] = []
        try:
            if self._sink is not None:
                self._fill_sinks(nbytes, events)
            else:
                self._end += nbytes
            self._parse(events)
        except BaseException as exc:
            self._state = _FAILED
            self._failure = str(exc) or type(exc).__name__
            raise
        return events

    def feed(self, data: bytes | bytearray | memoryview) -> list[E]:
        """Convenience for callers that already hold bytes: copy them in and advance."""
        source = memoryview(data).cast("B")
        events: list[E] = []
        pos = 0
        while pos < len(source):
            target = self.buffer()
            take = min(len(target), len(source) - pos)
            target[:take] = source[pos : pos + take]
            pos += take
            events.extend(self.advance(take))
        return events

    def eof(self) -> list[E]:
        """The peer closed the stream: a clean end only at a boundary."""
        self._check_open()
        buffered = self._end - self._start
        if self._sink is None and buffered == 0 and self._at_boundary():
            self._state = _CLOSED
            return [self._closed_event()]
        what, got, need = self._truncation(buffered, self._sink_filled)
        message = f"truncated {what}: got {got} of {need} bytes"
        self._state = _FAILED
        self._failure = message
        raise ChannelError(message, channel=self._channel)

    # -- internals -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state == _CLOSED:
            raise SequenceError("stream decoder used after the stream was closed")
        if self._state == _FAILED:
            raise SequenceError(f"stream decoder used after an error ({self._failure})")

    def _fill_sinks(self, nbytes: int, events: list[E]) -> None:
        """``nbytes`` (at most :meth:`_body_left`) more bytes of the body arrived."""
        sink = self._sink
        assert sink is not None
        filled = self._sink_filled + nbytes
        chain = self._chain
        if chain and nbytes == len(sink) - self._sink_filled + self._chain_left:
            self._finish_sink(events)  # the rest of the body came in one receive
            return
        while filled >= len(sink):
            if self._chain_at >= len(chain):
                self._finish_sink(events)
                return
            filled -= len(sink)
            sink = chain[self._chain_at]
            self._chain_at += 1
            self._chain_left -= len(sink)
        self._sink = sink
        self._sink_filled = filled

    def _finish_sink(self, events: list[E]) -> None:
        sink = self._sink
        assert sink is not None
        self._sink = None
        self._sink_filled = 0
        if self._chain:
            self._chain = []
            self._chain_at = self._chain_left = 0
        self._sink_done(sink, events)

    def _parse(self, events: list[E]) -> None:
        view = self._view
        while True:
            available = self._end - self._start
            if self._sink is not None:
                if not available:
                    break
                take = min(available, len(self._sink) - self._sink_filled)
                self._sink[self._sink_filled : self._sink_filled + take] = view[
                    self._start : self._start + take
                ]
                self._start += take
                self._fill_sinks(take, events)
                continue
            want = self._want()
            if available < want:
                break
            chunk = view[self._start : self._start + want]
            self._start += want
            self._step(chunk, events)
        # Keep the free tail of the internal buffer large: what is left is a partial
        # structure shorter than one step, so moving it to the front is cheap.
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start:
            remaining = self._end - self._start
            self._buf[:remaining] = self._buf[self._start : self._end]
            self._start, self._end = 0, remaining
