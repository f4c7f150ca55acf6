"""What every service on the tunnel puts in front of its methods, and how a client gets past it.

A `TunnelService` (the key oracle at home, the spool service on the edge)
accepts connections only from allowlisted peer addresses, caps connections
and requests in flight per peer, and serves nothing but `ping`, `hello` and
`auth` until the connection proves it holds the peer's Ed25519 identity key:
a signature over a fresh, single-use challenge bound to the connection's two
addresses (docs/rpc.md). Every refusal is audited and counted.

`authenticate()` is the client's half.
"""

import asyncio
import base64
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from relay.config import Table
from relay.identity import parse_public_key_text
from relay.rpc import Code, Frame, RemoteError, RpcConnection

log = logging.getLogger("yestls.tunnel")

CHALLENGE_LEN = 32


@dataclass(frozen=True)
class Peer:
    name: str
    addresses: frozenset[str]
    identity: Ed25519PublicKey
    max_connections: int
    max_in_flight: int
    rate: float   # requests per second a service may rate-limit to (the oracle: signatures)
    burst: int


def load_peers(table: Table, who: str) -> tuple[Peer, ...]:
    """The [[peer]] tables of a service's config; `who` names the peer for hints ("the edge")."""
    peers = []
    for peer in table.tables("peer"):
        addresses = peer.get("addresses", list, check=bool, hint=f"{who}'s tunnel source addresses")
        identity_text = peer.get("identity", str, hint=f"{who}'s `yestls keys identity-new` output")
        try:
            identity = parse_public_key_text(identity_text)
        except ValueError as error:
            raise peer.error("identity", f"{error}; paste the line `yestls keys identity-new` printed") from None
        peers.append(Peer(
            name=peer.get("name", str, check=bool, hint="a label for logs and metrics"),
            addresses=frozenset(_ip(peer, a) for a in addresses),
            identity=identity,
            max_connections=peer.get("max_connections", int, default=4, check=lambda n: n >= 1),
            max_in_flight=peer.get("max_in_flight", int, default=128, check=lambda n: n >= 1),
            rate=float(peer.get("rate", (int, float), default=50.0, check=lambda r: r > 0,
                                hint="requests per second")),
            burst=peer.get("burst", int, default=100, check=lambda n: n >= 1),
        ))
        peer.done()
    if not peers:
        raise table.error("peer", f"no [[peer]]: nobody could use this service; add {who} as a [[peer]]")
    return tuple(peers)


def _ip(table: Table, text) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise table.error("addresses", f"{text!r} is not an IP address") from None


def auth_message(service: str, challenge: bytes, server_address: tuple, client_address: tuple) -> bytes:
    """What a client signs: the fresh challenge, bound to the service and to this connection's two addresses."""
    server = f"{server_address[0]}:{server_address[1]}".encode()
    client = f"{client_address[0]}:{client_address[1]}".encode()
    return f"yestls {service} auth v1".encode() + b"\x00" + challenge + b"\x00" + server + b"\x00" + client


async def authenticate(connection: RpcConnection, service: str, identity: Ed25519PrivateKey, timeout: float) -> None:
    """Prove `identity` to a TunnelService; raises RemoteError (not_authenticated) if it is not allowlisted."""
    hello = await connection.call("hello", timeout=timeout)
    challenge = bytes.fromhex(hello.meta["challenge"])
    transport = connection.transport
    message = auth_message(service, challenge, transport.get_extra_info("peername"),
                           transport.get_extra_info("sockname"))
    signature = base64.b64encode(identity.sign(message)).decode()
    await connection.call("auth", {"signature": signature}, timeout=timeout)


class TokenBucket:
    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class PeerState:
    connections: int = 0
    in_flight: int = 0
    bucket: TokenBucket | None = None


Method = Callable[[RpcConnection, Frame], Awaitable[tuple[dict, bytes]]]


class TunnelService:
    """The gate; a service passes its methods (after auth) and an audit log and metrics.

    `metrics` has `requests` (labels method, outcome), `refusals` (reason)
    and `connections` (a gauge). Methods named in `self_auditing` audit
    their own refusals once authenticated, with details only they know.
    """

    def __init__(self, service: str, peers: tuple[Peer, ...], methods: dict[str, Method], audit, metrics, *,
                 max_frame: int, self_auditing: frozenset[str] = frozenset()):
        self.service = service
        self.peers = peers
        self.methods = methods
        self.audit = audit
        self.metrics = metrics
        self.max_frame = max_frame
        self.self_auditing = self_auditing
        self.peer_states: dict[str, PeerState] = {}

    def peer_for_address(self, address: str) -> Peer | None:
        return next((p for p in self.peers if address in p.addresses), None)

    # --- connections --------------------------------------------------------

    def new_connection(self) -> RpcConnection:
        return RpcConnection(self.handle, max_frame=self.max_frame, on_made=self._accept,
                             on_lost=self._connection_lost, on_frame_error=self._frame_error)

    def _accept(self, connection: RpcConnection) -> None:
        address = connection.transport.get_extra_info("peername")[0]
        peer = self.peer_for_address(address)
        if peer is None:
            self._refuse_connection(connection, address, "peer_not_allowed")
            return
        state = self.peer_states.setdefault(
            peer.name, PeerState(bucket=TokenBucket(peer.rate, peer.burst, time.monotonic())))
        if state.connections >= peer.max_connections:
            self._refuse_connection(connection, address, "too_many_connections", peer.name)
            return
        state.connections += 1
        connection.state.update(peer=peer, peer_state=state, authenticated=False, challenge=None)
        connection.max_in_flight = peer.max_in_flight
        self.metrics.connections.inc()

    def _refuse_connection(self, connection, address: str, reason: str, peer: str | None = None) -> None:
        log.warning("%s: refused connection from %s: %s", self.service, address, reason)
        self.audit.record(peer=peer or address, method="connect", outcome=f"refused:{reason}")
        self.metrics.refusals.labels(reason).inc()
        connection.transport.abort()

    def _frame_error(self, connection: RpcConnection, error) -> None:
        peer = connection.state.get("peer")
        self.audit.record(peer=peer.name if peer else connection.peer_text(), method="frame",
                          outcome="refused:bad_frame", message=str(error))
        self.metrics.refusals.labels("bad_frame").inc()

    def _connection_lost(self, connection: RpcConnection) -> None:
        state = connection.state.get("peer_state")
        if state is not None:
            state.connections -= 1
            self.metrics.connections.dec()

    # --- requests -----------------------------------------------------------

    async def handle(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        method = frame.meta.get("method")
        gate = {"ping": self._ping, "hello": self._hello, "auth": self._auth}
        known = method if isinstance(method, str) and (method in gate or method in self.methods) else None
        label = known or "other"  # a peer must not mint metric labels
        peer = connection.state.get("peer")
        if peer is None:  # refused at accept; requests may still be in the buffer
            raise RemoteError(Code.NOT_AUTHENTICATED, "connection refused")
        try:
            if known in gate:
                result = gate[known](connection, frame)
            elif not connection.state["authenticated"]:
                raise RemoteError(Code.NOT_AUTHENTICATED, "prove the peer's identity first (hello, auth)")
            elif known is None:
                raise RemoteError(Code.UNKNOWN_METHOD, f"no method {method!r} in the {self.service} service")
            else:
                result = await self.methods[known](connection, frame)
        except RemoteError as error:
            self.metrics.requests.labels(label, "refused").inc()
            self.metrics.refusals.labels(error.code).inc()
            if not (known in self.self_auditing and connection.state["authenticated"]):
                self.audit.record(peer=peer.name, method=str(method)[:64], outcome=f"refused:{error.code}",
                                  message=error.message[:200])
            raise
        self.metrics.requests.labels(label, "ok").inc()
        return result

    def _ping(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        return {}, b""

    def _hello(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        challenge = os.urandom(CHALLENGE_LEN)
        connection.state["challenge"] = challenge
        connection.state["authenticated"] = False
        return {"version": 1, "service": f"yestls-{self.service}", "challenge": challenge.hex()}, b""

    def _auth(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        challenge = connection.state.get("challenge")
        connection.state["challenge"] = None  # one answer per challenge: no second try, no replay
        if challenge is None:
            raise RemoteError(Code.NOT_AUTHENTICATED, "ask for a challenge (hello) first")
        try:
            signature = base64.b64decode(frame.meta.get("signature", ""), validate=True)
        except (ValueError, TypeError):
            raise RemoteError(Code.BAD_REQUEST, "signature must be base64") from None
        transport = connection.transport
        message = auth_message(self.service, challenge, transport.get_extra_info("sockname"),
                               transport.get_extra_info("peername"))
        try:
            connection.state["peer"].identity.verify(signature, message)
        except InvalidSignature:
            raise RemoteError(Code.NOT_AUTHENTICATED, "the signature is not the peer's identity key's") from None
        connection.state["authenticated"] = True
        self.audit.record(peer=connection.state["peer"].name, method="auth", outcome="ok")
        return {}, b""


async def serve(service: TunnelService, listen: tuple[tuple[str, int], ...]) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    return [await loop.create_server(service.new_connection, host, port) for host, port in listen]
