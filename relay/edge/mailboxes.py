"""The mailbox list home publishes to the edge, cached on disk for when home is away.

With `mailboxes_from_home`, home's intake sends the list of its mailboxes over
the tunnel (the spool service's `mailboxes` method); the edge then accepts
mail only for those. Until a first list arrives the edge accepts any mailbox
at its domains: refusing everything on a fresh install would bounce real mail.
"""

import json
import os
from pathlib import Path

from relay.edge.recipients import normal_address
from relay.rpc import Code, RemoteError

MAX_MAILBOXES = 100_000


class MailboxList:
    def __init__(self, path: Path):
        self.path = path
        self._mailboxes: frozenset[str] | None = None
        if path.exists():
            self._mailboxes = frozenset(json.loads(path.read_text())["mailboxes"])

    def current(self) -> frozenset[str] | None:
        return self._mailboxes

    async def publish(self, connection, frame) -> tuple[dict, bytes]:
        """RPC method: {"mailboxes": ["user@example.org", ...]} replaces the list."""
        addresses = frame.meta.get("mailboxes")
        if not isinstance(addresses, list) or len(addresses) > MAX_MAILBOXES:
            raise RemoteError(Code.BAD_REQUEST, f"mailboxes must be a list of at most {MAX_MAILBOXES} addresses")
        normal = [normal_address(a) if isinstance(a, str) else None for a in addresses]
        if None in normal:
            bad = addresses[normal.index(None)]
            raise RemoteError(Code.BAD_REQUEST, f"{bad!r} is not an address")
        self._save(sorted(set(normal)))
        self._mailboxes = frozenset(normal)
        return {"count": len(self._mailboxes)}, b""

    def _save(self, mailboxes: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"mailboxes": mailboxes}))
        os.replace(temporary, self.path)
