"""Home's side of the before-queue verdict: judge the messages edge sessions hold, while their senders wait.

The intake runs a Judge beside its pull loop when intake.toml's [spam]
has `before_queue` (relay/home/intake.py). Over its own authenticated
connection to the edge's spool service (relay/spool/client.py), it keeps
`before_queue_workers` `verdict_wait` calls open; each brings one message
an SMTP session holds (relay/edge/verdict.py). The judge asks rspamd
(relay/home/spam.py) and answers `verdict_answer` with rspamd's action and
`seal_verdict`'s token: home's MAC over the verdict and this very message,
which the edge seals into the message's metadata and the intake checks
after unsealing. Home opens no port for this: the edge never connects here.

What the edge sends is hostile: a message over the intake's
max_message_size (plus the edge's trace header) is not judged, the facts
are read through MessageFacts (which keeps only well-formed values), and a
malformed request is logged and skipped. When rspamd fails, or cannot
answer within the time the edge says its session still waits, the judge
answers nothing: the edge accepts the message without a verdict when its
budget runs out, and the intake judges it after unsealing.
"""

import asyncio
import logging
import random

from relay.home.spam import MessageFacts, SpamFilter, SpamFilterError, seal_verdict
from relay.rpc import RemoteError
from relay.spool.client import TRACE_ROOM, SpoolClient, SpoolProtocolError, VerdictRequest

log = logging.getLogger("yestls.judge")

MAX_DELAY = 60.0   # seconds between reconnection attempts, at most


class Judge:
    def __init__(self, edge: tuple[str, int], identity, spam: SpamFilter, key: bytes, *, workers: int,
                 max_message_size: int, poll: float, timeout: float):
        self.edge = edge
        self.identity = identity
        self.spam = spam
        self.key = key
        self.workers = workers
        self.max_content = max_message_size + TRACE_ROOM   # the edge's Received header comes with the message
        self.poll = poll            # seconds one verdict_wait may hold
        self.timeout = timeout      # seconds per spool request
        self.judged = 0             # verdicts given
        self.skipped = 0            # requests not answered: rspamd failed or too slow, or a malformed request

    async def run(self, stop: asyncio.Event) -> None:
        """Judge until `stop`: connect, serve the workers, reconnect with backoff when the connection ends."""
        delay = 1.0
        host, port = self.edge
        while not stop.is_set():
            client = SpoolClient(host, port, self.identity, timeout=self.timeout)
            try:
                await client.connect()
                log.info("judging messages before the queue for the edge at %s:%d (%d at once)", host, port,
                         self.workers)
                delay = 1.0
                await self._serve(client, stop)
            except (OSError, ConnectionError, asyncio.TimeoutError, RemoteError, SpoolProtocolError) as error:
                # %r: an error message from the edge is its text, and must not start a log line of its own.
                log.warning("verdicts for the edge %s:%d: %r; retrying in %.0fs", host, port,
                            (str(error) or type(error).__name__)[:300], delay)
            finally:
                await client.close()
            try:
                await asyncio.wait_for(stop.wait(), delay * random.uniform(0.5, 1.0))
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, MAX_DELAY)

    async def _serve(self, client: SpoolClient, stop: asyncio.Event) -> None:
        workers = [asyncio.ensure_future(self._worker(client)) for _ in range(self.workers)]
        stopping = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait([*workers, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*workers, stopping):
                task.cancel()
            await asyncio.gather(*workers, stopping, return_exceptions=True)
        for task in done:
            if task is not stopping and not task.cancelled() and task.exception() is not None:
                raise task.exception()

    async def _worker(self, client: SpoolClient) -> None:
        while True:
            try:
                request = await client.verdict_wait(self.poll)
            except SpoolProtocolError as error:
                self.skipped += 1
                log.error("the edge sent a verdict request that is not one: %s", error)
                continue
            if request is not None:
                await self._judge(client, request)

    async def _judge(self, client: SpoolClient, request: VerdictRequest) -> None:
        if len(request.content) > self.max_content:
            self.skipped += 1
            log.error("verdict request %s: %d bytes, over the %d max_message_size allows: not judged",
                      request.id, len(request.content), self.max_content)
            return
        facts = MessageFacts.from_metadata(request.facts)
        patience = self.spam.timeout if request.budget is None else min(self.spam.timeout, request.budget)
        try:
            verdict = await asyncio.wait_for(self.spam.judge(request.content, facts), patience)
        except (SpamFilterError, asyncio.TimeoutError) as error:
            self.skipped += 1
            log.warning("verdict request %s: no verdict within %.1f s (%s): the edge accepts it without one",
                        request.id, patience, str(error) or "rspamd too slow")
            return
        token = seal_verdict(self.key, request.content, verdict)
        try:
            await client.verdict_answer(request.id, verdict.action.value, token)
        except RemoteError as error:
            # not_found: the session stopped waiting (its budget ran out first). The message is judged again
            # after unsealing: nothing is lost.
            log.info("verdict %s for %s not taken by the edge: %s", verdict.action.value, request.id,
                     str(error)[:300])
            return
        self.judged += 1
        log.info("verdict %s (score %.2f / %.2f) for %s", verdict.action.value, verdict.score,
                 verdict.required_score, request.id)
