"""The tunnel RPC protocol (relay/rpc.py): frames, the size cap, and one connection either way.

Frames round-trip through `encode_frame` and `FrameDecoder` whatever way the
stream is cut; a frame over the cap is refused from its header alone; a
broken frame (version, kind, meta) closes the connection. Two
`RpcConnection`s over real loopback carry many calls at once, answered out of
order and matched by id; a side past `max_in_flight` answers `busy`; a
handler's bug answers `internal` and the connection lives on; calls fail with
ConnectionError when the connection drops. A peer that never reads cannot make
a side buffer without bound: it stops reading that peer, holds answers and
calls until the drain, and closes past the hard cap; others are served
meanwhile. Every wait is bounded.
"""

import asyncio
import logging
import socket
import struct

import pytest

from relay import rpc
from relay.rpc import HEADER, META_LENGTH, VERSION, Code, Frame, FrameDecoder, FrameError, Kind, RemoteError

from .hostile_peers import close_all, closed_by_peer, open_sockets, request, send_until_stalled

TIMEOUT = 10.0


def run(coro):
    """Run a test coroutine; a stuck one fails instead of hanging the suite."""
    async def bounded():
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


def raw_frame(body: bytes, *, version: int = VERSION, kind: int = Kind.REQUEST, frame_id: int = 1,
              length: int | None = None) -> bytes:
    return HEADER.pack(version, kind, 0, frame_id, len(body) if length is None else length) + body


def body(meta_bytes: bytes, tail: bytes = b"") -> bytes:
    return META_LENGTH.pack(len(meta_bytes)) + meta_bytes + tail


# --- frames ------------------------------------------------------------------------------------------

FRAMES = [
    Frame(Kind.REQUEST, 1, {"method": "sign", "key_id": "ab" * 16, "scheme": 0x0403}, bytes(range(256)) * 3),
    Frame(Kind.RESPONSE, 0xFFFFFFFF, {}, b"\x30\x45" + b"\x00" * 69),
    Frame(Kind.ERROR, 7, {"code": "policy.sni_mismatch", "message": "server_name 'é' is not ours"}),
    Frame(Kind.REQUEST, 2, {"method": "ping", "nested": {"list": [1, 2.5, None, True, "x"]}}),
    Frame(Kind.RESPONSE, 3, {"tail is": "empty"}, b""),
]


def encoded(frames) -> bytes:
    return b"".join(rpc.encode_frame(f.kind, f.id, f.meta, f.tail) for f in frames)


def test_frames_round_trip_in_one_chunk():
    assert FrameDecoder().feed(encoded(FRAMES)) == FRAMES


def test_frames_round_trip_fed_byte_by_byte():
    decoder = FrameDecoder()
    frames = []
    for i, byte in enumerate(encoded(FRAMES)):
        frames += decoder.feed(bytes([byte]))
        assert len(frames) <= len(FRAMES), i
    assert frames == FRAMES
    assert decoder.feed(b"") == []


@pytest.mark.parametrize("cut", [1, 11, 12, 13, 16, 100, 1000])
def test_frames_round_trip_cut_anywhere(cut):
    data = encoded(FRAMES)
    decoder = FrameDecoder()
    frames = []
    for start in range(0, len(data), cut):
        frames += decoder.feed(data[start:start + cut])
    assert frames == FRAMES


def test_header_layout_is_the_documented_one():
    data = rpc.encode_frame(Kind.ERROR, 0x01020304, {"code": "busy"}, b"TAIL")
    meta = b'{"code":"busy"}'
    assert data == (bytes([1, 3, 0, 0, 1, 2, 3, 4]) + struct.pack("!I", 4 + len(meta) + 4)
                    + struct.pack("!I", len(meta)) + meta + b"TAIL")


def test_tail_bytes_are_kept_exactly_including_json_lookalikes():
    tail = b'{"method": "decrypt"}\x00\xff' + b"\x00" * 1000
    [frame] = FrameDecoder().feed(rpc.encode_frame(Kind.REQUEST, 9, {"method": "sign"}, tail))
    assert frame.meta == {"method": "sign"} and frame.tail == tail


def test_frame_at_the_cap_is_accepted():
    meta = b"{}"
    tail = b"x" * (100 - META_LENGTH.size - len(meta))
    [frame] = FrameDecoder(max_frame=100).feed(raw_frame(body(meta, tail)))
    assert frame.tail == tail


def test_oversized_length_is_refused_from_the_header_alone():
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(FrameError, match="exceeds"):
        decoder.feed(HEADER.pack(VERSION, Kind.REQUEST, 0, 1, 101))  # no body sent at all


def test_huge_length_is_refused_before_any_body_is_buffered():
    decoder = FrameDecoder(max_frame=1 << 20)
    with pytest.raises(FrameError):
        decoder.feed(HEADER.pack(VERSION, Kind.REQUEST, 0, 1, 0xFFFFFFFF) + b"x" * 10)


BROKEN_FRAMES = {
    "version 0": raw_frame(body(b"{}"), version=0),
    "version 2": raw_frame(body(b"{}"), version=2),
    "kind 0": raw_frame(body(b"{}"), kind=0),
    "kind 4": raw_frame(body(b"{}"), kind=4),
    "meta not JSON": raw_frame(body(b"{method: ping}")),
    "meta not UTF-8": raw_frame(body(b'{"\xff": 1}')),
    "meta a list": raw_frame(body(b'["ping"]')),
    "meta a string": raw_frame(body(b'"ping"')),
    "meta null": raw_frame(body(b"null")),
    "meta deeply nested": raw_frame(body(b"[" * 100_000 + b"]" * 100_000)),
    "body shorter than the meta length field": raw_frame(b"\x00\x00"),
    "meta length past the frame": raw_frame(META_LENGTH.pack(50) + b"{}"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_FRAMES))
def test_broken_frame_is_a_frame_error(name):
    data = BROKEN_FRAMES[name]
    with pytest.raises(FrameError):
        FrameDecoder(max_frame=1 << 20).feed(data)


def test_header_error_is_raised_even_after_good_frames_in_the_same_chunk():
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed(encoded(FRAMES[:2]) + BROKEN_FRAMES["version 2"])


# --- two connections over loopback -------------------------------------------------------------------

class Pair:
    """A server RpcConnection (its handler given per test) and a client RpcConnection, on 127.0.0.1."""

    def __init__(self):
        self.server_connections: list[rpc.RpcConnection] = []
        self.server = None
        self.port = None

    async def start(self, handler, **options) -> "Pair":
        loop = asyncio.get_running_loop()

        def make():
            connection = rpc.RpcConnection(handler, **options)
            self.server_connections.append(connection)
            return connection

        self.server = await loop.create_server(make, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def client(self, handler=None, **options) -> rpc.RpcConnection:
        return await rpc.connect("127.0.0.1", self.port, handler, **options)

    async def raw(self):
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def server_side(self, index: int = 0) -> rpc.RpcConnection:
        """The server's end of the index-th connection, once the server has accepted it."""
        for _ in range(500):
            if len(self.server_connections) > index:
                return self.server_connections[index]
            await asyncio.sleep(0.01)
        raise AssertionError("the server never accepted the connection")

    async def close(self):
        for connection in self.server_connections:
            connection.close()
        self.server.close()
        await self.server.wait_closed()


async def echo(connection, frame):
    return {"echo": frame.meta}, frame.tail[::-1]


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the peer sends until it closes (EOF or reset); a peer that never closes fails the test."""
    data = b""
    for _ in range(1000):
        try:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError("the peer kept sending")


def test_request_response_and_error_round_trip_over_loopback():
    async def handler(connection, frame):
        if frame.meta["method"] == "fail":
            raise RemoteError("policy.sni_mismatch", "not our name", {"hint": "list certificates"})
        return await echo(connection, frame)

    async def main():
        pair = await Pair().start(handler)
        client = await pair.client()
        try:
            reply = await client.call("echo", {"n": 1, "s": "ü"}, b"abc\x00", timeout=5)
            assert reply.kind == Kind.RESPONSE
            assert reply.meta == {"echo": {"method": "echo", "n": 1, "s": "ü"}} and reply.tail == b"\x00cba"
            with pytest.raises(RemoteError) as refused:
                await client.call("fail", timeout=5)
            assert refused.value.code == "policy.sni_mismatch"
            assert refused.value.message == "not our name"
            assert refused.value.extra == {"hint": "list certificates"}
            big = bytes(range(256)) * 2000
            assert (await client.call("echo", tail=big, timeout=5)).tail == big[::-1]
        finally:
            client.close()
            await pair.close()

    run(main())


def test_many_calls_in_flight_on_one_connection_are_answered_out_of_order_by_id():
    count = 64
    arrived: list[int] = []
    gates: dict[int, asyncio.Event] = {}

    async def main():
        everyone = asyncio.Event()

        async def handler(connection, frame):
            n = frame.meta["n"]
            gates[n] = asyncio.Event()
            arrived.append(n)
            if len(arrived) == count:
                everyone.set()
            await gates[n].wait()
            return {"n": n, "square": n * n}, str(n).encode()

        pair = await Pair().start(handler)
        client = await pair.client()
        try:
            futures = [client.call_nowait("work", {"n": n}) for n in range(count)]
            assert client.pending_calls == count
            await everyone.wait()  # all 64 are in the server's handler at once
            assert (await pair.server_side()).in_flight == count
            finished = []
            for n in reversed(range(count)):  # answer last-asked first
                gates[n].set()
                reply = await futures[n]
                finished.append(n)
                assert all(not futures[m].done() for m in range(n)), "answered before its gate opened"
                assert reply.meta == {"n": n, "square": n * n} and reply.tail == str(n).encode()
            assert finished == list(reversed(range(count)))
            assert client.pending_calls == 0
        finally:
            client.close()
            await pair.close()

    run(main())


def test_both_sides_call_each_other_on_one_connection():
    async def main():
        pair = await Pair().start(echo)
        client = await pair.client(echo)
        try:
            server_side = await pair.server_side()
            from_client, from_server = await asyncio.gather(client.call("a", tail=b"12", timeout=5),
                                                            server_side.call("b", tail=b"34", timeout=5))
            assert from_client.meta["echo"]["method"] == "a" and from_client.tail == b"21"
            assert from_server.meta["echo"]["method"] == "b" and from_server.tail == b"43"
        finally:
            client.close()
            await pair.close()

    run(main())


def test_side_without_a_handler_answers_unknown_method():
    async def main():
        pair = await Pair().start(None)
        client = await pair.client()
        try:
            with pytest.raises(RemoteError) as refused:
                await client.call("anything", timeout=5)
            assert refused.value.code == Code.UNKNOWN_METHOD
        finally:
            client.close()
            await pair.close()

    run(main())


def test_requests_past_max_in_flight_are_busy_and_the_rest_proceed():
    async def main():
        gate = asyncio.Event()
        started = []

        async def handler(connection, frame):
            started.append(frame.meta["n"])
            await gate.wait()
            return {"n": frame.meta["n"]}, b""

        pair = await Pair().start(handler, max_in_flight=3)
        client = await pair.client()
        try:
            futures = [client.call_nowait("wait", {"n": n}) for n in range(5)]
            for n in (3, 4):
                with pytest.raises(RemoteError) as refused:
                    await futures[n]
                assert refused.value.code == Code.BUSY
            assert sorted(started) == [0, 1, 2]
            assert not any(f.done() for f in futures[:3])
            gate.set()
            assert [(await f).meta["n"] for f in futures[:3]] == [0, 1, 2]
            # The slots are free again.
            assert (await client.call("wait", {"n": 9}, timeout=5)).meta == {"n": 9}
        finally:
            client.close()
            await pair.close()

    run(main())


def test_handler_exception_answers_internal_and_the_connection_lives_on():
    async def handler(connection, frame):
        if frame.meta["method"] == "crash":
            raise ValueError("a bug in the handler")
        return await echo(connection, frame)

    async def main():
        pair = await Pair().start(handler)
        client = await pair.client()
        try:
            for _ in range(3):
                with pytest.raises(RemoteError) as failed:
                    await client.call("crash", timeout=5)
                assert failed.value.code == Code.INTERNAL
                assert "a bug" not in failed.value.message  # the peer learns nothing of the bug
                assert (await client.call("echo", tail=b"ok", timeout=5)).tail == b"ko"
            assert not client.closed.done()
        finally:
            client.close()
            await pair.close()

    run(main())


def test_a_handler_bug_is_logged_with_its_traceback_and_the_peers_text_cut(caplog):
    """A bug whose exception quotes 500 KB the peer sent: the log line keeps the frames and the type, not the KB."""
    async def handler(connection, frame):
        raise KeyError(frame.meta["key"])

    async def main():
        pair = await Pair().start(handler)
        client = await pair.client()
        try:
            with pytest.raises(RemoteError):
                await client.call("m" * 100_000, {"key": "k" * 500_000}, timeout=5)
        finally:
            client.close()
            await pair.close()

    with caplog.at_level(logging.ERROR, logger="yestls.rpc"):
        run(main())
    [message] = [r.getMessage() for r in caplog.records if "handler failed" in r.getMessage()]
    assert len(message) < 4096
    assert "KeyError: 'kkk" in message and "raise KeyError(frame.meta" in message  # the type, and our frame
    assert "chars)" in message


def test_calls_fail_with_connection_error_when_the_connection_drops():
    async def main():
        never = asyncio.Event()

        async def handler(connection, frame):
            await never.wait()
            return {}, b""

        pair = await Pair().start(handler)
        client = await pair.client()
        try:
            futures = [client.call_nowait("hang") for _ in range(5)]
            server_side = await pair.server_side()
            for _ in range(500):
                if server_side.in_flight == 5:
                    break
                await asyncio.sleep(0.01)
            assert server_side.in_flight == 5
            server_side.close()
            for future in futures:
                with pytest.raises(ConnectionError):
                    await future
            await client.closed
            assert client.pending_calls == 0
            with pytest.raises(ConnectionError):
                client.call_nowait("after")
            with pytest.raises(ConnectionError):
                await client.call("after", timeout=5)
            # The server side cancelled its handlers when the connection went.
            assert server_side.in_flight == 0
        finally:
            client.close()
            await pair.close()

    run(main())


def test_server_side_handlers_are_cancelled_when_the_client_goes():
    async def main():
        cancelled = asyncio.Event()

        async def handler(connection, frame):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return {}, b""

        pair = await Pair().start(handler)
        client = await pair.client()
        try:
            client.call_nowait("hang")
            server_side = await pair.server_side()
            for _ in range(500):
                if server_side.in_flight == 1:
                    break
                await asyncio.sleep(0.01)
            assert server_side.in_flight == 1
            client.close()
            await cancelled.wait()
            await server_side.closed
        finally:
            await pair.close()

    run(main())


def test_reply_to_an_unknown_id_is_ignored():
    async def main():
        pair = await Pair().start(echo)
        client = await pair.client()
        try:
            server_side = await pair.server_side()
            server_side._send(rpc.encode_frame(Kind.RESPONSE, 999, {"stray": True}))
            server_side._send(rpc.encode_frame(Kind.ERROR, 998, {"code": "busy"}))
            assert (await client.call("echo", tail=b"xy", timeout=5)).tail == b"yx"
            assert not client.closed.done()
        finally:
            client.close()
            await pair.close()

    run(main())


# --- framing errors close the connection --------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BROKEN_FRAMES) + ["oversized length header"])
def test_framing_error_closes_the_connection(name):
    cap = 1 << 20
    data = HEADER.pack(VERSION, Kind.REQUEST, 0, 1, cap + 1) if name == "oversized length header" \
        else BROKEN_FRAMES[name]

    async def main():
        pair = await Pair().start(echo, max_frame=cap)
        try:
            reader, writer = await pair.raw()
            # A good request first: answered, so the connection was working.
            writer.write(rpc.encode_frame(Kind.REQUEST, 1, {"method": "echo"}, b"ab"))
            [reply] = await read_frames(reader, 1)
            assert reply.id == 1 and reply.kind == Kind.RESPONSE and reply.tail == b"ba"
            writer.write(data)
            rest = await read_until_closed(reader)
            assert rest == b"", "nothing is answered after a framing error"
            await (await pair.server_side()).closed
            writer.close()
        finally:
            await pair.close()

    run(main())


def test_oversized_frame_closes_without_waiting_for_its_body():
    """Only the 12-byte header is sent: the side closes at once instead of buffering 4 GiB."""
    async def main():
        pair = await Pair().start(echo, max_frame=1024)
        try:
            reader, writer = await pair.raw()
            writer.write(HEADER.pack(VERSION, Kind.REQUEST, 0, 1, 0xFFFFFFF0))
            assert await read_until_closed(reader) == b""
            writer.close()
            # The listener still serves others.
            client = await pair.client()
            assert (await client.call("echo", tail=b"12", timeout=5)).tail == b"21"
            client.close()
        finally:
            await pair.close()

    run(main())


def test_frame_cap_applies_to_replies_too():
    """A client with a small cap closes on an oversized response; its pending call fails, no hang."""
    async def handler(connection, frame):
        return {}, b"x" * 5000

    async def main():
        pair = await Pair().start(handler)
        client = await pair.client(max_frame=1024)
        try:
            with pytest.raises(ConnectionError):
                await client.call("big", timeout=5)
            await client.closed
        finally:
            client.close()
            await pair.close()

    run(main())


async def read_frames(reader: asyncio.StreamReader, count: int) -> list[Frame]:
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for _ in range(1000):
        if len(frames) >= count:
            return frames
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, f"closed after {len(frames)} of {count} frames"
        frames += decoder.feed(chunk)
    raise AssertionError("too many reads")



# --- backpressure: a peer that never reads ------------------------------------------------------------

RESPONSE = 64 * 1024


def small_send_buffer(connection: rpc.RpcConnection) -> None:
    """The server's kernel send buffer made small, so what the peer does not read stays in the transport."""
    connection.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def test_a_peer_that_never_reads_cannot_make_the_server_buffer_without_bound():
    """It sends 64 KiB echo requests and reads nothing: the server stops reading it once its buffer passes the
    high-water mark, so the buffer stays near that mark (not tens of MiB), and other peers are served."""
    seen: list[int] = []

    async def handler(connection, frame):
        seen.append(connection.transport.get_write_buffer_size())
        return await echo(connection, frame)

    async def main():
        pair = await Pair().start(handler, on_made=small_send_buffer)
        [hostile] = await open_sockets(pair.port, 1, receive_buffer=4096)
        try:
            server_side = await pair.server_side()
            sent = await send_until_stalled(hostile, request(1, "echo", tail=b"x" * RESPONSE),
                                            lambda: not server_side.transport.is_reading(), limit=64 << 20)
            assert sent < 64 << 20, "the server kept reading from a peer that reads nothing"
            buffered = server_side.transport.get_write_buffer_size()
            # Another peer is served meanwhile, and the stalled one is still held, not grown.
            client = await pair.client()
            assert (await client.call("echo", tail=b"12", timeout=5)).tail == b"21"
            client.close()
            assert server_side.transport.get_write_buffer_size() == buffered
            return sent, buffered
        finally:
            close_all([hostile])
            await pair.close()

    sent, buffered = run(main())
    bound = rpc.WRITE_HIGH_WATER + RESPONSE + 1024  # the mark, plus the one answer that crossed it
    assert buffered > rpc.WRITE_HIGH_WATER // 4, "the test did not fill the server's buffer"
    assert max(seen + [buffered]) <= bound, (max(seen), buffered, sent)


def test_answers_wait_for_the_drain_and_go_out_in_order_once_the_peer_reads():
    """Held answers are not lost: when the peer finally reads, every request it sent is answered."""
    async def main():
        pair = await Pair().start(echo, on_made=small_send_buffer)
        [hostile] = await open_sockets(pair.port, 1, receive_buffer=4096)
        try:
            server_side = await pair.server_side()
            frame = request(1, "echo", tail=b"y" * RESPONSE)
            sent = await send_until_stalled(hostile, frame, lambda: not server_side.transport.is_reading(),
                                            limit=64 << 20)
            assert sent < 64 << 20
            requests = sent // len(frame)
            decoder = FrameDecoder()
            answered = 0
            loop = asyncio.get_running_loop()
            for _ in range(100_000):
                if answered >= requests:
                    break
                data = await asyncio.wait_for(loop.sock_recv(hostile, 1 << 20), 5)
                assert data, f"closed after {answered} of {requests} answers"
                answered += len(decoder.feed(data))
            assert answered >= requests
            assert server_side.transport.is_reading()
        finally:
            close_all([hostile])
            await pair.close()

    run(main())


def test_a_write_buffer_past_the_hard_cap_closes_the_connection_with_a_log_line(caplog):
    """The backstop for writes that skip the drain wait: the server pushes 32 requests with call_nowait() to a
    peer that reads nothing; past the 1 MiB cap the connection is closed, and the server serves others."""
    async def main():
        pair = await Pair().start(echo, max_write_buffer=1 << 20, on_made=small_send_buffer)
        [hostile] = await open_sockets(pair.port, 1, receive_buffer=4096)
        try:
            server_side = await pair.server_side()
            pushed = [server_side.call_nowait("push", tail=b"p" * RESPONSE) for _ in range(32)]
            assert await closed_by_peer(hostile, 10)
            for future in pushed:
                with pytest.raises(ConnectionError):
                    await future
            client = await pair.client()
            assert (await client.call("echo", tail=b"ok", timeout=5)).tail == b"ko"
            client.close()
        finally:
            close_all([hostile])
            await pair.close()

    with caplog.at_level(logging.WARNING, logger="yestls.rpc"):
        run(main())
    [line] = [r.getMessage() for r in caplog.records if "cap" in r.getMessage()]
    assert "over the 1048576-byte cap" in line and line.startswith("127.0.0.1:")


def test_flood_of_small_requests_past_max_in_flight_is_held_too():
    """Requests past max_in_flight are answered `busy` at once, without a handler: those answers are held by
    the same mark, so a never-reading peer sending tiny requests cannot grow the buffer either."""
    never = asyncio.Event()

    async def handler(connection, frame):
        await never.wait()
        return {}, b""

    async def main():
        pair = await Pair().start(handler, max_in_flight=1, write_high_water=16 * 1024, on_made=small_send_buffer)
        [hostile] = await open_sockets(pair.port, 1, receive_buffer=4096)
        try:
            server_side = await pair.server_side()
            frame = b"".join(request(n, "x") for n in range(1000))
            sent = await send_until_stalled(hostile, frame, lambda: not server_side.transport.is_reading(),
                                            limit=64 << 20)
            assert sent < 64 << 20, "the server kept reading from a peer that reads nothing"
            return server_side.transport.get_write_buffer_size()
        finally:
            close_all([hostile])
            await pair.close()

    buffered = run(main())
    assert 16 * 1024 // 4 < buffered <= 16 * 1024 + 1024, buffered


def test_calls_wait_for_the_drain_instead_of_filling_the_buffer():
    """The side that calls: a server that never reads gets no more than the high-water mark (plus one request)
    queued; the other calls wait for the drain and time out; nothing is left pending."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # never accepted, never read: the kernel completes the handshake and holds a little

    async def main():
        client = await rpc.connect("127.0.0.1", listener.getsockname()[1], write_high_water=64 * 1024)
        small_send_buffer(client)
        try:
            calls = [asyncio.ensure_future(client.call("echo", tail=b"c" * RESPONSE, timeout=2)) for _ in range(64)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, TimeoutError) for r in results), results[:3]
            buffered = client.transport.get_write_buffer_size()
            for _ in range(100):  # the cancelled calls' done callbacks run on the next turns
                if client.pending_calls == 0:
                    break
                await asyncio.sleep(0.01)
            return buffered, client.pending_calls
        finally:
            client.close()

    try:
        buffered, pending = run(main())
    finally:
        listener.close()
    assert 0 < buffered <= 64 * 1024 + RESPONSE + 1024, buffered  # not 64 requests: 4 MiB
    assert pending == 0
