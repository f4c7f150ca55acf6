"""`yestls oracle serve`: the key oracle's front process.

It listens on the tunnel address only, accepts connections only from
allowlisted peers, makes each connection prove it holds the edge's identity
key, caps connections and requests in flight, rate-limits signatures, writes
the audit log and the metrics, and hands sign requests to the signing
processes (relay/oracle/signer.py), which alone hold the keys. It has no
decrypt operation and no way to sign anything but a policy-checked TLS 1.3
CertificateVerify.

Methods: ping, hello, auth (relay.tunnel's identity proof), certificates, sign.
"""

import asyncio
import base64
import logging
import socket
import subprocess
import sys
import time

from relay import daemon, tunnel
from relay.audit import AuditLog
from relay.oracle import config as oracle_config
from relay.oracle.keystore import Keystore, KeystoreError, PublicEntry
from relay.oracle.metrics import OracleMetrics
from relay.oracle.protocol import MAX_FRAME, SERVICE
from relay.rpc import Code, Frame, RemoteError, RpcConnection
from relay.tunnel import PeerState, TunnelService

log = logging.getLogger("yestls.oracle")

class SignerProcesses:
    """The signing processes, each behind a socketpair, given work by least load."""

    def __init__(self, keystore_dir, count: int):
        self.keystore_dir = keystore_dir
        self.count = count
        self.workers: list[tuple[subprocess.Popen, RpcConnection]] = []
        self.closing = False

    async def start(self) -> set[str]:
        key_ids = None
        for _ in range(self.count):
            key_ids = await self._spawn()
        return key_ids

    async def _spawn(self) -> set[str]:
        front, back = socket.socketpair()
        process = subprocess.Popen(
            [sys.executable, "-m", "relay.oracle.signer", "--keystore", str(self.keystore_dir),
             "--fd", str(back.fileno())],
            pass_fds=[back.fileno()], stderr=None,
        )
        back.close()
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: RpcConnection(max_frame=MAX_FRAME, on_lost=self._lost), sock=front)
        self.workers.append((process, connection))
        try:
            ready = await connection.call("ping", timeout=30)
        except (ConnectionError, asyncio.TimeoutError):
            code = process.wait(timeout=5)
            raise RuntimeError(f"signing process exited ({code}) before it was ready; see its message above") from None
        return set(ready.meta["keys"])

    def _lost(self, connection: RpcConnection) -> None:
        for entry in list(self.workers):
            if entry[1] is connection:
                self.workers.remove(entry)
                log.error("a signing process ended (exit %s); starting another", entry[0].poll())
                if not self.closing:
                    asyncio.get_running_loop().create_task(self._respawn())

    async def _respawn(self) -> None:
        await asyncio.sleep(0.5)  # a process that dies at once must not spin
        try:
            await self._spawn()
        except RuntimeError as error:
            log.error("%s", error)

    async def sign(self, key_id: str, scheme: int, messages: bytes) -> Frame:
        if not self.workers:
            raise RemoteError(Code.UNAVAILABLE, "no signing process is running")
        _, connection = min(self.workers, key=lambda w: w[1].pending_calls)
        try:
            return await connection.call("sign", {"key_id": key_id, "scheme": scheme}, messages)
        except ConnectionError:
            raise RemoteError(Code.UNAVAILABLE, "the signing process ended; retry") from None

    async def stop(self) -> None:
        """Close each socketpair (the process sees EOF and exits), then reap; kill what lingers."""
        self.closing = True
        workers = list(self.workers)
        for _, connection in workers:
            connection.close()
        # The close takes effect on the loop's next turns: let them run before waiting.
        await asyncio.wait([connection.closed for _, connection in workers], timeout=5)
        for process, _ in workers:
            try:
                await asyncio.to_thread(process.wait, 5)
            except subprocess.TimeoutExpired:
                process.kill()


class OracleService:
    """The oracle's methods behind the tunnel gate: certificates and sign."""

    def __init__(self, config: oracle_config.OracleConfig, entries: list[PublicEntry],
                 signers: SignerProcesses, audit: AuditLog, metrics: OracleMetrics):
        self.entries = {e.key_id: e for e in entries}
        self.signers = signers
        self.audit = audit
        self.metrics = metrics
        self.gate = TunnelService(
            SERVICE, config.peers, {"certificates": self._certificates, "sign": self._sign}, audit, metrics,
            max_frame=MAX_FRAME, self_auditing=frozenset({"sign"}))

    async def _certificates(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        listing = [
            {"key_id": e.key_id, "key_type": e.key_type, "schemes": list(e.chain.schemes),
             "chain": [base64.b64encode(der).decode() for der in e.chain.der_chain]}
            for e in self.entries.values()
        ]
        return {"certificates": listing}, b""

    async def _sign(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        peer = connection.state["peer"]
        state: PeerState = connection.state["peer_state"]
        started = time.monotonic()
        key_id = frame.meta.get("key_id")
        scheme = frame.meta.get("scheme")
        audit = {"peer": peer.name, "method": "sign", "key_id": key_id, "scheme": scheme}
        try:
            if not isinstance(key_id, str) or not isinstance(scheme, int) or isinstance(scheme, bool):
                raise RemoteError(Code.BAD_REQUEST, "sign needs a string key_id and an integer scheme")
            if key_id not in self.entries:
                raise RemoteError("unknown_key", "no key with that id; list certificates again")
            if state.in_flight >= peer.max_in_flight:
                raise RemoteError(Code.BUSY, f"more than {peer.max_in_flight} signatures in flight")
            if not state.bucket.take(started):
                raise RemoteError(Code.RATE_LIMITED, f"over {peer.rate:g} signatures per second")
            state.in_flight += 1
            self.metrics.in_flight.inc()
            try:
                reply = await self.signers.sign(key_id, scheme, frame.tail)
            finally:
                state.in_flight -= 1
                self.metrics.in_flight.dec()
        except RemoteError as error:
            self.audit.refusal(**audit, **error.extra, outcome=f"refused:{error.code}", message=error.message)
            raise
        self.metrics.sign_seconds.observe(time.monotonic() - started)
        self.audit.record(**audit, **reply.meta, outcome="signed")
        return {}, reply.tail


async def serve(config: oracle_config.OracleConfig) -> None:
    keystore = Keystore(config.keystore)
    keystore.check_permissions()
    entries = keystore.public_entries()
    if not entries:
        raise RuntimeError(f"keystore {config.keystore} has no key with a certificate yet: "
                           "run `yestls keys new`, get it signed, then `yestls keys import`")
    signers = SignerProcesses(config.keystore, config.signers)
    signer_keys = await signers.start()
    missing = {e.key_id for e in entries} - signer_keys
    if missing:
        await signers.stop()
        raise RuntimeError(f"the signing processes lack keys {sorted(missing)}")
    metrics = OracleMetrics()
    metrics_server = metrics.serve(*config.metrics_listen) if config.metrics_listen else None
    audit = AuditLog.open(config.audit)
    service = OracleService(config, entries, signers, audit, metrics)
    servers = await tunnel.serve(service.gate, config.listen)
    log.info("oracle listening on %s with %d key(s), %d signing process(es)",
             ", ".join(f"{h}:{p}" for h, p in config.listen), len(entries), config.signers)
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
                      (oracle_config.ConfigError, KeystoreError, RuntimeError))
