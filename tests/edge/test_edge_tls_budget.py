"""The TLS budget per client (relay/edge/tls_budget.py): home's signatures cannot be drained from one place.

Unit tests drive TlsBudget with a fake clock. Against a running edge (small
budgets, clients on distinct loopback addresses):
- a client over its budget of full handshakes gets no signature asked for
  (the oracle's audit shows none), and is told to retry later: under
  `tempfail` its next connection gets 421 4.7.0 at the greeting, and it is
  never invited to send in cleartext; after `retry_after` it is served again;
- another client, in another /24, delivers over verified TLS meanwhile;
- too many STARTTLS commands: 454 4.7.0, and that session's cleartext MAIL
  gets 451 4.7.0 (not silently downgraded);
- resumed handshakes cost nothing: a client over its budget of full
  handshakes still resumes;
- the implicit-TLS listener admits (caps) before the handshake: a third
  connection from one address is closed before any signature is asked for;
- under the opt-in `plaintext` policy nothing is remembered.
"""

import json
import socket
import ssl
import time

import pytest

from relay.edge.tls_budget import Refusal, TlsBudget, TlsLimits, Waiting, network_of

from ..edge_smtp import CLIENT_NAME, ConnectionClosed, SmtpClient, queued_id, running_edge, tls_context, wait_until

pytestmark = pytest.mark.timeout(300)

SENDER = f"a@{CLIENT_NAME}"
RECIPIENT = "user@example.org"
FLOODER = "127.0.7.2"
NEIGHBOUR = "127.0.7.3"   # the flooder's /24
GENUINE = "127.0.8.2"     # another /24


# --- TlsBudget on its own ---------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget(**limits) -> tuple[TlsBudget, Clock]:
    clock = Clock()
    return TlsBudget(TlsLimits(**limits), clock), clock


def test_an_address_gets_its_burst_then_its_rate():
    b, clock = budget(handshakes_per_minute=60, handshake_burst=3)
    assert [b.handshake("192.0.2.1") for _ in range(4)] == [None, None, None, Refusal.ADDRESS]
    clock.now += 1.0  # one per second
    assert b.handshake("192.0.2.1") is None
    assert b.handshake("192.0.2.1") is Refusal.ADDRESS
    assert b.handshake("192.0.2.99") is None  # another address, its own bucket


@pytest.mark.parametrize("first, second, same", [
    ("192.0.2.1", "192.0.2.200", True), ("192.0.2.1", "192.0.3.1", False),
    ("2001:db8::1", "2001:db8::ffff:1", True), ("2001:db8::1", "2001:db8:0:1::1", False),
    ("::ffff:192.0.2.1", "192.0.2.7", True),
])
def test_a_network_is_a_slash_24_or_a_slash_64(first, second, same):
    assert (network_of(first) == network_of(second)) is same
    b, _ = budget(handshakes_per_minute=60, handshake_burst=100, network_handshakes_per_minute=60,
                  network_handshake_burst=2)
    assert b.handshake(first) is None and b.handshake(first) is None
    assert b.handshake(second) is (Refusal.NETWORK if same else None)


def test_a_refusal_asks_the_address_to_retry_later_for_a_while():
    b, clock = budget(handshakes_per_minute=1, handshake_burst=1, retry_after=60)
    assert not b.retry_later("192.0.2.1")
    b.handshake("192.0.2.1")
    b.handshake("192.0.2.1")
    assert b.retry_later("192.0.2.1") and not b.retry_later("192.0.2.2")
    clock.now += 59
    assert b.retry_later("192.0.2.1")
    clock.now += 2
    assert not b.retry_later("192.0.2.1")


def test_starttls_commands_have_their_own_budget():
    b, _ = budget(starttls_per_minute=1, starttls_burst=2)
    assert [b.starttls("192.0.2.1") for _ in range(3)] == [None, None, Refusal.STARTTLS]
    assert b.retry_later("192.0.2.1") is Waiting.OVER_BUDGET
    assert b.handshake("192.0.2.1") is None  # full handshakes are counted apart


def test_a_starttls_whose_handshake_completes_is_given_back():
    """A sender draining a backlog, a connection per message, each STARTTLS completed: never refused. One
    that abandons its handshakes is, after the burst."""
    b, _ = budget(starttls_per_minute=1, starttls_burst=2)
    for _ in range(50):
        assert b.starttls("192.0.2.1") is None
        b.starttls_completed("192.0.2.1")
    assert [b.starttls("192.0.2.2") for _ in range(3)] == [None, None, Refusal.STARTTLS]
    b.starttls_completed("192.0.2.3")   # never seen: nothing to give back, nothing made up
    assert [b.starttls("192.0.2.3") for _ in range(3)] == [None, None, Refusal.STARTTLS]


def test_the_reason_to_come_back_later_is_the_right_one():
    b, _ = budget(handshakes_per_minute=1, handshake_burst=1)
    b.tls_failed("192.0.2.1")                      # the oracle refused or did not answer
    b.handshake("192.0.2.2")
    b.handshake("192.0.2.2")                       # over its budget
    assert b.retry_later("192.0.2.1") is Waiting.TLS_FAILED
    assert b.retry_later("192.0.2.2") is Waiting.OVER_BUDGET
    assert "failed a moment ago" in Waiting.TLS_FAILED.reply_text()
    assert "Too many TLS attempts" in Waiting.OVER_BUDGET.reply_text()
    assert all(w.reply_text().endswith("(not in cleartext)") for w in Waiting)


def test_memory_is_bounded_by_max_tracked():
    b, _ = budget(handshakes_per_minute=1, handshake_burst=1, max_tracked=100)
    for i in range(5000):
        address = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        b.handshake(address)
        b.handshake(address)   # refused: remembered as failed
        b.starttls(address)
    assert b.tracked() <= 4 * 100


# --- against a running edge ---------------------------------------------------------------------------

BUDGET = ("handshakes_per_minute = 6\nhandshake_burst = 3\nnetwork_handshakes_per_minute = 60\n"
          "network_handshake_burst = 5\nstarttls_per_minute = 6\nstarttls_burst = 4\nretry_after = 3\n")


@pytest.fixture(scope="module")
def edge(pki, tmp_path_factory):
    with running_edge(tmp_path_factory.mktemp("edge-budget"), pki, implicit_tls=True, tls_options=BUDGET,
                      smtp_options="max_connections_per_ip = 2\n") as running:
        yield running


def signatures(edge) -> int:
    """Signatures the oracle made so far (its audit: one line per signature)."""
    lines = edge.site.oracle.audit_log.read_text().splitlines()
    return sum(1 for line in lines if json.loads(line).get("outcome") == "signed")


def full_handshake(edge, pki, source: str, context: ssl.SSLContext | None = None) -> SmtpClient:
    client = SmtpClient.connect(edge.site.smtp_port, source=source)
    client.ehlo()
    client.starttls(context or tls_context(pki))
    client.ehlo()
    return client


def wait_retry_window_over(edge, source: str) -> None:
    def served() -> bool:
        try:
            with SmtpClient.connect(edge.site.smtp_port, source=source) as client:
                return client.greeting.code == 220
        except ConnectionClosed:
            return False
    wait_until(served, 30, f"{source} greeted again after retry_after", edge.log)


def test_a_flooder_gets_no_signature_beyond_its_budget_and_is_told_to_retry_later(edge, pki):
    before = signatures(edge)
    for _ in range(3):  # the burst
        full_handshake(edge, pki, FLOODER).close()
    with pytest.raises((ssl.SSLError, OSError)):  # the fourth: internal_error, nothing asked of home
        full_handshake(edge, pki, FLOODER)
    assert signatures(edge) == before + 3
    # Not pushed into cleartext: its next connection is told to come back later.
    with SmtpClient.connect(edge.site.smtp_port, source=FLOODER) as client:
        assert (client.greeting.code, client.greeting.enhanced) == (421, "4.7.0"), client.greeting
    # Meanwhile a client in another network delivers over verified TLS.
    with full_handshake(edge, pki, GENUINE) as client:
        queued_id(client.deliver(SENDER, [RECIPIENT], b"Subject: genuine\r\n\r\nbody\r\n"))
    wait_retry_window_over(edge, FLOODER)


def test_a_network_shares_one_budget(edge, pki):
    wait_retry_window_over(edge, FLOODER)
    time.sleep(1.1)  # refill (6 per minute per address; 60 per minute per network)
    refused = 0
    for source in [FLOODER, NEIGHBOUR] * 4:
        try:
            full_handshake(edge, pki, source).close()
        except (ssl.SSLError, OSError, ConnectionClosed, AssertionError):
            refused += 1
    assert refused >= 3, "eight handshakes from one /24 with a network burst of 5"
    wait_retry_window_over(edge, FLOODER)
    wait_retry_window_over(edge, NEIGHBOUR)


def test_too_many_starttls_is_refused_and_cleartext_is_not_the_way_out(edge, pki):
    source = "127.0.9.2"
    for _ in range(4):
        with SmtpClient.connect(edge.site.smtp_port, source=source) as client:
            client.ehlo()
            client.expect("STARTTLS", 220)  # and abandoned: the budget counts commands, not handshakes
    with SmtpClient.connect(edge.site.smtp_port, source=source) as client:
        client.ehlo()
        reply = client.command("STARTTLS")
        assert (reply.code, reply.enhanced) == (454, "4.7.0"), reply
        reply = client.command(f"MAIL FROM:<{SENDER}>")
        assert (reply.code, reply.enhanced) == (451, "4.7.0"), reply
        assert "Too many TLS attempts" in reply.text, reply   # the budget, not a failed TLS


def test_completed_starttls_handshakes_do_not_spend_the_starttls_budget(edge, pki):
    """Twice the STARTTLS burst (4), each resumed and completed: none refused."""
    source = "127.0.11.2"
    context = tls_context(pki)
    with full_handshake(edge, pki, source, context) as client:
        session = client.sock.session
        client.expect("QUIT", 221)
    for _ in range(8):
        with SmtpClient.connect(edge.site.smtp_port, source=source) as client:
            client.ehlo()
            client.starttls(context, session=session)
            assert client.sock.session_reused
            client.ehlo()
            session = client.sock.session
            client.expect("QUIT", 221)


def test_resumption_costs_no_budget(edge, pki):
    source = "127.0.10.2"
    context = tls_context(pki)
    with full_handshake(edge, pki, source, context) as client:
        client.deliver(SENDER, [RECIPIENT], b"Subject: first\r\n\r\nbody\r\n")
        session = client.sock.session
        client.expect("QUIT", 221)
    for _ in range(2):
        full_handshake(edge, pki, source).close()   # the rest of the burst: no token left for a full handshake
    before = signatures(edge)
    with SmtpClient.connect(edge.site.smtp_port, source=source) as client:
        client.ehlo()
        client.starttls(context, session=session)
        assert client.sock.session_reused
        client.ehlo()
        queued_id(client.deliver(SENDER, [RECIPIENT], b"Subject: resumed\r\n\r\nbody\r\n"))
    assert signatures(edge) == before


def test_implicit_tls_is_capped_before_the_handshake(edge, pki):
    source = "127.0.11.2"
    before = signatures(edge)
    idle = [socket.create_connection(("127.0.0.1", edge.site.implicit_tls_port), source_address=(source, 0))
            for _ in range(2)]
    try:
        wait_until(lambda: edge.metric("yestls_edge_smtp_connections") >= 2, 10, "two implicit connections", edge.log)
        third = socket.create_connection(("127.0.0.1", edge.site.implicit_tls_port), source_address=(source, 0))
        third.settimeout(10)
        assert third.recv(1) == b"", "the third connection from one address was not closed at once"
        third.close()
    finally:
        for sock in idle:
            sock.close()
    assert signatures(edge) == before
    edge.wait_idle()


def test_the_plaintext_policy_remembers_nothing(pki, tmp_path):
    with running_edge(tmp_path / "site", pki, oracle_down="plaintext", tls_options=BUDGET) as edge:
        for _ in range(3):
            full_handshake(edge, pki, FLOODER).close()
        with pytest.raises((ssl.SSLError, OSError)):
            full_handshake(edge, pki, FLOODER)
        with SmtpClient.connect(edge.site.smtp_port, source=FLOODER) as client:
            assert client.greeting.code == 220
            client.ehlo()
            queued_id(client.deliver(SENDER, [RECIPIENT], b"Subject: cleartext, as chosen\r\n\r\nbody\r\n"))


def test_budget_refusals_are_counted_and_logged_once_per_window(edge):
    assert edge.metric("yestls_edge_refused_total", reason="tls_budget_address") >= 1
    assert edge.metric("yestls_edge_refused_total", reason="tls_budget_starttls") >= 1
    assert edge.log().count("over its TLS budget") <= 8
