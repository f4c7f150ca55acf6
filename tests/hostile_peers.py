"""Peers that misbehave on purpose, for the tunnel RPC and gate tests: raw sockets, no RpcConnection.

    sockets = await open_sockets(port, 20)                    # connected, silent
    await send(sockets[0], request(1, "hello"))
    assert await closed_by_peer(sockets[0], 10)               # EOF or reset within 10 s
    sent = await send_until_stalled(sock, request(...), server_stalled, limit=64 << 20)

Every wait is bounded; none of these reads what the service answers unless asked to.
"""

import asyncio
import base64
import socket

from relay import tunnel
from relay.rpc import FrameDecoder, Kind, encode_frame


def request(frame_id: int, method, params: dict | None = None, tail: bytes = b"") -> bytes:
    """One request frame; `method` may be anything JSON can carry (a peer chooses it)."""
    return encode_frame(Kind.REQUEST, frame_id, {"method": method, **(params or {})}, tail)


async def open_sockets(port: int, count: int, *, local_host: str | None = None,
                       receive_buffer: int | None = None) -> list[socket.socket]:
    """`count` non-blocking TCP connections to 127.0.0.1:port, each connected and silent."""
    loop = asyncio.get_running_loop()
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # before connect, so the window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if local_host is not None:
            sock.bind((local_host, 0))
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 5)
        sockets.append(sock)
    return sockets


async def send(sock: socket.socket, data: bytes, timeout: float = 5) -> None:
    await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, data), timeout)


async def send_unless_closed(sock: socket.socket, data: bytes, timeout: float = 5) -> bool:
    """Send `data`; False if the peer closed (reset or broken pipe) before taking it all.

    For frames a service may refuse from their header alone: it closes as soon as it has read enough to refuse.
    """
    try:
        await send(sock, data, timeout)
    except (ConnectionResetError, BrokenPipeError):
        return False
    return True


async def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the peer closes (EOF or reset) within `timeout` seconds; what it sends first is discarded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), max(deadline - loop.time(), 0.001))
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        if not data:
            return True
    return False


async def still_open(sock: socket.socket) -> bool:
    """True if the peer has not closed: nothing to read, or data but no EOF (no wait beyond a loop turn)."""
    try:
        data = sock.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return bool(data)


async def send_until_stalled(sock: socket.socket, data: bytes, stalled, *, limit: int) -> int:
    """Send `data` again and again without reading, until the kernel refuses more and `stalled()` holds.

    Returns the bytes sent; `limit` if the peer never stopped taking them (it kept reading: no backpressure).
    """
    sent = 0
    view = memoryview(data)
    offset = 0
    blocked = 0
    while sent < limit:
        try:
            n = sock.send(view[offset:])
        except BlockingIOError:
            if stalled():
                blocked += 1
                if blocked >= 20:  # the peer stopped reading and the kernel buffers are full: it holds
                    return sent
            await asyncio.sleep(0.01)
            continue
        blocked = 0
        sent += n
        offset = (offset + n) % len(data)
        if offset == 0:
            await asyncio.sleep(0)  # let the service run between requests
    return sent


async def read_frames(sock: socket.socket, count: int, decoder: FrameDecoder | None = None) -> list:
    """The next `count` frames the service sends; fewer if it closes first."""
    loop = asyncio.get_running_loop()
    decoder = decoder or FrameDecoder()
    frames: list = []
    for _ in range(1000):
        if len(frames) >= count:
            break
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        if not data:
            break
        frames += decoder.feed(data)
    return frames


async def prove(sock: socket.socket, service: str, identity) -> bool:
    """hello and auth over a raw socket, as the genuine peer would; True if the service accepted the answer."""
    await send(sock, request(1, "hello"))
    frames = await read_frames(sock, 1)
    if not frames:
        return False  # closed before answering (evicted)
    message = tunnel.auth_message(service, bytes.fromhex(frames[0].meta["challenge"]), sock.getpeername(),
                                  sock.getsockname())
    await send(sock, request(2, "auth", {"signature": base64.b64encode(identity.sign(message)).decode()}))
    frames = await read_frames(sock, 1)
    return bool(frames) and frames[0].kind == Kind.RESPONSE


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
