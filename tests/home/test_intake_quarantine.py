"""Issue 5, must show: a tampered sealed file is quarantined, not delivered, and the next messages still flow.

The test plays someone with the edge's disk: with the edge and the intake
stopped it alters files in the spool's queue/ (one byte flipped, cut inside
the last chunk, cut exactly at a chunk boundary, two chunks swapped, a good
file copied under another spool id), starts the edge again and then the
intake. Each altered file must land, byte for byte as it was on the edge, in
home's quarantine directory, with a log line naming it; nothing of it reaches
the mailbox; it is acknowledged so the edge's spool empties; the good
messages around it are delivered in order.
"""

import json
import os
import re
import shutil

import pytest

from relay.home.ledger import QUARANTINED
from relay.spool.sealed import HEADER, KEY_BLOCK_PLAINTEXT, SealedError, key_block_length, read_header, unseal

from ..home_site import EDGE
from ..intake_mail import (
    SENDER,
    USER,
    by_spool_id,
    delivered_order,
    mail_world,
    message,
    split_trace,
    wait_for,
)

BIG_BODY = b"".join(b"line %06d of a message that spans several spool chunks\r\n" % i for i in range(4000))


@pytest.fixture(scope="module")
def world(tmp_path_factory, pki):
    with mail_world(tmp_path_factory.mktemp("quarantine"), pki) as world:
        yield world


def chunk_layout(sealed: bytes, private_key) -> tuple[int, int]:
    """Where the chunks start and how long a full one is, read (as home can) from the header and key block."""
    header = read_header(sealed)
    start = HEADER.size + key_block_length(header.suite)
    opened = header.suite.hpke.decrypt(sealed[HEADER.size:start], private_key.key, info=sealed[:HEADER.size])
    _, chunk_size = KEY_BLOCK_PLAINTEXT.unpack(opened)
    return start, chunk_size + 16


def flip_a_byte(sealed: bytes, start: int, full: int) -> bytes:
    position = start + (len(sealed) - start) // 2
    return sealed[:position] + bytes([sealed[position] ^ 0x01]) + sealed[position + 1:]


def cut_inside_last_chunk(sealed: bytes, start: int, full: int) -> bytes:
    return sealed[:-100]


def cut_at_chunk_boundary(sealed: bytes, start: int, full: int) -> bytes:
    assert len(sealed) > start + 3 * full
    return sealed[:start + 2 * full]


def swap_first_two_chunks(sealed: bytes, start: int, full: int) -> bytes:
    assert len(sealed) > start + 2 * full
    first, second = sealed[start:start + full], sealed[start + full:start + 2 * full]
    return sealed[:start] + second + first + sealed[start + 2 * full:]


TAMPERING = {  # subject -> (body, what is done to its sealed file)
    "flipped": (b"One bit of this file will be flipped.\r\n", flip_a_byte),
    "cut short": (b"The end of this file will be cut off.\r\n", cut_inside_last_chunk),
    "cut at a boundary": (BIG_BODY, cut_at_chunk_boundary),
    "reordered": (BIG_BODY, swap_first_two_chunks),
}


def test_tampered_files_are_quarantined_sealed_and_the_queue_flows(world):
    private_key = world.site.spool_private_key
    first = message("good before")
    first_id = world.send(SENDER, [USER], first)
    victims = {world.send(SENDER, [USER], message(subject, body)): subject for subject, (body, _) in TAMPERING.items()}
    last = message("good after")
    last_id = world.send(SENDER, [USER], last)

    # Home is away and someone with the edge's disk goes to work.
    world.stop_edge()
    queue = world.site.spool_dir / "queue"
    files = {path.name.split("-", 1)[1]: path for path in world.site.spooled_files()}
    on_the_edge = {}
    for spool_id, subject in victims.items():
        sealed = files[spool_id].read_bytes()
        tampered = TAMPERING[subject][1](sealed, *chunk_layout(sealed, private_key))
        with pytest.raises(SealedError):
            unseal(tampered, private_key)
        files[spool_id].write_bytes(tampered)
        on_the_edge[spool_id] = tampered
    # A good file copied under another spool id: it opens, but it is not the message that id names.
    copy_id = os.urandom(16).hex()
    order = int(files[first_id].name.split("-", 1)[0]) + 1
    shutil.copyfile(files[first_id], queue / f"{order:020d}-{copy_id}")
    on_the_edge[copy_id] = files[first_id].read_bytes()
    assert unseal(on_the_edge[copy_id], private_key).spool_id.hex() == first_id
    world.start_edge()
    assert len(world.site.spooled_files()) == 2 + len(victims) + 1

    with world.intake_running() as intake:
        world.wait_for_empty_spool(intake)
        inbox = world.wait_for_mailbox(USER, 2, intake)

        # Only the good ones, in order, unchanged; the copy did not deliver the first message twice.
        assert delivered_order(intake.log()) == [first_id, last_id]
        delivered = by_spool_id(inbox)
        assert sorted(delivered) == sorted([first_id, last_id])
        assert split_trace(delivered[first_id])[1] == first and split_trace(delivered[last_id])[1] == last

        # Every altered file is at home, still sealed, exactly as it was on the edge.
        assert [p.name for p in world.intake.quarantine.iterdir()] == [EDGE], "a directory per edge"
        quarantine = world.intake.quarantine / EDGE
        assert sorted(p.name for p in quarantine.iterdir()) == sorted(f"{i}.sealed" for i in on_the_edge)
        for spool_id, sealed in on_the_edge.items():
            assert (quarantine / f"{spool_id}.sealed").read_bytes() == sealed, spool_id

        # ... each named in a clear log line, recorded in the ledger, and acknowledged.
        log = intake.log()
        for spool_id in on_the_edge:
            lines = [line for line in log.splitlines() if spool_id in line and "QUARANTINED" in line]
            assert len(lines) == 1, f"{spool_id}: {lines}\n{log}"
            assert "not delivered" in lines[0] and str(quarantine / f"{spool_id}.sealed") in lines[0]
            assert " ERROR " in lines[0]
            entry = wait_for(lambda s=spool_id: (e := world.ledger_entry(s)) and e.acked and e,
                             f"{spool_id} acknowledged in the ledger")
            assert entry.state == QUARANTINED
        copy_line = next(line for line in log.splitlines() if copy_id in line and "QUARANTINED" in line)
        assert re.search(rf"{first_id}\b.*\bnot {copy_id}", copy_line), copy_line

        # The queue keeps flowing after the quarantine.
        later = message("good later")
        later_id = world.send(SENDER, [USER], later)
        inbox = world.wait_for_mailbox(USER, 3, intake)
        assert delivered_order(intake.log()) == [first_id, last_id, later_id]
        assert sorted(by_spool_id(inbox)) == sorted([first_id, last_id, later_id])
        world.wait_for_empty_spool(intake)

        def reported():
            try:
                status = json.loads(world.intake.status_file.read_text())
            except (FileNotFoundError, ValueError):
                return None
            return status if status["delivered"] == 3 else None

        status = wait_for(reported, "the status file to count the deliveries",
                          details=lambda: world.intake.status_file.read_text())
        assert status["quarantined"] == len(on_the_edge)
        assert status["ledger"].get(QUARANTINED) == len(on_the_edge)

    # Nothing of the altered messages reached the mailbox.
    subjects = b"".join(world.mailbox(USER))
    for subject in TAMPERING:
        assert f"Subject: {subject}\r\n".encode() not in subjects
