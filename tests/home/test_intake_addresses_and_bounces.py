"""Home's address book through the real path, and the DSNs the intake sends back.

A Dovecot with two mailboxes in two domains, the edge with
`addresses_from_home`, and `yestls intake serve` with an address book
(aliases, plus-addressing, a catch-all) and a bounce relay (tests/smtp_sink.py
standing in for home's MTA):
- the intake publishes the book; the edge then accepts exactly its
  addresses at RCPT (an unknown one: 550 5.1.1) and keeps it across a restart;
- mail to an alias lands in each of its mailboxes, `user+tag@` in `user`'s,
  any address at the catch-all domain in the catch-all's;
- a recipient Dovecot refuses for good gets the sender one RFC 3464 DSN
  (null sender, to the envelope sender, the failed address as the sender
  wrote it, Status and Diagnostic-Code from Dovecot's reply, the original's
  header only); a null or site-local sender gets none;
- a DSN the relay cannot take yet stays in the outbox and goes later;
- temporary failures past `give_up_after` are given up and bounced (4.4.7).
"""

import email
import json
import time
from email import policy

import pytest

from ..edge_site import make_edge_site
from ..edge_smtp import SmtpClient
from ..intake_mail import SENDER, message, wait_for
from ..intake_mail import mail_world as make_world
from ..smtp_sink import smtp_sink

pytestmark = pytest.mark.timeout(300)

USER, ANN, GHOST = "user@example.org", "ann@example.net", "ghost@example.org"   # ghost: in the book, not Dovecot
BOOK = {
    "domains": ["example.org", "example.net"],
    "mailboxes": [USER, ANN, GHOST],
    "aliases": {"info@example.net": [USER, ANN], "lost@example.org": [GHOST]},
    "catch_all": {"example.net": ANN},
    "plus_separator": "+",
}


@pytest.fixture(scope="module")
def sink():
    with smtp_sink() as sink:
        yield sink


@pytest.fixture(scope="module")
def world(tmp_path_factory, pki, sink):
    directory = tmp_path_factory.mktemp("addresses")
    book = directory / "addresses.json"
    book.write_text(json.dumps(BOOK))
    site = make_edge_site(directory / "site", pki, domains=("example.org", "example.net"),
                          top_options="addresses_from_home = true")
    options = (f'addresses = "{book}"\nbounce_relay = "127.0.0.1:{sink.port}"\n'
               f'outbox = "{directory / "outbox"}"\n')
    with make_world(directory, pki, (USER, ANN), site=site, intake_options=options) as world:
        with world.intake_running() as intake:
            wait_for(lambda: "address book from home" in world.edge.log(), "the edge to get the book",
                     details=lambda: world.logs(intake))
            world.intake_process = intake
            yield world


def rcpt(world, address: str) -> int:
    with SmtpClient.connect(world.site.smtp_port) as client:
        client.ehlo()
        client.expect(f"MAIL FROM:<{SENDER}>", 250)
        return client.command(f"RCPT TO:<{address}>").code


@pytest.mark.parametrize("address, code", [
    (USER, 250), ("user+tag@example.org", 250), ("info@example.net", 250), ("info+x@example.net", 250),
    ("whatever@example.net", 250), ("postmaster@example.org", 250),
    ("nobody@example.org", 550), ("nobody+user@example.org", 550), ("user@elsewhere.example", 550),
])
def test_the_edge_accepts_exactly_what_the_book_names(world, address, code):
    assert rcpt(world, address) == code


def test_the_edge_keeps_the_book_across_a_restart(world):
    world.stop_edge()
    world.start_edge()
    assert rcpt(world, "nobody@example.org") == 550
    assert rcpt(world, "user+again@example.org") == 250


def test_aliases_plus_forms_and_the_catch_all_reach_their_mailboxes(world):
    before = {box: len(world.mailbox(box)) for box in (USER, ANN)}
    world.send(SENDER, ["info@example.net"], message("to the alias"))
    world.send(SENDER, ["user+lists@example.org"], message("plus form"))
    world.send(SENDER, ["someone@example.net"], message("catch-all"))
    user = world.wait_for_mailbox(USER, before[USER] + 2, world.intake_process)
    ann = world.wait_for_mailbox(ANN, before[ANN] + 2, world.intake_process)
    subjects = lambda box: {email.message_from_bytes(m)["Subject"] for m in box}  # noqa: E731
    assert {"to the alias", "plus form"} <= subjects(user) and "catch-all" not in subjects(user)
    assert {"to the alias", "catch-all"} <= subjects(ann) and "plus form" not in subjects(ann)


def dsn_for(sink, subject: str) -> email.message.EmailMessage:
    found = []

    def arrived() -> bool:
        found[:] = [m for m in sink.messages if f"Subject: {subject}".encode() in m.content]
        return bool(found)

    wait_for(arrived, f"the DSN for {subject!r}")
    assert len(found) == 1, f"{len(found)} DSNs for one failure"
    received = found[0]
    assert received.mail_from == "<>" and received.rcpt_tos == (SENDER,)
    return email.message_from_bytes(received.content, policy=policy.default)


def test_a_permanent_failure_is_bounced_once_to_the_sender(world, sink):
    spool_id = world.send(SENDER, ["lost@example.org", USER], message("partly lost"))
    world.wait_for_acknowledged(spool_id, process=world.intake_process)
    report = dsn_for(sink, "partly lost")
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Auto-Submitted"] == "auto-replied" and report["To"].addresses[0].addr_spec == SENDER
    # from the domain the sender wrote to (example.org), not the site's first domain (example.net)
    assert report["From"].addresses[0].addr_spec == "MAILER-DAEMON@example.org"
    human, status, headers = report.get_payload()
    blocks = status.get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; mx.example.org"
    assert [(b["Final-Recipient"], b["Action"], b["Status"][0]) for b in blocks[1:]] == \
        [("rfc822; lost@example.org", "failed", "5")]   # as the sender wrote it: the alias, not the mailbox
    assert blocks[1]["Diagnostic-Code"].strip().startswith("smtp; 5")
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: partly lost" in headers.get_payload(decode=True) or "Subject: partly lost" in str(headers)
    assert b"Hello from the sender" not in report.as_bytes(), "the body went back"
    assert "<lost@example.org>: 550 5.1.1" in human.get_content()
    assert b"ghost@example.org" not in found_bytes(sink, "partly lost"), "the alias's mailbox was disclosed"


def found_bytes(sink, subject: str) -> bytes:
    return next(m.content for m in sink.messages if f"Subject: {subject}".encode() in m.content)


@pytest.mark.parametrize("sender", ["", USER], ids=["null sender", "site-local sender"])
def test_no_dsn_to_a_null_or_site_local_sender(world, sink, sender):
    subject = f"no bounce for {sender or 'null'}"
    spool_id = world.send(sender, ["lost@example.org"], message(subject, sender=sender or SENDER))
    world.wait_for_acknowledged(spool_id, process=world.intake_process)
    deadline = time.monotonic() + 3   # the outbox is sent in the same round as the delivery
    while time.monotonic() < deadline:
        assert not [m for m in sink.messages if subject.encode() in m.content]
        time.sleep(0.2)
    assert "no DSN (null or local sender)" in world.intake_process.log()


def test_a_dsn_the_relay_cannot_take_waits_in_the_outbox(world, sink):
    sink.refuse = "451 4.3.0 not now"
    try:
        spool_id = world.send(SENDER, ["lost@example.org"], message("bounce later"))
        world.wait_for_acknowledged(spool_id, process=world.intake_process)
        wait_for(lambda: "DSN to alice@sender.example.net deferred" in world.intake_process.log(),
                 "the relay's refusal")
        assert list(world.directory.glob("outbox/*.dsn")), "no DSN waiting in the outbox"
    finally:
        sink.refuse = None
    world.send(SENDER, [USER], message("a nudge"))   # the next round sends what waits
    dsn_for(sink, "bounce later")


def test_temporary_failures_past_give_up_after_are_bounced(tmp_path, pki, sink):
    book = tmp_path / "addresses.json"
    book.write_text(json.dumps({"domains": ["example.org"], "mailboxes": [USER]}))
    options = (f'addresses = "{book}"\nbounce_relay = "127.0.0.1:{sink.port}"\noutbox = "{tmp_path / "out"}"\n'
               "give_up_after = 2\n")
    with make_world(tmp_path / "w", pki, (USER,), quota="1k", intake_options=options) as world:
        with world.intake_running() as intake:
            spool_id = world.send(SENDER, [USER], message("too big for the quota", b"x" * 4000 + b"\r\n"))
            world.wait_for_acknowledged(spool_id, process=intake)
            report = dsn_for(sink, "too big for the quota")
            block = report.get_payload()[1].get_payload()[1]
            assert (block["Action"], block["Status"]) == ("failed", "4.4.7"), block
            assert "given up after" in intake.log()
