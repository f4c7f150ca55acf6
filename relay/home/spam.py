"""Spam verdicts at home: rspamd judges a message, and a verdict is what the rest of YesTLS sees of it.

rspamd (Debian's package, roles/home_spam) runs on home's loopback; this
module is its client and the one place its answer is read. Two callers:
the intake judges each message after unsealing it (relay/home/intake.py),
and, when home is up, the edge asks home for a verdict before it answers
DATA (relay/home/judge.py, relay/edge/verdict.py). Both get a `Verdict`:

    spam = SpamFilter("http://127.0.0.1:11333", timeout=20.0, authserv_id="mx.example.org")
    verdict = await spam.judge(message, MessageFacts.from_metadata(metadata))
    verdict.refusal()      # "550 5.7.1 ..." / "451 4.7.1 ..." / None: the SMTP answer while the sender waits
    verdict.junk           # True: the message goes to Junk (Sieve on `X-Spam: Yes`)
    verdict.header_block() # the header fields the intake adds: rspamd's, and our X-Spam

rspamd is the one source of authentication results and spam symbols: its
DKIM and DMARC modules run on every message, and the Authentication-Results
field delivered is the one its milter_headers module writes (with our
authserv-id, sent as `MTA-Name`), not a second computation. SPF is the
edge's: evaluated at MAIL FROM while the sender was connected
(relay/edge/door.py), sealed with the message, and passed to rspamd in the
`X-YesTLS-SPF` request header, which our rule (roles/home_spam/files/
rspamd.local.lua) turns into rspamd's own SPF symbols, so DMARC reads it; a
message the edge did not check is checked by that rule at home.

The protocol is one HTTP POST of the message to /checkv2 with the envelope
in request headers (rspamd's "protocol" documentation), answered with JSON.
It is written here on asyncio streams rather than with an HTTP library
because no HTTP client is a dependency, and this is one request on loopback
to a server we run: a Content-Length body, read to a bound.

The token: a verdict given to the edge comes back inside the sealed
message's metadata. The edge may be compromised, so home does not believe
it unless it carries home's MAC over the message's digest (`seal_verdict`,
`open_verdict`, a key only home holds); a verdict that does not verify is
judged again.
"""

import asyncio
import base64
import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from relay.private_files import create_private_file, read_private_file

log = logging.getLogger("yestls.spam")

MAX_ANSWER = 1024 * 1024          # bytes of rspamd's JSON answer read at most
MAX_SYMBOLS = 200                 # symbol names kept in a verdict
MAX_HEADER_VALUE = 8 * 1024       # bytes of one header value from rspamd
MAX_TOKEN = 32 * 1024             # characters of a sealed verdict the edge stores and home opens
_TOKEN_CONTEXT = b"yestls verdict v1\x00"

# The header fields rspamd may give the intake to add. Any incoming field of
# these names is removed first (relay/home/intake.py): a sender's `X-Spam: No`
# or a forged score is not ours to keep.
RSPAMD_FIELDS = frozenset({"x-spamd-result", "x-spam-status", "x-rspamd-score", "x-rspamd-action",
                           "x-spamd-bar", "x-spam-level", "x-rspamd-server", "x-rspamd-queue-id",
                           "authentication-results"})
JUNK_FIELD = "X-Spam"             # "Yes" on spam: Dovecot's Sieve files it into Junk
OUR_FIELDS = RSPAMD_FIELDS | {JUNK_FIELD.lower()}
_ONE_FIELD_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*(?:\r\n[ \t][^\x00-\x08\x0a-\x1f\x7f]*)*")
_FIELD_NAME = re.compile(r"[!-9;-~]+")


class SpamFilterError(Exception):
    """rspamd did not give a usable verdict: unreachable, too slow, or an answer we cannot read."""


class SpamAction(enum.StrEnum):
    """rspamd's actions (its `action` field), mildest first."""

    NO_ACTION = "no action"
    GREYLIST = "greylist"
    ADD_HEADER = "add header"
    REWRITE_SUBJECT = "rewrite subject"
    SOFT_REJECT = "soft reject"
    REJECT = "reject"


# What a message judged with each action becomes. We do not greylist (the
# edge would have to remember senders); it is ham here. After the 250 has
# been given nothing is refused any more: the message goes to Junk instead.
_JUNK = frozenset({SpamAction.ADD_HEADER, SpamAction.REWRITE_SUBJECT, SpamAction.SOFT_REJECT, SpamAction.REJECT})
_REFUSALS = {
    SpamAction.REJECT: "550 5.7.1 Message refused as spam",
    SpamAction.SOFT_REJECT: "451 4.7.1 Message deferred by the content filter, please retry later",
}


def refusal_for(action: SpamAction) -> str | None:
    """The SMTP reply refusing a message judged with `action` while its sender waits, or None to accept it."""
    return _REFUSALS.get(action)


@dataclass(frozen=True)
class Verdict:
    action: SpamAction
    score: float
    required_score: float
    symbols: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()   # (name, value) from rspamd, each one checked field

    @property
    def junk(self) -> bool:
        return self.action in _JUNK

    def refusal(self) -> str | None:
        """The SMTP reply refusing the message while its sender waits, or None to accept it."""
        return refusal_for(self.action)

    def header_block(self) -> bytes:
        """The fields to prepend to the delivered message, CRLF-terminated."""
        lines = [f"{name}: {value}\r\n" for name, value in self.headers]
        lines.append(f"{JUNK_FIELD}: {'Yes' if self.junk else 'No'}\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def to_dict(self) -> dict:
        return {"action": self.action.value, "score": self.score, "required_score": self.required_score,
                "symbols": list(self.symbols), "headers": [list(pair) for pair in self.headers]}

    @classmethod
    def from_dict(cls, data) -> "Verdict":
        """A verdict from `to_dict`'s form; ValueError when it is not one."""
        if not isinstance(data, dict):
            raise ValueError("a verdict is a JSON object")
        try:
            action = SpamAction(data.get("action"))
        except ValueError:
            raise ValueError(f"unknown action {data.get('action')!r}") from None
        symbols = data.get("symbols", [])
        headers = data.get("headers", [])
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise ValueError("symbols must be a list of names")
        if not isinstance(headers, list) or not all(
                isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in headers):
            raise ValueError("headers must be a list of [name, value]")
        return cls(action, _number(data.get("score")), _number(data.get("required_score")),
                   tuple(symbols[:MAX_SYMBOLS]), tuple(_checked_header(n, v) for n, v in headers))


@dataclass(frozen=True)
class MessageFacts:
    """The envelope rspamd judges a message with: as the edge saw it when the sender was connected."""

    client_ip: str = ""        # "" when unknown
    helo: str = ""
    mail_from: str = ""        # "" for the null sender
    recipients: tuple[str, ...] = ()
    queue_id: str = ""
    spf: str = ""              # the edge's SPF result (RFC 7208 2.6), "" when it did not check

    @classmethod
    def from_metadata(cls, metadata: dict, queue_id: str = "") -> "MessageFacts":
        """From the sealed metadata (or the edge's verdict request), which the edge wrote: checked here."""
        recipients = metadata.get("rcpt_tos")
        mail_from = _one_line(metadata.get("mail_from"))
        return cls(client_ip=_client_ip(metadata.get("client_address")), helo=_one_line(metadata.get("helo")),
                   mail_from="" if mail_from == "<>" else mail_from,
                   recipients=tuple(r for r in map(_one_line, recipients if isinstance(recipients, list) else ())
                                    if r),
                   queue_id=_one_line(queue_id), spf=_spf_result(metadata.get("spf")))


class SpamFilter:
    """rspamd's normal worker, over HTTP on loopback."""

    def __init__(self, url: str, timeout: float, authserv_id: str):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url!r}: rspamd's address is http://HOST:PORT")
        self.host = parts.hostname
        self.port = parts.port or 11333
        self.timeout = timeout
        self.authserv_id = authserv_id

    async def judge(self, message: bytes, facts: MessageFacts) -> Verdict:
        """rspamd's verdict on the message; SpamFilterError when there is none to be had."""
        try:
            return await asyncio.wait_for(self._judge(message, facts), self.timeout)
        except TimeoutError:
            raise SpamFilterError(f"rspamd at {self.host}:{self.port} did not answer in {self.timeout:g} s") from None
        except OSError as error:
            raise SpamFilterError(f"rspamd at {self.host}:{self.port}: {error}") from None

    async def _judge(self, message: bytes, facts: MessageFacts) -> Verdict:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(self._request(message, facts))
            await writer.drain()
            status, body = await _read_response(reader)
        finally:
            writer.close()
        if status != 200:
            raise SpamFilterError(f"rspamd answered HTTP {status}: {body[:200]!r}")
        return parse_answer(body)

    def _request(self, message: bytes, facts: MessageFacts) -> bytes:
        fields = [("Host", self.host), ("Content-Length", str(len(message))), ("Connection", "close"),
                  ("MTA-Name", self.authserv_id), ("From", facts.mail_from or "<>")]
        if facts.client_ip:
            fields.append(("IP", facts.client_ip))
        if facts.helo:
            fields.append(("Helo", facts.helo))
        if facts.queue_id:
            fields.append(("Queue-Id", facts.queue_id))
        if facts.spf:
            fields.append(("X-YesTLS-SPF", facts.spf))
        fields.extend(("Rcpt", recipient) for recipient in facts.recipients)
        head = "POST /checkv2 HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields) + "\r\n"
        return head.encode("utf-8", "surrogateescape") + message


def parse_answer(body: bytes) -> Verdict:
    """A Verdict from rspamd's /checkv2 JSON; SpamFilterError when it is not one."""
    try:
        answer = json.loads(body)
        action = SpamAction(answer["action"])
        score, required = _number(answer.get("score")), _number(answer.get("required_score"))
    except (ValueError, KeyError, TypeError) as error:
        raise SpamFilterError(f"rspamd's answer is not a verdict ({type(error).__name__}: {error}): "
                              f"{body[:200]!r}") from None
    symbols = answer.get("symbols")
    names = tuple(sorted(symbols))[:MAX_SYMBOLS] if isinstance(symbols, dict) else ()
    return Verdict(action, score, required, names, _milter_headers(answer.get("milter")))


def _milter_headers(milter) -> tuple[tuple[str, str], ...]:
    """The fields milter_headers asks to add: a value, {"value", "order"}, or a list of those, per name."""
    adds = milter.get("add_headers") if isinstance(milter, dict) else None
    if not isinstance(adds, dict):
        return ()
    headers = []
    for name, spec in sorted(adds.items()):
        if not isinstance(name, str) or name.lower() not in RSPAMD_FIELDS:
            log.warning("rspamd asked to add a header field we do not take from it: %r", str(name)[:80])
            continue
        for item in spec if isinstance(spec, list) else [spec]:
            value = item.get("value") if isinstance(item, dict) else item
            try:
                headers.append(_checked_header(name, value))
            except ValueError as error:
                log.warning("rspamd's %s header dropped: %s", name, error)
    return tuple(headers)


def _checked_header(name, value) -> tuple[str, str]:
    """One header field made of the name and value, or ValueError: never a second field, never a broken one."""
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name) or name.lower() not in OUR_FIELDS:
        raise ValueError(f"not a field name we add: {str(name)[:80]!r}")
    if not isinstance(value, str) or len(value) > MAX_HEADER_VALUE:
        raise ValueError("not a value of sane length")
    value = value.replace("\r\n", "\n").replace("\n", "\r\n")   # rspamd folds with bare LF
    if not _ONE_FIELD_VALUE.fullmatch(value) or value.endswith("\r\n") or "\r\n\r\n" in value:
        raise ValueError("the value is not one field")
    return name, value


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise SpamFilterError("rspamd's answer has a header block over 64 KiB") from None
    except asyncio.IncompleteReadError:
        raise SpamFilterError("rspamd closed the connection before answering") from None
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1.") or not status_line[1].isdigit():
        raise SpamFilterError(f"rspamd's answer is not HTTP: {lines[0][:80]!r}")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            if not value.strip().isdigit():
                raise SpamFilterError(f"rspamd's answer has a bad Content-Length: {value.strip()[:40]!r}")
            length = int(value.strip())
    if length is not None and length > MAX_ANSWER:
        raise SpamFilterError(f"rspamd's answer is {length} bytes, over {MAX_ANSWER}")
    try:
        body = await (reader.readexactly(length) if length is not None else reader.read(MAX_ANSWER + 1))
    except asyncio.IncompleteReadError:
        raise SpamFilterError("rspamd's answer ended early") from None
    if len(body) > MAX_ANSWER:
        raise SpamFilterError(f"rspamd's answer is over {MAX_ANSWER} bytes")
    return int(status_line[1]), body


# --- the verdict token ---------------------------------------------------------

VERDICT_KEY_LENGTH = 32


class VerdictKeyError(Exception):
    """The verdict key file is unusable (its message says how to fix it)."""


def load_verdict_key(path: Path) -> bytes:
    """Home's verdict MAC key: made on first use (owner-only), then read back; the same across restarts."""
    if not path.exists():
        create_private_file(path, os.urandom(VERDICT_KEY_LENGTH))
        log.info("made a new verdict key %s", path)
    key = read_private_file(path, os.getuid(), VerdictKeyError, "verdict key", f"rm {path} (it is remade)")
    if len(key) != VERDICT_KEY_LENGTH:
        raise VerdictKeyError(f"verdict key {path} is {len(key)} bytes, not {VERDICT_KEY_LENGTH}: "
                              f"remove it and it is remade (verdicts in flight are judged again)")
    return key


def seal_verdict(key: bytes, message: bytes, verdict: Verdict) -> str:
    """The verdict as a token the edge carries in the sealed metadata: home's MAC over it and the message."""
    body = json.dumps(verdict.to_dict(), separators=(",", ":"), sort_keys=True).encode()
    tag = hmac.new(key, _TOKEN_CONTEXT + hashlib.sha256(message).digest() + body, hashlib.sha256).digest()
    return f"{_b64(body)}.{_b64(tag)}"


def open_verdict(key: bytes, token, message: bytes) -> Verdict | None:
    """The verdict home gave for exactly this message, or None (no token, another message, a forgery)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN or token.count(".") != 1:
        return None
    body_text, _, tag_text = token.partition(".")
    try:
        body, tag = _unb64(body_text), _unb64(tag_text)
    except ValueError:
        return None
    expected = hmac.new(key, _TOKEN_CONTEXT + hashlib.sha256(message).digest() + body, hashlib.sha256).digest()
    if not hmac.compare_digest(tag, expected):
        return None
    try:
        return Verdict.from_dict(json.loads(body))
    except ValueError:
        log.error("a verdict token with a valid MAC does not hold a verdict: %r", body[:200])
        return None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- checked metadata ----------------------------------------------------------

MAX_FACT = 256   # characters of a HELO, sender or recipient passed to rspamd


def _one_line(value) -> str:
    """A metadata string passed on only if it is one printable line of sane length (it becomes a header)."""
    if not isinstance(value, str) or len(value) > MAX_FACT or not value.isprintable():
        return ""
    return value


def _client_ip(client_address) -> str:
    """The IP address of the edge's "address:port" record of the client; "" if it is not one."""
    if not isinstance(client_address, str):
        return ""
    ip = client_address.rpartition(":")[0] or client_address
    try:
        return str(ipaddress.ip_address(ip.strip("[]")))
    except ValueError:
        return ""


SPF_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})


def _spf_result(claim) -> str:
    """The edge's SPF result from its {"result", "domain"} record; "" when there is none we can read."""
    result = claim.get("result") if isinstance(claim, dict) else None
    return result if result in SPF_RESULTS else ""


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) > 1e6:
        raise ValueError(f"not a score: {value!r}")
    return float(value)
