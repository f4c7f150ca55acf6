"""The before-queue verdict's desk on the edge: messages waiting in SMTP sessions for home's judgement.

Home pulls: its judge (relay/home/judge.py) keeps `verdict_wait` calls open
on the spool service (relay/spool/service.py; the methods sit behind the
tunnel gate like the spool's own), each answered with one waiting message,
and gives rspamd's action back with `verdict_answer`. The edge never
connects to home for this. An SMTP session (relay/edge/handler.py) asks

    answer = await desk.ask(content, facts, budget)   # a VerdictAnswer, or None: accept as without a verdict

and gets None at once when no home is present (no `verdict_wait` open now,
nor answered within PRESENCE_GRACE seconds), when MAX_QUEUE messages wait
already, or when the message and its facts would not fit in one frame;
None after `budget` seconds without an answer, and as soon as the home
connection the message was handed to closes. Nothing waits past its budget.

The edge believes nothing of an answer but its shape: `action` one of
rspamd's actions (relay.home.spam.SpamAction), `token` an opaque string
of at most spam.MAX_TOKEN characters (home's MAC over its verdict and the
message, relay.home.spam.seal_verdict), which the edge seals into the
message's metadata for home to check after unsealing.

Plaintext: the message is the session's own buffer (a PlaintextBuffer,
wiped when the session is done with it); the desk keeps a view of it only
while the message waits, and hands that view to the RPC layer as the
answer's tail.
"""

import asyncio
import enum
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as MetricCounter

from relay.home.spam import MAX_TOKEN, SpamAction
from relay.rpc import Code, Frame, RemoteError, RpcConnection
from relay.scrub import wipe
from relay.show import show
from relay.spool.protocol import MAX_FETCH, MAX_FRAME, MAX_VERDICT_ID, MAX_WAIT, VERDICT_ANSWER, VERDICT_WAIT
from relay.spool.service import NOT_FOUND

log = logging.getLogger("yestls.edge")

PRESENCE_GRACE = 2.0         # seconds after its last verdict_wait ended that a home still counts as present
MAX_QUEUE = 64               # messages waiting for a verdict at once (queued or handed to home)
MAX_BUDGET = 30.0            # seconds, the most `budget` may be
MAX_SIZE = MAX_FETCH         # bytes of DATA content the most `max_size` may be: one frame carries it to home
FRAME_ROOM = 16 * 1024       # bytes of a verdict_wait answer's frame kept for its header and JSON
VERDICT_METRIC = "yestls_edge_verdict"            # counter by VerdictOutcome; `yestls status` reads it
VERDICT_SECONDS_METRIC = "yestls_edge_verdict_seconds"
HOME_PRESENT_METRIC = "yestls_edge_verdict_home_present"


@dataclass(frozen=True)
class VerdictSettings:
    """edge.toml's [verdict]."""

    budget: float = 3.0          # seconds a session waits for home's verdict after the end of DATA
    max_size: int = 1024 * 1024  # bytes of DATA content held for a verdict; a larger message is sealed as it arrives


class VerdictOutcome(enum.Enum):
    """What became of a message under [verdict] (the metric's `outcome` label)."""

    REJECTED = "rejected"          # home said reject: 550 5.7.1, nothing stored
    DEFERRED = "deferred"          # home said soft reject: 451 4.7.1, nothing stored
    ACCEPTED = "accepted"          # any other action: sealed with the verdict
    NO_ANSWER = "no_answer"        # home present, but no answer within the budget
    HOME_GONE = "home_gone"        # the home connection holding the message closed
    HOME_ABSENT = "home_absent"    # no home waiting for messages: not asked
    QUEUE_FULL = "queue_full"      # MAX_QUEUE messages waiting already: not asked
    TOO_LARGE = "too_large"        # over max_size (declared, or grown past it): sealed as it arrived, not asked


@dataclass(frozen=True)
class VerdictAnswer:
    action: SpamAction
    token: str
    seconds: float    # from the question to the answer


class PlaintextBuffer:
    """Plaintext gathered in memory: grown by copying into a larger bytearray (the old one wiped), wiped at the end.

    `bytearray +=` would let the allocator move the bytes and free the old
    block unwiped; here every block that held plaintext is zeroed before it
    is dropped.
    """

    def __init__(self, capacity: int):
        self._data = bytearray(max(capacity, 1))
        self.length = 0

    def append(self, piece) -> None:
        need = self.length + len(piece)
        if need > len(self._data):
            grown = bytearray(max(need, 2 * len(self._data)))
            memoryview(grown)[:self.length] = memoryview(self._data)[:self.length]
            wipe(self._data, self.length)
            self._data = grown
        memoryview(self._data)[self.length:need] = piece
        self.length = need

    def view(self) -> memoryview:
        return memoryview(self._data)[:self.length]

    def wipe(self) -> None:
        wipe(self._data, self.length)
        self.length = 0


class VerdictMetrics:
    def __init__(self, registry: CollectorRegistry | None, desk: "VerdictDesk"):
        self.outcomes = MetricCounter(VERDICT_METRIC, "Messages under the before-queue verdict, by outcome",
                                      ["outcome"], registry=registry)
        for outcome in VerdictOutcome:
            self.outcomes.labels(outcome.value)
        self.seconds = Histogram(VERDICT_SECONDS_METRIC, "The before-queue verdict's round trip, for answered ones",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2, 3, 5, 10, 30), registry=registry)
        present = Gauge(HOME_PRESENT_METRIC, "1 while a home waits for messages to judge", registry=registry)
        present.set_function(lambda: 1.0 if desk.home_present else 0.0)


@dataclass
class _Request:
    id: str
    content: memoryview
    facts: dict
    answer: asyncio.Future            # a VerdictAnswer, or None when the home holding it left
    deadline: float                   # monotonic
    asked: float
    connection: RpcConnection | None = None   # the home connection it was handed to


class VerdictDesk:
    """The queue of messages waiting for a verdict, and the home connections waiting for messages."""

    def __init__(self, settings: VerdictSettings, registry: CollectorRegistry | None = None, *,
                 max_queue: int = MAX_QUEUE, clock=time.monotonic):
        self.settings = settings
        self.max_queue = max_queue
        self.clock = clock
        self._queue: deque[_Request] = deque()       # not yet handed to a home
        self._pending: dict[str, _Request] = {}      # every unanswered request, queued or handed
        self._waiters: deque[asyncio.Future] = deque()   # verdict_wait calls open now, oldest first
        self._last_seen = float("-inf")              # when a verdict_wait last ended
        self._watched: set[RpcConnection] = set()
        self.metrics = VerdictMetrics(registry, self)

    @property
    def home_present(self) -> bool:
        return bool(self._waiters) or self.clock() - self._last_seen <= PRESENCE_GRACE

    def count(self, outcome: VerdictOutcome) -> None:
        self.metrics.outcomes.labels(outcome.value).inc()

    def methods(self) -> dict:
        """The spool service's methods for home's judge (relay/spool/service.py `extra_methods`)."""
        return {VERDICT_WAIT: self._wait, VERDICT_ANSWER: self._answer}

    # --- the SMTP session's side ------------------------------------------------

    async def ask(self, content: memoryview, facts: dict, budget: float) -> VerdictAnswer | None:
        """Home's verdict on `content` within `budget` seconds, or None (counted with the reason)."""
        if not self.home_present:
            self.count(VerdictOutcome.HOME_ABSENT)
            return None
        if len(self._pending) >= self.max_queue:
            self.count(VerdictOutcome.QUEUE_FULL)
            log.warning("%d messages wait for home's verdict already: one more accepted without", self.max_queue)
            return None
        if len(content) + _json_size(facts) > MAX_FRAME - FRAME_ROOM:
            self.count(VerdictOutcome.TOO_LARGE)
            return None
        now = self.clock()
        request = _Request(os.urandom(16).hex(), content, facts, asyncio.get_running_loop().create_future(),
                           now + budget, now)
        self._pending[request.id] = request
        self._queue.append(request)
        self._dispatch()
        try:
            await asyncio.wait([request.answer], timeout=budget)
        finally:
            self._pending.pop(request.id, None)
            if request in self._queue:
                self._queue.remove(request)
            if not request.answer.done():
                request.answer.cancel()
        if request.answer.cancelled():
            self.count(VerdictOutcome.NO_ANSWER)
            log.info("no verdict from home within %g s%s: accepted without one", budget,
                     "" if request.connection else " (no home took the message)")
            return None
        answer = request.answer.result()
        if answer is None:
            self.count(VerdictOutcome.HOME_GONE)
            log.info("the home connection judging a message closed: accepted without a verdict")
            return None
        self.metrics.seconds.observe(answer.seconds)
        return answer

    def _dispatch(self) -> None:
        """Hand queued messages to the open verdict_wait calls, oldest first."""
        while self._queue and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self._queue.popleft())

    # --- home's side (spool service methods, after the tunnel's auth) ----------------

    async def _wait(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        timeout = frame.meta.get("timeout", MAX_WAIT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf"):
            raise RemoteError(Code.BAD_REQUEST, "timeout must be a number of seconds, 0 or more")
        self._watch(connection)
        deadline = self.clock() + min(float(timeout), MAX_WAIT)
        while True:
            request = await self._next(deadline)
            if request is None:
                return {}, b""
            if not request.answer.done():   # its session may have stopped waiting meanwhile
                break
        request.connection = connection
        budget = max(0.0, request.deadline - self.clock())
        return {"id": request.id, "facts": request.facts, "budget": round(budget, 3)}, request.content

    async def _next(self, deadline: float) -> _Request | None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._dispatch()
        try:
            if not waiter.done():
                await asyncio.wait([waiter], timeout=max(0.0, deadline - self.clock()))
        except BaseException:
            if waiter.done() and not waiter.cancelled():   # given a message as this call was cancelled: back in line
                self._queue.appendleft(waiter.result())
                self._dispatch()
            raise
        finally:
            self._last_seen = self.clock()
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return None if waiter.cancelled() else waiter.result()

    async def _answer(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        request_id, action, token = (frame.meta.get(key) for key in ("id", "action", "token"))
        if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_VERDICT_ID:
            raise self._refused(Code.BAD_REQUEST, f"id {show(request_id)} is not a verdict request's id")
        try:
            action = SpamAction(action)
        except ValueError:
            raise self._refused(Code.BAD_REQUEST, f"action {show(action)} is not one of rspamd's") from None
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN:
            raise self._refused(Code.BAD_REQUEST, f"the token must be a string of 1 to {MAX_TOKEN} characters")
        self._last_seen = self.clock()
        request = self._pending.get(request_id)
        if request is None or request.connection is not connection or request.answer.done():
            raise self._refused(NOT_FOUND, f"no message {show(request_id)} waits for this verdict (its time ran "
                                           "out, or it was never asked)")
        request.answer.set_result(VerdictAnswer(action, token, self.clock() - request.asked))
        return {}, b""

    @staticmethod
    def _refused(code: str, message: str) -> RemoteError:
        log.warning("home's verdict_answer refused (%s): %s", code, message)
        return RemoteError(code, message)

    def _watch(self, connection: RpcConnection) -> None:
        """When a home connection closes, the messages handed to it get None at once (not at their budget)."""
        if connection not in self._watched:
            self._watched.add(connection)
            connection.closed.add_done_callback(lambda _: self._lost(connection))

    def _lost(self, connection: RpcConnection) -> None:
        self._watched.discard(connection)
        for request in list(self._pending.values()):
            if request.connection is connection and not request.answer.done():
                request.answer.set_result(None)


def _json_size(facts: dict) -> int:
    return len(json.dumps(facts, separators=(",", ":")))
