"""`yestls intake serve`: pull sealed mail from the edges, unseal it at home, deliver it to Dovecot once.

One loop per edge (intake.toml's [edges]), all at once: a slow or
unreachable edge holds up none of the others. Each keeps a long-poll open to
its edge's spool service; for each sealed
message, in order of acceptance, fetch it (several fetches in flight), unseal
it with the home spool key, and deliver it over LMTP with its original
envelope (an alias of the site's address book delivered to its mailboxes).
Per recipient, Dovecot's answer decides: 2xx delivered, 5xx failed (a DSN
goes back to the sender through home's MTA: relay/home/dsn.py,
relay/home/outbox.py), 4xx tried again later with backoff, and failed too
once `give_up_after` has passed since the edge accepted the message. Only when every recipient has a final answer is the message
acknowledged to the edge, which deletes it. The ledger (relay/home/ledger.py)
makes that exactly once across crashes; it is keyed by (edge, spool id), so
no edge's ids can touch another's messages. A sender that delivered the same
message to two edges (its 250 lost on the way back, then a retry to the other
MX) gets it delivered twice: every MTA does the same (RFC 5321 6.1,
duplicates over loss), and the two copies carry different spool ids. A message that cannot be unsealed, or
whose envelope is not fit for LMTP (relay/home/envelope.py), is moved, still
sealed, to the quarantine directory and acknowledged: it never blocks the
queue, is never half-delivered and never silently dropped.

The edge may be compromised: its answers are checked by relay/spool/client.py
(ids, sizes, pieces, how much a listing can hold), and what the client
refuses is a protocol error here: logged once at ERROR, counted in the
status file's `protocol_errors`, and skipped — a listed entry that is not
usable is never fetched, a message whose fetch lied is tried again after
the retry backoff and stays on the edge meanwhile — while the honest
messages around it are delivered. Incoming X-YesTLS-Spool-Id headers are
removed (doveadm finds our deliveries by the one we add), and so are
Authentication-Results headers forged with our name (relay/home/authresults.py).

With `[spam]` configured, every message gets rspamd's verdict
(relay/home/spam.py) before delivery: the one home gave the edge before its
250 when the sealed metadata carries it with home's MAC over this very
message, else a fresh one. rspamd's header fields (its
Authentication-Results among them) and `X-Spam: Yes|No` are added after any
incoming fields of those names are removed; Dovecot's Sieve files
`X-Spam: Yes` into Junk. Spam accepted with a 250 is never refused or
bounced afterwards. When rspamd cannot judge, the message waits on the edge
(retried with the usual backoff) for FILTER_PATIENCE after its arrival, then
is delivered unjudged rather than held hostage by a broken filter (logged,
counted as `unfiltered`).
"""

import asyncio
import json
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field

from relay import daemon
from relay.addressbook import AddressBook, AddressBookError, load
from relay.home import config as intake_config
from relay.home import dsn
from relay.home.authresults import ForgedResultsFilter
from relay.home.doveadm import DeliveryFinder, DoveadmError
from relay.home.envelope import EnvelopeError, envelope_from_metadata
from relay.home.headers import Field, without_fields
from relay.home.judge import Judge
from relay.home.ledger import (
    DELIVERED,
    DELIVERING,
    DONE,
    FAILED,
    IN_DOUBT,
    PENDING,
    QUARANTINED,
    EdgeLedger,
    Entry,
    Ledger,
)
from relay.home.lmtp import LmtpMessage, LmtpSession
from relay.home.outbox import Outbox
from relay.home.spam import (
    OUR_FIELDS,
    MessageFacts,
    SpamFilter,
    SpamFilterError,
    Verdict,
    load_verdict_key,
    open_verdict,
)
from relay.home.tlsrpt import ReportTotals, TlsRptError, read_report
from relay.identity import load_identity
from relay.private_files import write_atomically
from relay.rpc import RemoteError
from relay.spool.client import ListedMessage, Listing, SpoolClient, SpoolProtocolError
from relay.spool.keys import load_spool_private_key
from relay.spool.sealed import SealedError, unseal
from relay.spool.store import validate_id

log = logging.getLogger("yestls.intake")

SPOOL_ID_HEADER = b"X-YesTLS-Spool-Id"
SPOOL_ID_FIELD = SPOOL_ID_HEADER.lower()
REPORTED_PROBLEMS = 10_000   # protocol errors remembered, so that a lie repeated every round is logged once
KEEP_ACKED = 7 * 86400       # seconds the ledger remembers an acknowledged message (a late duplicate is known)
FILTER_PATIENCE = 3600       # seconds after arrival a message waits for rspamd before it is delivered unjudged
# Incoming fields the spam filter's own would be confused with (Authentication-Results: only forged ones go).
_SPAM_FIELDS = frozenset(name.encode() for name in OUR_FIELDS - {"authentication-results"})


@dataclass(frozen=True)
class Prepared:
    """A message unsealed and ready for LMTP."""

    mail_from: str   # checked (relay.home.envelope); "" for the null sender
    recipients: list[str]            # the mailboxes to deliver to
    message: bytes   # with our trace headers
    smtputf8: bool
    arrival: float = 0.0             # when the edge accepted it (its clock)
    addressed: dict[str, str] = field(default_factory=dict)   # mailbox -> the address the sender used
    junk: bool = False               # the spam filter's verdict: delivered with X-Spam: Yes (to Junk)


@dataclass
class Delivery:
    """A message about to go to Dovecot: its ledger entry and the recipients tried now."""

    entry: Entry
    prepared: Prepared
    recipients: list[str]


@dataclass(frozen=True)
class Deferred:
    """A message that cannot be delivered yet, for a reason that will pass: left on the edge, tried later."""

    reason: str


@dataclass
class IntakeStats:
    pulled: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    bounced: int = 0
    quarantined: int = 0
    protocol_errors: int = 0   # answers from the edge that break the spool protocol (each lie counted once)
    judged: int = 0            # messages rspamd judged at delivery
    verdicts_kept: int = 0     # messages delivered with the verdict home gave the edge before its 250
    junked: int = 0            # messages delivered to Junk
    unfiltered: int = 0        # messages delivered unjudged: rspamd failed past FILTER_PATIENCE


@dataclass
class EdgeLink:
    """One edge as the intake sees it: where its spool is, its part of the ledger, its retry schedule."""

    edge: intake_config.Edge
    ledger: EdgeLedger
    lmtp: LmtpSession                      # its messages go to Dovecot over one connection per batch
    retry_at: dict[str, float] = field(default_factory=dict)  # spool id -> when a 4xx'd message may be retried
    failures: dict[str, int] = field(default_factory=dict)    # spool id -> failed rounds so far (the backoff step)
    published: AddressBook | None = None   # the address book this edge has from us
    connected: bool = False
    last_contact: float | None = None
    depth: int | None = None               # what the edge last said its spool held
    oldest_age: float | None = None

    @property
    def name(self) -> str:
        return self.edge.name

    def status(self) -> dict:
        host, port = self.edge.spool
        return {"spool": f"{host}:{port}", "connected": self.connected, "last_contact": self.last_contact,
                "depth": self.depth, "oldest_age": self.oldest_age, "retrying": len(self.retry_at)}


class Intake:
    def __init__(self, config: intake_config.IntakeConfig):
        self.config = config
        self.identity = load_identity(config.identity_key)
        self.private_key = load_spool_private_key(config.spool_key)
        self.ledger = Ledger(config.ledger, first_edge=config.edges[0].name)
        self.finder = DeliveryFinder(config.doveadm_url, config.doveadm_api_key) if config.doveadm_url else None
        self.auth = ForgedResultsFilter(config.authserv_id)
        self.spam = (SpamFilter(config.spam.rspamd, config.spam.timeout, config.authserv_id)
                     if config.spam is not None else None)
        self.verdict_key = load_verdict_key(config.spam.verdict_key) if config.spam is not None else None
        self.stats = IntakeStats()
        self.links = {edge.name: EdgeLink(edge, self.ledger.edge(edge.name),
                                          LmtpSession(config.lmtp, lhlo=config.authserv_id))
                      for edge in config.edges}
        for link in self.links.values():
            for spool_id, (when, tries) in link.ledger.waiting_retries().items():   # the schedule survives restarts
                link.retry_at[spool_id], link.failures[spool_id] = when, max(tries, 1)
        self._reported: set[tuple[str, str]] = set()      # (edge, protocol error) logged already
        self._status_written = 0.0
        self._pruned = 0.0
        self._housekeeping_lock = asyncio.Lock()   # the edges' loops share the outbox and the pruning
        config.quarantine.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.book: AddressBook | None = None
        self._book_stamp: tuple | None = None
        if config.addresses is not None:
            self._load_book()
            if self.book is None:
                raise AddressBookError(f"{config.addresses}: no valid address book (see the log line above)")
        self.outbox = (Outbox(config.outbox, config.bounce_relay, config.authserv_id)
                       if config.bounce_relay is not None else None)
        self.tls_reports = _previous_tls_reports(config.status_file) if config.tls_reports else None
        # Each edge's sessions ask home for a verdict before their 250 (relay/home/judge.py): a connection each.
        self.judges = ([Judge(edge.spool, self.identity, self.spam, self.verdict_key,
                              workers=config.spam.before_queue_workers, max_message_size=config.max_message_size,
                              poll=config.poll, timeout=config.timeout) for edge in config.edges]
                       if config.spam is not None and config.spam.before_queue else [])

    # --- the loop -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Pull from every edge and deliver until `stop`; with [spam] before_queue, the before-queue judges
        run beside them."""
        judging = [asyncio.ensure_future(judge.run(stop)) for judge in self.judges]
        try:
            await asyncio.gather(*(self._pull(link, stop) for link in self.links.values()))
        finally:
            for task in judging:
                task.cancel()
            await asyncio.gather(*judging, return_exceptions=True)

    async def _pull(self, link: EdgeLink, stop: asyncio.Event) -> None:
        delay = 1.0
        host, port = link.edge.spool
        while not stop.is_set():
            client = SpoolClient(host, port, self.identity, timeout=self.config.timeout,
                                 max_size=self.config.max_sealed_size)
            try:
                await client.connect()
                log.info("connected to the edge %s's spool at %s:%d", link.name, host, port)
                delay = 1.0
                link.published = None   # a new connection: the edge may have restarted
                link.connected = True
                await self._serve(link, client, stop)
            except SpoolProtocolError as error:
                self._protocol_error(link, str(error))
                log.warning("edge %s spool %s:%d: reconnecting in %.0fs", link.name, host, port, delay)
            except (OSError, ConnectionError, asyncio.TimeoutError, RemoteError) as error:
                # %r: an error message from the edge is its text, and must not start a log line of its own.
                log.warning("edge %s spool %s:%d: %r; retrying in %.0fs", link.name, host, port,
                            (str(error) or type(error).__name__)[:300], delay)
            finally:
                link.connected = False
                await client.close()
            self._write_status()
            try:
                await asyncio.wait_for(stop.wait(), delay * random.uniform(0.5, 1.0))
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, 60.0)

    async def _serve(self, link: EdgeLink, client: SpoolClient, stop: asyncio.Event) -> None:
        said_ready, newest = False, None
        while not stop.is_set():
            await self._publish_addresses(link, client)
            listing = await client.list()
            self._contact(link, await client.stats())
            self._take_listing(link, listing)
            now = time.time()
            due = [m for m in listing.messages if link.retry_at.get(m.id, 0) <= now]
            await self._process_in_order(link, client, due)
            await self._housekeeping()
            self._write_status()
            # Long-poll: back at once when new mail arrives, or when a retry is due.
            retry_in = min((t - time.time() for t in link.retry_at.values()), default=self.config.poll)
            timeout = max(0.05, min(self.config.poll, retry_in))
            if said_ready and not due and listing.last_id == newest:
                # The edge said mail newer than `newest` was waiting, and the listing shows none (a lie, or
                # a listing cut short before it): do not ask again at once, round after round.
                said_ready = False
                await _pause(stop, timeout)
                continue
            newest = listing.last_id
            said_ready = await self._wait(client, newest, timeout, stop)

    async def _wait(self, client: SpoolClient, after: str | None, timeout: float, stop: asyncio.Event) -> bool:
        """The edge's long-poll, cut short by `stop`; whether it said that mail is ready."""
        waiting = asyncio.ensure_future(client.wait(after, timeout))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
        for task in (waiting, stopping):
            task.cancel()
        if waiting.done() and not waiting.cancelled():
            if waiting.exception() is not None:
                raise waiting.exception()
            return waiting.result()
        return False

    def _take_listing(self, link: EdgeLink, listing: Listing) -> None:
        """Report what the client left out of the listing; forget retry times of messages no longer listed;
        a finished message the edge no longer lists is acknowledged (its answer to our ack was lost)."""
        for problem in listing.refused:
            self._protocol_error(link, problem)
        if listing.complete:
            listed = {m.id for m in listing.messages}
            for spool_id in [i for i in link.retry_at if i not in listed]:
                del link.retry_at[spool_id]
                link.failures.pop(spool_id, None)
            if not listing.refused:
                # Else the row would never be pruned. A lying edge gains nothing: a message it lists again is
                # still done in the ledger, and acknowledged rows are kept KEEP_ACKED either way.
                gone = [i for i in link.ledger.finished_unacked() if i not in listed]
                if gone:
                    link.ledger.mark_acked(gone)
                    log.info("edge %s: %d finished message(s) no longer listed: taken as acknowledged (the "
                             "answer to the ack was lost)", link.name, len(gone))

    def _protocol_error(self, link: EdgeLink, problem: str) -> None:
        if (link.name, problem) in self._reported:
            return
        if len(self._reported) >= REPORTED_PROBLEMS:
            self._reported.clear()
        self._reported.add((link.name, problem))
        self.stats.protocol_errors += 1
        log.error("edge %s spool protocol error: %s", link.name, problem)

    async def _process_in_order(self, link: EdgeLink, client: SpoolClient, messages: list[ListedMessage]) -> None:
        """Fetch several at once, deliver strictly in the edge's order of acceptance."""
        upcoming = iter(messages)
        fetching: deque = deque()  # at most `in_flight` fetched ahead: a backlog is not all in memory

        async def fetch_and_prepare(message: ListedMessage) -> tuple[bytes | None, Prepared | Deferred | Exception]:
            try:
                sealed = await client.fetch(message.id, message.size)
            except (SpoolProtocolError, RemoteError) as error:
                return None, error   # this message only: the others are still fetched and delivered
            return sealed, await self.prepare(message.id, sealed)

        def top_up() -> None:
            # Fetching, unsealing and the SPF/DKIM/DMARC checks of the next
            # messages overlap with the delivery of this one.
            while len(fetching) < self.config.in_flight and (message := next(upcoming, None)) is not None:
                fetching.append((message, asyncio.ensure_future(fetch_and_prepare(message))))

        top_up()
        acks: list[tuple[str, asyncio.Future]] = []  # in flight while the next messages are delivered
        try:
            while fetching:
                # A run: the next message (waited for) and those behind it already fetched, in order: one
                # LMTP batch and two ledger commits for all of them (_process_run).
                run: list[tuple[str, bytes, Prepared | Deferred | Exception]] = []
                while fetching and (not run or fetching[0][1].done()):
                    message, fetch = fetching.popleft()
                    sealed, prepared = await fetch
                    if sealed is None:
                        self._fetch_failed(link, message.id, prepared)
                    else:
                        self.stats.pulled += 1
                        run.append((message.id, sealed, prepared))
                top_up()
                for spool_id in await self._process_run(link, run):
                    acks.append((spool_id, asyncio.ensure_future(client.ack(spool_id))))
                if time.time() - self._status_written > 2:
                    self._write_status()  # a long backlog shows its progress
        finally:
            for _, fetch in fetching:
                fetch.cancel()
            await link.lmtp.close()   # no connection held while the edge is idle; the next batch opens one
            results = await asyncio.gather(*(ack for _, ack in acks), return_exceptions=True)
            # Unacknowledged ones are listed again next time; done in the ledger, they are not redelivered.
            link.ledger.mark_acked([i for (i, _), r in zip(acks, results) if not isinstance(r, BaseException)])

    def _fetch_failed(self, link: EdgeLink, spool_id: str, error: Exception) -> None:
        """The edge's answers for this message did not add up, or it refused: leave it there, try later."""
        if isinstance(error, SpoolProtocolError):
            self._protocol_error(link, str(error))
        else:
            log.warning("%s: the edge %s refused to send it (%r); will retry", spool_id, link.name, str(error)[:300])
        self._try_later(link, spool_id)

    def _try_later(self, link: EdgeLink, spool_id: str) -> float:
        """Leave the message on the edge; list it again after the next backoff step (returned: when)."""
        link.failures[spool_id] = failures = link.failures.get(spool_id, 0) + 1
        link.retry_at[spool_id] = when = time.time() + self.config.retry[min(failures, len(self.config.retry)) - 1]
        self.stats.retried += 1
        return when

    # --- one message ------------------------------------------------------------

    async def prepare(self, spool_id: str, sealed: bytes) -> "Prepared | Deferred | Exception":
        """Unseal, judge and add the trace headers; Deferred to try later; the reason it cannot be, for the
        quarantine."""
        try:
            opened = unseal(sealed, self.private_key)
            if opened.spool_id.hex() != spool_id:
                raise SealedError(f"the file's spool id {opened.spool_id.hex()} is not {spool_id}")
            envelope = envelope_from_metadata(opened.metadata)
        except (SealedError, EnvelopeError) as error:
            return error
        arrival = opened.metadata.get("received_at")
        arrival = float(arrival) if isinstance(arrival, (int, float)) and not isinstance(arrival, bool) else time.time()
        message, forged = without_spool_id_headers(opened.message)
        if forged:
            log.warning("%s: removed %d incoming X-YesTLS-Spool-Id header(s): only home writes it; first: %r",
                        spool_id, len(forged), forged[0].raw[:200])
        message = self.auth.without_forged_results(message)
        added = b""
        verdict = None
        if self.spam is not None:
            message, _ = without_fields(message, lambda field: field.name in _SPAM_FIELDS)
            verdict = await self._verdict(spool_id, opened.message, message, opened.metadata, arrival)
            if isinstance(verdict, Deferred):
                return verdict
            added = verdict.header_block() if verdict is not None else b""
        message = SPOOL_ID_HEADER + b": " + spool_id.encode() + b"\r\n" + added + message
        addressed = self._mailboxes_for(envelope.recipients)
        return Prepared(envelope.mail_from, list(addressed), message, envelope.smtputf8, arrival, addressed,
                        junk=verdict is not None and verdict.junk)

    async def _verdict(self, spool_id: str, sealed_message: bytes, message: bytes, metadata: dict,
                       arrival: float) -> "Verdict | Deferred | None":
        """The spam verdict: home's own from before the 250 if the metadata carries it for exactly the
        message that was sealed, else rspamd's now; None (deliver unjudged) once rspamd failed too long."""
        claimed = metadata.get("verdict")
        token = claimed.get("token") if isinstance(claimed, dict) else None
        verdict = open_verdict(self.verdict_key, token, sealed_message) if token is not None else None
        if verdict is not None:
            self.stats.verdicts_kept += 1
            return verdict
        if token is not None:
            log.warning("%s: the verdict the edge carried does not verify for this message: judging it again",
                        spool_id)
        try:
            verdict = await self.spam.judge(message, MessageFacts.from_metadata(metadata, spool_id))
        except SpamFilterError as error:
            if time.time() - arrival < FILTER_PATIENCE:
                return Deferred(f"the spam filter: {error}")
            log.error("%s: delivered WITHOUT a spam verdict: rspamd has failed for over %d s (%s)", spool_id,
                      FILTER_PATIENCE, error)
            self.stats.unfiltered += 1
            return None
        self.stats.judged += 1
        log.info("%s: spam verdict %s (score %.2f of %.2f)", spool_id, verdict.action.value, verdict.score,
                 verdict.required_score)
        return verdict

    def _mailboxes_for(self, recipients) -> dict[str, str]:
        """{mailbox: the address the sender used} for the envelope's recipients (aliases expanded, plus
        forms and catch-alls resolved); an address the book does not know is delivered as it is (Dovecot
        decides: the edge may have accepted it under an older book)."""
        addressed: dict[str, str] = {}
        for recipient in recipients:
            mailboxes = self.book.deliver_to(recipient) if self.book is not None else ()
            for mailbox in mailboxes or (recipient,):
                addressed.setdefault(mailbox, recipient)
        return addressed

    async def _process_run(self, link: EdgeLink, run: list[tuple[str, bytes, "Prepared | Deferred | Exception"]]
                           ) -> list[str]:
        """Deliver a run of this edge's messages as far as possible, in order; the ids that may be
        acknowledged. Two ledger commits for the whole run: the in-doubt marks before Dovecot can have any of
        them, the answers after; between them one pipelined LMTP batch. No await inside a commit: the edges'
        loops share the ledger's connection."""
        finished: list[str] = []
        ready: list[Delivery] = []
        for spool_id, sealed, prepared in run:
            step = await self._before_delivery(link, spool_id, sealed, prepared)
            if isinstance(step, Delivery):
                ready.append(step)
            elif step:
                finished.append(spool_id)
        if not ready:
            return finished
        with link.ledger.commit():
            for delivery in ready:
                for recipient in delivery.recipients:
                    delivery.entry.recipients[recipient].status = IN_DOUBT
                    delivery.entry.recipients[recipient].attempts += 1
                link.ledger.save(delivery.entry)   # durable before Dovecot can have the message
        outcome = await link.lmtp.deliver_batch([
            LmtpMessage(d.prepared.mail_from, tuple(d.recipients), d.prepared.message, d.prepared.smtputf8)
            for d in ready])
        with link.ledger.commit():
            for index, delivery in enumerate(ready):
                if index < len(outcome.replies):
                    self._record(link, delivery.entry, outcome.replies[index])
                else:
                    # Nothing reached Dovecot for sure? A dropped connection after the content could have;
                    # the in-doubt marks make the next try ask first.
                    log.warning("%s: LMTP failed (%s); will retry", delivery.entry.spool_id, outcome.error)
                    self._schedule_retry(link, delivery.entry)
                if self._after_delivery(link, delivery):
                    finished.append(delivery.entry.spool_id)
        return finished

    async def _before_delivery(self, link: EdgeLink, spool_id: str, sealed: bytes,
                               prepared: "Prepared | Deferred | Exception") -> "Delivery | bool":
        """What this message needs: a Delivery of its pending recipients, or True when it may be acknowledged
        (finished before, quarantined now), False when it waits (deferred, or a doubt Dovecot cannot settle
        now)."""
        entry = link.ledger.get(spool_id)
        if entry is not None and entry.state in (DONE, QUARANTINED):
            return True  # finished before a crash, not yet acknowledged: do not deliver again
        if isinstance(prepared, Deferred):
            log.warning("%s: not delivered yet: %s; will retry", spool_id, prepared.reason)
            self._try_later(link, spool_id)
            return False
        if isinstance(prepared, Exception):
            self._quarantine(link, spool_id, sealed, prepared)
            return True
        entry = link.ledger.start(spool_id, prepared.recipients)
        if entry.state != DELIVERING:
            return True
        if not await self._settle_in_doubt(link.ledger, entry):
            self._schedule_retry(link, entry)
            return False
        delivery = Delivery(entry, prepared, entry.pending())
        if delivery.recipients:
            return delivery
        return self._after_delivery(link, delivery)   # every answer known already (a crash before DONE)

    def _after_delivery(self, link: EdgeLink, delivery: "Delivery") -> bool:
        """Give up on, bounce and finish the message as its answers say; True when it may be acknowledged."""
        entry, prepared = delivery.entry, delivery.prepared
        if not entry.final() and time.time() - prepared.arrival > self.config.give_up_after:
            self._give_up(link.ledger, entry)
        if not entry.final():
            return False
        if entry.state != DONE:
            self._bounce(entry, prepared)   # before DONE: a crash in between bounces on the next try
            entry.state = DONE
            link.ledger.save(entry)
        link.retry_at.pop(entry.spool_id, None)
        link.failures.pop(entry.spool_id, None)
        self._read_tls_report(entry.spool_id, prepared)
        self.stats.junked += prepared.junk
        delivered = sum(r.status == DELIVERED for r in entry.recipients.values())
        log.info("%s: delivered to %d of %d recipient(s)", entry.spool_id, delivered, len(entry.recipients))
        return True

    async def _settle_in_doubt(self, ledger: EdgeLedger, entry: Entry) -> bool:
        """Recipients whose delivery may have happened before a crash: ask Dovecot, don't guess.

        False when Dovecot cannot be asked now: better late than twice.
        """
        doubtful = [r for r, info in entry.recipients.items() if info.status == IN_DOUBT]
        for recipient in doubtful:
            if self.finder is None:
                log.warning("%s: delivery to %s in doubt and no doveadm_url to check: delivering again "
                            "(configure doveadm for exactly-once)", entry.spool_id, recipient)
                found = False
            else:
                try:
                    found = await self.finder.delivered(recipient, entry.spool_id)
                except DoveadmError as error:
                    log.warning("%s: cannot check %s's mailbox (%s); will retry", entry.spool_id, recipient, error)
                    return False
            entry.recipients[recipient].status = DELIVERED if found else PENDING
            if found:
                log.info("%s: already in %s's mailbox (delivered before a crash)", entry.spool_id, recipient)
        if doubtful:
            ledger.save(entry)
        return True

    def _record(self, link: EdgeLink, entry: Entry, replies: dict) -> None:
        """Dovecot's answer for each recipient, into the entry (saved; a retry scheduled while some wait)."""
        for recipient, reply in replies.items():
            info = entry.recipients[recipient]
            info.reply = str(reply)[:500]
            if 200 <= reply.code < 300:
                info.status = DELIVERED
                self.stats.delivered += 1
            elif reply.code >= 500:
                info.status = FAILED
                self.stats.failed += 1
                log.warning("%s: %s refused permanently: %s", entry.spool_id, recipient, reply)
            else:
                info.status = PENDING
                log.info("%s: %s deferred: %s", entry.spool_id, recipient, reply)
        if entry.final() and not any(info.status == FAILED for info in entry.recipients.values()):
            entry.state = DONE  # recorded with the replies: one commit (a failure is bounced first: _after_delivery)
        link.ledger.save(entry)
        if not entry.final():
            self._schedule_retry(link, entry)

    def _give_up(self, ledger: EdgeLedger, entry: Entry) -> None:
        """Temporary failures for longer than give_up_after: they are failures (and bounced)."""
        days = self.config.give_up_after / 86400
        for recipient in entry.pending():
            info = entry.recipients[recipient]
            info.status = FAILED
            info.reply = f"451 4.4.7 Delivery time expired after {days:g} days (last: {info.reply or 'no answer'})"
            self.stats.failed += 1
            log.warning("%s: %s given up after %g days", entry.spool_id, recipient, days)
        ledger.save(entry)

    def _bounce(self, entry: Entry, prepared: Prepared) -> None:
        """A DSN to the sender for the recipients that failed, into the outbox (sent by _housekeeping)."""
        # As the sender wrote it: an alias's mailbox is the site's business, in the reply text too.
        failed = [(prepared.addressed.get(mailbox, mailbox),
                   info.reply.replace(mailbox, prepared.addressed.get(mailbox, mailbox)))
                  for mailbox, info in entry.recipients.items() if info.status == FAILED]
        if not failed:
            return
        domains = self.book.domains if self.book is not None else frozenset()
        to = dsn.bounce_to(prepared.mail_from, domains)
        if to is None or self.outbox is None or prepared.junk:
            # Spam's sender is most likely forged: a DSN to it would be backscatter.
            log.info("%s: no DSN (%s)", entry.spool_id, "judged spam" if prepared.junk else
                     "no bounce_relay configured" if to else "null or local sender")
            return
        failures = [(address, _reply_code(reply), reply[4:]) for address, reply in dict(failed).items()]
        # From the domain the sender wrote to (its DKIM signature then aligns with what they expect).
        addressed = failed[0][0].rpartition("@")[2].lower()
        postmaster_domain = addressed if addressed in domains else min(domains, default=self.config.authserv_id)
        message = dsn.build(to=to, reporting_mta=self.config.authserv_id,
                            postmaster=f"MAILER-DAEMON@{postmaster_domain}",
                            original=prepared.message, arrival=prepared.arrival, failures=failures)
        self.outbox.put(entry.spool_id, to, message)
        self.stats.bounced += 1
        log.info("%s: DSN to %s for %d recipient(s) queued", entry.spool_id, to, len(failures))

    def _read_tls_report(self, spool_id: str, prepared: Prepared) -> None:
        """Mail to the TLS-RPT address, once delivered: its report added to the totals (delivery unchanged)."""
        if self.tls_reports is None:
            return
        addresses = {a.lower() for a in (*prepared.addressed, *prepared.addressed.values())}
        if self.config.tls_reports not in addresses:
            return
        try:
            report = read_report(prepared.message)
        except TlsRptError as error:
            self.tls_reports.malformed += 1
            log.warning("%s: mail to %s is not a TLS report we can read (%s); delivered as it is",
                        spool_id, self.config.tls_reports, error)
            return
        self.tls_reports.add(report, time.time())
        log.info("%s: TLS report %r from %r: %d session(s) successful, %d failed%s", spool_id, report.report_id,
                 report.organization, report.successful, report.failed,
                 "".join(f", {k} {v}" for k, v in sorted(report.failures().items())))

    # --- around the messages ----------------------------------------------------------

    def _load_book(self) -> None:
        """(Re)read the address book when its file changed; a broken file keeps the book in force."""
        path = self.config.addresses
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError as error:
            log.error("address book %s: %s; keeping the one in force", path, error)
            return
        if stamp == self._book_stamp:
            return
        try:
            self.book = load(path)
        except AddressBookError as error:
            log.error("%s; keeping the address book in force", error)
            return
        self._book_stamp = stamp
        log.info("address book: %d mailboxes, %d aliases", len(self.book.mailboxes), len(self.book.aliases))

    async def _publish_addresses(self, link: EdgeLink, client: SpoolClient) -> None:
        """The edge accepts at RCPT what the address book names: give it the book when it is new to it."""
        if self.config.addresses is None:
            return
        self._load_book()
        if self.book is None or self.book == link.published:
            return
        try:
            await client.publish_addresses(self.book.to_json())
        except RemoteError as error:
            log.warning("the edge %s did not take the address book (%r); it keeps what it had", link.name,
                        str(error)[:300])
            return
        link.published = self.book
        log.info("address book published to the edge %s", link.name)

    async def _housekeeping(self) -> None:
        """DSNs out to home's MTA; the ledger's old acknowledged rows pruned (hourly). One edge's loop at a
        time: the others skip it (it is done for all)."""
        if self._housekeeping_lock.locked():
            return
        async with self._housekeeping_lock:
            if self.outbox is not None and self.outbox.waiting():
                await asyncio.get_running_loop().run_in_executor(None, self.outbox.send_all)
            if time.time() - self._pruned > 3600:
                self._pruned = time.time()
                self.ledger.forget_acked_before(KEEP_ACKED)

    def _schedule_retry(self, link: EdgeLink, entry: Entry) -> None:
        # Each failed round (LMTP 4xx, Dovecot unreachable, doveadm unreachable) waits longer.
        entry.next_attempt = self._try_later(link, entry.spool_id)
        link.ledger.save(entry)

    def _quarantine(self, link: EdgeLink, spool_id: str, sealed: bytes, error: Exception) -> None:
        # One directory per edge (a name checked by the config); an id names no other path.
        path = self.config.quarantine / link.name / f"{validate_id(spool_id)}.sealed"
        path.parent.mkdir(exist_ok=True, mode=0o700)
        write_atomically(path, sealed)
        link.ledger.save(Entry(spool_id, QUARANTINED))
        self.stats.quarantined += 1
        log.error("%s: QUARANTINED, not delivered: %s; the sealed file is kept at %s", spool_id, error, path)

    # --- status -----------------------------------------------------------------

    def _contact(self, link: EdgeLink, edge_stats: dict) -> None:
        link.last_contact = time.time()
        link.depth = edge_stats.get("depth")   # numbers only (SpoolClient.stats)
        link.oldest_age = edge_stats.get("oldest_age")

    def _write_status(self) -> None:
        """The status file `yestls status` reads: what the intake knows, as of now."""
        self._status_written = time.time()
        status = {"updated": self._status_written, **vars(self.stats), "ledger": self.ledger.counts(),
                  "edges": {name: link.status() for name, link in self.links.items()},
                  "retrying": sum(len(link.retry_at) for link in self.links.values()),
                  "outbox": len(self.outbox.waiting()) if self.outbox else 0}
        if self.tls_reports is not None:
            status["tls_reports"] = self.tls_reports.to_json()
        write_atomically(self.config.status_file, json.dumps(status).encode())


def _previous_tls_reports(status_file) -> ReportTotals:
    """The TLS report totals the last run wrote: reports come once a day, a restart must not forget them."""
    try:
        return ReportTotals.from_json(json.loads(status_file.read_text()).get("tls_reports"))
    except (OSError, ValueError, AttributeError):
        return ReportTotals()


def _reply_code(reply: str) -> int:
    """The code of a reply as the ledger keeps it ("550 5.1.1 ..."); 500 if it has none."""
    return int(reply[:3]) if reply[:3].isdigit() else 500


def without_spool_id_headers(message: bytes) -> tuple[bytes, list[Field]]:
    """The message without any X-YesTLS-Spool-Id field (any case, folding, line ends); and those removed.

    Ours is the one doveadm looks up to tell whether a message is already in a
    mailbox (relay/home/doveadm.py): one that came with the message must never
    reach Dovecot.
    """
    return without_fields(message, lambda field: field.name == SPOOL_ID_FIELD)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def serve(config: intake_config.IntakeConfig) -> None:
    intake = Intake(config)
    stop = daemon.stop_event()
    log.info("intake pulling from %s, delivering to %s",
             ", ".join(f"{edge.name} ({edge.spool[0]}:{edge.spool[1]})" for edge in config.edges), config.lmtp)
    try:
        await intake.run(stop)
    finally:
        intake.ledger.close()


def run(args) -> int:
    return daemon.run("intake", lambda: intake_config.load(args.config), serve,
                      (intake_config.ConfigError, ValueError, OSError))
