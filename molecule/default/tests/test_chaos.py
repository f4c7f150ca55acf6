"""Whole-path faults, CI size (tests/chaos.py, tests/faults.py; `make chaos` is the full size).

A few dozen messages from Postfix on `internet`, some of them to several
mailboxes and some of a few hundred KB to 1.5 MB, while every kind of fault
(faults.Fault) hits once, in an order and for durations chosen from a seed:
YESTLS_CHAOS_SEED, or a new one, printed first. Then every message must be
in each of its mailboxes exactly once, and nothing left anywhere on the way.

Also on their own: the edge's spool on a full filesystem defers mail with
452 4.3.1 (never a 250 for what it could not store; the second edge is
stopped meanwhile, else Postfix would take MX 20), and Dovecot's mail store on a full
filesystem makes the intake retry with the message left on the edge (nothing
acknowledged early); in both the mail arrives once there is room.

Marked `chaos`: runs after the other tests (conftest.py), before `rebuild`;
every fault is ended in a `finally`, so the scenario is as converge left it.
"""

from __future__ import annotations

import os
import random
import time
import uuid

import chaos
import faults
import pytest
from mailpath import wait_until_sent
from scenario import container, wait_for

pytestmark = pytest.mark.chaos

MESSAGES = 36
MAX_SIZE = 1_500_000
SETTLE_TIMEOUT = 360   # seconds: the intake retries a deferred LMTP delivery after 60 s, then 300 s
FULL_DISK_LOG: list[str] = []   # the primary edge's journal while its spool disk was full


def test_mail_survives_every_kind_of_fault():
    seed = int(os.environ.get("YESTLS_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"chaos seed {seed} (replay: YESTLS_CHAOS_SEED={seed})", flush=True)
    report = chaos.run(seed, MESSAGES, faults=len(faults.Fault), max_size=MAX_SIZE, settle_timeout=SETTLE_TIMEOUT)
    print(report.summary())
    assert set(report.faults) == set(faults.Fault), f"not every fault was injected: {report.faults}"
    assert len(report.sent) == MESSAGES
    assert report.problems == [], report.summary()
    assert report.delivered == sum(len(m.mailboxes) for m in report.sent)


def one_message(kind: str) -> tuple[float, chaos.Report, chaos.Message, faults.Faults]:
    """A run of one 200 kB message, and a fault injector, for a test of one fault."""
    start = time.monotonic()
    report = chaos.Report(0, f"{kind}-{uuid.uuid4().hex[:12]}")
    message = chaos.Message(report.run, 0, *chaos.recipient_choices()[0], size=200_000)
    return start, report, message, faults.Faults(random.Random(0), start)


def delivered_once_after(start: float, report: chaos.Report, timeout: float) -> None:
    """Once the fault is gone: the message in its mailboxes exactly once, nothing left anywhere."""
    chaos.settle(start, report, timeout=timeout)
    chaos.check(start, report)
    print(report.summary())
    assert report.problems == []
    assert report.delivered == 1


def test_a_full_spool_disk_defers_and_loses_nothing():
    start, report, message, injector = one_message("disk")
    # The second edge stopped: the message has nowhere else to go while the primary is full. Postfix logs only
    # the last MX's error (mx2's refusal), so the primary's answer is read from the primary's own journal.
    second = container("edge2")
    second.check_output(f"systemctl stop {faults.EDGE_UNIT}")
    since = int(time.time())
    try:
        faults.log(start, injector.fill_edge_spool(room_kib=16))
        chaos.submit(message)
        report.sent.append(message)

        def refused_for_room() -> list[str]:
            chaos.flush_postfix()
            journal = container("edge").check_output(
                f"journalctl -u {faults.EDGE_UNIT} -o cat --no-pager --since @{since}").splitlines()
            return journal if any("spool full (disk)" in line for line in journal) else []

        journal = wait_for(refused_for_room, timeout=180, interval=5)
        FULL_DISK_LOG.extend(journal or [])
        assert journal, f"the edge did not refuse the message for want of room: {chaos.postfix_outcomes(report.run)}"
        assert not chaos.postfix_outcomes(report.run)["sent"], "the edge took a message it had no room for"
    finally:
        injector.restore()
        second.check_output(f"systemctl start {faults.EDGE_UNIT}")
    chaos.flush_postfix()
    delivered_once_after(start, report, timeout=180)


def test_a_full_spool_disk_is_a_full_spool_not_an_internal_error():
    """SpoolFull("disk"), answered 452 4.3.1 (the reply itself: tests/spool/test_spool_disk_full.py), not the
    451 4.3.0 of a sealing failure, which logs "cannot start sealing" or "sealing failed"."""
    assert FULL_DISK_LOG, "test_a_full_spool_disk_defers_and_loses_nothing saw no refusal"
    assert [line for line in FULL_DISK_LOG if "spool full (disk)" in line]
    assert [line for line in FULL_DISK_LOG if "sealing failed" in line or "cannot start sealing" in line] == []


def test_a_full_mail_store_at_home_is_retried_and_acknowledged_only_after():
    start, report, message, injector = one_message("store")
    try:
        faults.log(start, injector.fill_mail_store(room_kib=16))
        chaos.submit(message)
        report.sent.append(message)
        spool_id = wait_until_sent(message.marker, timeout=120).spool_id
        deferred = wait_for(lambda: [line for line in chaos.intake_lines(spool_id) if " deferred: 4" in line],
                            timeout=120, interval=2)
        print("\n".join(chaos.intake_lines(spool_id)))
        assert deferred, f"the intake did not report Dovecot's temporary failure for {spool_id}"
        assert any(spool_id in path for path in chaos.spool_contents()), "acknowledged before it was delivered"
        assert chaos.ledger_states().get("delivering"), "no ledger row waits for the retry"
    finally:
        injector.restore()
    delivered_once_after(start, report, timeout=240)
