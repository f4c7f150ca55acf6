"""`yestls edge serve`: the public MX on the cloud VM.

It runs, in one event loop: the SMTP listeners (aiosmtpd with STARTTLS through
the keyless engine), the oracle pool that signs for it, the sealed spool and
the spool service home pulls from, and the metrics. The edge's config names no
private key: its certificate chains come from the oracle at start and are
refreshed.

When no oracle answers, `smtp.oracle_down` decides:
- tempfail (default): new connections get `421 4.3.0` at greeting; senders
  retry later and nothing travels in cleartext;
- resume-only: STARTTLS is still offered; resumed sessions (which need no
  signature) proceed, full handshakes fail, and transactions without TLS get
  `451 4.7.0`;
- plaintext (opt-in): STARTTLS is not offered; mail is accepted in cleartext.
"""

import asyncio
import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client import Counter as MetricCounter

from relay import daemon
from relay.aio.starttls import KeylessSMTP
from relay.aio.tls import SignatureDeclined, tls_listener
from relay.audit import AuditLog
from relay.edge import config as edge_config
from relay.edge.acme import AcmeChallenges
from relay.edge.addresses import PublishedAddresses
from relay.edge.connections import SMTP_BACKLOG, TOO_MANY, ConnectionCounts
from relay.edge.connections import client_ip as _ip
from relay.edge.door import Door
from relay.edge.handler import SEAL_THREADS, EdgeHandler, TransactionRules
from relay.edge.recipients import RecipientPolicy
from relay.edge.tls_budget import Refusal, TlsBudget, Waiting
from relay.edge.verdict import VerdictDesk
from relay.edge.web import HTTP_1_1, MTA_STS_PREFIX, WebSite, start_web
from relay.edge.worker_metrics import Sums
from relay.edge.workers import ListenSockets, WorkerFailed, Workers
from relay.identity import IdentityError, load_identity
from relay.oracle.client import OraclePool, OracleUnavailable
from relay.spool.desk import SpoolDesk
from relay.spool.keymaker import KeyMaker
from relay.spool.keys import parse_spool_public_key
from relay.spool.metrics import SpoolMetrics
from relay.spool.sealed import DEFAULT_CHUNK_SIZE
from relay.spool.store import Spool, WritingSpool
from relay.tls import ServerConfig, TicketKeyring

log = logging.getLogger("yestls.edge")


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._accepted = MetricCounter("yestls_edge_messages_accepted", "Messages sealed and spooled",
                                       registry=registry)
        self._accepted_bytes = MetricCounter("yestls_edge_accepted_bytes", "Message bytes sealed and spooled",
                                             registry=registry)
        self._refused = MetricCounter("yestls_edge_refused", "Refusals by reason", ["reason"], registry=registry)
        self.connections = Gauge("yestls_edge_smtp_connections", "Open SMTP connections", registry=registry)
        self.oracle_up = Gauge("yestls_edge_oracle_up", "1 when at least one key oracle answers", registry=registry)
        self.policy = Gauge("yestls_edge_oracle_down_policy", "The configured oracle-down policy (always 1)",
                            ["policy"], registry=registry)
        self.certificate_not_after = Gauge(
            "yestls_edge_certificate_not_after_seconds",
            "When the leaf of each chain the edge serves expires (Unix time), by the chain's first name",
            ["name"], registry=registry)

    def counters(self) -> list[MetricCounter]:
        """The counters a worker process counts too (relay/edge/worker_metrics.py adds them up)."""
        return [self._accepted, self._accepted_bytes, self._refused]

    def serving(self, chains) -> None:
        self.certificate_not_after.clear()
        for chain in chains:
            self.certificate_not_after.labels(min(chain.names, default="(no DNS name)")).set(chain.not_after().timestamp())

    def accepted(self, size: int) -> None:
        self._accepted.inc()
        self._accepted_bytes.inc(size)

    def refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()


class Admission:
    """Who may connect and start TLS now: connection caps, the TLS budget, and the tempfail policy's refusals."""

    def __init__(self, edge: "Edge"):
        self.edge = edge
        self.open = ConnectionCounts(edge.metrics.connections)

    def admit(self, peer, *, implicit_tls: bool) -> str | None:
        settings = self.edge.config.smtp
        ip = _ip(peer)
        over = self.open.over(ip, settings.max_connections, settings.max_connections_per_ip)
        if over is not None:
            self.edge.metrics.refused(over)
            whom = "" if over == TOO_MANY else " from your address"
            return f"421 4.7.0 Too many connections{whom}, please retry later"
        if settings.oracle_down == "tempfail" and not implicit_tls:
            if not self.edge.oracle_available():
                self.edge.metrics.refused("oracle_down")
                return f"421 4.3.0 {self.edge.config.hostname} Service temporarily unavailable, please retry later"
            waiting = self.edge.budget.retry_later(ip)
            if waiting is not None:
                self.edge.metrics.refused("tls_failed_retry_later")
                return f"421 4.7.0 {self.edge.config.hostname} {waiting.reply_text()}"
        if self.edge.door is not None and not self.edge.door.connection_allowed(ip):
            self.edge.metrics.refused("rate")
            return "421 4.7.0 Too many connections from your address in the last minute, please retry later"
        self.open.add(ip)
        return None

    def release(self, peer) -> None:
        self.open.remove(_ip(peer))

    def starttls(self, peer) -> str | None:
        refusal = self.edge.budget.starttls(_ip(peer))
        if refusal is None:
            return None
        self.edge.budget_refused(peer, refusal)
        return f"454 4.7.0 {Waiting.OVER_BUDGET.reply_text()}"

    def tls_established(self, peer) -> None:
        self.edge.budget.starttls_completed(_ip(peer))


class BudgetedSigner:
    """The oracle pool, for one client: a full handshake spends that client's TLS budget before home is asked."""

    def __init__(self, edge: "Edge", peer):
        self.edge = edge
        self.peer = peer

    async def sign(self, request):
        ip = _ip(self.peer)
        refusal = self.edge.budget.handshake(ip)
        if refusal is not None:
            self.edge.budget_refused(self.peer, refusal)
            raise SignatureDeclined(refusal.value)
        try:
            return await self.edge.pool.sign(request)
        except Exception:
            self.edge.budget.tls_failed(ip)  # the sender must not retry in cleartext: it waits, then TLS again
            raise


class Edge:
    def __init__(self, config: edge_config.EdgeConfig, pool: OraclePool, spool: WritingSpool, metrics: EdgeMetrics,
                 tickets: TicketKeyring, verdict=None):
        """`verdict`: a worker's ForwardedVerdicts (relay/edge/verdict_link.py); by default, with [verdict],
        the desk home's judge polls."""
        self.config = config
        # The door's checks (relay/edge/door.py): none unless [door] configures some.
        self.door = Door(config.door, metrics.registry) if config.door.enabled else None
        self.pool = pool
        self.spool = spool
        self.metrics = metrics
        # In memory only; survives certificate refreshes. Short-lived: see TlsSettings. Workers share the keys.
        self.tickets = tickets
        self.tls_config: ServerConfig | None = None
        # The HTTPS listener's: the same chains and tickets, and ALPN http/1.1 (never on SMTP's).
        self.web_tls_config: ServerConfig | None = None
        self._uncovered: set[str] = set()   # mta-sts names no chain covers, as last logged
        # ACME HTTP-01 tokens home places over the tunnel (spool service), answered on port 80.
        self.challenges = AcmeChallenges() if config.web is not None and config.web.http_listen else None
        self.addresses = (PublishedAddresses(config.state_dir / "addresses.json") if config.addresses_from_home
                          else None)
        # Messages waiting in SMTP sessions for home's before-queue verdict (relay/edge/verdict.py), with [verdict].
        if verdict is None and config.verdict is not None:
            verdict = VerdictDesk(config.verdict, metrics.registry)
        self.verdict = verdict
        self.budget = TlsBudget(config.tls.limits)
        self._budget_logged: dict[str, float] = {}   # address -> when its last budget refusal was logged
        self.admission = Admission(self)
        self.handler = EdgeHandler(
            TransactionRules(config.hostname, sorted(config.domains)[0], config.smtp.max_recipients,
                             self.tls_required, self.recipient_policy, self.door, self.verdict),
            spool, metrics)
        metrics.policy.labels(config.smtp.oracle_down).set(1)

    def budget_refused(self, peer, refusal: Refusal) -> None:
        """Counted always; logged once per address per `retry_after` (a flood must not flood the log)."""
        self.metrics.refused(refusal.value)
        ip = _ip(peer)
        now = time.monotonic()
        if now - self._budget_logged.get(ip, -1e9) >= self.config.tls.limits.retry_after:
            if len(self._budget_logged) >= self.config.tls.limits.max_tracked:
                self._budget_logged.clear()
            self._budget_logged[ip] = now
            log.warning("%s: over its TLS budget (%s); it is told to retry later; more refusals in the next "
                        "%.0f s are counted, not logged", ip, refusal.value, self.config.tls.limits.retry_after)

    def oracle_available(self) -> bool:
        return self.pool.health().available

    def tls_required(self, smtp) -> str | None:
        """Why a cleartext transaction from `smtp`'s client is refused now, or None (it may go on)."""
        policy = self.config.smtp.oracle_down
        if policy == "plaintext":
            return None  # the operator chose cleartext over waiting
        if policy == "resume-only" and not self.oracle_available():
            return "451 4.7.0 TLS is required while our key service is away; please retry later"
        waiting = self.budget.retry_later(_ip(smtp.peer))
        if waiting is not None:
            return f"451 4.7.0 {waiting.reply_text()}"
        return None

    def recipient_policy(self) -> RecipientPolicy:
        book = self.addresses.current() if self.addresses is not None else None
        return RecipientPolicy(self.config.domains, self.config.mailboxes, book)

    def tls_setup(self, peer):
        """The TLS configuration and a signer for the client at `peer`; None when TLS cannot be offered now."""
        if self.tls_config is None:
            return None
        if self.config.smtp.oracle_down == "plaintext" and not self.oracle_available():
            return None
        return self.tls_config, BudgetedSigner(self, peer)

    async def refresh_certificates(self) -> None:
        chains = [chain for _, chain in await self.pool.certificates()]
        if not chains:
            raise OracleUnavailable("the oracle lists no certificate")
        self.tls_config = ServerConfig(chains, tickets=self.tickets, tls12=self.config.tls.tls12)
        self.web_tls_config = dataclasses.replace(self.tls_config, alpn_protocols=(HTTP_1_1,))
        self.metrics.serving(chains)
        names = sorted({name for chain in chains for name in chain.names})
        log.info("certificates from the oracle: %d chain(s) for %s", len(chains), ", ".join(names))
        if self.config.web is not None and self.config.web.https_listen:
            wanted = {MTA_STS_PREFIX + domain for domain in self.config.domains}
            uncovered = {name for name in wanted if not any(chain.matches(name) for chain in chains)}
            if uncovered and uncovered != self._uncovered:
                log.warning("no certificate covers %s: HTTPS (MTA-STS) handshakes for it are refused until the "
                            "oracle lists one that does", ", ".join(sorted(uncovered)))
            self._uncovered = uncovered

    def background(self) -> list[asyncio.Task]:
        """What runs beside the sessions in every process that serves SMTP: the certificates kept fresh and
        the oracle's health watched. Cancel the tasks to stop."""
        loop = asyncio.get_running_loop()
        return [loop.create_task(self.keep_certificates_fresh()), loop.create_task(self.watch_oracle())]

    async def keep_certificates_fresh(self) -> None:
        while True:
            await asyncio.sleep(self.config.oracle.refresh_certificates if self.tls_config else 1)
            try:
                await self.refresh_certificates()
            except Exception as error:  # noqa: BLE001 - keep the chains we have
                log.warning("certificate refresh failed (%s); keeping the current chains", error)

    async def watch_oracle(self) -> None:
        """Log each change of the oracle's health, with the policy now in force."""
        last = None
        while True:
            health = self.pool.health()
            self.metrics.oracle_up.set(1 if health.available else 0)
            if health.state != last:
                details = "; ".join(f"{h.address} {h.state}" + (f" ({h.last_error})" if h.last_error else "")
                                    for h in health.links)
                policy = "normal" if health.available else f"oracle-down policy {self.config.smtp.oracle_down}"
                level = logging.INFO if health.state == "up" else logging.WARNING
                log.log(level, "key oracle %s: %s; %s in force", health.state, details, policy)
                last = health.state
            await asyncio.sleep(1)

    def smtp_factory(self, implicit_tls: bool = False):
        """One SMTP session; on the implicit-TLS listener its admission was done before the handshake."""
        settings = self.config.smtp
        return KeylessSMTP(
            self.handler, tls_setup=self.tls_setup, admission=None if implicit_tls else self.admission,
            data_timeout=settings.data_timeout, handshake_timeout=settings.handshake_timeout,
            max_errors=settings.max_errors, implicit_tls=implicit_tls, on_refusal=self.metrics.refused, door=self.door,
            hostname=self.config.hostname, ident="ESMTP YesTLS", data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=True, decode_data=False, timeout=settings.command_timeout,
        )


async def serve(config: edge_config.EdgeConfig, config_path: Path) -> None:
    identity = load_identity(config.oracle.identity_key)
    public_key = parse_spool_public_key(config.spool.public_key)
    if config.smtp.workers > 1:
        # Workers seal (relay/edge/worker.py); this process owns the spool and makes no message key.
        with Spool(config.spool.directory, public_key, config.spool.max_bytes, config.spool.max_files) as spool:
            await _serve(config, identity, spool, config_path)
        return
    # Each message's HPKE key is made ahead in a child process, on another core (relay/spool/keymaker.py).
    keys = KeyMaker(public_key, DEFAULT_CHUNK_SIZE)
    try:
        spool = Spool(config.spool.directory, public_key, config.spool.max_bytes, config.spool.max_files,
                      message_keys=keys)
        await _serve(config, identity, spool, None)
    finally:
        keys.close()


async def start_edge(config: edge_config.EdgeConfig, identity, spool: WritingSpool, metrics: EdgeMetrics,
                     tickets: TicketKeyring, verdict=None) -> Edge:
    """The oracle pool started, the Edge made, its first certificates fetched if an oracle answers soon."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(SEAL_THREADS))
    pool = OraclePool(list(config.oracle.servers), identity, request_timeout=config.oracle.request_timeout)
    await pool.start()
    edge = Edge(config, pool, spool, metrics, tickets, verdict)
    # Listen soon even without an oracle: senders then get the policy's answer
    # (421 under tempfail) instead of a refused connection.
    if await pool.wait_ready(2):
        try:
            await edge.refresh_certificates()
        except Exception as error:  # noqa: BLE001 - start anyway; the refresher retries
            log.warning("no certificates yet (%s); STARTTLS is off until the oracle lists them", error)
    else:
        log.warning("no key oracle answered at start; policy %s applies until one does", config.smtp.oracle_down)
    return edge


async def smtp_servers(edge: Edge, sockets: "ListenSockets | None" = None) -> list:
    """The SMTP listeners: on the configured addresses, or on a worker's share of the listening group."""
    loop = asyncio.get_running_loop()
    config = edge.config
    implicit = tls_listener(edge.tls_setup, lambda: edge.smtp_factory(implicit_tls=True),
                            admit=lambda peer: edge.admission.admit(peer, implicit_tls=True) is None,
                            release=edge.admission.release, handshake_timeout=config.smtp.handshake_timeout)
    if sockets is not None:
        return ([await loop.create_server(edge.smtp_factory, sock=sock) for sock in sockets.smtp]
                + [await loop.create_server(implicit, sock=sock) for sock in sockets.implicit_tls])
    return ([await loop.create_server(edge.smtp_factory, host, port, backlog=SMTP_BACKLOG)
             for host, port in config.smtp.listen]
            + [await loop.create_server(implicit, host, port, backlog=SMTP_BACKLOG)
               for host, port in config.smtp.implicit_tls_listen])


async def _serve(config: edge_config.EdgeConfig, identity, spool: Spool, config_path: Path | None) -> None:
    """Serve until stopped: SMTP in this process, or, given `config_path` (which workers load), in workers."""
    registry = CollectorRegistry()
    metrics = EdgeMetrics(registry)
    SpoolMetrics(spool, registry)
    tickets = TicketKeyring.shared(os.urandom, os.urandom(32), time.time(), lifetime=config.tls.ticket_lifetime,
                                   rotate_every=config.tls.ticket_rotation)
    edge = await start_edge(config, identity, spool, metrics, tickets)
    workers = None
    if config_path is None:
        servers = await smtp_servers(edge)
    else:
        desk = SpoolDesk(spool, ThreadPoolExecutor(SEAL_THREADS, "spool-commit"))
        counters = metrics.counters() + (edge.door.metrics.counters() if edge.door is not None else [])
        if edge.verdict is not None:
            counters.append(edge.verdict.metrics.outcomes)
        workers = Workers(config, config_path, desk, tickets, Sums(counters, metrics.connections), edge.verdict)
        try:
            await workers.start()
        except BaseException:
            await workers.stop()   # those that did start
            await edge.pool.close()
            raise
        servers = []
    if config.web is not None:
        site = WebSite(edge.challenges, config.domains, config.mta_sts.policy())
        servers += await start_web(config.web, site, lambda: edge.web_tls_config,
                                   lambda peer: BudgetedSigner(edge, peer), registry)
    service_servers, audit = await _start_spool_service(config, spool, edge, registry)
    metrics_server = None
    if config.metrics_listen:
        metrics_server, _ = start_http_server(config.metrics_listen[1], addr=config.metrics_listen[0],
                                              registry=registry)
    tasks = edge.background()
    log.info("edge %s listening on %s%s", config.hostname,
             ", ".join(f"{h}:{p}" for h, p in config.smtp.listen + config.smtp.implicit_tls_listen),
             f" ({config.smtp.workers} worker processes)" if workers is not None else "")
    stop = daemon.stop_event()
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        for server in servers + service_servers:
            server.close()
        if workers is not None:
            await workers.stop()
        await edge.pool.close()
        spool.close()
        if audit is not None:
            audit.close()  # writes the refusal summaries still pending
        if metrics_server is not None:
            metrics_server.shutdown()


async def _start_spool_service(config, spool, edge, registry) -> tuple[list, AuditLog | None]:
    """The spool service for home (its servers, and its audit log to close at the end), if configured."""
    if config.spool_service is None:
        return [], None
    from relay.spool.service import SpoolService

    audit = AuditLog.open(config.spool_service.audit)
    extra = {"addresses": edge.addresses.publish} if edge.addresses is not None else {}
    if edge.challenges is not None:
        extra.update(edge.challenges.methods())
    if edge.verdict is not None:
        extra.update(edge.verdict.methods())
    service = SpoolService(spool, config.spool_service.peers, audit, registry, extra_methods=extra)
    return await service.serve(config.spool_service.listen), audit


def run(args) -> int:
    quiet_aiosmtpd()
    return daemon.run("edge", lambda: edge_config.load(args.config), lambda config: serve(config, args.config),
                      (edge_config.ConfigError, IdentityError, ValueError, WorkerFailed))


def quiet_aiosmtpd() -> None:
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every line at INFO
