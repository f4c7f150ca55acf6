"""The before-queue verdict at the edge ([verdict] in edge.toml, relay/edge/verdict.py, relay/edge/handler.py).

A real edge process with [verdict]; home is played by this process over a
real spool connection (SpoolClient, home's identity key), answering
verdict requests as each test needs: at once, late, never, by closing the
connection, or wrongly. The tokens are real (relay.home.spam.seal_verdict).
The desk's queue limit is checked in-process over the real spool service.
Every wait is bounded; nothing asserts how long anything took.
"""

import asyncio
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from relay.audit import AuditLog
from relay.config import ConfigError
from relay.edge import config as edge_config
from relay.edge.verdict import PlaintextBuffer, VerdictDesk, VerdictOutcome, VerdictSettings
from relay.edge.worker_metrics import REPORT_EVERY
from relay.home.spam import MAX_TOKEN, SpamAction, Verdict, open_verdict, seal_verdict
from relay.rpc import Code, RemoteError
from relay.spool.client import SpoolClient
from relay.spool.keys import generate_spool_key, parse_spool_public_key
from relay.spool.service import NOT_FOUND, SpoolService
from relay.spool.store import Spool
from relay.status import edge_rows
from relay.tunnel import Peer

from ..edge_site import make_edge_site
from ..edge_smtp import CLIENT_NAME, SmtpClient, queued_id, running_edge, wait_until

BUDGET = 1.5
MAX_SIZE = 8192
TIMEOUT = 20.0
SENDER = "a@sender.example.net"
RECIPIENT = "user@example.org"


def message(text: str, size: int = 0) -> bytes:
    body = (text + "\r\n") + ("x" * 70 + "\r\n") * (size // 72)
    return f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: {text}\r\n\r\n{body}".encode()


# --- home, played here ---------------------------------------------------------------------------

@dataclass
class Seen:
    id: str
    facts: dict
    content: bytes


@dataclass
class Home:
    """A home judging over a real spool connection, in its own thread: `decide(seen)` says what to do with each."""

    port: int
    identity: Ed25519PrivateKey
    decide: object
    key: bytes = field(default_factory=lambda: os.urandom(32))
    seen: list[Seen] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)   # RPC error codes the edge answered our answers with

    def token(self, content: bytes, action: SpamAction) -> str:
        return seal_verdict(self.key, content, Verdict(action, 1000.0 if action == SpamAction.REJECT else 0.0, 15.0))

    async def serve(self, stop: asyncio.Event, workers: int) -> None:
        client = SpoolClient("127.0.0.1", self.port, self.identity, timeout=5)
        await client.connect()
        self.connected.set()

        async def worker():
            while True:
                request = await client.verdict_wait(2)
                if request is None:
                    continue
                seen = Seen(request.id, request.facts, request.content)
                self.seen.append(seen)
                await self.decide(self, client, seen)

        tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
        await asyncio.wait([asyncio.ensure_future(stop.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()

    async def answer(self, client: SpoolClient, request_id: str, action, token) -> None:
        try:
            await client.verdict_answer(request_id, action, token)
        except RemoteError as error:
            self.errors.append(error.code)


def answering(action: SpamAction, delay: float = 0.0):
    async def decide(home: Home, client: SpoolClient, seen: Seen) -> None:
        await asyncio.sleep(delay)
        await home.answer(client, seen.id, action.value, home.token(seen.content, action))
    return decide


async def dropping(home: Home, client: SpoolClient, seen: Seen) -> None:
    await client.close()   # the connection holding the message closes: the session must not wait out its budget
    raise ConnectionError("closed on purpose")


@contextmanager
def home_judging(edge, decide, workers: int = 2):
    home = Home(edge.site.spool_service_port, edge.site.home_identity, decide)
    home.connected = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    def run():
        try:
            loop.run_until_complete(home.serve(stop, workers))
        except BaseException as error:  # noqa: BLE001 - reported to the test
            failure.append(error)
            home.connected.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert home.connected.wait(TIMEOUT) and not failure, failure
    wait_until(lambda: edge.metric("yestls_edge_verdict_home_present") == 1, TIMEOUT, "home present at the edge",
               edge.log)
    try:
        yield home
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(TIMEOUT)
        loop.close()


def home_gone(edge) -> None:
    """Until the edge no longer counts a home as present (its grace after the last verdict_wait)."""
    wait_until(lambda: edge.metric("yestls_edge_verdict_home_present") == 0, TIMEOUT, "no home present", edge.log)


# --- the edge ------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-workers"])
def edge(pki, tmp_path_factory, request):
    """The edge in one process, then with two worker processes (relay/edge/verdict_link.py: the sessions in
    the workers ask the supervisor's desk). A worker's counts reach the metrics page within a second."""
    section = f"[verdict]\nbudget = {BUDGET}\nmax_size = {MAX_SIZE}\n"
    with running_edge(tmp_path_factory.mktemp("verdict"), pki, top_options=section,
                      smtp_options=f"max_connections_per_ip = 100\nworkers = {request.param}\n") as running:
        running.workers = request.param
        yield running


def outcome(edge, name: VerdictOutcome) -> float:
    """The count so far, once every worker's last counts reached the supervisor (relay/edge/worker_metrics.py)."""
    if edge.workers > 1:
        time.sleep(2 * REPORT_EVERY + 0.2)
    return edge.metric("yestls_edge_verdict_total", outcome=name.value)


def counted(edge, name: VerdictOutcome, check) -> None:
    """Until the metrics page's count for `name` passes `check` (a worker's counts arrive within a second)."""
    wait_until(lambda: check(edge.metric("yestls_edge_verdict_total", outcome=name.value)), TIMEOUT,
               f"the {name.value} count", edge.log)


def deliver(edge, content: bytes, mail_options: str = ""):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        return client.deliver(SENDER, [RECIPIENT], content, mail_options)


def spooled(edge) -> int:
    return len(edge.site.spooled_files())


def test_reject_is_refused_550_and_nothing_is_stored(edge):
    before, rejected = spooled(edge), outcome(edge, VerdictOutcome.REJECTED)
    with home_judging(edge, answering(SpamAction.REJECT)) as home:
        reply = deliver(edge, message("spam"))
    assert reply.code == 550 and reply.enhanced == "5.7.1", reply
    assert spooled(edge) == before and not edge.tmp_files()
    counted(edge, VerdictOutcome.REJECTED, lambda n: n == rejected + 1)
    wait_until(lambda: edge.metric("yestls_edge_refused_total", reason="verdict_rejected") >= 1, TIMEOUT,
               "the refusal counted", edge.log)
    [seen] = home.seen
    assert seen.facts == {"mail_from": SENDER, "rcpt_tos": [RECIPIENT], "client_address": seen.facts["client_address"],
                          "helo": CLIENT_NAME}
    assert seen.facts["client_address"].startswith("127.0.0.1:")
    assert seen.content.startswith(b"Received: from " + CLIENT_NAME.encode())
    assert seen.content.endswith(message("spam"))


def test_soft_reject_is_deferred_451(edge):
    before = spooled(edge)
    with home_judging(edge, answering(SpamAction.SOFT_REJECT)):
        reply = deliver(edge, message("maybe spam"))
    assert reply.code == 451 and reply.enhanced == "4.7.1", reply
    assert spooled(edge) == before
    counted(edge, VerdictOutcome.DEFERRED, lambda n: n >= 1)


def test_no_action_is_accepted_with_a_token_home_verifies(edge):
    content = message("ham")
    with home_judging(edge, answering(SpamAction.NO_ACTION)) as home:
        reply = deliver(edge, content)
    unsealed = edge.unseal(queued_id(reply))
    assert unsealed.message.endswith(content)
    assert unsealed.message == home.seen[0].content   # judged exactly what was sealed
    assert set(unsealed.metadata["verdict"]) == {"action", "token"}
    assert unsealed.metadata["verdict"]["action"] == "no action"
    verdict = open_verdict(home.key, unsealed.metadata["verdict"]["token"], unsealed.message)
    assert verdict is not None and verdict.action == SpamAction.NO_ACTION
    assert open_verdict(home.key, unsealed.metadata["verdict"]["token"], unsealed.message + b"x") is None
    counted(edge, VerdictOutcome.ACCEPTED, lambda n: n >= 1)


def test_add_header_is_accepted_with_its_verdict(edge):
    with home_judging(edge, answering(SpamAction.ADD_HEADER)) as home:
        reply = deliver(edge, message("junk"))
    unsealed = edge.unseal(queued_id(reply))
    verdict = open_verdict(home.key, unsealed.metadata["verdict"]["token"], unsealed.message)
    assert verdict.action == SpamAction.ADD_HEADER and verdict.junk


def test_without_a_home_the_message_is_accepted_without_asking(edge):
    home_gone(edge)
    absent = outcome(edge, VerdictOutcome.HOME_ABSENT)
    reply = deliver(edge, message("nobody home"))
    unsealed = edge.unseal(queued_id(reply))
    assert "verdict" not in unsealed.metadata
    counted(edge, VerdictOutcome.HOME_ABSENT, lambda n: n == absent + 1)


def test_a_home_slower_than_the_budget_gets_not_found_and_the_message_is_accepted(edge):
    no_answer = outcome(edge, VerdictOutcome.NO_ANSWER)
    with home_judging(edge, answering(SpamAction.REJECT, delay=BUDGET + 1)) as home:
        reply = deliver(edge, message("slow home"))
        wait_until(lambda: home.errors, TIMEOUT, "the late answer refused")
    unsealed = edge.unseal(queued_id(reply))   # accepted: a late reject changes nothing
    assert "verdict" not in unsealed.metadata
    assert home.errors == [NOT_FOUND]
    counted(edge, VerdictOutcome.NO_ANSWER, lambda n: n == no_answer + 1)
    assert "home's verdict_answer refused (not_found)" in edge.log()


def test_a_home_that_disconnects_mid_request_does_not_hold_the_session(edge):
    gone = outcome(edge, VerdictOutcome.HOME_GONE)
    with home_judging(edge, dropping, workers=1):
        reply = deliver(edge, message("home leaves"))
    unsealed = edge.unseal(queued_id(reply))
    assert "verdict" not in unsealed.metadata
    counted(edge, VerdictOutcome.HOME_GONE, lambda n: n == gone + 1)


def test_a_declared_size_over_max_size_is_sealed_as_it_arrives_without_asking(edge):
    content = message("big", MAX_SIZE * 2)
    too_large = outcome(edge, VerdictOutcome.TOO_LARGE)
    with home_judging(edge, answering(SpamAction.REJECT)) as home:
        reply = deliver(edge, content, f"SIZE={len(content)}")
    unsealed = edge.unseal(queued_id(reply))
    assert unsealed.message.endswith(content) and "verdict" not in unsealed.metadata
    assert home.seen == []
    counted(edge, VerdictOutcome.TOO_LARGE, lambda n: n == too_large + 1)


def test_a_message_growing_past_max_size_mid_data_is_sealed_whole_without_a_verdict(edge):
    content = message("grows", MAX_SIZE * 3)
    with home_judging(edge, answering(SpamAction.REJECT)) as home:
        with SmtpClient.connect(edge.site.smtp_port) as client:
            client.ehlo()
            client.expect(f"MAIL FROM:<{SENDER}> SIZE={MAX_SIZE // 2}", 250)   # a SIZE that lies low
            client.expect(f"RCPT TO:<{RECIPIENT}>", 250)
            reply = client.data(content)
    unsealed = edge.unseal(queued_id(reply))
    assert unsealed.message.startswith(b"Received: ") and unsealed.message.endswith(content)
    assert "verdict" not in unsealed.metadata
    assert home.seen == []


def test_wrong_answers_are_refused_and_the_edge_goes_on(edge):
    async def wrong(home: Home, client: SpoolClient, seen: Seen) -> None:
        await home.answer(client, "0" * 32, "no action", "t")                   # an id nobody asked
        await home.answer(client, seen.id, 7, "t")                              # an action that is no action
        await home.answer(client, seen.id, "accept", "t")                       # nor one of rspamd's
        await home.answer(client, seen.id, "no action", "t" * (MAX_TOKEN + 1))  # a token over the limit
        await home.answer(client, seen.id, "no action", None)
        await home.answer(client, seen.id, SpamAction.NO_ACTION.value, home.token(seen.content, SpamAction.NO_ACTION))

    with home_judging(edge, wrong) as home:
        reply = deliver(edge, message("wrong answers"))
    assert home.errors == [NOT_FOUND] + [Code.BAD_REQUEST] * 4
    unsealed = edge.unseal(queued_id(reply))
    assert open_verdict(home.key, unsealed.metadata["verdict"]["token"], unsealed.message).action == "no action"
    assert edge.process_alive()


def test_concurrent_sessions_each_get_their_own_verdict(edge):
    count = 12
    contents = [message(f"concurrent {i} {os.urandom(8).hex()}", 200 * i) for i in range(count)]
    replies = [None] * count
    with home_judging(edge, answering(SpamAction.NO_ACTION, delay=0.05), workers=4) as home:
        def send(i):
            replies[i] = deliver(edge, contents[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
    sealed = [edge.unseal(queued_id(reply)) for reply in replies]
    for i, unsealed in enumerate(sealed):
        assert unsealed.message.endswith(contents[i])
        token = unsealed.metadata["verdict"]["token"]
        assert [open_verdict(home.key, token, other.message) is not None for other in sealed] == \
            [j == i for j in range(count)]


def test_status_shows_verdict_counts(edge):
    def row():
        rows = {row.item: row for row in edge_rows(edge.site.config, 0) if row.section == "verdict"}
        return rows["rejected by verdict"]

    outcome(edge, VerdictOutcome.REJECTED)   # settled
    before = row().value
    for action, times in ((SpamAction.REJECT, 2), (SpamAction.SOFT_REJECT, 1), (SpamAction.NO_ACTION, 1)):
        with home_judging(edge, answering(action)):
            for _ in range(times):
                deliver(edge, message(f"counted {action.value} {os.urandom(8).hex()}"))
    expected = {outcome.value: {"rejected": 2, "deferred": 1, "accepted": 1}.get(outcome.value, 0)
                for outcome in VerdictOutcome}
    wait_until(lambda: {k: row().value[k] - before[k] for k in before} == expected, TIMEOUT,
               "the counts on the status page", edge.log)
    after = row()
    assert {k: after.value[k] - before[k] for k in after.value} == expected
    assert f"{after.value['rejected']} rejected, {after.value['deferred']} deferred" in after.text


# --- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("section, key", [("budget = 0", "budget"), ("budget = 31", "budget"),
                                          ('budget = "3"', "budget"), ("max_size = 0", "max_size"),
                                          ("max_size = 2000000", "max_size"), ("other = 1", "other")])
def test_config_errors_name_the_key(pki, tmp_path, section, key):
    site = make_edge_site(tmp_path, pki, top_options=f"[verdict]\n{section}\n")
    with pytest.raises(ConfigError, match=key):
        edge_config.load(site.config)


def test_config_defaults_and_absence(pki, tmp_path):
    site = make_edge_site(tmp_path / "on", pki, top_options="[verdict]\n")
    assert edge_config.load(site.config).verdict == VerdictSettings(3.0, 1048576)
    site = make_edge_site(tmp_path / "off", pki)
    assert edge_config.load(site.config).verdict is None


def test_verdict_needs_the_spool_service(pki, tmp_path):
    site = make_edge_site(tmp_path, pki, top_options="[verdict]\n")
    text = site.config.read_text()
    site.config.write_text(text[:text.index("[spool_service]")])
    with pytest.raises(ConfigError, match="spool_service"):
        edge_config.load(site.config)


# --- the desk in-process: its queue, over the real spool service -----------------------------------

def test_the_queue_is_bounded_and_a_full_queue_asks_nobody(tmp_path):
    async def main():
        public = parse_spool_public_key(generate_spool_key(tmp_path / "spool.key"))
        identity = Ed25519PrivateKey.generate()
        spool = Spool(tmp_path / "spool", public, 1 << 30, 100)
        audit = AuditLog(tmp_path / "audit.jsonl")
        registry = CollectorRegistry()
        desk = VerdictDesk(VerdictSettings(), registry, max_queue=2)
        peer = Peer(name="home", addresses=frozenset({"127.0.0.1"}), identity=identity.public_key(),
                    max_connections=4, max_in_flight=32, rate=50.0, burst=100)
        service = SpoolService(spool, (peer,), audit, registry, extra_methods=desk.methods())
        servers = await service.serve((("127.0.0.1", 0),))
        client = SpoolClient("127.0.0.1", servers[0].sockets[0].getsockname()[1], identity, timeout=5)
        try:
            await client.connect()
            polling = asyncio.ensure_future(client.verdict_wait(0.2))   # present, then gone: nobody takes them
            assert await polling is None
            assert desk.home_present
            asks = [asyncio.ensure_future(desk.ask(memoryview(b"m%d" % i), {}, 30)) for i in range(3)]
            assert await asyncio.wait_for(asks[2], 5) is None   # the third: the queue holds two
            assert registry.get_sample_value("yestls_edge_verdict_total", {"outcome": "queue_full"}) == 1
            first = await client.verdict_wait(1)
            second = await client.verdict_wait(1)
            assert (first.content, second.content) == (b"m0", b"m1")   # oldest first
            await client.verdict_answer(second.id, "reject", "token")
            await client.verdict_answer(first.id, "no action", "other")
            assert [(a.action, a.token) for a in await asyncio.gather(*asks[:2])] == \
                [(SpamAction.NO_ACTION, "other"), (SpamAction.REJECT, "token")]
            with pytest.raises(RemoteError) as refused:
                await client.verdict_answer(first.id, "no action", "again")   # answered already
            assert refused.value.code == NOT_FOUND
        finally:
            await client.close()
            for server in servers:
                server.close()
            audit.close()
            spool.close()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_the_plaintext_buffer_wipes_what_it_outgrows():
    buffer = PlaintextBuffer(4)
    first = buffer._data
    buffer.append(b"abcd")
    buffer.append(memoryview(b"efgh"))
    assert bytes(buffer.view()) == b"abcdefgh" and bytes(first) == bytes(4)
    held = buffer._data
    buffer.wipe()
    assert bytes(held) == bytes(len(held)) and buffer.length == 0
