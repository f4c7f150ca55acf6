"""The oracle's Prometheus metrics, in a registry of their own."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class OracleMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("yestls_oracle_requests", "Requests by method and outcome",
                                ["method", "outcome"], registry=self.registry)
        self.refusals = Counter("yestls_oracle_refusals", "Refused requests by reason", ["reason"],
                                registry=self.registry)
        self.sign_seconds = Histogram(
            "yestls_oracle_sign_seconds", "Time from a sign request's arrival to its answer",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=self.registry)
        self.in_flight = Gauge("yestls_oracle_in_flight", "Sign requests being handled", registry=self.registry)
        self.connections = Gauge("yestls_oracle_connections", "Open connections", registry=self.registry)

    def serve(self, host: str, port: int):
        """Expose /metrics on host:port (the tunnel address); returns the server to shut down."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
