"""The key oracle's signing policy (relay/oracle/policy.py).

Real transcripts, made by the engine with Python's ssl (OpenSSL) or the raw
client, are approved, and the content the policy builds is the content the
engine asked for: signing it makes the engine finish the handshake. Every
off-policy request gets its refusal code: bare digests and arbitrary bytes,
TLS 1.2, resumed (PSK) handshakes, another certificate chain, names outside
the certificate, schemes the key or the client cannot use, a selected
application protocol (ALPN: the edge is an MX) but one, and transcripts whose
messages are out of order, truncated or inconsistent. The one protocol
signed for is http/1.1 for an mta-sts.<domain> name (the MTA-STS policy
host), offered by the client; each other ALPN/SNI pairing is refused. Hypothesis
mutates real transcripts: the answer is a Refusal or an Approved whose content
is the mutated transcript's own, never anything else.
"""

import dataclasses
import hashlib
import os
import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.oracle.policy import (
    ALPN_SELECTED,
    CERTIFICATE_MISMATCH,
    INTERNAL_ERROR,
    MALFORMED,
    NOT_A_TRANSCRIPT,
    NOT_TLS13,
    PSK_HANDSHAKE,
    REFUSAL_CODES,
    SCHEME_MISMATCH,
    SNI_MISMATCH,
    Approved,
    Refusal,
    check_certificate_verify,
    expected_certificate_message,
    parse_encrypted_extensions,
)
from relay.tls import CipherSuite, Group, ServerConfig, SignatureRequest, SignatureScheme, State, TicketKeyring
from relay.tls.constants import HELLO_RETRY_REQUEST_RANDOM, TLS12, TLS13, ContentType, ExtensionType, HandshakeType
from relay.tls.keyschedule import SUITES
from relay.tls.messages import certificate, certificate_verify, extension, handshake_message, parse_client_hello
from relay.tls.signing import certificate_verify_content, sign, transcript_hash
from relay.tls.wire import Reader, u8, u16, vec8, vec16, vec24

from .. import tls12
from ..memory import MemoryPair, client_context
from ..pki import KEY_TYPES, make_pki
from ..rawclient import (
    RawClient,
    cookie_data,
    groups_data,
    key_share_data,
    record_size_limit_data,
    server_name_data,
    split_handshake,
    versions_data,
)

P256 = SignatureScheme.ECDSA_SECP256R1_SHA256


# --- fixtures and helpers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chains(pki):
    """The chain the oracle holds for each key, loaded apart from the engine's copy (equal bytes, other objects)."""
    return {key_type: leaf.chain for key_type, leaf in pki.leaves.items()}


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """Someone else's PKI: a P-256 leaf for the same names from another CA."""
    return make_pki(tmp_path_factory.mktemp("stranger"), key_types=("ecdsa-p256",))


class PolicyInTheLoop:
    """The engine, with each SignatureRequest's content and scheme replaced by what the policy approves.

    MemoryPair signs what the request says; the engine verifies the signature
    against its own content, so the handshake completes only when the
    policy's content is the engine's, byte for byte.
    """

    def __init__(self, server, chain):
        self._server = server
        self._chain = chain
        self.approvals: list[tuple[SignatureRequest, Approved]] = []

    def __getattr__(self, name):
        return getattr(self._server, name)

    def receive_data(self, data: bytes) -> list:
        events = self._server.receive_data(data)
        return [self._through_policy(e) if isinstance(e, SignatureRequest) else e for e in events]

    def _through_policy(self, request: SignatureRequest) -> SignatureRequest:
        approved = check_certificate_verify(b"".join(request.handshake_messages), request.scheme, self._chain)
        self.approvals.append((request, approved))
        return dataclasses.replace(request, content=approved.content, scheme=approved.scheme)


def openssl_handshake(pki, chain, key_type: str, alpn: list[str] | None = None, **config) -> PolicyInTheLoop:
    """A Python ssl client's handshake with the engine, signed only with what the policy approves."""
    leaf = pki.leaves[key_type]
    context = client_context(pki.ca_pem)
    if alpn:
        context.set_alpn_protocols(alpn)
    pair = MemoryPair(ServerConfig([leaf.chain], **config), context, leaf.key)
    pair.server = PolicyInTheLoop(pair.server, chain)
    pair.handshake()
    assert pair.server_error is None
    assert pair.server.handshake_complete and pair.client.version() == "TLSv1.3"
    pair.client.write(b"EHLO client.example\r\n")
    pair.pump()
    assert pair.server_data() == b"EHLO client.example\r\n"
    return pair.server


def raw_request(pki, key_type: str = "ecdsa-p256", config: ServerConfig | None = None, edit_retry=None,
                **hello_options) -> SignatureRequest:
    """The engine's SignatureRequest for a raw client's hello (and second hello after a HelloRetryRequest)."""
    leaf = pki.leaves[key_type]
    client = RawClient(config or ServerConfig([leaf.chain]), leaf.key, auto_sign=False)
    hello = client.hello(**hello_options)
    client.send_hello(hello)
    if client.hello_retry_group is not None:
        second = client.retry_hello(hello)
        client.send_hello(edit_retry(second) if edit_retry else second)
    assert client.server.state is State.WAIT_SIGNATURE
    return client.signature_requests[-1]


def check(msgs, scheme, chain) -> Approved:
    return check_certificate_verify(b"".join(msgs), scheme, chain)


def assert_refused(code: str, msgs_or_bytes, scheme, chain) -> Refusal:
    data = msgs_or_bytes if isinstance(msgs_or_bytes, bytes) else b"".join(msgs_or_bytes)
    with pytest.raises(Refusal) as refused:
        check_certificate_verify(data, scheme, chain)
    assert refused.value.code == code, refused.value
    assert refused.value.message and str(refused.value) == refused.value.message
    return refused.value


def assert_approved_as_sent(request: SignatureRequest, chain) -> Approved:
    """The unmodified transcript passes: a refusal after a change is due to that change."""
    approved = check(request.handshake_messages, request.scheme, chain)
    assert approved.content == request.content
    return approved


def replaced(msgs, index: int, message: bytes) -> list[bytes]:
    msgs = list(msgs)
    msgs[index] = message
    return msgs


# Server messages as plain fields, so a test can change one and encode them again.

@dataclasses.dataclass
class ServerHelloFields:
    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression: int
    extensions: list[tuple[int, bytes]]
    trailing: bytes = b""

    @classmethod
    def decode(cls, raw: bytes) -> "ServerHelloFields":
        r = Reader(raw, 4)
        fields = cls(r.u16(), r.take(32), r.vector(1), r.u16(), r.u8(), [])
        block = r.sub(2)
        while block.remaining():
            fields.extensions.append((block.u16(), block.vector(2)))
        r.expect_end()
        return fields

    def encode(self) -> bytes:
        body = (u16(self.legacy_version) + self.random + vec8(self.session_id) + u16(self.cipher_suite)
                + u8(self.compression) + vec16(b"".join(extension(t, d) for t, d in self.extensions)))
        return handshake_message(HandshakeType.SERVER_HELLO, body + self.trailing)

    def set(self, ext_type: int, data: bytes | None) -> "ServerHelloFields":
        """Replace the extension where it is (None removes it), or append it."""
        kept = [(t, d) for t, d in self.extensions if t != ext_type]
        if data is None:
            self.extensions = kept
        elif len(kept) == len(self.extensions):
            self.extensions.append((ext_type, data))
        else:
            self.extensions = [(t, data if t == ext_type else d) for t, d in self.extensions]
        return self


def edit_server_hello(raw: bytes, edit) -> bytes:
    fields = ServerHelloFields.decode(raw)
    edit(fields)
    return fields.encode()


def encrypted_extensions(*extensions: tuple[int, bytes], trailing: bytes = b"") -> bytes:
    body = vec16(b"".join(extension(t, d) for t, d in extensions))
    return handshake_message(HandshakeType.ENCRYPTED_EXTENSIONS, body + trailing)


def openssl_client_hello(context: ssl.SSLContext) -> bytes:
    """The ClientHello message OpenSSL sends with `context`."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="mx.example.org")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    data = outgoing.read()
    assert data[0] == ContentType.HANDSHAKE and len(data) == 5 + int.from_bytes(data[3:5], "big")
    return data[5:]


# --- approvals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_openssl_handshake_is_approved_with_the_engines_content(pki, chains, key_type):
    server = openssl_handshake(pki, chains[key_type], key_type)
    [(request, approved)] = server.approvals
    assert len(request.handshake_messages) == 4
    assert approved.content == request.content
    assert approved.scheme == request.scheme and approved.scheme in chains[key_type].schemes
    assert approved.cipher_suite == request.cipher_suite == CipherSuite.AES_128_GCM_SHA256
    assert approved.server_name == request.server_name == "mx.example.org"
    assert approved.client_random == request.handshake_messages[0][6:38]
    assert approved.content == certificate_verify_content(approved.transcript_hash)
    assert approved.transcript_hash == hashlib.sha256(b"".join(request.handshake_messages)).digest()


RETRY_CONFIGS = {
    "hello-retry": dict(groups=(Group.SECP384R1, Group.X25519), insist_on_preferred_group=True),
    "hello-retry-sha384-cookie": dict(
        groups=(Group.SECP256R1, Group.X25519), insist_on_preferred_group=True,
        cipher_suites=(CipherSuite.AES_256_GCM_SHA384,), hello_retry_cookie=lambda digest: b"cookie" + digest[:8],
    ),
}


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
@pytest.mark.parametrize("name", RETRY_CONFIGS)
def test_openssl_handshake_after_hello_retry_request_is_approved(pki, chains, key_type, name):
    server = openssl_handshake(pki, chains[key_type], key_type, **RETRY_CONFIGS[name])
    [(request, approved)] = server.approvals
    msgs = request.handshake_messages
    assert [m[0] for m in msgs] == [1, 2, 1, 2, 8, 11] and msgs[1][6:38] == HELLO_RETRY_REQUEST_RANDOM
    assert approved.content == request.content
    suite = SUITES[approved.cipher_suite]
    assert approved.transcript_hash == transcript_hash(suite.hash_name, list(msgs))
    assert len(approved.transcript_hash) == suite.hash_len


def test_openssl_handshake_offering_alpn_is_approved_when_none_is_selected(pki, chains):
    """A client may offer protocols; the edge's engine selects none (its default), and that is signed."""
    assert ServerConfig([pki.leaves["ecdsa-p256"].chain]).alpn_protocols == ()
    server = openssl_handshake(pki, chains["ecdsa-p256"], "ecdsa-p256", alpn=["smtp", "h2"])
    [(request, approved)] = server.approvals
    assert approved.content == request.content
    assert u16(ExtensionType.ALPN) not in request.handshake_messages[-2]


def test_raw_hello_without_sni_with_record_size_limit_is_approved(pki, chains):
    leaf = pki.leaves["ecdsa-p256"]
    config = ServerConfig([leaf.chain], cipher_suites=(CipherSuite.CHACHA20_POLY1305_SHA256,))
    client = RawClient(config, leaf.key, auto_sign=False)
    hello = client.hello(server_name=None, session_id=os.urandom(32), suites=(0x1302, 0x1303, 0x1301))
    hello.add(ExtensionType.RECORD_SIZE_LIMIT, record_size_limit_data(4096))
    client.send_hello(hello)
    [request] = client.signature_requests
    approved = assert_approved_as_sent(request, chains["ecdsa-p256"])
    assert approved.server_name is None and approved.cipher_suite == CipherSuite.CHACHA20_POLY1305_SHA256
    client.call(client.server.provide_signature, sign(leaf.key, approved.scheme, approved.content))
    client.send_finished()
    assert client.server.handshake_complete


def test_bytes_like_input_is_approved(pki, chains):
    request = raw_request(pki)
    data = b"".join(request.handshake_messages)
    for form in (bytearray(data), memoryview(data)):
        assert check_certificate_verify(form, request.scheme, chains["ecdsa-p256"]).content == request.content


def test_expected_certificate_message_is_what_the_engine_sends_built_once(pki, chains):
    chain = chains["rsa-2048"]
    assert expected_certificate_message(chain) == certificate(chain.der_chain)
    assert expected_certificate_message(chain) is expected_certificate_message(chain)


# --- policy.not_a_transcript ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def full(pki) -> SignatureRequest:
    return raw_request(pki, session_id=os.urandom(32), groups=(Group.X25519, Group.SECP256R1))


@pytest.fixture(scope="module")
def retried(pki) -> SignatureRequest:
    config = ServerConfig([pki.leaves["ecdsa-p256"].chain], hello_retry_cookie=lambda digest: digest[:16])
    return raw_request(pki, config=config, shares=(), suites=(0x1301, 0x1302), groups=(Group.X25519, Group.SECP256R1),
                       session_id=os.urandom(32))


def arbitrary_payloads(pki, request: SignatureRequest) -> dict[str, bytes]:
    return {
        "bare digest": hashlib.sha256(b"".join(request.handshake_messages)).digest(),
        "certificate verify content": request.content,
        "empty": b"",
        "text": b"Pay 1000 EUR to the bearer of this message.\r\n",
        "a certificate": pki.leaves["ecdsa-p256"].cert.tbs_certificate_bytes,
        "zeros": bytes(64),
        "all byte values": bytes(range(256)),
    }


@pytest.mark.parametrize("name", ["bare digest", "certificate verify content", "empty", "text", "a certificate",
                                  "zeros", "all byte values"])
def test_arbitrary_payload_is_not_a_transcript(pki, chains, full, name):
    assert_refused(NOT_A_TRANSCRIPT, arbitrary_payloads(pki, full)[name], P256, chains["ecdsa-p256"])


@pytest.mark.parametrize("value", [None, "ClientHello", 42, [b"\x01"]])
def test_non_bytes_input_is_not_a_transcript(chains, value):
    with pytest.raises(Refusal) as refused:
        check_certificate_verify(value, P256, chains["ecdsa-p256"])
    assert refused.value.code == NOT_A_TRANSCRIPT


def shapes(full: SignatureRequest, retried: SignatureRequest) -> dict[str, list[bytes]]:
    ch, sh, ee, cert = full.handshake_messages
    ch1, hrr, ch2, sh2, ee2, cert2 = retried.handshake_messages
    cv = certificate_verify(P256, bytes(70))
    return {
        "only a ClientHello": [ch],
        "no Certificate": [ch, sh, ee],
        "starts with the ServerHello": [sh, ee, cert],
        "ServerHello before ClientHello": [sh, ch, ee, cert],
        "EncryptedExtensions before ServerHello": [ch, ee, sh, cert],
        "Certificate before EncryptedExtensions": [ch, sh, cert, ee],
        "CertificateVerify after Certificate": [ch, sh, ee, cert, cv],
        "Finished after Certificate": [ch, sh, ee, cert, handshake_message(HandshakeType.FINISHED, bytes(32))],
        "Certificate twice": [ch, sh, ee, cert, cert],
        "seven messages": [ch, sh, ee, cert, ee, cert, cert],
        "ClientHello twice without a retry": [ch, ch, sh, ee, cert],
        "retry request where the ServerHello goes": [ch1, hrr, ee2, cert2],
        "ServerHello where the retry request goes": [ch1, sh2, ch2, sh2, ee2, cert2],
        "two retry requests": [ch1, hrr, ch2, hrr, ee2, cert2],
        "unknown message type": [ch, sh, handshake_message(99, b""), cert],
    }


@pytest.mark.parametrize("name", ["only a ClientHello", "no Certificate", "starts with the ServerHello",
                                  "ServerHello before ClientHello", "EncryptedExtensions before ServerHello",
                                  "Certificate before EncryptedExtensions", "CertificateVerify after Certificate",
                                  "Finished after Certificate", "Certificate twice", "seven messages",
                                  "ClientHello twice without a retry", "retry request where the ServerHello goes",
                                  "ServerHello where the retry request goes", "two retry requests",
                                  "unknown message type"])
def test_messages_out_of_shape_are_not_a_transcript(chains, full, retried, name):
    chain = chains["ecdsa-p256"]
    assert_approved_as_sent(full, chain)
    assert_approved_as_sent(retried, chain)
    assert_refused(NOT_A_TRANSCRIPT, shapes(full, retried)[name], P256, chain)


@pytest.mark.parametrize("cut", [1, 2, 4, 100])
def test_truncated_last_message_is_not_a_transcript(chains, full, cut):
    data = b"".join(full.handshake_messages)
    assert_refused(NOT_A_TRANSCRIPT, data[:-cut], P256, chains["ecdsa-p256"])


@pytest.mark.parametrize("extra", [b"\x00", b"\x0f\x00", b"\x0f\x00\x00\x10abc"])
def test_trailing_bytes_are_not_a_transcript(chains, full, extra):
    data = b"".join(full.handshake_messages) + extra
    assert_refused(NOT_A_TRANSCRIPT, data, P256, chains["ecdsa-p256"])


# --- policy.not_tls13 --------------------------------------------------------------------------------

def tls12_only_client(pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def test_tls12_server_key_exchange_request_is_not_tls13(pki, chains):
    """A stolen edge asking for a TLS 1.2 ServerKeyExchange signature, with the real client's hello."""
    hello = openssl_client_hello(tls12_only_client(pki))
    parsed = parse_client_hello(hello)
    assert parsed.supported_versions is None or TLS13 not in parsed.supported_versions
    chain = chains["ecdsa-p256"]
    params = tls12.ecdhe_params(Group.X25519, os.urandom(32))
    flight = [
        hello,
        tls12.server_hello(os.urandom(32), 0xC02B),  # ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        tls12.certificate(chain.der_chain),
        tls12.server_key_exchange(params, P256, bytes(72)),
        tls12.server_hello_done(),
    ]
    assert_refused(NOT_TLS13, flight, P256, chain)


def test_tls12_hello_in_a_tls13_shaped_transcript_is_not_tls13(pki, chains, full):
    hello = openssl_client_hello(tls12_only_client(pki))
    assert_refused(NOT_TLS13, replaced(full.handshake_messages, 0, hello), P256, chains["ecdsa-p256"])


def test_client_hello_not_offering_tls13_as_rfc8446_says_is_not_tls13(pki, chains):
    leaf = pki.leaves["ecdsa-p256"]
    client = RawClient(ServerConfig([leaf.chain]), leaf.key, auto_sign=False)
    hello = client.hello()
    client.send_hello(hello)
    msgs = client.signature_requests[0].handshake_messages
    assert_approved_as_sent(client.signature_requests[0], chains["ecdsa-p256"])
    for edit in (lambda h: h.set(ExtensionType.SUPPORTED_VERSIONS, versions_data(TLS12)),
                 lambda h: h.remove(ExtensionType.SUPPORTED_VERSIONS),
                 lambda h: setattr(h, "legacy_version", TLS13)):
        changed = hello.copy()
        edit(changed)
        assert_refused(NOT_TLS13, replaced(msgs, 0, changed.encode()), P256, chains["ecdsa-p256"])


@pytest.mark.parametrize("edit", [
    lambda sh: sh.set(ExtensionType.SUPPORTED_VERSIONS, u16(TLS12)),
    lambda sh: sh.set(ExtensionType.SUPPORTED_VERSIONS, u16(0x7F1C)),  # a draft version
    lambda sh: sh.set(ExtensionType.SUPPORTED_VERSIONS, None),
    lambda sh: setattr(sh, "legacy_version", TLS13),
], ids=["tls12", "draft", "no-supported-versions", "legacy-version"])
def test_server_hello_not_selecting_tls13_is_not_tls13(chains, full, edit):
    msgs = replaced(full.handshake_messages, 1, edit_server_hello(full.handshake_messages[1], edit))
    assert_refused(NOT_TLS13, msgs, P256, chains["ecdsa-p256"])


def test_hello_retry_request_not_selecting_tls13_is_not_tls13(chains, retried):
    edit = lambda hrr: hrr.set(ExtensionType.SUPPORTED_VERSIONS, u16(TLS12))  # noqa: E731
    msgs = replaced(retried.handshake_messages, 1, edit_server_hello(retried.handshake_messages[1], edit))
    assert_refused(NOT_TLS13, msgs, P256, chains["ecdsa-p256"])


# --- policy.psk_handshake ----------------------------------------------------------------------------

def test_resumed_handshake_with_a_certificate_added_is_a_psk_handshake(pki, chains):
    leaf = pki.leaves["ecdsa-p256"]
    config = ServerConfig([leaf.chain], tickets=TicketKeyring(os.urandom))
    first = RawClient(config, leaf.key).drive_to(State.CONNECTED)
    resumed = RawClient(config, leaf.key)
    resumed.handshake(resumed.hello(ticket=first.tickets[0]))
    assert resumed.server.session.resumed and not resumed.signature_requests
    hello, server_hello, ee = resumed.transcript[:3]
    assert ServerHelloFields.decode(server_hello).extensions[0][0] == ExtensionType.PRE_SHARED_KEY
    forged = [hello, server_hello, ee, certificate(leaf.chain.der_chain)]
    assert_refused(PSK_HANDSHAKE, forged, P256, chains["ecdsa-p256"])


# --- policy.certificate_mismatch ---------------------------------------------------------------------

def certificate_forgeries(pki, stranger, chain) -> dict[str, bytes]:
    leaf_der, ca_der = chain.der_chain
    return {
        "another key's chain": certificate(pki.leaves["ecdsa-p384"].chain.der_chain),
        "a stranger's chain for the same names": certificate(stranger.leaves["ecdsa-p256"].chain.der_chain),
        "leaf without its CA": certificate(chain.der_chain[:1]),
        "CA only": certificate(chain.der_chain[1:]),
        "chain plus a certificate": certificate((*chain.der_chain, ca_der)),
        "chain reversed": certificate((ca_der, leaf_der)),
        "no certificates": certificate(()),
        "request context": handshake_message(
            HandshakeType.CERTIFICATE, vec8(b"\x01") + vec24(vec24(leaf_der) + vec16(b"") + vec24(ca_der) + vec16(b""))
        ),
        "OCSP extension on the leaf": handshake_message(
            HandshakeType.CERTIFICATE,
            vec8(b"") + vec24(vec24(leaf_der) + vec16(extension(ExtensionType.STATUS_REQUEST, b"\x01" + vec24(b"ok")))
                              + vec24(ca_der) + vec16(b"")),
        ),
        "one byte of the leaf changed": certificate((leaf_der[:-1] + bytes((leaf_der[-1] ^ 1,)), ca_der)),
    }


@pytest.mark.parametrize("name", ["another key's chain", "a stranger's chain for the same names",
                                  "leaf without its CA", "CA only", "chain plus a certificate", "chain reversed",
                                  "no certificates", "request context", "OCSP extension on the leaf",
                                  "one byte of the leaf changed"])
def test_certificate_not_this_keys_chain_is_refused(pki, chains, stranger, full, name):
    chain = chains["ecdsa-p256"]
    assert_approved_as_sent(full, chain)
    forged = certificate_forgeries(pki, stranger, chain)[name]
    assert_refused(CERTIFICATE_MISMATCH, replaced(full.handshake_messages, 3, forged), P256, chain)


def test_real_transcript_of_another_key_is_refused_for_this_key(pki, chains):
    """The edge holds the P-256 and P-384 chains; a P-384 handshake does not get the P-256 key's signature."""
    request = raw_request(pki, "ecdsa-p384")
    assert_refused(CERTIFICATE_MISMATCH, request.handshake_messages, P256, chains["ecdsa-p256"])


# --- policy.sni_mismatch -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["www.bank.example", "example.org", "mx.example.org.evil.example", "localhost2"])
def test_server_name_outside_the_certificate_is_refused(pki, chains, name):
    request = raw_request(pki, server_name=name)  # the engine falls back to its only chain
    assert request.server_name == name
    assert_refused(SNI_MISMATCH, request.handshake_messages, request.scheme, chains["ecdsa-p256"])


def test_second_hello_naming_another_server_is_refused(pki, chains):
    """Both names are the certificate's, but the two hellos of one handshake disagree."""
    request = raw_request(
        pki, shares=(),
        edit_retry=lambda second: second.set(ExtensionType.SERVER_NAME, server_name_data("localhost")),
    )
    assert request.server_name == "localhost"
    assert_refused(SNI_MISMATCH, request.handshake_messages, request.scheme, chains["ecdsa-p256"])


def test_second_hello_dropping_the_server_name_is_refused(pki, chains):
    request = raw_request(pki, shares=(), edit_retry=lambda second: second.remove(ExtensionType.SERVER_NAME))
    assert request.server_name is None
    assert_refused(SNI_MISMATCH, request.handshake_messages, request.scheme, chains["ecdsa-p256"])


# --- policy.scheme_mismatch --------------------------------------------------------------------------

@pytest.mark.parametrize("key_type, scheme", [
    ("ecdsa-p256", SignatureScheme.ECDSA_SECP384R1_SHA384),
    ("ecdsa-p256", SignatureScheme.ED25519),
    ("ecdsa-p256", SignatureScheme.RSA_PSS_RSAE_SHA256),
    ("ecdsa-p384", SignatureScheme.ECDSA_SECP256R1_SHA256),
    ("rsa-2048", SignatureScheme.RSA_PKCS1_SHA256),  # PKCS#1 v1.5: not for TLS 1.3 handshakes
    ("rsa-2048", SignatureScheme.ECDSA_SECP256R1_SHA256),
    ("ed25519", SignatureScheme.RSA_PSS_RSAE_SHA256),
    ("ecdsa-p256", 0xFFFF),
    ("ecdsa-p256", -1),
    ("ecdsa-p256", "0x0403"),
])
def test_scheme_the_key_cannot_make_is_refused(pki, chains, key_type, scheme):
    request = raw_request(pki, key_type)  # the raw client offers every scheme
    assert_approved_as_sent(request, chains[key_type])
    assert_refused(SCHEME_MISMATCH, request.handshake_messages, scheme, chains[key_type])


def test_scheme_the_client_did_not_offer_is_refused(pki, chains):
    request = raw_request(pki, "rsa-2048", schemes=(SignatureScheme.RSA_PSS_RSAE_SHA256,))
    chain = chains["rsa-2048"]
    assert_approved_as_sent(request, chain)
    assert SignatureScheme.RSA_PSS_RSAE_SHA384 in chain.schemes
    assert_refused(SCHEME_MISMATCH, request.handshake_messages, SignatureScheme.RSA_PSS_RSAE_SHA384, chain)


def test_client_without_signature_algorithms_is_refused(pki, chains):
    leaf = pki.leaves["ecdsa-p256"]
    client = RawClient(ServerConfig([leaf.chain]), leaf.key, auto_sign=False)
    hello = client.hello()
    client.send_hello(hello)
    request = client.signature_requests[0]
    without = hello.copy().remove(ExtensionType.SIGNATURE_ALGORITHMS).encode()
    assert_refused(SCHEME_MISMATCH, replaced(request.handshake_messages, 0, without), P256, chains["ecdsa-p256"])


# --- policy.malformed --------------------------------------------------------------------------------

def set_session_id(sh):
    sh.session_id = bytes(32)


def flip_session_id(sh):
    sh.session_id = sh.session_id[:-1] + bytes((sh.session_id[-1] ^ 1,))


SERVER_HELLO_EDITS = {
    "session id echo changed": flip_session_id,
    "session id echo dropped": lambda sh: setattr(sh, "session_id", b""),
    "suite not offered": lambda sh: setattr(sh, "cipher_suite", CipherSuite.AES_256_GCM_SHA384),
    "TLS 1.2 suite": lambda sh: setattr(sh, "cipher_suite", 0xC02B),
    "compression": lambda sh: setattr(sh, "compression", 1),
    "no key share": lambda sh: sh.set(ExtensionType.KEY_SHARE, None),
    "key share for a group not offered": lambda sh: sh.set(
        ExtensionType.KEY_SHARE, u16(Group.SECP384R1) + vec16(b"\x04" + bytes(96))),
    "key share for a group offered without a share": lambda sh: sh.set(
        ExtensionType.KEY_SHARE, u16(Group.SECP256R1) + vec16(b"\x04" + bytes(64))),
    "key share of the wrong size": lambda sh: sh.set(ExtensionType.KEY_SHARE, u16(Group.X25519) + vec16(bytes(31))),
    "key share with trailing bytes": lambda sh: sh.set(
        ExtensionType.KEY_SHARE, dict(sh.extensions)[ExtensionType.KEY_SHARE] + b"\x00"),
    "duplicate extension": lambda sh: sh.extensions.append(sh.extensions[-1]),
    "cookie in a ServerHello": lambda sh: sh.set(ExtensionType.COOKIE, cookie_data(b"c")),
    "unknown extension": lambda sh: sh.set(0xFF01, b"\x00"),
    "trailing bytes": lambda sh: setattr(sh, "trailing", b"\x00"),
}


@pytest.mark.parametrize("name", list(SERVER_HELLO_EDITS))
def test_inconsistent_server_hello_is_malformed(chains, full, name):
    chain = chains["ecdsa-p256"]
    assert_approved_as_sent(full, chain)
    msgs = replaced(full.handshake_messages, 1, edit_server_hello(full.handshake_messages[1], SERVER_HELLO_EDITS[name]))
    assert_refused(MALFORMED, msgs, P256, chain)


def test_suite_offered_but_unknown_to_the_engine_is_malformed(pki, chains):
    request = raw_request(pki, suites=(CipherSuite.AES_128_GCM_SHA256, 0x1304))  # TLS_AES_128_CCM_SHA256
    edit = lambda sh: setattr(sh, "cipher_suite", 0x1304)  # noqa: E731
    msgs = replaced(request.handshake_messages, 1, edit_server_hello(request.handshake_messages[1], edit))
    assert_refused(MALFORMED, msgs, P256, chains["ecdsa-p256"])


EE_FORGERIES = {
    "duplicate extension": encrypted_extensions((ExtensionType.SERVER_NAME, b""), (ExtensionType.SERVER_NAME, b"")),
    "early_data accepted": encrypted_extensions((ExtensionType.EARLY_DATA, b"")),
    "key_share": encrypted_extensions((ExtensionType.KEY_SHARE, u16(Group.X25519) + vec16(bytes(32)))),
    "unknown extension": encrypted_extensions((0xFF01, b"\x00")),
    "non-empty server_name": encrypted_extensions((ExtensionType.SERVER_NAME, server_name_data("mx.example.org"))),
    "record_size_limit not offered": encrypted_extensions((ExtensionType.RECORD_SIZE_LIMIT, u16(16385))),
    "odd supported_groups": encrypted_extensions((ExtensionType.SUPPORTED_GROUPS, vec16(b"\x00"))),
    "trailing bytes": encrypted_extensions((ExtensionType.SERVER_NAME, b""), trailing=b"\x00"),
    "extension block runs over": handshake_message(HandshakeType.ENCRYPTED_EXTENSIONS, u16(10) + u16(0)),
    "empty body": handshake_message(HandshakeType.ENCRYPTED_EXTENSIONS, b""),
}


@pytest.mark.parametrize("name", list(EE_FORGERIES))
def test_malformed_encrypted_extensions_are_refused(chains, full, name):
    msgs = replaced(full.handshake_messages, 2, EE_FORGERIES[name])
    assert_refused(MALFORMED, msgs, P256, chains["ecdsa-p256"])


def test_server_name_acknowledged_without_client_sni_is_malformed(pki, chains):
    request = raw_request(pki, server_name=None)
    assert_approved_as_sent(request, chains["ecdsa-p256"])
    msgs = replaced(request.handshake_messages, 2, encrypted_extensions((ExtensionType.SERVER_NAME, b"")))
    assert_refused(MALFORMED, msgs, P256, chains["ecdsa-p256"])


def hello_edits():
    return {
        "duplicate extension": lambda h: h.add(ExtensionType.SUPPORTED_GROUPS, groups_data(Group.X25519)),
        "compression offered": lambda h: setattr(h, "compression_methods", b"\x01\x00"),
        "no key_share": lambda h: h.remove(ExtensionType.KEY_SHARE),
        "share for a group not supported": lambda h: h.set(
            ExtensionType.SUPPORTED_GROUPS, groups_data(Group.SECP256R1)),
        "another share for a group not supported": lambda h: h.set(ExtensionType.KEY_SHARE, key_share_data(
            (Group.X25519, bytes(32)), (Group.SECP384R1, b"\x04" + bytes(96)))),
        "two shares for one group": lambda h: h.set(ExtensionType.KEY_SHARE, key_share_data(
            (Group.X25519, bytes(32)), (Group.X25519, bytes(32)))),
        "trailing bytes": lambda h: setattr(h, "trailing", b"\x00"),
        "bad host name": lambda h: h.set(ExtensionType.SERVER_NAME, server_name_data("mx.example.org\x00")),
    }


@pytest.mark.parametrize("name", list(hello_edits()))
def test_malformed_client_hello_is_refused(pki, chains, name):
    leaf = pki.leaves["ecdsa-p256"]
    client = RawClient(ServerConfig([leaf.chain]), leaf.key, auto_sign=False)
    hello = client.hello()
    client.send_hello(hello)
    changed = hello.copy()
    hello_edits()[name](changed)
    msgs = replaced(client.signature_requests[0].handshake_messages, 0, changed.encode())
    assert_refused(MALFORMED, msgs, P256, chains["ecdsa-p256"])


def retry_edits(retried: SignatureRequest) -> dict[str, tuple[int, bytes]]:
    ch1, hrr, ch2, sh, ee, cert = retried.handshake_messages

    def sh_edit(edit) -> tuple[int, bytes]:
        return 3, edit_server_hello(sh, edit)

    def hrr_edit(edit) -> tuple[int, bytes]:
        return 1, edit_server_hello(hrr, edit)

    def ch2_patch(offset: int, value: bytes) -> tuple[int, bytes]:
        return 2, ch2[:offset] + value + ch2[offset + len(value):]

    hrr_group = int.from_bytes(dict(ServerHelloFields.decode(hrr).extensions)[ExtensionType.KEY_SHARE], "big")
    other = Group.SECP256R1 if hrr_group == Group.X25519 else Group.X25519
    return {
        "ServerHello changes the suite": sh_edit(lambda f: setattr(f, "cipher_suite", CipherSuite.AES_256_GCM_SHA384)),
        "ServerHello changes the group": sh_edit(lambda f: f.set(
            ExtensionType.KEY_SHARE, u16(Group.SECP256R1) + vec16(b"\x04" + bytes(64)))),
        "second hello changes its random": ch2_patch(6, bytes(4)),
        "second hello changes its session id": ch2_patch(39, bytes(4)),
        "retry request without a key_share": hrr_edit(lambda f: f.set(ExtensionType.KEY_SHARE, None)),
        "retry request for a group not offered": hrr_edit(lambda f: f.set(ExtensionType.KEY_SHARE, u16(Group.SECP384R1))),
        "retry request for another offered group": hrr_edit(lambda f: f.set(ExtensionType.KEY_SHARE, u16(other))),
        "retry request with another cookie": hrr_edit(lambda f: f.set(ExtensionType.COOKIE, cookie_data(b"other"))),
        "retry request without its cookie": hrr_edit(lambda f: f.set(ExtensionType.COOKIE, None)),
        "retry request with a key exchange": hrr_edit(lambda f: f.set(
            ExtensionType.KEY_SHARE, u16(hrr_group) + vec16(bytes(32)))),
        "retry request accepting a PSK": hrr_edit(lambda f: f.set(ExtensionType.PRE_SHARED_KEY, u16(0))),
        "retry request with a session id echo changed": hrr_edit(flip_session_id),
        "retry request with a suite not offered": hrr_edit(lambda f: setattr(f, "cipher_suite", 0x1303)),
    }


RETRY_EDITS = ["ServerHello changes the suite", "ServerHello changes the group", "second hello changes its random",
               "second hello changes its session id", "retry request without a key_share",
               "retry request for a group not offered", "retry request for another offered group",
               "retry request with another cookie", "retry request without its cookie",
               "retry request with a key exchange", "retry request accepting a PSK",
               "retry request with a session id echo changed", "retry request with a suite not offered"]


@pytest.mark.parametrize("name", RETRY_EDITS)
def test_hello_retry_handshake_inconsistent_is_malformed(chains, retried, name):
    chain = chains["ecdsa-p256"]
    assert_approved_as_sent(retried, chain)
    index, message = retry_edits(retried)[name]
    assert_refused(MALFORMED, replaced(retried.handshake_messages, index, message), P256, chain)


def test_retry_edits_are_all_tested(retried):
    assert sorted(RETRY_EDITS) == sorted(retry_edits(retried))


def retry_hello_edits(client: RawClient):
    """Forged hellos around a real HelloRetryRequest for x25519: (message index, edit of that hello)."""
    x25519, p256 = (Group.X25519, client.key_share(Group.X25519)), (Group.SECP256R1, client.key_share(Group.SECP256R1))
    return {
        "second hello with two shares": (2, lambda h: h.set(ExtensionType.KEY_SHARE, key_share_data(x25519, p256))),
        "second hello with early_data": (2, lambda h: h.add(ExtensionType.EARLY_DATA, b"")),
        "second hello without the cookie": (2, lambda h: h.remove(ExtensionType.COOKIE)),
        "first hello already sent the share asked for": (0, lambda h: h.set(
            ExtensionType.KEY_SHARE, key_share_data(x25519))),
        "first hello did not support the group asked for": (0, lambda h: h.set(
            ExtensionType.SUPPORTED_GROUPS, groups_data(Group.SECP256R1))),
    }


@pytest.mark.parametrize("name", ["second hello with two shares", "second hello with early_data",
                                  "second hello without the cookie", "first hello already sent the share asked for",
                                  "first hello did not support the group asked for"])
def test_hellos_inconsistent_with_the_retry_request_are_malformed(pki, chains, name):
    """The engine would not answer most of these; the policy does not rely on that."""
    leaf = pki.leaves["ecdsa-p256"]
    config = ServerConfig([leaf.chain], hello_retry_cookie=lambda digest: digest[:8])
    client = RawClient(config, leaf.key, auto_sign=False)
    hellos = [client.hello(shares=(), groups=(Group.X25519, Group.SECP256R1))]
    client.send_hello(hellos[0])
    assert client.hello_retry_group == Group.X25519
    hellos.append(client.retry_hello(hellos[0]))
    client.send_hello(hellos[1])
    [request] = client.signature_requests
    assert_approved_as_sent(request, chains["ecdsa-p256"])
    index, edit = retry_hello_edits(client)[name]
    forged = hellos[index // 2].copy()
    edit(forged)
    assert_refused(MALFORMED, replaced(request.handshake_messages, index, forged.encode()), P256, chains["ecdsa-p256"])


def rich_request(pki, alpn_protocols: tuple[bytes, ...] = ()) -> SignatureRequest:
    """A hello offering every extension the engine may answer in EncryptedExtensions: SNI, ALPN, record_size_limit."""
    leaf = pki.leaves["ecdsa-p256"]
    client = RawClient(ServerConfig([leaf.chain], alpn_protocols=alpn_protocols), leaf.key, auto_sign=False)
    hello = client.hello()
    hello.add(ExtensionType.ALPN, vec16(vec8(b"h2") + vec8(b"smtp")))
    hello.add(ExtensionType.RECORD_SIZE_LIMIT, record_size_limit_data(1024))
    client.send_hello(hello)
    return client.signature_requests[0]


@pytest.fixture(scope="module")
def rich(pki) -> SignatureRequest:
    """The edge's answer to it: SNI and record_size_limit, no application protocol."""
    return rich_request(pki)


def test_encrypted_extensions_answering_every_offer_but_alpn_are_approved(chains, rich):
    ee = rich.handshake_messages[2]
    for ext_type in (ExtensionType.SERVER_NAME, ExtensionType.RECORD_SIZE_LIMIT):
        assert u16(ext_type) in ee
    assert u16(ExtensionType.ALPN) not in ee
    assert_approved_as_sent(rich, chains["ecdsa-p256"])


RICH_EE_FORGERIES = {
    "two protocols selected": encrypted_extensions((ExtensionType.ALPN, vec16(vec8(b"smtp") + vec8(b"h2")))),
    "no protocol selected": encrypted_extensions((ExtensionType.ALPN, vec16(b""))),
    "empty protocol name": encrypted_extensions((ExtensionType.ALPN, vec16(vec8(b"")))),
    "protocol list runs over": encrypted_extensions((ExtensionType.ALPN, u16(9) + vec8(b"smtp"))),
    "record_size_limit below 64": encrypted_extensions((ExtensionType.RECORD_SIZE_LIMIT, u16(63))),
    "record_size_limit too long": encrypted_extensions((ExtensionType.RECORD_SIZE_LIMIT, u16(1024) + b"\x00")),
}


@pytest.mark.parametrize("name", list(RICH_EE_FORGERIES))
def test_encrypted_extensions_answering_offers_wrongly_are_malformed(chains, rich, name):
    msgs = replaced(rich.handshake_messages, 2, RICH_EE_FORGERIES[name])
    assert_refused(MALFORMED, msgs, P256, chains["ecdsa-p256"])


# --- policy.alpn_selected: the edge is an MX and negotiates no application protocol ----------------------

@pytest.mark.parametrize("selected", [b"smtp", b"h2"])
def test_engine_handshake_selecting_an_offered_protocol_is_refused(pki, chains, selected):
    """What an engine configured with ALPN sends, the client having offered it: refused, with the facts audited."""
    request = rich_request(pki, alpn_protocols=(selected,))
    assert u16(ExtensionType.ALPN) + u16(2 + 1 + len(selected)) + vec16(vec8(selected)) in request.handshake_messages[2]
    refusal = assert_refused(ALPN_SELECTED, request.handshake_messages, request.scheme, chains["ecdsa-p256"])
    assert selected.decode() in refusal.message
    client_hello = parse_client_hello(request.handshake_messages[0])
    assert refusal.facts == {"server_name": "mx.example.org", "client_random": client_hello.random.hex()}


def test_openssl_handshake_selecting_alpn_is_refused(pki, chains):
    leaf = pki.leaves["ecdsa-p256"]
    context = client_context(pki.ca_pem)
    context.set_alpn_protocols(["h2", "http/1.1"])
    pair = MemoryPair(ServerConfig([leaf.chain], alpn_protocols=(b"h2",)), context, leaf.key)
    pair.handshake()
    assert pair.client.selected_alpn_protocol() == "h2"  # the engine alone would complete it
    [request] = pair.signature_requests
    assert_refused(ALPN_SELECTED, request.handshake_messages, request.scheme, chains["ecdsa-p256"])


ALPN_NAMES = {
    "http/1.1": b"http/1.1",
    "acme-tls/1": b"acme-tls/1",
    "longest name": b"x" * 255,
    "binary name": bytes(range(1, 33)),
}


@pytest.mark.parametrize("name", list(ALPN_NAMES))
def test_forged_alpn_selection_is_refused_whether_offered_or_not(chains, full, rich, name):
    """A stolen edge writes EncryptedExtensions itself: any well-formed selection, offered or not, alone or not."""
    alpn = (ExtensionType.ALPN, vec16(vec8(ALPN_NAMES[name])))
    # Its client offered no ALPN at all.
    assert_approved_as_sent(full, chains["ecdsa-p256"])
    assert parse_client_hello(full.handshake_messages[0]).alpn is None
    assert_refused(ALPN_SELECTED, replaced(full.handshake_messages, 2, encrypted_extensions(alpn)), P256,
                   chains["ecdsa-p256"])
    # Its client offered h2 and smtp; the selection first, last, among the other answers.
    for extensions in ([alpn, (ExtensionType.SERVER_NAME, b"")], [(ExtensionType.SERVER_NAME, b""), alpn],
                       [(ExtensionType.RECORD_SIZE_LIMIT, u16(1024)), alpn, (ExtensionType.SERVER_NAME, b"")]):
        msgs = replaced(rich.handshake_messages, 2, encrypted_extensions(*extensions))
        assert_refused(ALPN_SELECTED, msgs, P256, chains["ecdsa-p256"])


def test_alpn_selected_after_a_hello_retry_request_is_refused(pki, chains):
    leaf = pki.leaves["ecdsa-p256"]
    config = ServerConfig([leaf.chain], alpn_protocols=(b"smtp",), hello_retry_cookie=lambda digest: digest[:16])
    client = RawClient(config, leaf.key, auto_sign=False)
    hello = client.hello(shares=(), groups=(Group.X25519, Group.SECP256R1))
    hello.add(ExtensionType.ALPN, vec16(vec8(b"smtp")))
    client.send_hello(hello)
    client.send_hello(client.retry_hello(hello))
    [request] = client.signature_requests
    msgs = request.handshake_messages
    assert [m[0] for m in msgs] == [1, 2, 1, 2, 8, 11] and msgs[1][6:38] == HELLO_RETRY_REQUEST_RANDOM
    assert_refused(ALPN_SELECTED, msgs, request.scheme, chains["ecdsa-p256"])


# --- the one exception: http/1.1 for the MTA-STS policy host (mta-sts.<domain>) ---------------------------

STS = "mta-sts.example.org"
HTTP = b"http/1.1"


@pytest.fixture(scope="module")
def sts_pki(tmp_path_factory):
    """A certificate for the MX and the MTA-STS policy host, as home's ACME client orders it."""
    return make_pki(tmp_path_factory.mktemp("sts"), names=("mx.example.org", STS), key_types=("ecdsa-p256",))


def alpn_request(pki, server_name: str | None, offered=(b"h2", HTTP), engine=(HTTP,), **hello_options):
    """The engine's request for a raw hello offering `offered` (None: no ALPN extension) to a server of `engine`."""
    leaf = pki.leaves["ecdsa-p256"]
    config = ServerConfig([leaf.chain], alpn_protocols=engine, hello_retry_cookie=lambda digest: digest[:16])
    client = RawClient(config, leaf.key, auto_sign=False)
    hello = client.hello(server_name=server_name, **hello_options)
    if offered is not None:
        hello.add(ExtensionType.ALPN, vec16(b"".join(vec8(p) for p in offered)))
    client.send_hello(hello)
    if client.hello_retry_group is not None:
        client.send_hello(client.retry_hello(hello))
    return client.signature_requests[-1]


def selected_alpn(request: SignatureRequest) -> bytes | None:
    return parse_encrypted_extensions(request.handshake_messages[-2]).alpn


def test_openssl_fetching_the_mta_sts_policy_over_http11_is_approved(sts_pki):
    """What an MTA-STS fetcher does: SNI mta-sts.<domain>, ALPN h2 and http/1.1; the engine picks http/1.1."""
    leaf = sts_pki.leaves["ecdsa-p256"]
    context = client_context(sts_pki.ca_pem)
    context.set_alpn_protocols(["h2", "http/1.1"])
    pair = MemoryPair(ServerConfig([leaf.chain], alpn_protocols=(HTTP,)), context, leaf.key, server_hostname=STS)
    pair.server = PolicyInTheLoop(pair.server, leaf.chain)
    pair.handshake()
    assert pair.server_error is None and pair.client.selected_alpn_protocol() == "http/1.1"
    [(request, approved)] = pair.server.approvals
    assert approved.server_name == STS and approved.content == request.content


@pytest.mark.parametrize("offered", [None, (b"h2", HTTP)], ids=["no ALPN offered", "none selected"])
def test_mta_sts_name_without_alpn_is_approved(sts_pki, offered):
    request = alpn_request(sts_pki, STS, offered=offered, engine=())
    assert selected_alpn(request) is None
    assert_approved_as_sent(request, sts_pki.leaves["ecdsa-p256"].chain)


def test_mta_sts_http11_after_a_hello_retry_request_is_approved(sts_pki):
    request = alpn_request(sts_pki, STS, shares=(), groups=(Group.X25519, Group.SECP256R1))
    assert len(request.handshake_messages) == 6 and selected_alpn(request) == HTTP
    assert assert_approved_as_sent(request, sts_pki.leaves["ecdsa-p256"].chain).server_name == STS


ALPN_REFUSALS = {
    # (server_name, offered, the engine's protocols): what is refused, and why.
    "http/1.1 for the MX name": ("mx.example.org", (HTTP,), (HTTP,), ALPN_SELECTED),
    "http/1.1 without SNI": (None, (HTTP,), (HTTP,), ALPN_SELECTED),
    "h2 for the mta-sts name": (STS, (b"h2", HTTP), (b"h2",), ALPN_SELECTED),
    "smtp for the mta-sts name": (STS, (b"smtp",), (b"smtp",), ALPN_SELECTED),
    "acme-tls/1 for the mta-sts name": (STS, (b"acme-tls/1",), (b"acme-tls/1",), ALPN_SELECTED),
    "a name merely containing mta-sts": ("xmta-sts.example.org", (HTTP,), (HTTP,), ALPN_SELECTED),
    "mta-sts without its dot": ("mta-stsexample.org", (HTTP,), (HTTP,), ALPN_SELECTED),
    "mta-sts name the certificate lacks": ("mta-sts.example.net", (HTTP,), (HTTP,), SNI_MISMATCH),
}


@pytest.mark.parametrize("name", list(ALPN_REFUSALS))
def test_other_alpn_and_sni_pairings_are_refused(sts_pki, name):
    server_name, offered, engine, code = ALPN_REFUSALS[name]
    request = alpn_request(sts_pki, server_name, offered=offered, engine=engine)
    assert selected_alpn(request) == engine[0]  # the engine alone would go on
    assert_refused(code, request.handshake_messages, request.scheme, sts_pki.leaves["ecdsa-p256"].chain)


def test_mta_sts_http11_for_a_certificate_without_that_name_is_refused(pki, chains):
    """The session PKI's certificate names mx.example.org and localhost only."""
    request = alpn_request(pki, STS)
    assert selected_alpn(request) == HTTP
    assert_refused(SNI_MISMATCH, request.handshake_messages, request.scheme, chains["ecdsa-p256"])


def test_http11_selected_for_an_mta_sts_name_without_the_client_offering_it_is_refused(sts_pki):
    """A stolen edge writing EncryptedExtensions itself: http/1.1 the client never offered (or offered no ALPN)."""
    chain = sts_pki.leaves["ecdsa-p256"].chain
    forged = encrypted_extensions((ExtensionType.SERVER_NAME, b""), (ExtensionType.ALPN, vec16(vec8(HTTP))))
    for offered in (None, (b"h2",)):
        request = alpn_request(sts_pki, STS, offered=offered, engine=())
        assert_approved_as_sent(request, chain)
        refusal = assert_refused(ALPN_SELECTED, replaced(request.handshake_messages, 2, forged), P256, chain)
        assert "did not offer" in refusal.message


# --- every code, and nothing but Refusal -------------------------------------------------------------

def test_refusal_codes_are_the_documented_ones():
    assert REFUSAL_CODES == {
        "policy.not_a_transcript", "policy.not_tls13", "policy.malformed", "policy.psk_handshake",
        "policy.certificate_mismatch", "policy.sni_mismatch", "policy.scheme_mismatch", "policy.alpn_selected",
        "policy.not_tls12", "policy.suite_mismatch", "policy.bad_params", "policy.stale_nonce",
        "policy.replayed_nonce", "policy.internal_error",
    }


def test_a_bug_is_a_refusal_not_a_crash(chains, full):
    """A chain object the policy cannot use (a keystore bug) is refused, with the bug as the cause."""
    with pytest.raises(Refusal) as refused:
        check(full.handshake_messages, P256, object())
    assert refused.value.code == INTERNAL_ERROR and refused.value.__cause__ is not None


FUZZ = settings(deadline=None, max_examples=1500, suppress_health_check=[HealthCheck.too_slow])

# (operation, message index, offset in the message, argument, reframe); indexes wrap around.
# A reframed message gets its length field fixed after the edit, so the edit reaches the parsers.
def byte_edit(op: str, arg):
    return st.tuples(st.just(op), st.integers(0, 5), st.integers(0, 2**12), arg, st.booleans())


def message_edit(op: str, arg=None):
    return st.tuples(st.just(op), st.integers(0, 5), st.none(), arg if arg is not None else st.none(), st.just(False))


message_mutation = st.one_of(
    byte_edit("flip", st.integers(1, 255)),
    byte_edit("set", st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF])),
    byte_edit("insert", st.binary(min_size=1, max_size=6)),
    byte_edit("delete", st.integers(1, 6)),
    byte_edit("truncate", st.none()),
    message_edit("drop message"),
    message_edit("repeat message"),
    message_edit("swap messages", st.integers(0, 5)),
)


def mutated(msgs: list[bytes], mutations) -> bytes:
    """Byte edits land in one message (its header included); message edits move whole messages."""
    msgs = list(msgs)
    for op, index, offset, arg, reframe in mutations:
        i = index % len(msgs)
        if op == "drop message":
            if len(msgs) > 1:
                del msgs[i]
        elif op == "repeat message":
            msgs.insert(i, msgs[i])
        elif op == "swap messages":
            j = arg % len(msgs)
            msgs[i], msgs[j] = msgs[j], msgs[i]
        else:
            m = msgs[i]
            k = offset % (len(m) + 1)
            if op == "flip" and k < len(m):
                m = m[:k] + bytes((m[k] ^ arg,)) + m[k + 1:]
            elif op == "set" and k < len(m):
                m = m[:k] + bytes((arg,)) + m[k + 1:]
            elif op == "insert":
                m = m[:k] + arg + m[k:]
            elif op == "delete":
                m = m[:k] + m[k + arg:]
            elif op == "truncate":
                m = m[:k]
            if reframe and len(m) >= 4:
                m = handshake_message(m[0], m[4:])
            msgs[i] = m
    return b"".join(msgs)


class Corpus:
    """Real transcripts to mutate, and the oracle's chain, with a short repr for Hypothesis' reports."""

    def __init__(self, chain, requests: list[SignatureRequest]):
        self.chain = chain
        self.requests = requests

    def __repr__(self) -> str:
        return "corpus"


@pytest.fixture(scope="module")
def corpus(pki, chains, full, retried) -> Corpus:
    """Raw client transcripts (one with a retry), OpenSSL ones with and without a retry."""
    openssl = openssl_handshake(pki, chains["ecdsa-p256"], "ecdsa-p256").approvals[0][0]
    openssl_retry = openssl_handshake(pki, chains["ecdsa-p256"], "ecdsa-p256",
                                      **RETRY_CONFIGS["hello-retry"]).approvals[0][0]
    return Corpus(chains["ecdsa-p256"], [full, retried, openssl, openssl_retry])


def assert_refusal_or_own_content(data: bytes, scheme, chain) -> None:
    try:
        approved = check_certificate_verify(data, scheme, chain)
    except Refusal as refusal:
        assert refusal.code in REFUSAL_CODES and refusal.code != INTERNAL_ERROR, (refusal, refusal.__cause__)
        return
    suite = SUITES[approved.cipher_suite]
    assert approved.content == certificate_verify_content(transcript_hash(suite.hash_name, split_handshake(data)))
    assert approved.scheme == scheme


@FUZZ
@given(which=st.integers(0, 3), mutations=st.lists(message_mutation, min_size=1, max_size=4))
def test_mutated_real_transcripts_get_a_refusal_or_their_own_content(corpus, which, mutations):
    request = corpus.requests[which]
    assert_refusal_or_own_content(mutated(request.handshake_messages, mutations), request.scheme, corpus.chain)


@FUZZ
@given(data=st.binary(max_size=2048), scheme=st.integers(-1, 0x10000))
def test_random_bytes_get_a_refusal(corpus, data, scheme):
    with pytest.raises(Refusal) as refused:
        check_certificate_verify(data, scheme, corpus.chain)
    assert refused.value.code != INTERNAL_ERROR, refused.value.__cause__
