"""The HTTP-01 solver: key authorizations placed on the edge over the tunnel, for its port 80 to answer.

The CA fetches http://<name>/.well-known/acme-challenge/<token> from the
edge (the name's A record). Home connects to the edge's spool service (site.toml
[acme] edge), proves its ACME identity key (relay.tunnel.authenticate; the edge
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

    def __init__(self, edge: tuple[str, int], identity_key: Path):
        self.edge = edge
        self.identity_key = Path(identity_key)
        self.loop = asyncio.new_event_loop()
        self.connection: RpcConnection | None = None
        self.tokens: list[str] = []

    @property
    def where(self) -> str:
        return f"the edge's tunnel service {self.edge[0]}:{self.edge[1]}"

    def present(self, domain: str, token: str, validation: str) -> None:
        if not is_token(token):
            raise CertificateError(f"the CA's token for {domain} is not 1..128 base64url characters; the edge "
                                   f"would refuse it")
        if len(validation) > MAX_KEY_AUTHORIZATION:
            raise CertificateError(f"the key authorization for {domain} is longer than {MAX_KEY_AUTHORIZATION} "
                                   f"characters; the edge would refuse it")
        self.loop.run_until_complete(self._put(token, validation))
        self.tokens.append(token)
        log.info("HTTP-01 token for %s placed on %s", domain, self.where)

    async def _put(self, token: str, validation: str) -> None:
        if self.connection is None:
            self.connection = await self._connect()
        await self._call(PUT, {"token": token, "key_authorization": validation, "ttl": TTL})

    async def _connect(self) -> RpcConnection:
        try:
            identity = load_identity(self.identity_key)
        except IdentityError as error:
            raise CertificateError(f"home's ACME identity key: {error}") from None
        try:
            _, connection = await asyncio.wait_for(self.loop.create_connection(
                lambda: RpcConnection(max_frame=MAX_FRAME), *self.edge), TIMEOUT)
        except (OSError, asyncio.TimeoutError) as error:
            raise CertificateError(f"cannot reach {self.where} ({error.__class__.__name__}: {error}); is the "
                                   f"tunnel up and the edge running?") from None
        try:
            await tunnel.authenticate(connection, SERVICE, identity, TIMEOUT)
        except (RemoteError, ConnectionError, asyncio.TimeoutError) as error:
            connection.close()
            raise CertificateError(f"{self.where} did not accept home's ACME identity key {self.identity_key} "
                                   f"({error}); allowlist its public key on the edge as a [[spool_service.peer]] "
                                   f'with methods = ["{PUT}", "{DELETE}"]') from None
        return connection

    async def _call(self, method: str, params: dict) -> None:
        try:
            await self.connection.call(method, params, timeout=TIMEOUT)
        except RemoteError as error:
            raise CertificateError(f"{self.where} refused {method} ({error.code}: {error.message})") from None
        except (ConnectionError, asyncio.TimeoutError) as error:
            raise CertificateError(f"{self.where} did not answer {method} ({error.__class__.__name__})") from None

    def cleanup(self) -> None:
        try:
            if self.connection is not None:
                self.loop.run_until_complete(self._delete_all())
        finally:
            self.loop.close()

    async def _delete_all(self) -> None:
        for token in self.tokens:
            try:
                await self._call(DELETE, {"token": token})
            except CertificateError as error:
                log.warning("could not delete an HTTP-01 token (it expires on the edge in %d s): %s", TTL, error)
        self.tokens.clear()
        self.connection.close()
        await asyncio.wait([self.connection.closed], timeout=TIMEOUT)
        self.connection = None
