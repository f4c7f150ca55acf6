"""edge.toml: the public MX, its oracles, its spool, and home's access to the spool.

    hostname = "mx.example.org"          # the MX name: greeting, EHLO, Received
    domains = ["example.org"]            # we accept mail for these, nothing else
    mailboxes = []                       # optional: only these addresses
    addresses_from_home = false          # or: the address book home publishes (cached on disk)
    state_dir = "/var/lib/yestls-edge"   # the cached address book
    metrics_listen = "10.77.0.1:9465"    # optional; tunnel address only

    [smtp]
    listen = ["0.0.0.0:25"]
    implicit_tls_listen = []             # optional, e.g. ["0.0.0.0:465"]
    max_message_size = 26214400
    max_recipients = 100
    command_timeout = 300                # seconds (RFC 5321 4.5.3.2: at least 5 minutes)
    data_timeout = 600                   # seconds without a byte during DATA
    handshake_timeout = 30
    max_connections = 200
    max_connections_per_ip = 10
    max_errors = 10
    oracle_down = "tempfail"             # or "resume-only", or "plaintext" (opt-in)
    workers = 1                          # processes accepting SMTP, or "auto" (one per core): docs/edge.md

    [tls]                                # all optional; relay/edge/tls_budget.py explains the budget
    handshakes_per_minute = 30           # full handshakes (each a signature at home) per client address
    handshake_burst = 10
    network_handshakes_per_minute = 120  # ... per /24 (IPv4) or /64 (IPv6)
    network_handshake_burst = 30
    starttls_per_minute = 60             # STARTTLS commands per client address
    starttls_burst = 20
    retry_after = 60                     # seconds a client whose TLS failed is told to retry later, not in cleartext
    ticket_lifetime = 7200               # seconds a session ticket may resume (no signature needed)
    ticket_rotation = 3600               # seconds each ticket key issues tickets; it is forgotten a lifetime later
    tls12 = true                         # TLS 1.2 (ECDHE, AEAD) for senders without TLS 1.3; false: they get cleartext

    [door]                               # all optional, all off by default: relay/edge/door.py decides
    dnsbl_sites = ["zen.spamhaus.org=127.0.0.[2..11]*3", "list.dnswl.org=127.0.[0..255].[1..3]*-2"]
    dnsbl_threshold = 3                  # at or above: 550 5.7.1 at RCPT, naming the list
    dnsbl_timeout = 2                    # seconds for all lookups; a failure or timeout blocks nothing
    dnsbl_cache_ttl = 300                # seconds a result is kept per address
    resolver = "127.0.0.1:53"            # the edge's own resolver (Spamhaus refuses public ones); SPF uses it too
    greet_wait = 0                       # seconds the banner waits; > 0: a client talking first gets 554 5.5.1
    pipelining = false                   # true: a command before the last one's reply (until EHLO's) gets 554 5.5.1
    spf = false                          # true: SPF at MAIL FROM, the result sealed with the message
    spf_reject_fail = false              # true: an SPF fail gets 550 5.7.23 (needs spf)
    spf_timeout = 10
    connections_per_minute = 0           # per client address, 0: no limit; over it 421 4.7.0
    connection_burst = 10
    messages_per_minute = 0              # MAIL commands per client address, 0: no limit; over it 451 4.7.1
    message_burst = 20

    [verdict]                            # optional: home's rspamd judges a message before the 250 (relay/edge/verdict.py)
    budget = 3.0                         # seconds a sender waits for it after DATA, 0..30; then accepted without
    max_size = 1048576                   # bytes of a message held in memory for it, at most 1048576; larger: none

    [oracle]
    servers = ["10.77.0.2:7443"]
    identity_key = "/var/lib/yestls-edge/identity.key"
    request_timeout = 2.0
    refresh_certificates = 60            # seconds: a chain renewed at home is served within this

    [web]                                # optional: relay/edge/web.py; absent or empty lists: no web side
    http_listen = ["0.0.0.0:80"]         # ACME HTTP-01 tokens home places over the tunnel
    https_listen = ["0.0.0.0:443"]       # the MTA-STS policy at https://mta-sts.<domain>/.well-known/mta-sts.txt
    request_timeout = 10                 # seconds from connect (443: and the TLS handshake) to a whole request
    max_connections = 100                # open web connections, both ports
    max_connections_per_ip = 8

    [mta_sts]                            # the policy served on https_listen (RFC 8461); as in site.toml
    mode = "testing"                     # or "enforce", or "none"
    max_age = 604800                     # seconds, 1 day to 1 year
    mx = ["mx.example.org"]              # default: [hostname]; "*.example.org" patterns allowed

    [spool]
    directory = "/var/spool/yestls"
    public_key = "mlkem768-x25519:..."   # `yestls keys spool-new` at home prints it
    max_bytes = 1073741824
    max_files = 10000

    [spool_service]
    listen = ["10.77.0.1:7444"]
    audit_log = "/var/log/yestls-edge/spool-audit.jsonl"
    audit_max_bytes = 67108864           # optional, and audit_backups, audit_refusal_rate, audit_refusal_burst:
                                         # as in oracle.toml (relay/audit.py)
    [[spool_service.peer]]
    name = "home"
    addresses = ["10.77.0.2"]
    identity = "ed25519:..."             # home's `yestls keys identity-new`
"""

import os
from dataclasses import dataclass
from pathlib import Path

from relay.audit import AuditSettings, load_audit_settings
from relay.config import ConfigError, Table
from relay.edge.door import MAX_SITES, SITE_FORM, DoorSettings, parse_site
from relay.edge.recipients import normal_address, normal_domain
from relay.edge.tls_budget import TlsLimits
from relay.edge.verdict import MAX_BUDGET, MAX_SIZE, VerdictSettings
from relay.mtasts import policy_text
from relay.site import MtaStsMode
from relay.spool.protocol import ACME_METHODS
from relay.tunnel import Peer, load_peers

ORACLE_DOWN_POLICIES = ("tempfail", "resume-only", "plaintext")


@dataclass(frozen=True)
class SmtpSettings:
    listen: tuple[tuple[str, int], ...]
    implicit_tls_listen: tuple[tuple[str, int], ...]
    max_message_size: int
    max_recipients: int
    command_timeout: float
    data_timeout: float
    handshake_timeout: float
    max_connections: int
    max_connections_per_ip: int
    max_errors: int
    oracle_down: str
    # Processes accepting SMTP (relay/edge/workers.py); 1 = the edge is one process, as before workers.
    workers: int = 1


@dataclass(frozen=True)
class TlsSettings:
    limits: TlsLimits
    # Session tickets: a ticket resumes TLS without a signature, so revoking the edge's identity at the
    # oracle ends resumption only when the last ticket key is forgotten, rotation + lifetime later (3 h).
    ticket_lifetime: int
    ticket_rotation: int
    # TLS 1.2 for senders that stop there; off, they get protocol_version and most fall back to cleartext.
    tls12: bool = True


@dataclass(frozen=True)
class OracleSettings:
    servers: tuple[tuple[str, int], ...]
    identity_key: Path
    request_timeout: float
    refresh_certificates: float


@dataclass(frozen=True)
class SpoolSettings:
    directory: Path
    public_key: str
    max_bytes: int
    max_files: int


@dataclass(frozen=True)
class SpoolServiceSettings:
    listen: tuple[tuple[str, int], ...]
    audit: AuditSettings
    peers: tuple[Peer, ...]

    @property
    def audit_log(self) -> Path:
        return self.audit.path


@dataclass(frozen=True)
class WebSettings:
    http_listen: tuple[tuple[str, int], ...]
    https_listen: tuple[tuple[str, int], ...]
    request_timeout: float
    max_connections: int
    max_connections_per_ip: int


@dataclass(frozen=True)
class MtaStsSettings:
    mode: MtaStsMode
    max_age: int
    mx: tuple[str, ...]

    def policy(self) -> bytes:
        return policy_text(self.mode.value, self.mx, self.max_age)


@dataclass(frozen=True)
class EdgeConfig:
    hostname: str
    domains: frozenset[str]
    mailboxes: frozenset[str] | None
    addresses_from_home: bool
    state_dir: Path
    metrics_listen: tuple[str, int] | None
    smtp: SmtpSettings
    tls: TlsSettings
    oracle: OracleSettings
    spool: SpoolSettings
    spool_service: SpoolServiceSettings | None
    web: WebSettings | None = None
    mta_sts: MtaStsSettings | None = None
    door: DoorSettings = DoorSettings()
    verdict: VerdictSettings | None = None   # [verdict]: None, no before-queue verdict


def _positive(n) -> bool:
    return n > 0


MAX_WORKERS = 64


def _workers(value: int | str) -> int:
    return min(os.cpu_count() or 1, MAX_WORKERS) if value == "auto" else value


def load(path: Path) -> EdgeConfig:
    table = Table.load(path)
    hostname = table.get("hostname", str, check=lambda h: normal_domain(h) is not None,
                         hint="the MX host name, e.g. mx.example.org")
    domains = table.get("domains", list, check=bool, hint="the mail domains this MX accepts mail for")
    normal_domains = []
    for domain in domains:
        normal = normal_domain(domain) if isinstance(domain, str) else None
        if normal is None:
            raise table.error("domains", f"{domain!r} is not a domain name")
        normal_domains.append(normal)
    listed = table.get("mailboxes", list, default=[], hint="addresses like user@example.org")
    mailboxes = []
    for address in listed:
        normal = normal_address(address) if isinstance(address, str) else None
        if normal is None or normal.rpartition("@")[2] not in normal_domains:
            raise table.error("mailboxes", f"{address!r} is not an address at one of `domains`")
        mailboxes.append(normal)
    from_home = table.get("addresses_from_home", bool, default=False)
    if from_home and mailboxes:
        raise table.error("addresses_from_home", "set either `mailboxes` or `addresses_from_home`, not both")
    state_dir = Path(table.get("state_dir", str, default="/var/lib/yestls-edge"))
    metrics = table.address("metrics_listen", default=None, hint='"HOST:PORT" on the tunnel address')

    smtp = table.table("smtp")
    oracle_down = smtp.get("oracle_down", str, default="tempfail", check=lambda p: p in ORACLE_DOWN_POLICIES,
                           hint=" or ".join(ORACLE_DOWN_POLICIES))
    smtp_settings = SmtpSettings(
        listen=smtp.addresses("listen", default=["0.0.0.0:25"]),
        implicit_tls_listen=smtp.addresses("implicit_tls_listen", default=[]),
        max_message_size=smtp.get("max_message_size", int, default=25 * 1024 * 1024, check=_positive),
        max_recipients=smtp.get("max_recipients", int, default=100, check=_positive),
        command_timeout=float(smtp.get("command_timeout", (int, float), default=300, check=_positive)),
        data_timeout=float(smtp.get("data_timeout", (int, float), default=600, check=_positive)),
        handshake_timeout=float(smtp.get("handshake_timeout", (int, float), default=30, check=_positive)),
        max_connections=smtp.get("max_connections", int, default=200, check=_positive),
        max_connections_per_ip=smtp.get("max_connections_per_ip", int, default=10, check=_positive),
        max_errors=smtp.get("max_errors", int, default=10, check=_positive),
        oracle_down=oracle_down,
        workers=_workers(smtp.get("workers", (int, str), default=1,
                                  check=lambda w: w == "auto" or (isinstance(w, int) and 1 <= w <= MAX_WORKERS),
                                  hint=f'1..{MAX_WORKERS}, or "auto" (one per CPU core)')),
    )
    smtp.done()
    tls_settings = _tls_settings(table.table("tls"))
    door = _door_settings(table.table("door"))

    oracle = table.table("oracle")
    oracle_settings = OracleSettings(
        servers=oracle.addresses("servers", hint='the oracles\' "HOST:PORT" on the tunnel'),
        identity_key=Path(oracle.get("identity_key", str, hint="made by `yestls keys identity-new`")),
        request_timeout=float(oracle.get("request_timeout", (int, float), default=2.0, check=_positive)),
        refresh_certificates=float(oracle.get("refresh_certificates", (int, float), default=60,
                                              check=_positive)),
    )
    if not oracle_settings.servers:
        raise oracle.error("servers", "empty: the edge needs at least one key oracle")
    oracle.done()

    spool = table.table("spool")
    spool_settings = SpoolSettings(
        directory=Path(spool.get("directory", str, default="/var/spool/yestls")),
        public_key=spool.get("public_key", str, hint="the home spool key, printed by `yestls keys spool-new`"),
        max_bytes=spool.get("max_bytes", int, default=1 << 30, check=_positive),
        max_files=spool.get("max_files", int, default=10000, check=_positive),
    )
    spool.done()

    service = None
    if "spool_service" in table.data:
        section = table.table("spool_service")
        service = SpoolServiceSettings(
            listen=section.addresses("listen", hint='"HOST:PORT" on the tunnel address'),
            audit=load_audit_settings(section, default_path="/var/log/yestls-edge/spool-audit.jsonl"),
            peers=load_peers(section, "home's intake"),
        )
        section.done()
    else:
        table.table("spool_service")  # marks the key as read: absent is allowed
    web = _web_settings(table.table("web"))
    mta_sts = _mta_sts_settings(table.table("mta_sts"), normal_domain(hostname))
    if web is not None and web.http_listen and service is None:
        raise table.error("web", "http_listen serves ACME tokens home places over the tunnel: "
                                 "it needs [spool_service]")
    acme_peers = [p.name for p in (service.peers if service else ()) if p.methods and ACME_METHODS & p.methods]
    if acme_peers and (web is None or not web.http_listen):
        raise table.error("web", f"spool_service peer {acme_peers[0]} may place ACME tokens, but no "
                                 "http_listen answers them: set [web] http_listen")
    verdict = _verdict_settings(table.table("verdict")) if "verdict" in table.data else None
    if verdict is None:
        table.table("verdict")  # marks the key as read: absent is allowed
    elif service is None:
        raise table.error("verdict", "home judges messages over the tunnel: [verdict] needs [spool_service]")
    table.done()
    return EdgeConfig(
        hostname=normal_domain(hostname), domains=frozenset(normal_domains),
        mailboxes=frozenset(mailboxes) if mailboxes else None, addresses_from_home=from_home,
        state_dir=state_dir, metrics_listen=metrics, smtp=smtp_settings, tls=tls_settings, oracle=oracle_settings,
        spool=spool_settings, spool_service=service, web=web, mta_sts=mta_sts,
        door=door, verdict=verdict,
    )


def _verdict_settings(verdict: Table) -> VerdictSettings:
    defaults = VerdictSettings()
    settings = VerdictSettings(
        budget=float(verdict.get("budget", (int, float), default=defaults.budget,
                                 check=lambda t: 0 < t <= MAX_BUDGET,
                                 hint=f"seconds a sender waits for home's verdict, above 0, at most {MAX_BUDGET:g}")),
        max_size=verdict.get("max_size", int, default=defaults.max_size, check=lambda n: 0 < n <= MAX_SIZE,
                             hint=f"bytes of a message held for a verdict, 1 to {MAX_SIZE} (one frame to home)"),
    )
    verdict.done()
    return settings


def _web_settings(web: Table) -> WebSettings | None:
    settings = WebSettings(
        http_listen=web.addresses("http_listen", default=[]),
        https_listen=web.addresses("https_listen", default=[]),
        request_timeout=float(web.get("request_timeout", (int, float), default=10, check=lambda t: 0 < t <= 300,
                                      hint="seconds, at most 300")),
        max_connections=web.get("max_connections", int, default=100, check=_positive),
        max_connections_per_ip=web.get("max_connections_per_ip", int, default=8, check=_positive),
    )
    web.done()
    return settings if settings.http_listen or settings.https_listen else None


def _mta_sts_settings(sts: Table, hostname: str) -> MtaStsSettings:
    modes = [m.value for m in MtaStsMode]
    mode = sts.get("mode", str, default=MtaStsMode.TESTING.value, check=lambda m: m in modes, hint=" or ".join(modes))
    max_age = sts.get("max_age", int, default=604800, check=lambda v: 86400 <= v <= 31557600,
                      hint="seconds, 1 day to 1 year (RFC 8461)")
    mx = sts.get("mx", list, default=[hostname], check=lambda names: bool(names) and all(map(_mx_pattern, names)),
                 hint='the MX names, lower case; "*.example.org" matches one label (RFC 8461 4.1)')
    sts.done()
    return MtaStsSettings(MtaStsMode(mode), max_age, tuple(mx))


def _mx_pattern(name) -> bool:
    if not isinstance(name, str):
        return False
    bare = name[2:] if name.startswith("*.") else name
    return normal_domain(bare) == bare and "." in bare


def _door_settings(door: Table) -> DoorSettings:
    defaults = DoorSettings()
    texts = door.get("dnsbl_sites", list, default=[], check=lambda v: len(v) <= MAX_SITES,
                     hint=f"at most {MAX_SITES} entries, each {SITE_FORM}")
    sites = []
    for text in texts:
        try:
            sites.append(parse_site(text))
        except ValueError as error:
            raise door.error("dnsbl_sites", str(error)) from None
    if len({site.zone for site in sites}) != len(sites):
        raise door.error("dnsbl_sites", "a zone is listed twice: give each zone one entry (one pattern, one weight)")

    def seconds(key: str, default: float, most: float) -> float:
        return float(door.get(key, (int, float), default=default, check=lambda t: 0 <= t <= most,
                              hint=f"seconds, 0..{most:g}"))

    def positive(key: str, default: float, most: float) -> float:
        return float(door.get(key, (int, float), default=default, check=lambda t: 0 < t <= most,
                              hint=f"seconds, above 0, at most {most:g}"))

    def count(key: str, default: int) -> int:
        return door.get(key, int, default=default, check=_positive, hint="a whole number above 0")

    spf = door.get("spf", bool, default=False)
    spf_reject = door.get("spf_reject_fail", bool, default=False)
    if spf_reject and not spf:
        raise door.error("spf_reject_fail", "needs spf = true (the result it refuses on is computed only then)")
    settings = DoorSettings(
        dnsbl_sites=tuple(sites),
        dnsbl_threshold=door.get("dnsbl_threshold", int, default=defaults.dnsbl_threshold, check=_positive,
                                 hint="the score (sum of the matching sites' weights) that refuses, above 0"),
        dnsbl_timeout=positive("dnsbl_timeout", defaults.dnsbl_timeout, 30),
        dnsbl_cache_ttl=seconds("dnsbl_cache_ttl", defaults.dnsbl_cache_ttl, 86400),
        resolver=door.address("resolver", default=None,
                              hint='"HOST:PORT" of the resolver the edge runs itself, e.g. "127.0.0.1:53"')
        or defaults.resolver,
        greet_wait=seconds("greet_wait", defaults.greet_wait, 30),
        pipelining=door.get("pipelining", bool, default=False),
        spf=spf,
        spf_reject_fail=spf_reject,
        spf_timeout=positive("spf_timeout", defaults.spf_timeout, 60),
        connections_per_minute=float(door.get("connections_per_minute", (int, float), default=0,
                                              check=lambda n: n >= 0, hint="per client address; 0: no limit")),
        connection_burst=count("connection_burst", defaults.connection_burst),
        messages_per_minute=float(door.get("messages_per_minute", (int, float), default=0,
                                           check=lambda n: n >= 0, hint="MAIL commands per client address; 0: no limit")),
        message_burst=count("message_burst", defaults.message_burst),
    )
    door.done()
    return settings


def _tls_settings(tls: Table) -> TlsSettings:
    defaults = TlsLimits()

    def rate(key: str, default: float) -> float:
        return float(tls.get(key, (int, float), default=default, check=_positive, hint="a number above 0"))

    def count(key: str, default: int) -> int:
        return tls.get(key, int, default=default, check=_positive, hint="a whole number above 0")

    limits = TlsLimits(
        handshakes_per_minute=rate("handshakes_per_minute", defaults.handshakes_per_minute),
        handshake_burst=count("handshake_burst", defaults.handshake_burst),
        network_handshakes_per_minute=rate("network_handshakes_per_minute", defaults.network_handshakes_per_minute),
        network_handshake_burst=count("network_handshake_burst", defaults.network_handshake_burst),
        starttls_per_minute=rate("starttls_per_minute", defaults.starttls_per_minute),
        starttls_burst=count("starttls_burst", defaults.starttls_burst),
        retry_after=rate("retry_after", defaults.retry_after),
    )
    lifetime = tls.get("ticket_lifetime", int, default=7200, check=lambda n: 1 <= n <= 604800,
                       hint="seconds, 1..604800 (RFC 8446 4.6.1)")
    rotation = tls.get("ticket_rotation", int, default=3600, check=lambda n: 1 <= n <= lifetime,
                       hint="seconds, 1..ticket_lifetime")
    tls12 = tls.get("tls12", bool, default=True, hint="true or false")
    tls.done()
    return TlsSettings(limits, lifetime, rotation, tls12)


__all__ = ["ConfigError", "EdgeConfig", "load"]
