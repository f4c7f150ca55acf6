"""One spool, several writing processes (relay/spool/desk.py).

A worker seals into the shared tmp/ and asks the owner's desk for room and
for the commit; the owner alone decides the caps and what is in queue/. So:
messages a worker commits are durable, listed and unseal; the caps hold
across workers; an abort or a worker's death (SIGKILL included) gives its
room back and leaves no tmp/ file; a worker whose owner is gone refuses
everything and says so; malformed or out-of-turn requests are answered
ERROR and change nothing. Every wait is bounded.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from relay.spool.desk import ANSWER, REQUEST, ROOM_STEP, Answer, Op, SpoolDesk, WorkerSpool, desk_pair
from relay.spool.keys import generate_spool_key, load_spool_private_key, parse_spool_public_key
from relay.spool.sealed import InlineKeys, unseal
from relay.spool.store import Spool, SpoolError, SpoolFull

METADATA = {"mail_from": "alice@example.net", "rcpt_tos": ["bob@example.org"]}
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    text = generate_spool_key(directory / "spool.key", "x25519")
    return parse_spool_public_key(text), load_spool_private_key(directory / "spool.key"), text


@pytest.fixture
def owner(tmp_path, keys):
    commits = ThreadPoolExecutor(4)
    spools = []

    def make(max_bytes: int = 1 << 30, max_files: int = 10_000):
        spool = Spool(tmp_path / "spool", keys[0], max_bytes, max_files)
        spools.append(spool)
        return spool, SpoolDesk(spool, commits)

    yield make
    commits.shutdown()
    for spool in spools:
        spool.close()


def worker_of(spool: Spool, desk: SpoolDesk, public, on_lost=None):
    """A WorkerSpool in this process, linked to `desk`; returns it and the desk's serving thread."""
    owner_end, worker_end = desk_pair()
    thread = desk.attach(owner_end, "test")
    return WorkerSpool(worker_end, spool.directory, public, InlineKeys(public, spool.chunk_size),
                       on_lost=on_lost), thread


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_workers_messages_are_durable_listed_and_unseal(owner, keys):
    spool, desk = owner()
    worker, _ = worker_of(spool, desk, keys[0])
    bodies = [b"Subject: %d\r\n\r\n" % n + bytes([65 + n]) * (n * 40_000) for n in range(4)]
    ids = [worker.accept(METADATA, [body], size=len(body) if n % 2 else None) for n, body in enumerate(bodies)]
    assert [entry.id for entry in spool.list()] == ids
    for spool_id, body in zip(ids, bodies):
        with open(spool.queue_dir / spool.entry(spool_id).name, "rb") as sealed:
            unsealed = unseal(sealed.read(), keys[1])
        assert unsealed.message == body and unsealed.metadata == METADATA
    assert os.listdir(spool.tmp_dir) == []
    assert spool.stats().accepted == 4
    worker.close()


def test_the_file_cap_holds_across_workers_and_frees_on_delete(owner, keys):
    spool, desk = owner(max_files=3)
    first, _ = worker_of(spool, desk, keys[0])
    second, _ = worker_of(spool, desk, keys[0])
    ids = [first.accept(METADATA, [b"one"]), second.accept(METADATA, [b"two"])]
    held = first.open(METADATA)                 # the third file's room, held while it is written
    with pytest.raises(SpoolFull) as full:
        second.open(METADATA)
    assert full.value.reason == "files"
    held.abort()                                 # its room comes back (RELEASE is not answered: wait)
    wait_until(lambda: spool._reserved_files == 0, "the owner to take the RELEASE")
    ids.append(second.accept(METADATA, [b"three"]))
    with pytest.raises(SpoolFull):
        first.accept(METADATA, [b"four"])
    spool.delete(ids[0])
    first.accept(METADATA, [b"four"])
    assert spool.stats().depth == 3 and spool.stats().full_files == 2
    first.close()
    second.close()


def test_the_byte_cap_holds_for_a_message_that_grows(owner, keys):
    spool, desk = owner(max_bytes=3 * ROOM_STEP)
    worker, _ = worker_of(spool, desk, keys[0])
    writer = worker.open(METADATA)               # no size: ROOM_STEP first, then doubling
    with pytest.raises(SpoolFull) as full:
        for _ in range(8):
            writer.write(b"x" * (ROOM_STEP // 2))
    assert full.value.reason == "bytes"
    writer.abort()
    assert os.listdir(spool.tmp_dir) == []
    wait_until(lambda: spool._reserved_files == 0, "the owner to take the RELEASE")
    worker.accept(METADATA, [b"y" * 1000])       # all of the room came back
    assert spool.stats().depth == 1
    worker.close()


def test_a_dead_worker_gives_its_room_back_and_leaves_no_file(owner, keys):
    spool, desk = owner(max_files=2)
    worker, thread = worker_of(spool, desk, keys[0])
    writer = worker.open(METADATA)
    writer.write(b"z" * (200 * 1024))            # past the in-memory part: its tmp/ file exists
    assert len(os.listdir(spool.tmp_dir)) == 1
    worker._sock.shutdown(socket.SHUT_RDWR)       # as the kernel does when the worker dies
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert os.listdir(spool.tmp_dir) == []
    other, _ = worker_of(spool, desk, keys[0])
    other.accept(METADATA, [b"a"])
    other.accept(METADATA, [b"b"])              # both files' room is free again
    assert spool.stats().depth == 2
    other.close()


def test_a_worker_whose_owner_is_gone_refuses_and_says_so(tmp_path, keys):
    owner_end, worker_end = desk_pair()
    lost = []
    worker = WorkerSpool(worker_end, tmp_path, keys[0], InlineKeys(keys[0], 65536), on_lost=lambda: lost.append(1))
    owner_end.close()
    wait_until(lambda: lost, "on_lost")
    with pytest.raises(SpoolError, match="supervisor.*gone"):
        worker.open(METADATA)
    worker.close()


def test_a_commit_the_owner_never_answers_is_a_refusal_not_a_250(tmp_path, keys, monkeypatch):
    from relay.spool import desk as desk_module

    monkeypatch.setattr(desk_module, "ASK_TIMEOUT", 0.2)
    owner_end, worker_end = desk_pair()           # an owner that reads nothing
    worker = WorkerSpool(worker_end, tmp_path, keys[0], InlineKeys(keys[0], 65536))
    with pytest.raises(SpoolError, match="did not answer RESERVE"):
        worker.open(METADATA)
    worker.close()
    owner_end.close()


# --- room asked from an event loop (a DATA command): open_async ------------------------------------------

def test_open_async_leaves_the_event_loop_free_while_the_owner_answers(owner, keys):
    """The loop turns while the RESERVE is out (the owner answers late here); the room is the owner's."""
    spool, desk = owner(max_files=1)
    answering = threading.Event()
    reserve = spool.reserve

    def slow_reserve(expected, ident):
        answering.wait(TIMEOUT)
        return reserve(expected, ident)

    spool.reserve = slow_reserve
    worker, _ = worker_of(spool, desk, keys[0])

    async def scenario():
        loop = asyncio.get_running_loop()
        opening = asyncio.ensure_future(worker.open_async(METADATA, size=100))
        turns = 0
        while not opening.done() and turns < 1000:
            turns += 1
            if turns == 5:
                answering.set()
            await asyncio.sleep(0.001)
        writer = await opening
        writer.write(b"Subject: x\r\n\r\nhi\r\n")
        spool_id = await loop.run_in_executor(None, writer.commit)
        return turns, spool_id

    turns, spool_id = asyncio.run(scenario())
    assert turns >= 5 and [entry.id for entry in spool.list()] == [spool_id]
    with pytest.raises(SpoolFull):
        asyncio.run(worker.open_async(METADATA))        # the one file's room is taken: the owner's FULL
    worker.close()


def test_open_async_given_up_gives_the_room_back(owner, keys, monkeypatch):
    """A session that goes away while its RESERVE is out (cancelled), and a RESERVE that times out: the
    room the owner grants afterwards is released, so the caps do not shrink."""
    from relay.spool import desk as desk_module

    spool, desk = owner(max_files=1)
    answering = threading.Event()
    reserve = spool.reserve
    spool.reserve = lambda expected, ident: answering.wait(TIMEOUT) and reserve(expected, ident)
    worker, _ = worker_of(spool, desk, keys[0])

    async def cancelled():
        opening = asyncio.ensure_future(worker.open_async(METADATA))
        await asyncio.sleep(0.05)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening

    asyncio.run(cancelled())
    answering.set()
    wait_until(lambda: spool._reserved_files == 0 and not worker._waiting, "the room to come back")

    answering.clear()
    monkeypatch.setattr(desk_module, "ASK_TIMEOUT", 0.1)
    with pytest.raises(SpoolError, match="did not answer RESERVE"):
        asyncio.run(worker.open_async(METADATA))
    answering.set()
    wait_until(lambda: spool._reserved_files == 0 and not worker._waiting, "the room to come back")
    worker.accept(METADATA, [b"the one file"])          # all of it is free
    assert spool.stats().depth == 1
    worker.close()


def ask(sock: socket.socket, op: int, number: int, ident: bytes, amount: int) -> tuple[int, int, str]:
    sock.send(REQUEST.pack(op, number, ident, amount))
    sock.settimeout(TIMEOUT)
    answer = sock.recv(1024)
    got_number, code = ANSWER.unpack_from(answer)
    return got_number, code, answer[ANSWER.size:].decode()


def test_requests_out_of_turn_or_malformed_are_errors_and_change_nothing(owner, keys):
    spool, desk = owner(max_files=5)
    owner_end, raw = desk_pair()
    desk.attach(owner_end, "raw")
    ident = os.urandom(16)
    raw.send(b"\x01\x02")                                    # too short: ignored, the link lives on
    assert ask(raw, 9, 1, ident, 0)[1:] == (Answer.ERROR, "unknown request 9")
    assert ask(raw, Op.GROW, 2, ident, 10)[1] == Answer.ERROR        # holds no room
    assert ask(raw, Op.COMMIT, 3, ident, 10)[1] == Answer.ERROR      # holds no room to commit
    assert ask(raw, Op.RESERVE, 4, ident, 10)[:2] == (4, Answer.OK)
    assert ask(raw, Op.RESERVE, 5, ident, 10)[1] == Answer.ERROR     # twice
    # The announced file is missing, then of another size: no commit, nothing queued.
    assert ask(raw, Op.COMMIT, 6, ident, 10)[1] == Answer.ERROR
    (spool.tmp_dir / (ident.hex() + ".tmp")).write_bytes(b"12345")
    number, code, text = ask(raw, Op.COMMIT, 7, ident, 10)
    assert code == Answer.ERROR and "10-byte" in text
    os.unlink(spool.tmp_dir / (ident.hex() + ".tmp"))
    os.symlink("/etc/passwd", spool.tmp_dir / (ident.hex() + ".tmp"))   # not a regular file
    assert ask(raw, Op.COMMIT, 8, ident, os.stat("/etc/passwd").st_size)[1] == Answer.ERROR
    assert spool.list() == [] and os.listdir(spool.queue_dir) == []
    raw.send(REQUEST.pack(Op.DISK_FULL, 0, bytes(16), 0))   # a worker's own ENOSPC: the owner counts it
    wait_until(lambda: spool.stats().full_disk == 1, "the disk-full count")
    raw.close()


WRITER = r"""
import socket, sys, time
from pathlib import Path
from relay.spool.desk import WorkerSpool
from relay.spool.keys import parse_spool_public_key
from relay.spool.sealed import InlineKeys
public = parse_spool_public_key(sys.argv[2])
spool = WorkerSpool(socket.socket(fileno=int(sys.argv[3])), Path(sys.argv[1]), public, InlineKeys(public, 65536))
n = 0
while True:
    writer = spool.open({"n": n})
    for _ in range(20):
        writer.write(b"w" * 8192)
    print(writer.commit(), flush=True)
    n += 1
"""


def test_workers_killed_under_load_lose_no_acknowledged_message_and_leave_no_file(owner, keys):
    spool, desk = owner(max_files=10_000)
    public_text = keys[2]
    children = []
    for _ in range(3):
        owner_end, worker_end = desk_pair()
        desk.attach(owner_end, "child")
        children.append(subprocess.Popen(
            [sys.executable, "-c", WRITER, str(spool.directory), public_text, str(worker_end.fileno())],
            pass_fds=[worker_end.fileno()], stdout=subprocess.PIPE))
        worker_end.close()
    acknowledged = []
    time.sleep(0.5)
    for child in children[:2]:
        child.send_signal(signal.SIGKILL)           # mid-message, most likely
    time.sleep(0.3)
    children[2].terminate()
    for child in children:
        out, _ = child.communicate(timeout=TIMEOUT)
        acknowledged += out.decode().split()
    wait_until(lambda: os.listdir(spool.tmp_dir) == [], "the dead workers' tmp/ files to go")
    listed = {entry.id for entry in spool.list()}
    assert acknowledged and set(acknowledged) <= listed
    for entry in spool.list():
        with open(spool.queue_dir / entry.name, "rb") as sealed:
            assert unseal(sealed.read(), keys[1]).message == b"w" * 8192 * 20
    assert spool._reserved_files == 0 and spool._reserved_bytes == 0   # every held room came back


def test_a_commit_that_fails_after_its_worker_died_gives_the_room_back(owner, keys):
    """The worker asks for a commit and dies; the commit fails (here: the file is not the announced size).
    Whichever comes first, the owner ends with nothing held and no tmp/ file."""
    spool, desk = owner(max_files=1)
    owner_end, raw = desk_pair()
    thread = desk.attach(owner_end, "dying")
    ident = os.urandom(16)
    assert ask(raw, Op.RESERVE, 1, ident, 10)[1] == Answer.OK
    (spool.tmp_dir / (ident.hex() + ".tmp")).write_bytes(b"short")
    raw.send(REQUEST.pack(Op.COMMIT, 2, ident, 10))
    raw.close()
    thread.join(TIMEOUT)
    wait_until(lambda: spool._reserved_files == 0 and os.listdir(spool.tmp_dir) == [], "the room given back")
    assert spool.list() == []
