"""The edge's sealed spool on disk: durable like Postfix, in order, capped, and safe to point a peer at.

    spool = Spool(directory, public_key, max_bytes=..., max_files=...)   # makes the directories, recovers
    spool_id = spool.accept(metadata, message_parts, size=len_hint)      # durable when it returns: answer 250
    writer = spool.open(metadata, size=None); writer.write(piece)...; spool_id = writer.commit()   # or abort()
    spool.list(); spool.read(spool_id, offset, length); spool.delete(spool_id)

Layout under `directory` (each made 0700):

    lock                                   flock'd by the one process that owns the spool
    tmp/<spool id>.tmp                     being written; anything here at start is a crash's leftover
    queue/<20-digit order>-<spool id>      sealed, fsync'd, complete

A spool id is the 16 random bytes of the sealed file's header, as 32
lowercase hex digits. The order is the acceptance time in microseconds since
the epoch, made strictly increasing, so names sort in order of acceptance
and say nothing the file's own timestamps do not.

`accept` seals into tmp/, fsyncs the file, renames it into queue/ and fsyncs
queue/ before it returns; nothing in queue/ is ever half-written. Commits
from several threads share directory fsyncs (group commit): one fsync
covers every rename made before it began. A message becomes visible to
`list` and `wait_for_mail` when it is durable, in the order of the renames.

`accept` and `delete` block on fsync: from asyncio, run them with
`asyncio.to_thread`. Everything here is thread-safe; `wait_for_mail` must be
awaited on an event loop (any thread's accept wakes it).
"""

import asyncio
import errno
import fcntl
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from relay.private_files import fsync_directory
from relay.spool.keys import SpoolPublicKey
from relay.spool.sealed import DEFAULT_CHUNK_SIZE, InlineKeys, MessageKey, Sealer, encode_metadata, sealed_length

log = logging.getLogger("yestls.spool")

ID_PATTERN = re.compile(r"[0-9a-f]{32}")
NAME_PATTERN = re.compile(r"([0-9]{20})-([0-9a-f]{32})")
TMP_SUFFIX = ".tmp"
REMEMBER_DELETED = 4096   # acknowledged ids whose place in the order `wait` and `list` still know
DEFER_LIMIT = 64 * 1024   # sealed bytes a message holds in memory before its file is made (see _BudgetedWriter)


class SpoolError(Exception):
    pass


class SpoolFull(SpoolError):
    """A cap would be exceeded (`reason` "bytes" or "files"), or the filesystem under the spool is full
    ("disk": ENOSPC or EDQUOT, whatever the caps say). The SMTP answer is 452 4.3.1."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class NotFound(SpoolError):
    """No message with that id in the spool (never accepted, or acknowledged already)."""


class SpoolLocked(SpoolError):
    """Another process owns the spool directory."""


def validate_id(spool_id) -> str:
    """`spool_id` if it is exactly a spool id (32 lowercase hex digits); ValueError otherwise."""
    if not isinstance(spool_id, str) or not ID_PATTERN.fullmatch(spool_id):
        raise ValueError(f"{str(spool_id)[:80]!r} is not a spool id (32 lowercase hex digits)")
    return spool_id


@dataclass(frozen=True)
class SpoolEntry:
    id: str
    size: int       # bytes of the sealed file
    order: int      # acceptance time, microseconds since the epoch, strictly increasing

    @property
    def accepted(self) -> float:
        """When the message was accepted, seconds since the epoch."""
        return self.order / 1_000_000

    @property
    def name(self) -> str:
        return f"{self.order:020d}-{self.id}"


@dataclass(frozen=True)
class SpoolStats:
    depth: int              # messages waiting for home
    bytes: int              # their sealed bytes
    oldest_age: float       # seconds since the oldest was accepted; 0 when empty
    accepted: int           # messages accepted since this process started
    full_bytes: int         # messages refused since start because of the byte cap
    full_files: int         # ... because of the file cap
    full_disk: int = 0      # ... because the filesystem was full


class Reservation:
    """Room a message being written holds against the caps until it is in the queue or abandoned."""

    def __init__(self, ident: str, size: int):
        self.ident = ident
        self.bytes = size
        self.active = True


class _BudgetedWriter:
    """The sealed file's sink: takes more room as it grows, and refuses once the byte cap is reached.

    The file itself is created late: creating a file costs far more CPU than
    sealing a small message (800 us on the VM that benchmarks this), and
    `write` runs on the event loop. So the first DEFER_LIMIT bytes of sealed
    output wait here, in memory (ciphertext, never plaintext), and the file is
    made by `flush`, in the commit's thread, or by `write` once a large
    message outgrows the limit.
    """

    def __init__(self, path: Path, spool: "WritingSpool", reservation: Reservation):
        self.path = path
        self.fd: int | None = None
        self.spool = spool
        self.reservation = reservation
        self.written = 0
        self._pending = bytearray()

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if self.written > self.reservation.bytes:
            self.spool.grow(self.reservation, self.written - self.reservation.bytes)
        if self.fd is None and len(self._pending) + len(data) <= DEFER_LIMIT:
            self._pending += data
        else:
            self.flush()
            _write_all(self.fd, data)
        return len(data)

    def flush(self) -> None:
        """The file exists and holds everything written so far."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        if self._pending:
            _write_all(self.fd, self._pending)
            self._pending = bytearray()

    def close(self) -> None:
        self._pending = bytearray()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class MessageKeys(Protocol):
    """Where a spool's message keys come from (relay.spool.sealed.InlineKeys, relay.spool.keymaker.KeyMaker)."""

    public_key: SpoolPublicKey
    chunk_size: int

    def take(self) -> MessageKey: ...


class WritingSpool:
    """What writes messages into a spool: `accept` and `open`, on top of the room a subclass keeps.

    Spool keeps the room itself; relay.spool.desk.WorkerSpool (an edge worker
    process) asks the process that owns the spool for it. Either way the
    sealed file is written into `tmp_dir` here, and `enqueue` makes it durable
    in queue/.
    """

    def __init__(self, directory: Path, public_key: SpoolPublicKey, message_keys: MessageKeys, chunk_size: int):
        if message_keys.public_key != public_key or message_keys.chunk_size != chunk_size:
            raise ValueError("the spool's message keys are for another public key or chunk size")
        self.directory = Path(directory)
        self.tmp_dir = self.directory / "tmp"
        self.public_key = public_key
        self.chunk_size = chunk_size
        self.message_keys = message_keys

    def accept(self, metadata: dict, message_parts: Iterable[bytes], *, size: int | None = None) -> str:
        """Seal and store a message; returns its spool id once the file and its directory entry are on disk.

        `size` (the message's length in bytes, if known) lets a message that
        would not fit be refused before anything is written. SpoolFull if a
        cap would be exceeded; any other exception means nothing was stored.
        """
        writer = self.open(metadata, size=size)
        try:
            for part in message_parts:
                writer.write(part)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def open(self, metadata: dict, *, size: int | None = None) -> "MessageWriter":
        """Start a message that arrives in pieces: `write` each (sealed as it goes), then `commit` or `abort`.

        SpoolFull at once if the caps leave no room (for `size` bytes, when
        given); `write` raises SpoolFull when the message outgrows the room.
        """
        # The key first: a worker's room is reserved under the message's id (relay/spool/desk.py), so a dead
        # worker's tmp/ file can be found. A refusal for a full spool wastes a key made ahead.
        encoded = encode_metadata(metadata)
        key = self.message_keys.take()
        return MessageWriter(self, encoded, key, self.reserve(self._expected(encoded, size), key.spool_id.hex()))

    async def open_async(self, metadata: dict, *, size: int | None = None) -> "MessageWriter":
        """`open` on an event loop: a spool whose room is decided in another process (relay/spool/desk.py)
        asks for it without blocking the loop meanwhile."""
        encoded = encode_metadata(metadata)
        key = self.message_keys.take()
        reservation = await self.reserve_async(self._expected(encoded, size), key.spool_id.hex())
        return MessageWriter(self, encoded, key, reservation)

    def _expected(self, encoded_metadata: bytes, size: int | None) -> int:
        """The sealed file's size for a message of `size` bytes (0: not known yet)."""
        return sealed_length(self.public_key.suite, len(encoded_metadata), size, self.chunk_size) if size is not None else 0

    def reserve(self, expected: int, ident: str) -> Reservation:
        raise NotImplementedError

    async def reserve_async(self, expected: int, ident: str) -> Reservation:
        """`reserve`, awaited: here the room is decided at once, in this process."""
        return self.reserve(expected, ident)

    def grow(self, reservation: Reservation, extra: int) -> None:
        raise NotImplementedError

    def give_back(self, reservation: Reservation) -> None:
        raise NotImplementedError

    def count_disk_full(self) -> None:
        raise NotImplementedError

    def enqueue(self, tmp: Path, ident: str, size: int, reservation: Reservation) -> None:
        raise NotImplementedError


class Spool(WritingSpool):
    def __init__(self, directory: Path, public_key: SpoolPublicKey, max_bytes: int, max_files: int, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, clock: Callable[[], float] = time.time,
                 message_keys: "MessageKeys | None" = None):
        """`message_keys` makes each message's key (relay/spool/keymaker.py: ahead, in another process);
        by default each is made when its message starts."""
        if max_bytes < 1 or max_files < 1:
            raise ValueError("a spool needs max_bytes >= 1 and max_files >= 1")
        super().__init__(directory, public_key, message_keys or InlineKeys(public_key, chunk_size), chunk_size)
        self.queue_dir = self.directory / "queue"
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.clock = clock
        self._lock = threading.Lock()        # the index, counters and waiters
        self._sync_lock = threading.Lock()   # one queue/ fsync at a time
        self._entries: dict[str, SpoolEntry] = {}   # in order of acceptance
        self._deleted: OrderedDict[str, int] = OrderedDict()   # id -> order, the last REMEMBER_DELETED
        self._bytes = 0
        self._reserved_files = 0
        self._reserved_bytes = 0
        self._last_order = 0
        self._renamed = 0     # renames into queue/ so far
        self._synced = 0      # renames covered by a finished queue/ fsync
        self._unsynced: dict[int, tuple[SpoolEntry, Reservation]] = {}
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = set()
        self._accepted = 0
        self._full = {"bytes": 0, "files": 0, "disk": 0}
        for path in (self.directory, self.tmp_dir, self.queue_dir):
            _make_directory(path)
        self._lock_fd = _take_lock(self.directory / "lock")
        self.recover()

    # --- life cycle ---------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def recover(self) -> int:
        """Remove leftovers of interrupted writes and index queue/; returns how many leftovers went.

        Called by the constructor; safe to call again, but only while no `accept` is running.
        """
        with self._lock:
            if self._reserved_files:
                raise SpoolError("recover() while messages are being written would remove them")
        removed = 0
        for name in os.listdir(self.tmp_dir):
            try:
                os.unlink(self.tmp_dir / name)
                removed += 1
            except IsADirectoryError:
                log.warning("spool: %s is a directory; a spool's tmp/ holds only files", self.tmp_dir / name)
            except FileNotFoundError:
                pass
        if removed:
            fsync_directory(self.tmp_dir)
            log.warning("spool: removed %d unfinished file(s) left in %s by an interrupted write",
                        removed, self.tmp_dir)
        found = []
        for name in os.listdir(self.queue_dir):
            match = NAME_PATTERN.fullmatch(name)
            if match is None:
                log.warning("spool: ignoring %s: not a spool file name", self.queue_dir / name)
                continue
            try:
                size = os.stat(self.queue_dir / name, follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            found.append(SpoolEntry(match.group(2), size, int(match.group(1))))
        found.sort(key=lambda entry: entry.order)
        with self._lock:
            self._entries = {entry.id: entry for entry in found}
            self._bytes = sum(entry.size for entry in found)
            self._last_order = max([self._last_order] + [entry.order for entry in found])
        return removed

    # --- room: what a MessageWriter holds against the caps (here, or through relay/spool/desk.py) -------------

    def reserve(self, expected: int, ident: str) -> Reservation:
        """Room for message `ident`, of `expected` sealed bytes (0: unknown yet); SpoolFull if there is none."""
        with self._lock:
            if len(self._entries) + self._reserved_files >= self.max_files:
                self._full["files"] += 1
                raise SpoolFull("files", f"the spool holds {self.max_files} messages, its cap")
            if self._bytes + self._reserved_bytes + max(expected, 1) > self.max_bytes:
                self._full["bytes"] += 1
                raise SpoolFull("bytes", f"the message would take the spool past its cap of {self.max_bytes} bytes")
            self._reserved_files += 1
            self._reserved_bytes += expected
            return Reservation(ident, expected)

    def grow(self, reservation: Reservation, extra: int) -> None:
        with self._lock:
            if self._bytes + self._reserved_bytes + extra > self.max_bytes:
                self._full["bytes"] += 1
                raise SpoolFull("bytes", f"the message would take the spool past its cap of {self.max_bytes} bytes")
            reservation.bytes += extra
            self._reserved_bytes += extra

    def give_back(self, reservation: Reservation) -> None:
        """The message was abandoned: its room is free again. Safe to repeat."""
        with self._lock:
            self._release(reservation)

    def count_disk_full(self) -> None:
        with self._lock:
            self._full["disk"] += 1

    def _release(self, reservation: Reservation) -> None:
        if reservation.active:
            reservation.active = False
            self._reserved_files -= 1
            self._reserved_bytes -= reservation.bytes

    def enqueue(self, tmp: Path, ident: str, size: int, reservation: Reservation) -> None:
        """Rename the fsync'd `tmp` into queue/ and fsync queue/ (shared with concurrent commits): durable when
        this returns, and visible to `list` and `wait_for_mail` in order. The reservation becomes the entry."""
        with self._lock:
            # Order and rename together: names in queue/ sort in the order they appeared there.
            order = max(int(self.clock() * 1_000_000), self._last_order + 1)
            entry = SpoolEntry(ident, size, order)
            os.rename(tmp, self.queue_dir / entry.name)
            self._last_order = order
            self._renamed += 1
            ticket = self._renamed
            self._unsynced[ticket] = (entry, reservation)
        try:
            with self._sync_lock:
                with self._lock:
                    covered = self._synced >= ticket
                    target = self._renamed
                if not covered:
                    fsync_directory(self.queue_dir)  # covers every rename up to `target`, others' too
                    with self._lock:
                        self._synced = target
                        self._publish(target)
        except BaseException:
            with self._lock:
                if self._unsynced.pop(ticket, None) is not None:
                    try:
                        os.unlink(self.queue_dir / entry.name)
                    except OSError:
                        log.exception("spool: cannot remove %s after a failed commit", entry.name)
            raise

    def _publish(self, target: int) -> None:
        for ticket in sorted(t for t in self._unsynced if t <= target):
            entry, reservation = self._unsynced.pop(ticket)
            self._release(reservation)
            self._entries[entry.id] = entry
            self._bytes += entry.size
            self._accepted += 1
        for loop, future in self._waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # that loop is closed; its waiter is gone
                pass

    # --- home's side: list, read, delete, wait -------------------------------------------------------------

    def list(self, after: str | None = None, limit: int | None = None) -> list[SpoolEntry]:
        """Messages in order of acceptance; with `after`, only those accepted after it (see `wait_for_mail`)."""
        if after is not None:
            validate_id(after)
        with self._lock:
            entries = list(self._entries.values())
            order = self._order_of(after)
        if order is not None:
            entries = [entry for entry in entries if entry.order > order]
        return entries if limit is None else entries[:limit]

    def entry(self, spool_id: str) -> SpoolEntry:
        validate_id(spool_id)
        with self._lock:
            entry = self._entries.get(spool_id)
        if entry is None:
            raise NotFound(f"no message {spool_id} in the spool")
        return entry

    def size(self, spool_id: str) -> int:
        return self.entry(spool_id).size

    def read(self, spool_id: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes of the sealed file from `offset` (fewer at its end)."""
        entry = self.entry(spool_id)
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        if offset > entry.size:
            raise ValueError(f"offset {offset} is past the end of the {entry.size}-byte file")
        length = min(length, entry.size - offset)
        try:
            fd = os.open(self.queue_dir / entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"no message {spool_id} in the spool") from None
        try:
            parts = []
            while length > 0:
                data = os.pread(fd, length, offset)
                if not data:
                    break
                parts.append(data)
                offset += len(data)
                length -= len(data)
            return b"".join(parts)
        finally:
            os.close(fd)

    def delete(self, spool_id: str) -> None:
        """Home's acknowledgement: the message is gone from disk (directory fsync'd) when this returns."""
        validate_id(spool_id)
        with self._lock:
            entry = self._entries.pop(spool_id, None)
            if entry is None:
                raise NotFound(f"no message {spool_id} in the spool")
            self._bytes -= entry.size
            self._deleted[spool_id] = entry.order
            while len(self._deleted) > REMEMBER_DELETED:
                self._deleted.popitem(last=False)
        try:
            os.unlink(self.queue_dir / entry.name)
        except FileNotFoundError:
            pass
        fsync_directory(self.queue_dir)

    def stats(self) -> SpoolStats:
        with self._lock:
            oldest = next(iter(self._entries.values()), None)
            return SpoolStats(
                depth=len(self._entries), bytes=self._bytes,
                oldest_age=max(0.0, self.clock() - oldest.accepted) if oldest else 0.0,
                accepted=self._accepted, full_bytes=self._full["bytes"], full_files=self._full["files"],
                full_disk=self._full["disk"])

    async def wait_for_mail(self, after_id: str | None, timeout: float) -> bool:
        """True as soon as a message accepted after `after_id` (any message, if None) is in the spool.

        False once `timeout` seconds pass without one. An `after_id` the spool
        does not know (acknowledged long ago, or before a restart) counts as
        older than every message.
        """
        if after_id is not None:
            validate_id(after_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            future = loop.create_future()
            waiter = (loop, future)
            with self._lock:
                if self._has_newer(after_id):
                    return True
                self._waiters.add(waiter)
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                await asyncio.wait([future], timeout=remaining)
            finally:
                with self._lock:
                    self._waiters.discard(waiter)

    def _order_of(self, spool_id: str | None) -> int | None:
        if spool_id is None:
            return None
        entry = self._entries.get(spool_id)
        return entry.order if entry is not None else self._deleted.get(spool_id)

    def _has_newer(self, after_id: str | None) -> bool:
        if not self._entries:
            return False
        order = self._order_of(after_id)
        return order is None or next(reversed(self._entries.values())).order > order


class MessageWriter:
    """One message being sealed into tmp/: `write` as it arrives, then `commit` (durable, in queue/) or `abort`.

    `write` runs where the bytes arrive (the event loop: sealing a chunk costs
    less than a thread hop, and a small message's file is made only at the
    commit); `commit` makes the file if need be and blocks on fsync, so run it
    in a thread.
    A writer is used by one thread at a time.
    """

    def __init__(self, spool: "WritingSpool", encoded_metadata: bytes, key: MessageKey, reservation: Reservation):
        """Made by WritingSpool.open, with the metadata as sealed, the message's key and the room reserved
        under its id."""
        self.spool = spool
        self._disk_full_counted = False
        self.id = key.spool_id.hex()
        self._reservation = reservation
        self._sink: _BudgetedWriter | None = None
        self._sealer: Sealer | None = None
        try:
            self._sink = _BudgetedWriter(spool.tmp_dir / (self.id + TMP_SUFFIX), spool, self._reservation)
            self._sealer = Sealer(self._sink, spool.public_key, key, encoded_metadata)
        except BaseException as error:
            self.abort()
            self._raise_if_disk_full(error)
            raise

    def write(self, data) -> None:
        """Seal more of the message; SpoolFull if it no longer fits (then `abort`)."""
        try:
            self._sealer.write(data)
        except OSError as error:
            self._raise_if_disk_full(error)
            raise

    def commit(self) -> str:
        """The last chunk, fsync, rename into queue/, fsync queue/: durable when this returns the spool id."""
        try:
            written = self._sealer.finish()
            self._sink.flush()
            os.fsync(self._sink.fd)
            self._sink.close()
            self.spool.enqueue(self._sink.path, self.id, written, self._reservation)
        except BaseException as error:
            self.abort()
            self._raise_if_disk_full(error)
            raise
        return self.id

    def _raise_if_disk_full(self, error: BaseException) -> None:
        """A full filesystem is a full spool (452 4.3.1, counted once per message), not an internal error."""
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            if not self._disk_full_counted:
                self._disk_full_counted = True
                self.spool.count_disk_full()
            raise SpoolFull("disk", f"the spool's filesystem is full ({os.strerror(error.errno)})") from error

    def abort(self) -> None:
        """Forget the message: its plaintext wiped, its file removed, its room given back. Safe to repeat."""
        if self._sealer is not None:
            self._sealer.wipe()
        if self._sink is not None:
            self._sink.close()
            try:
                os.unlink(self._sink.path)
            except FileNotFoundError:
                pass
        self.spool.give_back(self._reservation)


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _make_directory(path: Path) -> None:
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise SpoolError(f"spool path {path} exists and is not a directory") from None
        return
    fsync_directory(path.parent)


def _take_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolLocked(f"spool {path.parent} is in use by another process (it holds {path}); "
                          f"one edge process owns a spool directory") from None
    return fd
