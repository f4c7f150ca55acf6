"""What every `yestls ... serve` shares: one log format (the tests and the
demo read these lines), a clean stop on SIGTERM (systemd) or SIGINT, and a
bad configuration reported in one line with exit status 2."""

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def stop_event() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT, in the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def restart_pause(previous: float, lived: float, bounds: tuple[float, float], young: float) -> float:
    """Seconds to wait before starting again a child that stopped after `lived` seconds: bounds[0], doubled
    from `previous` (the last pause, 0 at first) while it keeps dying within `young` seconds, at most bounds[1]."""
    if lived >= young:
        return bounds[0]
    return min(max(previous * 2, bounds[0]), bounds[1])


def run(name: str, load: Callable[[], object], serve: Callable[[object], Awaitable[None]],
        errors: tuple[type[Exception], ...]) -> int:
    """Load the configuration and serve until stopped; `errors` are the user's to fix: said, exit 2."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # LOG_FORMAT names no caller, thread or process: not gathering them for every record is the logging
    # HOWTO's "Optimization" advice (a stack walk and three lookups per line the edge writes per message).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    try:
        asyncio.run(serve(load()))
    except errors as error:
        print(f"yestls {name}: {error}", file=sys.stderr)
        return 2
    return 0
