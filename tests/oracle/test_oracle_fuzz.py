"""Malformed input against a running `yestls oracle serve`: an error reply or a closed connection, never a hang.

One oracle subprocess serves the whole module. Hypothesis sends it random
bytes, real frames with bytes flipped, lengths changed or cut short, and
random JSON metas with random tails, each on a fresh connection, some after
the edge's identity proof. What comes back is held to a model of the framing
(relay.rpc's own FrameDecoder with the oracle's cap): a stream that breaks
the framing is closed; otherwise every whole request gets exactly one reply,
matched by id, never `internal`; and when we stop sending, the oracle closes
too. Every read has a timeout, so a stuck oracle fails the test instead of
hanging it. Mutated transcripts in well-formed sign requests get a policy
refusal or `bad_request`, or a signature that verifies over the mutated
transcript's own hash. At the end the oracle is still running, on its first
signing process, and signs a valid request.
"""

import base64
import collections
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.oracle.policy import INTERNAL_ERROR, REFUSAL_CODES
from relay.oracle.protocol import MAX_FRAME, auth_message
from relay.rpc import Code, Frame, FrameDecoder, FrameError, Kind, encode_frame
from relay.tls import Group, ServerConfig, SignatureRequest, SignatureScheme
from relay.tls.signing import certificate_verify_content, transcript_hash, verify

from ..memory import MemoryPair, client_context
from ..oracle_home import make_oracle_home, run_oracle
from ..rawclient import split_handshake

READ_TIMEOUT = 5.0
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])
# Error codes an oracle may answer with; `internal` (a handler bug) and policy.internal_error are not among them.
EXPECTED_CODES = (frozenset({Code.BAD_REQUEST, Code.UNKNOWN_METHOD, Code.NOT_AUTHENTICATED, "unknown_key"})
                  | (REFUSAL_CODES - {INTERNAL_ERROR}))
SIGN_REFUSALS = frozenset({Code.BAD_REQUEST}) | (REFUSAL_CODES - {INTERNAL_ERROR})


# --- the oracle and a blocking client with bounded reads ------------------------------------------------

@pytest.fixture(scope="module")
def oracle(pki, tmp_path_factory):
    # No rate limit or connection cap in the way: the fuzz opens a connection per example.
    home = make_oracle_home(tmp_path_factory.mktemp("fuzz-oracle"), pki, ("ecdsa-p256",),
                            peer_options="max_connections = 1000\nrate = 1000000.0\nburst = 1000000")
    with run_oracle(home) as process:
        yield home, process


@pytest.fixture(scope="module")
def identity(oracle):
    return oracle[0].identity


@pytest.fixture(scope="module")
def key_id(oracle):
    return oracle[0].key_ids["ecdsa-p256"]


class Wire:
    """One connection to the oracle, read with a timeout: silence past READ_TIMEOUT fails the test."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT)
        self.sock.settimeout(READ_TIMEOUT)
        self.decoder = FrameDecoder(1 << 20)
        self.frames: list[Frame] = []
        self.closed = False
        self.next_id = 1

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True  # the oracle closed while we were still sending

    def _read(self) -> bool:
        """One recv; False once the oracle has closed."""
        if self.closed:
            return False
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        except socket.timeout:
            raise AssertionError(f"the oracle neither answered nor closed within {READ_TIMEOUT} s") from None
        if not chunk:
            self.closed = True
            return False
        self.frames += self.decoder.feed(chunk)  # a reply that breaks the framing fails the test here
        return True

    def replies(self, count: int) -> list[Frame]:
        for _ in range(100_000):
            if len(self.frames) >= count:
                break
            if not self._read():
                raise AssertionError(f"the oracle closed after {len(self.frames)} of {count} replies")
        got, self.frames = self.frames[:count], self.frames[count:]
        return got

    def finish(self) -> list[Frame]:
        """Stop sending; the oracle must close. Returns any replies that came first."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.closed = True
        for _ in range(100_000):
            if not self._read():
                break
        else:
            raise AssertionError("the oracle kept sending")
        self.sock.close()
        got, self.frames = self.frames, []
        return got

    def call(self, method: str, params: dict | None = None, tail: bytes = b"") -> Frame:
        frame_id = self.next_id
        self.next_id += 1
        self.send(encode_frame(Kind.REQUEST, frame_id, {"method": method, **(params or {})}, tail))
        [reply] = self.replies(1)
        assert reply.id == frame_id
        return reply

    def authenticate(self, identity) -> None:
        reply = self.call("hello")
        assert reply.kind == Kind.RESPONSE
        message = auth_message(bytes.fromhex(reply.meta["challenge"]), self.sock.getpeername(),
                               self.sock.getsockname())
        reply = self.call("auth", {"signature": base64.b64encode(identity.sign(message)).decode()})
        assert reply.kind == Kind.RESPONSE, reply.meta


def connect(oracle, identity=None) -> Wire:
    home, process = oracle
    assert process.process.poll() is None, f"the oracle exited:\n{process.log()}"
    wire = Wire(home.port)
    if identity is not None:
        wire.authenticate(identity)
    return wire


def model(data: bytes) -> tuple[list[Frame], bool]:
    """What the oracle's framing makes of `data`: the whole requests in it, and whether it breaks the framing."""
    try:
        frames = FrameDecoder(MAX_FRAME).feed(data)
    except FrameError:
        return [], True
    return [f for f in frames if f.kind == Kind.REQUEST], False


def assert_reply_is_sane(reply: Frame) -> None:
    assert reply.kind in (Kind.RESPONSE, Kind.ERROR)
    if reply.kind == Kind.ERROR:
        assert reply.meta.get("code") in EXPECTED_CODES, reply.meta
        assert isinstance(reply.meta.get("message"), str)


def exchange(oracle, data: bytes, identity=None) -> None:
    """Send `data` on a fresh connection and hold the answer to the framing model."""
    wire = connect(oracle, identity)
    requests, broken = model(data)
    wire.send(data)
    if broken:
        # Closed; replies to whole requests before the break may or may not have gone out first.
        for reply in wire.finish():
            assert_reply_is_sane(reply)
        assert wire.closed
        return
    replies = wire.replies(len(requests))
    assert collections.Counter(r.id for r in replies) == collections.Counter(r.id for r in requests)
    for reply in replies:
        assert_reply_is_sane(reply)
    assert wire.finish() == [], "more replies than requests"


# --- transcripts --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def requests(pki) -> list[SignatureRequest]:
    """Real SignatureRequests: a plain handshake and one after a HelloRetryRequest (the engine wants P-384)."""
    leaf = pki.leaves["ecdsa-p256"]
    found = []
    for config in (ServerConfig([leaf.chain]), ServerConfig([leaf.chain], groups=(Group.SECP384R1,))):
        pair = MemoryPair(config, client_context(pki.ca_pem), leaf.key)
        pair.handshake()
        assert pair.server_error is None
        found += pair.signature_requests
    assert [len(r.handshake_messages) for r in found] == [4, 6]
    return found


# --- mutations --------------------------------------------------------------------------------------------------

lengths = st.one_of(st.integers(0, 2**32 - 1),
                    st.sampled_from([0, 1, 3, 4, 5, 12, MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1, 2**31, 2**32 - 1]))
byte_edit = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(1, 255)),
    st.tuples(st.just("u32"), st.integers(0, 2**16), lengths),
    st.tuples(st.just("frame length"), st.just(8), lengths),
    st.tuples(st.just("meta length"), st.just(12), lengths),
    st.tuples(st.just("truncate"), st.integers(0, 2**16), st.none()),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.integers(1, 16)),
)


def edited(data: bytes, edits) -> bytes:
    for op, where, arg in edits:
        k = where % (len(data) + 1)
        if op == "flip" and k < len(data):
            data = data[:k] + bytes((data[k] ^ arg,)) + data[k + 1:]
        elif op in ("u32", "frame length", "meta length"):
            k = where if op != "u32" else k
            data = data[:k] + arg.to_bytes(4, "big") + data[k + 4:]
        elif op == "truncate":
            data = data[:k]
        elif op == "insert":
            data = data[:k] + arg + data[k:]
        elif op == "delete":
            data = data[:k] + data[k + arg:]
    return data


def base_frames(key_id: str, requests: list[SignatureRequest]) -> list[bytes]:
    plain = requests[0]
    return [
        encode_frame(Kind.REQUEST, 1, {"method": "ping"}),
        encode_frame(Kind.REQUEST, 2, {"method": "hello"}),
        encode_frame(Kind.REQUEST, 3, {"method": "auth", "signature": base64.b64encode(bytes(64)).decode()}),
        encode_frame(Kind.REQUEST, 4, {"method": "certificates"}),
        encode_frame(Kind.REQUEST, 5, {"method": "sign", "key_id": key_id, "scheme": int(plain.scheme)},
                     b"".join(plain.handshake_messages)),
        encode_frame(Kind.RESPONSE, 6, {}, b"sig"),
        encode_frame(Kind.ERROR, 7, {"code": "busy", "message": ""}),
    ]


# --- random bytes and mutated frames -------------------------------------------------------------------------------

@FUZZ
@given(data=st.one_of(st.binary(min_size=1, max_size=600),
                      st.binary(min_size=1, max_size=40).map(lambda b: b"\x01\x01\x00\x00" + b)))
def test_random_bytes_get_an_error_or_a_close(oracle, data):
    exchange(oracle, data)


@FUZZ
@given(picks=st.lists(st.integers(0, 6), min_size=1, max_size=4), edits=st.lists(byte_edit, min_size=1, max_size=3),
       authenticated=st.booleans())
def test_mutated_frames_get_an_error_or_a_close(oracle, identity, key_id, requests, picks, edits, authenticated):
    frames = base_frames(key_id, requests)
    data = edited(b"".join(frames[i] for i in picks), edits)
    exchange(oracle, data, identity if authenticated else None)


# --- random JSON metas and tails ---------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
KEY = object()  # stands for the oracle's real key id, known only once it runs
metas = st.fixed_dictionaries({}, optional={
    "method": st.sampled_from(["ping", "hello", "auth", "certificates", "sign", "decrypt"]) | json_values,
    "key_id": st.just(KEY) | json_values,
    "scheme": st.sampled_from([0x0403, 0x0503, 0x0804, 0x0807]) | json_values,
    "signature": st.text(max_size=100) | json_values,
    "challenge": json_values,
}).flatmap(lambda fixed: st.dictionaries(st.text(max_size=8), json_values, max_size=2).map(
    lambda extra: {**extra, **fixed}))


@FUZZ
@given(batch=st.lists(st.tuples(st.integers(0, 2**32 - 1), metas, st.binary(max_size=200)), min_size=1, max_size=4),
       authenticated=st.booleans())
def test_random_metas_and_tails_get_one_sane_reply_each(oracle, identity, key_id, batch, authenticated):
    data = b"".join(encode_frame(Kind.REQUEST, frame_id, {k: key_id if v is KEY else v for k, v in meta.items()},
                                 tail)
                    for frame_id, meta, tail in batch)
    exchange(oracle, data, identity if authenticated else None)


sign_metas = st.fixed_dictionaries({"method": st.just("sign")}, optional={
    "key_id": st.just(KEY) | json_values,
    "scheme": st.sampled_from([0x0403, 0x0503, 0x0804, 0x0807]) | json_values,
})


@FUZZ
@given(batch=st.lists(st.tuples(st.integers(0, 2**32 - 1), sign_metas, st.binary(max_size=200)), min_size=1,
                      max_size=4))
def test_random_sign_params_after_auth_get_one_sane_reply_each(oracle, identity, key_id, batch):
    """The sign method's own parameters, any JSON value, from an authenticated edge."""
    data = b"".join(encode_frame(Kind.REQUEST, frame_id, {k: key_id if v is KEY else v for k, v in meta.items()},
                                 tail)
                    for frame_id, meta, tail in batch)
    exchange(oracle, data, identity)


# --- mutated sign requests, after a valid auth ----------------------------------------------------------------------

message_edit = st.one_of(
    byte_edit,
    st.tuples(st.just("drop message"), st.integers(0, 5), st.none()),
    st.tuples(st.just("repeat message"), st.integers(0, 5), st.none()),
    st.tuples(st.just("swap messages"), st.integers(0, 5), st.integers(0, 5)),
)


def mutated_transcript(msgs: tuple[bytes, ...], edits) -> bytes:
    msgs = list(msgs)
    for op, where, arg in edits:
        if op == "drop message" and len(msgs) > 1:
            del msgs[where % len(msgs)]
        elif op == "repeat message":
            msgs.insert(where % len(msgs), msgs[where % len(msgs)])
        elif op == "swap messages":
            i, j = where % len(msgs), arg % len(msgs)
            msgs[i], msgs[j] = msgs[j], msgs[i]
        else:
            i = where % len(msgs)
            msgs[i] = edited(msgs[i], [(op, where if op not in ("frame length", "meta length") else 0, arg)])
    return b"".join(msgs)


def assert_refused_or_signed_as_sent(reply: Frame, data: bytes, scheme: int, public_key) -> None:
    if reply.kind == Kind.ERROR:
        assert reply.meta["code"] in SIGN_REFUSALS, reply.meta
        return
    assert reply.kind == Kind.RESPONSE
    # Signed: then over the transcript it was sent, hashed with SHA-256 or SHA-384 (the suite's hash).
    contents = [certificate_verify_content(transcript_hash(name, split_handshake(data))) for name in ("sha256", "sha384")]
    assert any(verify(public_key, scheme, content, reply.tail) for content in contents), data.hex()


@FUZZ
@given(batch=st.lists(st.tuples(st.integers(0, 1), st.lists(message_edit, min_size=1, max_size=3)),
                      min_size=1, max_size=4))
def test_mutated_sign_requests_get_a_policy_refusal_or_their_own_signature(oracle, identity, key_id, requests, pki,
                                                                            batch):
    public_key = pki.leaves["ecdsa-p256"].key.public_key()
    wire = connect(oracle, identity)
    sent = {}
    frames = []
    for n, (which, edits) in enumerate(batch):
        request = requests[which]
        data = mutated_transcript(request.handshake_messages, edits)
        frame_id = 100 + n
        sent[frame_id] = (data, int(request.scheme))
        frames.append(encode_frame(Kind.REQUEST, frame_id, {"method": "sign", "key_id": key_id,
                                                             "scheme": int(request.scheme)}, data))
    wire.send(b"".join(frames))  # all in flight at once
    replies = wire.replies(len(frames))
    assert sorted(r.id for r in replies) == sorted(sent)
    for reply in replies:
        assert_refused_or_signed_as_sent(reply, *sent[reply.id], public_key)
    assert wire.finish() == []


@FUZZ
@given(scheme=st.one_of(st.integers(-1, 0x10000), json_values), data=st.binary(max_size=400))
def test_random_schemes_and_transcripts_are_refused(oracle, identity, key_id, scheme, data):
    wire = connect(oracle, identity)
    reply = wire.call("sign", {"key_id": key_id, "scheme": scheme}, data)
    assert reply.kind == Kind.ERROR and reply.meta["code"] in SIGN_REFUSALS, reply.meta
    assert wire.finish() == []


# --- afterwards ---------------------------------------------------------------------------------------------------------

def test_after_the_fuzz_the_oracle_still_signs(oracle, identity, key_id, requests, pki):
    """Last in the module: the same oracle process, on its first signing process, signs a valid request."""
    home, process = oracle
    assert process.process.poll() is None, f"the oracle exited:\n{process.log()}"
    wire = connect(oracle, identity)
    for request in requests:
        reply = wire.call("sign", {"key_id": key_id, "scheme": int(request.scheme)},
                          b"".join(request.handshake_messages))
        assert reply.kind == Kind.RESPONSE, reply.meta
        assert verify(pki.leaves["ecdsa-p256"].key.public_key(), request.scheme, request.content, reply.tail)
    assert wire.finish() == []
    log = process.log()
    assert "signing process ended" not in log, log[-4000:]
    assert SignatureScheme.ECDSA_SECP256R1_SHA256 in {r.scheme for r in requests}
