"""Which recipients the edge accepts: our domains' mailboxes, and never anything to relay.

The edge is an MX for a few domains, nothing more. A recipient is accepted
only as a plain `local@domain` where the domain is one of ours, the local
part is a dot-atom (RFC 5321 4.1.2) and, when home has published its address
book (relay/addressbook.py: mailboxes, aliases, plus forms, catch-alls) or a
mailbox list is configured, the address is in it. Everything else is refused with
550 5.7.1, in particular what open-relay checkers try: foreign domains,
`user%foreign@ours` and `foreign!user@ours` (percent and bang routing), quoted
local parts (which can hide an `@`), IP literals, and trailing dots.
aiosmtpd already drops an RFC 5321 source route (`<@relay:user@domain>`); the
address that remains is judged like any other, so a route never leads
elsewhere.
"""

import re
from dataclasses import dataclass

from relay.addressbook import AddressBook

REFUSED = "550 5.7.1 Relaying denied: we accept mail only for our own domains"
UNKNOWN_MAILBOX = "550 5.1.1 No such mailbox here"

# RFC 5321 Dot-string of atext, or UTF-8 local parts under SMTPUTF8 (RFC 6531).
_ATOM = r"[A-Za-z0-9!#$&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_DOT_ATOM = re.compile(rf"^{_ATOM}(\.{_ATOM})*$")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class RecipientPolicy:
    domains: frozenset[str]                 # lower case, ASCII (IDNA) form
    mailboxes: frozenset[str] | None = None  # lower case addresses; None: any mailbox at our domains
    book: AddressBook | None = None         # home's address book, when it published one: it decides

    def check(self, address: str) -> str | None:
        """None to accept `address`, else the reply that refuses it."""
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            return REFUSED
        # '%' and '!' are legal atext but are the routing hacks of old relays.
        if "%" in local or "!" in local or not _DOT_ATOM.match(local):
            return REFUSED
        normal = normal_domain(domain)
        if normal is None or normal not in self.domains:
            return REFUSED
        # postmaster@ each of our domains is always accepted (RFC 5321 4.5.1).
        if local.lower() == "postmaster":
            return None
        if self.book is not None:
            return None if self.book.accepts(f"{local}@{normal}") else UNKNOWN_MAILBOX
        if self.mailboxes is not None and f"{local.lower()}@{normal}" not in self.mailboxes:
            return UNKNOWN_MAILBOX
        return None


def normal_domain(domain: str) -> str | None:
    """The lower-case ASCII form of a domain name; None for IP literals, trailing dots or junk."""
    try:
        ascii_domain = domain.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        return None
    labels = ascii_domain.split(".")
    if len(labels) < 2 or len(ascii_domain) > 253 or not all(_LABEL.match(label) for label in labels):
        return None
    return ascii_domain


def normal_address(address: str) -> str | None:
    """`local@domain` with the domain normalised, for mailbox lists; None when it is not one."""
    local, at, domain = address.strip().rpartition("@")
    normal = normal_domain(domain) if at else None
    if not local or normal is None or not _DOT_ATOM.match(local):
        return None
    return f"{local.lower()}@{normal}"
