"""The intake's LMTP client against a server that reads lines as leniently as any: nothing is smuggled.

The server here (in this process) ends a line at CRLF, a bare CR or a bare
LF, takes a line "." (or "." then a NUL, as a C reader would) for the end of
DATA, undoes dot-stuffing, and runs whatever lines follow as commands: the
most a compromised edge's message could hope for. Each smuggling body
(tests/smuggling.py) is delivered to it with and without CHUNKING. Either way
the server sees one transaction to the one recipient; with BDAT it gets the
bytes exactly, with DATA every line end made CRLF and nothing more. A
command line with a line break in it is never written.
"""

import asyncio
import re
from dataclasses import dataclass, field

import pytest

from relay.home.lmtp import LmtpError, LmtpMessage, LmtpSession, data_body, deliver

from ..smuggling import smuggling_cases

RCPT = "user@example.org"
VICTIM = "victim@example.org"
SMUGGLING = smuggling_cases()
TIMEOUT = 20.0


@dataclass
class Transaction:
    mail_from: str
    recipients: list[str] = field(default_factory=list)
    message: bytes | None = None


@dataclass
class LenientServer:
    chunking: bool
    transactions: list[Transaction] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    refused: frozenset[str] = frozenset()      # RCPT TO:<these> gets 550
    refuse_sender: bool = False                # every MAIL gets 451
    hang_up_after: int | None = None           # close each connection after this many transactions
    connections: int = 0
    reads: list[bytes] = field(default_factory=list)   # what each read() returned: pipelined commands come together

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        self.connections += 1
        done_here = 0

        async def line() -> bytes | None:
            """The next line, ended by CRLF, CR or LF (a CR at the end of what came so far waits for more)."""
            while True:
                match = re.search(rb"\r\n|\r(?=[^\n])|\n", buffer)
                if match:
                    text = bytes(buffer[:match.start()])
                    del buffer[:match.end()]
                    return text
                more = await reader.read(65536)
                if not more:
                    return None
                self.reads.append(more)
                buffer.extend(more)

        async def exactly(count: int) -> bytes:
            while len(buffer) < count:
                more = await reader.read(65536)
                if not more:
                    raise ConnectionError("client went away inside BDAT")
                buffer.extend(more)
            data = bytes(buffer[:count])
            del buffer[:count]
            return data

        def reply(text: str) -> None:
            writer.write(text.encode() + b"\r\n")

        reply("220 lenient LMTP")
        current: Transaction | None = None
        while (command := await line()) is not None:
            self.commands.append(command)
            verb = command[:4].upper()
            if verb == b"LHLO":
                reply("250-lenient" + ("\r\n250-CHUNKING" if self.chunking else "") + "\r\n250 PIPELINING")
            elif verb == b"RSET":
                current = None
                reply("250 2.0.0 OK")
            elif verb == b"MAIL" and self.refuse_sender:
                reply("451 4.3.0 not now")
            elif verb == b"MAIL":
                current = Transaction(command.decode(errors="replace"))
                self.transactions.append(current)
                reply("250 2.1.0 OK")
            elif verb == b"RCPT" and current is not None:
                if command.decode(errors="replace")[9:-1] in self.refused:
                    reply("550 5.1.1 no such user")
                else:
                    current.recipients.append(command.decode(errors="replace"))
                    reply("250 2.1.5 OK")
            elif verb == b"RCPT":
                reply("503 5.5.1 MAIL first")
            elif verb == b"DATA" and current is not None:
                reply("354 go ahead")
                lines = []
                while (text := await line()) is not None and text.split(b"\0")[0] != b".":
                    lines.append(text[1:] if text.startswith(b".") else text)
                current.message = b"".join(text + b"\r\n" for text in lines)
                for _ in current.recipients:
                    reply("250 2.0.0 saved")
                current, done_here = None, done_here + 1
            elif verb == b"BDAT" and current is not None:
                size = int(command.split()[1])
                current.message = await exactly(size)
                for _ in current.recipients:
                    reply("250 2.0.0 saved")
                current, done_here = None, done_here + 1
            elif verb == b"QUIT":
                reply("221 bye")
                break
            else:
                reply("500 5.5.1 what")
            await writer.drain()
            if self.hang_up_after is not None and done_here >= self.hang_up_after:
                break
        writer.close()


async def deliver_to_lenient_server(message: bytes, *, chunking: bool, mail_from: str = "alice@example.net",
                                    recipients: tuple[str, ...] = (RCPT,)) -> tuple[LenientServer, object]:
    server = LenientServer(chunking)
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        try:
            result = await deliver(("127.0.0.1", port), mail_from, list(recipients), message, timeout=TIMEOUT)
        except LmtpError as error:
            result = error
        await asyncio.sleep(0)   # let the server take the QUIT
    finally:
        listening.close()
        await listening.wait_closed()
    return server, result


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def body_of(name: str) -> bytes:
    return b"Subject: " + name.encode() + b"\r\n\r\n" + SMUGGLING[name](RCPT, VICTIM)


@pytest.mark.parametrize("name", SMUGGLING)
def test_with_chunking_the_message_goes_exactly_and_alone(name):
    message = body_of(name)
    server, replies = run(deliver_to_lenient_server(message, chunking=True))
    assert [t.recipients for t in server.transactions] == [[f"RCPT TO:<{RCPT}>"]]
    assert server.transactions[0].message == message
    assert {r: reply.code for r, reply in replies.items()} == {RCPT: 250}
    assert not any(c.upper().startswith(b"DATA") for c in server.commands)


@pytest.mark.parametrize("name", SMUGGLING)
def test_without_chunking_every_line_end_is_made_crlf_and_nothing_is_smuggled(name):
    message = body_of(name)
    server, replies = run(deliver_to_lenient_server(message, chunking=False))
    assert [t.recipients for t in server.transactions] == [[f"RCPT TO:<{RCPT}>"]], server.commands
    expected = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    assert server.transactions[0].message == expected + (b"" if expected.endswith(b"\r\n") else b"\r\n")
    assert {r: reply.code for r, reply in replies.items()} == {RCPT: 250}
    assert not any(VICTIM.encode() in c for c in server.commands)


@pytest.mark.parametrize("message, expected", [
    (b"a\nb\rc\r\nd", b"a\r\nb\r\nc\r\nd\r\n"),
    (b".leading\n..two\r.\r\n", b"..leading\r\n...two\r\n..\r\n"),
    (b"", b"\r\n"),
    (b"\r\n.", b"\r\n..\r\n"),
])
def test_data_body_makes_every_line_end_crlf_then_stuffs_dots(message, expected):
    assert data_body(message) == expected


@pytest.mark.parametrize("mail_from, recipients", [
    ("alice@example.net>\r\nRCPT TO:<victim@example.org", (RCPT,)),
    ("alice@example.net", (f"{RCPT}>\nRCPT TO:<{VICTIM}",)),
    ("alice@example.net", (f"{RCPT}\rRCPT TO:<{VICTIM}>",)),
    ("alice\x00@example.net", (RCPT,)),
])
def test_a_command_with_a_line_break_or_nul_is_never_written(mail_from, recipients):
    server, result = run(deliver_to_lenient_server(b"Subject: x\r\n\r\nx\r\n", chunking=True, mail_from=mail_from,
                                                   recipients=recipients))
    assert isinstance(result, LmtpError) and "refusing to send" in str(result)
    assert not any(VICTIM.encode() in c for c in server.commands)
    assert all(t.message is None for t in server.transactions), "no message went"


# --- one session, many messages ----------------------------------------------------------------------------

async def with_lenient_server(server: LenientServer, work):
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    try:
        return await work(("127.0.0.1", listening.sockets[0].getsockname()[1]))
    finally:
        listening.close()
        await listening.wait_closed()


def message_number(n: int) -> bytes:
    return f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode()


@pytest.mark.parametrize("chunking", [True, False])
def test_a_session_delivers_a_run_of_messages_on_one_connection_with_rset_between(chunking):
    server = LenientServer(chunking)

    async def work(address):
        async with LmtpSession(address, timeout=TIMEOUT) as session:
            return [await session.deliver("alice@example.net", [RCPT], message_number(n)) for n in range(5)]

    results = run(with_lenient_server(server, work))
    assert [{r: reply.code for r, reply in replies.items()} for replies in results] == [{RCPT: 250}] * 5
    assert server.connections == 1
    assert [t.message for t in server.transactions] == [message_number(n) for n in range(5)]
    assert [c for c in server.commands if c.upper() in (b"RSET", b"QUIT")] == [b"RSET"] * 4 + [b"QUIT"]


def test_rset_mail_and_every_rcpt_go_in_one_write_and_each_recipient_keeps_its_own_answer():
    server = LenientServer(chunking=True, refused=frozenset({"nobody@example.org"}))
    recipients = [RCPT, "nobody@example.org", VICTIM]

    async def work(address):
        async with LmtpSession(address, timeout=TIMEOUT) as session:
            first = await session.deliver("alice@example.net", recipients, message_number(1))
            server.reads.clear()
            second = await session.deliver("alice@example.net", recipients, message_number(2))
            return first, second

    first, second = run(with_lenient_server(server, work))
    for replies in (first, second):
        assert {r: reply.code for r, reply in replies.items()} == {RCPT: 250, "nobody@example.org": 550, VICTIM: 250}
    envelope = server.reads[0]
    assert envelope.startswith(b"RSET\r\nMAIL FROM:") and envelope.count(b"RCPT TO:") == 3, envelope
    assert [t.recipients for t in server.transactions] == [[f"RCPT TO:<{RCPT}>", f"RCPT TO:<{VICTIM}>"]] * 2


def test_a_refused_sender_reads_every_pipelined_reply_so_the_next_message_is_not_out_of_step():
    server = LenientServer(chunking=True, refuse_sender=True)

    async def work(address):
        async with LmtpSession(address, timeout=TIMEOUT) as session:
            refused = await session.deliver("alice@example.net", [RCPT, VICTIM], message_number(1))
            server.refuse_sender = False
            taken = await session.deliver("alice@example.net", [RCPT], message_number(2))
            return refused, taken

    refused, taken = run(with_lenient_server(server, work))
    assert {r: reply.code for r, reply in refused.items()} == {RCPT: 451, VICTIM: 451}
    assert {r: reply.code for r, reply in taken.items()} == {RCPT: 250}
    assert server.connections == 1 and [t.message for t in server.transactions] == [message_number(2)]


def test_a_connection_the_server_closed_while_idle_is_replaced_and_the_message_goes_once():
    server = LenientServer(chunking=True, hang_up_after=1)

    async def work(address):
        async with LmtpSession(address, timeout=TIMEOUT) as session:
            return [await session.deliver("alice@example.net", [RCPT], message_number(n)) for n in range(3)]

    results = run(with_lenient_server(server, work))
    assert all(replies[RCPT].code == 250 for replies in results)
    assert server.connections == 3
    assert [t.message for t in server.transactions] == [message_number(n) for n in range(3)]   # each once


def test_a_new_connection_that_fails_is_an_error_not_a_retry():
    async def work(address):
        async with LmtpSession(address, timeout=TIMEOUT) as session:
            return await session.deliver("alice@example.net", [RCPT], message_number(1))

    async def slam(reader, writer):
        writer.close()

    async def scenario():
        listening = await asyncio.start_server(slam, "127.0.0.1", 0)
        try:
            return await work(("127.0.0.1", listening.sockets[0].getsockname()[1]))
        finally:
            listening.close()

    with pytest.raises(LmtpError, match="LMTP server sent b''"):
        run(scenario())


def test_a_session_against_dovecot_delivers_each_message_once():
    from ..dovecot import run_dovecot

    with run_dovecot((RCPT,)) as dovecot:
        async def work():
            async with LmtpSession(("127.0.0.1", dovecot.lmtp_port), timeout=TIMEOUT) as session:
                return [await session.deliver("alice@example.net", [RCPT], message_number(n)) for n in range(20)]

        results = run(work())
        assert all(replies[RCPT].code == 250 for replies in results), results
        found = dovecot.doveadm("search", "-u", RCPT, "mailbox", "INBOX", "all").split()
        assert len(found) == 2 * 20   # a mailbox GUID and a UID per message


# --- batches: the next message's envelope rides with the previous one's content -----------------------------

NOBODY = "nobody@example.org"


def batch_of(*recipient_lists) -> list[LmtpMessage]:
    return [LmtpMessage("alice@example.net", tuple(recipients), message_number(n))
            for n, recipients in enumerate(recipient_lists)]


def test_a_batch_answers_each_message_and_never_sends_content_the_server_did_not_accept():
    """Message 2 has one refused recipient, message 3 only refused ones: its content is never written (this
    server would read it as commands: it does not skip a chunk it refused)."""
    server = LenientServer(chunking=True, refused=frozenset({NOBODY}))
    batch = batch_of([RCPT], [RCPT, NOBODY], [NOBODY], [VICTIM])

    async def work(address):
        async with LmtpSession(address, timeout=TIMEOUT) as session:
            return await session.deliver_batch(batch)

    outcome = run(with_lenient_server(server, work))
    assert outcome.error is None
    assert [{r: reply.code for r, reply in replies.items()} for replies in outcome.replies] == [
        {RCPT: 250}, {RCPT: 250, NOBODY: 550}, {NOBODY: 550}, {VICTIM: 250}]
    assert [t.message for t in server.transactions if t.message] == [message_number(n) for n in (0, 1, 3)]
    assert b"message 2" not in b"".join(server.reads)
    assert not any(c.startswith(b"500") for c in server.commands) and b"what" not in b"".join(server.commands)
    # pipelined: a message's content and the next one's envelope come in one write (one read on loopback)
    assert any(b"BDAT" in read and b"RSET\r\nMAIL FROM:" in read for read in server.reads), server.reads


def test_a_refused_sender_in_a_batch_sends_no_content_and_the_rest_go_on():
    server = LenientServer(chunking=True)

    async def work(address):
        async with LmtpSession(address, timeout=TIMEOUT) as session:
            first = await session.deliver_batch(batch_of([RCPT]))
            server.refuse_sender = True
            refused = await session.deliver_batch(batch_of([RCPT, VICTIM]))
            server.refuse_sender = False
            return first, refused, await session.deliver_batch(batch_of([RCPT], [VICTIM]))

    first, refused, rest = run(with_lenient_server(server, work))
    assert {r: reply.code for r, reply in refused.replies[0].items()} == {RCPT: 451, VICTIM: 451}
    assert [[reply.code for reply in replies.values()] for replies in rest.replies] == [[250], [250]]
    assert server.connections == 1 and len([t for t in server.transactions if t.message]) == 3


def test_a_connection_lost_inside_a_batch_answers_the_messages_before_it_and_says_why_for_the_rest():
    server = LenientServer(chunking=True, hang_up_after=2)

    async def work(address):
        async with LmtpSession(address, timeout=TIMEOUT) as session:
            return await session.deliver_batch(batch_of([RCPT], [RCPT], [RCPT], [RCPT]))

    outcome = run(with_lenient_server(server, work))
    assert len(outcome.replies) == 2 and isinstance(outcome.error, LmtpError)
    assert len(server.transactions) == 2   # the others never reached a server: the intake settles them


def test_a_batch_on_a_connection_closed_while_idle_goes_whole_on_a_new_one():
    server = LenientServer(chunking=True, hang_up_after=1)

    async def work(address):
        async with LmtpSession(address, timeout=TIMEOUT) as session:
            first = await session.deliver_batch(batch_of([RCPT]))
            server.hang_up_after = None
            return first, await session.deliver_batch(batch_of([RCPT], [VICTIM], [RCPT]))

    first, second = run(with_lenient_server(server, work))
    assert second.error is None and len(second.replies) == 3
    assert server.connections == 2
    assert [t.message for t in server.transactions] == [message_number(0)] + [message_number(n) for n in range(3)]


def test_a_batch_against_dovecot_with_an_unknown_user_in_the_middle():
    from ..dovecot import run_dovecot

    with run_dovecot((RCPT,)) as dovecot:
        async def work():
            async with LmtpSession(("127.0.0.1", dovecot.lmtp_port), timeout=TIMEOUT) as session:
                return await session.deliver_batch(batch_of([RCPT], [RCPT], [NOBODY], [NOBODY, RCPT], [RCPT]))

        outcome = run(work())
        assert outcome.error is None, outcome.error
        codes = [{r: reply.code // 100 for r, reply in replies.items()} for replies in outcome.replies]
        assert codes == [{RCPT: 2}, {RCPT: 2}, {NOBODY: 5}, {NOBODY: 5, RCPT: 2}, {RCPT: 2}], outcome.replies
        found = dovecot.doveadm("search", "-u", RCPT, "mailbox", "INBOX", "all").split()
        assert len(found) == 2 * 4
