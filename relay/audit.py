"""An audit log for a tunnel service (the key oracle, the spool): one JSON line per request, appended as it is decided.

Each line is written with a single write(2) on an O_APPEND descriptor, so a
crash loses at most the line being written, and lines from one process never
interleave.
"""

import json
import os
import time
from pathlib import Path


class AuditLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def record(self, **fields) -> None:
        stamp = time.time()
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp * 1000) % 1000:03d}Z"}
        line.update(fields)
        os.write(self._fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)
