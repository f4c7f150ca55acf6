"""Work that runs beside a test, in threads, until the `with` block ends:
load beside a measurement (Background), or a socketserver (serving_in_thread).

    class Flood(Background):
        def work(self, index: int) -> None: ...   # called again and again until stopped

    with Flood(threads=8) as flood:
        ... measure ...
"""

import socketserver
import threading
from contextlib import contextmanager


class Background:
    def __init__(self, threads: int, join_timeout: float = 60.0):
        self.stopping = threading.Event()
        self.join_timeout = join_timeout
        self.threads = [threading.Thread(target=self._loop, args=(index,), daemon=True) for index in range(threads)]

    def work(self, index: int) -> None:
        raise NotImplementedError

    def _loop(self, index: int) -> None:
        while not self.stopping.is_set():
            self.work(index)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(self.join_timeout)


@contextmanager
def serving_in_thread(server: socketserver.BaseServer):
    """Run `server` in a thread for the `with` block; shut it down and close it after."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
