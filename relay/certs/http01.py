"""The HTTP-01 solver: key authorizations placed on every edge over the tunnel, for their port 80 to answer.

The CA fetches http://<name>/.well-known/acme-challenge/<token> from the
edge the name's A record points to; with several edges that is any of them
(an MX name of its own, or a name such as mta-sts.<domain> with an A record
for each edge), so every token goes to every edge, and an edge that cannot
take it fails the order at once, naming the edge, rather than leave the CA a
chance to ask there. Home connects to each edge's spool service (site.toml
[acme] edges), proves its ACME identity key (relay.tunnel.authenticate; the edge
allowlists it as a [[spool_service.peer]] whose `methods` are the two below, so
the key can do nothing else), and calls the methods relay/edge/acme.py serves:

    acme_challenge_put    {"token", "key_authorization", "ttl"} -> {}
    acme_challenge_delete {"token"}                             -> {}

Put before the challenge is answered, delete after the order, success or
failure; the ttl (the order's timeout and a margin) bounds how long a token
whose delete never arrived stays. The acme library is synchronous, so the
solver runs its tunnel connection on an event loop of its own, driven one
call at a time.
"""

import asyncio
import logging
from pathlib import Path

from acme import challenges

from relay import tunnel
from relay.certs.ca import ORDER_TIMEOUT
from relay.certs.store import CertificateError
from relay.identity import IdentityError, load_identity
from relay.rpc import RemoteError, RpcConnection
from relay.spool.protocol import ACME_DELETE as DELETE
from relay.spool.protocol import ACME_PUT as PUT
from relay.spool.protocol import MAX_ACME_TTL as MAX_TTL
from relay.spool.protocol import MAX_FRAME, MAX_KEY_AUTHORIZATION, SERVICE
from relay.spool.protocol import is_acme_token as is_token

log = logging.getLogger("yestls.certs")

TTL = min(ORDER_TIMEOUT + 60, MAX_TTL)
TIMEOUT = 10.0   # seconds to connect, authenticate, and for each call


class Http01Solver:
    challenge_type = challenges.HTTP01

    def __init__(self, edges: tuple[tuple[str, int], ...], identity_key: Path):
        self.edges = edges
        self.identity_key = Path(identity_key)
        self.loop = asyncio.new_event_loop()
        self.connections: dict[tuple[str, int], RpcConnection] = {}
        self.tokens: dict[tuple[str, int], list[str]] = {edge: [] for edge in edges}   # placed, per edge

    def present(self, domain: str, token: str, validation: str) -> None:
        if not is_token(token):
            raise CertificateError(f"the CA's token for {domain} is not 1..128 base64url characters; the edge "
                                   f"would refuse it")
        if len(validation) > MAX_KEY_AUTHORIZATION:
            raise CertificateError(f"the key authorization for {domain} is longer than {MAX_KEY_AUTHORIZATION} "
                                   f"characters; the edge would refuse it")
        for edge in self.edges:
            self.loop.run_until_complete(self._put(edge, token, validation))
            self.tokens[edge].append(token)
        log.info("HTTP-01 token for %s placed on %s", domain, ", ".join(_where(edge) for edge in self.edges))

    async def _put(self, edge: tuple[str, int], token: str, validation: str) -> None:
        if edge not in self.connections:
            self.connections[edge] = await self._connect(edge)
        await self._call(edge, PUT, {"token": token, "key_authorization": validation, "ttl": TTL})

    async def _connect(self, edge: tuple[str, int]) -> RpcConnection:
        try:
            identity = load_identity(self.identity_key)
        except IdentityError as error:
            raise CertificateError(f"home's ACME identity key: {error}") from None
        try:
            _, connection = await asyncio.wait_for(self.loop.create_connection(
                lambda: RpcConnection(max_frame=MAX_FRAME), *edge), TIMEOUT)
        except (OSError, asyncio.TimeoutError) as error:
            raise CertificateError(f"cannot reach {_where(edge)} ({error.__class__.__name__}: {error}); is the "
                                   f"tunnel up and the edge running? (every edge of [acme] edges takes the "
                                   f"tokens: the CA may ask any of them)") from None
        try:
            await tunnel.authenticate(connection, SERVICE, identity, TIMEOUT)
        except (RemoteError, ConnectionError, asyncio.TimeoutError) as error:
            connection.close()
            raise CertificateError(f"{_where(edge)} did not accept home's ACME identity key {self.identity_key} "
                                   f"({error}); allowlist its public key on the edge as a [[spool_service.peer]] "
                                   f'with methods = ["{PUT}", "{DELETE}"]') from None
        return connection

    async def _call(self, edge: tuple[str, int], method: str, params: dict) -> None:
        try:
            await self.connections[edge].call(method, params, timeout=TIMEOUT)
        except RemoteError as error:
            raise CertificateError(f"{_where(edge)} refused {method} ({error.code}: {error.message})") from None
        except (ConnectionError, asyncio.TimeoutError) as error:
            raise CertificateError(f"{_where(edge)} did not answer {method} ({error.__class__.__name__})") from None

    def cleanup(self) -> None:
        """Every token placed is deleted from its edge (those an order that failed half-way placed too)."""
        try:
            for edge in list(self.connections):
                self.loop.run_until_complete(self._delete_all(edge))
        finally:
            self.loop.close()

    async def _delete_all(self, edge: tuple[str, int]) -> None:
        for token in self.tokens[edge]:
            try:
                await self._call(edge, DELETE, {"token": token})
            except CertificateError as error:
                log.warning("could not delete an HTTP-01 token (it expires on the edge in %d s): %s", TTL, error)
        self.tokens[edge].clear()
        connection = self.connections.pop(edge)
        connection.close()
        await asyncio.wait([connection.closed], timeout=TIMEOUT)


def _where(edge: tuple[str, int]) -> str:
    return f"the edge's tunnel service {edge[0]}:{edge[1]}"
