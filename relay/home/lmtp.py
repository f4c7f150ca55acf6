"""A small asyncio LMTP client (RFC 2033): one message, one reply per recipient, nothing smuggled.

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
    """Deliver one message; the reply for each recipient (a RCPT refusal counts as its reply).

    `mail_from` is "" for the null sender. The addresses must already be
    checked (relay.home.envelope); one with a line break in it is an LmtpError.
    """
    try:
        if isinstance(address, str):
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(address), timeout)
        else:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), timeout)
    except (OSError, asyncio.TimeoutError) as error:
        raise LmtpError(f"cannot connect to LMTP at {address}: {error or type(error).__name__}") from None
    try:
        return await asyncio.wait_for(
            _transaction(reader, writer, lhlo, mail_from, recipients, message, smtputf8), timeout)
    except asyncio.TimeoutError:
        raise LmtpError(f"LMTP at {address} timed out") from None
    except (ConnectionError, asyncio.IncompleteReadError) as error:
        raise LmtpError(f"LMTP connection to {address} failed: {error}") from None
    finally:
        writer.close()


async def _transaction(reader, writer, lhlo, mail_from, recipients, message, smtputf8) -> dict[str, Reply]:
    async def command(line: str) -> Reply:
        encoded = line.encode("utf-8")
        if any(c in encoded for c in b"\r\n\0"):
            raise LmtpError(f"refusing to send an LMTP command with a line break or NUL in it: {line[:120]!r}")
        writer.write(encoded + b"\r\n")
        await writer.drain()
        return await _read_reply(reader)

    greeting = await _read_reply(reader)
    if greeting.code != 220:
        raise LmtpError(f"LMTP greeting: {greeting}")
    hello = await command(f"LHLO {lhlo}")
    if hello.code != 250:
        raise LmtpError(f"LHLO refused: {hello}")
    keywords = _keywords(hello)
    options = " SMTPUTF8" if smtputf8 and "SMTPUTF8" in keywords else ""
    sender = await command(f"MAIL FROM:<{mail_from}>{options}")
    if sender.code != 250:
        # The sender is refused for everyone: every recipient gets that answer.
        return {r: sender for r in recipients}
    replies: dict[str, Reply] = {}
    accepted = []
    for recipient in recipients:
        reply = await command(f"RCPT TO:<{recipient}>")
        if reply.code == 250:
            accepted.append(recipient)
        else:
            replies[recipient] = reply
    if not accepted:
        await command("QUIT")
        return replies
    if "CHUNKING" in keywords:
        writer.write(b"BDAT %d LAST\r\n" % len(message))
        writer.write(message)
    else:
        start = await command("DATA")
        if start.code != 354:
            return {**replies, **{r: start for r in accepted}}
        writer.write(data_body(message) + b".\r\n")
    await writer.drain()
    for recipient in accepted:  # one reply per accepted recipient, in order
        replies[recipient] = await _read_reply(reader)
    writer.write(b"QUIT\r\n")
    return replies
