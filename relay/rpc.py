"""The framed, multiplexed request/response protocol spoken over the tunnel.

Used by the key oracle (and, later, the spool service), between the oracle's
front process and its signing processes too. The wire format is in
docs/rpc.md. In short, every frame is

    version u8 | kind u8 | reserved u16 | id u32 | length u32 | body

and the body is `meta length u32 | meta (a JSON object) | tail (raw bytes)`.
Requests carry {"method": ..., params}; responses echo the request's id, in
any order; errors carry {"code": ..., "message": ...}. Bulk bytes (handshake
messages, sealed files) travel in the tail, not in JSON.

`RpcConnection` runs one connection either way: it sends requests and awaits
their responses by id, and hands incoming requests to a handler, several at
once. Frames queued in one event-loop turn go out in one write.

Writes have backpressure, so a peer that never reads cannot make this side
buffer without bound: once more than `write_high_water` bytes wait to be sent
(asyncio's pause_writing, or answers queued in this turn), the connection
stops reading from the peer and holds the requests it read but has not
started, answers wait, and so do `call()`s, until the buffer drains below a
quarter of the mark (resume_writing). What waits to be sent is then at most
the mark plus the one answer that crossed it. Answers to our own calls are
taken even then: they cost no output. A connection whose buffer still passes
`max_write_buffer` after a write (something wrote past the drain wait:
`call_nowait()` bursts, or one answer bigger than the cap) is closed with a
log line. Both sides stop reading only if both send bulk to a peer that is
not reading: none of our protocols does (requests or answers are small on
one side).
"""

import asyncio
import json
import logging
import struct
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum

log = logging.getLogger("yestls.rpc")

VERSION = 1
HEADER = struct.Struct("!BBHII")
META_LENGTH = struct.Struct("!I")
DEFAULT_MAX_FRAME = 1 << 20
WRITE_HIGH_WATER = 256 * 1024         # bytes waiting to be sent above which we stop reading and producing
MIN_MAX_WRITE_BUFFER = 8 * 1024 * 1024  # the hard cap is this or 4 frames, whichever is more
LOG_TEXT = 120                        # characters of peer input a log line may quote


class Kind(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    ERROR = 3


class Code:
    """Error codes every service shares; services add their own ("policy.*", ...)."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_METHOD = "unknown_method"
    NOT_AUTHENTICATED = "not_authenticated"
    NOT_PERMITTED = "not_permitted"   # authenticated, but the peer's `methods` does not list the method
    BUSY = "busy"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


@dataclass(frozen=True)
class Frame:
    kind: Kind
    id: int
    meta: dict
    tail: bytes = b""


class FrameError(Exception):
    """The peer broke the framing: the connection cannot continue."""


@dataclass
class RemoteError(Exception):
    """An error reply, raised by a handler to send it or by `call` on receiving it.

    A handler sets `close_connection` to close the connection once the error is sent.
    """

    code: str
    message: str = ""
    extra: dict = field(default_factory=dict)
    close_connection: bool = False

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


def encode_frame(kind: Kind, frame_id: int, meta: dict, tail: bytes = b"") -> bytes:
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    length = META_LENGTH.size + len(meta_bytes) + len(tail)
    return b"".join((HEADER.pack(VERSION, kind, 0, frame_id, length), META_LENGTH.pack(len(meta_bytes)),
                     meta_bytes, tail))


class FrameDecoder:
    """Cuts a byte stream into frames; refuses oversized or malformed ones before buffering them."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames = []
        buf = self._buffer
        pos = 0
        while len(buf) - pos >= HEADER.size:
            version, kind, _, frame_id, length = HEADER.unpack_from(buf, pos)
            if version != VERSION:
                raise FrameError(f"frame version {version}, this side speaks {VERSION}")
            if kind not in (Kind.REQUEST, Kind.RESPONSE, Kind.ERROR):
                raise FrameError(f"unknown frame kind {kind}")
            if length > self.max_frame:
                raise FrameError(f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            frames.append(_decode_body(Kind(kind), frame_id, bytes(buf[pos + HEADER.size:end])))
            pos = end
        del buf[:pos]
        return frames


def _decode_body(kind: Kind, frame_id: int, body: bytes) -> Frame:
    if len(body) < META_LENGTH.size:
        raise FrameError("frame body shorter than its meta length")
    (meta_length,) = META_LENGTH.unpack_from(body)
    end = META_LENGTH.size + meta_length
    if end > len(body):
        raise FrameError("frame meta runs past the frame")
    try:
        meta = json.loads(body[META_LENGTH.size:end])
    except (ValueError, RecursionError) as error:
        raise FrameError(f"frame meta is not JSON: {error}") from None
    if not isinstance(meta, dict):
        raise FrameError("frame meta is not a JSON object")
    return Frame(kind, frame_id, meta, body[end:])


Handler = Callable[["RpcConnection", Frame], Awaitable[tuple[dict, bytes]]]


class RpcConnection(asyncio.Protocol):
    """One framed connection: outgoing calls by id, incoming requests to `handler`.

    `handler(connection, frame)` returns (meta, tail) for the response or
    raises RemoteError for an error reply. At most `max_in_flight` incoming
    requests are handled at once; more get `busy`. A framing error closes the
    connection: after it nothing the peer sends can be trusted to line up;
    `on_frame_error` reports it (else it is logged here).
    """

    def __init__(self, handler: Handler | None = None, *, max_frame: int = DEFAULT_MAX_FRAME,
                 max_in_flight: int = 256, on_made: Callable[["RpcConnection"], None] | None = None,
                 on_lost: Callable[["RpcConnection"], None] | None = None,
                 on_frame_error: Callable[["RpcConnection", FrameError], None] | None = None,
                 write_high_water: int = WRITE_HIGH_WATER, max_write_buffer: int | None = None):
        self.handler = handler
        self.max_in_flight = max_in_flight
        self.on_made = on_made
        self.on_lost = on_lost
        self.on_frame_error = on_frame_error
        self.write_high_water = write_high_water
        self.max_write_buffer = max_write_buffer or max(MIN_MAX_WRITE_BUFFER, 4 * max_frame)
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.state: dict = {}  # per-connection facts for the handler (peer, authenticated, ...)
        self._decoder = FrameDecoder(max_frame)
        self._calls: dict[int, asyncio.Future] = {}
        self._next_id = 1
        self._tasks: set[asyncio.Task] = set()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._requests: deque[Frame] = deque()  # read but not started: held while answers must wait
        self._writing_paused = False         # the transport said pause_writing and not yet resume_writing
        self._writable = asyncio.Event()     # clear while answers and calls must wait for the drain
        self._writable.set()

    # --- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=self.write_high_water, low=self.write_high_water // 4)
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FrameError as error:
            if self.on_frame_error is not None:
                self.on_frame_error(self, error)
            else:
                log.info("%s: closing: %s", self.peer_text(), _quote(str(error)))
            self.close()
            return
        for frame in frames:
            if frame.kind == Kind.REQUEST:
                self._requests.append(frame)
            else:
                self._finish_call(frame)  # an answer costs no output: never held
        self._take_requests()

    def _take_requests(self) -> None:
        """Start the requests read so far while answers may be written; hold the rest, and stop reading meanwhile."""
        while self._requests and self._writable.is_set():
            self._start_request(self._requests.popleft())
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._requests or self._writing_paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        for future in list(self._calls.values()):
            if not future.done():
                future.set_exception(ConnectionError("connection lost"))
        self._calls.clear()
        for task in self._tasks:
            task.cancel()
        self._writable.set()  # waiting calls go on to find the connection closed
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        """The transport's buffer passed the high-water mark: stop reading, hold requests, answers and calls."""
        self._writing_paused = True
        self._writable.clear()
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._writable.set()
        self._take_requests()

    # --- outgoing calls ---------------------------------------------------

    def call_nowait(self, method: str, params: dict | None = None, tail: bytes = b"") -> asyncio.Future:
        """Send a request now, drained or not; the future resolves to the response Frame or raises RemoteError."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("connection is closed")
        frame_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        future = asyncio.get_running_loop().create_future()
        self._calls[frame_id] = future
        future.add_done_callback(lambda done: self._forget_call(frame_id, done))
        self._send(encode_frame(Kind.REQUEST, frame_id, {"method": method, **(params or {})}, tail))
        return future

    async def call(self, method: str, params: dict | None = None, tail: bytes = b"",
                   timeout: float | None = None) -> Frame:
        """Send a request once the connection has drained, and await its answer; `timeout` covers both."""
        if timeout is None:  # the signing processes' calls: no timer to set up
            return await self._call(method, params, tail)
        async with asyncio.timeout(timeout):
            return await self._call(method, params, tail)

    async def _call(self, method: str, params: dict | None, tail: bytes) -> Frame:
        if not self._writable.is_set():
            await self._drained()
        future = self.call_nowait(method, params, tail)
        try:
            return await future
        finally:
            if not future.done():
                future.cancel()

    def _forget_call(self, frame_id: int, future: asyncio.Future) -> None:
        if future.cancelled() and self._calls.get(frame_id) is future:
            del self._calls[frame_id]  # given up on: its answer, if any, is ignored

    def _finish_call(self, frame: Frame) -> None:
        future = self._calls.pop(frame.id, None)
        if future is None or future.done():
            return  # a reply to a call we gave up on
        if frame.kind == Kind.ERROR:
            meta = dict(frame.meta)
            future.set_exception(RemoteError(str(meta.pop("code", Code.INTERNAL)), str(meta.pop("message", "")), meta))
        else:
            future.set_result(frame)

    # --- incoming requests --------------------------------------------------

    def _start_request(self, frame: Frame) -> None:
        if self.handler is None:
            self._send_error(frame.id, RemoteError(Code.UNKNOWN_METHOD, "this side serves no requests"))
        elif len(self._tasks) >= self.max_in_flight:
            self._send_error(frame.id, RemoteError(Code.BUSY, f"more than {self.max_in_flight} requests in flight"))
        else:
            task = asyncio.get_running_loop().create_task(self._serve(frame))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, frame: Frame) -> None:
        try:
            meta, tail = await self.handler(self, frame)
        except RemoteError as error:
            if not self._writable.is_set():
                await self._drained()
            self._send_error(frame.id, error)
            if error.close_connection:
                self.close()
        except asyncio.CancelledError:
            raise
        except Exception as bug:  # noqa: BLE001 - a handler bug answers `internal`, the service lives on
            # The frames of our code in full; the exception's text, which may quote the peer, cut.
            log.error("%s: handler failed on %s: %s\n%s", self.peer_text(), _quote(repr(frame.meta.get("method"))),
                      _quote(f"{type(bug).__name__}: {bug}"), "".join(traceback.format_tb(bug.__traceback__)))
            if not self._writable.is_set():
                await self._drained()
            self._send_error(frame.id, RemoteError(Code.INTERNAL, "internal error"))
        else:
            if not self._writable.is_set():
                await self._drained()
            self._send(encode_frame(Kind.RESPONSE, frame.id, meta, tail))

    def _send_error(self, frame_id: int, error: RemoteError) -> None:
        self._send(encode_frame(Kind.ERROR, frame_id, {"code": error.code, "message": error.message, **error.extra}))

    # --- output -------------------------------------------------------------

    async def _drained(self) -> None:
        while not self._writable.is_set():
            await self._writable.wait()

    def _send(self, data: bytes) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)
        self._out_bytes += len(data)
        if self.transport is not None and \
                self._out_bytes + self.transport.get_write_buffer_size() > self.write_high_water:
            self._writable.clear()  # the rest of this turn's answers wait: this flush will pass the mark

    def _flush(self) -> None:
        out, self._out, self._out_bytes = self._out, [], 0
        transport = self.transport
        if not out or transport is None or transport.is_closing():
            return
        transport.write(b"".join(out))  # may call pause_writing
        waiting = transport.get_write_buffer_size()
        if waiting > self.max_write_buffer:
            log.warning("%s: closing: %d bytes wait to be sent, over the %d-byte cap (the peer does not read)",
                        self.peer_text(), waiting, self.max_write_buffer)
            transport.abort()
        elif not self._writing_paused:
            self._writable.set()
            if self._requests:
                self._take_requests()

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()

    def peer_text(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "peer"

    @property
    def in_flight(self) -> int:
        """Incoming requests being handled."""
        return len(self._tasks)

    @property
    def pending_calls(self) -> int:
        """Outgoing calls awaiting their answer."""
        return len(self._calls)


def _quote(text: str) -> str:
    """Peer input as a log line may quote it: cut to LOG_TEXT characters."""
    return text if len(text) <= LOG_TEXT else f"{text[:LOG_TEXT]}...(+{len(text) - LOG_TEXT} chars)"


async def connect(host: str, port: int, handler: Handler | None = None, **options) -> RpcConnection:
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(lambda: RpcConnection(handler, **options), host, port)
    return connection
