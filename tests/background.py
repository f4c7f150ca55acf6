"""Load that runs beside a measurement, in threads, until the `with` block ends.

    class Flood(Background):
        def work(self, index: int) -> None: ...   # called again and again until stopped

    with Flood(threads=8) as flood:
        ... measure ...
"""

import threading


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
