"""Home's side of the spool service: one authenticated connection to the edge's spool.

    client = SpoolClient(host, port, identity)
    await client.connect()                   # connects and proves home's identity key
    for message in await client.list():      # in order of acceptance
        sealed = await client.fetch(message.id)
        ...                                  # unseal, deliver
        await client.ack(message.id)         # the edge deletes it
    ready = await client.wait(after=last_id, timeout=50)
    await client.close()

No reconnect loop: a dropped connection makes calls raise ConnectionError,
and the caller (the intake) connects again. Remote refusals raise
relay.rpc.RemoteError (`not_found`, `bad_request`, `not_authenticated`, ...).
"""

import asyncio
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay import tunnel
from relay.rpc import Frame, RpcConnection
from relay.spool.protocol import MAX_FRAME, MAX_LIST, MAX_WAIT, SERVICE


class SpoolProtocolError(Exception):
    """The edge answered something that does not fit the spool protocol."""


@dataclass(frozen=True)
class ListedMessage:
    id: str
    size: int          # bytes of the sealed file
    accepted: float    # seconds since the epoch, by the edge's clock


class SpoolClient:
    def __init__(self, host: str, port: int, identity: Ed25519PrivateKey, *, timeout: float = 10.0,
                 source: str | None = None, parallel_fetches: int = 4):
        self.host, self.port = host, port
        self.identity = identity
        self.timeout = timeout
        self.source = source   # the local (tunnel) address to connect from
        self.parallel_fetches = parallel_fetches
        self.connection: RpcConnection | None = None

    async def connect(self) -> None:
        """Connect and authenticate; OSError/TimeoutError if the edge is unreachable, RemoteError if refused."""
        await self.close()
        loop = asyncio.get_running_loop()
        local = (self.source, 0) if self.source else None
        _, connection = await asyncio.wait_for(loop.create_connection(
            lambda: RpcConnection(max_frame=MAX_FRAME), self.host, self.port, local_addr=local), self.timeout)
        try:
            await tunnel.authenticate(connection, SERVICE, self.identity, self.timeout)
        except BaseException:
            connection.close()
            raise
        self.connection = connection

    async def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()
            await asyncio.wait([connection.closed], timeout=self.timeout)

    async def __aenter__(self) -> "SpoolClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method: str, params: dict, timeout: float | None = None) -> Frame:
        if self.connection is None:
            raise ConnectionError("not connected to the spool; connect() first")
        return await self.connection.call(method, params, timeout=timeout or self.timeout)

    async def list(self) -> list[ListedMessage]:
        """Every message in the spool, in order of acceptance."""
        messages: list[ListedMessage] = []
        after = None
        while True:
            frame = await self._call("list", {"after": after, "limit": MAX_LIST})
            try:
                page = [ListedMessage(str(m["id"]), int(m["size"]), float(m["accepted"]))
                        for m in frame.meta["messages"]]
                more = bool(frame.meta["more"])
            except (KeyError, TypeError, ValueError):
                raise SpoolProtocolError(f"malformed list answer: {str(frame.meta)[:200]}") from None
            messages.extend(page)
            if not more or not page:
                return messages
            after = page[-1].id

    async def fetch(self, spool_id: str) -> bytes:
        """The whole sealed file, fetched in pieces (several in flight)."""
        first = await self._call("fetch", {"id": spool_id, "offset": 0})
        size = first.meta.get("size")
        if not isinstance(size, int) or len(first.tail) > size or (not first.tail and size):
            raise SpoolProtocolError(f"malformed fetch answer for {spool_id}: size {size!r}, "
                                     f"{len(first.tail)} bytes")
        piece = len(first.tail)
        if piece == size:
            return first.tail
        limit = asyncio.Semaphore(self.parallel_fetches)

        async def fetch_piece(offset: int) -> bytes:
            expected = min(piece, size - offset)
            async with limit:
                frame = await self._call("fetch", {"id": spool_id, "offset": offset, "length": expected})
            if len(frame.tail) != expected or frame.meta.get("size") != size:
                raise SpoolProtocolError(f"fetch of {spool_id} at {offset} returned {len(frame.tail)} bytes "
                                         f"of a {frame.meta.get('size')!r}-byte file; expected {expected} of {size}")
            return frame.tail

        tasks = [asyncio.ensure_future(fetch_piece(offset)) for offset in range(piece, size, piece)]
        try:
            rest = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return b"".join([first.tail, *rest])

    async def ack(self, spool_id: str) -> None:
        """The message is safe at home: the edge deletes it. `not_found` means it is gone already."""
        await self._call("ack", {"id": spool_id})

    async def wait(self, after: str | None, timeout: float) -> bool:
        """True as soon as the spool holds a message accepted after `after` (any, if None); False on timeout.

        The edge holds a wait for at most MAX_WAIT seconds.
        """
        timeout = min(max(0.0, timeout), MAX_WAIT)
        frame = await self._call("wait", {"after": after, "timeout": timeout}, timeout=timeout + self.timeout)
        return bool(frame.meta.get("ready"))

    async def stats(self) -> dict:
        return dict((await self._call("stats", {})).meta)
