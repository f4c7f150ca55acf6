"""Home's side of the spool service: one authenticated connection to the edge's spool.

    client = SpoolClient(host, port, identity, max_size=max_file_size(max_message_size))
    await client.connect()                   # connects and proves home's identity key
    listing = await client.list()            # in order of acceptance
    for message in listing.messages:         # ids checked; listing.refused says what was left out, and why
        sealed = await client.fetch(message.id, message.size)
        ...                                  # unseal, deliver
        await client.ack(message.id)         # the edge deletes it
    ready = await client.wait(after=listing.last_id, timeout=50)
    await client.close()

No reconnect loop: a dropped connection makes calls raise ConnectionError,
and the caller (the intake) connects again. Remote refusals raise
relay.rpc.RemoteError (`not_found`, `bad_request`, `not_authenticated`, ...).

The edge may be compromised, so its answers bound the work they can cause:
every listed id is a spool id (relay.spool.store.validate_id) before it is
used anywhere, or the entry is left out and named in `Listing.refused`; a
listing stops after `max_listed` entries, at an id listed twice, or at a
page longer than asked for; a sealed file larger than `max_size` is not
fetched; each piece must be exactly the length asked for, of a file whose
size does not change; and at most `parallel_fetches` pieces are fetched at
once, by that many tasks, whatever size the edge claims. A lie is a
SpoolProtocolError (a malformed listing page) or a refused entry.
"""

import asyncio
import math
import re
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay import tunnel
from relay.rpc import Frame, RpcConnection
from relay.show import show
from relay.spool.keys import SUITES
from relay.spool.protocol import (
    MAX_FETCH,
    MAX_FRAME,
    MAX_LIST,
    MAX_VERDICT_ID,
    MAX_WAIT,
    SERVICE,
    VERDICT_ANSWER,
    VERDICT_WAIT,
)
from relay.spool.sealed import DEFAULT_CHUNK_SIZE, HEADER, MAX_METADATA, METADATA_LENGTH, TAG_LENGTH, key_block_length
from relay.spool.store import validate_id

DEFAULT_MAX_MESSAGE_SIZE = 25 * 1024 * 1024   # the edge's default [smtp] max_message_size
# The edge prepends its Received: header inside the sealed message: a few hundred bytes, room for far more.
TRACE_ROOM = 64 * 1024
MAX_LISTED = 10 * MAX_LIST                    # entries one list() reads; the rest come in the next one

def max_file_size(max_message_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """The largest sealed file the edge makes for a message its max_message_size lets in (docs/spool-format.md,
    Sizes): any suite, the metadata at its limit, the edge's trace header, a tag per chunk."""
    content = METADATA_LENGTH.size + MAX_METADATA + max_message_size + TRACE_ROOM
    chunks = max(1, -(-content // chunk_size))
    return HEADER.size + max(key_block_length(s) for s in SUITES.values()) + content + chunks * TAG_LENGTH


class SpoolProtocolError(Exception):
    """The edge answered something that does not fit the spool protocol."""


@dataclass(frozen=True)
class ListedMessage:
    id: str            # a spool id: 32 lowercase hex digits, checked
    size: int          # bytes of the sealed file, 1 to the client's max_size
    accepted: float    # seconds since the epoch, by the edge's clock


@dataclass(frozen=True)
class Listing:
    messages: list[ListedMessage]               # the usable entries, in order of acceptance
    refused: list[str] = field(default_factory=list)   # why each entry (or page) left out was, for the log
    last_id: str | None = None                  # the last well-formed id listed, usable or not: `wait` after it
    complete: bool = True                       # False when cut at max_listed: the rest come next time


@dataclass(frozen=True)
class VerdictRequest:
    """A message an SMTP session at the edge holds until home's verdict (relay/home/judge.py)."""

    id: str            # the edge's name for it, checked: 1 to MAX_VERDICT_ID base64url characters
    facts: dict        # the envelope as the edge claims it: read through relay.home.spam.MessageFacts
    content: bytes     # the message as it would be sealed (hostile: the caller bounds its size)
    budget: float | None   # seconds the session still waits, by the edge's word; None if it said nothing usable


_VERDICT_ID = re.compile(r"[A-Za-z0-9_-]{1,%d}" % MAX_VERDICT_ID)


class SpoolClient:
    def __init__(self, host: str, port: int, identity: Ed25519PrivateKey, *, timeout: float = 10.0,
                 source: str | None = None, parallel_fetches: int = 4,
                 max_size: int = max_file_size(DEFAULT_MAX_MESSAGE_SIZE), max_listed: int = MAX_LISTED):
        if parallel_fetches < 1 or max_size < 1 or max_listed < 1:
            raise ValueError("parallel_fetches, max_size and max_listed must be 1 or more")
        self.host, self.port = host, port
        self.identity = identity
        self.timeout = timeout
        self.source = source   # the local (tunnel) address to connect from
        self.parallel_fetches = parallel_fetches
        self.max_size = max_size
        self.max_listed = max_listed
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

    async def list(self) -> Listing:
        """The spool's messages in order of acceptance, up to `max_listed` entries; SpoolProtocolError if a
        page is malformed as a whole."""
        messages: list[ListedMessage] = []
        refused: list[str] = []
        seen: set[str] = set()
        taken = 0          # entries read, usable or not: at most max_listed
        last_id = None
        after = None
        while True:
            limit = min(MAX_LIST, self.max_listed - taken)
            frame = await self._call("list", {"after": after, "limit": limit})
            entries, more = frame.meta.get("messages"), frame.meta.get("more")
            if not isinstance(entries, list) or not isinstance(more, bool):
                raise SpoolProtocolError(f"malformed list answer: {show(frame.meta)}")
            if len(entries) > limit:
                refused.append(f"a list page of {len(entries)} entries, asked for at most {limit}: "
                               f"the {len(entries) - limit} after them left out")
                entries = entries[:limit]
            taken += len(entries)
            for entry in entries:
                listed, problem = self._entry(entry)
                if listed is not None and listed.id in seen:
                    refused.append(f"{listed.id} listed twice: the listing stops there")
                    return Listing(messages, refused, last_id)
                if listed is not None:
                    seen.add(listed.id)
                    last_id = listed.id
                    if problem is None:
                        messages.append(listed)
                if problem is not None:
                    refused.append(problem)
            if not more or not entries:
                return Listing(messages, refused, last_id)
            if taken >= self.max_listed:
                return Listing(messages, refused, last_id, complete=False)
            if last_id is None:
                refused.append("a list page with no usable id to continue after: the listing stops there")
                return Listing(messages, refused, last_id)
            after = last_id

    def _entry(self, entry) -> tuple[ListedMessage | None, str | None]:
        """The listed message (when its id is one) and what is wrong with the entry (None when nothing)."""
        if not isinstance(entry, dict):
            return None, f"a list entry that is not an object: {show(entry)}"
        try:
            spool_id = validate_id(entry.get("id") if isinstance(entry.get("id"), str) else None)
        except ValueError:
            return None, f"a list entry with a bad id: {show(entry.get('id'))} is not a spool id"
        size, accepted = entry.get("size"), _seconds(entry.get("accepted"))
        if accepted is None:
            return ListedMessage(spool_id, 0, 0.0), f"{spool_id}: accepted {show(entry.get('accepted'))} " \
                                                    "is not a time"
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            return ListedMessage(spool_id, 0, 0.0), f"{spool_id}: size {show(size)} is not a file size"
        listed = ListedMessage(spool_id, size, accepted)
        if size > self.max_size:
            return listed, (f"{spool_id}: the edge lists {size} bytes, over the {self.max_size}-byte cap "
                            "(max_message_size in intake.toml); not fetched")
        return listed, None

    async def fetch(self, spool_id: str, expected_size: int | None = None) -> bytes:
        """The whole sealed file, fetched in pieces (at most `parallel_fetches` at once).

        `expected_size`, the listed size, must then be the file's size.
        SpoolProtocolError when the edge's answers do not add up.
        """
        spool_id = validate_id(spool_id)
        first = await self._call("fetch", {"id": spool_id, "offset": 0, "length": MAX_FETCH})
        size = first.meta.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SpoolProtocolError(f"fetch of {spool_id}: size {show(size)} is not a file size")
        if size > self.max_size:
            raise SpoolProtocolError(f"fetch of {spool_id}: the edge claims {size} bytes, over the "
                                     f"{self.max_size}-byte cap (max_message_size in intake.toml)")
        if expected_size is not None and size != expected_size:
            raise SpoolProtocolError(f"fetch of {spool_id}: the edge claims {size} bytes, it listed {expected_size}")
        if len(first.tail) != min(size, MAX_FETCH):
            raise SpoolProtocolError(f"fetch of {spool_id}: the first piece is {len(first.tail)} bytes of a "
                                     f"{size}-byte file; expected {min(size, MAX_FETCH)}")
        if size <= MAX_FETCH:
            return first.tail
        pieces = {0: first.tail}
        offsets = iter(range(MAX_FETCH, size, MAX_FETCH))

        async def fetch_pieces() -> None:
            # A few workers share the offsets: one task per piece would let a claimed size make the tasks.
            for offset in offsets:
                expected = min(MAX_FETCH, size - offset)
                frame = await self._call("fetch", {"id": spool_id, "offset": offset, "length": expected})
                if len(frame.tail) != expected or frame.meta.get("size") != size:
                    raise SpoolProtocolError(
                        f"fetch of {spool_id} at {offset} returned {len(frame.tail)} bytes of a "
                        f"{show(frame.meta.get('size'))}-byte file; expected {expected} of {size}")
                pieces[offset] = frame.tail

        workers = [asyncio.ensure_future(fetch_pieces())
                   for _ in range(min(self.parallel_fetches, math.ceil((size - MAX_FETCH) / MAX_FETCH)))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for worker in workers:
                worker.cancel()
            raise
        return b"".join(pieces[offset] for offset in sorted(pieces))

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

    async def verdict_wait(self, timeout: float) -> VerdictRequest | None:
        """The next message waiting for home's verdict, or None when none came within `timeout` (≤ MAX_WAIT).

        SpoolProtocolError when the answer is not a verdict request.
        """
        timeout = min(max(0.0, timeout), MAX_WAIT)
        frame = await self._call(VERDICT_WAIT, {"timeout": timeout}, timeout=timeout + self.timeout)
        if not frame.meta:
            return None
        request_id, facts, budget = frame.meta.get("id"), frame.meta.get("facts"), _seconds(frame.meta.get("budget"))
        if not isinstance(request_id, str) or not _VERDICT_ID.fullmatch(request_id):
            raise SpoolProtocolError(f"verdict_wait: id {show(request_id)} is not a verdict request's id")
        if not isinstance(facts, dict):
            raise SpoolProtocolError(f"verdict_wait {request_id}: facts {show(facts)} are not an object")
        return VerdictRequest(request_id, facts, frame.tail, budget if budget is not None and budget >= 0 else None)

    async def verdict_answer(self, request_id: str, action: str, token: str) -> None:
        """Home's verdict on a waiting message: rspamd's action and home's sealed token (relay/home/spam.py).

        `not_found` (RemoteError) when the session stopped waiting for it.
        """
        await self._call(VERDICT_ANSWER, {"id": request_id, "action": action, "token": token})

    async def publish_addresses(self, book: dict) -> None:
        """Give the edge home's address book (relay/addressbook.py): it accepts at RCPT what the book names."""
        await self._call("addresses", {"book": book})

    async def stats(self) -> dict[str, int | float]:
        """The spool's counters: the finite numbers the edge sent, and nothing else it sent."""
        meta = (await self._call("stats", {})).meta
        return {key: value for key, value in meta.items() if _seconds(value) is not None}


def _seconds(value) -> float | None:
    """A finite number (of seconds, or a count) from the edge, as a float; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None
