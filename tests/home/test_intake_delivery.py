"""Issue 5, must show: mail the edge accepted while home was away is delivered when the intake starts.

Real parts end to end: smtplib over STARTTLS to `yestls edge serve` (keyless
TLS through the oracle), the sealed spool, `yestls intake serve`, Dovecot's
LMTP, and imaplib reading the mailbox back. What arrives is, byte for byte,
what was sent under exactly the trace headers added on the way; in order of
acceptance; once per recipient; and the edge's spool is empty afterwards.
The edge seals to a key made by `yestls keys spool-new`.
"""

import dataclasses
import json
import os
import random
import re
import stat
import subprocess
import sys
import time

import pytest

from relay.home.ledger import DELIVERED, DONE
from relay.spool.keys import DEFAULT_SUITE, load_spool_private_key, parse_spool_public_key
from relay.spool.sealed import DEFAULT_CHUNK_SIZE

from ..edge_site import make_edge_site
from ..home_site import EDGE
from ..intake_mail import (
    MX_NAME,
    SENDER,
    USER,
    by_spool_id,
    delivered_order,
    mail_world,
    message,
    split_trace,
    wait_for,
)

SECOND = "second@example.org"
BIG = 2 * 1024 * 1024


def spool_new(path) -> str:
    """`yestls keys spool-new --out PATH` as an operator runs it; its output."""
    result = subprocess.run([sys.executable, "-m", "relay.cli", "keys", "spool-new", "--out", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def cli_key(tmp_path_factory):
    path = tmp_path_factory.mktemp("spool-key") / "spool.key"
    return path, spool_new(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, pki, cli_key):
    """The edge seals to the key `yestls keys spool-new` printed; the intake opens with the file it wrote."""
    directory = tmp_path_factory.mktemp("delivery")
    site = make_edge_site(directory / "site", pki)
    key_path, printed = cli_key
    config = site.config.read_text()
    config, replaced = re.subn(r'(?m)^public_key = ".*"$', f'public_key = "{printed.strip()}"', config)
    assert replaced == 1
    site.config.write_text(config)
    site = dataclasses.replace(site, spool_key_path=key_path)
    with mail_world(directory, pki, (USER, SECOND), site=site) as world:
        yield world


def test_spool_new_prints_the_public_key_line_and_keeps_the_private_key_private(cli_key):
    key_path, printed = cli_key
    line = printed.strip()
    assert printed == line + "\n", "exactly one line, to paste into the edge's [spool] public_key"
    assert line.startswith(f"{DEFAULT_SUITE}:")
    public = parse_spool_public_key(line)
    assert public.suite.name == DEFAULT_SUITE
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert load_spool_private_key(key_path).public_key == public, "the printed key is the file's public half"
    # Never overwritten: a second run on the same file fails and leaves the key as it was.
    before = key_path.read_bytes()
    again = subprocess.run([sys.executable, "-m", "relay.cli", "keys", "spool-new", "--out", str(key_path)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0
    assert key_path.read_bytes() == before


def _messages() -> list[tuple[list[str], tuple[str, ...], bytes]]:
    """(recipients, MAIL options, message): the cases the bytes must survive."""
    rng = random.Random(5)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    lines = []
    size = 0
    while size < BIG:
        line = bytes(rng.choice(alphabet) for _ in range(76)) + b"\r\n"
        lines.append(line)
        size += len(line)
    big_body = b"".join(lines)
    utf8 = ("From: Zoë <zoe@sender.example.net>\r\nTo: <user@example.org>\r\n"
            "Subject: Grüße aus Köln — 日本語 📬\r\nDate: Sun, 29 Nov 2026 12:00:00 +0000\r\n"
            "Message-ID: <utf8@sender.example.net>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            "Ünïcödé body: ça va? Ελληνικά, русский, 中文, emoji 🎉\r\n\xa0non-breaking\r\n").encode()
    return [
        ([USER], (), message("plain first")),
        ([USER], (), message("dots", b".a line starting with a dot\r\n.\r\n..two dots\r\nend\r\n. \r\n")),
        ([USER], ("SMTPUTF8", "BODY=8BITMIME"), utf8),
        ([USER], (), message("two megabytes", big_body)),
        # Two recipients, one of them named twice: still one copy each.
        ([USER, SECOND, USER], (), message("two recipients", b"One copy each, please.\r\n", to=SECOND)),
    ]


def _same_apart_from_trace(delivered: bytes, sent: bytes, spool_id: str, *, shared: bool = False) -> None:
    trace, rest = split_trace(delivered, shared=shared)
    assert rest == sent
    assert trace[-5] == f"X-YesTLS-Spool-Id: {spool_id}\r\n".encode()
    assert trace[-4].startswith(f"Authentication-Results: {MX_NAME};".encode())
    assert trace[-2] == b"X-Spam: No\r\n"
    edge_received = trace[-1].decode()
    assert edge_received.startswith("Received: from sender.example.net ([127.0.0.1])\r\n\tby mx.example.org (YesTLS)")
    assert "ESMTPS" in edge_received or "UTF8SMTPS" in edge_received


def test_mail_queued_while_home_was_away_is_delivered_in_order_and_unchanged(world):
    cases = _messages()
    assert world.site.spooled_files() == []
    ids = [world.send(SENDER, recipients, body, options=options) for recipients, options, body in cases]
    assert world.spooled_ids() == ids, "the edge queues in order of acceptance"
    big_file = world.site.spooled_files()[3]
    assert big_file.stat().st_size > 30 * DEFAULT_CHUNK_SIZE, "the 2 MB message spans many spool chunks"

    started = time.time()
    with world.intake_running() as intake:
        inbox = world.wait_for_mailbox(USER, len(cases), intake)
        second = world.wait_for_mailbox(SECOND, 1, intake)
        world.wait_for_empty_spool(intake)

        # In order of acceptance (the intake's log), each once, and nothing else.
        assert delivered_order(intake.log()) == ids
        delivered = by_spool_id(inbox)
        assert sorted(delivered) == sorted(ids)
        for spool_id, (recipients, _, sent) in zip(ids, cases):
            _same_apart_from_trace(delivered[spool_id], sent, spool_id, shared=len(recipients) > 1)
        assert len(second) == 1
        _same_apart_from_trace(second[0], cases[4][2], ids[4], shared=True)
        assert "for <" not in split_trace(second[0], shared=True)[0][-1].decode(), \
            "the edge's Received for two recipients names neither"

        # The ledger recorded them in the same order, each done, each recipient delivered, each acknowledged.
        assert world.ledger_order() == ids
        for spool_id, (recipients, _, _) in zip(ids, cases):
            entry = wait_for(lambda s=spool_id: (e := world.ledger_entry(s)) and e.acked and e,
                             f"the ledger to record {spool_id} acknowledged")
            assert entry.state == DONE
            assert {r: info.status for r, info in entry.recipients.items()} == dict.fromkeys(recipients, DELIVERED)

        # Mail that arrives while home is online comes in too (the long-poll wakes the intake).
        later = message("while online")
        later_id = world.send(SENDER, [USER], later)
        inbox = world.wait_for_mailbox(USER, len(cases) + 1, intake)
        assert delivered_order(intake.log()) == ids + [later_id]
        delivered = by_spool_id(inbox)
        assert sorted(delivered) == sorted(ids + [later_id])
        _same_apart_from_trace(delivered[later_id], later, later_id)
        world.wait_for_empty_spool(intake)

        # The status file `yestls status` reads: counts, and when the edge was last heard from.
        def status() -> dict | None:
            try:
                current = json.loads(world.intake.status_file.read_text())
            except (FileNotFoundError, ValueError):
                return None
            return current if current["delivered"] == len(cases) + 2 and current["edges"][EDGE]["depth"] == 0 else None

        reported = wait_for(status, "the status file to report every delivery and an empty edge spool",
                            details=lambda: world.intake.status_file.read_text())
        assert reported["pulled"] == len(cases) + 1
        assert reported["quarantined"] == 0 and reported["failed"] == 0
        assert started <= reported["edges"][EDGE]["last_contact"] <= time.time()
        assert reported["edges"][EDGE]["connected"] is True
        assert reported["ledger"] == {DONE: len(cases) + 1}
        assert "ERROR" not in intake.log() and "Traceback" not in intake.log()
