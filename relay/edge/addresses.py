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
import os
import time
from pathlib import Path

from relay.addressbook import AddressBook, AddressBookError, from_json, load
from relay.private_files import write_atomically
from relay.rpc import Code, RemoteError

log = logging.getLogger("yestls.edge")


RECHECK = 1.0   # seconds between looks at the cache file for a book another process wrote


class PublishedAddresses:
    """The book in force: the last one published here, or the cache file, re-read when it changes.

    Re-reading lets the edge's worker processes (relay/edge/worker.py) follow
    the book their supervisor received, within RECHECK seconds.
    """

    def __init__(self, path: Path, clock=time.monotonic):
        self.path = path
        self.clock = clock
        self._book: AddressBook | None = None
        self._seen: tuple | None = None     # the cache file's identity when last read or written
        self._checked = -RECHECK
        self.current()

    def current(self) -> AddressBook | None:
        now = self.clock()
        if now - self._checked >= RECHECK:
            self._checked = now
            self._reread()
        return self._book

    def _reread(self) -> None:
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return
        seen = (found.st_ino, found.st_mtime_ns, found.st_size)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            self._book = load(self.path)
        except AddressBookError as error:
            log.warning("ignoring the cached address book (%s); waiting for home's", error)

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
