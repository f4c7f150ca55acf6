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

from relay.home.lmtp import LmtpError, data_body, deliver

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

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()

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
            elif verb == b"MAIL":
                current = Transaction(command.decode(errors="replace"))
                self.transactions.append(current)
                reply("250 2.1.0 OK")
            elif verb == b"RCPT" and current is not None:
                current.recipients.append(command.decode(errors="replace"))
                reply("250 2.1.5 OK")
            elif verb == b"DATA" and current is not None:
                reply("354 go ahead")
                lines = []
                while (text := await line()) is not None and text.split(b"\0")[0] != b".":
                    lines.append(text[1:] if text.startswith(b".") else text)
                current.message = b"".join(text + b"\r\n" for text in lines)
                for _ in current.recipients:
                    reply("250 2.0.0 saved")
            elif verb == b"BDAT" and current is not None:
                size = int(command.split()[1])
                current.message = await exactly(size)
                for _ in current.recipients:
                    reply("250 2.0.0 saved")
            elif verb == b"QUIT":
                reply("221 bye")
                break
            else:
                reply("500 5.5.1 what")
            await writer.drain()
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
