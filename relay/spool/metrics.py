"""The spool's Prometheus metrics: the tunnel service's, and the spool's own read at scrape time.

Both register into a registry the caller passes (the edge has one for all
its metrics) or make their own.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class SpoolServiceMetrics:
    """What relay.tunnel.TunnelService counts: requests, refusals, open connections."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("yestls_spool_requests", "Spool service requests by method and outcome",
                                ["method", "outcome"], registry=self.registry)
        self.refusals = Counter("yestls_spool_refusals", "Refused spool service requests by reason", ["reason"],
                                registry=self.registry)
        self.connections = Gauge("yestls_spool_connections", "Open spool service connections",
                                 registry=self.registry)


class SpoolMetrics(Collector):
    """Depth, bytes, oldest message age, accepted and refused-as-full counts, from `spool.stats()` at scrape."""

    def __init__(self, spool, registry: CollectorRegistry | None = None) -> None:
        self.spool = spool
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(self)

    def collect(self):
        stats = self.spool.stats()
        yield GaugeMetricFamily("yestls_spool_depth", "Sealed messages waiting for home", value=stats.depth)
        yield GaugeMetricFamily("yestls_spool_bytes", "Bytes of sealed messages waiting for home",
                                value=stats.bytes)
        yield GaugeMetricFamily("yestls_spool_oldest_age_seconds",
                                "Seconds since the oldest waiting message was accepted (0 when none)",
                                value=stats.oldest_age)
        yield CounterMetricFamily("yestls_spool_accepted", "Messages sealed and stored since start",
                                  value=stats.accepted)
        full = CounterMetricFamily("yestls_spool_full", "Messages refused because a spool cap was reached, or "
                                   "its filesystem was full", labels=["reason"])
        full.add_metric(["bytes"], stats.full_bytes)
        full.add_metric(["files"], stats.full_files)
        full.add_metric(["disk"], stats.full_disk)
        yield full

    def describe(self):
        # The names, for the registry's duplicate check, without asking the spool.
        for name in ("yestls_spool_depth", "yestls_spool_bytes", "yestls_spool_oldest_age_seconds"):
            yield GaugeMetricFamily(name, "")
        yield CounterMetricFamily("yestls_spool_accepted", "")
        yield CounterMetricFamily("yestls_spool_full", "", labels=["reason"])
