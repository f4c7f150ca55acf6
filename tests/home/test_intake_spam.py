"""Issue 14: home judges every message with the spam filter before delivery; spam is marked, never bounced.

The real `yestls intake serve` against a spool (tests/hostile_edge.py: it
seals any metadata, as a compromised edge could), a private Dovecot and a
stand-in rspamd (tests/fake_rspamd.py). Filing into Junk is Dovecot's Sieve
on `X-Spam: Yes`, shown in the Molecule scenario; here: the header, the
verdict token, what happens while the filter is broken, and no DSN for spam.
"""

import json
import time

import pytest

from relay.home.spam import parse_answer, seal_verdict
from relay.status import intake_rows

from ..dovecot import run_dovecot
from ..fake_rspamd import GTUBE, JUNK_MARK, Answer, run_fake_rspamd, verdict_json
from ..home_site import make_intake, run_intake
from ..hostile_edge import EDGE_RECEIVED, hostile_edge
from ..intake_mail import MX_NAME, SENDER, USER, header_value, message, split_trace, spool_id_of, wait_for

REFUSER = "nobody@example.org"   # a mailbox Dovecot does not have: LMTP 550, a DSN for ham
KEY = bytes(range(32))


@pytest.fixture
def world(tmp_path):
    with run_fake_rspamd() as rspamd, hostile_edge(tmp_path / "edge") as edge, run_dovecot((USER,)) as dovecot:
        # A relay nobody listens on: DSNs stay in the outbox, where the test counts them.
        intake = make_intake(edge, dovecot, rspamd=rspamd.url,
                             options='bounce_relay = "127.0.0.1:9"\n'
                                     f'outbox = "{tmp_path / "outbox"}"\n')
        (intake.directory / "verdict.key").write_bytes(KEY)
        (intake.directory / "verdict.key").chmod(0o600)
        yield edge, dovecot, intake, rspamd, tmp_path / "outbox"


def seal(edge, subject: str, body: bytes = b"Hello.\r\n", *, rcpt=(USER,), **metadata) -> tuple[str, bytes]:
    sent = EDGE_RECEIVED + message(subject, body)
    return edge.seal({"mail_from": SENDER, "rcpt_tos": list(rcpt), "client_address": "192.0.2.7:41000",
                      "helo": "sender.example.net", "received_at": time.time(), **metadata}, sent), sent


def status(intake) -> dict:
    return json.loads(intake.status_file.read_text()) if intake.status_file.exists() else {}


def shown(intake):
    """`yestls status`'s spam filter row."""
    return {row.item: row for row in intake_rows(intake.config, time.time())}["spam filter"]


def test_spam_and_ham_are_marked_and_both_delivered_and_spam_is_never_bounced(world):
    edge, dovecot, intake, rspamd, outbox = world
    ham_id, _ = seal(edge, "ham")
    spam_id, _ = seal(edge, "gtube", GTUBE + b"\r\n")
    junk_id, _ = seal(edge, "junk", JUNK_MARK + b"\r\n")
    # Spam to a mailbox that does not exist: its sender is likely forged, a DSN would be backscatter.
    spam_refused, _ = seal(edge, "gtube refused", GTUBE + b"\r\n", rcpt=(REFUSER,))
    ham_refused, _ = seal(edge, "ham refused", rcpt=(REFUSER,))
    with run_intake(intake) as process:
        details = lambda: process.log()[-6000:]   # noqa: E731
        inbox = wait_for(lambda: len(m := dovecot.fetch_all(USER)) >= 3 and m, "three messages", details=details)
        wait_for(lambda: edge.spooled_ids() == [], "every message acknowledged", details=details)
        wait_for(lambda: status(intake).get("junked") == 3, "three junked in the status file", details=details)
    by_id = {spool_id_of(m): m for m in inbox}
    assert header_value(by_id[ham_id], "X-Spam") == "No"
    assert header_value(by_id[spam_id], "X-Spam") == "Yes"   # reject after the 250: Junk, not refused
    assert header_value(by_id[junk_id], "X-Spam") == "Yes"
    assert header_value(by_id[ham_id], "Authentication-Results").startswith(f"{MX_NAME}; spf=none")
    assert "[1000.00 / 15.00]" in header_value(by_id[spam_id], "X-Spamd-Result")
    assert status(intake)["judged"] == 5 and status(intake)["unfiltered"] == 0
    assert shown(intake).value == {"judged": 5, "verdicts_kept": 0, "junked": 3, "unfiltered": 0}
    assert shown(intake).text.startswith("junked 3 (to Junk), judged at delivery 5")
    dsns = sorted(p.name for p in outbox.iterdir()) if outbox.exists() else []
    assert len(dsns) == 1 and ham_refused in dsns[0], dsns   # the ham's DSN, none for the spam
    assert spam_refused in process.log() and "no DSN (judged spam)" in process.log()
    # rspamd saw the envelope the edge recorded, and the message without the edge's forged-able fields
    judged = {r.headers["Queue-Id"]: r for r in rspamd.requests}
    assert judged[ham_id].headers["IP"] == "192.0.2.7" and judged[ham_id].headers["Helo"] == "sender.example.net"


def test_a_verdict_home_gave_before_the_250_is_kept_and_a_forged_one_is_not(world):
    edge, dovecot, intake, rspamd, _ = world
    junk = parse_answer(verdict_json("add header", 9.0, {"BAYES_SPAM": 9.0}, MX_NAME, SENDER))
    ham = parse_answer(verdict_json("no action", 0.0, {}, MX_NAME, SENDER))
    body = EDGE_RECEIVED + message("kept")
    kept = edge.seal({"mail_from": SENDER, "rcpt_tos": [USER], "received_at": time.time(),
                      "verdict": {"action": "add header", "token": seal_verdict(KEY, body, junk)}}, body)
    # The edge claims home called GTUBE ham: the token is for another message, so home judges again.
    other = EDGE_RECEIVED + message("other")
    spam = EDGE_RECEIVED + message("forged verdict", GTUBE + b"\r\n")
    forged = edge.seal({"mail_from": SENDER, "rcpt_tos": [USER], "received_at": time.time(),
                        "verdict": {"action": "no action", "token": seal_verdict(KEY, other, ham)}}, spam)
    garbage = edge.seal({"mail_from": SENDER, "rcpt_tos": [USER], "received_at": time.time(),
                         "verdict": ["not", "a", "verdict"]}, EDGE_RECEIVED + message("garbage verdict"))
    with run_intake(intake) as process:
        details = lambda: process.log()[-6000:]   # noqa: E731
        inbox = wait_for(lambda: len(m := dovecot.fetch_all(USER)) >= 3 and m, "three messages", details=details)
    by_id = {spool_id_of(m): m for m in inbox}
    assert header_value(by_id[kept], "X-Spam") == "Yes" and "[9.00 / 15.00]" in header_value(by_id[kept],
                                                                                            "X-Spamd-Result")
    assert header_value(by_id[forged], "X-Spam") == "Yes"
    assert header_value(by_id[garbage], "X-Spam") == "No"
    assert sorted(r.headers["Queue-Id"] for r in rspamd.requests) == sorted([forged, garbage])
    assert f"{forged}: the verdict the edge carried does not verify" in process.log()
    assert status(intake)["verdicts_kept"] == 1 and status(intake)["judged"] == 2


def test_while_the_filter_is_broken_mail_waits_on_the_edge_then_comes_once(world):
    edge, dovecot, intake, rspamd, _ = world
    rspamd.answer = lambda request: Answer(500, b"rspamd is ill")
    spool_id, sent = seal(edge, "waits")
    with run_intake(intake) as process:
        details = lambda: process.log()[-6000:]   # noqa: E731
        wait_for(lambda: len(rspamd.requests) >= 2, "the filter tried twice", details=details)
        assert dovecot.fetch_all(USER) == [] and edge.spooled_ids() == [spool_id]
        assert "not delivered yet: the spam filter: rspamd answered HTTP 500" in process.log()
        rspamd.answer = lambda request: Answer(body=verdict_json("no action", 0.0, {}, MX_NAME, SENDER))
        (got,) = wait_for(lambda: dovecot.fetch_all(USER), "the message once the filter works", details=details)
        wait_for(lambda: edge.spooled_ids() == [], "acknowledged", details=details)
    assert spool_id_of(got) == spool_id and split_trace(got)[1] == sent[len(EDGE_RECEIVED):]
    assert header_value(got, "X-Spam") == "No"
    assert len(dovecot.fetch_all(USER)) == 1


def test_a_filter_broken_for_over_an_hour_does_not_hold_mail_hostage(world):
    edge, dovecot, intake, rspamd, _ = world
    rspamd.answer = lambda request: Answer(500, b"rspamd is ill")
    spool_id, _ = seal(edge, "old", received_at=time.time() - 3700)
    with run_intake(intake) as process:
        details = lambda: process.log()[-6000:]   # noqa: E731
        (got,) = wait_for(lambda: dovecot.fetch_all(USER), "the message, unjudged", details=details)
        wait_for(lambda: status(intake).get("unfiltered") == 1, "counted as unfiltered", details=details)
    assert spool_id_of(got) == spool_id
    assert header_value(got, "X-Spam") is None and header_value(got, "X-Spamd-Result") is None
    assert f"{spool_id}: delivered WITHOUT a spam verdict" in process.log()
    assert "1 delivered WITHOUT a verdict: rspamd failed for over an hour" in shown(intake).text
