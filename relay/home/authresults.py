"""SPF, DKIM and DMARC at home, as an Authentication-Results header (RFC 8601); forged ones removed.

The edge records what these checks need inside the sealed metadata (the
client's address, its HELO, the envelope sender), so home evaluates them with
maintained libraries (authheaders over dkimpy and pyspf) when it delivers. DNS
goes through dnspython; `nameservers`/`port` point it at a chosen resolver
(tests use a local zone). The metadata comes from the edge, which may be
compromised: a HELO or address that is not one printable line is not passed
on, and the header written must be exactly one field.

**Forged results.** Before adding ours, every incoming Authentication-Results
field that names our authserv-id is removed (RFC 8601 5: a reader trusts the
fields with its border's name, so the border must not pass a forged one).
The fields are those Dovecot will store (relay/home/headers.py: its line
ends, where its header block ends, obsolete space before the colon, a field
hidden behind a bare CR). Each field's value is parsed with authres, which
handles folding, comments before and after the id, a version after it, and
case. Hand-written here, because authres does not do it:

- a field authres cannot parse (bad syntax, an unknown version, a
  quoted-string id, which RFC 8601 allows and authres does not read, or a
  value too long to parse cheaply) is removed when our id appears in it as a
  word at all: a lenient reader could take it for ours, and RFC 8601 5
  allows a border to remove any Authentication-Results field entering its
  trust boundary, so a foreign one mentioning us is lost at worst;
- the id compared without a trailing dot (`mx.example.org.` is the same
  host);
- a cap on the work: authres' parser takes time quadratic in a value's
  length, so values over MAX_PARSED_VALUE bytes, and any once
  MAX_PARSED_PER_MESSAGE bytes were parsed in the message, get the word
  check instead.

Fields of other hosts that authres parses stay byte for byte as they were.
"""

import functools
import ipaddress
import logging
import re

import authheaders
import authheaders.dmarc_lookup
import authres
import dns.resolver
from publicsuffix2 import PublicSuffixList

from relay.home.headers import Field, header_end, without_fields

log = logging.getLogger("yestls.intake")
DNS_CACHE_ENTRIES = 10_000
FIELD_NAME = b"authentication-results"
MAX_PARSED_VALUE = 8 * 1024             # bytes of one value authres parses (about 25 ms at this length)
MAX_PARSED_PER_MESSAGE = 64 * 1024      # bytes authres parses per message; the rest get the word check
MAX_CHECKED_LINE = 256                  # characters of a HELO or sender passed to the checks


@functools.lru_cache(maxsize=4)
def _suffix_list(location: str) -> PublicSuffixList:
    with open(location) as suffixes:
        return PublicSuffixList(suffixes)


def _org_domain_from_suffix_list(location: str, domain: str) -> str:
    return _suffix_list(str(location)).get_public_suffix(domain)


# authheaders parses the whole Public Suffix List (~10,000 rules, ~40 ms) for
# every DMARC lookup, several per message; parse it once. This is the one
# function all its callers go through (authheaders 0.16.3, pinned).
authheaders.dmarc_lookup.get_org_domain_from_suffix_list = _org_domain_from_suffix_list


class AuthenticationChecker:
    def __init__(self, authserv_id: str, nameservers: tuple[str, ...] = (), port: int = 53):
        self.authserv_id = authserv_id
        self._our_id = authserv_id.lower().rstrip(".")
        # Our id as a whole word: not part of a longer name (a.mx.example.org, mx.example.org.evil).
        self._our_id_as_word = re.compile(rf"(?<![\w.-]){re.escape(self._our_id)}\.?(?![\w.-])", re.IGNORECASE)
        if nameservers:
            # dkimpy and pyspf both resolve through dnspython's default resolver.
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = list(nameservers)
            resolver.port = port
            resolver.lifetime = 5.0
            dns.resolver.default_resolver = resolver
        # Answers kept for their TTL, as any resolver does: mail from one
        # sender domain repeats the same SPF and DMARC lookups.
        dns.resolver.get_default_resolver().cache = dns.resolver.LRUCache(DNS_CACHE_ENTRIES)

    def without_forged_results(self, message: bytes) -> bytes:
        """The message without Authentication-Results fields claiming our name (see the module)."""
        if b"authentication-results" not in message[:header_end(message)].lower():
            return message
        budget = [MAX_PARSED_PER_MESSAGE]
        kept, removed = without_fields(message, lambda field: self._forged(field, budget))
        if removed:
            log.warning("removed %d incoming Authentication-Results header(s) forged with our name; first: %r",
                        len(removed), removed[0].raw[:200])
        return kept

    def _forged(self, field: Field, budget: list[int]) -> bool:
        if field.name != FIELD_NAME:
            return False
        value = field.value.decode("utf-8", "replace")
        if len(value) <= min(MAX_PARSED_VALUE, budget[0]):
            budget[0] -= len(value)
            try:
                parsed = authres.AuthenticationResultsHeader.parse_value(value)
            except Exception:  # noqa: BLE001 - authres raises its own errors, RecursionError on deep comments, ...
                pass
            else:
                return parsed.authserv_id.rstrip(".") == self._our_id
        return self._our_id_as_word.search(value) is not None

    def header(self, message: bytes, metadata: dict) -> bytes:
        """The Authentication-Results header field, CRLF-terminated; a temperror result if checking fails."""
        failed = f"Authentication-Results: {self.authserv_id}; none (checks failed: temperror)"
        try:
            value = authheaders.authenticate_message(
                message, self.authserv_id, spf=True, dkim=True, dmarc=True,
                ip=_client_ip(metadata.get("client_address")), mail_from=_one_line(metadata.get("mail_from")),
                helo=_one_line(metadata.get("helo")))
        except Exception as error:  # noqa: BLE001 - a broken message or DNS must not stop delivery
            log.warning("authentication checks failed (%s: %s)", type(error).__name__, error)
            value = failed
        if not _has_dkim_signature(message):
            # authheaders says "fail" for an unsigned message; RFC 8601 2.7.1 says "none".
            value = value.replace("dkim=fail", "dkim=none", 1)
        field = value.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "replace") + b"\r\n"
        if not _ONE_FIELD.fullmatch(field):
            # Values from the message (a From domain, a DKIM d=) end up in it: it must stay one field.
            log.warning("the Authentication-Results header authheaders wrote is not one field; using temperror: %r",
                        field[:200])
            field = failed.encode() + b"\r\n"
        return field


# One field: its name, then lines of printable text (UTF-8 allowed), each continued one starting with SP/HT.
_ONE_FIELD = re.compile(rb"Authentication-Results:[^\x00-\x08\x0a-\x1f\x7f]*"
                        rb"(?:\r\n[ \t][^\x00-\x08\x0a-\x1f\x7f]*)*\r\n")


def _one_line(value) -> str:
    """A metadata string passed to the checks only if it is one printable line of sane length."""
    if not isinstance(value, str) or len(value) > MAX_CHECKED_LINE or not value.isprintable():
        return ""
    return value


def _client_ip(client_address) -> str:
    """The IP address of the edge's "address:port" record of the client; "" if it is not one."""
    if not isinstance(client_address, str):
        return ""
    ip = client_address.rpartition(":")[0] or client_address
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ""


def _has_dkim_signature(message: bytes) -> bool:
    head = message.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return any(line[:15].lower() == b"dkim-signature:" for line in head.splitlines())
