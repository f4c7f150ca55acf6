"""The site's addresses: mailboxes, aliases, plus-addressing and catch-alls, from one source of truth.

The inventory says them once; the home role writes them as JSON
(`/etc/yestls/addresses.json`), home's Postfix builds its maps from the same
inventory, the intake delivers with them (an alias becomes its mailboxes)
and publishes them to the edge, which accepts at RCPT exactly what they
name, so an unknown address is refused at the door:

    {"domains": ["example.org", "example.net"],
     "mailboxes": ["user@example.org", "ann@example.net"],
     "aliases": {"info@example.net": ["user@example.org", "ann@example.net"]},
     "catch_all": {"example.net": "ann@example.net"},
     "plus_separator": "+"}

Rules:
- an address is at one of `domains`; alias targets and catch-all targets
  are mailboxes of the site (forwarding elsewhere is home Postfix's job);
- `user+tag@domain` is `user@domain` when the separator is "+" and
  `user@domain` is a mailbox or an alias (the tag is kept for nobody: the
  mailbox gets the message);
- `postmaster@` each domain always exists (RFC 5321 4.5.1): it goes to
  the alias of that name if there is one, else to the site's first mailbox
  in sorted order;
- a catch-all takes any other local part at its domain;
- everything is compared lower case (local parts too: no mailbox of the site
  differs from another by case only).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from relay.show import show
from relay.smtp.address import AddressError, check_mailbox

MAX_ENTRIES = 100_000


class AddressBookError(ValueError):
    """The document is not a valid address book; the message says what to fix."""


@dataclass(frozen=True)
class AddressBook:
    domains: frozenset[str]
    mailboxes: frozenset[str]
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    catch_all: dict[str, str] = field(default_factory=dict)
    plus_separator: str = "+"

    def deliver_to(self, address: str) -> tuple[str, ...]:
        """The mailboxes a message to `address` goes to; () when the site has no such address."""
        local, at, domain = address.lower().rpartition("@")
        if not at or domain not in self.domains:
            return ()
        full = f"{local}@{domain}"
        found = self._named(full)
        if found is None and self.plus_separator and self.plus_separator in local:
            found = self._named(f"{local.split(self.plus_separator, 1)[0]}@{domain}")
        if found is None and domain in self.catch_all:
            found = (self.catch_all[domain],)
        if found is None and local == "postmaster":
            found = (min(self.mailboxes),) if self.mailboxes else None
        return found or ()

    def accepts(self, address: str) -> bool:
        return bool(self.deliver_to(address))

    def _named(self, address: str) -> tuple[str, ...] | None:
        if address in self.mailboxes:
            return (address,)
        return self.aliases.get(address)

    def to_json(self) -> dict:
        return {"domains": sorted(self.domains), "mailboxes": sorted(self.mailboxes),
                "aliases": {alias: list(targets) for alias, targets in sorted(self.aliases.items())},
                "catch_all": dict(sorted(self.catch_all.items())), "plus_separator": self.plus_separator}


def load(path: Path) -> AddressBook:
    """The address book in the JSON file at `path`; AddressBookError naming the file and the problem."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise AddressBookError(f"{path}: {error}") from None
    try:
        return from_json(document)
    except AddressBookError as error:
        raise AddressBookError(f"{path}: {error}") from None


def from_json(document) -> AddressBook:
    """The address book in a decoded JSON document (from a file, or from home over the tunnel)."""
    if not isinstance(document, dict):
        raise AddressBookError("the address book is not a JSON object")
    unknown = set(document) - {"domains", "mailboxes", "aliases", "catch_all", "plus_separator"}
    if unknown:
        raise AddressBookError(f"unknown keys {sorted(unknown)}")
    domains = _list(document.get("domains"), "domains")
    if not domains or not all(isinstance(d, str) and d and "@" not in d for d in domains):
        raise AddressBookError(f"domains must be a non-empty list of domain names, not {show(domains)}")
    domains = frozenset(d.lower().rstrip(".") for d in domains)

    def address(value, what: str) -> str:
        try:
            checked = check_mailbox(value, smtputf8=True, what=what).lower()
        except AddressError as error:
            raise AddressBookError(str(error)) from None
        if checked.rpartition("@")[2] not in domains:
            raise AddressBookError(f"{what} {show(value)} is not at one of the domains {sorted(domains)}")
        return checked

    mailboxes = frozenset(address(m, "mailbox") for m in _list(document.get("mailboxes"), "mailboxes"))
    aliases: dict[str, tuple[str, ...]] = {}
    raw_aliases = document.get("aliases") or {}
    if not isinstance(raw_aliases, dict) or len(raw_aliases) > MAX_ENTRIES:
        raise AddressBookError(f"aliases must be an object of alias -> [mailbox, ...], not {show(raw_aliases)}")
    for alias, targets in raw_aliases.items():
        name = address(alias, "alias")
        if name in mailboxes:
            raise AddressBookError(f"alias {name} is also a mailbox: one address, one meaning")
        targets = _list([targets] if isinstance(targets, str) else targets, f"alias {name}'s targets")
        checked = tuple(dict.fromkeys(address(t, f"alias {name}'s target") for t in targets))
        if not checked or not set(checked) <= mailboxes:
            raise AddressBookError(f"alias {name} must point to mailboxes of the site, not {show(targets)}")
        aliases[name] = checked
    catch_all: dict[str, str] = {}
    raw_catch_all = document.get("catch_all") or {}
    if not isinstance(raw_catch_all, dict):
        raise AddressBookError(f"catch_all must be an object of domain -> mailbox, not {show(raw_catch_all)}")
    for domain, target in raw_catch_all.items():
        domain = str(domain).lower()
        if domain not in domains:
            raise AddressBookError(f"catch_all domain {show(domain)} is not one of the domains")
        target = address(target, f"catch_all {domain}'s target")
        if target not in mailboxes:
            raise AddressBookError(f"catch_all {domain} must point to a mailbox of the site, not {target}")
        catch_all[domain] = target
    separator = document.get("plus_separator", "+")
    if not isinstance(separator, str) or len(separator) > 1 or (separator and separator.isalnum()):
        raise AddressBookError(f"plus_separator must be one character that is not a letter or digit (or \"\"), "
                               f"not {show(separator)}")
    return AddressBook(domains, mailboxes, aliases, catch_all, separator)


def _list(value, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_ENTRIES:
        raise AddressBookError(f"{what} must be a list of at most {MAX_ENTRIES}, not {show(value)}")
    return value
