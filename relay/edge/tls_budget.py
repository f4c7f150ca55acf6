"""What one client may cost home's key oracle, and what the edge does when it cannot finish a client's TLS.

Every full TLS handshake costs one signature at home, and the oracle signs
at most so many per second for the whole edge. Without a budget per client,
anyone could spend that with cheap ClientHellos, genuine senders' STARTTLS
would then fail, and most of them would retry in cleartext. So, checked
before the oracle is asked:

- full handshakes per client address, and per network (/24 for IPv4, /64
  for IPv6: one host's addresses), each a token bucket; resumed handshakes
  need no signature and cost nothing;
- STARTTLS commands per client address (a client that starts and abandons
  handshakes is limited even before it reaches the signature). A STARTTLS
  whose handshake completes, full or resumed, is given back: a sender
  draining its queue after an outage, one connection per message, is not
  paced by it (its full handshakes still count above).

When the edge cannot complete a client's TLS (over budget, or the oracle
refused or did not answer), it remembers that address and why (`Waiting`)
for `retry_after` seconds, so the sender is not pushed into cleartext
silently: its cleartext transactions get `451 4.7.0` (and, under the
`tempfail` policy, its new connections `421 4.7.0` at the greeting), with
the reason, and it retries later, over TLS. Under the opt-in `plaintext` policy nothing is remembered: the
operator chose cleartext over waiting. The trade-off: a client sharing a
/24 with a flood is delayed too (never refused for good, and never
downgraded), which is why the per-network budget is several times the
per-address one.

Memory is bounded: at most `max_tracked` addresses and networks are
remembered, least recently seen forgotten first (forgetting a bucket gives
that address a fresh one: the per-network bucket still holds it back).
"""

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from relay.edge.connections import parse_ip
from relay.ratelimit import TokenBucket


@dataclass(frozen=True)
class TlsLimits:
    handshakes_per_minute: float = 30.0          # per client address
    handshake_burst: int = 10
    network_handshakes_per_minute: float = 120.0  # per /24 or /64
    network_handshake_burst: int = 30
    starttls_per_minute: float = 60.0            # STARTTLS commands per client address
    starttls_burst: int = 20
    retry_after: float = 60.0                    # seconds a client whose TLS failed is asked to come back
    max_tracked: int = 65536


class Waiting(Enum):
    """Why a client is asked to come back later (the text its 421 or 451 says)."""

    TLS_FAILED = "Our TLS with you failed a moment ago"
    OVER_BUDGET = "Too many TLS attempts from your address"

    def reply_text(self) -> str:
        return f"{self.value}; please retry later (not in cleartext)"


class Refusal(Enum):
    """Why the edge declines a client's TLS now (the metric's `reason` label)."""

    ADDRESS = "tls_budget_address"       # full handshakes from this address
    NETWORK = "tls_budget_network"       # ... from its /24 or /64
    STARTTLS = "tls_budget_starttls"     # STARTTLS commands from this address


def network_of(address: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) that `address` is in; the text itself if it is no IP address."""
    ip = parse_ip(address)
    if ip is None:
        return address
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class KeyedBuckets:
    """Token buckets by key, the least recently used forgotten beyond `limit`."""

    def __init__(self, per_minute: float, burst: int, limit: int):
        self.rate = per_minute / 60.0
        self.burst = burst
        self.limit = limit
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> bool:
        bucket = self._buckets.pop(key, None) or TokenBucket(self.rate, self.burst, now)
        self._buckets[key] = bucket
        if len(self._buckets) > self.limit:
            self._buckets.popitem(last=False)
        return bucket.take(now)

    def refund(self, key: str) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.refund()

    def __len__(self) -> int:
        return len(self._buckets)


class TlsBudget:
    def __init__(self, limits: TlsLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self._handshakes = KeyedBuckets(limits.handshakes_per_minute, limits.handshake_burst, limits.max_tracked)
        self._networks = KeyedBuckets(limits.network_handshakes_per_minute, limits.network_handshake_burst,
                                  limits.max_tracked)
        self._starttls = KeyedBuckets(limits.starttls_per_minute, limits.starttls_burst, limits.max_tracked)
        self._failed: OrderedDict[str, tuple[float, Waiting]] = OrderedDict()   # address -> until when, and why

    def starttls(self, address: str) -> Refusal | None:
        """A STARTTLS command from `address`: None to go on, or why not (the address is then remembered)."""
        if self._starttls.take(address, self.clock()):
            return None
        self.tls_failed(address, Waiting.OVER_BUDGET)
        return Refusal.STARTTLS

    def starttls_completed(self, address: str) -> None:
        """The handshake of a STARTTLS from `address` completed: that command costs it nothing."""
        self._starttls.refund(address)

    def handshake(self, address: str) -> Refusal | None:
        """A full handshake (a signature) for `address`: None to ask the oracle, or why not (remembered)."""
        now = self.clock()
        refusal = None
        if not self._handshakes.take(address, now):
            refusal = Refusal.ADDRESS
        elif not self._networks.take(network_of(address), now):
            refusal = Refusal.NETWORK
        if refusal is not None:
            self.tls_failed(address, Waiting.OVER_BUDGET)
        return refusal

    def tls_failed(self, address: str, why: Waiting = Waiting.TLS_FAILED) -> None:
        """The edge could not finish `address`'s TLS: it is asked to come back later for `retry_after` seconds."""
        self._failed.pop(address, None)
        self._failed[address] = (self.clock() + self.limits.retry_after, why)
        while len(self._failed) > self.limits.max_tracked:
            self._failed.popitem(last=False)

    def retry_later(self, address: str) -> Waiting | None:
        """Why `address` is asked to come back later rather than send in cleartext, while it is; else None."""
        found = self._failed.get(address)
        if found is None:
            return None
        until, why = found
        if self.clock() < until:
            return why
        del self._failed[address]
        return None

    def tracked(self) -> int:
        """Entries held (for the memory bound)."""
        return len(self._handshakes) + len(self._networks) + len(self._starttls) + len(self._failed)
