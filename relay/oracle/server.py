"""`yestls oracle serve`: the key oracle's front process.

It listens on the tunnel address only, accepts connections only from
allowlisted peers, makes each connection prove it holds the edge's identity
key, caps connections and requests in flight, rate-limits signatures, writes
the audit log and the metrics, and hands sign requests to the signing
processes (relay/oracle/signer.py, reached through relay/oracle/signers.py),
which alone hold the keys and tell it the chains: the front never opens the
keystore. It has no decrypt operation and no way to sign anything but a
policy-checked TLS 1.3 CertificateVerify or TLS 1.2 ServerKeyExchange.

Methods: ping, hello, auth (relay.tunnel's identity proof), certificates, sign
(TLS 1.3's CertificateVerify), sign_tls12 (TLS 1.2's ServerKeyExchange: the
front also refuses a nonce it has seen, relay/oracle/policy12.py).

`certificates` answers from a listing at most LISTING_MAX_AGE seconds old:
past that, the front asks its signing processes again (they re-read the
keystore), one listing at a time however many peers ask, so a chain imported
at home reaches the edge at its next refresh without restarting anything,
and a peer asking in a loop costs the signing processes one keystore read per
LISTING_MAX_AGE. Sign requests are checked against the latest listing.
"""

import asyncio
import functools
import logging
import time

from relay import daemon, tunnel
from relay.audit import AuditLog
from relay.oracle import config as oracle_config
from relay.oracle.keystore import PublicEntry
from relay.oracle.metrics import OracleMetrics
from relay.oracle.policy import Refusal
from relay.oracle.policy12 import NonceLedger
from relay.oracle.protocol import DROPPED_KEY_GRACE, MAX_FRAME, SERVICE, certificate_listing
from relay.oracle.signers import SignerPool, SignerSocket, SpawnedSigners
from relay.rpc import Code, Frame, RemoteError, RpcConnection
from relay.tunnel import PeerState, TunnelService

log = logging.getLogger("yestls.oracle")

LISTING_MAX_AGE = 5.0   # seconds a listing of the chains is answered from before the signers are asked again


class OracleService:
    """The oracle's methods behind the tunnel gate: certificates and sign."""

    def __init__(self, config: oracle_config.OracleConfig, entries: list[PublicEntry],
                 signers: SignerPool, audit: AuditLog, metrics: OracleMetrics):
        self.entries = {e.key_id: e for e in entries}
        self.listed_at = time.monotonic()
        self.dropped: dict[str, float] = {}   # key id -> signed with until (monotonic)
        self._listing: asyncio.Task | None = None
        self.signers = signers
        self.audit = audit
        self.metrics = metrics
        self.nonces = NonceLedger()
        methods = {"certificates": self._certificates, "sign": functools.partial(self._sign, "sign"),
                   "sign_tls12": functools.partial(self._sign, "sign_tls12")}
        self.gate = TunnelService(
            SERVICE, config.peers, methods, audit, metrics,
            max_frame=MAX_FRAME, self_auditing=frozenset({"sign", "sign_tls12"}))

    async def _certificates(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        if time.monotonic() - self.listed_at >= LISTING_MAX_AGE:
            if self._listing is None:
                self._listing = asyncio.get_running_loop().create_task(self._list())
            await asyncio.shield(self._listing)
        return {"certificates": certificate_listing(self.entries.values())}, b""

    async def _list(self) -> None:
        """Ask the signing processes for the chains; keep the last listing if none answers."""
        try:
            entries = await self.signers.certificates()
        except RemoteError as error:
            log.warning("could not list the chains again (%s); answering with the last listing", error.message)
            return
        finally:
            self._listing = None
        listed = {e.key_id: e for e in entries}
        if _chains(listed) != _chains(self.entries):
            log.info("the keystore's served chains changed: now %d key(s) %s", len(listed),
                     ", ".join(f"{i} (not after {e.not_after:%Y-%m-%d})" for i, e in sorted(listed.items())) or "none")
        now = time.monotonic()
        self.dropped = {k: t for k, t in self.dropped.items() if k not in listed and t > now}
        self.dropped.update({k: now + DROPPED_KEY_GRACE for k in self.entries if k not in listed})
        self.entries = listed
        self.listed_at = now

    async def _sign(self, method: str, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        peer = connection.state["peer"]
        state: PeerState = connection.state["peer_state"]
        started = time.monotonic()
        key_id = frame.meta.get("key_id")
        scheme = frame.meta.get("scheme")
        params = {"key_id": key_id, "scheme": scheme}
        audit = {"peer": peer.name, "method": method, "key_id": key_id, "scheme": scheme}
        try:
            if not isinstance(key_id, str) or not isinstance(scheme, int) or isinstance(scheme, bool):
                raise RemoteError(Code.BAD_REQUEST, f"{method} needs a string key_id and an integer scheme")
            if key_id not in self.entries and self.dropped.get(key_id, 0.0) <= started:
                raise RemoteError("unknown_key", "no key with that id; list certificates again")
            if state.in_flight >= peer.max_in_flight:
                raise RemoteError(Code.BUSY, f"more than {peer.max_in_flight} signatures in flight")
            if not state.bucket.take(started):
                raise RemoteError(Code.RATE_LIMITED, f"over {peer.rate:g} signatures per second")
            if method == "sign_tls12":
                params.update(cipher_suite=frame.meta.get("cipher_suite"), nonce=frame.meta.get("nonce"))
                self._admit_nonce(params["nonce"])
            state.in_flight += 1
            self.metrics.in_flight.inc()
            try:
                reply = await self.signers.sign(method, params, frame.tail)
            finally:
                state.in_flight -= 1
                self.metrics.in_flight.dec()
        except RemoteError as error:
            self.audit.refusal(**audit, **error.extra, outcome=f"refused:{error.code}", message=error.message)
            raise
        self.metrics.sign_seconds.observe(time.monotonic() - started)
        self.audit.record(**audit, **reply.meta, outcome="signed")
        if method == "sign_tls12":   # the edge may check the random it will send is the one signed
            return {"server_random": reply.meta.get("server_random")}, reply.tail
        return {}, reply.tail


    def _admit_nonce(self, nonce) -> None:
        """The front's share of sign_tls12's policy: one signature per nonce (the signers check the rest)."""
        try:
            self.nonces.admit(nonce if isinstance(nonce, str) else repr(nonce))
        except Refusal as refusal:
            raise RemoteError(refusal.code, refusal.message) from None


def _chains(entries: dict[str, PublicEntry]) -> dict[str, tuple]:
    return {key_id: tuple(entry.chain.der_chain) for key_id, entry in entries.items()}


async def serve(config: oracle_config.OracleConfig) -> None:
    if config.signer_socket is not None:
        signers = SignerPool(SignerSocket(config.signer_socket), config.signers)
        separation = f"through {config.signer_socket}"
    else:
        log.warning("no signer_socket in the configuration: the signing processes run as this same user, "
                    "with no privilege separation (for tests and development only)")
        signers = SignerPool(SpawnedSigners(config.keystore), config.signers)
        separation = "spawned as this user"
    entries = await signers.start()
    if not entries:
        await signers.stop()
        raise RuntimeError(f"keystore {config.keystore} has no key with a certificate yet: "
                           "run `yestls keys new`, get it signed, then `yestls keys import`")
    metrics = OracleMetrics()
    metrics_server = metrics.serve(*config.metrics_listen) if config.metrics_listen else None
    audit = AuditLog.open(config.audit)
    service = OracleService(config, entries, signers, audit, metrics)
    servers = await tunnel.serve(service.gate, config.listen)
    log.info("oracle listening on %s with %d key(s), %d signing process(es) %s",
             ", ".join(f"{h}:{p}" for h, p in config.listen), len(entries), config.signers, separation)
    stop = daemon.stop_event()
    try:
        await stop.wait()
    finally:
        for server in servers:
            server.close()
        await signers.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
        audit.close()


def run(args) -> int:
    return daemon.run("oracle", lambda: oracle_config.load(args.config), serve,
                      (oracle_config.ConfigError, RuntimeError))
