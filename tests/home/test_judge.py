"""Home's before-queue judge (relay/home/judge.py): rspamd's verdict for a sender still waiting at the edge.

The real Judge, over real spool connections, against a stand-in rspamd
answering /checkv2 as rspamd does (tests/fake_rspamd.py): first a real edge
process with [verdict] (GTUBE refused 550 at SMTP time, ham sealed with a
token home verifies, a broken rspamd costing nothing but the verdict),
then the edge's desk in this process, to play what the real edge never
sends: oversize messages, hostile facts, a dropped connection. Every wait
is bounded; nothing asserts how long anything took.
"""

import asyncio
import os
import threading
from contextlib import contextmanager

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from relay.audit import AuditLog
from relay.edge.verdict import VerdictDesk, VerdictSettings
from relay.home.judge import Judge
from relay.home.spam import SpamAction, SpamFilter, open_verdict
from relay.spool.keys import generate_spool_key, parse_spool_public_key
from relay.spool.service import SpoolService
from relay.spool.store import Spool
from relay.tunnel import Peer

from ..edge_smtp import SmtpClient, queued_id, running_edge, wait_until
from ..fake_rspamd import GTUBE, Answer, run_fake_rspamd

TIMEOUT = 20.0
SENDER = "a@sender.example.net"
RECIPIENT = "user@example.org"
HAM = b"From: <a@sender.example.net>\r\nTo: <user@example.org>\r\nSubject: ham\r\n\r\nHello.\r\n"
SPAM = b"From: <a@sender.example.net>\r\nTo: <user@example.org>\r\nSubject: spam\r\n\r\n" + GTUBE + b"\r\n"


def judge_for(port: int, identity, rspamd_url: str, key: bytes, *, max_message_size: int = 1 << 20,
              rspamd_timeout: float = 5.0) -> Judge:
    return Judge(("127.0.0.1", port), identity, SpamFilter(rspamd_url, rspamd_timeout, "mx.example.org"), key,
                 workers=2, max_message_size=max_message_size, poll=2.0, timeout=5.0)


@contextmanager
def judging(judge: Judge):
    """The judge's loop in a thread of its own, until the block ends."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(judge.run(stop)), daemon=True)
    thread.start()
    try:
        yield judge
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(TIMEOUT)
        loop.close()


# --- against a real edge ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def edge(pki, tmp_path_factory):
    with running_edge(tmp_path_factory.mktemp("judge"), pki, top_options="[verdict]\nbudget = 2\n") as running:
        yield running


@pytest.fixture
def home(edge):
    key = os.urandom(32)
    with run_fake_rspamd() as rspamd:
        judge = judge_for(edge.site.spool_service_port, edge.site.home_identity, rspamd.url, key)
        with judging(judge):
            wait_until(lambda: edge.metric("yestls_edge_verdict_home_present") == 1, TIMEOUT, "the judge at the edge",
                       edge.log)
            yield judge, rspamd, key
    wait_until(lambda: edge.metric("yestls_edge_verdict_home_present") == 0, TIMEOUT, "the judge gone", edge.log)


def deliver(edge, content: bytes):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        return client.deliver(SENDER, [RECIPIENT], content)


def test_gtube_is_refused_at_smtp_time_and_not_stored(edge, home):
    judge, rspamd, _ = home
    before = len(edge.site.spooled_files())
    reply = deliver(edge, SPAM)
    assert reply.code == 550 and reply.enhanced == "5.7.1", reply
    assert len(edge.site.spooled_files()) == before
    [request] = rspamd.requests
    assert request.path == "/checkv2"
    assert request.headers["From"] == SENDER and request.headers["Rcpt"] == RECIPIENT
    assert request.headers["IP"] == "127.0.0.1" and request.headers["Helo"] == "sender.example.net"
    assert request.body.startswith(b"Received: ") and request.body.endswith(SPAM)
    # The judge counts a verdict once the edge has taken it, which can be after the client heard the 550.
    wait_until(lambda: judge.judged == 1, TIMEOUT, "the judge to count its verdict", edge.log)


def test_ham_is_sealed_with_home_verdict_for_exactly_that_message(edge, home):
    _, rspamd, key = home
    reply = deliver(edge, HAM)
    unsealed = edge.unseal(queued_id(reply))
    verdict = open_verdict(key, unsealed.metadata["verdict"]["token"], unsealed.message)
    assert verdict.action == SpamAction.NO_ACTION and "FAKE_HAM" in verdict.symbols
    assert any(name == "X-Spamd-Result" for name, _ in verdict.headers)
    assert rspamd.requests[0].body == unsealed.message
    assert open_verdict(os.urandom(32), unsealed.metadata["verdict"]["token"], unsealed.message) is None


def test_a_broken_rspamd_answers_nothing_and_the_message_is_accepted(edge, home):
    judge, rspamd, _ = home
    rspamd.answer = lambda request: Answer(status=500, body=b"oops")
    reply = deliver(edge, SPAM)
    unsealed = edge.unseal(queued_id(reply))   # accepted: home judges it again after unsealing
    assert "verdict" not in unsealed.metadata
    assert judge.skipped == 1 and judge.judged == 0


def test_an_rspamd_slower_than_the_budget_answers_nothing(edge, home):
    judge, rspamd, _ = home
    release = threading.Event()

    def slow(request):
        release.wait(TIMEOUT)
        return Answer(status=500)
    rspamd.answer = slow
    try:
        reply = deliver(edge, SPAM)
        unsealed = edge.unseal(queued_id(reply))
        assert "verdict" not in unsealed.metadata
        wait_until(lambda: judge.skipped == 1, TIMEOUT, "the judge gave up at the edge's budget")
    finally:
        release.set()
    assert judge.judged == 0


# --- against the desk, in this process ------------------------------------------------------------

@contextmanager
def desk_served(tmp_path, budget: float = 5.0):
    """The edge's desk behind a real spool service on loopback; yields (desk, port, home identity, run)."""
    loop = asyncio.new_event_loop()
    identity = Ed25519PrivateKey.generate()
    public = parse_spool_public_key(generate_spool_key(tmp_path / "spool.key"))

    async def start():
        spool = Spool(tmp_path / "spool", public, 1 << 30, 100)
        audit = AuditLog(tmp_path / "audit.jsonl")
        desk = VerdictDesk(VerdictSettings(budget=budget), CollectorRegistry())
        peer = Peer(name="home", addresses=frozenset({"127.0.0.1"}), identity=identity.public_key(),
                    max_connections=4, max_in_flight=32, rate=50.0, burst=100)
        service = SpoolService(spool, (peer,), audit, None, extra_methods=desk.methods())
        servers = await service.serve((("127.0.0.1", 0),))
        return spool, audit, desk, servers

    spool, audit, desk, servers = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro, timeout=TIMEOUT):
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), loop).result(timeout + 5)

    try:
        yield desk, servers[0].sockets[0].getsockname()[1], identity, run
    finally:
        async def stop():
            for server in servers:
                server.close()
            for connection in list(desk._watched):
                connection.close()
            audit.close()
            spool.close()
        run(stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


def present(desk, run) -> None:
    wait_until(lambda: run(_present(desk)), TIMEOUT, "a judge waiting at the desk")


async def _present(desk) -> bool:
    return bool(desk._waiters)


def test_a_message_over_the_intakes_size_is_not_judged(tmp_path):
    with run_fake_rspamd() as rspamd, desk_served(tmp_path, budget=1.0) as (desk, port, identity, run):
        judge = judge_for(port, identity, rspamd.url, os.urandom(32), max_message_size=1024)
        with judging(judge):
            present(desk, run)
            content = b"Subject: big\r\n\r\n" + b"x" * (200 * 1024)   # over 1024 + the trace header's room
            assert run(desk.ask(memoryview(content), {}, 1.0)) is None
        assert rspamd.requests == [] and judge.skipped == 1


def test_hostile_facts_reach_rspamd_only_as_well_formed_values(tmp_path):
    facts = {"mail_from": "a@b.example\r\nX-Evil: 1", "rcpt_tos": ["ok@example.org", 7, "x" * 1000],
             "client_address": "not-an-address", "helo": ["a", "list"], "extra": {"nested": True}}
    with run_fake_rspamd() as rspamd, desk_served(tmp_path) as (desk, port, identity, run):
        key = os.urandom(32)
        with judging(judge_for(port, identity, rspamd.url, key)):
            present(desk, run)
            answer = run(desk.ask(memoryview(HAM), facts, 5.0))
    assert answer.action == SpamAction.NO_ACTION and open_verdict(key, answer.token, HAM).action == "no action"
    [request] = rspamd.requests
    assert request.headers.get_all("Rcpt") == ["ok@example.org"]
    assert request.headers["From"] == "<>" and "IP" not in request.headers and "Helo" not in request.headers
    assert "X-Evil" not in request.headers


def test_the_judge_reconnects_when_its_connection_drops(tmp_path):
    with run_fake_rspamd() as rspamd, desk_served(tmp_path) as (desk, port, identity, run):
        judge = judge_for(port, identity, rspamd.url, os.urandom(32))
        with judging(judge):
            present(desk, run)

            async def drop():
                for connection in list(desk._watched):
                    connection.transport.abort()
            run(drop())
            wait_until(lambda: run(_present(desk)) and judge.judged == 0, TIMEOUT, "the judge back")
            answer = run(desk.ask(memoryview(SPAM), {"mail_from": SENDER, "rcpt_tos": [RECIPIENT]}, 5.0))
    assert answer.action == SpamAction.REJECT and judge.judged == 1
    assert len(rspamd.requests) == 1
