"""Hypothesis against the engine: whatever arrives, it accepts it or ends the connection properly.

"Properly" means: the exception is a `TLSAlert` whose fatal alert is the last
thing queued in `data_to_send()` (or a `PeerAlert` with nothing queued), the
connection is closed, and nothing else escapes. An `InternalError` with a
`__cause__` is an engine bug that the guard caught. Buffers stay bounded
however much arrives.

(a) random bytes into a fresh server; (b) mutated ClientHellos, ours and
OpenSSL's; (c) random records into a connected server; (d) every state x
every kind of record, h2-style; (e) large input without draining output.
"""

import os
import random
import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.tls import (
    CloseNotifyReceived,
    DataReceived,
    KeyUpdateReceived,
    PeerAlert,
    ServerConfig,
    State,
    TicketKeyring,
    TLSAlert,
    TLSError,
)
from relay.tls.constants import MAX_CIPHERTEXT, AlertLevel, ContentType, HandshakeType, KeyUpdateRequest
from relay.tls.errors import InternalError
from relay.tls.messages import handshake_message
from relay.tls.record import HEADER_LEN
from relay.tls.wire import Reader, u8

from ..memory import MemoryPair, client_context
from ..rawclient import RawClient, record, records

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
STATES = [State.START, State.WAIT_SECOND_HELLO, State.WAIT_SIGNATURE, State.WAIT_FINISHED, State.CONNECTED]
ENCRYPTING_STATES = STATES[2:]
CONTENT_TYPES = [
    ContentType.CHANGE_CIPHER_SPEC, ContentType.ALERT, ContentType.HANDSHAKE, ContentType.APPLICATION_DATA,
    0, 24, 255,
]
HANDSHAKE_TYPES = [*HandshakeType, 3, 99, 255]
ALERT_RECORD = bytes((ContentType.ALERT, 3, 3, 0, 2))
PROTECTED_ALERT_HEADER = bytes((ContentType.APPLICATION_DATA, 3, 3, 0, 2 + 1 + 16))
# Queued output a server may hold without the application draining it: its
# whole first flight is a few kilobytes.
OUTPUT_BOUND = 64 * 1024


class Setup:
    """What every test here needs, with a short repr so Hypothesis' failure reports stay readable."""

    def __init__(self, pki):
        leaf = pki.leaves["ecdsa-p256"]
        self.key = leaf.key
        self.config = ServerConfig([leaf.chain], tickets=TicketKeyring(os.urandom), ticket_early_data_size=4096)
        first = self.client().drive_to(State.CONNECTED)
        self.ticket = first.tickets[0]
        # The ClientHello Python's ssl (OpenSSL) sends to the engine.
        pair = MemoryPair(self.config, client_context(pki.ca_pem), leaf.key)
        with pytest.raises(ssl.SSLWantReadError):
            pair.client.do_handshake()
        self.openssl_hello = pair.to_server.read()
        assert self.openssl_hello[0] == ContentType.HANDSHAKE

    def client(self) -> RawClient:
        """A RawClient with a fresh server on the shared config."""
        return RawClient(self.config, self.key)

    def __repr__(self) -> str:
        return "setup"


@pytest.fixture(scope="module")
def setup(pki) -> Setup:
    return Setup(pki)


def feed(client: RawClient, data: bytes) -> list | TLSError:
    """`data` to the server: it must accept it (events) or end the connection properly (the error)."""
    if not data:
        return []  # b"" is EOF, not input
    try:
        return client.send(data)
    except TLSAlert as alert:
        assert not (isinstance(alert, InternalError) and alert.__cause__ is not None), (
            f"engine bug on {data[:64].hex()}...: {alert.__cause__!r}"
        )
        assert client.server.state is State.CLOSED
        assert_alert_queued(client, alert.description)
        return alert
    except PeerAlert as alert:
        assert client.server.state is State.CLOSED
        assert client.last_output == b""
        return alert


def assert_alert_queued(client: RawClient, description: int) -> None:
    """The server's last record is this fatal alert (or, when we lost its keys, an alert-sized record)."""
    last = client.records[-1]
    if last.content is None:
        assert client.last_output[-24:-19] == PROTECTED_ALERT_HEADER
        return
    assert last.content_type == ContentType.ALERT
    assert last.content == bytes((AlertLevel.FATAL, description))
    if not last.protected:
        assert client.last_output.endswith(ALERT_RECORD + bytes((AlertLevel.FATAL, description)))


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """`data` in pieces at `points` (no empty pieces: b"" would mean EOF)."""
    bounds = [0, *sorted(p for p in set(points) if 0 < p < len(data)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# --- (a) random bytes into a fresh server -------------------------------------------------------

def framed_records():
    """Random records with a right length, so parsing goes past the record header."""
    return st.lists(
        st.tuples(st.sampled_from(CONTENT_TYPES), st.binary(max_size=300)).map(lambda t: record(*t)),
        min_size=1, max_size=4,
    ).map(b"".join)


@settings(FUZZ, max_examples=2500)
@given(chunks=st.lists(st.one_of(st.binary(min_size=1, max_size=600), framed_records()), min_size=1, max_size=4))
def test_random_bytes_into_a_fresh_server(setup, chunks):
    client = setup.client()
    for chunk in chunks:
        if isinstance(feed(client, chunk), TLSError):
            break


# --- (b) mutated ClientHellos -------------------------------------------------------------------

def length_fields(message: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the length fields of a ClientHello message, down to each extension."""
    fields = [(1, 3)]
    r = Reader(message, 4)
    r.take(2 + 32)
    for size in (1, 2, 1):  # session id, cipher suites, compression methods
        fields.append((r.pos, size))
        r.vector(size)
    if r.remaining():
        fields.append((r.pos, 2))
        block = r.sub(2)
        while block.remaining():
            block.u16()
            fields.append((block.pos, 2))
            block.vector(2)
    return fields


def edit_length(message: bytes, field: tuple[int, int], delta: int) -> bytes:
    offset, size = field
    value = (int.from_bytes(message[offset:offset + size], "big") + delta) % (1 << (8 * size))
    return message[:offset] + value.to_bytes(size, "big") + message[offset + size:]


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.integers(1, 8)),
    st.tuples(st.just("length"), st.integers(0, 2**16), st.sampled_from([-256, -2, -1, 1, 2, 255, 2**15])),
    st.tuples(st.just("truncate"), st.integers(0, 2**16), st.just(None)),
)


def mutate(message: bytes, mutations: list) -> bytes:
    fields = length_fields(message)
    for op, where, arg in mutations:
        if op == "length":
            message = edit_length(message, fields[where % len(fields)], arg)
            continue
        i = where % (len(message) + 1)
        if op == "flip" and i < len(message):
            message = message[:i] + bytes((message[i] ^ arg,)) + message[i + 1:]
        elif op == "insert":
            message = message[:i] + arg + message[i:]
        elif op == "delete":
            message = message[:i] + message[i + arg:]
        elif op == "truncate":
            message = message[:i]
    return message


HELLO_SOURCES = ["raw", "raw-psk-early-data", "raw-after-retry", "openssl"]


def hello_message(source: str, client: RawClient, setup: Setup) -> bytes:
    """A valid ClientHello message for `client`'s server to answer (after a HelloRetryRequest for "after-retry")."""
    if source == "raw":
        return client.prepare_hello(client.hello())
    if source == "raw-psk-early-data":
        return client.prepare_hello(client.hello(ticket=setup.ticket, early_data=True))
    if source == "raw-after-retry":
        first = client.hello(ticket=setup.ticket, shares=())
        client.send_hello(first)
        return client.prepare_hello(client.retry_hello(first))
    data = setup.openssl_hello
    return data[HEADER_LEN:HEADER_LEN + int.from_bytes(data[3:5], "big")]


@settings(FUZZ, max_examples=3000)
@given(
    source=st.sampled_from(HELLO_SOURCES),
    mutations=st.lists(mutation, max_size=4),
    record_cuts=st.lists(st.integers(0, 2000), max_size=4),
    stream_flips=st.lists(st.tuples(st.integers(0, 2**16), st.integers(1, 255)), max_size=1),
    delivery_cuts=st.lists(st.integers(0, 2000), max_size=4),
)
def test_mutated_client_hello(setup, source, mutations, record_cuts, stream_flips,
                              delivery_cuts):
    client = setup.client()
    message = mutate(hello_message(source, client, setup), mutations)
    stream = records(ContentType.HANDSHAKE, message, record_cuts) if message else record(ContentType.HANDSHAKE, b"")
    for where, xor in stream_flips:
        i = where % len(stream)
        stream = stream[:i] + bytes((stream[i] ^ xor,)) + stream[i + 1:]
    outcomes = []
    for piece in cut(stream, delivery_cuts):
        outcomes.append(feed(client, piece))
        if isinstance(outcomes[-1], TLSError):
            break
    if not mutations and not stream_flips:
        # However it was fragmented and delivered, a valid hello is answered.
        assert not any(isinstance(o, TLSError) for o in outcomes), outcomes
        assert client.server.state is State.WAIT_FINISHED


@pytest.mark.parametrize("source", HELLO_SOURCES)
def test_unmutated_hellos_are_answered(setup, source):
    """The baseline the mutations start from: each hello gets a whole server flight."""
    client = setup.client()
    client.send_record(ContentType.HANDSHAKE, hello_message(source, client, setup))
    assert client.server.state is State.WAIT_FINISHED
    # We follow our own hellos' key schedule; OpenSSL's key shares are not ours to decrypt with.
    last = HandshakeType.SERVER_HELLO if source == "openssl" else HandshakeType.FINISHED
    assert client.server_messages[-1][0] == last


# --- (c) random records into a connected server -------------------------------------------------

connected_input = st.one_of(
    st.tuples(st.just("raw"), st.binary(min_size=1, max_size=200)),
    st.tuples(st.just("plain"), st.sampled_from(CONTENT_TYPES), st.binary(max_size=100)),
    st.tuples(st.just("protected"), st.sampled_from(CONTENT_TYPES), st.binary(max_size=100), st.integers(0, 64)),
    st.tuples(st.just("handshake"), st.sampled_from(HANDSHAKE_TYPES), st.binary(max_size=40)),
    st.tuples(st.just("inner"), st.binary(max_size=40)),  # any TLSInnerPlaintext: empty, all zeros, ...
    st.tuples(st.just("key_update"), st.sampled_from(KeyUpdateRequest)),
    st.tuples(st.just("data"), st.binary(max_size=300)),
)


@settings(FUZZ, max_examples=1500)
@given(inputs=st.lists(connected_input, min_size=1, max_size=8))
def test_random_records_into_a_connected_server(setup, inputs):
    client = setup.client().drive_to(State.CONNECTED)
    framing_intact = True  # no partial record pending, so a whole record is read as sent
    for kind, *args in inputs:
        if kind == "raw":
            data = args[0]
            framing_intact = False
        elif kind == "plain":
            data = record(*args)
        elif kind == "protected":
            data = client.protect(*args)
        elif kind == "handshake":
            data = client.protect(ContentType.HANDSHAKE, handshake_message(*args))
        elif kind == "inner":
            data = client.write.seal_inner(args[0])
        elif kind == "key_update":
            data = client.protect(ContentType.HANDSHAKE, handshake_message(HandshakeType.KEY_UPDATE, u8(args[0])))
        else:
            data = client.protect(ContentType.APPLICATION_DATA, args[0])
        outcome = feed(client, data)
        if isinstance(outcome, TLSError) or CloseNotifyReceived() in outcome:
            break
        for event in outcome:
            if isinstance(event, KeyUpdateReceived):
                client.write = client.write.next()  # the server took a KeyUpdate: follow it
        if kind == "data" and framing_intact:
            assert outcome == [DataReceived(args[0])]
        assert client.server.state is State.CONNECTED


# --- (d) every state x every kind of record -------------------------------------------------------

KINDS = (
    [("record", t, False) for t in CONTENT_TYPES]
    + [("record", t, True) for t in CONTENT_TYPES]
    + [("handshake", t, False) for t in HANDSHAKE_TYPES]
    + [("handshake", t, True) for t in HANDSHAKE_TYPES]
    + [("inner", None, True)]  # the payload is the whole TLSInnerPlaintext
)
SWEEP = [
    pytest.param(state, kind, id=f"{state.name}-{kind[0]}-{kind[1]}-{'protected' if kind[2] else 'plain'}")
    for state in STATES for kind in KINDS
    if state in ENCRYPTING_STATES or not kind[2]
]


def build(client: RawClient, kind: tuple, payload: bytes) -> bytes:
    what, code, protected = kind
    if what == "inner":
        return client.write.seal_inner(payload)
    content = handshake_message(code, payload) if what == "handshake" else payload
    content_type = ContentType.HANDSHAKE if what == "handshake" else code
    return client.protect(content_type, content) if protected else record(content_type, content)


@pytest.mark.parametrize("state, kind", SWEEP)
@settings(FUZZ, max_examples=20)
@given(payload=st.binary(max_size=120))
def test_every_state_and_record_kind(setup, state, kind, payload):
    """h2's state x input sweep: each reachable state, each record type and handshake type,
    plaintext and (once there are keys) protected, with random content."""
    client = setup.client().drive_to(state)
    outcome = feed(client, build(client, kind, payload))
    if isinstance(outcome, PeerAlert):
        assert carries_an_alert(kind, payload), "PeerAlert from something that is no alert"


def carries_an_alert(kind: tuple, payload: bytes) -> bool:
    """An alert record, or a TLSInnerPlaintext whose content type (its last nonzero byte) is alert.

    A protected record of content type 0 is content + a zero byte: zeros are padding (RFC 8446 5.4),
    so its real type is the content's last nonzero byte (b"\\x00\\x01\\x15" + 0 is an alert)."""
    what, code, protected = kind
    if what == "inner":
        inner = payload
    elif what == "record" and protected:
        inner = payload + bytes([code])
    else:
        return what == "record" and code == ContentType.ALERT
    return inner.rstrip(b"\x00")[-1:] == bytes([ContentType.ALERT])


# --- (e) buffers stay bounded ----------------------------------------------------------------------

def buffered(server) -> dict[str, int]:
    """Bytes held inside the engine: input not yet parsed, a partial handshake message, output."""
    return {
        "records": server._records.buffered(),
        "handshake": len(server._handshake_buffer),
        "pending": len(server._pending_handshake),
        "output": sum(len(piece) for piece in server._out),
    }


def assert_bounded(server) -> None:
    held = buffered(server)
    if server.state is not State.CLOSED and not server._peer_closed:
        assert held["records"] <= HEADER_LEN + MAX_CIPHERTEXT, held  # at most one partial record
    assert held["handshake"] <= server.config.max_handshake_message + 4, held
    assert held["pending"] <= OUTPUT_BOUND, held
    assert held["output"] <= OUTPUT_BOUND, held


def feed_undrained(server, data: bytes) -> None:
    try:
        server.receive_data(data)
    except TLSAlert as alert:
        assert not (isinstance(alert, InternalError) and alert.__cause__ is not None), repr(alert.__cause__)
    except PeerAlert:
        pass


@pytest.mark.parametrize("state, kind", SWEEP)
def test_repeated_record_kind_keeps_buffers_bounded(setup, state, kind):
    """The same kind of record 200 times, nothing drained: the engine holds no more than a bound."""
    client = setup.client().drive_to(state)
    payload = bytes(8) if kind[0] == "record" else u8(1)
    stream = b"".join(build(client, kind, payload) for _ in range(200))
    for piece in cut(stream, list(range(0, len(stream), 997))):
        feed_undrained(client.server, piece)
        assert_bounded(client.server)


@pytest.mark.parametrize("state", STATES)
@settings(FUZZ, max_examples=8)
@given(
    seed=st.integers(0, 2**32),
    chunk_size=st.sampled_from([4096, 1, 100, 16389, 70000]),
    # Random bytes, or behind the header of the largest record the engine reads whole.
    header=st.sampled_from([b"", record(ContentType.HANDSHAKE, b"")[:3] + (2**14).to_bytes(2, "big"),
                            record(ContentType.APPLICATION_DATA, b"")[:3] + MAX_CIPHERTEXT.to_bytes(2, "big")]),
)
def test_large_random_input_keeps_buffers_bounded(setup, state, seed, chunk_size, header):
    """A megabyte of random bytes, nothing drained: the engine holds at most a record and its output."""
    client = setup.client().drive_to(state)
    data = header + random.Random(seed).randbytes(2**20)
    for start in range(0, len(data), chunk_size):
        piece = data[start:start + chunk_size]
        feed_undrained(client.server, piece)
        assert_bounded(client.server)
        if client.server.state is State.CLOSED:
            held = buffered(client.server)
            feed_undrained(client.server, piece)
            assert buffered(client.server) == held  # a closed connection takes nothing more
            break


@pytest.mark.parametrize("state", [State.START, State.CONNECTED])
def test_endless_harmless_records_keep_buffers_bounded(setup, state):
    """Records the engine accepts forever (user_canceled warnings, empty application data)."""
    client = setup.client().drive_to(state)
    warning = bytes((AlertLevel.WARNING, 90))  # user_canceled
    for _ in range(50):
        if state is State.START:
            batch = record(ContentType.ALERT, warning) * 400
        else:
            batch = b"".join(client.protect(ContentType.APPLICATION_DATA, b"") for _ in range(200))
            batch += b"".join(client.protect(ContentType.ALERT, warning) for _ in range(200))
        feed_undrained(client.server, batch)
        assert_bounded(client.server)
    assert client.server.state is state


def test_largest_handshake_message_is_assembled_within_bounds(setup):
    """A ClientHello of exactly max_handshake_message bytes in 500-byte records is buffered, then answered."""
    client = setup.client()
    hello = client.hello()
    body_length = len(client.encode_hello(hello)) - 4
    hello.add(0x7A7A, bytes(setup.config.max_handshake_message - body_length - 4))
    message = client.encode_hello(hello)
    assert len(message) == 4 + setup.config.max_handshake_message
    stream = records(ContentType.HANDSHAKE, message, list(range(0, len(message), 500)))
    for piece in cut(stream, list(range(0, len(stream), 4096))):
        feed(client, piece)
        assert_bounded(client.server)
    assert client.server.state is State.WAIT_FINISHED


def test_key_update_requests_while_silent_get_one_answer(setup):
    """RFC 9846 4.7.3: a peer that gets many KeyUpdate requests while silent answers with one update.

    Answering each one lets a client that never reads grow the server's
    output queue by one record per record it sends.
    """
    client = setup.client().drive_to(State.CONNECTED)
    stream = b""
    for _ in range(3000):
        stream += client.protect(ContentType.HANDSHAKE,
                                 handshake_message(HandshakeType.KEY_UPDATE, u8(KeyUpdateRequest.REQUESTED)))
        client.write = client.write.next()
    events = client.send(stream)
    assert len(events) == 3000
    answers = [m for m in client.server_messages if m[0] == HandshakeType.KEY_UPDATE]
    assert len(answers) == 1, f"{len(answers)} KeyUpdates queued ({len(client.last_output)} bytes)"
