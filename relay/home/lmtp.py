"""A small asyncio LMTP client (RFC 2033) that reads one reply per recipient after DATA.

The stdlib's smtplib.LMTP reads a single reply after the final dot, which
loses LMTP's point: each recipient gets its own answer, and the intake must
honour each (2xx done, 4xx retry, 5xx failed).
"""

import asyncio
from dataclasses import dataclass


class LmtpError(Exception):
    """The LMTP server could not be used at all (connection, greeting, protocol)."""


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

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
                return Reply(int(line[:3]), " ".join(lines))
            except ValueError:
                raise LmtpError(f"LMTP server sent {line!r}") from None


def dot_stuff(message: bytes) -> bytes:
    """The DATA body: leading dots doubled (RFC 5321 4.5.2), ending with CRLF; nothing else changed."""
    body = message
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\r\n.", b"\r\n..")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


async def deliver(address: str | tuple[str, int], mail_from: str, recipients: list[str], message: bytes, *,
                  lhlo: str = "localhost", timeout: float = 60.0, smtputf8: bool = False) -> dict[str, Reply]:
    """Deliver one message; the reply for each recipient (a RCPT refusal counts as its reply)."""
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
        writer.write(line.encode("utf-8") + b"\r\n")
        await writer.drain()
        return await _read_reply(reader)

    greeting = await _read_reply(reader)
    if greeting.code != 220:
        raise LmtpError(f"LMTP greeting: {greeting}")
    hello = await command(f"LHLO {lhlo}")
    if hello.code != 250:
        raise LmtpError(f"LHLO refused: {hello}")
    options = " SMTPUTF8" if smtputf8 and "SMTPUTF8" in hello.text.upper() else ""
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
    start = await command("DATA")
    if start.code != 354:
        return {**replies, **{r: start for r in accepted}}
    writer.write(dot_stuff(message) + b".\r\n")
    await writer.drain()
    for recipient in accepted:  # RFC 2033 4.2: one reply per accepted recipient, in order
        replies[recipient] = await _read_reply(reader)
    writer.write(b"QUIT\r\n")
    return replies
