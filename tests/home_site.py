"""Home's intake for tests: intake.toml against an edge site and a private Dovecot, and `yestls intake serve`.

    site = make_edge_site(tmp_path / "site", pki)
    with run_dovecot() as dovecot:
        intake = make_intake(site, dovecot)
        with run_oracle(site.oracle), run_edge(site), run_intake(intake) as process:
            ... send mail to the edge; dovecot.fetch_all("user@example.org") ...
"""

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .dovecot import Dovecot
from .edge_site import EdgeSite


@dataclass
class IntakeSite:
    directory: Path
    config: Path
    ledger: Path
    quarantine: Path
    status_file: Path


def make_intake(site: EdgeSite, dovecot: Dovecot, *, options: str = "") -> IntakeSite:
    directory = site.directory / "intake"
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "intake.toml"
    config.write_text(
        f'edge = "127.0.0.1:{site.spool_service_port}"\n'
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
    )
    return IntakeSite(directory, config, directory / "ledger.sqlite", directory / "quarantine",
                      directory / "status.json")


@dataclass
class IntakeProcess:
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def start_intake(intake: IntakeSite, timeout: float = 30.0, ready: str = r"intake pulling from") -> IntakeProcess:
    log_path = intake.directory / f"intake-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "intake", "serve", "--config", str(intake.config)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    started = IntakeProcess(process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(ready, started.log()):
            return started
        if process.poll() is not None:
            break
        time.sleep(0.05)
    started.kill()
    raise AssertionError(f"intake did not start:\n{started.log()}")


@contextmanager
def run_intake(intake: IntakeSite, **options):
    started = start_intake(intake, **options)
    try:
        yield started
    finally:
        if started.process.poll() is None:
            started.process.terminate()
            try:
                started.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                started.kill()
