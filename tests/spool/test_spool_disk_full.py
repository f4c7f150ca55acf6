"""A full filesystem under the spool is a full spool: `SpoolFull("disk")` and `452 4.3.1` to the sender, never a
250 for a message that is not on disk, never a half-written file left, and mail flows again when there is room.

The caps (max_bytes, max_files) are far above what the filesystem holds here: only the disk refuses. A real
tmpfs with a size and an inode limit is mounted for each test (root: `make test` runs as root), so every way
the kernel says ENOSPC is the kernel's: a write, the file's creation, the fsync.
"""

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from relay.spool.keys import generate_spool_key, load_spool_private_key, parse_spool_public_key
from relay.spool.sealed import unseal
from relay.spool.store import Spool, SpoolFull

from ..edge_site import make_edge_site, start_edge
from ..edge_smtp import SmtpClient, queued_id, tls_context
from ..oracle_home import run_oracle

METADATA = {"envelope": {"mail_from": "alice@example.net", "rcpt_tos": ["bob@example.org"]}}
SENDER, RECIPIENT = "a@sender.example.net", "user@example.org"


@contextmanager
def small_filesystem(path: Path, size: str, inodes: int = 1000):
    """A tmpfs of `size` mounted at `path` for the block; `resize(size)` gives it more room."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes},mode=0700", "tmpfs",
                              str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {path} ({mounted.stderr.strip()}): these tests need root, as "
                    "`make test` runs")

    def resize(new_size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def keys(tmp_path):
    public = parse_spool_public_key(generate_spool_key(tmp_path / "spool.key", "x25519"))
    return public, load_spool_private_key(tmp_path / "spool.key")


def test_a_message_larger_than_the_free_space_is_refused_and_nothing_is_left(tmp_path, keys):
    with small_filesystem(tmp_path / "fs", "256k") as resize:
        spool = Spool(tmp_path / "fs" / "spool", keys[0], max_bytes=1 << 30, max_files=10_000)
        kept = spool.accept(METADATA, [b"Subject: kept\r\n\r\nsmall\r\n"])
        for big in ([os.urandom(400_000)], (os.urandom(50_000) for _ in range(10))):   # with and without a size
            with pytest.raises(SpoolFull) as full:
                spool.accept(METADATA, big)
            assert full.value.reason == "disk" and "filesystem is full" in str(full.value)
            assert os.listdir(spool.tmp_dir) == [], "the refused message's file is gone"
        assert [entry.id for entry in spool.list()] == [kept]
        assert spool.stats().full_disk == 2 and spool.stats().full_bytes == 0

        resize("2m")   # room again: the next message is accepted, and the first is intact
        again = spool.accept(METADATA, [os.urandom(400_000)])
        assert [entry.id for entry in spool.list()] == [kept, again]
        sealed = spool.read(kept, 0, spool.size(kept))
        assert unseal(sealed, keys[1]).message == b"Subject: kept\r\n\r\nsmall\r\n"
        spool.close()


def test_no_inode_left_is_a_full_disk_too(tmp_path, keys):
    with small_filesystem(tmp_path / "fs", "4m", inodes=5):
        spool = Spool(tmp_path / "fs" / "spool", keys[0], max_bytes=1 << 30, max_files=10_000)
        accepted, refused = [], []
        for _ in range(5):   # the root, spool/, tmp/, queue/ and the lock took most of the inodes
            try:
                accepted.append(spool.accept(METADATA, [b"x" * 100]))
            except SpoolFull as error:
                refused.append(error.reason)
        assert refused and set(refused) == {"disk"}, (accepted, refused)
        assert [entry.id for entry in spool.list()] == accepted
        assert os.listdir(spool.tmp_dir) == []
        spool.close()


def test_the_edge_answers_452_on_a_full_disk_and_250_once_there_is_room(tmp_path, pki):
    site = make_edge_site(tmp_path / "site", pki)
    message = b"Subject: too big for the disk\r\n\r\n" + os.urandom(300_000).hex().encode() + b"\r\n"
    with small_filesystem(site.spool_dir, "256k") as resize, run_oracle(site.oracle):
        edge = start_edge(site)
        try:
            with SmtpClient.connect(site.smtp_port) as client:
                client.ehlo()
                client.starttls(tls_context(pki))
                client.ehlo()
                reply = client.deliver(SENDER, [RECIPIENT], message)
                assert (reply.code, reply.enhanced) == (452, "4.3.1"), reply
                assert os.listdir(site.spool_dir / "queue") == [] and os.listdir(site.spool_dir / "tmp") == []

                resize("4m")   # room again, in the same session
                spool_id = queued_id(client.deliver(SENDER, [RECIPIENT], message))
                client.expect("QUIT", 221)
            (name,) = os.listdir(site.spool_dir / "queue")
            assert name.endswith(spool_id)
            assert unseal((site.spool_dir / "queue" / name).read_bytes(), site.spool_private_key).message.endswith(
                message)
            log = edge.log()
            assert "spool full (disk)" in log and "Traceback" not in log
        finally:
            edge.stop()
