"""An edge for tests: an oracle home, a home spool key, edge.toml, and `yestls edge serve`.

    site = make_edge_site(tmp_path, pki)
    with run_oracle(site.oracle), run_edge(site) as edge:
        smtplib.SMTP("127.0.0.1", site.smtp_port) ...
    unsealed = unseal(path_of_a_spool_file.read_bytes(), site.spool_private_key)   # relay.spool.sealed
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from relay.identity import generate_identity, load_identity
from relay.spool.keys import generate_spool_key, load_spool_private_key

from .oracle_home import OracleHome, free_port, make_oracle_home
from .pki import TestPKI
from .services import ServiceProcess, running, start_service


@dataclass
class EdgeSite:
    directory: Path
    oracle: OracleHome
    config: Path
    spool_dir: Path
    spool_key_path: Path        # home's private spool key (the test plays home)
    home_identity_path: Path    # home's intake identity, allowlisted by the spool service
    smtp_port: int
    spool_service_port: int
    metrics_port: int
    implicit_tls_port: int | None
    http_port: int | None = None            # [web] http_listen, with web=True
    https_port: int | None = None           # [web] https_listen
    acme_identity_path: Path | None = None  # home's ACME client, a spool peer allowed the acme_challenge_* methods

    @property
    def spool_private_key(self):
        return load_spool_private_key(self.spool_key_path)

    @property
    def home_identity(self):
        return load_identity(self.home_identity_path)

    def spooled_files(self) -> list[Path]:
        queue = self.spool_dir / "queue"
        return sorted(p for p in queue.iterdir() if p.is_file()) if queue.exists() else []


# Every test client connects from 127.0.0.1: a TLS budget for one real sender would stop the tests.
# Tests of the budget itself pass their own `tls_options`.
UNBUDGETED_TLS = ("handshakes_per_minute = 1000000\nhandshake_burst = 100000\n"
                  "network_handshakes_per_minute = 1000000\nnetwork_handshake_burst = 100000\n"
                  "starttls_per_minute = 1000000\nstarttls_burst = 100000\n")


def make_edge_site(directory: Path, pki: TestPKI, key_types=("ecdsa-p256",), *, oracle_down: str = "tempfail",
                   smtp_options: str = "", top_options: str = "", spool_options: str = "",
                   implicit_tls: bool = False, domains=("example.org",), spool_suite: str | None = None,
                   oracle_options: str = "", tls_options: str = UNBUDGETED_TLS, web: bool = False,
                   web_options: str = "") -> EdgeSite:
    """`web`: ports 80 and 443 on free ports (edge.toml [web], `web_options` more lines there, or [mta_sts]
    after them), and home's ACME client as a second spool peer on home's address."""
    directory.mkdir(parents=True, exist_ok=True)
    oracle = make_oracle_home(directory / "home", pki, key_types)
    edge_dir = directory / "edge"
    edge_dir.mkdir(exist_ok=True)
    spool_key_path = directory / "home" / "spool.key"
    spool_public = generate_spool_key(spool_key_path, *([spool_suite] if spool_suite else []))
    home_identity_path = directory / "home" / "intake-identity.key"
    home_identity = generate_identity(home_identity_path)
    smtp_port, service_port, metrics_port = free_port(), free_port(), free_port()
    implicit_port = free_port() if implicit_tls else None
    implicit = f'implicit_tls_listen = ["127.0.0.1:{implicit_port}"]\n' if implicit_tls else ""
    http_port, https_port = (free_port(), free_port()) if web else (None, None)
    acme_identity_path = directory / "home" / "acme-identity.key" if web else None
    web_section = (
        "[[spool_service.peer]]\n"
        'name = "acme"\n'
        'addresses = ["127.0.0.1"]\n'
        f'identity = "{generate_identity(acme_identity_path)}"\n'
        'methods = ["acme_challenge_put", "acme_challenge_delete"]\n'
        "[web]\n"
        f'http_listen = ["127.0.0.1:{http_port}"]\n'
        f'https_listen = ["127.0.0.1:{https_port}"]\n{web_options}\n'
    ) if web else ""
    config = edge_dir / "edge.toml"
    config.write_text(
        'hostname = "mx.example.org"\n'
        f"domains = {list(domains)!r}\n".replace("'", '"')
        + f'state_dir = "{edge_dir / "state"}"\n'
        f'metrics_listen = "127.0.0.1:{metrics_port}"\n'
        f"{top_options}\n"
        "[smtp]\n"
        f'listen = ["127.0.0.1:{smtp_port}"]\n{implicit}'
        f'oracle_down = "{oracle_down}"\n{smtp_options}\n'
        f"[tls]\n{tls_options}\n"
        "[oracle]\n"
        f'servers = ["127.0.0.1:{oracle.port}"]\n'
        f'identity_key = "{oracle.identity_path}"\n{oracle_options}\n'
        "[spool]\n"
        f'directory = "{edge_dir / "spool"}"\n'
        f'public_key = "{spool_public}"\n{spool_options}\n'
        "[spool_service]\n"
        f'listen = ["127.0.0.1:{service_port}"]\n'
        f'audit_log = "{edge_dir / "spool-audit.jsonl"}"\n'
        "[[spool_service.peer]]\n"
        'name = "home"\n'
        'addresses = ["127.0.0.1"]\n'
        f'identity = "{home_identity}"\n'
        + web_section
    )
    return EdgeSite(directory, oracle, config, edge_dir / "spool", spool_key_path, home_identity_path,
                    smtp_port, service_port, metrics_port, implicit_port, http_port, https_port, acme_identity_path)


EdgeProcess = ServiceProcess


def start_edge(site: EdgeSite, timeout: float = 30.0, ready: str = r"edge \S+ listening on") -> ServiceProcess:
    """`yestls edge serve` in a subprocess, returned once it listens."""
    return start_service(["edge", "serve", "--config", str(site.config)], site.directory, ready, name="edge",
                         timeout=timeout)


@contextmanager
def run_edge(site: EdgeSite, **options):
    with running(start_edge(site, **options)) as edge:
        yield edge


WORKER_SERVING = re.compile(r"edge worker (\d+) of \d+ serving \(pid (\d+)\)")


def worker_pids(edge: ServiceProcess) -> dict[int, int]:
    """The latest pid of each worker of a multi-process edge, from its log (workers log to the same stderr)."""
    return {int(index): int(pid) for index, pid in WORKER_SERVING.findall(edge.log())}
