"""The edge's SMTP policy, as an aiosmtpd handler: who may send what, and sealing on DATA.

Each hook returns the reply. DATA content is sealed as it arrives
(`open_message` gives relay/aio/starttls.py a `SealingSink`), so the edge
never holds a whole message; it is answered 250 only after its sealed file
and the spool directory are on disk (the commit runs in a thread, so an
fsync never stalls other sessions).

With [verdict] in edge.toml and a home present to judge, a message of at
most `max_size` bytes is held in memory instead (a `VerdictSink`) until
home's verdict (relay/edge/verdict.py) or the budget's end: rspamd's
`reject` is answered 550 5.7.1 and `soft reject` 451 4.7.1 with nothing
stored; anything else is sealed with the verdict in its metadata, then 250.
"""

import asyncio
import email.utils
import functools
import hashlib
import hmac
import inspect
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiosmtpd.smtp import TLSSetupException

from relay.edge.door import Door, DoorReason
from relay.edge.recipients import RecipientPolicy
from relay.edge.verdict import PlaintextBuffer, VerdictDesk, VerdictOutcome
from relay.home.spam import SpamAction, refusal_for
from relay.show import show
from relay.smtp.address import AddressError, check_mailbox
from relay.spool.store import SpoolFull

log = logging.getLogger("yestls.edge")

# Commits (fsync) may not block the event loop.
SEAL_THREADS = 4
SPOOL_FULL = "452 4.3.1 Insufficient system storage, please retry later"
SPOOL_ERROR = "451 4.3.0 Temporary failure, please retry later"
NULL_SENDER = "<>"   # aiosmtpd's form of the null reverse-path (bounces), kept as it is in the sealed metadata


@dataclass(frozen=True)
class TransactionRules:
    hostname: str
    primary_domain: str   # where a bare "postmaster" goes
    max_recipients: int
    # The refusal for a transaction in cleartext from this session now (the oracle away under
    # resume-only, or the edge could not finish this client's TLS a moment ago), or None.
    tls_required: Callable[[object], str | None]
    recipients: Callable[[], RecipientPolicy]
    door: Door | None = None   # the door's envelope checks (relay/edge/door.py), when [door] configures any
    verdict: VerdictDesk | None = None   # home's before-queue verdict (relay/edge/verdict.py), with [verdict]


class EdgeHandler:
    def __init__(self, rules: TransactionRules, spool, metrics):
        self.rules = rules
        self.spool = spool
        self.metrics = metrics
        self._tag_key = os.urandom(32)  # this process's only: tags match within one run, and mean nothing later

    def address_tag(self, address: str) -> str:
        """A short tag that is the same for the same address while the edge runs, and reveals nothing else."""
        digest = hmac.new(self._tag_key, address.lower().encode("utf-8", "surrogateescape"), hashlib.sha256)
        return "#" + digest.hexdigest()[:12]

    def _refuse(self, server, reason: str, reply: str) -> str:
        self.metrics.refused(reason)
        server.refusal_counted = True  # named here; the adapter counts the rest by code
        return reply

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default logs a traceback: a failed handshake is a client's
        # doing (or the oracle's absence), worth one line, not twenty-five.
        if isinstance(error, TLSSetupException):
            cause = error.__cause__
            log.info("STARTTLS handshake failed: %s", f"{type(cause).__name__}: {cause}" if cause else "unknown")
            return "454 4.7.0 TLS handshake failed"
        log.error("SMTP session error: %s: %s", type(error).__name__, error)
        return "451 4.3.0 Internal error, please retry later"

    async def handle_EHLO(self, server, session, envelope, hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # An MX offers no AUTH; it does offer pipelining and enhanced codes.
        lines = [line for line in responses if not line[4:].startswith("AUTH")]
        last = lines.pop()
        return lines + ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]

    async def handle_MAIL(self, server, session, envelope, address: str, mail_options: list[str]) -> str:
        refusal = self.rules.tls_required(server) if server.tls_session is None else None
        if refusal is not None:
            return self._refuse(server, "tls_required", refusal)
        if address != NULL_SENDER:
            refusal = _address_refusal(address, envelope.smtp_utf8, "5.1.7", "sender")
            if refusal is not None:
                log.info("%s: refused a sender address: %s", _peer(session), refusal)
                return self._refuse(server, "bad_address", refusal)
        door = self.rules.door
        if door is not None:
            ip = _ip(session)
            if not door.message_allowed(ip):
                return self._refuse(server, DoorReason.RATE.value,
                                    "451 4.7.1 Too many messages from your address; please retry later")
            spf = await door.spf(ip, address, session.host_name)
            if spf is not None:
                refusal = door.spf_refusal(spf, ip)
                log.info("%s: SPF %s for %s%s", _peer(session), spf.result, show(spf.domain) or "(no domain)",
                         ": refused" if refusal else "")
                if refusal is not None:
                    return self._refuse(server, DoorReason.SPF_FAIL.value, refusal)
                envelope.spf = spf   # sealed with the message (open_message)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address: str, rcpt_options: list[str]) -> str:
        door = self.rules.door
        if door is not None:
            ip = _ip(session)
            refusal = door.blocked(ip, await door.listing(ip))
            if refusal is not None:
                if not getattr(session, "door_refused", False):
                    session.door_refused = True   # counted at the door once per session, not per recipient
                    door.refused(DoorReason.DNSBL)
                    log.info("%s: refused at the door: %s", _peer(session), refusal)
                return self._refuse(server, DoorReason.DNSBL.value, refusal)
        if len(envelope.rcpt_tos) >= self.rules.max_recipients:
            return self._refuse(server, "too_many_recipients", "452 4.5.3 Too many recipients")
        if address.lower() == "postmaster":
            # RFC 5321 4.5.1: "postmaster" without a domain must be accepted: it is ours.
            address = f"postmaster@{self.rules.primary_domain}"
        # The policy first: a relay attempt is answered as one (550 5.7.1), whatever its syntax; then what
        # the policy lets through must still be one mailbox for this transaction's mode (UTF-8 needs SMTPUTF8).
        refusal = self.rules.recipients().check(address)
        reason = "relay_denied" if refusal and refusal.startswith("550 5.7.1") else "unknown_mailbox"
        if refusal is None:
            refusal = _address_refusal(address, envelope.smtp_utf8, "5.1.3", "recipient")
            reason = "bad_address"
        if refusal is not None:
            # The edge should learn as little as it can: the domain and a tag to match repeats, not the address.
            log.info("%s: refused a recipient at %s (%s): %s", _peer(session), show(address.rpartition("@")[2]),
                     self.address_tag(address), refusal[:3])
            return self._refuse(server, reason, refusal)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def open_message(self, server, session, envelope) -> "SealingSink | str":
        """The DATA command: a sink that seals the content as it arrives, or the reply that refuses it."""
        tls = server.tls_session
        received = self.received_header(session, envelope, tls)
        metadata = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options),
            "rcpt_options": list(envelope.rcpt_options),
            "smtputf8": bool(envelope.smtp_utf8),
            "client_address": _peer(session),
            "helo": session.host_name,
            "tls": None if tls is None else {"version": tls.version, "cipher": tls.cipher_suite, "group": tls.group,
                                             "resumed": tls.resumed, "server_name": tls.server_name},
            "received_at": time.time(),
            # The edge's SPF check at MAIL FROM (relay/edge/door.py), or None: a claim home may weigh, not trust.
            "spf": spf.metadata() if (spf := getattr(envelope, "spf", None)) is not None else None,
        }
        declared = _declared_size(envelope.mail_options)
        desk = self.rules.verdict
        if desk is not None:
            if declared is not None and declared > desk.settings.max_size:
                desk.count(VerdictOutcome.TOO_LARGE)
            elif not desk.home_present:
                desk.count(VerdictOutcome.HOME_ABSENT)   # no home to ask: sealed as it arrives, as without [verdict]
            else:
                return VerdictSink(self, server, session, metadata, received, len(envelope.rcpt_tos), declared)
        try:
            writer = await self.spool.open_async(metadata, size=None if declared is None else len(received) + declared)
        except Exception as error:  # noqa: BLE001 - any failure: the sender keeps the message and retries
            return self._cannot_seal(server, session, error)
        writer = self._trace_header(server, session, writer, received)
        if isinstance(writer, str):
            return writer
        return SealingSink(self, server, session, writer, len(envelope.rcpt_tos))

    def start_sealing(self, server, session, metadata: dict, received: bytes, size: int | None):
        """A spool writer with the trace header written, or the reply refusing the message (counted). For a
        message already under way (VerdictSink); DATA's own opens with `await spool.open_async` instead."""
        try:
            writer = self.spool.open(metadata, size=size)
        except Exception as error:  # noqa: BLE001 - any failure: the sender keeps the message and retries
            return self._cannot_seal(server, session, error)
        return self._trace_header(server, session, writer, received)

    def _trace_header(self, server, session, writer, received: bytes):
        """The writer with the Received header written first, or (aborted) the reply refusing the message."""
        try:
            writer.write(received)
        except Exception as error:  # noqa: BLE001
            writer.abort()
            return self._cannot_seal(server, session, error)
        return writer

    def _cannot_seal(self, server, session, error: Exception) -> str:
        """The refusal (counted, logged) when a message cannot be started: 452 for a full spool, else 451."""
        if isinstance(error, SpoolFull):
            log.warning("spool full (%s): deferring %s", error.reason, _peer(session))
            return self._refuse(server, "spool_full", SPOOL_FULL)
        log.error("%s: cannot start sealing", _peer(session), exc_info=error)
        return self._refuse(server, "spool_error", SPOOL_ERROR)

    def received_header(self, session, envelope, tls) -> bytes:
        """The trace header (RFC 5321 4.4), with the TLS parameters; prepended inside the sealed content."""
        protocol = ("UTF8SMTP" if envelope.smtp_utf8 else "ESMTP") + ("S" if tls else "")
        if not session.extended_smtp:
            protocol = "SMTP"
        tls_clause = f"\r\n\t(version={tls.version} cipher={tls.cipher_suite} group={tls.group})" if tls else ""
        recipient = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
        helo = _clean(session.host_name or "unknown")
        address = session.peer[0] if session.peer else "unknown"
        header = (
            f"Received: from {helo} ([{address}])\r\n\tby {self.rules.hostname} (YesTLS) with {protocol}"
            f"{tls_clause}{recipient};\r\n\t{_date(int(time.time()))}\r\n"
        )
        return header.encode("utf-8", "surrogateescape")


# aiosmtpd reads handle_EHLO's signature on every new session (to tell its old 4-argument form from
# this one); inspect.signature returns a function's __signature__ when it has one, made here once.
EdgeHandler.handle_EHLO.__signature__ = inspect.signature(EdgeHandler.handle_EHLO)


class SealingSink:
    """DATA content into the sealed spool as it arrives (relay.aio.starttls.MessageSink).

    Each piece is sealed at once on the event loop (a chunk's AES-GCM costs
    less than a thread hop); only the commit, which fsyncs, runs in a thread.
    A spool that fills up mid-message, or a write that fails, is remembered
    and answered once the content has ended.
    """

    def __init__(self, handler: EdgeHandler, server, session, writer, recipients: int):
        self.handler = handler
        self.server = server
        self.session = session
        self.writer = writer
        self.recipients = recipients
        self.size = 0
        self.failure: str | None = None   # the reply, once writing failed

    def write(self, piece: memoryview) -> None:
        if self.failure is not None:
            return
        try:
            self.writer.write(piece)
            self.size += len(piece)
        except SpoolFull as error:
            log.warning("spool full (%s) during a message: deferring %s", error.reason, _peer(self.session))
            self._fail("spool_full", SPOOL_FULL)
        except Exception:  # noqa: BLE001 - the sender keeps the message and retries
            log.exception("%s: sealing failed", _peer(self.session))
            self._fail("spool_error", SPOOL_ERROR)

    def _fail(self, reason: str, reply: str) -> None:
        self.writer.abort()
        self.failure = self.handler._refuse(self.server, reason, reply)

    async def finish(self) -> str:
        if self.failure is not None:
            self.server.refusal_counted = True
            return self.failure
        try:
            spool_id = await asyncio.get_running_loop().run_in_executor(None, self.writer.commit)
        except SpoolFull as error:
            log.warning("spool full (%s) at commit: deferring %s", error.reason, _peer(self.session))
            return self.handler._refuse(self.server, "spool_full", SPOOL_FULL)
        except Exception:  # noqa: BLE001 - nothing was stored: the sender keeps the message and retries
            log.exception("%s: sealing failed", _peer(self.session))
            return self.handler._refuse(self.server, "spool_error", SPOOL_ERROR)
        self.handler.metrics.accepted(self.size)
        log.info("%s: accepted %s (%d bytes, %d recipients)", _peer(self.session), spool_id, self.size,
                 self.recipients)
        return f"250 2.0.0 OK queued as {spool_id}"

    def abort(self) -> None:
        self.writer.abort()


class VerdictSink:
    """DATA content held in memory for home's verdict (relay.aio.starttls.MessageSink), then refused or sealed.

    The content is exactly what would be sealed (the Received header, then
    DATA), in one PlaintextBuffer of at most the header plus `max_size`
    bytes, wiped once the message is refused, sealed or forgotten. A message
    that grows past `max_size` is sealed as it arrives from then on (what
    was held first), with no verdict. The 250 comes only once the sealed
    file is durable, as for a SealingSink.
    """

    INITIAL = 64 * 1024   # bytes held before the buffer first grows, when the client declared no SIZE

    def __init__(self, handler: EdgeHandler, server, session, metadata: dict, received: bytes, recipients: int,
                 declared: int | None):
        self.handler = handler
        self.desk: VerdictDesk = handler.rules.verdict
        self.server = server
        self.session = session
        self.metadata = metadata
        self.recipients = recipients
        self.header = len(received)
        self.limit = self.header + self.desk.settings.max_size
        self.buffer = PlaintextBuffer(min(self.limit, self.header + (declared if declared else self.INITIAL)))
        self.buffer.append(received)
        self.streaming: SealingSink | None = None   # once past max_size
        self.failure: str | None = None             # the reply, once sealing what was held failed

    def write(self, piece: memoryview) -> None:
        if self.streaming is not None:
            self.streaming.write(piece)
        elif self.failure is None and self.buffer.length + len(piece) <= self.limit:
            self.buffer.append(piece)
        elif self.failure is None:
            self._stream_from_here(piece)

    def _stream_from_here(self, piece: memoryview) -> None:
        """Past max_size: seal what was held, then the rest as it arrives; no verdict for this message."""
        self.desk.count(VerdictOutcome.TOO_LARGE)
        held = self.buffer.view()
        try:
            writer = self.handler.start_sealing(self.server, self.session, self.metadata, held[:self.header], None)
            if isinstance(writer, str):
                self.failure = writer
                return
            self.streaming = SealingSink(self.handler, self.server, self.session, writer, self.recipients)
            self.streaming.write(held[self.header:])
        finally:
            self.buffer.wipe()
        self.streaming.write(piece)

    async def finish(self) -> str:
        if self.streaming is not None:
            return await self.streaming.finish()
        if self.failure is not None:
            self.server.refusal_counted = True
            self.buffer.wipe()
            return self.failure
        committing = None
        try:
            content = self.buffer.view()
            facts = {key: self.metadata[key] for key in ("mail_from", "rcpt_tos", "client_address", "helo")}
            answer = await self.desk.ask(content, facts, self.desk.settings.budget)
            metadata = self.metadata
            if answer is not None:
                refusal = refusal_for(answer.action)
                log.info("%s: verdict %s from home in %.1f ms%s", _peer(self.session), answer.action.value,
                         answer.seconds * 1e3, f": {refusal[:9]}" if refusal else "")
                if refusal is not None:
                    outcome = (VerdictOutcome.REJECTED if answer.action == SpamAction.REJECT
                               else VerdictOutcome.DEFERRED)
                    self.desk.count(outcome)
                    return self.handler._refuse(self.server, f"verdict_{outcome.value}", refusal)
                self.desk.count(VerdictOutcome.ACCEPTED)
                metadata = {**metadata, "verdict": {"action": answer.action.value, "token": answer.token}}
            if self.server.transport is None:
                return SPOOL_ERROR   # the sender left while home judged: nothing stored, it retries
            committing = asyncio.get_running_loop().run_in_executor(
                None, functools.partial(self.handler.spool.accept, metadata, [content], size=len(content)))
            # Shielded: a cancelled session must not wipe the buffer while the thread still seals it.
            spool_id = await asyncio.shield(committing)
        except SpoolFull as error:
            log.warning("spool full (%s) at commit: deferring %s", error.reason, _peer(self.session))
            return self.handler._refuse(self.server, "spool_full", SPOOL_FULL)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - nothing was stored: the sender keeps the message and retries
            log.exception("%s: sealing failed", _peer(self.session))
            return self.handler._refuse(self.server, "spool_error", SPOOL_ERROR)
        finally:
            if committing is not None and not committing.done():
                committing.add_done_callback(self._wipe_after)
            else:
                self.buffer.wipe()
        size = len(content) - self.header
        self.handler.metrics.accepted(size)
        log.info("%s: accepted %s (%d bytes, %d recipients%s)", _peer(self.session), spool_id, size,
                 self.recipients, f", verdict {answer.action.value}" if answer is not None else ", no verdict")
        return f"250 2.0.0 OK queued as {spool_id}"

    def _wipe_after(self, committed: asyncio.Future) -> None:
        if not committed.cancelled():
            committed.exception()   # retrieved: the session that wanted it is gone
        self.buffer.wipe()

    def abort(self) -> None:
        if self.streaming is not None:
            self.streaming.abort()
        self.buffer.wipe()


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """The Received header's date (RFC 5322 3.3): one formatting per second, not per message."""
    return email.utils.formatdate(second, localtime=False, usegmt=True)


def _address_refusal(address: str, smtputf8: bool, code: str, role: str) -> str | None:
    """The reply refusing an envelope address that is not one RFC 5321 mailbox (relay/smtp/address.py)."""
    if not address.isascii() and not smtputf8:
        return f"553 5.6.7 The {role} address is not ASCII: send it with SMTPUTF8 (RFC 6531)"
    try:
        check_mailbox(address, smtputf8)
    except AddressError:
        return (f"553 {code} The {role} address is not a valid mailbox (RFC 5321 4.1.2: no control characters, "
                "no angle brackets, at most 64 octets before the @ and 254 in all)")
    return None


def _declared_size(mail_options: list[str]) -> int | None:
    """The SIZE= the client declared at MAIL (RFC 1870), already checked against the limit by aiosmtpd."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name == "SIZE" and value.isdigit():
            return int(value)
    return None


def _ip(session) -> str:
    peer = session.peer
    return peer[0] if isinstance(peer, tuple) else "unknown"


def _peer(session) -> str:
    peer = session.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


_NOT_IN_HEADER = re.compile(r"[()\\]")


def _clean(text: str) -> str:
    """A HELO argument as it may appear in a header: no line breaks, no parentheses games."""
    if text.isprintable() and not _NOT_IN_HEADER.search(text):
        return text[:255]   # most names: nothing to remove, no pass over each character
    return "".join(c for c in text if c.isprintable() and c not in "()\\")[:255]
