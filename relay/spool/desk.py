"""One spool, several writing processes: the owner's desk, and the spool a worker writes through.

With `[smtp] workers` above 1 the edge runs worker processes that accept
mail (relay/edge/worker.py). They all seal into the one spool directory,
but one process owns it: the supervisor (`yestls edge serve`), which holds
its lock, its caps, the index home's `list` and `wait` read, and its
recovery. A worker seals and writes `tmp/<id>.tmp` itself (that CPU stays
on its core) and asks the owner, over a socketpair, for what must be
decided in one place:

    RESERVE id expected   room for a new message (else FULL: the client gets 452); a DATA command awaits
                          the answer (reserve_async), so the worker's event loop goes on meanwhile
    GROW    id extra      more room, for a message that outgrew what it had
    COMMIT  id size       the worker fsync'd tmp/<id>.tmp: the owner checks it, renames it into queue/ and
                          fsyncs queue/ (one fsync for every worker's renames made before it), then answers;
                          the worker says 250 only after that answer
    RELEASE id            the message was abandoned: its room is free (no answer)
    DISK_FULL id          the worker's own write found the filesystem full: counted (no answer)

Each request and each answer is one SOCK_SEQPACKET datagram, so the kernel
does the framing; a request carries a number its answer repeats, because a
worker's event loop and its commit threads ask at the same time.

A worker that dies, `kill -9` included, closes its end: the owner gives
back every reservation it held and removes those messages' tmp/ files. A
COMMIT the owner had already begun completes: that message is durable,
the client never heard 250 and sends it again (SMTP is at-least-once
there, as with any MTA). Owner and workers are one trust domain (same
user, same config); the owner still checks every request's shape and
answers ERROR to anything it cannot honour.
"""

import asyncio
import enum
import errno
import itertools
import logging
import os
import socket
import stat
import struct
import threading
from concurrent.futures import Executor, Future, InvalidStateError
from contextlib import suppress
from pathlib import Path

from relay.spool.keys import SpoolPublicKey
from relay.spool.sealed import DEFAULT_CHUNK_SIZE
from relay.spool.store import (
    ID_PATTERN,
    TMP_SUFFIX,
    MessageKeys,
    Reservation,
    Spool,
    SpoolError,
    SpoolFull,
    WritingSpool,
)

log = logging.getLogger("yestls.spool")

REQUEST = struct.Struct("!BI16sQ")   # op, number, spool id (16 bytes), bytes
ANSWER = struct.Struct("!IB")        # number, Answer; then UTF-8 text: "reason\nmessage" for FULL, why for ERROR
MAX_DATAGRAM = 1024
ASK_TIMEOUT = 30.0     # seconds a worker waits for RESERVE or GROW
COMMIT_TIMEOUT = 120.0  # ... for COMMIT, which waits for fsyncs
# A worker asks for room in steps, so most messages need one RESERVE and no GROW: at least ROOM_STEP
# bytes, then doubling. So a spool within ROOM_STEP of its byte cap refuses a worker's small message that
# would still fit; the caps themselves hold exactly (the owner counts every byte granted).
ROOM_STEP = 64 * 1024


class Op(enum.IntEnum):
    RESERVE = 1
    GROW = 2
    COMMIT = 3
    RELEASE = 4
    DISK_FULL = 5


class Answer(enum.IntEnum):
    OK = 0
    FULL = 1
    ERROR = 2


def desk_pair() -> tuple[socket.socket, socket.socket]:
    """(owner's end, worker's end): hand the worker's to the worker process, close it in the owner."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class SpoolDesk:
    """The owner's side: serves each worker's link in a thread of its own; commits run in `commits`."""

    def __init__(self, spool: Spool, commits: Executor):
        self.spool = spool
        self.commits = commits

    def attach(self, sock: socket.socket, name: str) -> threading.Thread:
        """Serve one worker's end until it closes (the worker exited or died); then clean up after it."""
        link = _OwnerLink(self, sock, name)
        thread = threading.Thread(target=link.serve, name=f"spool-desk-{name}", daemon=True)
        thread.start()
        return thread


class _OwnerLink:
    def __init__(self, desk: SpoolDesk, sock: socket.socket, name: str):
        self.desk = desk
        self.spool = desk.spool
        self.sock = sock
        self.name = name
        self.lock = threading.Lock()
        self.held: dict[str, Reservation] = {}   # the worker's messages being written
        self.committing: set[str] = set()
        self.gone = False   # the worker's end closed

    def serve(self) -> None:
        try:
            while True:
                try:
                    datagram = self.sock.recv(MAX_DATAGRAM)
                except OSError:
                    break
                if not datagram:
                    break
                self._handle(datagram)
        finally:
            self._worker_gone()
            self.sock.close()

    def _handle(self, datagram: bytes) -> None:
        if len(datagram) != REQUEST.size:
            log.warning("spool desk %s: a %d-byte request is no request; ignored", self.name, len(datagram))
            return
        code, number, raw_id, amount = REQUEST.unpack(datagram)
        ident = raw_id.hex()
        try:
            op = Op(code)
        except ValueError:
            self._answer(number, Answer.ERROR, f"unknown request {code}")
            return
        if op == Op.RESERVE:
            self._reserve(number, ident, amount)
        elif op == Op.GROW:
            self._grow(number, ident, amount)
        elif op == Op.COMMIT:
            self._commit(number, ident, amount)
        elif op == Op.DISK_FULL:
            self.spool.count_disk_full()
        else:
            self._release(ident)

    def _reserve(self, number: int, ident: str, expected: int) -> None:
        with self.lock:
            if ident in self.held:
                self._answer(number, Answer.ERROR, f"message {ident} already holds room")
                return
            try:
                self.held[ident] = self.spool.reserve(expected, ident)
            except SpoolFull as full:
                self._answer(number, Answer.FULL, _full_text(full))
                return
        self._answer(number, Answer.OK)

    def _grow(self, number: int, ident: str, extra: int) -> None:
        with self.lock:
            reservation = self.held.get(ident)
        if reservation is None:
            self._answer(number, Answer.ERROR, f"message {ident} holds no room")
            return
        try:
            self.spool.grow(reservation, extra)
        except SpoolFull as full:
            self._answer(number, Answer.FULL, _full_text(full))
            return
        self._answer(number, Answer.OK)

    def _commit(self, number: int, ident: str, size: int) -> None:
        with self.lock:
            reservation = self.held.get(ident)
            if reservation is None or ident in self.committing:
                self._answer(number, Answer.ERROR, f"message {ident} holds no room to commit")
                return
            self.committing.add(ident)
        self.desk.commits.submit(self._enqueue, number, ident, size, reservation)

    def _enqueue(self, number: int, ident: str, size: int, reservation: Reservation) -> None:
        answer, text = Answer.OK, ""
        tmp = self.spool.tmp_dir / (ident + TMP_SUFFIX)
        try:
            found = os.lstat(tmp)
            if not stat.S_ISREG(found.st_mode) or found.st_size != size:
                raise SpoolError(f"{tmp} is not the {size}-byte sealed file the worker announced")
            self.spool.enqueue(tmp, ident, size, reservation)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                self.spool.count_disk_full()
                answer, text = Answer.FULL, _full_text(SpoolFull("disk", f"the spool's filesystem is full "
                                                                         f"({error.strerror})"))
            else:
                answer, text = Answer.ERROR, f"commit failed: {error}"
        except Exception as error:  # noqa: BLE001 - answered; the worker refuses the message (451) and aborts
            log.warning("spool desk %s: commit of %s failed: %s", self.name, ident, error)
            answer, text = Answer.ERROR, f"commit failed: {error}"
        with self.lock:   # settled before the answer: the worker's next request finds it so
            self.committing.discard(ident)
            if answer == Answer.OK:
                self.held.pop(ident, None)   # enqueue turned the reservation into the entry
            orphaned = answer != Answer.OK and self.gone and self.held.pop(ident, None) is not None
        if orphaned:   # the worker died while this commit failed: nobody will RELEASE it
            self._abandon({ident: reservation})
        self._answer(number, answer, text)

    def _release(self, ident: str) -> None:
        with self.lock:
            reservation = self.held.pop(ident, None) if ident not in self.committing else None
        if reservation is not None:
            self.spool.give_back(reservation)

    def _answer(self, number: int, answer: Answer, text: str = "") -> None:
        try:
            self.sock.send(ANSWER.pack(number, answer) + text.encode()[:MAX_DATAGRAM - ANSWER.size])
        except OSError:
            pass   # the worker is gone; serve() sees it and cleans up

    def _worker_gone(self) -> None:
        """Give back what the worker held, and remove its unfinished files (a commit under way finishes)."""
        with self.lock:
            self.gone = True
            abandoned = {ident: r for ident, r in self.held.items() if ident not in self.committing}
            for ident in abandoned:
                del self.held[ident]
        self._abandon(abandoned)

    def _abandon(self, abandoned: dict[str, Reservation]) -> None:
        for ident, reservation in abandoned.items():
            try:
                os.unlink(self.spool.tmp_dir / (ident + TMP_SUFFIX))
            except FileNotFoundError:
                pass
            self.spool.give_back(reservation)
        if abandoned:
            log.warning("spool desk %s: the worker left %d message(s) unfinished; their room is free and their "
                        "tmp/ files removed", self.name, len(abandoned))


def _raise_unless_ok(op: Op, answer: Answer, text: str) -> None:
    if answer == Answer.FULL:
        reason, _, message = text.partition("\n")
        raise SpoolFull(reason, message)
    if answer != Answer.OK:
        raise SpoolError(f"the spool's owner refused {op.name}: {text}")


def _full_text(full: SpoolFull) -> str:
    """A FULL answer's text, "reason\nmessage" (WorkerSpool._ask turns it back into the SpoolFull)."""
    return f"{full.reason}\n{full}"


class WorkerSpool(WritingSpool):
    """A worker's spool: seals into the shared tmp/ here, and asks the owner's desk for room and commits.

    `on_lost` is called (from a thread) when the owner is gone; every request
    from then on raises SpoolError, so each message is refused with 451 and
    none is answered 250.
    """

    def __init__(self, sock: socket.socket, directory: Path, public_key: SpoolPublicKey, message_keys: MessageKeys,
                 *, chunk_size: int = DEFAULT_CHUNK_SIZE, on_lost=None):
        super().__init__(directory, public_key, message_keys, chunk_size)
        self._sock = sock
        self._on_lost = on_lost
        self._send_lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._waiting: dict[int, Future] = {}
        self._lost: str | None = None
        self._reader = threading.Thread(target=self._read, name="spool-desk-answers", daemon=True)
        self._reader.start()

    def reserve(self, expected: int, ident: str) -> Reservation:
        room = max(expected, ROOM_STEP)
        self._ask(Op.RESERVE, ident, room, ASK_TIMEOUT)
        return Reservation(ident, room)

    async def reserve_async(self, expected: int, ident: str) -> Reservation:
        """RESERVE from the event loop (a DATA command): the loop serves other sessions while the owner answers.
        Given up (timed out, or the session gone), the room the owner may still grant is given back: it reads
        this link in order, so the RELEASE finds the RESERVE's room."""
        room = max(expected, ROOM_STEP)
        future: Future = Future()
        number = self._send(Op.RESERVE, ident, room, future)
        loop = asyncio.get_running_loop()
        answered = asyncio.wrap_future(future, loop=loop)
        expired = []
        timer = loop.call_later(ASK_TIMEOUT, lambda: expired.append(True) or answered.cancel())
        try:
            answer, text = await answered
        except asyncio.CancelledError:
            self._waiting.pop(number, None)
            self._give_back_quietly(ident)
            if expired:
                raise SpoolError(f"the spool's owner did not answer RESERVE within {ASK_TIMEOUT:.0f} s") from None
            raise
        finally:
            timer.cancel()
        _raise_unless_ok(Op.RESERVE, answer, text)
        return Reservation(ident, room)

    def _give_back_quietly(self, ident: str) -> None:
        try:
            self._send(Op.RELEASE, ident, 0, None)
        except SpoolError:
            pass   # the owner is gone: it gave back everything this worker held

    def grow(self, reservation: Reservation, extra: int) -> None:
        extra = max(extra, reservation.bytes)   # doubling: a large message asks O(log size) times
        self._ask(Op.GROW, reservation.ident, extra, ASK_TIMEOUT)
        reservation.bytes += extra

    def give_back(self, reservation: Reservation) -> None:
        if reservation.active:
            reservation.active = False
            self._send(Op.RELEASE, reservation.ident, 0, None)

    def count_disk_full(self) -> None:
        self._send(Op.DISK_FULL, "0" * 32, 0, None)

    def enqueue(self, tmp: Path, ident: str, size: int, reservation: Reservation) -> None:
        self._ask(Op.COMMIT, ident, size, COMMIT_TIMEOUT)
        reservation.active = False   # the owner turned it into the queue entry

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(5)
        self._sock.close()

    def _ask(self, op: Op, ident: str, amount: int, timeout: float) -> None:
        future: Future = Future()
        number = self._send(op, ident, amount, future)
        try:
            answer, text = future.result(timeout)
        except TimeoutError:
            raise SpoolError(f"the spool's owner did not answer {op.name} within {timeout:.0f} s") from None
        finally:
            self._waiting.pop(number, None)
        _raise_unless_ok(op, answer, text)

    def _send(self, op: Op, ident: str, amount: int, future: Future | None) -> int:
        if not ID_PATTERN.fullmatch(ident):
            raise ValueError(f"{ident!r} is not a spool id")
        with self._send_lock:
            if self._lost is not None:
                raise SpoolError(self._lost)
            number = next(self._numbers) & 0xFFFFFFFF
            if future is not None:
                self._waiting[number] = future
            try:
                self._sock.send(REQUEST.pack(op, number, bytes.fromhex(ident), amount))
            except OSError as error:
                self._waiting.pop(number, None)
                raise SpoolError(f"the spool's owner is unreachable: {error}") from None
        return number

    def _read(self) -> None:
        while True:
            try:
                datagram = self._sock.recv(MAX_DATAGRAM)
            except OSError:
                datagram = b""
            if len(datagram) < ANSWER.size:
                break
            number, code = ANSWER.unpack_from(datagram)
            future = self._waiting.pop(number, None)
            if future is None:
                continue   # its asker gave up (reserve_async)
            try:
                answer = (Answer(code), datagram[ANSWER.size:].decode(errors="replace"))
            except ValueError:
                answer = (Answer.ERROR, f"unknown answer {code}")
            with suppress(InvalidStateError):   # cancelled by its asker meanwhile
                future.set_result(answer)
        with self._send_lock:
            self._lost = "the edge's supervisor, which owns the spool, is gone"
            waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(SpoolError(self._lost))
        if self._on_lost is not None:
            self._on_lost()
