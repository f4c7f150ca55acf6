"""`smtp.oracle_down`: what `yestls edge serve` does while no key oracle answers, per policy.

Each policy has its own edge (and oracle home); "down" is the oracle process
killed (SIGKILL), and for tempfail also never started at all.

- tempfail (the default): an edge started without its oracle greets with
  `421 4.3.0` and closes; once the oracle starts, the edge connects, fetches
  its certificates and accepts mail over STARTTLS again (bounded wait). The
  same after the oracle is killed and restarted.
- resume-only: with the oracle killed, STARTTLS is still offered; a client
  holding a session ticket from an earlier connection resumes (no signature
  needed) and its mail is accepted, sealed as resumed; a full handshake
  fails cleanly (an alert, not a hang) and the edge goes on serving; MAIL
  without TLS gets `451 4.7.0`.
- plaintext (opt-in): with the oracle killed, STARTTLS is not offered (and
  refused if tried) and mail is accepted and sealed in cleartext; with the
  oracle back, STARTTLS is offered again.
In every case the edge's log names the policy in force and
`yestls_edge_oracle_up` is 0 while the oracle is away.
"""

import re
import ssl

import pytest

from ..edge_smtp import (
    CLIENT_NAME,
    RunningEdge,
    SmtpClient,
    files_containing,
    message_with_marker,
    new_marker,
    queued_id,
    running_edge,
    tls_context,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

SENDER = f"a@{CLIENT_NAME}"
RECIPIENT = "user@example.org"
RETURN_WAIT = 60.0  # the edge's reconnect backoff tops out at 10 s, its certificate retry at 5 s


def greeting(edge: RunningEdge):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        return client.greeting


def assert_tempfail_greeting(edge: RunningEdge) -> None:
    with SmtpClient.connect(edge.site.smtp_port) as client:
        assert (client.greeting.code, client.greeting.enhanced) == (421, "4.3.0"), client.greeting
        assert client.wait_closed(timeout=10) == b""


def deliver_over_starttls(edge: RunningEdge, pki, subject: str) -> dict:
    """A delivery over a full STARTTLS handshake; the sealed metadata."""
    message = f"Subject: {subject}\r\n\r\nbody\r\n".encode()
    with SmtpClient.connect(edge.site.smtp_port) as client:
        assert client.greeting.code == 220, client.greeting
        assert "STARTTLS" in client.ehlo().keywords
        client.starttls(tls_context(pki))
        client.ehlo()
        spool_id = queued_id(client.deliver(SENDER, [RECIPIENT], message))
    unsealed = edge.unseal(spool_id)
    assert unsealed.message.endswith(message)
    return unsealed.metadata


def wait_starttls_offered(edge: RunningEdge) -> None:
    """Until a new connection is greeted with 220 and offered STARTTLS (the oracle is back, chains fetched)."""
    def offered() -> bool:
        with SmtpClient.connect(edge.site.smtp_port) as client:
            if client.greeting.code != 220:
                return False
            return "STARTTLS" in client.ehlo().keywords

    wait_until(offered, RETURN_WAIT, "STARTTLS offered again after the oracle came back", edge.log)


def wait_log(edge: RunningEdge, pattern: str, timeout: float = 30.0) -> None:
    wait_until(lambda: re.search(pattern, edge.log(), re.MULTILINE), timeout, f"the edge logs {pattern!r}", edge.log)


# --- tempfail -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tempfail_edge(pki, tmp_path_factory):
    # No oracle at all: the edge waits 10 s for one at start, then listens under the policy.
    with running_edge(tmp_path_factory.mktemp("edge-tempfail"), pki, oracle=False) as running:
        yield running


def test_tempfail_without_an_oracle_ever(tempfail_edge):
    edge = tempfail_edge
    assert "no key oracle answered at start; policy tempfail applies" in edge.log()
    refused = edge.metric("yestls_edge_refused_total", reason="oracle_down")
    assert_tempfail_greeting(edge)
    assert_tempfail_greeting(edge)
    assert edge.metric("yestls_edge_refused_total", reason="oracle_down") == refused + 2
    edge.wait_oracle_state(up=False)
    assert edge.metric("yestls_edge_oracle_down_policy", policy="tempfail") == 1
    wait_log(edge, r"key oracle down: .*; oracle-down policy tempfail in force")
    assert edge.site.spooled_files() == []


def test_tempfail_mail_accepted_once_the_oracle_starts(tempfail_edge, pki):
    edge = tempfail_edge
    edge.start_oracle()
    wait_starttls_offered(edge)
    metadata = deliver_over_starttls(edge, pki, "after the oracle started")
    assert metadata["tls"]["resumed"] is False
    assert edge.metric("yestls_edge_oracle_up") == 1
    wait_log(edge, r"key oracle up: .*; normal in force")


def test_tempfail_oracle_killed_and_back(tempfail_edge, pki):
    edge = tempfail_edge
    assert greeting(edge).code == 220
    edge.kill_oracle()
    wait_until(lambda: greeting(edge).code == 421, 30, "421 at greeting once the oracle is gone", edge.log)
    assert_tempfail_greeting(edge)
    edge.wait_oracle_state(up=False)
    down_lines = re.findall(r"key oracle down: .*; oracle-down policy tempfail in force", edge.log())
    assert len(down_lines) >= 2, edge.log()  # at start, and now again
    edge.start_oracle()
    wait_starttls_offered(edge)
    deliver_over_starttls(edge, pki, "after the oracle came back")


# --- resume-only ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resume_edge(pki, tmp_path_factory):
    with running_edge(tmp_path_factory.mktemp("edge-resume-only"), pki, oracle_down="resume-only") as running:
        yield running


def first_visit(edge, context) -> ssl.SSLSession:
    """A full handshake and a message, while the oracle is up: the session to resume later."""
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.starttls(context)
        client.ehlo()
        queued_id(client.deliver(SENDER, [RECIPIENT], b"Subject: first visit\r\n\r\nbody\r\n"))
        client.expect("QUIT", 221)
        session = client.sock.session
    assert session is not None and session.has_ticket, "the edge sent no session ticket"
    return session


@pytest.fixture(scope="module")
def tickets(resume_edge, pki):
    """A TLS 1.3 and a TLS 1.2 session (each with its client context) from before the oracle goes away."""
    tls13, tls12 = tls_context(pki), tls_context(pki)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    sessions = {"TLSv1.3": (tls13, first_visit(resume_edge, tls13)), "TLSv1.2": (tls12, first_visit(resume_edge, tls12))}
    resume_edge.kill_oracle()
    resume_edge.wait_oracle_state(up=False)
    return sessions


@pytest.fixture(scope="module")
def ticket(tickets):
    return tickets["TLSv1.3"]


def test_resume_only_still_offers_starttls(resume_edge, ticket):
    with SmtpClient.connect(resume_edge.site.smtp_port) as client:
        assert client.greeting.code == 220
        assert "STARTTLS" in client.ehlo().keywords


def test_resume_only_mail_without_tls_is_deferred(resume_edge, ticket):
    before = resume_edge.site.spooled_files()
    with SmtpClient.connect(resume_edge.site.smtp_port) as client:
        client.ehlo()
        reply = client.command(f"MAIL FROM:<{SENDER}>")
        assert (reply.code, reply.enhanced) == (451, "4.7.0"), reply
        assert client.command(f"RCPT TO:<{RECIPIENT}>").code == 503
        client.expect("QUIT", 221)
    assert resume_edge.site.spooled_files() == before
    assert resume_edge.metric("yestls_edge_refused_total", reason="tls_required") >= 1


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_resume_only_resumed_session_delivers(resume_edge, tickets, version):
    context, session = tickets[version]
    marker = new_marker()
    message = message_with_marker(marker, "resumed while the oracle is away")
    with SmtpClient.connect(resume_edge.site.smtp_port) as client:
        client.ehlo()
        client.starttls(context, session=session)
        assert client.sock.session_reused, "the handshake was not a resumption"
        assert client.sock.version() == version
        client.ehlo()
        spool_id = queued_id(client.deliver(SENDER, [RECIPIENT], message))
        client.expect("QUIT", 221)
    unsealed = resume_edge.unseal(spool_id)
    assert unsealed.message.endswith(message)
    assert unsealed.metadata["tls"]["resumed"] is True
    assert unsealed.metadata["tls"]["version"] == version
    assert files_containing(resume_edge.site.directory, marker.encode()) == []


def test_resume_only_full_handshake_fails_cleanly(resume_edge, pki, ticket):
    with SmtpClient.connect(resume_edge.site.smtp_port) as client:
        client.ehlo()
        # No session: the server would need a signature. It ends the handshake with an alert at once;
        # a server that waited instead would run into the client's read timeout (TimeoutError, not caught).
        with pytest.raises((ssl.SSLError, ConnectionError)) as failure:
            client.starttls(tls_context(pki))
    assert not isinstance(failure.value, TimeoutError)
    # The edge goes on: a new connection is greeted, and a resumption still works.
    context, session = ticket
    with SmtpClient.connect(resume_edge.site.smtp_port) as client:
        assert client.greeting.code == 220
        client.ehlo()
        client.starttls(context, session=session)
        assert client.sock.session_reused
        client.expect("NOOP", 250)


def test_resume_only_is_logged_and_measured(resume_edge, ticket):
    wait_log(resume_edge, r"key oracle down: .*; oracle-down policy resume-only in force")
    assert resume_edge.metric("yestls_edge_oracle_up") == 0
    assert resume_edge.metric("yestls_edge_oracle_down_policy", policy="resume-only") == 1


# --- plaintext ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plaintext_edge(pki, tmp_path_factory):
    with running_edge(tmp_path_factory.mktemp("edge-plaintext"), pki, oracle_down="plaintext") as running:
        with SmtpClient.connect(running.site.smtp_port) as client:
            assert "STARTTLS" in client.ehlo().keywords  # while the oracle is up
        running.kill_oracle()
        running.wait_oracle_state(up=False)
        yield running


def test_plaintext_policy_accepts_mail_in_cleartext(plaintext_edge):
    edge = plaintext_edge
    marker = new_marker()
    message = message_with_marker(marker, "cleartext while the oracle is away")
    with SmtpClient.connect(edge.site.smtp_port) as client:
        assert client.greeting.code == 220
        assert "STARTTLS" not in client.ehlo().keywords
        reply = client.command("STARTTLS")
        assert (reply.code, reply.enhanced) == (454, "4.7.0"), reply
        spool_id = queued_id(client.deliver(SENDER, [RECIPIENT], message))
        client.expect("QUIT", 221)
    unsealed = edge.unseal(spool_id)
    assert unsealed.message.endswith(message) and unsealed.metadata["tls"] is None
    assert files_containing(edge.site.directory, marker.encode()) == []  # sealed all the same
    wait_log(edge, r"key oracle down: .*; oracle-down policy plaintext in force")
    assert edge.metric("yestls_edge_oracle_up") == 0
    assert edge.metric("yestls_edge_oracle_down_policy", policy="plaintext") == 1


def test_plaintext_policy_offers_starttls_again_once_the_oracle_is_back(plaintext_edge, pki):
    plaintext_edge.start_oracle()
    wait_starttls_offered(plaintext_edge)
    assert deliver_over_starttls(plaintext_edge, pki, "TLS again")["tls"] is not None
