"""A small asyncio LMTP client (RFC 2033): one reply per recipient, nothing smuggled, one connection for many.

The stdlib's smtplib.LMTP reads a single reply after the final dot, which
loses LMTP's point: each recipient gets its own answer, and the intake must
honour each (2xx done, 4xx retry, 5xx failed).

**BDAT first.** The message comes from a sealed file whatever the edge put
in it, so nothing in its bytes may end the message early or be read as a
command. With CHUNKING (RFC 3030; Dovecot's LMTP offers it in its LHLO
reply) the message goes as one counted chunk, `BDAT <n> LAST`, byte for
byte: there is no end-of-data marker for the content to forge, no
dot-stuffing, and a DKIM signature over the bytes still verifies. After the
LAST chunk LMTP answers once per accepted recipient, in RCPT order, as it
does after DATA (RFC 2033 4.2; Dovecot does).

**DATA only when CHUNKING is not offered**, and then every line end is made
CRLF first (a bare LF or a bare CR becomes CRLF) before dots are doubled.
Servers disagree on what ends a line: Dovecot ends one at a bare LF, others
at a bare CR too. Doubling only the dots after CRLF would let `\\n.\\n`,
`\\n.\\r\\n` or `\\r.\\r` end the message early on such a server and have
the bytes after it read as commands — a second transaction with a forged
envelope (SMTP smuggling). Once every line end is CRLF there is one reading
of the lines, and a dot at the start of any of them is doubled (RFC 5321
4.5.2). The price: a message with bare CRs or LFs (never legal on the wire,
RFC 5321 2.3.8) reaches the mailbox with CRLFs, which may break a DKIM
signature over it — which is why BDAT comes first.

The envelope comes checked from relay/home/envelope.py; every command line
is still refused here, before it is written, if it holds a CR, LF or NUL.
"""

import asyncio
import re
from dataclasses import dataclass


class LmtpError(Exception):
    """The LMTP server could not be used at all (connection, greeting, protocol)."""


@dataclass(frozen=True)
class Reply:
    code: int
    text: str
    lines: tuple[str, ...] = ()   # each line's text, for the LHLO reply's keywords

    @property
    def final(self) -> bool:
        return self.code >= 500 or 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


async def _read_reply(reader: asyncio.StreamReader) -> Reply:
    lines = []
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n") or len(line) < 4:
            raise LmtpError(f"LMTP server sent {line!r}")
        lines.append(line[4:].decode("utf-8", "replace").rstrip("\r\n"))
        if line[3:4] != b"-":
            try:
                return Reply(int(line[:3]), " ".join(lines), tuple(lines))
            except ValueError:
                raise LmtpError(f"LMTP server sent {line!r}") from None


_LINE_END = re.compile(rb"\r\n|\r|\n")


def data_body(message: bytes) -> bytes:
    """The DATA body for a server without CHUNKING, without its final ".\\r\\n".

    Every line end made CRLF, every line that starts with a dot given one more
    (RFC 5321 4.5.2), and a final CRLF if the message lacks one.
    """
    body = _LINE_END.sub(b"\r\n", message)
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\r\n.", b"\r\n..")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


def _keywords(hello: Reply) -> set[str]:
    """The service extensions an LHLO reply names (its lines after the first)."""
    return {line.split()[0].upper() for line in hello.lines[1:] if line.split()}


async def deliver(address: str | tuple[str, int], mail_from: str, recipients: list[str], message: bytes, *,
                  lhlo: str = "localhost", timeout: float = 60.0, smtputf8: bool = False) -> dict[str, Reply]:
    """Deliver one message over a connection of its own; the reply for each recipient (a RCPT refusal counts
    as its reply).

    `mail_from` is "" for the null sender. The addresses must already be
    checked (relay.home.envelope); one with a line break in it is an LmtpError.
    """
    async with LmtpSession(address, lhlo=lhlo, timeout=timeout) as session:
        return await session.deliver(mail_from, recipients, message, smtputf8=smtputf8)


class _NothingSent(Exception):
    """A reused connection failed before any of the message was written: safe to try again on a new one."""


class LmtpSession:
    """One LMTP connection for a run of messages (RFC 2033 4.1: a transaction ends with the last recipient's
    reply; an RSET opens the next). Opened at the first message, LHLO once.

    With PIPELINING (Dovecot offers it) RSET, MAIL and every RCPT go in one write and their replies are read
    in order; the message follows once some recipient is accepted, so nothing is ever sent for a transaction
    the server refused. A connection the server closed while idle shows at the RSET: before any byte of the
    message, so the message goes again on a new connection, once. A failure after that is an LmtpError: the
    caller's in-doubt record decides what happened (relay/home/intake.py).
    """

    def __init__(self, address: str | tuple[str, int], *, lhlo: str = "localhost", timeout: float = 60.0):
        self.address = address
        self.lhlo = lhlo
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._keywords: set[str] = set()
        self._used = False   # a transaction ran on this connection: the next starts with RSET

    async def __aenter__(self) -> "LmtpSession":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def deliver(self, mail_from: str, recipients: list[str], message: bytes, *,
                      smtputf8: bool = False) -> dict[str, Reply]:
        """One message's transaction; the reply for each recipient (a RCPT refusal counts as its reply)."""
        reused = self._writer is not None
        try:
            return await asyncio.wait_for(self._deliver(mail_from, recipients, message, smtputf8), self.timeout)
        except _NothingSent:
            await self.close()
            if not reused:
                raise LmtpError(f"LMTP at {self.address} closed the connection before the message") from None
        except asyncio.TimeoutError:
            await self.close()
            raise LmtpError(f"LMTP at {self.address} timed out") from None
        except (ConnectionError, asyncio.IncompleteReadError) as error:
            await self.close()
            raise LmtpError(f"LMTP connection to {self.address} failed: {error}") from None
        except LmtpError:
            await self.close()
            raise
        return await self.deliver(mail_from, recipients, message, smtputf8=smtputf8)   # on a new connection

    async def close(self) -> None:
        writer, self._reader, self._writer, self._used = self._writer, None, None, False
        if writer is None:
            return
        try:
            writer.write(b"QUIT\r\n")
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (OSError, asyncio.TimeoutError):
            pass

    async def _open(self) -> None:
        try:
            if isinstance(self.address, str):
                opening = asyncio.open_unix_connection(self.address)
            else:
                opening = asyncio.open_connection(*self.address)
            self._reader, self._writer = await asyncio.wait_for(opening, self.timeout)
        except (OSError, asyncio.TimeoutError) as error:
            raise LmtpError(f"cannot connect to LMTP at {self.address}: {error or type(error).__name__}") from None
        greeting = await _read_reply(self._reader)
        if greeting.code != 220:
            raise LmtpError(f"LMTP greeting: {greeting}")
        self._writer.write(_line(f"LHLO {self.lhlo}"))
        hello = await _read_reply(self._reader)
        if hello.code != 250:
            raise LmtpError(f"LHLO refused: {hello}")
        self._keywords = _keywords(hello)

    async def _deliver(self, mail_from: str, recipients: list[str], message: bytes, smtputf8: bool) -> dict[str, Reply]:
        if self._writer is None:
            await self._open()
        reader, writer = self._reader, self._writer
        options = " SMTPUTF8" if smtputf8 and "SMTPUTF8" in self._keywords else ""
        envelope = [f"MAIL FROM:<{mail_from}>{options}", *(f"RCPT TO:<{r}>" for r in recipients)]
        lines = [_line(command) for command in envelope]   # every line checked before one is written
        resetting = self._used
        self._used = True
        try:
            if resetting:
                writer.write(b"RSET\r\n")
                if "PIPELINING" not in self._keywords:
                    await writer.drain()
                    await _reset_reply(reader)
            answers = await self._envelope(reader, writer, lines, resetting)
        except (ConnectionError, asyncio.IncompleteReadError, LmtpError):
            if resetting:
                raise _NothingSent() from None
            raise
        sender, *answered = answers
        if sender.code != 250:
            # The sender is refused for everyone: every recipient gets that answer.
            return {r: sender for r in recipients}
        replies = {r: reply for r, reply in zip(recipients, answered, strict=True) if reply.code != 250}
        accepted = [r for r, reply in zip(recipients, answered, strict=True) if reply.code == 250]
        if not accepted:
            return replies
        if "CHUNKING" in self._keywords:
            writer.write(b"BDAT %d LAST\r\n" % len(message))
            writer.write(message)
        else:
            writer.write(b"DATA\r\n")
            start = await _read_reply(reader)
            if start.code != 354:
                return {**replies, **{r: start for r in accepted}}
            writer.write(data_body(message) + b".\r\n")
        await writer.drain()
        for recipient in accepted:  # one reply per accepted recipient, in order
            replies[recipient] = await _read_reply(reader)
        return replies

    async def _envelope(self, reader, writer, lines: list[bytes], resetting: bool) -> list[Reply]:
        """MAIL and RCPT (after a pipelined RSET), pipelined when the server allows; their replies in order."""
        if "PIPELINING" in self._keywords:
            writer.write(b"".join(lines))
            await writer.drain()
            if resetting:
                await _reset_reply(reader)
            return [await _read_reply(reader) for _ in lines]
        answers = []
        for line in lines:
            writer.write(line)
            await writer.drain()
            answers.append(await _read_reply(reader))
        return answers


async def _reset_reply(reader: asyncio.StreamReader) -> None:
    reply = await _read_reply(reader)
    if reply.code != 250:
        raise LmtpError(f"RSET refused: {reply}")


def _line(command: str) -> bytes:
    encoded = command.encode("utf-8")
    if any(c in encoded for c in b"\r\n\0"):
        raise LmtpError(f"refusing to send an LMTP command with a line break or NUL in it: {command[:120]!r}")
    return encoded + b"\r\n"
