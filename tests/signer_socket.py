"""A stand-in for yestls-signer.socket: a Unix socket that starts one signing
process per connection, with the connection as the process's standard input
(fd 0), the way systemd does with Accept=yes and StandardInput=socket.

    with SignerSocket(tmp_path / "signer.sock", keystore) as signers:
        ... oracle.toml: signer_socket = "<signers.path>" ...
        signers.processes   # every signing process started so far, in order
"""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path


class SignerSocket:
    def __init__(self, path: Path, keystore: Path):
        self.path = Path(path)
        self.keystore = Path(keystore)
        self.processes: list[subprocess.Popen] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> "SignerSocket":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._thread.join(timeout=10)
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)

    def running(self) -> list[subprocess.Popen]:
        return [process for process in self.processes if process.poll() is None]

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed by __exit__
            with connection:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "relay.oracle.signer", "--keystore", str(self.keystore), "--fd", "0"],
                    stdin=connection))
