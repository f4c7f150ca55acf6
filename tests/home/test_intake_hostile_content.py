"""Whatever a compromised edge seals, Dovecot gets one message, for its recipients, with the body as sealed.

A compromised edge (tests/hostile_edge.py: the real spool and spool service,
sealing what the test gives it) seals messages whose bodies end the message
early for some LMTP reader — every line-end form of the end-of-data dot, with
NULs, with extra dots — followed by a whole second transaction (MAIL, RCPT
to a victim and to the recipient itself, DATA or BDAT); envelopes that would
inject LMTP commands or are not addresses at all; and forged trace headers.
The real `yestls intake serve` pulls them and delivers to a real Dovecot.
Each recipient's and each victim's mailbox is then read over IMAP: the
smuggled text stayed in the one message's body, the victims got nothing, a
bad envelope put the message in the quarantine (sealed, as it was on the
edge) and gave nobody anything, and the only X-YesTLS-Spool-Id and
mx.example.org Authentication-Results are the intake's own.
"""

import re
from dataclasses import dataclass

import pytest

from relay.home.ledger import QUARANTINED, Ledger

from ..dovecot import run_dovecot
from ..fake_rspamd import run_fake_rspamd
from ..home_site import EDGE, make_intake, run_intake
from ..hostile_edge import EDGE_RECEIVED, hostile_edge
from ..intake_mail import MX_NAME, SENDER, header_fields, header_value, message, split_trace, spool_id_of, wait_for
from ..smuggling import smuggling_cases

SMUGGLING = smuggling_cases()

ENVELOPE_INJECTION = {  # name -> metadata(rcpt, victim)
    "CRLF and a RCPT in mail_from": lambda r, v: {
        "mail_from": f"alice@sender.example.net>\r\nRCPT TO:<{v}", "rcpt_tos": [r]},
    "CRLF and a RCPT in a recipient": lambda r, v: {
        "mail_from": SENDER, "rcpt_tos": [f"{r}>\r\nRCPT TO:<{v}"]},
    "bare LF and a RCPT in a recipient": lambda r, v: {
        "mail_from": SENDER, "rcpt_tos": [f"{r}>\nRCPT TO:<{v}"]},
    "bare CR in a recipient": lambda r, v: {"mail_from": SENDER, "rcpt_tos": [f"{r}\rRCPT TO:<{v}>"]},
    "a good recipient, then one with DATA injected": lambda r, v: {
        "mail_from": SENDER, "rcpt_tos": [r, f"{v}>\r\nDATA"]},
    "NUL in mail_from": lambda r, v: {"mail_from": "alice\x00@sender.example.net", "rcpt_tos": [r]},
    "a parameter after > in a recipient": lambda r, v: {"mail_from": SENDER, "rcpt_tos": [f"{r}> NOTIFY=NEVER"]},
    "angle brackets in mail_from": lambda r, v: {"mail_from": f"<{SENDER}>", "rcpt_tos": [r]},
    "non-ASCII without SMTPUTF8": lambda r, v: {"mail_from": "zoë@sender.example.net", "rcpt_tos": [r]},
    "a 65-octet local part": lambda r, v: {"mail_from": "a" * 65 + "@sender.example.net", "rcpt_tos": [r]},
    "rcpt_tos a string": lambda r, v: {"mail_from": SENDER, "rcpt_tos": r},
    "rcpt_tos empty": lambda r, v: {"mail_from": SENDER, "rcpt_tos": []},
    "a recipient that is a number": lambda r, v: {"mail_from": SENDER, "rcpt_tos": [r, 12]},
    "no mail_from": lambda r, v: {"rcpt_tos": [r]},
    "smtputf8 a string": lambda r, v: {"mail_from": SENDER, "rcpt_tos": [r], "smtputf8": "yes"},
}

ODD_BUT_VALID = {  # name -> (mail_from as sealed, the Return-Path Dovecot writes)
    "null sender recorded as <>": ("<>", "<>"),
    "null sender recorded as empty": ("", "<>"),
    "quoted local part": ('"alice smith"@sender.example.net', '<"alice smith"@sender.example.net>'),
    "address literal": ("alice@[192.0.2.1]", "<alice@[192.0.2.1]>"),
}

FORGED_SPOOL_ID = "0" * 32


def forged_trace_message(to: str) -> tuple[bytes, bytes]:
    """(what the edge seals after its Received, what must reach the mailbox after the trace headers)."""
    foreign = b"Authentication-Results: other.example; spf=pass smtp.mailfrom=sender.example.net\r\n"
    head = (b"From: Alice <alice@sender.example.net>\r\n" + f"To: <{to}>\r\n".encode()
            + b"Subject: forged trace\r\n")
    forged = (f"X-YesTLS-Spool-Id: {FORGED_SPOOL_ID}\r\n".encode()
              + b"x-yestls-spool-id :\r\n " + FORGED_SPOOL_ID.encode() + b"\r\n"
              + b"Authentication-Results: MX.example.org; dkim=pass header.d=bank.example\r\n"
              + b"Authentication-Results:\r\n mx.example.org 1; spf=pass\r\n"
              # the spam filter's fields: a sender's "not spam" must not pass for ours (Sieve reads X-Spam)
              + b"X-Spam: No\r\nx-spam :\r\n No\r\nX-Spamd-Result: default: False [-50.00 / 15.00]\r\n"
              + b"X-Rspamd-Score: -50\r\n")
    body = b"\r\nX-YesTLS-Spool-Id: in the body, untouched\r\n"
    return head + forged + foreign + body, head + foreign + body


@dataclass
class Case:
    spool_id: str
    rcpt: str
    victim: str
    sent: bytes       # what the sender sent: the sealed message without the edge's Received
    sealed: bytes = b""   # the sealed file as it was on the edge


def as_dovecot_serves(sent: bytes) -> bytes:
    """What Dovecot's IMAP returns for bytes it was given: a bare LF as CRLF, a NUL as 0x80, a CR that ends the
    message dropped (no case has CR CR LF, of which Dovecot drops one CR)."""
    assert b"\r\r\n" not in sent, "Dovecot drops one of two CRs before an LF: keep such cases out"
    served = re.sub(rb"(?<!\r)\n", b"\r\n", sent).replace(b"\x00", b"\x80")
    return served[:-1] if served.endswith(b"\r") else served


def users(prefix: str, names) -> dict:
    return {name: (f"{prefix}{i}@example.org", f"victim-{prefix}{i}@example.org") for i, name in enumerate(names)}


ADDRESSES = {**users("smuggled-", SMUGGLING), **users("injected-", ENVELOPE_INJECTION),
             **users("odd-", ODD_BUT_VALID), **users("forged-", ["forged trace"])}


@dataclass
class World:
    edge: object
    dovecot: object
    intake: object
    log: str
    cases: dict


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile-content")
    mailboxes = [address for pair in ADDRESSES.values() for address in pair]
    with run_fake_rspamd() as rspamd, hostile_edge(directory / "edge") as edge, run_dovecot(mailboxes) as dovecot:
        intake = make_intake(edge, dovecot, rspamd=rspamd.url)
        cases = {}

        def seal(name: str, metadata: dict, sent: bytes) -> None:
            rcpt, victim = ADDRESSES[name]
            cases[name] = Case(edge.seal(metadata, EDGE_RECEIVED + sent), rcpt, victim, sent)

        for name, body in SMUGGLING.items():
            rcpt, victim = ADDRESSES[name]
            seal(name, {"mail_from": SENDER, "rcpt_tos": [rcpt]}, message(name, body(rcpt, victim), to=rcpt))
        for name, metadata in ENVELOPE_INJECTION.items():
            rcpt, victim = ADDRESSES[name]
            seal(name, metadata(rcpt, victim), message(name, to=rcpt))
        for name, (mail_from, _) in ODD_BUT_VALID.items():
            rcpt, _ = ADDRESSES[name]
            seal(name, {"mail_from": mail_from, "rcpt_tos": [rcpt]}, message(name, to=rcpt))
        rcpt, _ = ADDRESSES["forged trace"]
        sent, _ = forged_trace_message(rcpt)
        seal("forged trace", {"mail_from": SENDER, "rcpt_tos": [rcpt]}, sent)
        for case in cases.values():
            case.sealed = edge.sealed_file(case.spool_id)

        with run_intake(intake) as process:
            wait_for(lambda: not edge.spooled_ids(), "the intake to take every message off the edge",
                     details=lambda: process.log()[-6000:] + dovecot.log()[-3000:])
            yield World(edge, dovecot, intake, process.log(), cases)


def ledger_state(world, spool_id: str) -> str | None:
    ledger = Ledger(world.intake.ledger)
    try:
        entry = ledger.edge(EDGE).get(spool_id)
        return entry.state if entry else None
    finally:
        ledger.close()


@pytest.mark.parametrize("name", SMUGGLING)
def test_smuggled_lmtp_commands_stay_in_the_one_message_body(world, name):
    case = world.cases[name]
    inbox = world.dovecot.fetch_all(case.rcpt)
    assert len(inbox) == 1, f"{case.rcpt} got {len(inbox)} messages: {[m[:300] for m in inbox]}"
    assert spool_id_of(inbox[0]) == case.spool_id
    assert split_trace(inbox[0])[1] == as_dovecot_serves(case.sent), "the body, smuggled text and all"
    assert world.dovecot.fetch_all(case.victim) == []


@pytest.mark.parametrize("name", ENVELOPE_INJECTION)
def test_an_envelope_unfit_for_lmtp_is_quarantined_and_delivered_to_nobody(world, name):
    case = world.cases[name]
    assert (world.intake.quarantine / EDGE / f"{case.spool_id}.sealed").read_bytes() == case.sealed
    assert ledger_state(world, case.spool_id) == QUARANTINED
    (line,) = [line for line in world.log.splitlines() if case.spool_id in line and "QUARANTINED" in line]
    assert " ERROR " in line and "not delivered" in line
    assert world.dovecot.fetch_all(case.rcpt) == []
    assert world.dovecot.fetch_all(case.victim) == []


@pytest.mark.parametrize("name", ODD_BUT_VALID)
def test_unusual_but_valid_senders_are_delivered(world, name):
    case = world.cases[name]
    (got,) = world.dovecot.fetch_all(case.rcpt)
    assert spool_id_of(got) == case.spool_id
    assert header_value(got, "Return-Path") == ODD_BUT_VALID[name][1]
    assert split_trace(got)[1] == case.sent


def test_forged_trace_headers_are_removed_and_the_rest_is_unchanged(world):
    case = world.cases["forged trace"]
    (got,) = world.dovecot.fetch_all(case.rcpt)
    trace, rest = split_trace(got)
    assert trace[-5] == f"X-YesTLS-Spool-Id: {case.spool_id}\r\n".encode()
    assert trace[-4].startswith(f"Authentication-Results: {MX_NAME};".encode())
    assert trace[-2] == b"X-Spam: No\r\n"
    assert rest == forged_trace_message(case.rcpt)[1], "only the forged fields went; the foreign A-R stayed"
    names = [name for name, _ in header_fields(got)]
    assert names.count("x-yestls-spool-id") == 1
    assert names.count("authentication-results") == 2   # ours and other.example's
    assert names.count("x-spam") == names.count("x-spamd-result") == 1 and "x-rspamd-score" not in names
    assert "removed 2 incoming Authentication-Results header(s) forged with our name" in world.log
    assert f"{case.spool_id}: removed 2 incoming X-YesTLS-Spool-Id header(s)" in world.log


def test_nobody_got_anything_else(world):
    """Every mailbox holds exactly what the cases above expect: no smuggled message landed anywhere."""
    expected = {case.rcpt: 1 for name, case in world.cases.items() if name not in ENVELOPE_INJECTION}
    for rcpt, victim in ADDRESSES.values():
        assert len(world.dovecot.fetch_all(rcpt)) == expected.get(rcpt, 0), rcpt
        assert world.dovecot.fetch_all(victim) == [], victim
    assert "Traceback" not in world.log
