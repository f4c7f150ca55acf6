"""The durable spool on the edge (relay/spool/store.py).

`accept` returns only after the sealed file is fsync'd, renamed into queue/
and queue/ is fsync'd, in that order; nothing half-written ever shows in
queue/ or in `list`. Caps refuse before anything is written (or as soon as a
message without a size outgrows them). A restart removes a crash's tmp
leftovers and finds every accepted message again, in order. Ids from a peer
are only ever the exact id format. `wait_for_mail` wakes on an accept from
any thread and otherwise times out. Every wait is bounded.
"""

import asyncio
import os
import stat
import threading

import pytest

from relay.spool import store as store_module
from relay.spool.keys import generate_spool_key, load_spool_private_key, parse_spool_public_key
from relay.spool.sealed import read_header, sealed_size, unseal
from relay.spool.store import NotFound, Spool, SpoolFull, SpoolLocked, validate_id

TIMEOUT = 10.0
METADATA = {"envelope": {"mail_from": "alice@example.net", "rcpt_tos": ["bob@example.org"]}, "received": 1.5}
MESSAGE = b"Subject: hello\r\n\r\nHello Bob.\r\n"


def run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


class Clock:
    """A settable wall clock: acceptance order must not depend on it going forward."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    public = parse_spool_public_key(generate_spool_key(directory / "spool.key", "x25519"))
    return public, load_spool_private_key(directory / "spool.key")


@pytest.fixture
def make_spool(tmp_path, keys):
    opened = []

    def make(max_bytes: int = 1 << 30, max_files: int = 10_000, **options) -> Spool:
        spool = Spool(tmp_path / "spool", keys[0], max_bytes, max_files, **options)
        opened.append(spool)
        return spool

    yield make
    for spool in opened:
        spool.close()


def queue_names(spool: Spool) -> list[str]:
    return sorted(os.listdir(spool.queue_dir))


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


# --- durability ------------------------------------------------------------------------------------------

def test_accept_fsyncs_the_file_then_renames_then_fsyncs_the_directory_before_returning(make_spool, keys,
                                                                                       monkeypatch):
    spool = make_spool()
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        path = fd_path(fd)
        if os.path.isdir(path):
            # Not yet visible to home: the directory entry is not durable yet.
            events.append(("fsync-dir", path, [e.id for e in spool.list()]))
        else:
            with open(path, "rb") as file:  # the whole sealed file is there before its fsync
                events.append(("fsync-file", path, unseal(file, keys[1]).message))
        real_fsync(fd)

    def rename(source, destination):
        events.append(("rename", str(source), str(destination)))
        real_rename(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    spool_id = spool.accept(METADATA, [MESSAGE])
    events.append(("returned", spool_id))

    [name] = queue_names(spool)
    tmp = str(spool.tmp_dir / f"{spool_id}.tmp")
    assert events == [
        ("fsync-file", tmp, MESSAGE),
        ("rename", tmp, str(spool.queue_dir / name)),
        ("fsync-dir", str(spool.queue_dir), []),
        ("returned", spool_id),
    ]
    assert [e.id for e in spool.list()] == [spool_id]


def test_the_stored_file_is_private_and_opens_at_home(make_spool, keys):
    spool = make_spool()
    spool_id = spool.accept(METADATA, [MESSAGE[:5], MESSAGE[5:]], size=len(MESSAGE))
    [name] = queue_names(spool)
    assert name.endswith("-" + spool_id) and len(name) == 20 + 1 + 32
    path = spool.queue_dir / name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (spool.directory, spool.tmp_dir, spool.queue_dir):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    sealed = path.read_bytes()
    assert read_header(sealed).spool_id.hex() == spool_id
    opened = unseal(sealed, keys[1])
    assert (opened.metadata, opened.message) == (METADATA, MESSAGE)
    assert spool.size(spool_id) == len(sealed) == sealed_size(keys[0].suite, METADATA, len(MESSAGE))


def test_a_failing_message_source_leaves_nothing_behind(make_spool):
    spool = make_spool()

    def parts():
        yield b"x" * 200_000
        raise ConnectionResetError("client went away mid-DATA")

    with pytest.raises(ConnectionResetError):
        spool.accept(METADATA, parts())
    assert os.listdir(spool.tmp_dir) == [] and queue_names(spool) == []
    assert spool.stats().depth == 0 and spool.stats().bytes == 0
    assert spool.list() == []


def test_a_small_message_makes_its_file_only_at_the_commit(make_spool, keys, monkeypatch):
    """Creating a file costs more CPU than sealing a small message: writes on the event loop make none."""
    spool = make_spool()
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *args: opened.append(str(path)) or real_open(path, *args))
    writer = spool.open(METADATA)
    for _ in range(3):
        writer.write(MESSAGE)
    assert opened == [] and os.listdir(spool.tmp_dir) == []
    spool_id = writer.commit()
    assert opened[0] == str(spool.tmp_dir / f"{spool_id}.tmp")
    [name] = queue_names(spool)
    assert unseal((spool.queue_dir / name).read_bytes(), keys[1]).message == MESSAGE * 3


def test_a_large_message_makes_its_file_as_it_outgrows_memory(make_spool, keys):
    spool = make_spool()
    writer = spool.open(METADATA)
    piece = os.urandom(4096)
    written = 0
    while not os.listdir(spool.tmp_dir):
        writer.write(piece)
        written += len(piece)
        assert written <= store_module.DEFER_LIMIT + len(piece), "the sealed bytes stayed in memory"
    for _ in range(8):
        writer.write(piece)
    spool_id = writer.commit()
    assert os.listdir(spool.tmp_dir) == []
    [name] = queue_names(spool)
    assert name.endswith(spool_id)
    assert unseal((spool.queue_dir / name).read_bytes(), keys[1]).message == piece * (written // 4096 + 8)


@pytest.mark.parametrize("size", [len(MESSAGE), 3 * store_module.DEFER_LIMIT])
def test_an_abort_before_or_after_the_file_exists_leaves_nothing(make_spool, size):
    spool = make_spool()
    writer = spool.open(METADATA)
    writer.write(b"x" * size)
    writer.abort()
    writer.abort()
    assert os.listdir(spool.tmp_dir) == [] and queue_names(spool) == []
    assert spool.stats().depth == 0 and spool.stats().bytes == 0
    assert spool.accept(METADATA, [MESSAGE]) in [e.id for e in spool.list()]


def test_a_failing_directory_fsync_fails_the_accept_and_leaves_no_file(make_spool, monkeypatch):
    spool = make_spool()
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(fd_path(fd)):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        spool.accept(METADATA, [MESSAGE])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert queue_names(spool) == [] and os.listdir(spool.tmp_dir) == []
    assert spool.list() == [] and spool.stats().bytes == 0
    spool.accept(METADATA, [MESSAGE])  # the reservation was given back
    assert spool.stats().depth == 1


# --- caps ------------------------------------------------------------------------------------------------

def test_the_file_cap_refuses_before_writing(make_spool):
    spool = make_spool(max_files=2)
    kept = [spool.accept(METADATA, [MESSAGE]) for _ in range(2)]
    started = []

    def parts():
        started.append(True)
        yield MESSAGE

    with pytest.raises(SpoolFull) as full:
        spool.accept(METADATA, parts())
    assert full.value.reason == "files" and not started
    assert len(queue_names(spool)) == 2 and os.listdir(spool.tmp_dir) == []
    assert spool.stats().full_files == 1
    spool.delete(kept[0])
    spool.accept(METADATA, [MESSAGE])
    assert spool.stats().depth == 2


def test_the_byte_cap_with_a_size_refuses_before_writing(make_spool, keys):
    exact = sealed_size(keys[0].suite, METADATA, len(MESSAGE))
    spool = make_spool(max_bytes=2 * exact)
    spool.accept(METADATA, [MESSAGE], size=len(MESSAGE))
    started = []

    def parts(data):
        started.append(True)
        yield data

    with pytest.raises(SpoolFull) as full:
        spool.accept(METADATA, parts(MESSAGE + b"!"), size=len(MESSAGE) + 1)
    assert full.value.reason == "bytes" and not started
    assert os.listdir(spool.tmp_dir) == [] and len(queue_names(spool)) == 1
    spool.accept(METADATA, parts(MESSAGE), size=len(MESSAGE))  # exactly up to the cap fits
    assert spool.stats().bytes == 2 * exact == spool.max_bytes
    with pytest.raises(SpoolFull):
        spool.accept(METADATA, [b""], size=0)
    assert spool.stats().full_bytes == 2


def test_the_byte_cap_stops_a_message_without_a_size_as_it_grows(make_spool):
    spool = make_spool(max_bytes=1_000_000)
    spool.accept(METADATA, [b"x" * 400_000])
    consumed = []

    def parts():
        for _ in range(100):
            consumed.append(True)
            yield b"y" * 100_000

    with pytest.raises(SpoolFull) as full:
        spool.accept(METADATA, parts())
    assert full.value.reason == "bytes"
    assert len(consumed) < 10  # stopped near the cap, not after reading the whole 10 MB
    assert os.listdir(spool.tmp_dir) == [] and len(queue_names(spool)) == 1
    assert spool.stats().bytes <= spool.max_bytes
    spool.accept(METADATA, [b"z" * 400_000])  # the room the refused message took is free again


def test_caps_hold_under_concurrent_accepts(make_spool, keys):
    spool = make_spool(max_files=10)
    results = []
    barrier = threading.Barrier(30)

    def worker():
        barrier.wait(TIMEOUT)
        try:
            results.append(spool.accept(METADATA, [MESSAGE]))
        except SpoolFull as error:
            results.append(error.reason)

    threads = [threading.Thread(target=worker) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    ids = [r for r in results if r != "files"]
    assert len(results) == 30 and len(ids) == 10
    assert sorted(e.id for e in spool.list()) == sorted(ids)
    assert [name.split("-")[1] for name in queue_names(spool)] == [e.id for e in spool.list()]
    for entry in spool.list():
        assert unseal(spool.read(entry.id, 0, entry.size), keys[1]).message == MESSAGE


# --- recovery --------------------------------------------------------------------------------------------

def test_a_restart_removes_tmp_leftovers_and_keeps_every_queued_message(tmp_path, keys, make_spool):
    clock = Clock()
    spool = make_spool(clock=clock)
    ids = [spool.accept(METADATA, [MESSAGE + bytes([i])]) for i in range(3)]
    spool.close()
    # What a crash mid-write leaves: a partial sealed file, an empty one.
    partial = spool.queue_dir / queue_names(spool)[0]
    (spool.tmp_dir / ("ab" * 16 + ".tmp")).write_bytes(partial.read_bytes()[:100])
    (spool.tmp_dir / ("cd" * 16 + ".tmp")).write_bytes(b"")
    (spool.queue_dir / "README").write_text("not ours")

    again = make_spool(clock=clock)
    assert os.listdir(again.tmp_dir) == []
    assert [e.id for e in again.list()] == ids
    assert (again.queue_dir / "README").exists()  # never deletes what it does not own
    stats = again.stats()
    assert stats.depth == 3 and stats.bytes == sum(again.size(i) for i in ids)
    for index, spool_id in enumerate(ids):
        assert unseal(again.read(spool_id, 0, again.size(spool_id)), keys[1]).message == MESSAGE + bytes([index])
    # Idempotent.
    assert again.recover() == 0
    assert [e.id for e in again.list()] == ids and again.stats() == stats


def test_recover_reports_what_it_removed(make_spool):
    spool = make_spool()
    (spool.tmp_dir / "leftover.tmp").write_bytes(b"partial")
    assert spool.recover() == 1
    assert spool.recover() == 0


def test_one_process_owns_a_spool_directory(make_spool):
    first = make_spool()
    with pytest.raises(SpoolLocked, match="another process"):
        make_spool()
    first.close()
    make_spool()


# --- ids and reads ----------------------------------------------------------------------------------------

BAD_IDS = ["../../etc/passwd", "..", "", "AB" * 16, "ab" * 15, "ab" * 17, "ab" * 15 + "a/", "ab" * 16 + "\n",
           "g" * 32, None, 12, ["ab" * 16], "00000000000000000000-" + "ab" * 16]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_are_only_ever_the_exact_format(make_spool, bad):
    spool = make_spool()
    spool.accept(METADATA, [MESSAGE])
    with pytest.raises(ValueError):
        validate_id(bad)
    for call in (lambda: spool.read(bad, 0, 10), lambda: spool.size(bad), lambda: spool.delete(bad)):
        with pytest.raises(ValueError):
            call()
    if bad is not None:  # `after` may be None: "from the start"
        with pytest.raises(ValueError):
            spool.list(after=bad)
        with pytest.raises(ValueError):
            run(spool.wait_for_mail(bad, 0))
    assert spool.stats().depth == 1


def test_an_unknown_id_is_not_found(make_spool):
    spool = make_spool()
    unknown = "ab" * 16
    for call in (lambda: spool.read(unknown, 0, 10), lambda: spool.size(unknown), lambda: spool.delete(unknown)):
        with pytest.raises(NotFound):
            call()


def test_reads_in_pieces_make_up_the_file(make_spool):
    spool = make_spool()
    spool_id = spool.accept(METADATA, [os.urandom(300_000)])
    [name] = queue_names(spool)
    sealed = (spool.queue_dir / name).read_bytes()
    size = spool.size(spool_id)
    assert b"".join(spool.read(spool_id, offset, 65_000) for offset in range(0, size, 65_000)) == sealed
    assert spool.read(spool_id, size - 3, 100) == sealed[-3:]
    assert spool.read(spool_id, size, 100) == b""
    with pytest.raises(ValueError, match="past the end"):
        spool.read(spool_id, size + 1, 1)
    with pytest.raises(ValueError):
        spool.read(spool_id, -1, 1)


# --- order, delete, stats ----------------------------------------------------------------------------------

def test_list_is_in_order_of_acceptance_whatever_the_clock_does(make_spool):
    clock = Clock()
    spool = make_spool(clock=clock)
    ids = []
    for step in [0, 0, -5, 3600, -7200, 0, 0.000001]:
        clock.now += step
        ids.append(spool.accept(METADATA, [MESSAGE]))
    assert [e.id for e in spool.list()] == ids
    assert [name.split("-")[1] for name in queue_names(spool)] == ids
    accepted = [e.accepted for e in spool.list()]
    assert accepted == sorted(accepted) and len(set(accepted)) == len(accepted)
    assert [e.id for e in spool.list(after=ids[2])] == ids[3:]
    assert [e.id for e in spool.list(after=ids[2], limit=2)] == ids[3:5]
    assert [e.id for e in spool.list(limit=1)] == ids[:1]
    assert spool.list(after=ids[-1]) == []
    spool.delete(ids[2])
    assert [e.id for e in spool.list(after=ids[2])] == ids[3:]  # an acknowledged id keeps its place
    spool.close()
    clock.now -= 86400  # a restart with the clock a day behind still appends
    again = make_spool(clock=clock)
    later = again.accept(METADATA, [MESSAGE])
    assert [e.id for e in again.list()] == ids[:2] + ids[3:] + [later]


def test_delete_removes_the_file_durably(make_spool, monkeypatch):
    spool = make_spool()
    first, second = spool.accept(METADATA, [MESSAGE]), spool.accept(METADATA, [MESSAGE * 2])
    events = []
    real_fsync, real_unlink = os.fsync, os.unlink
    monkeypatch.setattr(os, "unlink", lambda path: (events.append(("unlink", str(path))), real_unlink(path)))
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", fd_path(fd))), real_fsync(fd)))
    name = next(n for n in queue_names(spool) if n.endswith(first))
    spool.delete(first)
    assert events == [("unlink", str(spool.queue_dir / name)), ("fsync", str(spool.queue_dir))]
    assert [e.id for e in spool.list()] == [second] and not (spool.queue_dir / name).exists()
    assert spool.stats().bytes == spool.size(second)
    with pytest.raises(NotFound):
        spool.delete(first)


def test_stats_count_depth_bytes_and_the_oldest_age(make_spool):
    clock = Clock()
    spool = make_spool(clock=clock)
    assert spool.stats().depth == 0 and spool.stats().oldest_age == 0.0
    first = spool.accept(METADATA, [MESSAGE])
    clock.now += 30
    second = spool.accept(METADATA, [MESSAGE * 3])
    clock.now += 90
    stats = spool.stats()
    assert stats.depth == 2 and stats.accepted == 2
    assert stats.bytes == sum((spool.queue_dir / n).stat().st_size for n in queue_names(spool))
    assert stats.oldest_age == pytest.approx(120)
    spool.delete(first)
    assert spool.stats().oldest_age == pytest.approx(90)
    spool.delete(second)
    assert spool.stats().depth == 0 and spool.stats().bytes == 0 and spool.stats().oldest_age == 0.0


# --- waiting for mail --------------------------------------------------------------------------------------

def test_wait_for_mail_wakes_on_an_accept_from_another_thread(make_spool):
    spool = make_spool()

    async def main():
        waiter = asyncio.ensure_future(spool.wait_for_mail(None, TIMEOUT))
        await asyncio.sleep(0)
        assert not waiter.done()
        spool_id = await asyncio.to_thread(spool.accept, METADATA, [MESSAGE])
        assert await asyncio.wait_for(waiter, TIMEOUT) is True
        # Nothing newer than the newest: times out (False), then wakes for the next one.
        assert await spool.wait_for_mail(spool_id, 0.05) is False
        waiter = asyncio.ensure_future(spool.wait_for_mail(spool_id, TIMEOUT))
        await asyncio.sleep(0)
        newer = await asyncio.to_thread(spool.accept, METADATA, [MESSAGE])
        assert await asyncio.wait_for(waiter, TIMEOUT) is True
        return spool_id, newer

    first, newer = run(main())
    assert [e.id for e in spool.list(after=first)] == [newer]


def test_wait_for_mail_answers_at_once_when_mail_is_there(make_spool):
    spool = make_spool()
    first = spool.accept(METADATA, [MESSAGE])
    second = spool.accept(METADATA, [MESSAGE])

    async def main():
        assert await spool.wait_for_mail(None, TIMEOUT) is True
        assert await spool.wait_for_mail(first, TIMEOUT) is True
        assert await spool.wait_for_mail(second, 0) is False
        assert await spool.wait_for_mail("ef" * 16, TIMEOUT) is True  # unknown: older than everything
        spool.delete(second)
        assert await spool.wait_for_mail(second, 0.01) is False  # acknowledged, still knows its place
        spool.delete(first)
        assert await spool.wait_for_mail(None, 0.01) is False

    run(main())


def test_a_cancelled_wait_leaves_no_waiter_behind(make_spool):
    spool = make_spool()

    async def main():
        waiter = asyncio.ensure_future(spool.wait_for_mail(None, TIMEOUT))
        await asyncio.sleep(0)
        assert len(spool._waiters) == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert not spool._waiters

    run(main())


def test_acknowledged_ids_are_remembered_only_so_far(make_spool, monkeypatch):
    monkeypatch.setattr(store_module, "REMEMBER_DELETED", 2)
    spool = make_spool()
    ids = [spool.accept(METADATA, [MESSAGE]) for _ in range(5)]
    for spool_id in ids[1:]:
        spool.delete(spool_id)
    # ids[3] and ids[4] keep their place; ids[1] is forgotten and counts as older than everything.
    assert spool.list(after=ids[3]) == []
    assert [e.id for e in spool.list(after=ids[1])] == [ids[0]]
    assert len(spool._deleted) == 2
