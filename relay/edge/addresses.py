"""The address book home publishes to the edge (relay/addressbook.py), cached on disk for when home is away.

With `addresses_from_home`, home's intake sends its address book over the
tunnel each time it connects (the spool service's `addresses` method); the
edge then accepts at RCPT exactly the addresses it names (mailboxes,
aliases, their plus forms, catch-alls). Until a first book arrives the edge
accepts any mailbox at its domains: refusing everything on a fresh install
would bounce real mail.
"""

import json
import logging
from pathlib import Path

from relay.addressbook import AddressBook, AddressBookError, from_json, load
from relay.private_files import write_atomically
from relay.rpc import Code, RemoteError

log = logging.getLogger("yestls.edge")


class PublishedAddresses:
    def __init__(self, path: Path):
        self.path = path
        self._book: AddressBook | None = None
        if path.exists():
            try:
                self._book = load(path)
            except AddressBookError as error:
                log.warning("ignoring the cached address book (%s); waiting for home's", error)

    def current(self) -> AddressBook | None:
        return self._book

    async def publish(self, connection, frame) -> tuple[dict, bytes]:
        """RPC method: {"book": <address book>} replaces the one in force."""
        try:
            book = from_json(frame.meta.get("book"))
        except AddressBookError as error:
            raise RemoteError(Code.BAD_REQUEST, f"not an address book: {error}") from None
        document = book.to_json()
        if book != self._book:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps(document).encode())
            log.info("address book from home: %d mailboxes, %d aliases, catch-all for %s", len(book.mailboxes),
                     len(book.aliases), ", ".join(sorted(book.catch_all)) or "no domain")
        self._book = book
        return {"mailboxes": len(book.mailboxes), "aliases": len(book.aliases)}, b""
