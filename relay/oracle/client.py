"""The edge's side of the key oracle: the TLS engine's signer, asking home.

`OracleLink` is one oracle: one multiplexed connection, re-made with backoff
whenever it drops, that proves the edge's identity key on every connection
and measures latency with pings. `OraclePool` is the signer: it sends each
request to the healthiest, fastest link and, when that link fails or times
out, to the next one, within the request's deadline. A refusal by policy is
final: another oracle would refuse the same transcript.

`OraclePool.health()` is what the SMTP layer reads to decide what to do when
no oracle answers.
"""

import asyncio
import logging
import random
from dataclasses import dataclass
from enum import Enum

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay import rpc, tunnel
from relay.oracle.protocol import MAX_FRAME, SERVICE, parse_certificate_listing
from relay.tls import CertificateChain, SignatureRequest, Tls12SignatureRequest

log = logging.getLogger("yestls.oracle.client")

# Errors that say "this oracle, now": another oracle (or a later try) may succeed.
RETRYABLE = frozenset({rpc.Code.BUSY, rpc.Code.RATE_LIMITED, rpc.Code.UNAVAILABLE, rpc.Code.INTERNAL})


class OracleUnavailable(Exception):
    """No oracle could answer in time."""


class OracleRefused(Exception):
    """An oracle refused the request by policy; retrying elsewhere would not help."""

    def __init__(self, error: rpc.RemoteError):
        super().__init__(str(error))
        self.code = error.code


class LinkState(Enum):
    CONNECTING = "connecting"
    READY = "ready"
    DOWN = "down"


@dataclass(frozen=True)
class LinkHealth:
    address: str
    state: str
    rtt_ms: float | None
    last_error: str | None


@dataclass(frozen=True)
class PoolHealth:
    state: str   # "up": every oracle ready; "degraded": some; "down": none
    links: tuple[LinkHealth, ...]

    @property
    def available(self) -> bool:
        return self.state != "down"


class OracleLink:
    def __init__(self, host: str, port: int, identity: Ed25519PrivateKey, *, connect_timeout: float = 3.0,
                 ping_interval: float = 5.0, backoff: tuple[float, float] = (0.2, 10.0)):
        self.host, self.port = host, port
        self.identity = identity
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.backoff = backoff
        self.state = LinkState.DOWN
        self.rtt: float | None = None  # smoothed seconds per call
        self.suspect_until = 0.0  # after a timed-out call, other oracles go first until then
        self.last_error: str | None = None
        self.connection: rpc.RpcConnection | None = None
        self.ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.connection is not None:
            self.connection.close()

    async def _run(self) -> None:
        delay = self.backoff[0]
        while True:
            self.state = LinkState.CONNECTING
            try:
                connection = await asyncio.wait_for(
                    rpc.connect(self.host, self.port, max_frame=MAX_FRAME), self.connect_timeout)
            except (OSError, asyncio.TimeoutError) as error:
                self._down(f"connect: {_describe(error)}")
            else:
                try:
                    await tunnel.authenticate(connection, SERVICE, self.identity, self.connect_timeout)
                    self.connection = connection
                    self.state = LinkState.READY
                    self.last_error = None
                    self.ready.set()
                    log.info("oracle %s ready", self.address)
                    delay = self.backoff[0]
                    await self._keep_alive(connection)
                except (OSError, ConnectionError, asyncio.TimeoutError, rpc.RemoteError) as error:
                    self._down(str(error) or type(error).__name__)
                finally:
                    connection.close()
                    self.connection = None
            # Exponential backoff with jitter: many edges must not reconnect in step.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.backoff[1])

    def _down(self, reason: str) -> None:
        if self.state is LinkState.READY:
            log.warning("oracle %s lost: %s", self.address, reason)
        self.state = LinkState.DOWN
        self.last_error = reason
        self.ready.clear()

    async def _keep_alive(self, connection: rpc.RpcConnection) -> None:
        loop = asyncio.get_running_loop()
        while not connection.closed.done():
            started = loop.time()
            await connection.call("ping", timeout=max(self.connect_timeout, 1.0))
            self._observe(loop.time() - started)
            await asyncio.wait([connection.closed], timeout=self.ping_interval)
        raise ConnectionError("connection closed")

    def suspect(self) -> None:
        """A call timed out: the oracle may be stalled (home offline, tunnel dropping packets)."""
        self.suspect_until = asyncio.get_running_loop().time() + self.ping_interval

    def _observe(self, seconds: float) -> None:
        self.rtt = seconds if self.rtt is None else 0.8 * self.rtt + 0.2 * seconds

    async def call(self, method: str, params: dict, tail: bytes, timeout: float) -> rpc.Frame:
        connection = self.connection
        if self.state is not LinkState.READY or connection is None:
            raise ConnectionError(f"oracle {self.address} is {self.state.value}")
        loop = asyncio.get_running_loop()
        started = loop.time()
        frame = await connection.call(method, params, tail, timeout=timeout)
        self._observe(loop.time() - started)
        return frame

    def health(self) -> LinkHealth:
        return LinkHealth(self.address, self.state.value, None if self.rtt is None else self.rtt * 1000,
                          self.last_error)


class OraclePool:
    """The TLS engine's signer on the edge: signs through whichever oracle is up and fastest."""

    def __init__(self, endpoints: list[tuple[str, int]], identity: Ed25519PrivateKey, *,
                 request_timeout: float = 2.0, attempt_floor: float = 0.25, **link_options):
        if not endpoints:
            raise ValueError("an oracle pool needs at least one oracle address")
        self.links = [OracleLink(host, port, identity, **link_options) for host, port in endpoints]
        self.request_timeout = request_timeout
        self.attempt_floor = attempt_floor  # the least time one oracle gets before the next is tried
        self._key_ids: dict[bytes, str] = {}  # leaf certificate DER -> key id

    async def start(self) -> None:
        for link in self.links:
            link.start()

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links))

    async def wait_ready(self, timeout: float) -> bool:
        """True once any oracle is ready, False after `timeout` seconds without one."""
        waits = [asyncio.ensure_future(link.ready.wait()) for link in self.links]
        done, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for wait in pending:
            wait.cancel()
        return bool(done)

    def health(self) -> PoolHealth:
        links = tuple(link.health() for link in self.links)
        ready = sum(link.state == LinkState.READY.value for link in links)
        state = "up" if ready == len(links) else "degraded" if ready else "down"
        return PoolHealth(state, links)

    def _ready_links(self, tried: set) -> list[OracleLink]:
        now = asyncio.get_running_loop().time()
        ready = [link for link in self.links if link.state is LinkState.READY and link not in tried]
        return sorted(ready, key=lambda link: (link.suspect_until > now,
                                               link.rtt if link.rtt is not None else float("inf")))

    async def certificates(self) -> list[tuple[str, CertificateChain]]:
        """(key id, chain) for every key the oracles hold: the edge's public material."""
        frame = await self._call("certificates", {}, b"")
        try:
            entries = parse_certificate_listing(frame.meta.get("certificates"))
        except ValueError as error:
            raise OracleUnavailable(f"the oracle's certificate listing does not add up: {error}") from None
        for entry in entries:
            self._key_ids[entry.chain.der_chain[0]] = entry.key_id
        return [(entry.key_id, entry.chain) for entry in entries]

    async def sign(self, request: SignatureRequest | Tls12SignatureRequest) -> bytes:
        """The signature; the engine checks it against the certificate before sending it."""
        key_id = self._key_ids.get(request.certificate.der_chain[0])
        if key_id is None:
            raise OracleRefused(rpc.RemoteError("unknown_key", "certificate not listed by any oracle"))
        params = {"key_id": key_id, "scheme": int(request.scheme)}
        if isinstance(request, Tls12SignatureRequest):
            # The oracle derives server_random from the nonce and builds the signed bytes itself (policy12.py).
            params.update(cipher_suite=int(request.cipher_suite), nonce=request.nonce.hex())
            frame = await self._call("sign_tls12", params, request.client_hello + request.params)
        else:
            frame = await self._call("sign", params, b"".join(request.handshake_messages))
        return frame.tail

    async def _call(self, method: str, params: dict, tail: bytes) -> rpc.Frame:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        tried: set[OracleLink] = set()
        failures = []
        while (remaining := deadline - loop.time()) > 0:
            candidates = self._ready_links(tried)
            if not candidates:
                break
            link = candidates[0]
            tried.add(link)
            # With another oracle to fall back on, a silent one must not eat the
            # whole deadline: give it a few round trips, then move on.
            attempt = remaining
            if len(candidates) > 1:
                attempt = min(remaining, max(self.attempt_floor, 8 * (link.rtt or 0.0)))
            try:
                return await link.call(method, params, tail, timeout=attempt)
            except rpc.RemoteError as error:
                if error.code not in RETRYABLE:
                    raise OracleRefused(error) from None
                failures.append(f"{link.address}: {error}")
            except (ConnectionError, asyncio.TimeoutError) as error:
                failures.append(f"{link.address}: {_describe(error)}")
                if isinstance(error, asyncio.TimeoutError):
                    link.suspect()
        raise OracleUnavailable("; ".join(failures) or "no oracle is connected")


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
