"""`yestls oracle serve`, from the outside: it signs live TLS 1.3 handshakes and refuses, audits and counts the rest.

Each test runs against a real oracle subprocess (tests/oracle_home.py) and
speaks relay.rpc to it the way the edge does, then looks at what a user of
the oracle would see: the error code the client gets, the line in the audit
log, and the refusal counter on the metrics page. Valid transcripts come
from the engine handshaking with Python's ssl client in memory (MemoryPair);
off-policy ones are the attacks a stolen edge would try: a bare digest,
arbitrary bytes, a TLS 1.2 flight, another key's handshake, a name outside the
certificate. Then the connection-level defences: the source-address
allowlist, the identity proof (wrong key, replayed answers, single-use
challenges), the rate limit, the connection cap and the frame size cap. Last,
what a process on the edge host (not the edge service) can do to the oracle:
hold connections without authenticating (the edge still gets in and gets its
signatures), trickle until the auth deadline closes it, flood it with refusals
(counted in full, summarized in the audit), send 1 MiB fields (bounded audit
lines); and the audit log stays under its configured size.
(tests/test_tunnel_gate.py runs the gate's attacks in process, in more variants.)
"""

import asyncio
import base64
import hashlib
import json
import os
import ssl
import time
import urllib.request
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from relay import rpc
from relay.audit import MAX_LINE, MIN_MAX_BYTES
from relay.oracle.protocol import MAX_FRAME, SERVICE, auth_message
from relay.rpc import HEADER, VERSION, Code, Kind, RemoteError
from relay.tls import Group, ServerConfig, SignatureRequest, SignatureScheme
from relay.tls.keyschedule import SUITES
from relay.tls.signing import certificate_verify_content, tls12_nonce, tls12_server_random, verify

from .. import tls12
from ..hostile_peers import (
    close_all,
    closed_by_peer,
    open_sockets,
    prove,
    request,
    send,
    send_unless_closed,
    still_open,
)
from ..memory import MemoryPair, client_context
from ..oracle_home import OracleHome, OracleProcess, free_port, make_oracle_home, run_oracle
from ..rawclient import RawClient, server_name_data

TIMEOUT = 20.0
P256 = SignatureScheme.ECDSA_SECP256R1_SHA256
P384 = SignatureScheme.ECDSA_SECP384R1_SHA384


def run(coro):
    """Run a test coroutine to completion; one that hangs fails instead of stalling the suite."""
    async def bounded():
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


# --- the oracle and what it writes -----------------------------------------------------------------------

@dataclass
class Oracle:
    home: OracleHome
    process: OracleProcess
    metrics_port: int

    @property
    def port(self) -> int:
        return self.home.port

    def key_id(self, key_type: str = "ecdsa-p256") -> str:
        return self.home.key_ids[key_type]

    def audit_mark(self) -> int:
        return len(self.home.audit_lines())

    def audit_since(self, mark: int) -> list[dict]:
        return self.home.audit_lines()[mark:]

    def metrics(self) -> dict[tuple[str, tuple], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def refusals(self, reason: str) -> float:
        return self.metrics().get(("yestls_oracle_refusals_total", (("reason", reason),)), 0.0)

    def assert_alive(self) -> None:
        assert self.process.process.poll() is None, f"the oracle exited:\n{self.process.log()}"


def start(tmp_path, pki, peer_options: str = "", key_types=("ecdsa-p256",), settings: str = ""):
    metrics_port = free_port()
    home = make_oracle_home(tmp_path, pki, key_types, peer_options=peer_options, settings=settings,
                            metrics_port=metrics_port)
    return home, metrics_port


@pytest.fixture(scope="module")
def oracle(pki, tmp_path_factory):
    """One oracle for the module: P-256 and P-384 keys, room for many connections, the default rate limit.

    Its tests count audit lines one by one, so its refusal lines are never summarized (a large burst); the
    summaries have their own oracle below.
    """
    home, metrics_port = start(tmp_path_factory.mktemp("oracle"), pki, "max_connections = 32",
                               ("ecdsa-p256", "ecdsa-p384"), settings="audit_refusal_burst = 100000")
    with run_oracle(home) as process:
        yield Oracle(home, process, metrics_port)
        assert process.process.poll() is None, f"the oracle died during the module:\n{process.log()}"


# --- transcripts ---------------------------------------------------------------------------------------------

def handshake_request(pki, key_type: str = "ecdsa-p256", server_hostname: str = "mx.example.org",
                      **context_options) -> SignatureRequest:
    """The engine's SignatureRequest in a real handshake with Python's ssl client (signed locally here)."""
    leaf = pki.leaves[key_type]
    pair = MemoryPair(ServerConfig([leaf.chain]), client_context(pki.ca_pem, **context_options), leaf.key,
                      server_hostname=server_hostname)
    pair.handshake()
    assert pair.server_error is None and pair.client.version() == "TLSv1.3"
    [request] = pair.signature_requests
    return request


def transcript(request: SignatureRequest) -> bytes:
    return b"".join(request.handshake_messages)


def tls12_flight(pki) -> bytes:
    """What a stolen edge would send to get a TLS 1.2 ServerKeyExchange signed: a TLS 1.2 client's real hello."""
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="mx.example.org")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    record = outgoing.read()
    hello = record[5:5 + int.from_bytes(record[3:5], "big")]
    chain = pki.leaves["ecdsa-p256"].chain
    params = tls12.ecdhe_params(Group.X25519, os.urandom(32))
    return b"".join([
        hello,
        tls12.server_hello(os.urandom(32), 0xC02B),  # ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        tls12.certificate(chain.der_chain),
        tls12.server_key_exchange(params, P256, bytes(72)),
        tls12.server_hello_done(),
    ])


# --- speaking to the oracle ----------------------------------------------------------------------------------

async def connect(port: int, local_host: str | None = None) -> rpc.RpcConnection:
    loop = asyncio.get_running_loop()
    local = (local_host, 0) if local_host else None
    _, connection = await asyncio.wait_for(loop.create_connection(
        lambda: rpc.RpcConnection(max_frame=MAX_FRAME), "127.0.0.1", port, local_addr=local), 5)
    return connection


async def hello(connection: rpc.RpcConnection) -> bytes:
    reply = await connection.call("hello", timeout=5)
    assert reply.meta["service"] == "yestls-oracle" and reply.meta["version"] == 1
    challenge = bytes.fromhex(reply.meta["challenge"])
    assert len(challenge) == 32
    return challenge


def answer(identity: Ed25519PrivateKey, challenge: bytes, connection: rpc.RpcConnection) -> str:
    """The edge's auth signature: the server address as the oracle sees it (our peer), then ours."""
    transport = connection.transport
    message = auth_message(challenge, transport.get_extra_info("peername"), transport.get_extra_info("sockname"))
    return base64.b64encode(identity.sign(message)).decode()


async def authenticate(connection: rpc.RpcConnection, identity: Ed25519PrivateKey) -> str:
    signature = answer(identity, await hello(connection), connection)
    assert (await connection.call("auth", {"signature": signature}, timeout=5)).meta == {}
    return signature


async def edge(oracle: Oracle) -> rpc.RpcConnection:
    """A connection that has proved the edge's identity."""
    connection = await connect(oracle.port)
    await authenticate(connection, oracle.home.identity)
    return connection


async def sign(connection: rpc.RpcConnection, key_id: str, scheme: int, messages: bytes) -> rpc.Frame:
    return await connection.call("sign", {"key_id": key_id, "scheme": int(scheme)}, messages, timeout=10)


async def refusal(call) -> RemoteError:
    with pytest.raises(RemoteError) as refused:
        await call
    return refused.value


async def closed(connection: rpc.RpcConnection) -> None:
    connection.close()
    await asyncio.wait_for(connection.closed, 5)


def sign_refusal(oracle: Oracle, messages: bytes, code: str, key_type: str = "ecdsa-p256",
                 scheme: int = P256, key_id: str | None = None) -> tuple[RemoteError, list[dict]]:
    """Send one off-policy sign request on an authenticated connection; check code, audit line and metric."""
    key_id = key_id or oracle.key_id(key_type)
    mark, before = oracle.audit_mark(), oracle.refusals(code)

    async def main():
        connection = await edge(oracle)
        try:
            error = await refusal(sign(connection, key_id, scheme, messages))
            # The connection is still good for a valid request after a refusal.
            assert (await connection.call("ping", timeout=5)).meta == {}
            return error
        finally:
            await closed(connection)

    error = run(main())
    assert error.code == code, error
    assert error.message
    lines = [line for line in oracle.audit_since(mark) if line["method"] == "sign"]
    assert len(lines) == 1, lines
    [line] = lines
    assert line["outcome"] == f"refused:{code}"
    assert line["peer"] == "edge" and line["key_id"] == key_id and line["scheme"] == scheme
    assert "time" in line
    assert oracle.refusals(code) == before + 1
    oracle.assert_alive()
    return error, lines


# --- the positive path ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ecdsa-p384"])
def test_valid_transcript_is_signed_verified_and_audited(oracle, pki, key_type):
    request = handshake_request(pki, key_type)
    mark = oracle.audit_mark()
    signed_before = oracle.metrics().get(("yestls_oracle_requests_total", (("method", "sign"), ("outcome", "ok"))), 0)

    async def main():
        connection = await edge(oracle)
        try:
            return await sign(connection, oracle.key_id(key_type), request.scheme, transcript(request))
        finally:
            await closed(connection)

    reply = run(main())
    leaf = pki.leaves[key_type]
    assert verify(leaf.key.public_key(), request.scheme, request.content, reply.tail)

    lines = oracle.audit_since(mark)
    assert [line["method"] for line in lines] == ["auth", "sign"]
    assert lines[0]["outcome"] == "ok" and lines[0]["peer"] == "edge"
    line = lines[1]
    assert line["outcome"] == "signed" and line["peer"] == "edge"
    assert line["key_id"] == oracle.key_id(key_type) and line["scheme"] == request.scheme
    assert line["server_name"] == "mx.example.org" == request.server_name
    client_hello = request.handshake_messages[0]
    assert line["client_random"] == client_hello[6:38].hex()
    digest = hashlib.new(SUITES[request.cipher_suite].hash_name, transcript(request)).digest()
    assert line["transcript_hash"] == digest.hex()
    assert certificate_verify_content(digest) == request.content  # the hash audited is the one signed

    metrics = oracle.metrics()
    assert metrics[("yestls_oracle_requests_total", (("method", "sign"), ("outcome", "ok")))] == signed_before + 1
    assert metrics[("yestls_oracle_sign_seconds_count", ())] >= 1
    assert metrics[("yestls_oracle_in_flight", ())] == 0


def test_certificates_lists_public_material_only_after_auth(oracle, pki):
    async def main():
        connection = await connect(oracle.port)
        try:
            assert (await connection.call("ping", timeout=5)).meta == {}  # ping needs no auth
            early = await refusal(connection.call("certificates", timeout=5))
            await authenticate(connection, oracle.home.identity)
            return early, await connection.call("certificates", timeout=5)
        finally:
            await closed(connection)

    early, reply = run(main())
    assert early.code == Code.NOT_AUTHENTICATED
    listing = {entry["key_id"]: entry for entry in reply.meta["certificates"]}
    assert set(listing) == {oracle.key_id("ecdsa-p256"), oracle.key_id("ecdsa-p384")}
    p256 = listing[oracle.key_id("ecdsa-p256")]
    assert [base64.b64decode(der) for der in p256["chain"]] == list(pki.leaves["ecdsa-p256"].chain.der_chain)
    assert P256 in p256["schemes"]
    assert b"PRIVATE" not in repr(reply.meta).encode()


# --- policy refusals ------------------------------------------------------------------------------------------

def test_bare_digest_is_not_a_transcript(oracle, pki):
    request = handshake_request(pki)
    digest = hashlib.sha256(transcript(request)).digest()
    assert len(digest) == 32
    sign_refusal(oracle, digest, "policy.not_a_transcript")


def test_certificate_verify_content_is_not_a_transcript(oracle, pki):
    """The exact bytes the key would sign, handed over ready-made: still refused."""
    sign_refusal(oracle, handshake_request(pki).content, "policy.not_a_transcript")


@pytest.mark.parametrize("payload", [b"Pay 1000 EUR to the bearer of this message.\r\n", bytes(range(256)),
                                     b"\x01" + bytes(64)], ids=["text", "all byte values", "zeros"])
def test_arbitrary_bytes_are_not_a_transcript(oracle, pki, payload):
    sign_refusal(oracle, payload, "policy.not_a_transcript")


def test_empty_tail_is_not_a_transcript(oracle, pki):
    sign_refusal(oracle, b"", "policy.not_a_transcript")


def test_tls12_flight_is_not_tls13(oracle, pki):
    sign_refusal(oracle, tls12_flight(pki), "policy.not_tls13")


def test_another_keys_handshake_is_a_certificate_mismatch(oracle, pki):
    """A real P-384 handshake, sent for the P-256 key's signature: its Certificate is the other chain."""
    request = handshake_request(pki, "ecdsa-p384")
    sign_refusal(oracle, transcript(request), "policy.certificate_mismatch", "ecdsa-p256", P256)


def test_server_name_outside_the_certificate_is_refused(oracle, pki):
    # The engine has one chain and falls back to it; the client does not check names here.
    request = handshake_request(pki, server_hostname="evil.example.net", check_hostname=False)
    assert request.server_name == "evil.example.net"
    sign_refusal(oracle, transcript(request), "policy.sni_mismatch", scheme=request.scheme)


def test_scheme_the_key_cannot_make_is_refused(oracle, pki):
    request = handshake_request(pki)
    sign_refusal(oracle, transcript(request), "policy.scheme_mismatch", scheme=P384)


def test_handshake_that_selected_an_application_protocol_is_refused(oracle, pki):
    """An engine set up for HTTPS (h2) would complete this handshake; the oracle signs no ALPN handshake."""
    leaf = pki.leaves["ecdsa-p256"]
    context = client_context(pki.ca_pem)
    context.set_alpn_protocols(["h2"])
    pair = MemoryPair(ServerConfig([leaf.chain], alpn_protocols=(b"h2",)), context, leaf.key)
    pair.handshake()
    assert pair.client.selected_alpn_protocol() == "h2"
    [request] = pair.signature_requests
    error, [line] = sign_refusal(oracle, transcript(request), "policy.alpn_selected", scheme=request.scheme)
    assert "h2" in error.message and line["server_name"] == "mx.example.org"


def test_unknown_key_id_is_refused(oracle, pki):
    request = handshake_request(pki)
    sign_refusal(oracle, transcript(request), "unknown_key", key_id="00" * 16, scheme=request.scheme)


@pytest.mark.parametrize("key_id", [["00" * 16], {"id": "00" * 16}], ids=["a list", "an object"])
def test_key_id_that_is_not_a_string_is_a_bad_request(oracle, pki, key_id):
    """Malformed parameters are the client's error, refused and audited: not `internal`, which the edge retries."""
    request = handshake_request(pki)
    mark = oracle.audit_mark()

    async def main():
        connection = await edge(oracle)
        try:
            return await refusal(connection.call("sign", {"key_id": key_id, "scheme": int(request.scheme)},
                                                 transcript(request), timeout=5))
        finally:
            await closed(connection)

    error = run(main())
    assert error.code in (Code.BAD_REQUEST, "unknown_key"), error
    lines = [line for line in oracle.audit_since(mark) if line["method"] == "sign"]
    assert [line["outcome"] for line in lines] == [f"refused:{error.code}"], lines


def test_decrypt_does_not_exist(oracle):
    """The oracle has no decrypt operation (a Bleichenbacher oracle); asking is refused and audited."""
    mark, before = oracle.audit_mark(), oracle.refusals(Code.UNKNOWN_METHOD)

    async def main():
        connection = await edge(oracle)
        try:
            return await refusal(connection.call("decrypt", {"key_id": oracle.key_id()}, bytes(256), timeout=5))
        finally:
            await closed(connection)

    assert run(main()).code == Code.UNKNOWN_METHOD
    [line] = [line for line in oracle.audit_since(mark) if line["method"] == "decrypt"]
    assert line["outcome"] == f"refused:{Code.UNKNOWN_METHOD}" and line["peer"] == "edge"
    assert oracle.refusals(Code.UNKNOWN_METHOD) == before + 1


# --- authentication --------------------------------------------------------------------------------------------

def test_sign_before_auth_is_refused_and_audited(oracle, pki):
    request = handshake_request(pki)
    mark, before = oracle.audit_mark(), oracle.refusals(Code.NOT_AUTHENTICATED)

    async def main():
        connection = await connect(oracle.port)
        try:
            without_hello = await refusal(sign(connection, oracle.key_id(), request.scheme, transcript(request)))
            await hello(connection)
            without_auth = await refusal(sign(connection, oracle.key_id(), request.scheme, transcript(request)))
            return without_hello, without_auth
        finally:
            await closed(connection)

    errors = run(main())
    assert [e.code for e in errors] == [Code.NOT_AUTHENTICATED] * 2
    assert oracle.refusals(Code.NOT_AUTHENTICATED) == before + 2
    lines = oracle.audit_since(mark)
    assert not [line for line in lines if line["outcome"] == "signed"]
    assert [(line["method"], line["outcome"]) for line in lines] == [("sign", "refused:not_authenticated")] * 2, \
        f"every request is one audit line; a refused sign before auth wrote: {lines}"


def test_auth_signed_by_another_key_is_refused(oracle, pki):
    request = handshake_request(pki)
    stranger = Ed25519PrivateKey.generate()
    mark, before = oracle.audit_mark(), oracle.refusals(Code.NOT_AUTHENTICATED)

    async def main():
        connection = await connect(oracle.port)
        try:
            signature = answer(stranger, await hello(connection), connection)
            auth = await refusal(connection.call("auth", {"signature": signature}, timeout=5))
            after = await refusal(sign(connection, oracle.key_id(), request.scheme, transcript(request)))
            return auth, after
        finally:
            await closed(connection)

    auth, after = run(main())
    assert auth.code == Code.NOT_AUTHENTICATED and after.code == Code.NOT_AUTHENTICATED
    [line] = [line for line in oracle.audit_since(mark) if line["method"] == "auth"]
    assert line["outcome"] == "refused:not_authenticated" and line["peer"] == "edge"
    assert not [line for line in oracle.audit_since(mark) if line["outcome"] in ("ok", "signed")]
    assert oracle.refusals(Code.NOT_AUTHENTICATED) >= before + 2


@pytest.mark.parametrize("signature", ["not base64!", base64.b64encode(bytes(64)).decode(), ""],
                         ids=["not base64", "zeros", "empty"])
def test_malformed_auth_signature_is_refused(oracle, signature):
    mark = oracle.audit_mark()

    async def main():
        connection = await connect(oracle.port)
        try:
            await hello(connection)
            error = await refusal(connection.call("auth", {"signature": signature}, timeout=5))
            still = await refusal(connection.call("certificates", timeout=5))
            return error, still
        finally:
            await closed(connection)

    error, still = run(main())
    assert error.code in (Code.BAD_REQUEST, Code.NOT_AUTHENTICATED)
    assert still.code == Code.NOT_AUTHENTICATED
    [line] = [line for line in oracle.audit_since(mark) if line["method"] == "auth"]
    assert line["outcome"] == f"refused:{error.code}"


def test_replayed_challenge_answer_is_refused_on_another_connection(oracle, pki):
    request = handshake_request(pki)
    mark, before = oracle.audit_mark(), oracle.refusals(Code.NOT_AUTHENTICATED)

    async def main():
        first = await connect(oracle.port)
        second = await connect(oracle.port)
        try:
            recorded = await authenticate(first, oracle.home.identity)  # what an eavesdropper on the edge saw
            await hello(second)
            replay = await refusal(second.call("auth", {"signature": recorded}, timeout=5))
            after = await refusal(sign(second, oracle.key_id(), request.scheme, transcript(request)))
            # The genuine connection is unaffected.
            signed = await sign(first, oracle.key_id(), request.scheme, transcript(request))
            return replay, after, signed
        finally:
            await closed(first)
            await closed(second)

    replay, after, signed = run(main())
    assert replay.code == Code.NOT_AUTHENTICATED and after.code == Code.NOT_AUTHENTICATED
    assert verify(pki.leaves["ecdsa-p256"].key.public_key(), request.scheme, request.content, signed.tail)
    outcomes = [(line["method"], line["outcome"]) for line in oracle.audit_since(mark)]
    assert outcomes.count(("auth", "ok")) == 1
    assert outcomes.count(("auth", "refused:not_authenticated")) == 1
    assert outcomes.count(("sign", "signed")) == 1
    assert oracle.refusals(Code.NOT_AUTHENTICATED) >= before + 2


def test_old_answer_is_refused_after_a_new_hello_on_the_same_connection(oracle):
    mark = oracle.audit_mark()

    async def main():
        connection = await connect(oracle.port)
        try:
            recorded = await authenticate(connection, oracle.home.identity)
            await hello(connection)  # a new challenge: the connection is unauthenticated again
            replay = await refusal(connection.call("auth", {"signature": recorded}, timeout=5))
            after = await refusal(connection.call("certificates", timeout=5))
            return replay, after
        finally:
            await closed(connection)

    replay, after = run(main())
    assert replay.code == Code.NOT_AUTHENTICATED and after.code == Code.NOT_AUTHENTICATED
    outcomes = [(line["method"], line["outcome"]) for line in oracle.audit_since(mark)]
    assert outcomes[:2] == [("auth", "ok"), ("auth", "refused:not_authenticated")]


def test_a_challenge_answers_one_auth_only(oracle):
    """Single use, right or wrong: a second auth on one challenge is refused, even with the right answer."""
    mark = oracle.audit_mark()
    stranger = Ed25519PrivateKey.generate()

    async def main():
        connection = await connect(oracle.port)
        try:
            # Right, then the same answer again.
            signature = await authenticate(connection, oracle.home.identity)
            again = await refusal(connection.call("auth", {"signature": signature}, timeout=5))
            # Wrong, then right, on one fresh challenge: no second try.
            challenge = await hello(connection)
            wrong = await refusal(connection.call("auth", {"signature": answer(stranger, challenge, connection)},
                                                  timeout=5))
            right_too_late = await refusal(connection.call(
                "auth", {"signature": answer(oracle.home.identity, challenge, connection)}, timeout=5))
            still = await refusal(connection.call("certificates", timeout=5))
            return again, wrong, right_too_late, still
        finally:
            await closed(connection)

    errors = run(main())
    assert [e.code for e in errors] == [Code.NOT_AUTHENTICATED] * 4
    outcomes = [line["outcome"] for line in oracle.audit_since(mark) if line["method"] == "auth"]
    assert outcomes == ["ok"] + ["refused:not_authenticated"] * 3


# --- connection-level defences --------------------------------------------------------------------------------

def test_peer_outside_the_allowlist_is_disconnected_and_audited(oracle):
    """127.0.0.2 is loopback too, but not in the [[peer]] addresses: refused before it can say a word."""
    mark, before = oracle.audit_mark(), oracle.refusals("peer_not_allowed")

    async def main():
        connection = await connect(oracle.port, local_host="127.0.0.2")
        assert connection.transport.get_extra_info("sockname")[0] == "127.0.0.2"
        with pytest.raises(ConnectionError):
            await connection.call("hello", timeout=5)
        await asyncio.wait_for(connection.closed, 5)

    run(main())
    lines = oracle.audit_since(mark)
    assert lines and all(line["outcome"] == "refused:peer_not_allowed" for line in lines), lines
    assert lines[0]["peer"] == "127.0.0.2" and lines[0]["method"] == "connect"
    assert oracle.refusals("peer_not_allowed") == before + 1
    oracle.assert_alive()


def test_more_authenticated_connections_than_allowed_are_refused(pki, tmp_path):
    """max_connections counts proven connections: the third one's auth is answered busy and it is closed."""
    home, metrics_port = start(tmp_path, pki, "max_connections = 2")
    with run_oracle(home) as process:
        oracle = Oracle(home, process, metrics_port)

        async def main():
            allowed = [await edge(oracle) for _ in range(2)]
            try:
                mark = oracle.audit_mark()
                extra = await connect(oracle.port)
                signature = answer(oracle.home.identity, await hello(extra), extra)
                busy = await refusal(extra.call("auth", {"signature": signature}, timeout=5))
                await asyncio.wait_for(extra.closed, 5)
                refused_lines = oracle.audit_since(mark)
                # The two allowed connections still work.
                for connection in allowed:
                    assert (await connection.call("ping", timeout=5)).meta == {}
                # One closes; a new connection gets its place (once the oracle has seen the close).
                await closed(allowed.pop())
                for _ in range(100):
                    replacement = await connect(oracle.port)
                    try:
                        await authenticate(replacement, oracle.home.identity)
                    except (ConnectionError, RemoteError):
                        await asyncio.sleep(0.05)
                        continue
                    allowed.append(replacement)
                    break
                else:
                    raise AssertionError("no connection was accepted after one closed")
                return busy, refused_lines
            finally:
                for connection in allowed:
                    await closed(connection)

        busy, refused_lines = run(main())
        assert busy.code == Code.BUSY
        assert [(line["method"], line["outcome"], line["peer"]) for line in refused_lines] == \
            [("auth", "refused:too_many_connections", "edge")]
        assert oracle.refusals("too_many_connections") >= 1
        oracle.assert_alive()


def test_burst_past_the_rate_limit_is_refused_and_shared_by_the_peers_connections(pki, tmp_path):
    # burst 3; at 0.05/s the next token is 20 s away, far beyond this test.
    home, metrics_port = start(tmp_path, pki, "rate = 0.05\nburst = 3")
    requests = [handshake_request(pki) for _ in range(5)]
    with run_oracle(home) as process:
        oracle = Oracle(home, process, metrics_port)
        key_id = oracle.key_id()

        async def main():
            connection = await edge(oracle)
            other = await edge(oracle)
            try:
                # Four at once, in one write.
                futures = [connection.call_nowait("sign", {"key_id": key_id, "scheme": int(r.scheme)}, transcript(r))
                           for r in requests[:4]]
                results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
                # A fresh connection of the same peer does not get a fresh bucket.
                fifth = await refusal(sign(other, key_id, requests[4].scheme, transcript(requests[4])))
                return results, fifth
            finally:
                await closed(connection)
                await closed(other)

        results, fifth = run(main())
        public_key = pki.leaves["ecdsa-p256"].key.public_key()
        for request, result in zip(requests[:3], results[:3]):
            assert isinstance(result, rpc.Frame), result
            assert verify(public_key, request.scheme, request.content, result.tail)
        assert isinstance(results[3], RemoteError) and results[3].code == Code.RATE_LIMITED
        assert fifth.code == Code.RATE_LIMITED
        # Audited as decided: the refusal may be written before the signatures that were still being made.
        outcomes = sorted(line["outcome"] for line in home.audit_lines() if line["method"] == "sign")
        assert outcomes == ["refused:rate_limited"] * 2 + ["signed"] * 3
        rate_limited = [line for line in home.audit_lines() if line["outcome"] == "refused:rate_limited"]
        assert all(line["key_id"] == key_id and line["peer"] == "edge" for line in rate_limited)
        assert oracle.refusals(Code.RATE_LIMITED) == 2
        oracle.assert_alive()


async def send_oversized_sign(oracle: Oracle, how: str) -> None:
    connection = await edge(oracle)
    try:
        if how == "header only":
            # Only the header: the oracle must close without waiting for 4 GiB of body.
            connection.transport.write(HEADER.pack(VERSION, Kind.REQUEST, 0, 99, 0xFFFFFFF0))
            await asyncio.wait_for(connection.closed, 5)
        else:
            tail = b"\x01" + bytes(MAX_FRAME)  # a "handshake" just over the frame cap
            with pytest.raises(ConnectionError):
                await connection.call("sign", {"key_id": oracle.key_id(), "scheme": int(P256)}, tail, timeout=5)
            await asyncio.wait_for(connection.closed, 5)
    finally:
        connection.close()


@pytest.mark.parametrize("how", ["header only", "whole frame"])
def test_oversized_frame_closes_the_connection_and_the_oracle_serves_on(oracle, pki, how):
    request = handshake_request(pki)
    mark = oracle.audit_mark()
    run(send_oversized_sign(oracle, how))
    assert not [line for line in oracle.audit_since(mark) if line["outcome"] == "signed"]
    oracle.assert_alive()

    async def after():
        connection = await edge(oracle)
        try:
            return await sign(connection, oracle.key_id(), request.scheme, transcript(request))
        finally:
            await closed(connection)

    reply = run(after())
    assert verify(pki.leaves["ecdsa-p256"].key.public_key(), request.scheme, request.content, reply.tail)


BROKEN_FRAMES = {
    "oversized": HEADER.pack(VERSION, Kind.REQUEST, 0, 99, MAX_FRAME + 1),
    "version 2": HEADER.pack(2, Kind.REQUEST, 0, 99, 6) + b"\x00\x00\x00\x02{}",
    "meta not an object": HEADER.pack(VERSION, Kind.REQUEST, 0, 99, 12) + b"\x00\x00\x00\x08[\"sign\"]",
}


@pytest.mark.parametrize("name", sorted(BROKEN_FRAMES))
def test_broken_frame_is_audited_and_counted(oracle, name):
    """The issue's "Must show": an oversized frame is refused *and audited*, like every off-policy request."""
    mark = oracle.audit_mark()
    before = oracle.metrics()

    async def main():
        connection = await edge(oracle)
        try:
            connection.transport.write(BROKEN_FRAMES[name])
            await asyncio.wait_for(connection.closed, 5)
        finally:
            connection.close()

    run(main())
    lines = [line for line in oracle.audit_since(mark) if line["method"] != "auth"]
    assert len(lines) == 1, f"one audit line for the broken frame; the audit log got: {oracle.audit_since(mark)}"
    [line] = lines
    assert line["outcome"].startswith("refused:") and line["peer"] == "edge"
    reason = line["outcome"].removeprefix("refused:")
    key = ("yestls_oracle_refusals_total", (("reason", reason),))
    assert oracle.metrics().get(key, 0) == before.get(key, 0) + 1
    oracle.assert_alive()


# --- a process on the edge host that is not the edge service -------------------------------------------------------

async def holds_a_challenge(sock):
    await send(sock, request(1, "hello"))


async def sends_half_a_header(sock):
    await send(sock, request(1, "hello")[:6])


async def pings(sock):
    await send(sock, b"".join(request(n, "ping") for n in range(20)))


async def answers_wrongly(sock):
    await send(sock, request(1, "hello") + request(2, "auth", {"signature": base64.b64encode(bytes(64)).decode()}))


async def silent(sock):
    pass


def test_connections_that_never_authenticate_cannot_lock_the_edge_out(pki, tmp_path):
    """Forty local connections of five kinds, with room for four waiting and two proved: the edge's two
    connections still prove its key and get signatures, and the holders went oldest first."""
    home, metrics_port = start(tmp_path, pki, "max_connections = 2\nmax_unauthenticated = 4\nauth_timeout = 60")
    requests = [handshake_request(pki) for _ in range(2)]
    with run_oracle(home) as process:
        oracle = Oracle(home, process, metrics_port)

        async def main():
            holders = await open_sockets(oracle.port, 40)
            for n, sock in enumerate(holders):
                await (silent, holds_a_challenge, sends_half_a_header, pings, answers_wrongly)[n % 5](sock)
            try:
                connections = [await edge(oracle) for _ in range(2)]
                replies = [await sign(c, oracle.key_id(), r.scheme, transcript(r))
                           for c, r in zip(connections, requests)]
                gone = [await closed_by_peer(sock, 5) for sock in holders[:-3]]
                waiting = [await still_open(sock) for sock in holders[-3:]]
                for connection in connections:
                    await closed(connection)
                return replies, gone, waiting
            finally:
                close_all(holders)

        replies, closed_holders, waiting = run(main())
        public_key = pki.leaves["ecdsa-p256"].key.public_key()
        for request_, reply in zip(requests, replies):
            assert verify(public_key, request_.scheme, request_.content, reply.tail)
        assert all(closed_holders) and all(waiting)
        assert oracle.refusals("unauthenticated_evicted") == 37
        evicted = [line for line in home.audit_lines() if line["outcome"] == "refused:unauthenticated_evicted"]
        assert len(evicted) == 37 and all(line["authenticated"] is False for line in evicted)
        assert sum(line["outcome"] == "signed" for line in home.audit_lines()) == 2
        oracle.assert_alive()


def test_connections_that_do_not_authenticate_in_time_are_closed(pki, tmp_path):
    """auth_timeout = 1: silent, trickling a frame, pinging, asking challenges: each closed, audited, counted.
    The edge's connection, proved before them all, still signs after."""
    home, metrics_port = start(tmp_path, pki, "auth_timeout = 1")
    request_ = handshake_request(pki)

    async def trickles(sock):
        frame = request(1, "hello", {"padding": "p" * 500})
        for byte in range(len(frame)):
            await send(sock, frame[byte:byte + 1])
            await asyncio.sleep(0.1)

    async def keeps_pinging(sock):
        for n in range(300):
            await send(sock, request(n, "ping"))
            await asyncio.sleep(0.1)

    async def keeps_asking(sock):
        for n in range(300):
            await send(sock, request(n, "hello"))
            await asyncio.sleep(0.1)

    slow = (silent, trickles, keeps_pinging, keeps_asking)
    with run_oracle(home) as process:
        oracle = Oracle(home, process, metrics_port)

        async def main():
            connection = await edge(oracle)
            socks = await open_sockets(oracle.port, len(slow))
            tasks = [asyncio.ensure_future(behave(sock)) for behave, sock in zip(slow, socks)]
            try:
                closed_in_time = [await closed_by_peer(sock, 15) for sock in socks]
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                close_all(socks)
            reply = await sign(connection, oracle.key_id(), request_.scheme, transcript(request_))
            await closed(connection)
            return closed_in_time, reply

        closed_in_time, reply = run(main())
        assert closed_in_time == [True] * len(slow)
        assert verify(pki.leaves["ecdsa-p256"].key.public_key(), request_.scheme, request_.content, reply.tail)
        assert oracle.refusals("auth_timeout") == len(slow)
        lines = [line for line in home.audit_lines() if line["outcome"] == "refused:auth_timeout"]
        assert len(lines) == len(slow) and all(line["peer"] == "edge" for line in lines)
        oracle.assert_alive()


def test_a_refusal_flood_is_counted_in_full_and_summarized_in_the_audit(pki, tmp_path):
    """3000 unauthenticated sign requests, 40 broken frames and 40 strangers, with 5 refusal lines a source at
    most: the metrics count every one, the audit has a few lines and summaries that account for the rest, and
    the edge's own refusal and signature are written in full meanwhile."""
    home, metrics_port = start(tmp_path, pki, settings="audit_refusal_rate = 0.001\naudit_refusal_burst = 5")
    good, off_policy = handshake_request(pki), handshake_request(pki)
    with run_oracle(home) as process:
        oracle = Oracle(home, process, metrics_port)

        async def main():
            unproved = await connect(oracle.port)
            for _ in range(100):
                results = await asyncio.gather(*(sign(unproved, oracle.key_id(), good.scheme, transcript(good))
                                                 for _ in range(30)), return_exceptions=True)
                assert all(isinstance(r, RemoteError) and r.code == Code.NOT_AUTHENTICATED for r in results)
            await closed(unproved)
            for _ in range(40):
                [sock] = await open_sockets(oracle.port, 1)
                await send(sock, BROKEN_FRAMES["version 2"])
                assert await closed_by_peer(sock, 5)
                sock.close()
                [sock] = await open_sockets(oracle.port, 1, local_host="127.0.0.2")
                assert await closed_by_peer(sock, 5)
                sock.close()
            connection = await edge(oracle)
            refused = await refusal(sign(connection, oracle.key_id(), off_policy.scheme, off_policy.content))
            signed = await sign(connection, oracle.key_id(), good.scheme, transcript(good))
            await closed(connection)
            return refused, signed

        refused, signed = run(main())
        assert refused.code == "policy.not_a_transcript"
        assert verify(pki.leaves["ecdsa-p256"].key.public_key(), good.scheme, good.content, signed.tail)
        counted = {reason: oracle.refusals(reason)
                   for reason in ("not_authenticated", "bad_frame", "peer_not_allowed", "policy.not_a_transcript")}
        assert counted == {"not_authenticated": 3000, "bad_frame": 40, "peer_not_allowed": 40,
                           "policy.not_a_transcript": 1}
        process.stop()  # SIGTERM: the oracle writes the summaries still pending as it closes its audit log
        assert process.process.returncode == 0, process.log()
    lines = home.audit_lines()
    assert len(lines) < 30, f"{len(lines)} audit lines"
    summaries = [line for line in lines if line["outcome"] == "summarized"]
    for outcome, total in (("refused:not_authenticated", 3000), ("refused:bad_frame", 40),
                           ("refused:peer_not_allowed", 40)):
        written = sum(line["outcome"] == outcome for line in lines)
        assert written + sum(s["outcomes"].get(outcome, 0) for s in summaries) == total, outcome
    edge_lines = [(line["method"], line["outcome"]) for line in lines
                  if line["peer"] == "edge" and line.get("authenticated") is not False]
    assert edge_lines == [("auth", "ok"), ("sign", "refused:policy.not_a_transcript"), ("sign", "signed")]
    # The oracle's own log did not echo the flood either.
    log_lines = process.log().splitlines()
    assert len(log_lines) < 30 and all(len(line) < 400 for line in log_lines), log_lines[-5:]


def huge_sni_transcript(pki) -> bytes:
    """A real transcript whose ClientHello names a 60 KiB server (what a frame can carry: the SNI is 16-bit)."""
    leaf = pki.leaves["ecdsa-p256"]
    client = RawClient(ServerConfig([leaf.chain]), leaf.key, auto_sign=False)
    hello = client.hello()
    client.send_hello(hello)
    [request_] = client.signature_requests
    forged = hello.copy()
    forged.set(0, server_name_data("a" * 60_000))  # server_name
    return forged.encode() + b"".join(request_.handshake_messages[1:])


BIG_FIELDS = {
    "a 200 KiB key_id": lambda oracle, pki: ("sign", {"key_id": "k" * 200_000, "scheme": int(P256)}, b"x"),
    "a 1 MiB key_id (over the frame cap)": lambda oracle, pki: ("sign", {"key_id": "k" * (1 << 20), "scheme": 0}, b""),
    "a 60 KiB SNI": lambda oracle, pki: ("sign", {"key_id": oracle.key_id(), "scheme": int(P256)},
                                         huge_sni_transcript(pki)),
    "a 200 KiB method": lambda oracle, pki: ("m" * 200_000, {}, b""),
    "a 1 MiB method (over the frame cap)": lambda oracle, pki: ("m" * (1 << 20), {}, b""),
    "a scheme of 4000 digits": lambda oracle, pki: ("sign", {"key_id": oracle.key_id(), "scheme": 10 ** 3999}, b""),
}


@pytest.mark.parametrize("proved", [True, False], ids=["authenticated", "unauthenticated"])
@pytest.mark.parametrize("name", list(BIG_FIELDS))
def test_big_fields_make_bounded_audit_and_log_lines(oracle, pki, name, proved):
    method, params, tail = BIG_FIELDS[name](oracle, pki)
    before = oracle.home.audit_log.stat().st_size

    async def main():
        [sock] = await open_sockets(oracle.port, 1)
        try:
            if proved:
                assert await prove(sock, SERVICE, oracle.home.identity)
            frame = request(7, method, params, tail)
            if "over the frame cap" in name:  # refused from its header: the oracle may close before taking it all
                if await send_unless_closed(sock, frame):
                    await closed_by_peer(sock, 2)
            else:
                await send(sock, frame)
                await closed_by_peer(sock, 2)  # answered or not: bounded either way
        finally:
            sock.close()

    run(main())
    with open(oracle.home.audit_log, "rb") as audit:
        audit.seek(before)
        new = audit.read().splitlines(keepends=True)
    refused = [json.loads(line) for line in new if b'"refused:' in line]
    assert refused, new
    assert all(len(line) <= MAX_LINE for line in new)
    assert all(len(line) < 1000 for line in process_log_lines(oracle))
    oracle.assert_alive()


def process_log_lines(oracle: Oracle) -> list[str]:
    return oracle.process.log().splitlines()


def test_the_audit_log_rotates_at_its_configured_size(pki, tmp_path):
    settings = f"audit_max_bytes = {MIN_MAX_BYTES}\naudit_backups = 2\naudit_refusal_burst = 100000"
    home, metrics_port = start(tmp_path, pki, settings=settings)
    with run_oracle(home) as process:
        oracle = Oracle(home, process, metrics_port)

        async def main():
            unproved = await connect(oracle.port)
            for _ in range(40):  # ~1000 refusal lines of ~400 bytes: about 6 times the cap
                await asyncio.gather(*(unproved.call("m" * 250, timeout=5) for _ in range(25)),
                                     return_exceptions=True)
            await closed(unproved)

        run(main())
        oracle.assert_alive()
    files = sorted(path.name for path in tmp_path.glob("audit.jsonl*"))
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in files:
        data = (tmp_path / name).read_bytes()
        assert len(data) <= MIN_MAX_BYTES
        assert all(json.loads(line)["peer"] == "edge" for line in data.splitlines())


# --- TLS 1.2: sign_tls12 --------------------------------------------------------------------------------------

def tls12_request(pki, key_type: str = "ecdsa-p256"):
    """The engine's Tls12SignatureRequest for a real OpenSSL client held to TLS 1.2."""
    leaf = pki.leaves[key_type]
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    pair = MemoryPair(ServerConfig([leaf.chain]), context, leaf.key)
    pair.handshake()
    assert pair.client.version() == "TLSv1.2"
    [request] = pair.signature_requests
    return request


async def sign_tls12(connection: rpc.RpcConnection, key_id: str, request, **changes) -> rpc.Frame:
    params = {"key_id": key_id, "scheme": int(request.scheme), "cipher_suite": int(request.cipher_suite),
              "nonce": request.nonce.hex(), **changes}
    return await connection.call("sign_tls12", params, request.client_hello + request.params, timeout=10)


def test_tls12_server_key_exchange_is_signed_and_audited_with_its_version(oracle, pki):
    request = tls12_request(pki)
    mark = oracle.audit_mark()

    async def main():
        connection = await edge(oracle)
        try:
            return await sign_tls12(connection, oracle.key_id(), request)
        finally:
            await closed(connection)

    reply = run(main())
    assert verify(pki.leaves["ecdsa-p256"].key.public_key(), request.scheme, request.content, reply.tail)
    assert reply.meta["server_random"] == tls12_server_random(request.nonce).hex()
    [line] = [line for line in oracle.audit_since(mark) if line["method"] == "sign_tls12"]
    assert line["outcome"] == "signed" and line["version"] == "TLSv1.2"
    assert line["client_random"] == request.client_hello[6:38].hex()
    assert line["server_random"] == reply.meta["server_random"] and line["group"] == "x25519"
    assert line["cipher_suite"] == request.cipher_suite


def test_tls13_signature_is_audited_with_its_version(oracle, pki):
    request = handshake_request(pki)
    mark = oracle.audit_mark()

    async def main():
        connection = await edge(oracle)
        try:
            return await sign(connection, oracle.key_id(), request.scheme, transcript(request))
        finally:
            await closed(connection)

    run(main())
    [line] = [line for line in oracle.audit_since(mark) if line["method"] == "sign"]
    assert line["version"] == "TLSv1.3"


def tls12_refusal(oracle, request, code: str, tail: bytes | None = None, **changes) -> dict:
    mark, before = oracle.audit_mark(), oracle.refusals(code)

    async def main():
        connection = await edge(oracle)
        try:
            if tail is None:
                return await refusal(sign_tls12(connection, oracle.key_id(), request, **changes))
            params = {"key_id": oracle.key_id(), "scheme": int(request.scheme),
                      "cipher_suite": int(request.cipher_suite), "nonce": request.nonce.hex(), **changes}
            return await refusal(connection.call("sign_tls12", params, tail, timeout=10))
        finally:
            await closed(connection)

    error = run(main())
    assert error.code == code, error
    [line] = [line for line in oracle.audit_since(mark) if line["method"] == "sign_tls12"]
    assert line["outcome"] == f"refused:{code}" and line["peer"] == "edge"
    assert oracle.refusals(code) == before + 1
    oracle.assert_alive()
    return line


def test_tls12_replayed_nonce_is_refused_by_the_front(oracle, pki):
    request = tls12_request(pki)

    async def first():
        connection = await edge(oracle)
        try:
            return await sign_tls12(connection, oracle.key_id(), request)
        finally:
            await closed(connection)

    run(first())
    tls12_refusal(oracle, request, "policy.replayed_nonce")


def test_tls12_request_for_a_tls13_client_is_not_tls12(oracle, pki):
    tls13 = handshake_request(pki)
    request = tls12_request(pki)
    line = tls12_refusal(oracle, request, "policy.not_tls12", tail=tls13.handshake_messages[0] + request.params)
    assert line["client_random"] == tls13.handshake_messages[0][6:38].hex()


def test_tls12_rsa_key_exchange_is_refused(oracle, pki):
    tls12_refusal(oracle, tls12_request(pki), "policy.suite_mismatch", cipher_suite=0x009C)


def test_tls12_params_that_are_something_else_are_refused(oracle, pki):
    request = tls12_request(pki)
    tls12_refusal(oracle, request, "policy.bad_params", tail=request.client_hello + handshake_request(pki).content)


def test_tls12_stale_nonce_is_refused(oracle, pki):
    request = tls12_request(pki)
    tls12_refusal(oracle, request, "policy.stale_nonce", nonce=tls12_nonce(time.time() - 3600, os.urandom).hex())


def test_tls12_nonce_that_is_not_hex_is_refused(oracle, pki):
    tls12_refusal(oracle, tls12_request(pki), "policy.malformed", nonce="not hex")
