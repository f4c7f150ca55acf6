"""SMTP smuggling and its relatives at the edge: what the client sends is one thing, never two.

Against a running `yestls edge serve` (plaintext and after STARTTLS):
- every false end of DATA (`\\n.\\n`, `\\n.\\r\\n`, `\\r.\\r`, `\\r\\n.\\n`, `\\r.\\r\\n`, ...)
  followed by a whole second transaction ends the session with 521 5.5.2 at
  once: nothing is sealed, and nothing after it is answered as a command;
- bare CR or LF in a command line: the same;
- a NUL byte in the content: the message is read to its end and refused
  (554 5.6.0); the session goes on;
- BDAT (no CHUNKING offered): refused and the session ends, the chunk never
  read as commands;
- content pipelined right behind DATA, before the 354, is the content; after
  a refused DATA it is commands again;
- the false ends split across TCP segments at every place are still caught;
- envelope addresses: control characters, line separators, bytes that are
  not UTF-8, an over-long local part, UTF-8 without SMTPUTF8 are refused
  at MAIL (553 5.1.7 / 5.6.7) and RCPT (553 5.1.3 / 5.6.7), the session going
  on; a bare CR in one ends the session; refused recipients are logged as
  their domain and a tag, never in full.
"""

import secrets

import pytest

from ..edge_smtp import CLIENT_NAME, ConnectionClosed, SmtpClient, dot_stuff, queued_id, running_edge, tls_context

pytestmark = pytest.mark.timeout(300)

SENDER = f"a@{CLIENT_NAME}"
RECIPIENT = "user@example.org"
VICTIM = "user2@example.org"
SECOND_TRANSACTION = (f"MAIL FROM:<evil@{CLIENT_NAME}>\r\nRCPT TO:<{VICTIM}>\r\nDATA\r\n"
                      "Subject: smuggled\r\n\r\nsmuggled body\r\n.\r\n").encode()

# Line end + "." + line end forms that some MTA or LMTP server takes for the end of DATA.
FALSE_ENDS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.LF": b"\r.\n",
    "LF..LF": b"\n..\n",
    "CRLF..LF": b"\r\n..\n",
    "LF": b"\n",
    "CR": b"\r",
}


@pytest.fixture(scope="module")
def edge(pki, tmp_path_factory):
    with running_edge(tmp_path_factory.mktemp("edge-smuggling"), pki) as running:
        yield running


@pytest.fixture(params=["plaintext", "starttls"])
def session(request, edge, pki):
    """A client after EHLO (and STARTTLS with a verified handshake, for the second param)."""
    client = SmtpClient.connect(edge.site.smtp_port)
    client.ehlo()
    if request.param == "starttls":
        client.starttls(tls_context(pki))
        client.ehlo()
    yield client
    client.close()


def assert_ended_with_521(client: SmtpClient) -> None:
    reply = client.read_reply()
    assert (reply.code, reply.enhanced) == (521, "5.5.2"), reply
    rest = client.wait_closed(timeout=30)
    assert rest == b"", f"the edge answered something after its 521: {rest!r}"


def assert_nothing_new(edge, before) -> None:
    assert edge.site.spooled_files() == before
    assert edge.tmp_files() == []


@pytest.mark.parametrize("false_end", FALSE_ENDS.values(), ids=FALSE_ENDS.keys())
def test_a_false_end_of_data_ends_the_session_and_nothing_is_sealed(edge, session, false_end):
    before = edge.site.spooled_files()
    session.expect(f"MAIL FROM:<{SENDER}>", 250)
    session.expect(f"RCPT TO:<{RECIPIENT}>", 250)
    session.expect("DATA", 354)
    session.send(b"Subject: first\r\n\r\nfirst body" + false_end + SECOND_TRANSACTION + b"QUIT\r\n")
    assert_ended_with_521(session)
    assert_nothing_new(edge, before)


@pytest.mark.parametrize("false_end", [FALSE_ENDS["LF.CRLF"], FALSE_ENDS["CR.CR"], FALSE_ENDS["CRLF.LF"]],
                         ids=["LF.CRLF", "CR.CR", "CRLF.LF"])
def test_a_false_end_split_across_segments_is_caught_wherever_it_is_cut(edge, false_end):
    before = edge.site.spooled_files()
    stream = b"Subject: split\r\n\r\nbody" + false_end + SECOND_TRANSACTION
    start = len(b"Subject: split\r\n\r\nbody")
    for cut in range(start - 1, start + len(false_end) + 2):
        with SmtpClient.connect(edge.site.smtp_port) as client:
            client.ehlo()
            client.expect(f"MAIL FROM:<{SENDER}>", 250)
            client.expect(f"RCPT TO:<{RECIPIENT}>", 250)
            client.expect("DATA", 354)
            client.send(stream[:cut])
            client.sock.settimeout(0.2)  # let the first piece arrive on its own
            try:
                client.sock.recv(1, 0x02)  # MSG_PEEK: nothing is expected yet
            except TimeoutError:
                pass
            client.sock.settimeout(10)
            try:
                client.send(stream[cut:])
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert_ended_with_521(client)
    assert_nothing_new(edge, before)


@pytest.mark.parametrize("line", [
    b"NOOP\n", b"NOOP\rRSET\r\n", b"MAIL FROM:<" + SENDER.encode() + b">\r\rRCPT TO:<x@example.org>\r\n",
    b"EHLO x\n.\r\n", b"RSET\r\n\n", b"\r\r\n",
], ids=["LF", "CR inside", "CR CR", "LF dot", "empty LF line", "CR CRLF"])
def test_a_bare_line_end_in_a_command_ends_the_session(edge, session, line):
    session.send(line + f"MAIL FROM:<{SENDER}>\r\nNOOP\r\n".encode())
    reply = session.read_reply()
    if line.startswith(b"RSET\r\n") and reply.code == 250:
        reply = session.read_reply()  # the whole line before it may be answered before the end
    assert (reply.code, reply.enhanced) == (521, "5.5.2"), reply
    assert session.wait_closed(timeout=30) == b"", "an answer after the 521"


@pytest.mark.parametrize("where", [b"\x00Subject: nul\r\n\r\nbody\r\n", b"Subject: nul\r\n\r\nbo\x00dy\r\n",
                                   b"Subject: nul\r\n\r\nbody\r\n\x00.\r\n"], ids=["start", "body", "dot line"])
def test_nul_in_the_content_refuses_the_message_and_the_session_goes_on(edge, session, where):
    before = edge.site.spooled_files()
    session.expect(f"MAIL FROM:<{SENDER}>", 250)
    session.expect(f"RCPT TO:<{RECIPIENT}>", 250)
    session.expect("DATA", 354)
    session.send(where + b".\r\n")
    reply = session.read_reply()
    assert (reply.code, reply.enhanced) == (554, "5.6.0"), reply
    assert_nothing_new(edge, before)
    spool_id = queued_id(session.deliver(SENDER, [RECIPIENT], b"Subject: after the NUL\r\n\r\nbody\r\n"))
    assert edge.unseal(spool_id).metadata["rcpt_tos"] == [RECIPIENT]


def test_bdat_is_refused_and_its_chunk_is_never_a_command(edge, session):
    before = edge.site.spooled_files()
    session.expect(f"MAIL FROM:<{SENDER}>", 250)
    session.expect(f"RCPT TO:<{RECIPIENT}>", 250)
    chunk = SECOND_TRANSACTION + b"QUIT\r\n"
    session.send(f"BDAT {len(chunk)} LAST\r\n".encode() + chunk)
    reply = session.read_reply()
    assert (reply.code, reply.enhanced) == (502, "5.5.1"), reply
    assert session.wait_closed(timeout=30) == b"", "a reply to the chunk's lines"
    assert_nothing_new(edge, before)


def test_content_pipelined_before_the_354_is_the_content(edge, session):
    message = b"Subject: eager\r\n\r\n.a dot line\r\nMAIL FROM:<x@y.example>\r\n"
    session.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode() + dot_stuff(message)
                 + b"NOOP\r\n")
    replies = [session.read_reply() for _ in range(5)]
    assert [r.code for r in replies] == [250, 250, 354, 250, 250], replies
    assert edge.unseal(queued_id(replies[3])).message.endswith(message)


def test_after_a_refused_data_what_followed_is_commands(edge, session):
    session.send(f"MAIL FROM:<{SENDER}>\r\nDATA\r\nNOOP\r\nRSET\r\n".encode())
    replies = [session.read_reply() for _ in range(4)]
    assert [(r.code, r.enhanced) for r in replies] == [(250, "2.1.0"), (503, "5.5.1"), (250, "2.0.0"),
                                                      (250, "2.0.0")], replies


def test_a_whole_pipelined_transaction_after_a_message_runs_in_order(edge, session):
    first, second = b"Subject: one\r\n\r\n1\r\n", b"Subject: two\r\n\r\n2\r\n"
    transaction = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()
    session.send(transaction + dot_stuff(first) + transaction + dot_stuff(second) + b"QUIT\r\n")
    replies = [session.read_reply() for _ in range(9)]
    assert [r.code for r in replies] == [250, 250, 354, 250, 250, 250, 354, 250, 221], replies
    assert edge.unseal(queued_id(replies[3])).message.endswith(first)
    assert edge.unseal(queued_id(replies[7])).message.endswith(second)


def test_the_edge_lives_on(edge, pki):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.starttls(tls_context(pki))
        client.ehlo()
        queued_id(client.deliver(SENDER, [RECIPIENT], b"Subject: still here\r\n\r\nbody\r\n"))
    assert edge.process_alive()
    assert "Traceback" not in edge.log()


def test_connection_closed_is_what_the_client_sees_after_521(edge):
    """The 521 is the last thing on the wire: a client reading on gets the end, not a hang."""
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.send(b"EHLO x\n")
        assert client.read_reply().code == 521
        with pytest.raises(ConnectionClosed):
            client.read_reply()


# --- envelope addresses -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sender, expected", [
    ("a\x01b@sender.example.net", (553, "5.1.7")),
    ("ab\x7f@sender.example.net", (553, "5.1.7")),
    ("a\u2028b@sender.example.net", (553, "5.1.7")),           # a line separator, under SMTPUTF8 too
    ("a>b@sender.example.net", (501, "5.5.4")),                # aiosmtpd: the path ends at the first >
    ("x" * 65 + "@sender.example.net", (553, "5.1.7")),
    ("jörg@sender.example.net", (553, "5.6.7")),               # UTF-8 without SMTPUTF8
], ids=["SOH", "DEL", "U+2028", "angle", "long local part", "UTF-8 without SMTPUTF8"])
def test_a_sender_address_unfit_for_a_path_is_refused_at_mail(edge, sender, expected):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        options = " SMTPUTF8" if sender == "a\u2028b@sender.example.net" else ""
        reply = client.command(f"MAIL FROM:<{sender}>{options}".encode())
        assert (reply.code, reply.enhanced) == expected, reply
        client.expect(f"MAIL FROM:<{SENDER}>", 250)  # the session goes on


def test_white_space_in_a_local_part_travels_quoted(edge):
    """aiosmtpd reads a path as an RFC 5322 address: "a<TAB>b" becomes the quoted string "a b", which is
    one valid mailbox; no control character reaches the sealed envelope."""
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.expect("MAIL FROM:<a\tb@sender.example.net>", 250)
        client.expect(f"RCPT TO:<{RECIPIENT}>", 250)
        spool_id = queued_id(client.data(b"Subject: tab\r\n\r\nbody\r\n"))
    assert edge.unseal(spool_id).metadata["mail_from"] == '"a b"@sender.example.net'


def test_bytes_that_are_not_utf8_in_an_address_are_refused(edge):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        reply = client.command(b"MAIL FROM:<a\xff\xfeb@sender.example.net> SMTPUTF8")
        assert (reply.code, reply.enhanced) == (553, "5.1.7"), reply
        client.expect(f"MAIL FROM:<{SENDER}> SMTPUTF8", 250)
        reply = client.command(b"RCPT TO:<us\xc3er@example.org>")
        assert (reply.code, reply.enhanced) == (553, "5.1.3"), reply


def test_a_utf8_recipient_needs_smtputf8(edge):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.expect(f"MAIL FROM:<{SENDER}>", 250)
        reply = client.command("RCPT TO:<jörg@example.org>".encode())
        assert (reply.code, reply.enhanced) == (553, "5.6.7"), reply
        client.expect("RSET", 250)
        client.expect(f"MAIL FROM:<{SENDER}> SMTPUTF8", 250)
        client.expect("RCPT TO:<jörg@example.org>".encode(), 250)


def test_a_bare_cr_in_an_address_ends_the_session(edge):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.send(b"MAIL FROM:<a\rb@sender.example.net>\r\n")
        assert_ended_with_521(client)


def test_refused_recipients_are_not_written_to_the_log_in_full(edge):
    local = f"nosuch{secrets.token_hex(6)}"
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.expect(f"MAIL FROM:<{SENDER}>", 250)
        for address in (f"{local}@foreign.example", f"{local}%foreign.example@example.org"):
            assert client.command(f"RCPT TO:<{address}>").code == 550
    log = edge.log()
    assert local not in log
    assert "refused a recipient at 'foreign.example' (#" in log
