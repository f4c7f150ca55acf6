"""The edge's web side: ACME HTTP-01 tokens on port 80, the MTA-STS policy over HTTPS on 443. Nothing else.

Both answer one GET (or HEAD) per connection, read by relay/http.py, and
close. There is no file server and no redirect:

- port 80 (`[web] http_listen`): `/.well-known/acme-challenge/<token>` is
  answered with the key authorization home placed for that token
  (relay/edge/acme.py), text/plain, whatever the Host (the CA's token is
  the secret-free proof; home places it for the name it validates).
  Everything else is 404. No redirect to HTTPS: the only HTTPS resource is a
  policy machines fetch from its https:// URL (RFC 8461 3.3: they must not
  follow redirects anyway), and a redirect would only invite browsers.
- port 443 (`[web] https_listen`): TLS through the same keyless engine,
  oracle and certificate refreshes as SMTP, negotiating ALPN "http/1.1"
  (the SMTP listeners never negotiate ALPN). `https://mta-sts.<domain>/.well-known/mta-sts.txt`
  for each of the edge's domains is the policy of `[mta_sts]`
  (relay/mtasts.py: the same text whose digest home publishes as the
  `_mta-sts` record's id), text/plain. Any other path, or a Host that is
  not mta-sts.<one of our domains>, is 404.

Home's signatures are not the web's to spend. A full handshake on 443
costs a signature like one on 25, so:
- connections are admitted before the handshake (`max_connections`,
  `max_connections_per_ip`, for both ports together, apart from SMTP's so
  a web flood cannot take the MX's connection slots);
- the handshake is signed only for an SNI that is mta-sts.<one of our
  domains>, and only then spends the client's TLS budget (the SMTP
  listeners' budget: relay/edge/tls_budget.py) before home is asked; a
  client naming anything else, or nothing, ends with an alert and costs
  home nothing. The oracle enforces the same rule (relay/oracle/policy.py:
  ALPN only with an mta-sts. SNI), so a compromised edge gets no more.
- `request_timeout` bounds the TLS handshake, then again the request: a
  slow client (slowloris) holds a slot at most that long (twice on 443).

Bad input gets its status (400, 405, 408, 414, 431, 505) and one log line;
log lines are limited per client address (LOG_PER_MINUTE), the metrics
count every request.
"""

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as MetricCounter

from relay.aio.tls import SignatureDeclined, Signer, tls_listener
from relay.edge.acme import AcmeChallenges
from relay.edge.connections import ConnectionCounts
from relay.edge.connections import client_ip as _ip
from relay.edge.tls_budget import KeyedBuckets
from relay.http import Request, RequestError, RequestReader, RequestTimeout, response
from relay.mtasts import POLICY_PATH
from relay.spool.protocol import is_acme_token as is_token
from relay.tls import ServerConfig, SignatureRequest

log = logging.getLogger("yestls.web")

ACME_PREFIX = "/.well-known/acme-challenge/"
MTA_STS_PREFIX = "mta-sts."
HTTP_1_1 = b"http/1.1"   # the one application protocol the HTTPS listener negotiates
LOG_PER_MINUTE = 20     # log lines per client address (then counted only)
LOG_BURST = 10
MAX_LOGGED_ADDRESSES = 65536


class WebMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = MetricCounter("yestls_edge_web_requests", "Web requests answered, by port kind and status",
                                      ["scheme", "status"], registry=registry)
        self.refused = MetricCounter("yestls_edge_web_refused", "Web connections and handshakes refused, by reason",
                                     ["reason"], registry=registry)
        self.connections = Gauge("yestls_edge_web_connections", "Open web connections (ports 80 and 443)",
                                 registry=registry)


class WebLog:
    """One log line per event, at most LOG_PER_MINUTE per client address: a flood must not flood the log."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._buckets = KeyedBuckets(LOG_PER_MINUTE, LOG_BURST, MAX_LOGGED_ADDRESSES)

    def __call__(self, level: int, ip: str, message: str, *args) -> None:
        if self._buckets.take(ip, self.clock()):
            log.log(level, "%s: " + message, ip, *args)


class WebSite:
    """What each request gets (sans-I/O): the routes of both ports."""

    def __init__(self, challenges: AcmeChallenges | None, domains, policy: bytes):
        self.challenges = challenges
        self.policy_hosts = frozenset(MTA_STS_PREFIX + domain for domain in domains)
        self.policy = policy

    def answer(self, request: Request, *, https: bool, server_name: str | None = None) -> tuple[int, bytes]:
        if https:
            host = request.host or server_name
            if host in self.policy_hosts and request.target == POLICY_PATH:
                return 200, self.policy
            return 404, b""
        if self.challenges is not None and request.target.startswith(ACME_PREFIX):
            token = request.target[len(ACME_PREFIX):]
            authorization = self.challenges.key_authorization(token) if is_token(token) else None
            if authorization is not None:
                return 200, authorization.encode("ascii")
        return 404, b""


class WebAdmission:
    """Connection caps for the web ports, apart from SMTP's."""

    def __init__(self, max_connections: int, max_per_ip: int, metrics: WebMetrics, web_log: WebLog):
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.metrics = metrics
        self.web_log = web_log
        self.open = ConnectionCounts(metrics.connections)

    def admit(self, peer) -> bool:
        ip = _ip(peer)
        reason = self.open.over(ip, self.max_connections, self.max_per_ip)
        if reason is not None:
            self.metrics.refused.labels(reason).inc()
            self.web_log(logging.WARNING, ip, "connection refused (%s)", reason)
            return False
        self.open.add(ip)
        return True

    def release(self, peer) -> None:
        self.open.remove(_ip(peer))


class MtaStsSigner:
    """The HTTPS listener's signer: only handshakes for mta-sts.<one of our domains> go on to the budget and home."""

    def __init__(self, site: WebSite, signer: Signer, peer, metrics: WebMetrics, web_log: WebLog):
        self.site = site
        self.signer = signer
        self.peer = peer
        self.metrics = metrics
        self.web_log = web_log

    async def sign(self, request: SignatureRequest) -> bytes:
        name = request.server_name
        if name not in self.site.policy_hosts:
            self.metrics.refused.labels("https_not_mta_sts_name").inc()
            self.web_log(logging.INFO, _ip(self.peer), "HTTPS handshake for %r refused: only mta-sts.<domain> "
                         "is served on this port", name)
            raise SignatureDeclined("not an mta-sts name")
        if not request.certificate.matches(name):
            self.metrics.refused.labels("https_no_certificate").inc()
            self.web_log(logging.WARNING, _ip(self.peer), "HTTPS handshake for %s refused: no certificate from the "
                         "oracle covers it (the certificate needs that name)", name)
            raise SignatureDeclined("no certificate for the name")
        return await self.signer.sign(request)


class WebProtocol(asyncio.Protocol):
    """One connection on port 80, or the plaintext side of one on 443: one request, one answer, closed."""

    def __init__(self, site: WebSite, *, https: bool, timeout: float, metrics: WebMetrics, web_log: WebLog,
                 admission: WebAdmission | None = None, clock=time.time):
        """`admission`: port 80's (on 443 the TLS listener admits before the handshake)."""
        self.site = site
        self.https = https
        self.timeout = timeout
        self.metrics = metrics
        self.web_log = web_log
        self.admission = admission
        self.clock = clock
        self.reader = RequestReader()
        self.transport: asyncio.Transport | None = None
        self.peer = None
        self._timer: asyncio.TimerHandle | None = None
        self._answered = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        if self.admission is not None and not self.admission.admit(self.peer):
            self.admission = None
            transport.abort()
            return
        # On 443 this is after the handshake, whose own timer was the same length: at most twice it in all.
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        try:
            request = self.reader.receive_data(data)
        except RequestError as error:
            self._refuse(error)
            return
        if request is not None:
            session = self.transport.get_extra_info("tls_session")
            status, body = self.site.answer(request, https=self.https,
                                            server_name=session.server_name if session else None)
            self.web_log(logging.INFO, _ip(self.peer), "%s %s Host %s: %d", request.method, request.target,
                         request.host or "-", status)
            self._answer(status, body, head=request.method == "HEAD")

    def eof_received(self) -> bool:
        if not self._answered:
            try:
                self.reader.receive_data(b"")
            except RequestError as error:
                self.web_log(logging.INFO, _ip(self.peer), "closed without a request: %s", error.message)
            self._answered = True
        return False

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.admission is not None:
            self.admission.release(self.peer)
            self.admission = None

    def _timed_out(self) -> None:
        if not self._answered:
            self._refuse(RequestTimeout(f"no whole request within {self.timeout:g} s"))

    def _refuse(self, error: RequestError) -> None:
        self.web_log(logging.INFO, _ip(self.peer), "refused with %d: %s", error.status, error.message)
        self._answer(error.status, b"")

    def _answer(self, status: int, body: bytes, head: bool = False) -> None:
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
        self.metrics.requests.labels("https" if self.https else "http", str(status)).inc()
        if not self.transport.is_closing():
            self.transport.write(response(status, body, head=head, now=self.clock()))
            self.transport.close()


async def start_web(settings, site: WebSite, tls_config: Callable[[], ServerConfig | None],
                    signer_for: Callable[[object], Signer], registry: CollectorRegistry) -> list[asyncio.Server]:
    """Listen on `settings.http_listen` and `https_listen` (edge.toml [web]).

    `tls_config()` is the HTTPS configuration in force (None until the oracle
    lists a chain: connections are then closed); `signer_for(peer)` is that
    client's budgeted signer.
    """
    loop = asyncio.get_running_loop()
    metrics = WebMetrics(registry)
    web_log = WebLog()
    admission = WebAdmission(settings.max_connections, settings.max_connections_per_ip, metrics, web_log)

    def web_protocol(https: bool) -> WebProtocol:
        return WebProtocol(site, https=https, timeout=settings.request_timeout, metrics=metrics, web_log=web_log,
                           admission=None if https else admission)

    def tls_setup(peer):
        config = tls_config()
        if config is None:
            return None
        return config, MtaStsSigner(site, signer_for(peer), peer, metrics, web_log)

    servers = [await loop.create_server(lambda: web_protocol(False), host, port)
               for host, port in settings.http_listen]
    https = tls_listener(tls_setup, lambda: web_protocol(True), admit=admission.admit, release=admission.release,
                         handshake_timeout=settings.request_timeout)
    servers += [await loop.create_server(https, host, port) for host, port in settings.https_listen]
    log.info("web listening on %s", ", ".join([f"http://{h}:{p}" for h, p in settings.http_listen]
                                              + [f"https://{h}:{p}" for h, p in settings.https_listen]))
    return servers


