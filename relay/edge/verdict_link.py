"""The before-queue verdict in a multi-process edge: a worker's sessions ask the supervisor's desk.

Home's judge talks to the spool service, which the supervisor runs, so the
one VerdictDesk (relay/edge/verdict.py) lives there. A worker's sessions
ask it through `ForwardedVerdicts`, which offers what the SMTP handler uses
of a desk (`settings`, `home_present`, `count`, `ask`) over a stream
socketpair per worker (`serve_verdicts` is the supervisor's end):

    worker -> supervisor   {"id": n, "facts": {...}, "budget": s} + the message (DATA content with the
                           Received header: what home's judge gets)
    supervisor -> worker   {"id": n, "answer": {"action", "token", "seconds"} or null}

Each frame is a 4-byte length, a 4-byte JSON length, the JSON, then the
content if any. A worker counts home as present while its link is up: it
holds every message up to `max_size` and asks, and the supervisor's desk,
which knows whether home is there, answers None at once when it is not.
(A presence flag copied into each worker would be stale for a moment; a
message sealed without a verdict because of it would be a silent miss.)
The supervisor's desk enforces the budget and counts the outcomes it
decides (home absent, queue full, no answer, home gone); the worker counts
the rest, and the supervisor's page adds both up
(relay/edge/worker_metrics.py). The message crosses the socketpair once,
in memory only; the supervisor wipes its copy once answered.
"""

import asyncio
import json
import logging
import struct

from prometheus_client import CollectorRegistry

from relay.edge.verdict import MAX_BUDGET, VerdictAnswer, VerdictDesk, VerdictMetrics, VerdictOutcome, VerdictSettings
from relay.home.spam import SpamAction
from relay.scrub import wipe
from relay.spool.protocol import MAX_FRAME

log = logging.getLogger("yestls.edge")

HEADER = struct.Struct("!II")   # frame length (JSON + content), JSON length
MAX_JSON = 64 * 1024
LATE = 5.0                      # seconds a worker waits past the budget for the supervisor's answer


async def _read_frame(reader: asyncio.StreamReader) -> tuple[dict, bytearray]:
    total, json_length = HEADER.unpack(await reader.readexactly(HEADER.size))
    if json_length > min(total, MAX_JSON) or total > MAX_FRAME:
        raise ValueError(f"a {total}-byte frame with {json_length} bytes of JSON is no verdict frame")
    header = json.loads(await reader.readexactly(json_length))
    content = bytearray(await reader.readexactly(total - json_length))
    if not isinstance(header, dict):
        raise ValueError("a verdict frame's JSON is not an object")
    return header, content


def _frame(header: dict, content=b"") -> list:
    encoded = json.dumps(header).encode()
    return [HEADER.pack(len(encoded) + len(content), len(encoded)), encoded, content]


async def serve_verdicts(desk: VerdictDesk, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         name: str) -> None:
    """The supervisor's end for one worker: answer its questions with `desk`."""
    tasks: set[asyncio.Task] = set()

    async def answer(header: dict, content: bytearray) -> None:
        try:
            budget = min(float(header["budget"]), MAX_BUDGET)
            found = await desk.ask(memoryview(content), dict(header["facts"]), budget)
        finally:
            wipe(content, len(content))
        answered = None if found is None else {"action": found.action.value, "token": found.token,
                                               "seconds": found.seconds}
        writer.writelines(_frame({"id": header["id"], "answer": answered}))

    try:
        while True:
            header, content = await _read_frame(reader)
            if not isinstance(header.get("id"), int) or not isinstance(header.get("facts"), dict):
                raise ValueError("a verdict question without an id or facts")
            task = asyncio.get_running_loop().create_task(answer(header, content))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass   # the worker is gone
    except (ValueError, KeyError, TypeError) as error:
        log.warning("edge worker %s: malformed verdict question (%s); its link is closed", name, error)
    finally:
        for task in tasks:
            task.cancel()
        writer.close()


class ForwardedVerdicts:
    """A worker's desk: what the SMTP handler uses of a VerdictDesk, answered by the supervisor's."""

    def __init__(self, settings: VerdictSettings, registry: CollectorRegistry):
        self.settings = settings
        self.metrics = VerdictMetrics(registry, self)
        self._numbers = 0
        self._waiting: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None

    async def connect(self, sock) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_JSON)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()

    @property
    def home_present(self) -> bool:
        """While the link is up: the supervisor's desk decides (see the module's docstring)."""
        return self._writer is not None and not self._writer.is_closing()

    def count(self, outcome: VerdictOutcome) -> None:
        self.metrics.outcomes.labels(outcome.value).inc()

    async def ask(self, content: memoryview, facts: dict, budget: float) -> VerdictAnswer | None:
        """As VerdictDesk.ask; None also when the supervisor cannot be asked (counted as home gone)."""
        if self._writer is None or self._writer.is_closing():
            self.count(VerdictOutcome.HOME_GONE)
            return None
        self._numbers += 1
        number = self._numbers
        future = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        try:
            self._writer.writelines(_frame({"id": number, "facts": facts, "budget": budget}, content))
            await self._writer.drain()
            return await asyncio.wait_for(future, budget + LATE)
        except (asyncio.TimeoutError, ConnectionError):
            self.count(VerdictOutcome.HOME_GONE)
            log.warning("the supervisor did not answer a verdict question: accepted without a verdict")
            return None
        finally:
            self._waiting.pop(number, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                header, _ = await _read_frame(reader)
                future = self._waiting.get(header.get("id"))
                if future is None or future.done():
                    continue
                found = header.get("answer")
                future.set_result(None if found is None else VerdictAnswer(
                    SpamAction(found["action"]), str(found["token"]), float(found["seconds"])))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError, TypeError) as error:
            log.warning("the verdict link to the supervisor is closed (%s): messages are accepted without "
                        "a verdict", error or "end of stream")
        finally:
            self._writer.close()
            for future in self._waiting.values():
                if not future.done():
                    self.count(VerdictOutcome.HOME_GONE)
                    future.set_result(None)
