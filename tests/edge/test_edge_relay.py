"""The edge is never an open relay: the battery relay checkers run, against `yestls edge serve`.

The edge (domains = ["example.org"], MX host name mx.example.org, on
127.0.0.1) accepts RCPT only for plain addresses at example.org. Every
session below sends MAIL from one of the senders relay checkers use (the
null sender, our own domain, our host name, our IP literal, a foreign
domain, after HELO as our own name, and over STARTTLS, which grants nothing
either: there is no AUTH) and then every recipient of the battery:

- refused with exactly `550 5.7.1`: foreign domains (also without angle
  brackets, in upper case, one that merely contains ours), subdomains of
  ours and our host name, percent and bang routing through us (also via our
  host name and our IP literal), quoted local parts hiding an `@`, `%` or
  `!`, IP literals (ours too, IPv6 as well), a bare dotted quad, source
  routes to a foreign address (also via us), internationalised foreign
  domains, a local part with no domain, the null recipient;
- refused with exactly `553 5.1.3` (bad address syntax; aiosmtpd's parser
  refuses them before the recipient policy sees them): a trailing dot, an
  empty domain, two `@`, an empty label;
- accepted, as controls in the same sessions: our own domain in any case,
  and `<@route.example:user@example.org>`. RFC 5321 4.1.1.3 and appendix C
  let a server ignore a source route: the edge drops it and judges the
  address that remains, so the route leads nowhere but to our own mailbox
  (the sealed envelope holds the address without the route).

DATA after refused recipients only is `503`, and nothing of any refused
transaction reaches the spool. With a mailbox list (a second edge), unknown
mailboxes at our domain get `550 5.1.1` while relay attempts still get
`550 5.7.1`; `max_recipients` caps a transaction with `452 4.5.3`.
"""

import pytest

from ..edge_smtp import CLIENT_NAME, SmtpClient, queued_id, running_edge, tls_context

pytestmark = pytest.mark.timeout(120)

RELAY_DENIED = (550, "5.7.1")
BAD_SYNTAX = (553, "5.1.3")

RELAY_ATTEMPTS = [
    "<user@foreign.example>",
    "user@foreign.example",
    "<USER@FOREIGN.EXAMPLE>",
    "<user@example.org.foreign.example>",
    "<user@notexample.org>",
    "<user@sub.example.org>",
    "<user@mx.example.org>",
    "<user%foreign.example@example.org>",
    "<user%foreign.example@EXAMPLE.ORG>",
    "<user%foreign.example@mx.example.org>",
    "<user%foreign.example@[127.0.0.1]>",
    "<user%foreign.example>",
    "<user%foreign.example%example.org@example.org>",
    "<foreign.example!user@example.org>",
    "<foreign.example!user@[127.0.0.1]>",
    "<foreign.example!user>",
    "<foreign.example!user%example.org@example.org>",
    '<"user@foreign.example"@example.org>',
    '<"user%foreign.example"@example.org>',
    '<"foreign.example!user"@example.org>',
    '<"user@foreign.example">',
    '<"user@foreign.example"@[127.0.0.1]>',
    '<"user\\"@foreign.example"@example.org>',
    "<user@[1.2.3.4]>",
    "<user@[127.0.0.1]>",
    "<user@[IPv6:::1]>",
    "<user@[example.org]>",
    "<user@127.0.0.1>",
    "<@route.example:user@foreign.example>",
    "<@example.org:user@foreign.example>",
    "<@[127.0.0.1]:user@foreign.example>",
    "<@a.example,@b.example:user@foreign.example>",
    "<user@bücher.example>",
    "<user@xn--bcher-kva.example>",
    "<user>",
    "<>",
]

MALFORMED = [
    "<user@example.org.>",
    "<user@foreign.example.>",
    "<user@>",
    "<user@foreign.example@example.org>",
    "<user@example.org@foreign.example>",
    "<user@example..org>",
]

OURS = ["<user@example.org>", "<USER@Example.ORG>", "<@route.example:user@example.org>"]

# (HELO name, MAIL FROM): the senders relay checkers try, each with the whole battery.
SENDERS = [
    (CLIENT_NAME, "<>"),
    (CLIENT_NAME, "<postmaster@example.org>"),
    (CLIENT_NAME, "<user@mx.example.org>"),
    (CLIENT_NAME, "<relaytest@[127.0.0.1]>"),
    (CLIENT_NAME, "<spammer@foreign.example>"),
    ("mx.example.org", "<user@example.org>"),     # HELO as our own name
    ("[127.0.0.1]", "<user@example.org>"),        # HELO as our own address
]


@pytest.fixture(scope="module")
def edge(pki, tmp_path_factory):
    # The battery sends ~40 refused RCPTs per session: more than the default error cap of 10.
    with running_edge(tmp_path_factory.mktemp("edge-relay"), pki,
                      smtp_options="max_errors = 200\nmax_recipients = 3\n") as running:
        yield running


@pytest.fixture(scope="module")
def listed_edge(pki, tmp_path_factory):
    with running_edge(tmp_path_factory.mktemp("edge-mailboxes"), pki,
                      top_options='mailboxes = ["user@example.org", "jörg@example.org"]\n',
                      smtp_options="max_errors = 50\n") as running:
        yield running


def run_battery(client: SmtpClient, mail_from: str) -> list[str]:
    """Every recipient of the battery in one transaction; the mismatches, as lines for the failure message."""
    wrong = []
    client.expect(f"MAIL FROM:{mail_from}", 250)
    for expected, recipients in ((RELAY_DENIED, RELAY_ATTEMPTS), (BAD_SYNTAX, MALFORMED)):
        for recipient in recipients:
            reply = client.command(f"RCPT TO:{recipient}")
            if (reply.code, reply.enhanced) != expected:
                wrong.append(f"MAIL FROM:{mail_from} RCPT TO:{recipient} -> {reply} (expected {expected})")
    # Nothing was accepted, so there is no transaction to send.
    data = client.command("DATA")
    if (data.code, data.enhanced) != (503, "5.5.1"):
        wrong.append(f"DATA after refused recipients only -> {data}")
    client.expect("RSET", 250)
    # The controls: our own mailbox is accepted in the same session.
    client.expect(f"MAIL FROM:{mail_from}", 250)
    for recipient in OURS:
        reply = client.command(f"RCPT TO:{recipient}")
        if reply.code != 250:
            wrong.append(f"MAIL FROM:{mail_from} RCPT TO:{recipient} (ours) -> {reply}")
    client.expect("RSET", 250)
    return wrong


@pytest.mark.parametrize("helo, mail_from", SENDERS)
def test_relay_battery(edge, helo, mail_from):
    before = edge.site.spooled_files()
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo(helo)
        wrong = run_battery(client, mail_from)
        client.expect("QUIT", 221)
    assert not wrong, "\n".join(wrong)
    assert edge.site.spooled_files() == before and edge.tmp_files() == []


def test_relay_battery_over_starttls(edge, pki):
    """TLS is no credential: a client on TLS relays no more than one in cleartext."""
    before = edge.site.spooled_files()
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.starttls(tls_context(pki))
        client.ehlo()
        wrong = run_battery(client, "<postmaster@example.org>")
        client.expect("QUIT", 221)
    assert not wrong, "\n".join(wrong)
    assert edge.site.spooled_files() == before and edge.tmp_files() == []


def test_refused_recipients_are_dropped_from_a_transaction_that_goes_on(edge):
    """A transaction with refused and accepted recipients seals only the accepted one."""
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.expect("MAIL FROM:<>", 250)
        for recipient in ("<user@foreign.example>", "<user%foreign.example@example.org>", "<user@[127.0.0.1]>"):
            assert (client.command(f"RCPT TO:{recipient}").code, client.replies[-1].enhanced) == RELAY_DENIED
        client.expect("RCPT TO:<@route.example:user@example.org>", 250)
        reply = client.data(b"Subject: bounce\r\n\r\nbody\r\n")
    # The source route was dropped: the sealed envelope holds our own mailbox only.
    assert edge.unseal(queued_id(reply)).metadata["rcpt_tos"] == ["user@example.org"]


def test_postmaster_without_a_domain_is_accepted(edge):
    """RFC 5321 4.5.1: `RCPT TO:<Postmaster>` (no domain, any case) MUST be accepted."""
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.expect(f"MAIL FROM:<a@{CLIENT_NAME}>", 250)
        replies = [client.command(f"RCPT TO:{r}") for r in ("<Postmaster>", "<postmaster>", "<POSTMASTER>")]
    assert [r.code for r in replies] == [250, 250, 250], "\n".join(map(str, replies))


def test_recipient_cap(edge):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.expect(f"MAIL FROM:<a@{CLIENT_NAME}>", 250)
        client.expect("RCPT TO:<user@foreign.example>", 550)  # a refused one takes no place
        for n in range(3):
            client.expect(f"RCPT TO:<user{n}@example.org>", 250)
        for n in (3, 4):
            reply = client.command(f"RCPT TO:<user{n}@example.org>")
            assert (reply.code, reply.enhanced) == (452, "4.5.3"), reply
        reply = client.data(b"Subject: capped\r\n\r\nbody\r\n")
    assert edge.unseal(queued_id(reply)).metadata["rcpt_tos"] == [f"user{n}@example.org" for n in range(3)]


def test_mailbox_list(listed_edge):
    before = listed_edge.site.spooled_files()
    with SmtpClient.connect(listed_edge.site.smtp_port) as client:
        client.ehlo()
        client.expect(f"MAIL FROM:<a@{CLIENT_NAME}>", 250)
        for unknown in ("<nobody@example.org>", "<user2@example.org>", "<jorg@example.org>"):
            reply = client.command(f"RCPT TO:{unknown}")
            assert (reply.code, reply.enhanced) == (550, "5.1.1"), f"{unknown}: {reply}"
        for relay in ("<user@foreign.example>", "<user%foreign.example@example.org>",
                      '<"user@foreign.example"@example.org>', "<user@[127.0.0.1]>", "<foreign.example!user@example.org>",
                      "<@route.example:user@foreign.example>"):
            reply = client.command(f"RCPT TO:{relay}")
            assert (reply.code, reply.enhanced) == RELAY_DENIED, f"{relay}: {reply}"
        assert client.command("DATA").code == 503
        assert listed_edge.site.spooled_files() == before
        client.expect("RSET", 250)
        client.expect(f"MAIL FROM:<a@{CLIENT_NAME}> SMTPUTF8", 250)
        client.expect("RCPT TO:<USER@Example.org>", 250)
        client.expect("RCPT TO:<jörg@example.org>", 250)
        reply = client.data(b"Subject: listed\r\n\r\nbody\r\n")
    assert listed_edge.unseal(queued_id(reply)).metadata["rcpt_tos"] == ["USER@Example.org", "jörg@example.org"]
    refused = listed_edge.metric("yestls_edge_refused_total", reason="unknown_mailbox")
    assert refused == 3


def test_the_spool_holds_mail_for_our_domain_only(edge, listed_edge):
    """Whatever ran before: every sealed envelope names only recipients at example.org; tmp/ is empty."""
    for running in (edge, listed_edge):
        for path in running.site.spooled_files():
            recipients = running.unseal(path.name.rsplit("-", 1)[1]).metadata["rcpt_tos"]
            assert recipients and all(r.lower().endswith("@example.org") and r.count("@") == 1
                                      and not set("%!\"[]:") & set(r) for r in recipients), (path, recipients)
        assert running.tmp_files() == []
