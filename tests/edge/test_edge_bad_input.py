"""Bad input to `yestls edge serve`: each gets the right reply or a timeout, and the edge goes on.

One edge for the module, with small limits so that each is reached quickly:
a 100 kB message size, 2 s without a byte during DATA, 5 s between
commands, 3 s for a TLS handshake, 5 errors per session, 2 connections per
client address. Before each test the edge must have released every
connection of the one before (its connection gauge back to 0), so a
connection slot leaked by any case below fails the next test.

- command lines over the limit (600 bytes, 200 kB) -> 500 5.5.x, session goes on;
- binary junk -> 500 per line; a flood of junk -> the session ends, the edge stays
  (bare CR and LF, and SMTP smuggling, have tests/edge/test_edge_smuggling.py);
- paths Python's email parser fails on (`MAIL FROM:<`) -> 553 5.1.3, no traceback;
- commands out of order (MAIL before EHLO, RCPT before MAIL, DATA before
  RCPT, nested MAIL) -> 503 5.5.1;
- a pipelined flood of 3000 commands and a transaction -> every reply, in order;
- SIZE= over the limit -> 552 5.3.4 at MAIL; an oversized body -> 552 5.3.4;
- DATA lines over 1000 bytes go through intact, as Postfix keeps them (the limit is the size);
- a client that goes silent mid-DATA (or right after 354) -> closed by the
  server, nothing spooled, nothing left in tmp/;
- commands pipelined in cleartext behind STARTTLS are discarded, not run inside TLS;
- TLS handshakes abandoned halfway after STARTTLS (part of a ClientHello,
  then silence or a close; a whole ClientHello and then silence; junk
  instead of a ClientHello; the same on the implicit-TLS port) -> closed, and
  meanwhile another client delivers; a client that refuses our certificate
  is logged without a traceback;
- the errors-per-session cap -> 421 4.7.0 and the end of the session;
- a third connection from one address -> 421 4.7.0 at greeting.
After all of it the edge still delivers and tmp/ in the spool is empty.
"""

import os
import re
import socket
import ssl
import time
from contextlib import suppress

import pytest

from ..edge_smtp import (
    CLIENT_NAME,
    MX_NAME,
    SmtpClient,
    enhanced_code_problems,
    queued_id,
    running_edge,
    tls_context,
)

pytestmark = pytest.mark.timeout(180)

MAX_MESSAGE_SIZE = 100_000
COMMAND_TIMEOUT = 5
SILENT_CLIENTS_CLOSED_AT: list[float] = []  # monotonic times, for the log check at the end
SENDER = f"a@{CLIENT_NAME}"
RECIPIENT = "user@example.org"


@pytest.fixture(scope="module")
def edge(pki, tmp_path_factory):
    options = (f"max_message_size = {MAX_MESSAGE_SIZE}\ndata_timeout = 2\ncommand_timeout = {COMMAND_TIMEOUT}\n"
               "handshake_timeout = 3\nmax_errors = 5\nmax_connections_per_ip = 2\n")
    with running_edge(tmp_path_factory.mktemp("edge-bad-input"), pki, implicit_tls=True,
                      smtp_options=options) as running:
        yield running


@pytest.fixture(autouse=True)
def idle_edge(edge):
    """Each test starts with no connection open at the edge, and leaves its spool's tmp/ empty."""
    edge.wait_idle()
    yield
    assert edge.process_alive(), edge.log()
    assert edge.tmp_files() == [], "a half-written message was left in the spool's tmp/"


def deliver_once(edge, pki, subject: str = "still here") -> str:
    """A normal delivery over STARTTLS; the spool id (the message unseals intact)."""
    message = f"Subject: {subject}\r\n\r\nbody\r\n".encode()
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.starttls(tls_context(pki))
        client.ehlo()
        spool_id = queued_id(client.deliver(SENDER, [RECIPIENT], message))
        client.expect("QUIT", 221)
    assert edge.unseal(spool_id).message.endswith(message)
    return spool_id


def client_hello(pki) -> bytes:
    """The first flight of a real TLS client (Python's ssl) for mx.example.org: a ClientHello record."""
    outgoing = ssl.MemoryBIO()
    tls = tls_context(pki).wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=MX_NAME)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 100
    return hello


def at_starttls(edge) -> SmtpClient:
    client = SmtpClient.connect(edge.site.smtp_port)
    client.ehlo()
    client.expect("STARTTLS", 220)
    return client


# --- command lines --------------------------------------------------------------------------------

def test_overlong_command_lines(edge):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        for length in (600, 200_000):
            reply = client.command(b"NOOP " + b"x" * length)
            assert reply.code == 500 and reply.enhanced.startswith("5.5."), reply
        reply = client.command(f"MAIL FROM:<{'x' * 2000}@{CLIENT_NAME}>")
        assert reply.code // 100 == 5 and reply.enhanced, reply
        assert client.command("NOOP").code == 250  # the session goes on
        client.deliver(SENDER, [RECIPIENT], b"Subject: after long lines\r\n\r\nbody\r\n")


def test_the_mail_line_limit_is_this_sessions(edge):
    """512 bytes a command line (without CRLF); after EHLO, MAIL may be 26 (SIZE=) + 10 (SMTPUTF8) longer.
    Each session counts its own: aiosmtpd grew one limit shared by all sessions with every EHLO."""
    def mail_of(length: int) -> str:
        head = "MAIL FROM:<"
        tail = f"@{CLIENT_NAME}>"
        return head + "x" * (length - len(head) - len(tail)) + tail

    for _ in range(3):   # EHLO after EHLO, in sessions after sessions: the limit stays 548
        with SmtpClient.connect(edge.site.smtp_port) as client:
            client.ehlo()
            client.ehlo()
            assert client.command(mail_of(549)).code == 500
            reply = client.command(mail_of(548))
            assert reply.code != 500, reply   # not refused as too long (the local part is: 553)
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.expect(f"HELO {CLIENT_NAME}", 250)
        assert client.command(mail_of(513)).code == 500
        assert client.command(mail_of(512)).code != 500


@pytest.mark.parametrize("line", [b" ", b"   ", b" NOOP", b"NOOP\tx", b"\xc3\xa9HLO x", b"NO OP"])
def test_lines_that_are_no_command(edge, line):
    """An empty or blank line, a verb after a space, a tab, a verb that is not ASCII: 500, the session goes on."""
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        reply = client.command(line)
        assert reply.code == 500 and reply.enhanced.startswith("5.5."), reply
        assert client.command("NOOP").code == 250


def test_five_unknown_commands_end_the_session(edge):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        for number in range(4):
            reply = client.command(f"XYZZY{number}")
            assert reply.code == 500 and f'"XYZZY{number}" not recognized' in reply.text, reply
        reply = client.command("XYZZY")
        assert reply.code == 502 and "Too many unrecognized commands" in reply.text, reply
        client.wait_closed(timeout=10)


def test_binary_junk(edge, pki):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        for junk in (b"\x00\x01\x02\xff\xfe\xfd", b"\x80\x81\x82 \xc3\x28 \xed\xa0\x80",
                     b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
                     + os.urandom(32).replace(b"\n", b"").replace(b"\r", b"")):
            reply = client.command(junk)
            assert reply.code == 500 and reply.enhanced.startswith("5.5."), reply
        assert client.command("NOOP").code == 250
    before = edge.site.spooled_files()
    # A flood of random bytes: the session ends (its first bare CR or LF, the errors cap) and the edge does not.
    with SmtpClient.connect(edge.site.smtp_port) as client:
        with suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(16):
                client.send(os.urandom(65536))
        client.wait_closed(timeout=30)
    # Junk without any line end, then a close.
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.send(os.urandom(300_000).replace(b"\n", b"."))
    assert edge.site.spooled_files() == before
    edge.wait_idle()
    deliver_once(edge, pki, "after junk")


def test_commands_out_of_order(edge):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        out_of_order = [client.command(f"MAIL FROM:<{SENDER}>")]
        client.ehlo()
        out_of_order.append(client.command(f"RCPT TO:<{RECIPIENT}>"))
        out_of_order.append(client.command("DATA"))
        client.expect(f"MAIL FROM:<{SENDER}>", 250)
        out_of_order.append(client.command("DATA"))
        out_of_order.append(client.command(f"MAIL FROM:<{SENDER}>"))
        assert [(r.code, r.enhanced) for r in out_of_order] == [(503, "5.5.1")] * 5, "\n".join(map(str, out_of_order))
    # Five errors reach the cap; a new session is a clean slate, and the order still holds.
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.expect(f"MAIL FROM:<{SENDER}>", 250)
        client.expect(f"MAIL FROM:<{SENDER}>", 503)
        client.expect(f"RCPT TO:<{RECIPIENT}>", 250)
        assert client.data(b"Subject: in order\r\n\r\nbody\r\n").code == 250


@pytest.mark.parametrize("command", ["MAIL FROM:<", "RCPT TO:<", "RCPT TO:<a@[ ", "MAIL FROM:<a@[ >", "MAIL FROM:<a@[ "])
def test_paths_the_email_parser_fails_on_are_malformed(edge, command):
    """Python's email parser (aiosmtpd's) raises IndexError, AttributeError or UnboundLocalError on these,
    which the edge answered `451 4.3.0` (retry: forever) with a traceback: `553 5.1.3` now, the session goes on."""
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        if command.startswith("RCPT"):
            client.expect(f"MAIL FROM:<{SENDER}>", 250)
        reply = client.command(command)
        assert (reply.code, reply.enhanced) == (553, "5.1.3"), reply   # a malformed path (aiosmtpd's words)
        assert "IndexError" not in reply.text, reply
        client.expect("RSET", 250)
    assert "Traceback" not in edge.log() and "SMTP session error" not in edge.log()


def test_pipelined_flood(edge):
    flood = 3000
    message = b"Subject: pipelined\r\n\r\nbody\r\n"
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.send(f"EHLO {CLIENT_NAME}\r\n".encode() + b"NOOP\r\n" * flood + b"RSET\r\n"
                    + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nRCPT TO:<user2@example.org>\r\nDATA\r\n"
                    .encode())
        replies = [client.read_reply() for _ in range(1 + flood + 5)]
        client.send(message + b".\r\n")
        final = client.read_reply()
        client.expect("QUIT", 221)
    assert [r.code for r in replies] == [250] * (flood + 5) + [354]
    assert not enhanced_code_problems(replies[1:])
    assert edge.unseal(queued_id(final)).metadata["rcpt_tos"] == [RECIPIENT, "user2@example.org"]


# --- DATA -----------------------------------------------------------------------------------------

def test_message_size_limit(edge):
    before = edge.site.spooled_files()
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        assert client.ehlo().keywords["SIZE"] == str(MAX_MESSAGE_SIZE)
        reply = client.command(f"MAIL FROM:<{SENDER}> SIZE={MAX_MESSAGE_SIZE + 1}")
        assert (reply.code, reply.enhanced) == (552, "5.3.4"), reply
        # Without SIZE=, the body itself is too big: refused after the final dot.
        client.expect(f"MAIL FROM:<{SENDER}>", 250)
        client.expect(f"RCPT TO:<{RECIPIENT}>", 250)
        body = (b"y" * 78 + b"\r\n") * (MAX_MESSAGE_SIZE // 80 + 100)
        reply = client.data(b"Subject: too big\r\n\r\n" + body)
        assert (reply.code, reply.enhanced) == (552, "5.3.4"), reply
        assert edge.site.spooled_files() == before
        # The limit itself is allowed at MAIL.
        client.expect(f"MAIL FROM:<{SENDER}> SIZE={MAX_MESSAGE_SIZE}", 250)
        client.expect(f"RCPT TO:<{RECIPIENT}>", 250)
        assert client.data(b"Subject: small\r\n\r\nbody\r\n").code == 250
    assert edge.tmp_files() == []


def test_long_lines_in_data_go_through_whole(edge):
    """As Postfix does, a line longer than RFC 5321's 1000 octets is kept as it is: the limit is the size."""
    for length in (998, 999, 5000, MAX_MESSAGE_SIZE // 2):
        message = b"Subject: long line\r\n\r\n" + b"z" * length + b"\r\nend\r\n"
        with SmtpClient.connect(edge.site.smtp_port) as client:
            client.ehlo()
            client.expect(f"MAIL FROM:<{SENDER}>", 250)
            client.expect(f"RCPT TO:<{RECIPIENT}>", 250)
            spool_id = queued_id(client.data(message))
        assert edge.unseal(spool_id).message.endswith(message)


@pytest.mark.parametrize("sent_before_silence", [b"Subject: half\r\n\r\nfirst line\r\nsecond li", b""],
                         ids=["mid-data", "after-354"])
def test_client_silent_in_data(edge, pki, sent_before_silence):
    before = edge.site.spooled_files()
    with SmtpClient.connect(edge.site.smtp_port) as silent:
        silent.ehlo()
        silent.expect(f"MAIL FROM:<{SENDER}>", 250)
        silent.expect(f"RCPT TO:<{RECIPIENT}>", 250)
        silent.expect("DATA", 354)
        silent.send(sent_before_silence)
        # While it hangs, others are served.
        deliver_once(edge, pki, "while another client hangs in DATA")
        silent.wait_closed(timeout=30)  # data_timeout (2 s) or command_timeout (5 s), not the default minutes
    SILENT_CLIENTS_CLOSED_AT.append(time.monotonic())
    assert len(edge.site.spooled_files()) == len(before) + 1  # only the other client's message
    assert edge.tmp_files() == []


# --- TLS ------------------------------------------------------------------------------------------

def test_handshake_abandoned_after_part_of_a_client_hello(edge, pki):
    hello = client_hello(pki)
    with at_starttls(edge) as abandoned:
        abandoned.send(hello[: len(hello) // 2])
        deliver_once(edge, pki, "while a handshake hangs")
        abandoned.wait_closed(timeout=30)  # handshake_timeout is 3 s
    edge.wait_idle()
    with at_starttls(edge) as closing:
        closing.send(hello[:20])
    edge.wait_idle()
    deliver_once(edge, pki, "after abandoned handshakes")


def test_handshake_abandoned_after_the_server_flight(edge, pki):
    """A whole ClientHello (the oracle signs), the server's flight read, and then silence."""
    with at_starttls(edge) as abandoned:
        abandoned.send(client_hello(pki))
        first = abandoned.sock.recv(5)
        assert first[:1] == b"\x16", first  # a handshake record: ServerHello
        deliver_once(edge, pki, "while a handshake waits for the client's Finished")
        abandoned.wait_closed(timeout=30)
    edge.wait_idle()


def test_commands_pipelined_behind_starttls_are_discarded(edge, pki):
    """RFC 3207 4.2 (the CVE-2011-0411 injection): cleartext sent with STARTTLS is not run inside TLS."""
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.send(b"STARTTLS\r\nMAIL FROM:<injected@foreign.example>\r\nRCPT TO:<user@example.org>\r\n")
        reply = client.read_reply()
        assert reply.code == 220 and not client.buffer, (reply, client.buffer)
        client.sock = tls_context(pki).wrap_socket(client.sock, server_hostname=MX_NAME)
        client.ehlo()
        # Had the injected MAIL been run, this RCPT would be accepted; it was not, so there is no transaction.
        reply = client.command(f"RCPT TO:<{RECIPIENT}>")
        assert (reply.code, reply.enhanced) == (503, "5.5.1"), reply
        client.expect(f"MAIL FROM:<{SENDER}>", 250)


def test_junk_instead_of_a_client_hello(edge, pki):
    with at_starttls(edge) as client:
        client.send(b"EHLO this is not TLS\r\n")
        received = client.wait_closed(timeout=30)
        assert not received.startswith(b"250"), received  # nothing answered in cleartext after 220
    edge.wait_idle()
    deliver_once(edge, pki, "after junk in a handshake")


def test_implicit_tls_handshake_abandoned(edge, pki):
    hello = client_hello(pki)
    with socket.create_connection(("127.0.0.1", edge.site.implicit_tls_port), timeout=10) as raw:
        raw.sendall(hello[: len(hello) // 2])
        deliver_once(edge, pki, "while an implicit-TLS handshake hangs")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the server closes at its handshake timeout
            with suppress(TimeoutError):
                if not raw.recv(65536):
                    break
        else:
            raise AssertionError("the implicit-TLS listener kept an abandoned handshake open")
    with SmtpClient.connect(edge.site.implicit_tls_port, tls=tls_context(pki)) as client:
        client.ehlo()
        client.deliver(SENDER, [RECIPIENT], b"Subject: implicit after abandoned\r\n\r\nbody\r\n")


def test_a_client_that_refuses_our_certificate_is_logged_without_a_traceback(edge):
    """An ordinary failure caused by a client (here: it does not trust our CA) is one log line, not a trace."""
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        port = client.sock.getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(ssl.create_default_context())  # the system CAs never signed the test chain
    edge.wait_idle()
    records = [r for r in log_records(edge.log()) if f"127.0.0.1:{port}" in r or f"'127.0.0.1', {port})" in r]
    assert records, edge.log()
    noisy = [r for r in records if " ERROR " in r.split("\n", 1)[0] or "Traceback" in r]
    assert not noisy, "\n".join(noisy)


def log_records(log: str) -> list[str]:
    """The edge's log as records: a timestamped line and the lines (a traceback) that follow it."""
    return [r for r in re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} )", log) if r]


# --- caps -----------------------------------------------------------------------------------------

def test_errors_per_session_cap(edge):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        errors = [client.command(line) for line in ("FOO", "RCPT TO:<x@example.org>", "DATA", "BAR", "VRFY x")]
        assert all(r.code // 100 == 5 for r in errors), "\n".join(map(str, errors))
        goodbye = client.read_reply()
        assert (goodbye.code, goodbye.enhanced) == (421, "4.7.0"), goodbye
        client.wait_closed(timeout=10)


def test_connections_per_ip_cap(edge, pki):
    first = SmtpClient.connect(edge.site.smtp_port)
    second = SmtpClient.connect(edge.site.smtp_port)
    try:
        assert first.greeting.code == second.greeting.code == 220
        with SmtpClient.connect(edge.site.smtp_port) as third:
            assert (third.greeting.code, third.greeting.enhanced) == (421, "4.7.0"), third.greeting
            third.wait_closed(timeout=10)
        assert first.command("NOOP").code == 250 and second.command("NOOP").code == 250
    finally:
        first.close()
        second.close()
    edge.wait_idle()
    deliver_once(edge, pki, "after the cap")


def test_still_delivering_and_nothing_half_written(edge, pki):
    deliver_once(edge, pki, "the end")
    assert edge.tmp_files() == []
    for path in edge.site.spooled_files():
        edge.unseal(path.name.rsplit("-", 1)[1])


def test_no_unhandled_error_in_the_edge_log(edge):
    """Nothing above left the edge an exception it did not handle (asyncio logs those: "Exception in ...").

    A session dropped in DATA must leave no timer behind: one that fires
    `command_timeout` later on the dead session is such an exception. The
    check waits until that time has passed for the silent clients above.
    """
    if SILENT_CLIENTS_CLOSED_AT:
        time.sleep(max(0.0, max(SILENT_CLIENTS_CLOSED_AT) + COMMAND_TIMEOUT + 1 - time.monotonic()))
    unhandled = [line for line in edge.log().splitlines() if " asyncio ERROR " in line]
    assert not unhandled, edge.log()
