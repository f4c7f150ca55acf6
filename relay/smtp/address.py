"""One RFC 5321 mailbox, fit to travel between the angle brackets of MAIL FROM and RCPT TO.

The edge checks what a client gives it at MAIL and RCPT with this; home
checks again what the sealed metadata says, before any LMTP command is
written (relay/home/envelope.py): what goes between `<` and `>` must be one
path and nothing more, since a CR or LF would end the command and start
another (`a@b>\\r\\nRCPT TO:<victim@...`). An address must be:

- a string of at most 254 octets (a path is at most 256 with its brackets,
  RFC 5321 4.5.3.1.3), its local part at most 64 (4.5.3.1.1) and its domain
  at most 255 (4.5.3.1.2), labels at most 63;
- a Mailbox of RFC 5321 4.1.2: a Dot-string or a Quoted-string, "@", a
  domain name or an address literal (`[192.0.2.1]`, `[IPv6:...]`);
- free of control characters (C0, DEL, C1), surrogates (bytes that were not
  UTF-8), of line and paragraph separators, and of `<` and `>` anywhere —
  stricter than RFC 5321, which allows `<`/`>` inside a quoted local part:
  no real mailbox needs them, and a reader that stops at the first `>` would
  split the path there;
- ASCII unless the message came with SMTPUTF8 (RFC 6531 3.3: then the
  local part may hold UTF-8 and the domain U-labels).
"""

import ipaddress
import re
import unicodedata

from relay.show import show

MAX_MAILBOX = 254        # octets: a 256-octet path less its angle brackets
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_LABEL = 63

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*")
# qtextSMTP (%d32-33 / %d35-91 / %d93-126) and quoted-pairSMTP ("\" %d32-126), RFC 5321 4.1.2.
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_STRING_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_STANDARDIZED_TAG = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_DCONTENT = re.compile(r"[\x21-\x5a\x5e-\x7e]+")
# Control characters, surrogates, private use, and anything that ends a line for some reader.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Zl", "Zp"})
_ASCII_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f<>]")   # the same, within ASCII: C0 controls, DEL, < and >


class AddressError(ValueError):
    """Not one RFC 5321 mailbox fit for a path; the message says why, in one bounded line."""


def check_mailbox(address, smtputf8: bool, *, what: str = "address") -> str:
    """`address` if it is one RFC 5321 Mailbox fit for a path (see the module); AddressError saying why not."""
    if not isinstance(address, str):
        raise AddressError(f"{what} is {show(address)}, not a string")
    try:
        octets = len(address.encode("utf-8"))
    except UnicodeEncodeError:
        raise AddressError(f"{what} {show(address)} is not valid Unicode") from None
    if octets > MAX_MAILBOX:
        raise AddressError(f"{what} is {octets} octets long, more than {MAX_MAILBOX}")
    forbidden = _forbidden_character(address)
    if forbidden is not None:
        raise AddressError(f"{what} {show(address)} holds the character {forbidden!r}")
    if not address.isascii() and not smtputf8:
        raise AddressError(f"{what} {show(address)} is not ASCII, and the message did not come with SMTPUTF8")
    local, at, domain = address.rpartition("@")
    if not at:
        raise AddressError(f"{what} {show(address)} has no @domain")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError(f"{what} {show(address)}: the local part is longer than {MAX_LOCAL_PART} octets")
    dot_string, quoted_string = (_DOT_STRING_UTF8, _QUOTED_STRING_UTF8) if smtputf8 else (_DOT_STRING, _QUOTED_STRING)
    if not (dot_string.fullmatch(local) or quoted_string.fullmatch(local)):
        raise AddressError(f"{what} {show(address)}: the local part is neither a dot-string nor a quoted string")
    if not (_domain_ok(domain, smtputf8) or _address_literal_ok(domain)):
        raise AddressError(f"{what} {show(address)}: {show(domain)} is neither a domain name nor an "
                            "address literal")
    return address


def _forbidden_character(address: str) -> str | None:
    """The first character of a forbidden category, or `<` or `>`; ASCII (most addresses) by one search."""
    if address.isascii():
        found = _ASCII_FORBIDDEN.search(address)
        return found.group() if found else None
    for character in address:
        if unicodedata.category(character) in _FORBIDDEN_CATEGORIES or character in "<>":
            return character
    return None


def _domain_ok(domain: str, smtputf8: bool) -> bool:
    if not domain or len(domain.encode("utf-8")) > MAX_DOMAIN:
        return False
    for label in domain.split("."):
        if label.isascii():
            if not (len(label) <= MAX_LABEL and _LABEL.fullmatch(label)):
                return False
        elif not (smtputf8 and _u_label_ok(label)):
            return False
    return True


def _u_label_ok(label: str) -> bool:
    """A non-ASCII label that has an A-label form (RFC 5890) of at most 63 octets."""
    if label.startswith("-") or label.endswith("-"):
        return False
    if not all(c == "-" or unicodedata.category(c)[0] in "LMN" for c in label):
        return False
    try:
        encoded = label.encode("idna")
    except UnicodeError:
        return False
    return len(encoded) <= MAX_LABEL


def _address_literal_ok(domain: str) -> bool:
    if not (domain.startswith("[") and domain.endswith("]")):
        return False
    literal = domain[1:-1]
    tag, colon, content = literal.partition(":")
    if not colon:
        try:
            return isinstance(ipaddress.ip_address(literal), ipaddress.IPv4Address) and literal.count(".") == 3
        except ValueError:
            return False
    if tag.upper() == "IPV6":
        try:
            ipaddress.IPv6Address(content)
            return True
        except ValueError:
            return False
    # General-address-literal: Standardized-tag ":" 1*dcontent.
    return bool(_STANDARDIZED_TAG.fullmatch(tag) and _DCONTENT.fullmatch(content))
