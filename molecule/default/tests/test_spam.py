"""Spam judged with real parts (docs/spam.md; relay/edge/verdict.py,
relay/home/judge.py, relay/home/intake.py): Postfix on `internet` sends,
the edge asks home's rspamd before its reply to DATA while home's intake
answers, and home judges after unsealing what was accepted without it.

- GTUBE with home up: the edge answers 550 5.7.1 to DATA; Postfix on
  `internet` bounces it itself; nothing in the edge's spool, in any folder,
  and nothing from us reaches the sender.
- GTUBE with the intake stopped (no judge: the edge accepts as without a
  verdict): sealed, then, when the intake is back, judged at home and
  delivered to Junk, not INBOX.
- Ham, DKIM-signed by sender.test (its key, SPF and DMARC in the scenario's
  DNS, internet.yml): INBOX, with rspamd's Authentication-Results (dkim,
  spf as the edge saw it, dmarc: pass) and X-Spam: No.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import subprocess
import uuid

import authres
from mailpath import MX, SENDER, attempts, edge_status, spool_files, wait_until_sent
from scenario import container, mailbox, messages_with, wait_for
from submission import received_at_correspondent

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
DKIM_KEY = "/etc/yestls-sender-dkim.key"  # on `internet` (internet.yml); selector mail, d=sender.test
JUNK = "Junk"
INTAKE = "yestls-intake.service"
DELIVERY_TIMEOUT = 120  # seconds: the intake long-polls the edge, then rspamd and Dovecot

# On `internet`: a message from SENDER, DKIM-signed with sender.test's key when
# a key path is given, handed to Postfix as a local user would.
_SEND = r"""
import subprocess, sys
import dkim
recipient, key_path = sys.argv[1:3]
message = sys.stdin.buffer.read()
if key_path:
    with open(key_path, "rb") as key:
        message = dkim.sign(message, b"mail", b"sender.test", key.read(), canonicalize=(b"relaxed", b"relaxed"),
                            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"]) + message
subprocess.run(["/usr/sbin/sendmail", "-f", sys.argv[3], "--", recipient], input=message, check=True, timeout=30)
"""


def send(marker: str, body: str, signed: bool = False) -> None:
    text = (
        f"From: <{SENDER}>\r\nTo: <{mailbox()}>\r\nSubject: YesTLS spam {marker}\r\n"
        f"Date: Sat, 05 Dec 2026 09:00:00 +0000\r\nMessage-ID: <{marker}@sender.test>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n"
    )
    subprocess.run(["docker", "exec", "-i", "internet", "python3", "-c", _SEND, mailbox(),
                    DKIM_KEY if signed else "", SENDER], input=text.encode(), check=True, timeout=60)


def verdicts() -> dict[str, int]:
    """The edge's before-queue verdict counts by outcome (`yestls status`)."""
    return edge_status()["verdict"]["rejected by verdict"]


def home_spam_counts() -> dict[str, int]:
    return json.loads(container("home").check_output("yestls status --json"))["intake"]["spam filter"]


def in_folder(marker: str, folder: str) -> list[bytes]:
    return messages_with(marker, folder=folder)


def test_gtube_with_home_up_is_refused_at_data_and_stored_nowhere():
    marker = f"yestls-gtube-{uuid.uuid4().hex}"
    before = verdicts()
    send(marker, f"Spam for the filter's test.\r\n{GTUBE}")

    def bounced():
        return next((a for a in attempts(marker) if a.status == "bounced"), None)

    attempt = wait_for(bounced, timeout=90)
    assert attempt, f"Postfix on `internet` was not refused: {attempts(marker)}"
    assert re.search(r"said: 550 5\.7\.1 .*\(in reply to end of DATA command\)", attempt.reply), attempt.reply
    assert verdicts()["rejected"] == before["rejected"] + 1
    assert [a.status for a in attempts(marker)] == ["bounced"]  # refused once, never accepted
    # nothing stored: the edge's spool drains to empty, no folder has it
    assert wait_for(lambda: spool_files() == [], timeout=60), spool_files()
    assert in_folder(marker, "INBOX") == [] and in_folder(marker, JUNK) == []
    # the sender hears from its own MTA only (a DSN from us would come from MAILER-DAEMON@ our domain)
    dsn = wait_for(lambda: received_at_correspondent(marker), timeout=60)
    assert dsn, f"Postfix on `internet` did not bounce {marker} to {SENDER}"
    bounce = email.message_from_bytes(dsn, policy=email.policy.compat32)
    assert re.fullmatch(r".*<MAILER-DAEMON@sender\.test>", bounce["From"], re.I), bounce["From"]
    assert [r.split()[:3] for r in bounce.get_all("Received")] == [["by", "mta.sender.test", "(Postfix)"]], dsn[:600]
    assert b"550 5.7.1" in dsn


def test_gtube_while_the_intake_is_away_is_accepted_and_delivered_to_junk():
    home = container("home")
    marker = f"yestls-gtube-away-{uuid.uuid4().hex}"
    before = verdicts()
    home.check_output("systemctl stop %s", INTAKE)
    try:
        send(marker, f"Spam while home is away.\r\n{GTUBE}")
        attempt = wait_until_sent(marker, timeout=90)
        assert attempt.spool_id, attempt.reply
        assert spool_files(), "the accepted message is not in the edge's spool"
    finally:
        home.check_output("systemctl start %s", INTAKE)
    after = verdicts()
    assert after["rejected"] == before["rejected"]
    unasked = ("home_absent", "no_answer", "home_gone")
    assert sum(after[o] for o in unasked) == sum(before[o] for o in unasked) + 1, (before, after)

    junk = wait_for(lambda: in_folder(marker, JUNK), timeout=DELIVERY_TIMEOUT, interval=2)
    assert junk and len(junk) == 1, f"{marker} (spool id {attempt.spool_id}) is not in Junk"
    assert in_folder(marker, "INBOX") == []
    assert b"\r\nX-Spam: Yes\r\n" in junk[0]
    # (no X-Spamd-Result: rspamd's GTUBE rule ends the scan before its other modules run)
    # the intake's counters start at zero with it, and it restarted above: this is its one junked message
    assert wait_for(lambda: home_spam_counts()["junked"] == 1, timeout=30), home_spam_counts()


def test_dkim_signed_ham_reaches_the_inbox_with_rspamds_results():
    marker = f"yestls-ham-{uuid.uuid4().hex}"
    send(marker, "Dear members, the garden club meets on Thursday in the library hall.\r\n"
                 f"We will talk about pruning fruit trees. The marker is {marker}.", signed=True)
    attempt = wait_until_sent(marker, timeout=90)
    found = wait_for(lambda: in_folder(marker, "INBOX"), timeout=DELIVERY_TIMEOUT, interval=2)
    assert found and len(found) == 1, f"{marker} (spool id {attempt.spool_id}) is not in the INBOX"
    assert in_folder(marker, JUNK) == []
    message = found[0]
    assert b"\r\nX-Spam: No\r\n" in message
    assert b"\r\nX-Spamd-Result: default: False [" in message
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    fields = parsed.get_all("Authentication-Results") or []
    assert len(fields) == 1, fields  # rspamd's, and none a sender could have slipped in
    results = authres.AuthenticationResultsHeader.parse_value(re.sub(r"\s+", " ", fields[0]))
    assert results.authserv_id == MX
    methods = {(r.method, r.result) for r in results.results}
    assert {("dkim", "pass"), ("spf", "pass"), ("dmarc", "pass")} <= methods, fields[0]
    dkim = next(r for r in results.results if r.method == "dkim")
    assert dkim.header_d == "sender.test", fields[0]
    spf = next(r for r in results.results if r.method == "spf")
    assert spf.smtp_mailfrom == SENDER, fields[0]
