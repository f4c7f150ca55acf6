"""The edge's door: what it checks about a client and its envelope before any content ([door] in edge.toml).

In the style of Postfix's postscreen and smtpd restrictions; every check is
off unless configured, so an edge.toml without `[door]` behaves as before.
Content is judged at home, never here (issue 14).

Decisions:
- **DNSBL/DNSWL scoring** (`dnsbl_sites`, postscreen_dnsbl_sites' syntax:
  `zone=pattern*weight`, pattern and weight optional): each site is asked
  for the client address's A records (IPv4 reversed octets, IPv6 reversed
  nibbles; an IPv4-mapped IPv6 address is asked as IPv4), all sites in
  parallel, within `dnsbl_timeout` in all. A site whose answer matches its
  pattern adds its weight once (an allowlist has a negative weight). At or
  above `dnsbl_threshold` every RCPT is answered `550 5.7.1 Service
  unavailable; client [ADDR] blocked using <site>`, naming the site that
  added most. **At RCPT, not at the greeting**: the lookups run while the
  client greets, says EHLO and starts TLS, so they add no latency; a 550 to
  RCPT is a per-recipient permanent failure every MTA handles and logs
  with its sender and recipient (a refused greeting is logged by many as
  a connection problem and retried), and the operator's log shows what the
  refused client was sending to whom (as postscreen's `enforce`).
- A lookup that fails or times out counts nothing (**fail open**), is
  logged and counted (`yestls_edge_dnsbl_failures{site}`), and the
  address's result is not cached, so the next connection asks again. Only
  answers that arrive in time and match are used: a slow answer cannot
  "poison" the cache, and only A records are asked (a huge TXT record at
  the name is never fetched).
- Results are cached per address for `dnsbl_cache_ttl` seconds (at most
  CACHE_ENTRIES addresses, least recently used forgotten first); that and
  counters are all the edge keeps of what it learns.
- The edge asks **its own resolver** (`resolver`, default 127.0.0.1:53, an
  Unbound the host runs): Spamhaus refuses queries from public resolvers
  (8.8.8.8, 1.1.1.1, a cloud provider's shared one) and answers them with
  127.255.255.x error codes, which no sensible pattern matches (write
  patterns: without one, any 127.0.0.0/8 answer counts).
- **pregreet** (`greet_wait` > 0): the banner waits that long; a client
  that talks first gets `554 5.5.1 Protocol error` and the connection is
  closed at once (its bytes are never read as commands). relay/aio/starttls.py.
- **pipelining** (`pipelining = true`): the edge offers PIPELINING in its
  EHLO reply (handler.py), so until the EHLO is answered a client must wait
  for each reply (RFC 2920 3.1): a command sent before the reply to the one
  before it (the greeting counts) gets `554 5.5.1 Protocol error` and the
  end. A reject, not a penalty: the edge has no score beyond DNSBL's.
- **bare newlines** end the session already (`521 5.5.2`, docs/edge.md):
  they are counted here as a door refusal too.
- **SPF** (`spf = true`) at MAIL FROM, pyspf through the same resolver: the
  result and the domain checked (the HELO name for the null sender,
  RFC 7208 2.4) go into the sealed metadata as `spf`; home decides with
  DMARC. `spf_reject_fail = true` refuses a hard fail with `550 5.7.23`.
  The SPF record's own explanation (`exp=`) is never sent: it is the
  sender domain's text.
- **rates** per client address (token buckets, tls_budget.KeyedBuckets):
  `connections_per_minute` (`421 4.7.0` at the greeting) and
  `messages_per_minute` (MAIL commands: `451 4.7.1`). 0: no limit.
"""

import asyncio
import ipaddress
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import dns.asyncresolver
import dns.exception
import dns.resolver
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as MetricCounter

from relay.edge.connections import parse_ip
from relay.edge.recipients import normal_domain
from relay.edge.tls_budget import KeyedBuckets

log = logging.getLogger("yestls.edge.door")

CACHE_ENTRIES = 4096
MAX_SITES = 16
MAX_TRACKED = 65536     # addresses with a rate bucket
DOOR_REFUSED_METRIC = "yestls_edge_door_refused"   # counter by DoorReason; `yestls status` reads it


class DoorReason(Enum):
    """Why a client was refused at the door (the door metric's `reason` label)."""

    DNSBL = "dnsbl"
    PREGREET = "pregreet"
    PIPELINING = "pipelining"
    BARE_NEWLINE = "bare_newline"
    SPF_FAIL = "spf_fail"
    RATE = "rate"


SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

_OCTET = r"(?:\d{1,3}|\[\d{1,3}\.\.\d{1,3}\]|\[\d{1,3}(?:;\d{1,3})*\])"
_SITE = re.compile(rf"^(?P<zone>[^=*\s]+)(?:=(?P<pattern>{_OCTET}(?:\.{_OCTET}){{3}}))?(?:\*(?P<weight>-?\d+))?$")
SITE_FORM = ('"zone=pattern*weight", e.g. "zen.spamhaus.org=127.0.0.[2..11]*3" or '
             '"list.dnswl.org=127.0.[0..255].[1..3]*-2" (pattern and weight optional)')


@dataclass(frozen=True)
class DnsblSite:
    zone: str
    octets: tuple[frozenset[int], ...] | None   # the values each answer octet may have; None: any 127.x.y.z
    weight: int
    text: str

    def matches(self, answer: str) -> bool:
        try:
            address = ipaddress.IPv4Address(answer)
        except ValueError:
            return False
        if self.octets is None:
            return address in ipaddress.IPv4Network("127.0.0.0/8")
        return all(value in allowed for value, allowed in zip(address.packed, self.octets, strict=True))


def parse_site(text: str) -> DnsblSite:
    """One dnsbl_sites entry; ValueError saying what is wrong."""
    found = _SITE.match(text.strip()) if isinstance(text, str) else None
    if not found:
        raise ValueError(f"{text!r} is not of the form {SITE_FORM}")
    zone = normal_domain(found["zone"])
    if zone is None or "." not in zone:
        raise ValueError(f"{text!r}: {found['zone']!r} is not a DNS zone")
    octets = None
    if found["pattern"]:
        octets = tuple(_octet(part, text) for part in re.findall(_OCTET, found["pattern"]))
    weight = int(found["weight"]) if found["weight"] is not None else 1
    return DnsblSite(zone, octets, weight, text.strip())


def _octet(part: str, text: str) -> frozenset[int]:
    if part.startswith("[") and ".." in part:
        low, high = (int(n) for n in part[1:-1].split(".."))
        values = frozenset(range(low, high + 1)) if low <= high else frozenset()
    elif part.startswith("["):
        values = frozenset(int(n) for n in part[1:-1].split(";"))
    else:
        values = frozenset([int(part)])
    if not values or max(values) > 255:
        raise ValueError(f"{text!r}: {part} is not an octet or a range of octets (0..255)")
    return values


def query_name(address: str, zone: str) -> str | None:
    """The name to ask `zone` about `address` (reversed octets or nibbles), or None if it is no IP address."""
    ip = parse_ip(address)
    if ip is None:
        return None
    if ip.version == 4:
        return ".".join(reversed(str(ip).split("."))) + "." + zone
    return ".".join(reversed(ip.exploded.replace(":", ""))) + "." + zone


@dataclass(frozen=True)
class DoorSettings:
    dnsbl_sites: tuple[DnsblSite, ...] = ()
    dnsbl_threshold: int = 1
    dnsbl_timeout: float = 2.0
    dnsbl_cache_ttl: float = 300.0
    resolver: tuple[str, int] = ("127.0.0.1", 53)
    greet_wait: float = 0.0          # seconds; > 0: the pregreet check
    pipelining: bool = False         # refuse commands sent before the reply to the last, until EHLO is answered
    spf: bool = False
    spf_reject_fail: bool = False
    spf_timeout: float = 10.0
    connections_per_minute: float = 0.0   # 0: no limit
    connection_burst: int = 10
    messages_per_minute: float = 0.0
    message_burst: int = 20

    @property
    def enabled(self) -> bool:
        return bool(self.dnsbl_sites or self.greet_wait or self.pipelining or self.spf
                    or self.connections_per_minute or self.messages_per_minute)


@dataclass(frozen=True)
class Listing:
    """What the DNSBL sites say about one address."""

    score: int
    top: str | None        # the site that added most (positive weight)
    complete: bool         # every site answered in time


@dataclass(frozen=True)
class SpfResult:
    result: str            # one of SPF_RESULTS
    domain: str            # the domain checked ("" when there was none to check)

    def metadata(self) -> dict:
        return {"result": self.result, "domain": self.domain}


class DoorMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.refused = MetricCounter(DOOR_REFUSED_METRIC, "Clients refused at the door, by reason", ["reason"],
                                     registry=registry)
        self.dns_failures = MetricCounter("yestls_edge_dnsbl_failures",
                                          "DNSBL lookups that failed or timed out (the client was let through)",
                                          ["site"], registry=registry)
        self.spf = MetricCounter("yestls_edge_spf_results", "SPF results at MAIL FROM", ["result"],
                                 registry=registry)
        for reason in DoorReason:
            self.refused.labels(reason.value)

    def counters(self) -> list[MetricCounter]:
        return [self.refused, self.dns_failures, self.spf]


class Door:
    def __init__(self, settings: DoorSettings, registry: CollectorRegistry,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.metrics = DoorMetrics(registry)
        self.clock = clock
        self.greet_wait = settings.greet_wait
        self.pipelining = settings.pipelining
        self._cache: OrderedDict[str, tuple[float, Listing]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task] = {}
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = [settings.resolver[0]]
        self._resolver.port = settings.resolver[1]
        self._resolver.lifetime = settings.dnsbl_timeout
        self._connections = KeyedBuckets(settings.connections_per_minute, settings.connection_burst, MAX_TRACKED)
        self._messages = KeyedBuckets(settings.messages_per_minute, settings.message_burst, MAX_TRACKED)
        if settings.spf:
            # pyspf resolves through dnspython's default resolver: the edge's own, like the DNSBL lookups.
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [settings.resolver[0]]
            resolver.port = settings.resolver[1]
            resolver.lifetime = settings.spf_timeout
            dns.resolver.default_resolver = resolver

    def refused(self, reason: DoorReason) -> None:
        self.metrics.refused.labels(reason.value).inc()

    # --- connections: rates and the DNSBL lookups -------------------------------------------------

    def connection_allowed(self, address: str) -> bool:
        """A new connection from `address`: False when over connections_per_minute (counted)."""
        if not self.settings.connections_per_minute or self._connections.take(address, self.clock()):
            return True
        self.refused(DoorReason.RATE)
        return False

    def message_allowed(self, address: str) -> bool:
        """A MAIL command from `address`: False when over messages_per_minute (counted)."""
        if not self.settings.messages_per_minute or self._messages.take(address, self.clock()):
            return True
        self.refused(DoorReason.RATE)
        return False

    def connected(self, address: str) -> None:
        """Start the DNSBL lookups for a new client (they run while it greets); nothing to do without sites."""
        if self.settings.dnsbl_sites and self._cached(address) is None and address not in self._inflight:
            task = asyncio.get_running_loop().create_task(self._lookup(address))
            self._inflight[address] = task
            task.add_done_callback(lambda _: self._inflight.pop(address, None))

    async def listing(self, address: str) -> Listing | None:
        """The sites' verdict on `address` (waiting for the lookups, within dnsbl_timeout); None without sites."""
        if not self.settings.dnsbl_sites:
            return None
        cached = self._cached(address)
        if cached is not None:
            return cached
        self.connected(address)
        task = self._inflight.get(address)
        if task is None:
            return self._cached(address)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever went wrong, DNS trouble never blocks mail
            log.warning("DNSBL lookups for %s failed (%s): not counted (fail open)", address, error)
            return None

    def blocked(self, address: str, listing: Listing | None) -> str | None:
        """The RCPT reply refusing a listed client, or None."""
        if listing is None or listing.score < self.settings.dnsbl_threshold:
            return None
        return f"550 5.7.1 Service unavailable; client [{address}] blocked using {listing.top or 'DNSBL score'}"

    def _cached(self, address: str) -> Listing | None:
        entry = self._cache.get(address)
        if entry is None:
            return None
        if self.clock() >= entry[0]:
            del self._cache[address]
            return None
        self._cache.move_to_end(address)
        return entry[1]

    async def _lookup(self, address: str) -> Listing:
        sites = self.settings.dnsbl_sites
        names = [query_name(address, site.zone) for site in sites]
        if names[0] is None:
            return Listing(0, None, True)
        tasks = [asyncio.ensure_future(self._ask(name)) for name in names]
        done, pending = await asyncio.wait(tasks, timeout=self.settings.dnsbl_timeout)
        for task in pending:
            task.cancel()
        score, complete, top, top_weight = 0, True, None, 0
        for site, task in zip(sites, tasks, strict=True):
            answers = task.result() if task in done and task.exception() is None else None
            if answers is None:
                complete = False
                self.metrics.dns_failures.labels(site.zone).inc()
                why = "timed out" if task in pending else f"failed ({task.exception() or 'no answer'})"
                log.warning("DNSBL %s for %s %s: not counted (fail open)", site.zone, address, why)
                continue
            if any(site.matches(answer) for answer in answers):
                score += site.weight
                if site.weight > top_weight:
                    top, top_weight = site.zone, site.weight
        listing = Listing(score, top, complete)
        if complete:
            self._cache[address] = (self.clock() + self.settings.dnsbl_cache_ttl, listing)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        if score >= self.settings.dnsbl_threshold:
            log.info("%s: DNSBL score %d (threshold %d), top %s", address, score, self.settings.dnsbl_threshold, top)
        return listing

    async def _ask(self, name: str) -> list[str] | None:
        """The A records at `name`: [] when it does not exist (not listed); None when the lookup failed."""
        try:
            answer = await self._resolver.resolve(name, "A", lifetime=self.settings.dnsbl_timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException:
            return None
        return [rdata.address for rdata in answer]

    # --- SPF at MAIL FROM ----------------------------------------------------------------------

    async def spf(self, address: str, sender: str, helo: str | None) -> SpfResult | None:
        """pyspf's result for this client and sender (the HELO name for the null sender); None when off."""
        if not self.settings.spf:
            return None
        import spf as pyspf

        if sender in ("", "<>"):
            domain = normal_domain(helo or "") or ""
            sender = f"postmaster@{domain}"
        else:
            domain = normal_domain(sender.rpartition("@")[2]) or ""
        if not domain:
            result = "none"
        else:
            loop = asyncio.get_running_loop()
            try:
                result, _explanation = await asyncio.wait_for(loop.run_in_executor(
                    None, lambda: pyspf.check2(i=address, s=sender, h=helo or domain,
                                               querytime=self.settings.spf_timeout)),
                    self.settings.spf_timeout + 1)
            except (TimeoutError, asyncio.TimeoutError):
                result = "temperror"
            except Exception as error:  # noqa: BLE001 - pyspf on hostile input: recorded, never fatal
                log.warning("SPF check for %s failed: %s", domain, error)
                result = "temperror"
        if result not in SPF_RESULTS:
            result = "temperror"
        self.metrics.spf.labels(result).inc()
        return SpfResult(result, domain)

    def spf_refusal(self, spf: SpfResult | None, address: str) -> str | None:
        if spf is None or spf.result != "fail" or not self.settings.spf_reject_fail:
            return None
        self.refused(DoorReason.SPF_FAIL)
        return f"550 5.7.23 SPF fail: {spf.domain} does not permit [{address}] to send its mail"
