"""ACME HTTP-01 challenges home places on the edge, for the edge's port 80 to answer (relay/edge/web.py).

Home's ACME client (relay/certs/) orders the certificate; the CA checks
`http://<name>/.well-known/acme-challenge/<token>`, and <name> points at
the edge. So home places each token's key authorization here over the
tunnel, on the spool service, with its own identity key (a [[peer]] whose
`methods` are these two):

    acme_challenge_put    {"token", "key_authorization", "ttl"} -> {}
    acme_challenge_delete {"token"}                             -> {}

- `token`: 1..128 base64url characters (RFC 8555 8.3: the CA's token, which
  is at least 128 bits of entropy, 22 characters and up);
- `key_authorization`: at most 256 characters, and exactly
  `<token>.<base64url thumbprint>` (RFC 8555 8.1): anything else is no key
  authorization for that token;
- `ttl`: whole seconds, 1..3600; the challenge is answered until then.

Held in memory only (a restart forgets them: home places them again when it
retries), at most MAX_CHALLENGES at once: a put beyond that is refused
`bad_request` until some are deleted or expire, so a caller that never
deletes cannot grow the edge's memory. Putting a token again replaces its
key authorization and ttl; deleting a token not held is not an error (the
answer home wants, "not served", is already true). Nothing here is secret:
the CA fetches it in the clear.
"""

import logging
import re
import time
from collections.abc import Callable

from relay.rpc import Code, Frame, RemoteError, RpcConnection
from relay.spool.protocol import ACME_DELETE as DELETE
from relay.spool.protocol import ACME_PUT as PUT
from relay.spool.protocol import MAX_ACME_TTL as MAX_TTL
from relay.spool.protocol import MAX_KEY_AUTHORIZATION
from relay.spool.protocol import is_acme_token as is_token

log = logging.getLogger("yestls.edge")

MAX_CHALLENGES = 100
_THUMBPRINT = re.compile(r"[A-Za-z0-9_-]+")


class AcmeChallenges:
    def __init__(self, clock: Callable[[], float] = time.monotonic, limit: int = MAX_CHALLENGES):
        self.clock = clock
        self.limit = limit
        self._held: dict[str, tuple[str, float]] = {}   # token -> (key authorization, expires at)

    def key_authorization(self, token: str) -> str | None:
        """What to answer for `token`, or None (never placed, deleted, or expired)."""
        self._expire()
        held = self._held.get(token)
        return held[0] if held is not None else None

    def __len__(self) -> int:
        self._expire()
        return len(self._held)

    def methods(self) -> dict:
        """The tunnel methods, for the spool service's `extra_methods`."""
        return {PUT: self.put, DELETE: self.delete}

    async def put(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        token = _token(frame.meta)
        authorization = frame.meta.get("key_authorization")
        if not isinstance(authorization, str) or len(authorization) > MAX_KEY_AUTHORIZATION:
            raise RemoteError(Code.BAD_REQUEST, f"key_authorization must be a string of at most "
                                                f"{MAX_KEY_AUTHORIZATION} characters")
        prefix, dot, thumbprint = authorization.partition(".")
        if prefix != token or not dot or not _THUMBPRINT.fullmatch(thumbprint):
            raise RemoteError(Code.BAD_REQUEST, "key_authorization must be the token, a dot and the account key's "
                                                "base64url thumbprint (RFC 8555 8.1)")
        ttl = frame.meta.get("ttl")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TTL:
            raise RemoteError(Code.BAD_REQUEST, f"ttl must be whole seconds, 1..{MAX_TTL}")
        self._expire()
        if token not in self._held and len(self._held) >= self.limit:
            raise RemoteError(Code.BAD_REQUEST, f"the edge holds {self.limit} ACME challenges already: delete "
                                                "finished ones (acme_challenge_delete) or wait for their ttl")
        self._held[token] = (authorization, self.clock() + ttl)
        log.info("ACME challenge placed by %s for token %s, answered for %d s", _peer(connection), token, ttl)
        return {}, b""

    async def delete(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        token = _token(frame.meta)
        if self._held.pop(token, None) is not None:
            log.info("ACME challenge for token %s deleted by %s", token, _peer(connection))
        return {}, b""

    def _expire(self) -> None:
        now = self.clock()
        for token in [t for t, (_, expires) in self._held.items() if expires <= now]:
            del self._held[token]


def _token(meta: dict) -> str:
    token = meta.get("token")
    if not isinstance(token, str) or not is_token(token):
        raise RemoteError(Code.BAD_REQUEST, "token must be 1..128 base64url characters (A-Z a-z 0-9 - _)")
    return token


def _peer(connection: RpcConnection) -> str:
    peer = connection.state.get("peer") if connection is not None else None
    return peer.name if peer is not None else "?"
