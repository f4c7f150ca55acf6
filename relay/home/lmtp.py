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
from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class LmtpMessage:
    mail_from: str                 # "" for the null sender
    recipients: tuple[str, ...]
    content: bytes
    smtputf8: bool = False


@dataclass
class BatchOutcome:
    """The answers to the first len(replies) messages of a batch, in order; for the others, why there are
    none: their fate is unknown (they may or may not be in the mailbox)."""

    replies: list[dict[str, Reply]] = field(default_factory=list)
    error: LmtpError | None = None


@dataclass
class _Accepted:
    """A message whose envelope the server accepted for some recipients: its content goes next."""

    message: LmtpMessage
    accepted: list[str]
    refused: dict[str, Reply]


class _NothingSent(Exception):
    """A reused connection failed before any message's content was written: safe to try again on a new one."""


class LmtpSession:
    """One LMTP connection for a run of messages (RFC 2033 4.1: a transaction ends with the last recipient's
    reply; an RSET opens the next). Opened at the first message, LHLO once.

    **Pipelined** when the server offers PIPELINING and CHUNKING (Dovecot
    does): one write carries the previous message's content (`BDAT n LAST`)
    and the next message's RSET, MAIL and RCPTs; their replies are read in
    order. A message's content is written only after the server has
    accepted one of its recipients, so no byte of it is ever sent into a
    transaction the server refused (where a server that failed to read it as
    a chunk would read it as commands). The server works through the messages
    back to back; the client waits one round trip per message, not four.
    Without those extensions, one command at a time.

    A connection the server closed while idle shows at the first RSET, before
    any byte of a message: the batch goes again on a new connection, once. A
    failure after that ends the batch: the messages without answers are the
    caller's to settle (relay/home/intake.py marks them in doubt before).
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
        """One message; the reply for each recipient (a RCPT refusal counts as its reply), or LmtpError."""
        outcome = await self.deliver_batch([LmtpMessage(mail_from, tuple(recipients), message, smtputf8)])
        if outcome.error is not None:
            raise outcome.error
        return outcome.replies[0]

    async def deliver_batch(self, messages: list[LmtpMessage]) -> BatchOutcome:
        """Several messages, in order, on this connection."""
        outcome = BatchOutcome()
        reused = self._writer is not None
        try:
            await asyncio.wait_for(self._batch(messages, outcome.replies), self.timeout * max(1, len(messages)))
        except _NothingSent:
            await self.close()
            if reused:
                return await self.deliver_batch(messages)   # on a new connection
            outcome.error = LmtpError(f"LMTP at {self.address} closed the connection before the message")
        except asyncio.TimeoutError:
            await self.close()
            outcome.error = LmtpError(f"LMTP at {self.address} timed out")
        except (ConnectionError, asyncio.IncompleteReadError) as error:
            await self.close()
            outcome.error = LmtpError(f"LMTP connection to {self.address} failed: {error}")
        except LmtpError as error:
            await self.close()
            outcome.error = error
        return outcome

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

    def _envelope(self, message: LmtpMessage) -> list[bytes]:
        """MAIL and RCPT lines, each checked (no CR, LF or NUL) before any is written."""
        options = " SMTPUTF8" if message.smtputf8 and "SMTPUTF8" in self._keywords else ""
        return [_line(f"MAIL FROM:<{message.mail_from}>{options}"),
                *(_line(f"RCPT TO:<{recipient}>") for recipient in message.recipients)]

    async def _batch(self, messages: list[LmtpMessage], replies: list[dict[str, Reply]]) -> None:
        if self._writer is None:
            await self._open()
        envelopes = [self._envelope(message) for message in messages]   # a bad line: nothing of the batch sent
        if {"PIPELINING", "CHUNKING"} <= self._keywords:
            await self._pipelined(messages, envelopes, replies)
        else:
            for index, (message, envelope) in enumerate(zip(messages, envelopes, strict=True)):
                replies.append(await self._one(message, envelope, first=index == 0))

    async def _pipelined(self, messages, envelopes, replies) -> None:
        reader, writer = self._reader, self._writer
        waiting: _Accepted | None = None   # its content goes out with the next write
        for index, (message, envelope) in enumerate(zip(messages, envelopes, strict=True)):
            resetting, self._used = self._used, True
            out = ([_chunk(waiting.message.content)] if waiting else []) + ([b"RSET\r\n"] if resetting else [])
            try:
                writer.write(b"".join(out + envelope))
                await writer.drain()
                if waiting is not None:
                    replies.append(await _content_replies(reader, waiting))
                if resetting:
                    await _reset_reply(reader)
                answers = [await _read_reply(reader) for _ in envelope]
            except (ConnectionError, asyncio.IncompleteReadError, LmtpError):
                if resetting and index == 0:   # nothing of any message written yet
                    raise _NothingSent() from None
                raise
            waiting = _answered(message, answers[0], answers[1:])
            if isinstance(waiting, dict):
                replies.append(waiting)
                waiting = None
        if waiting is not None:
            writer.write(_chunk(waiting.message.content))
            await writer.drain()
            replies.append(await _content_replies(reader, waiting))

    async def _one(self, message: LmtpMessage, envelope: list[bytes], *, first: bool) -> dict[str, Reply]:
        """One transaction, one command at a time (a server without PIPELINING or CHUNKING)."""
        reader, writer = self._reader, self._writer
        resetting, self._used = self._used, True
        if resetting:
            try:
                writer.write(b"RSET\r\n")
                await writer.drain()
                await _reset_reply(reader)
            except (ConnectionError, asyncio.IncompleteReadError, LmtpError):
                if first:
                    raise _NothingSent() from None
                raise
        answers = []
        for line in envelope:
            writer.write(line)
            await writer.drain()
            answers.append(await _read_reply(reader))
            if answers[0].code != 250:
                break   # the sender is refused: no recipient is asked
        accepted = _answered(message, answers[0], answers[1:])
        if isinstance(accepted, dict):
            return accepted
        if "CHUNKING" in self._keywords:
            writer.write(_chunk(message.content))
        else:
            writer.write(b"DATA\r\n")
            start = await _read_reply(reader)
            if start.code != 354:
                return {**accepted.refused, **{r: start for r in accepted.accepted}}
            writer.write(data_body(message.content) + b".\r\n")
        await writer.drain()
        return await _content_replies(reader, accepted)


def _answered(message: LmtpMessage, sender: Reply, answers: list[Reply]) -> "_Accepted | dict[str, Reply]":
    """After the envelope's replies: the final replies when no recipient was accepted, else what waits for
    the content."""
    if sender.code != 250:
        return {r: sender for r in message.recipients}   # the sender is refused for everyone
    refused = {r: reply for r, reply in zip(message.recipients, answers, strict=True) if reply.code != 250}
    accepted = [r for r, reply in zip(message.recipients, answers, strict=True) if reply.code == 250]
    return _Accepted(message, accepted, refused) if accepted else refused


async def _content_replies(reader: asyncio.StreamReader, accepted: _Accepted) -> dict[str, Reply]:
    """After the content: one reply per accepted recipient, in RCPT order (RFC 2033 4.2)."""
    replies = dict(accepted.refused)
    for recipient in accepted.accepted:
        replies[recipient] = await _read_reply(reader)
    return replies


def _chunk(content: bytes) -> bytes:
    return b"BDAT %d LAST\r\n" % len(content) + content


async def _reset_reply(reader: asyncio.StreamReader) -> None:
    reply = await _read_reply(reader)
    if reply.code != 250:
        raise LmtpError(f"RSET refused: {reply}")


def _line(command: str) -> bytes:
    encoded = command.encode("utf-8")
    if any(c in encoded for c in b"\r\n\0"):
        raise LmtpError(f"refusing to send an LMTP command with a line break or NUL in it: {command[:120]!r}")
    return encoded + b"\r\n"
