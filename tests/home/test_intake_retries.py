"""Issue 5, must show: LMTP temporary failures are retried until they succeed; a permanent one blocks no one.

Against a real Dovecot: stopped while mail arrives, then started (the mail
comes in once); a mailbox over quota (4xx, quota_full_tempfail) whose quota is
then raised (delivered then, and the edge kept the message until it was); an
unknown user (5xx) next to a real one (the real one gets it, the failure is
in the ledger, the message is acknowledged), also when Dovecot was down at
the first attempt so that both recipients were left in doubt. And the crash
window the ledger cannot close alone: Dovecot accepted the message but the
intake died before recording it; the restarted intake finds it (doveadm
search on the spool-id header) instead of delivering it again.
"""

import json
import smtplib
import time

import pytest

from relay.home import config as intake_config
from relay.home.intake import Intake
from relay.home.ledger import DELIVERED, DELIVERING, DONE, FAILED, IN_DOUBT, PENDING, Entry, Ledger, Recipient
from relay.spool.sealed import unseal

from ..home_site import EDGE
from ..intake_mail import SENDER, USER, mail_world, message, split_trace, spool_id_of, wait_for

FULL = "full@example.org"        # a 1 KiB quota until a test raises it
UNKNOWN = "nobody@example.org"   # our domain, so the edge takes it; Dovecot has no such user


@pytest.fixture(scope="module")
def world(tmp_path_factory, pki):
    with mail_world(tmp_path_factory.mktemp("retries"), pki, (USER, FULL), quota="1k") as world:
        set_quota(world, USER, "100M")
        yield world


def set_quota(world, user: str, storage: str) -> None:
    """Give `user` its own storage quota (a userdb field Dovecot's passwd-file picks up without a restart)."""
    users = world.dovecot.directory / "users"
    lines = []
    for line in users.read_text().splitlines():
        if line.startswith(f"{user}:"):
            line = line.split("::::::")[0] + f"::::::userdb_quota_rule=*:storage={storage}"
        lines.append(line)
    users.write_text("\n".join(lines) + "\n")


def copies(world, user: str, spool_id: str) -> list[bytes]:
    return [m for m in world.mailbox(user) if spool_id_of(m) == spool_id]


def attempts(world, spool_id: str, recipient: str) -> int:
    entry = world.ledger_entry(spool_id)
    return entry.recipients[recipient].attempts if entry else 0


def retried(world) -> int:
    """The intake's count of retries scheduled, from its status file."""
    try:
        return json.loads(world.intake.status_file.read_text())["retried"]
    except (FileNotFoundError, ValueError):
        return 0


def test_dovecot_down_while_mail_arrives_then_back(world):
    with world.intake_running() as intake:
        world.dovecot.stop()
        try:
            sent = message("while dovecot is down")
            spool_id = world.send(SENDER, [USER], sent)
            wait_for(lambda: f"{spool_id}: LMTP failed" in intake.log(), "a failed LMTP attempt",
                     details=lambda: world.logs(intake))
            wait_for(lambda: retried(world) >= 2, "the intake to keep retrying", details=lambda: world.logs(intake))
            entry = world.ledger_entry(spool_id)
            assert entry.state == DELIVERING and not entry.acked
            assert spool_id in world.spooled_ids(), "kept on the edge until Dovecot has it"
        finally:
            if world.dovecot.process is None:
                world.dovecot.start()
        world.wait_for_acknowledged(spool_id, process=intake)
        (got,) = wait_for(lambda: copies(world, USER, spool_id), "the message in the mailbox",
                          details=lambda: world.logs(intake))
        assert split_trace(got)[1] == sent
        entry = world.ledger_entry(spool_id)
        assert entry.state == DONE and entry.recipients[USER].status == DELIVERED
    assert len(copies(world, USER, spool_id)) == 1


def test_dovecot_down_then_back_with_an_unknown_recipient_in_the_message(world):
    """The failed attempt leaves both recipients in doubt; asking Dovecot about one it does not know
    must not hold the message (and the real recipient) back for ever."""
    sent = message("to one real and one unknown, while dovecot is down")
    with world.intake_running() as intake:
        world.dovecot.stop()
        try:
            spool_id = world.send(SENDER, [USER, UNKNOWN], sent)
            wait_for(lambda: f"{spool_id}: LMTP failed" in intake.log(), "a failed LMTP attempt",
                     details=lambda: world.logs(intake))
        finally:
            if world.dovecot.process is None:
                world.dovecot.start()
        wait_for(lambda: copies(world, USER, spool_id), "the message for the real user", timeout=20,
                 details=lambda: world.logs(intake))
        world.wait_for_acknowledged(spool_id, process=intake)
        entry = world.ledger_entry(spool_id)
        assert entry.state == DONE
        assert entry.recipients[USER].status == DELIVERED
        assert entry.recipients[UNKNOWN].status == FAILED
    assert len(copies(world, USER, spool_id)) == 1


def test_over_quota_is_retried_until_the_quota_is_raised(world):
    big = message("too big for a 1k quota", (b"x" * 70 + b"\r\n") * 40, to=FULL)
    with world.intake_running() as intake:
        big_id = world.send(SENDER, [USER, FULL], big)
        wait_for(lambda: attempts(world, big_id, FULL) >= 2, f"{FULL} deferred twice",
                 details=lambda: world.logs(intake))
        entry = world.ledger_entry(big_id)
        assert entry.recipients[FULL].status in (PENDING, IN_DOUBT)
        assert entry.recipients[FULL].reply.startswith("452 4.2.2")
        assert entry.recipients[USER].status == DELIVERED and entry.recipients[USER].attempts == 1
        assert big_id in world.spooled_ids(), "kept on the edge while a recipient has no final answer"
        assert f"{FULL} deferred: 452" in intake.log()

        # A deferred message does not hold up the next one.
        small = message("after the deferred one")
        small_id = world.send(SENDER, [USER], small)
        wait_for(lambda: copies(world, USER, small_id), "the next message", details=lambda: world.logs(intake))
        assert copies(world, FULL, big_id) == []

        set_quota(world, FULL, "10M")
        (got,) = wait_for(lambda: copies(world, FULL, big_id), f"the message for {FULL} after the quota was raised",
                          details=lambda: world.logs(intake))
        assert split_trace(got)[1] == big  # the retry went to the deferred recipient alone
        world.wait_for_acknowledged(big_id, small_id, process=intake)
        entry = world.ledger_entry(big_id)
        assert entry.state == DONE
        assert {r: info.status for r, info in entry.recipients.items()} == {USER: DELIVERED, FULL: DELIVERED}
    # The recipient that took it at once was not given it again by the retries.
    assert len(copies(world, USER, big_id)) == 1
    assert len(copies(world, FULL, big_id)) == 1


def test_permanent_failure_for_one_recipient_does_not_block_the_others(world):
    sent = message("one of us does not exist")
    with world.intake_running() as intake:
        spool_id = world.send(SENDER, [UNKNOWN, USER], sent)
        world.wait_for_acknowledged(spool_id, process=intake)
        (got,) = wait_for(lambda: copies(world, USER, spool_id), "the message for the real user",
                          details=lambda: world.logs(intake))
        # Dovecot refused the unknown user at RCPT: the DATA went to one recipient only.
        assert split_trace(got)[1] == sent
        entry = wait_for(lambda: (e := world.ledger_entry(spool_id)) and e.acked and e, "the acknowledgement")
        assert entry.state == DONE
        assert entry.recipients[USER].status == DELIVERED
        assert entry.recipients[UNKNOWN].status == FAILED
        assert entry.recipients[UNKNOWN].reply.startswith("550 5.1.1")
        assert entry.recipients[UNKNOWN].attempts == 1, "a permanent failure is not retried"
        assert f"{spool_id}: {UNKNOWN} refused permanently: 550" in intake.log()
    assert len(copies(world, USER, spool_id)) == 1


def test_a_delivery_hidden_by_a_crash_is_found_not_repeated(world):
    """Crash windows, recreated by hand with the intake stopped, then the intake started.

    - in doubt, delivered: Dovecot said 250 but the intake died before the ledger recorded it;
    - in doubt, not delivered: the intake marked it and died before Dovecot had it;
    - done, not acknowledged: the intake died between the ledger's `done` and the ack.
    """
    private_key = world.site.spool_private_key
    delivered_id = world.send(SENDER, [USER], message("in doubt and delivered"))
    missing_id = world.send(SENDER, [USER], message("in doubt and not delivered"))
    done_id = world.send(SENDER, [USER], message("done but not acknowledged"))
    files = {path.name.split("-", 1)[1]: path for path in world.site.spooled_files()}
    assert {delivered_id, missing_id, done_id} <= set(files)

    # The earlier intake's delivery: the unsealed message with its spool-id header, straight to Dovecot.
    opened = unseal(files[delivered_id].read_bytes(), private_key)
    earlier = f"X-YesTLS-Spool-Id: {delivered_id}\r\n".encode() + opened.message
    with smtplib.LMTP("127.0.0.1", world.dovecot.lmtp_port, timeout=30) as lmtp:
        lmtp.sendmail(opened.metadata["mail_from"], opened.metadata["rcpt_tos"], earlier)
    ledger = Ledger(world.intake.ledger)
    try:
        for spool_id in (delivered_id, missing_id):
            ledger.edge(EDGE).save(Entry(spool_id, DELIVERING, {USER: Recipient(IN_DOUBT, 1)}))
        ledger.edge(EDGE).save(Entry(done_id, DONE, {USER: Recipient(DELIVERED, 1, "250 2.0.0 Saved")}))
    finally:
        ledger.close()

    with world.intake_running() as intake:
        world.wait_for_acknowledged(delivered_id, missing_id, done_id, process=intake)
        wait_for(lambda: copies(world, USER, missing_id), "the in-doubt message that had not arrived",
                 details=lambda: world.logs(intake))
        log = intake.log()
        assert f"{delivered_id}: already in {USER}'s mailbox" in log
        assert f"{missing_id}: already in" not in log
        for spool_id in (delivered_id, missing_id, done_id):
            entry = wait_for(lambda s=spool_id: (e := world.ledger_entry(s)) and e.acked and e,
                             f"{spool_id} acknowledged")
            assert entry.state == DONE and entry.recipients[USER].status == DELIVERED

    (found,) = copies(world, USER, delivered_id)
    assert found.endswith(earlier), "the one copy is the earlier delivery"
    assert len(copies(world, USER, missing_id)) == 1
    assert copies(world, USER, done_id) == [], "the ledger said done: not delivered again"


def test_the_retry_schedule_survives_a_restart(world):
    """The ledger's next_attempt is read back: a restarted intake keeps each waiting message's backoff
    (and its step) instead of trying every one at once; finished and acknowledged ones are not waiting."""
    later = time.time() + 3600
    ledger = Ledger(world.intake.ledger)
    edge = ledger.edge(EDGE)
    try:
        edge.save(Entry("a1" * 16, DELIVERING, {USER: Recipient(PENDING, attempts=3)}, next_attempt=later))
        edge.save(Entry("b2" * 16, DELIVERING, {USER: Recipient(PENDING, attempts=1)}))   # never failed
        edge.save(Entry("c3" * 16, DONE, {USER: Recipient(DELIVERED, attempts=2)}, next_attempt=later))
        edge.save(Entry("d4" * 16, DELIVERING, {USER: Recipient(PENDING, attempts=2)}, next_attempt=later,
                          acked=True))
    finally:
        ledger.close()
    intake = Intake(intake_config.load(world.intake.config))
    try:
        link = intake.links[EDGE]
        assert link.retry_at.get("a1" * 16) == later and link.failures.get("a1" * 16) == 3
        assert not {"b2" * 16, "c3" * 16, "d4" * 16} & set(link.retry_at)
    finally:
        intake.ledger.close()
