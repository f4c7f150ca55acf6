"""The workers' metrics on the supervisor's page: each worker reports its counters, the supervisor adds them up.

A worker's SMTP counters (messages accepted, refusals, the door's and SPF's
counts) and its open connections live in its own process. Every
REPORT_EVERY seconds, and as it stops, a worker writes one line on its
stdout: `metrics <JSON>`, the current value of each counter sample and of
the connection gauge (`report`). The supervisor (`Sums`) adds to its own
counter of the same name the growth since that worker's last report, so a
counter never goes back when a worker dies and starts again from zero, and
sets its connection gauge to the sum of the workers' last reports (a dead
worker's count drops to 0 at once). What a worker counted after its last
report before a SIGKILL is lost: at most REPORT_EVERY seconds of counts.
"""

import json
import logging

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as MetricCounter

log = logging.getLogger("yestls.edge")

PREFIX = b"metrics "
REPORT_EVERY = 1.0
CONNECTIONS = "yestls_edge_smtp_connections"


def report(registry: CollectorRegistry) -> bytes:
    """One stdout line: every counter sample of `registry` (family, labels, value) and the connection gauge."""
    counters, connections = [], 0.0
    for family in registry.collect():
        if family.type == "counter":
            counters += [[family.name, sample.labels, sample.value] for sample in family.samples
                         if sample.name.endswith("_total")]
        elif family.name == CONNECTIONS:
            connections = sum(sample.value for sample in family.samples)
    return PREFIX + json.dumps({"counters": counters, "connections": connections}).encode() + b"\n"


class Sums:
    """The supervisor's side: folds each worker's reports into the supervisor's own metric objects."""

    def __init__(self, counters: list[MetricCounter], connections: Gauge):
        self.counters = {family.name: counter for counter in counters for family in counter.describe()}
        self.connections = connections
        self._last: dict[int, dict[tuple, float]] = {}       # worker -> (family, labels) -> value last reported
        self._open: dict[int, float] = {}

    def started(self, worker: int) -> None:
        """A new process for `worker`: its counters start from zero."""
        self._last[worker] = {}
        self._open[worker] = 0.0
        self._set_connections()

    def stopped(self, worker: int) -> None:
        self._open[worker] = 0.0
        self._set_connections()

    def take(self, worker: int, line: bytes) -> None:
        """One `metrics` line from `worker`; anything malformed is logged and ignored."""
        try:
            data = json.loads(line[len(PREFIX):])
            samples = [(str(name), {str(k): str(v) for k, v in labels.items()}, float(value))
                       for name, labels, value in data["counters"]]
            connections = float(data["connections"])
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            log.warning("edge worker %d: unreadable metrics report (%s)", worker, error)
            return
        last = self._last.setdefault(worker, {})
        for name, labels, value in samples:
            counter = self.counters.get(name)
            if counter is None:
                continue
            key = (name, tuple(sorted(labels.items())))
            growth = value - last.get(key, 0.0)
            last[key] = value
            if growth > 0:
                (counter.labels(**labels) if labels else counter).inc(growth)
        self._open[worker] = connections
        self._set_connections()

    def _set_connections(self) -> None:
        self.connections.set(sum(self._open.values()))
