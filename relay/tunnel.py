"""What every service on the tunnel puts in front of its methods, and how a client gets past it.

A `TunnelService` (the key oracle at home, the spool service on the edge)
accepts connections only from allowlisted peer addresses, caps connections
and requests in flight per peer, and serves nothing but `ping`, `hello` and
`auth` until the connection proves it holds the peer's Ed25519 identity key:
a signature over a fresh, single-use challenge bound to the connection's two
addresses (docs/rpc.md). Every refusal is counted, and audited within the
audit log's per-source rate (relay.audit).

Connections that have not proved the identity yet cannot lock the peer out.
Any process on the peer's host can connect from the peer's address, so such
connections are held apart from the authenticated ones:

- each must authenticate within the peer's `auth_timeout` (default 5 s) from
  its connect, whatever it sends meanwhile, or it is closed (`auth_timeout`);
- at most `max_unauthenticated` (default 16) wait at once per peer; when one
  more connects, the *oldest* waiting one is closed (`unauthenticated_evicted`)
  rather than the new one refused. Refusing the newcomer would let a few idle
  sockets keep the genuine peer out for good; evicting the oldest lets in a
  peer that authenticates as soon as it connects (hello, auth: two round
  trips), unless `max_unauthenticated` others connect within those round trips;
- `max_connections` counts authenticated connections only: a connection
  takes a slot when its `auth` succeeds (past the cap that `auth` is answered
  `busy` and the connection closed: `too_many_connections`), and gives it back
  when it closes or asks for a new challenge (`hello`), which makes it
  unauthenticated again.

What this does not stop is a process on the peer's host that reconnects
faster than the peer can authenticate: that is a flood of the service like
any other; the host's firewall (allow the service's user only) is the answer.

Several peers may share an address (home's intake and home's ACME client,
each with its own identity key): a connection from that address proves one
of their keys, and the key it proves decides which peer it is. Until then it
waits among the first such peer's unauthenticated connections, under that
peer's `auth_timeout` and `max_unauthenticated`.

A peer's `methods`, when set, is all it may call besides ping/hello/auth;
anything else is refused `not_permitted` and audited. A peer without it
may call every method of the service. So a key that only places ACME tokens
(`methods = ["acme_challenge_put", "acme_challenge_delete"]`) cannot fetch
or delete sealed mail if it is stolen.

`authenticate()` is the client's half.
"""

import asyncio
import base64
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from relay.config import Table
from relay.identity import parse_public_key_text
from relay.ratelimit import TokenBucket
from relay.rpc import Code, Frame, RemoteError, RpcConnection

log = logging.getLogger("yestls.tunnel")

CHALLENGE_LEN = 32
DEFAULT_AUTH_TIMEOUT = 5.0
DEFAULT_MAX_UNAUTHENTICATED = 16


class Reason(StrEnum):
    """Why the gate closed a connection or refused an `auth`: the audit's `refused:<reason>`, the metric's label.

    Refused requests are labelled with their RPC error code (relay.rpc.Code, a service's own codes) instead.
    """

    PEER_NOT_ALLOWED = "peer_not_allowed"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    AUTH_TIMEOUT = "auth_timeout"
    EVICTED = "unauthenticated_evicted"
    BAD_FRAME = "bad_frame"


@dataclass(frozen=True)
class Peer:
    name: str
    addresses: frozenset[str]
    identity: Ed25519PublicKey
    max_connections: int
    max_in_flight: int
    rate: float   # requests per second a service may rate-limit to (the oracle: signatures)
    burst: int
    auth_timeout: float = DEFAULT_AUTH_TIMEOUT        # seconds from connect to a successful `auth`
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED  # connections waiting to authenticate at once
    methods: frozenset[str] | None = None             # the service methods it may call; None: all of them

    def may_call(self, method: str) -> bool:
        return self.methods is None or method in self.methods


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
            auth_timeout=float(peer.get("auth_timeout", (int, float), default=DEFAULT_AUTH_TIMEOUT,
                                        check=lambda t: 0 < t <= 300, hint="seconds to authenticate, 0..300")),
            max_unauthenticated=peer.get("max_unauthenticated", int, default=DEFAULT_MAX_UNAUTHENTICATED,
                                         check=lambda n: n >= 1,
                                         hint="connections waiting to authenticate at once"),
            methods=_methods(peer),
        ))
        peer.done()
    if not peers:
        raise table.error("peer", f"no [[peer]]: nobody could use this service; add {who} as a [[peer]]")
    names = [p.name for p in peers]
    if len(set(names)) != len(names):
        raise table.error("peer", "two [[peer]] tables have the same name: each needs its own")
    identities = [p.identity.public_bytes_raw() for p in peers]
    if len(set(identities)) != len(identities):
        raise table.error("peer", "two [[peer]] tables have the same identity: give each its own key")
    return tuple(peers)


def _methods(peer: Table) -> frozenset[str] | None:
    listed = peer.get("methods", list, default=None, check=bool,
                      hint='the methods this peer may call, e.g. ["acme_challenge_put"]; leave it out for all')
    if listed is None:
        return None
    if not all(isinstance(m, str) and m for m in listed):
        raise peer.error("methods", f"{listed!r} is not a list of method names")
    return frozenset(listed)


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


@dataclass
class PeerState:
    connections: int = 0   # authenticated connections: what max_connections caps
    in_flight: int = 0
    bucket: TokenBucket | None = None
    # Connections waiting to authenticate, oldest first, each with its deadline.
    unauthenticated: dict[RpcConnection, asyncio.TimerHandle] = field(default_factory=dict)


@dataclass
class GateRefusal(RemoteError):
    """A refused request the gate audits and counts under `reason` rather than its code."""

    reason: str = ""


Method = Callable[[RpcConnection, Frame], Awaitable[tuple[dict, bytes]]]


class TunnelService:
    """The gate; a service passes its methods (after auth) and an audit log and metrics.

    `metrics` has `requests` (labels method, outcome), `refusals` (reason)
    and `connections` (a gauge: open connections from allowlisted addresses,
    authenticated or not). Methods named in `self_auditing` audit their own
    refusals once authenticated, with details only they know.
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
        for peer in peers:
            unknown = sorted((peer.methods or frozenset()) - set(methods))
            if unknown:
                raise ValueError(f"peer {peer.name}: the {service} service has no method {', '.join(unknown)}")

    def peers_for_address(self, address: str) -> list[Peer]:
        return [p for p in self.peers if address in p.addresses]

    def _state(self, peer: Peer) -> PeerState:
        return self.peer_states.setdefault(
            peer.name, PeerState(bucket=TokenBucket(peer.rate, peer.burst, time.monotonic())))

    # --- connections --------------------------------------------------------

    def new_connection(self) -> RpcConnection:
        return RpcConnection(self.handle, max_frame=self.max_frame, on_made=self._accept,
                             on_lost=self._connection_lost, on_frame_error=self._frame_error)

    def _accept(self, connection: RpcConnection) -> None:
        address = connection.transport.get_extra_info("peername")[0]
        candidates = self.peers_for_address(address)
        if not candidates:
            self._count_and_audit(Reason.PEER_NOT_ALLOWED, peer=address, method="connect",
                                  log_as=f"refused connection from {address}")
            connection.transport.abort()
            return
        # Until `auth` proves one of the candidates' keys, the connection is the first one's, waiting.
        connection.state.update(candidates=candidates, authenticated=False, challenge=None)
        self.metrics.connections.inc()
        self._wait_for_auth(connection)

    def _wait_for_auth(self, connection: RpcConnection) -> None:
        """Start the connection's auth deadline; make room among the peer's waiting connections."""
        peer: Peer = connection.state["candidates"][0]
        state = self._state(peer)
        connection.state.update(peer=peer, peer_state=state)
        connection.max_in_flight = peer.max_in_flight
        while len(state.unauthenticated) >= peer.max_unauthenticated:
            oldest = next(iter(state.unauthenticated))
            self._drop(oldest, Reason.EVICTED,
                       f"more than {peer.max_unauthenticated} connections waiting to authenticate: the oldest goes")
        deadline = asyncio.get_running_loop().call_later(peer.auth_timeout, self._auth_deadline, connection)
        state.unauthenticated[connection] = deadline

    def _auth_deadline(self, connection: RpcConnection) -> None:
        if connection in connection.state["peer_state"].unauthenticated:
            peer: Peer = connection.state["peer"]
            self._drop(connection, Reason.AUTH_TIMEOUT, f"not authenticated within {peer.auth_timeout:g} s")

    def _drop(self, connection: RpcConnection, reason: Reason, message: str) -> None:
        """Close a connection that has not authenticated: audited (within rate), counted, logged if audited."""
        state: PeerState = connection.state["peer_state"]
        deadline = state.unauthenticated.pop(connection, None)
        if deadline is not None:
            deadline.cancel()
        self._count_and_audit(reason, peer=connection.state["peer"].name, authenticated=False, method="connect",
                              message=message, log_as=f"closed {connection.peer_text()}")
        connection.transport.abort()

    def _count_and_audit(self, reason: str, *, log_as: str | None = None, **fields) -> None:
        self.metrics.refusals.labels(reason).inc()
        if self.audit.refusal(**fields, outcome=f"refused:{reason}") and log_as is not None:
            log.warning("%s: %s: %s", self.service, log_as, reason)

    def _frame_error(self, connection: RpcConnection, error) -> None:
        peer = connection.state.get("peer")
        unauthenticated = {} if connection.state.get("authenticated") else {"authenticated": False}
        self._count_and_audit(Reason.BAD_FRAME, peer=peer.name if peer else connection.peer_text(),
                              **unauthenticated, method="frame", message=str(error),
                              log_as=f"closed {connection.peer_text()}")

    def _connection_lost(self, connection: RpcConnection) -> None:
        state: PeerState | None = connection.state.get("peer_state")
        if state is None:
            return
        deadline = state.unauthenticated.pop(connection, None)
        if deadline is not None:
            deadline.cancel()
        if connection.state["authenticated"]:
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
        authenticated = connection.state["authenticated"]
        try:
            if known in gate:
                result = gate[known](connection, frame)
            elif not authenticated:
                raise RemoteError(Code.NOT_AUTHENTICATED, "prove the peer's identity first (hello, auth)")
            elif known is None:
                raise RemoteError(Code.UNKNOWN_METHOD, f"no method {method!r} in the {self.service} service")
            elif not peer.may_call(known):
                log.warning("%s: %s called %s, which its [[peer]] `methods` does not list: refused",
                            self.service, peer.name, known)
                raise RemoteError(Code.NOT_PERMITTED, f"{peer.name} may not call {known!r} (its [[peer]] methods)")
            else:
                result = await self.methods[known](connection, frame)
        except RemoteError as error:
            reason = error.reason if isinstance(error, GateRefusal) else error.code
            self.metrics.requests.labels(label, "refused").inc()
            if known in self.self_auditing and authenticated:
                self.metrics.refusals.labels(reason).inc()
            else:
                self._count_and_audit(reason, peer=peer.name, **({} if authenticated else {"authenticated": False}),
                                      method=method, message=error.message)
            raise
        self.metrics.requests.labels(label, "ok").inc()
        return result

    def _ping(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        return {}, b""

    def _hello(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        challenge = os.urandom(CHALLENGE_LEN)
        connection.state["challenge"] = challenge
        if connection.state["authenticated"]:  # a new challenge: unauthenticated again, its slot given back
            connection.state["authenticated"] = False
            connection.state["peer_state"].connections -= 1
            self._wait_for_auth(connection)
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
        peer = next((p for p in connection.state["candidates"] if _verifies(p.identity, signature, message)), None)
        if peer is None:
            raise RemoteError(Code.NOT_AUTHENTICATED, "the signature is not the peer's identity key's")
        state = self._state(peer)
        if state.connections >= peer.max_connections:
            raise GateRefusal(Code.BUSY, f"{peer.name} has {peer.max_connections} authenticated connections already",
                              close_connection=True, reason=Reason.TOO_MANY_CONNECTIONS)
        deadline = connection.state["peer_state"].unauthenticated.pop(connection, None)
        if deadline is not None:
            deadline.cancel()
        state.connections += 1
        connection.state.update(peer=peer, peer_state=state, authenticated=True)
        connection.max_in_flight = peer.max_in_flight
        self.audit.record(peer=peer.name, method="auth", outcome="ok")
        return {}, b""


def _verifies(identity: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        identity.verify(signature, message)
    except InvalidSignature:
        return False
    return True


async def serve(service: TunnelService, listen: tuple[tuple[str, int], ...]) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    return [await loop.create_server(service.new_connection, host, port) for host, port in listen]
