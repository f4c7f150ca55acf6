"""Running one `yestls ... serve` in a subprocess for a test, and waiting until it is ready.

    service = start_service(["oracle", "serve", "--config", str(path)], log_dir, r"oracle listening on")
    with running(service): ...
"""

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServiceProcess:
    process: subprocess.Popen
    log_path: Path
    port: int | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL if it lingers `timeout` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def start_service(arguments: list[str], log_dir: Path, ready: str, *, name: str = "service",
                  timeout: float = 30.0, port: int | None = None) -> ServiceProcess:
    """`python -m relay.cli ARGUMENTS`, returned once its log matches `ready`; fails with the log otherwise."""
    log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "relay.cli", *arguments], stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    service = ServiceProcess(process, log_path, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(ready, service.log()):
            return service
        if process.poll() is not None:
            break
        time.sleep(0.05)
    service.kill()
    raise AssertionError(f"{name} did not start:\n{service.log()}")


@contextmanager
def running(service: ServiceProcess):
    try:
        yield service
    finally:
        service.stop()
