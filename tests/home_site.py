"""Home's intake for tests: intake.toml against an edge site and a private Dovecot, and `yestls intake serve`.

    site = make_edge_site(tmp_path / "site", pki)
    with run_dovecot() as dovecot:
        intake = make_intake(site, dovecot)
        with run_oracle(site.oracle), run_edge(site), run_intake(intake) as process:
            ... send mail to the edge; dovecot.fetch_all("user@example.org") ...
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .dovecot import Dovecot
from .services import ServiceProcess, running, start_service


class SpoolSite(Protocol):
    """What intake.toml needs of an edge: a real one (tests/edge_site.py) or a compromised one
    (tests/hostile_edge.py)."""

    directory: Path
    spool_service_port: int
    home_identity_path: Path    # allowlisted by the edge's spool service
    spool_key_path: Path        # home's private spool key


@dataclass
class IntakeSite:
    directory: Path
    config: Path
    ledger: Path
    quarantine: Path
    status_file: Path


EDGE = "edge"   # the site's edge, as intake.toml's [edges] names it


def make_intake(site: SpoolSite, dovecot: Dovecot, *, options: str = "", rspamd: str | None = None,
                more_edges: dict[str, int] | None = None) -> IntakeSite:
    """intake.toml for the site and the Dovecot; with `rspamd` (a URL, tests/fake_rspamd.py) a [spam] table;
    `more_edges`: other edges' names and spool service ports (on 127.0.0.1), after the site's."""
    directory = site.directory / "intake"
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "intake.toml"
    edges = {EDGE: site.spool_service_port, **(more_edges or {})}
    config.write_text(
        f'identity_key = "{site.home_identity_path}"\n'
        f'spool_key = "{site.spool_key_path}"\n'
        f'lmtp = "127.0.0.1:{dovecot.lmtp_port}"\n'
        f'ledger = "{directory / "ledger.sqlite"}"\n'
        f'quarantine = "{directory / "quarantine"}"\n'
        f'status_file = "{directory / "status.json"}"\n'
        'authserv_id = "mx.example.org"\n'
        f'doveadm_url = "{dovecot.doveadm_url}"\n'
        f'doveadm_api_key = "{dovecot.api_key}"\n'
        "retry = [0.5, 1, 2]\n"
        "poll = 5\n"
        f"{options}\n"
        + "[edges]\n" + "".join(f'{name} = "127.0.0.1:{port}"\n' for name, port in edges.items())
        + (f'[spam]\nrspamd = "{rspamd}"\ntimeout = 20\nverdict_key = "{directory / "verdict.key"}"\n'
           "before_queue = false\n" if rspamd else "")
    )
    return IntakeSite(directory, config, directory / "ledger.sqlite", directory / "quarantine",
                      directory / "status.json")


IntakeProcess = ServiceProcess


def start_intake(intake: IntakeSite, timeout: float = 30.0, ready: str = r"intake pulling from") -> ServiceProcess:
    """`yestls intake serve` in a subprocess, returned once it runs."""
    return start_service(["intake", "serve", "--config", str(intake.config)], intake.directory, ready,
                         name="intake", timeout=timeout)


@contextmanager
def run_intake(intake: IntakeSite, **options):
    with running(start_intake(intake, **options)) as started:
        yield started
