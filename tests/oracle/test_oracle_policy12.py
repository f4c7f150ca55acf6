"""The key oracle's TLS 1.2 policy (relay/oracle/policy12.py): it signs only a ServerKeyExchange it built.

Real requests, made by the engine for OpenSSL (Python's ssl held to TLS 1.2)
and the raw TLS 1.2 client, are approved, and the content the policy builds
is what the engine asked to be signed. Every off-policy request gets its code:
a client that offers TLS 1.3, RSA key transport and other suites, schemes,
names, ALPN, params that are not one valid named-curve point (including
bytes that are really something else), stale and replayed nonces. Hypothesis
mutates real requests: the answer is a Refusal or an Approved12 whose content
is built from the mutated request, never anything else.
"""

import os
import ssl
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.oracle.policy import (
    ALPN_SELECTED,
    BAD_PARAMS,
    MALFORMED,
    NOT_A_TRANSCRIPT,
    NOT_TLS12,
    NOT_TLS13,
    REPLAYED_NONCE,
    SCHEME_MISMATCH,
    SNI_MISMATCH,
    STALE_NONCE,
    SUITE_MISMATCH,
    Refusal,
    check_certificate_verify,
)
from relay.oracle.policy12 import NONCE_WINDOW, Approved12, NonceLedger, check_server_key_exchange
from relay.tls import ServerConfig, SignatureScheme, Tls12SignatureRequest
from relay.tls.constants import FALLBACK_SCSV, CipherSuite12, ExtensionType, Group
from relay.tls.messages import parse_client_hello
from relay.tls.signing import ecdhe_params, server_key_exchange_content, tls12_nonce, tls12_server_random
from relay.tls.wire import vec8, vec16

from ..memory import MemoryPair, signature_requests
from ..pki import make_pki
from ..rawclient12 import Raw12

P256 = SignatureScheme.ECDSA_SECP256R1_SHA256
ECDSA_AES128 = CipherSuite12.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
STS = "mta-sts.example.org"


@pytest.fixture(scope="module")
def chains(pki):
    return {key_type: leaf.chain for key_type, leaf in pki.leaves.items()}


def openssl_request(pki, key_type="ecdsa-p256", **context_options) -> Tls12SignatureRequest:
    """The engine's request for a real OpenSSL TLS 1.2 client."""
    leaf = pki.leaves[key_type]
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    for name, value in context_options.items():
        setattr(context, name, value)
    pair = MemoryPair(ServerConfig([leaf.chain]), context, leaf.key)
    pair.handshake()
    assert pair.server_error is None and pair.client.version() == "TLSv1.2"
    [request] = pair.signature_requests
    return request


def raw_request(pki, *, key_type="ecdsa-p256", **hello_options) -> Tls12SignatureRequest:
    """The engine's request for a raw TLS 1.2 hello (hello_options as Raw12.hello's)."""
    leaf = pki.leaves[key_type]
    client = Raw12(ServerConfig([leaf.chain]), leaf.key)
    client.auto_sign = False
    client.send_hello(client.hello(**hello_options))
    [request] = client.requests
    return request


def check(request: Tls12SignatureRequest, chain, *, tail=None, scheme=None, suite=None, nonce=None, now=None):
    return check_server_key_exchange(
        request.client_hello + request.params if tail is None else tail,
        request.scheme if scheme is None else scheme, chain,
        request.cipher_suite if suite is None else suite,
        request.nonce if nonce is None else nonce, time.time() if now is None else now)


def assert_refused(code: str, request, chain, **changes) -> Refusal:
    with pytest.raises(Refusal) as refused:
        check(request, chain, **changes)
    assert refused.value.code == code, refused.value
    return refused.value


# --- approved ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "ed25519"])
def test_real_openssl_request_is_approved_with_the_engines_content(pki, chains, key_type):
    request = openssl_request(pki, key_type)
    approved = check(request, chains[key_type])
    assert isinstance(approved, Approved12)
    assert approved.content == request.content
    assert approved.server_random == tls12_server_random(request.nonce)
    assert approved.server_random.endswith(b"DOWNGRD\x01")
    assert approved.scheme == request.scheme and approved.cipher_suite == request.cipher_suite


@pytest.mark.parametrize("group", [Group.X25519, Group.SECP256R1, Group.SECP384R1])
def test_every_served_group_is_approved(pki, chains, group):
    """(An Ed25519 key: an ECDSA key's curve must be among the client's groups too.)"""
    request = raw_request(pki, key_type="ed25519", groups=(group,))
    assert check(request, chains["ed25519"]).group == group


def test_an_ecdsa_key_whose_curve_the_client_lacks_is_refused(pki, chains):
    """RFC 8422 5.1: the client offers x25519 only; the P-256 key's signature is not for it."""
    request = raw_request(pki)
    hello = Raw12(ServerConfig([chains["ecdsa-p256"]]), None).hello(groups=(Group.X25519,))
    refusal = assert_refused(SUITE_MISMATCH, request, chains["ecdsa-p256"],
                             tail=hello.encode() + ecdhe_params(Group.X25519, request.params[4:]))
    assert "curve" in refusal.message


def test_rsa_pkcs1_is_approved_for_an_rsa_key_in_tls12(pki, chains):
    request = raw_request(pki, key_type="rsa-2048", suites=(CipherSuite12.ECDHE_RSA_WITH_AES_128_GCM_SHA256,),
                          schemes=(0x0401,))
    assert check(request, chains["rsa-2048"]).scheme == SignatureScheme.RSA_PKCS1_SHA256


# --- which client: policy.not_tls12, and the TLS 1.3 method refusing TLS 1.2 ------------------------------

def test_a_tls13_clients_hello_is_not_tls12(pki, chains):
    """The stolen-edge downgrade: a TLS 1.3 client's real hello, asked to be signed the TLS 1.2 way."""
    [tls13] = signature_requests(pki, "ecdsa-p256", 1)
    request = openssl_request(pki)
    refusal = assert_refused(NOT_TLS12, request, chains["ecdsa-p256"], tail=tls13.handshake_messages[0] + request.params)
    assert "offers TLS 1.3" in refusal.message
    # and the whole TLS 1.3 transcript (what `sign` takes) is no TLS 1.2 request either
    with pytest.raises(Refusal):
        check(request, chains["ecdsa-p256"], tail=b"".join(tls13.handshake_messages))


def test_the_tls13_method_refuses_a_tls12_request(pki, chains):
    request = openssl_request(pki)
    with pytest.raises(Refusal) as refused:
        check_certificate_verify(request.client_hello + request.params, P256, chains["ecdsa-p256"])
    assert refused.value.code in (NOT_TLS13, NOT_A_TRANSCRIPT)


def test_fallback_scsv_is_not_tls12(pki, chains):
    request = raw_request(pki)
    hello = Raw12(ServerConfig([chains["ecdsa-p256"]]), None).hello()
    hello.cipher_suites.append(FALLBACK_SCSV)
    assert_refused(NOT_TLS12, request, chains["ecdsa-p256"], tail=hello.encode() + request.params)


def test_a_tls10_hello_is_not_tls12(pki, chains):
    request = raw_request(pki)
    hello = Raw12(ServerConfig([chains["ecdsa-p256"]]), None).hello()
    hello.legacy_version = 0x0301
    assert_refused(NOT_TLS12, request, chains["ecdsa-p256"], tail=hello.encode() + request.params)


# --- policy.not_a_transcript and policy.malformed ------------------------------------------------------

@pytest.mark.parametrize("tail", [b"", b"\x02\x00\x00\x00", b"\x01\x00\x01\x00", bytes(64)],
                         ids=["empty", "server-hello", "cut-short", "zeros"])
def test_not_a_client_hello_is_not_a_transcript(pki, chains, tail):
    assert_refused(NOT_A_TRANSCRIPT, raw_request(pki), chains["ecdsa-p256"], tail=tail)


def test_a_garbled_client_hello_is_malformed(pki, chains):
    request = raw_request(pki)
    hello = bytearray(request.client_hello)
    hello[4 + 2 + 32] = 40   # session id length past the message
    assert_refused(MALFORMED, request, chains["ecdsa-p256"], tail=bytes(hello) + request.params)


@pytest.mark.parametrize("nonce", [b"", bytes(31), bytes(33), "00" * 32, None], ids=["empty", "31", "33", "str", "none"])
def test_a_nonce_that_is_not_32_bytes_is_malformed(pki, chains, nonce):
    request = raw_request(pki)
    with pytest.raises(Refusal) as refused:
        check_server_key_exchange(request.client_hello + request.params, request.scheme, chains["ecdsa-p256"],
                                  request.cipher_suite, nonce, time.time())
    assert refused.value.code == MALFORMED


# --- policy.suite_mismatch: the "RSA key exchange requested" class --------------------------------------

@pytest.mark.parametrize("suite", [
    pytest.param(0x009C, id="rsa-key-transport"),
    pytest.param(0x002F, id="rsa-cbc"),
    pytest.param(0xC009, id="ecdhe-ecdsa-cbc"),
    pytest.param(0x1301, id="tls13-suite"),
    pytest.param(CipherSuite12.ECDHE_RSA_WITH_AES_128_GCM_SHA256, id="rsa-suite-for-ecdsa-key"),
    pytest.param(CipherSuite12.ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, id="not-offered"),
    pytest.param(True, id="bool"),
    pytest.param("49195", id="string"),
])
def test_suites_the_engine_would_not_choose_are_refused(pki, chains, suite):
    request = raw_request(pki, suites=(ECDSA_AES128, 0x009C, 0x002F, 0xC009, 0x1301,
                                       CipherSuite12.ECDHE_RSA_WITH_AES_128_GCM_SHA256))
    assert_refused(SUITE_MISMATCH, request, chains["ecdsa-p256"], suite=suite)


# --- policy.scheme_mismatch --------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", [0x0804, 0x0401, 0x0503, 0x0201, 0x0807], ids=["pss", "pkcs1", "p384-scheme",
                                                                                  "sha1", "ed25519"])
def test_schemes_the_p256_key_does_not_sign_with_are_refused(pki, chains, scheme):
    assert_refused(SCHEME_MISMATCH, raw_request(pki), chains["ecdsa-p256"], scheme=scheme)


def test_a_scheme_the_client_did_not_offer_is_refused(pki, chains):
    request = raw_request(pki, key_type="rsa-2048", suites=(CipherSuite12.ECDHE_RSA_WITH_AES_128_GCM_SHA256,),
                          schemes=(0x0804,))
    assert_refused(SCHEME_MISMATCH, request, chains["rsa-2048"], scheme=0x0401)


# --- policy.sni_mismatch and policy.alpn_selected ---------------------------------------------------

def test_a_name_outside_the_certificate_is_refused(pki, chains):
    request = raw_request(pki, server_name="bank.example.com")
    assert_refused(SNI_MISMATCH, request, chains["ecdsa-p256"])


def hello_with_alpn(chain, server_name, protocols):
    hello = Raw12(ServerConfig([chain]), None).hello(server_name=server_name)
    return hello.add(ExtensionType.ALPN, vec16(b"".join(vec8(p) for p in protocols))).encode()


@pytest.mark.parametrize("server_name, protocols", [
    ("mx.example.org", (b"http/1.1",)),
    ("mx.example.org", (b"h2",)),
    (None, (b"http/1.1",)),
    (STS, (b"h2", b"acme-tls/1")),
])
def test_alpn_offered_outside_mta_sts_with_http11_is_refused(tmp_path_factory, server_name, protocols):
    """The signer cannot see the server's ALPN choice in TLS 1.2: it signs only where TLS 1.3's policy would."""
    sts = make_pki(tmp_path_factory.mktemp("sts"), names=("mx.example.org", STS), key_types=("ecdsa-p256",))
    chain = sts.leaves["ecdsa-p256"].chain
    request = raw_request(sts)
    assert_refused(ALPN_SELECTED, request, chain, tail=hello_with_alpn(chain, server_name, protocols) + request.params)


def test_http11_for_the_mta_sts_name_is_signed(tmp_path_factory):
    sts = make_pki(tmp_path_factory.mktemp("sts"), names=("mx.example.org", STS), key_types=("ecdsa-p256",))
    chain = sts.leaves["ecdsa-p256"].chain
    request = raw_request(sts)
    tail = hello_with_alpn(chain, STS, (b"h2", b"http/1.1")) + request.params
    assert check(request, chain, tail=tail).server_name == STS


# --- policy.bad_params: the params are the policy's to read -------------------------------------------

def params_cases(request):
    point = request.params[4:]
    return {
        "explicit-prime-curve": b"\x01" + request.params[1:],
        "explicit-char2-curve": b"\x02" + request.params[1:],
        "group-not-offered": ecdhe_params(Group.SECP256R1, bytes([4]) + bytes(64)),
        "unserved-group-x448": ecdhe_params(0x001E, bytes(56)),
        "hybrid-group": ecdhe_params(Group.X25519MLKEM768, point),
        "x25519-zero-point": ecdhe_params(Group.X25519, bytes(32)),
        "x25519-short-point": ecdhe_params(Group.X25519, point[:31]),
        "trailing-byte": request.params + b"\x00",
        "cut-short": request.params[:-1],
        "empty": b"",
        # bytes that are something else: a TLS 1.3 CertificateVerify content, a ServerHello, a digest
        "certificate-verify-content": b"\x20" * 64 + b"TLS 1.3, server CertificateVerify\x00" + bytes(32),
        "a-server-hello": bytes.fromhex("020000460303") + bytes(64),
        "a-sha256-digest": bytes(32),
    }


PARAMS_CASES = ["explicit-prime-curve", "explicit-char2-curve", "group-not-offered", "unserved-group-x448",
                "hybrid-group", "x25519-zero-point", "x25519-short-point", "trailing-byte", "cut-short", "empty",
                "certificate-verify-content", "a-server-hello", "a-sha256-digest"]


@pytest.mark.parametrize("case", PARAMS_CASES)
def test_params_that_are_not_one_valid_point_are_bad_params(pki, chains, case):
    request = raw_request(pki)
    tail = request.client_hello + params_cases(request)[case]
    assert_refused(BAD_PARAMS, request, chains["ecdsa-p256"], tail=tail)


def test_a_p256_point_off_the_curve_is_bad_params(pki, chains):
    request = raw_request(pki, groups=(Group.SECP256R1,))
    off_curve = b"\x04" + (1).to_bytes(32, "big") + (1).to_bytes(32, "big")
    tail = request.client_hello + ecdhe_params(Group.SECP256R1, off_curve)
    assert_refused(BAD_PARAMS, request, chains["ecdsa-p256"], tail=tail)


def test_a_compressed_p256_point_is_bad_params(pki, chains):
    request = raw_request(pki, groups=(Group.SECP256R1,))
    compressed = b"\x02" + request.params[5:37]
    assert_refused(BAD_PARAMS, request, chains["ecdsa-p256"],
                   tail=request.client_hello + ecdhe_params(Group.SECP256R1, compressed))


# --- nonces -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("age", [-NONCE_WINDOW - 5, NONCE_WINDOW + 5, 86400], ids=["future", "old", "a-day"])
def test_a_nonce_far_from_the_signers_clock_is_stale(pki, chains, age):
    request = raw_request(pki)
    nonce = tls12_nonce(time.time() - age, os.urandom)
    assert_refused(STALE_NONCE, request, chains["ecdsa-p256"], nonce=nonce)


def test_the_ledger_refuses_a_replayed_nonce_until_it_could_no_longer_be_fresh():
    clock = [1000.0]
    ledger = NonceLedger(window=10, clock=lambda: clock[0])
    nonce = tls12_nonce(clock[0], os.urandom)
    ledger.admit(nonce)
    with pytest.raises(Refusal) as refused:
        ledger.admit(nonce)
    assert refused.value.code == REPLAYED_NONCE
    ledger.admit(tls12_nonce(clock[0], os.urandom))       # another nonce is fine
    clock[0] += 21                                        # past twice the window: the signer refuses it as stale
    ledger.admit(nonce)


def test_a_full_ledger_refuses_rather_than_forgets():
    ledger = NonceLedger(window=10, limit=3, clock=lambda: 5.0)
    for _ in range(3):
        ledger.admit(os.urandom(32))
    with pytest.raises(Refusal) as refused:
        ledger.admit(os.urandom(32))
    assert refused.value.code == STALE_NONCE


def test_the_content_binds_the_client_random(pki, chains):
    """Two hellos, same nonce and params: two different signed contents (the signature is one handshake's)."""
    first, second = raw_request(pki), raw_request(pki)
    a = check(first, chains["ecdsa-p256"])
    b = check(second, chains["ecdsa-p256"], nonce=first.nonce, tail=second.client_hello + first.params)
    assert a.server_random == b.server_random and a.content != b.content
    assert b.content == server_key_exchange_content(b.client_random, b.server_random, first.params)


# --- whatever the bytes: a Refusal or an honest Approved12 ---------------------------------------------

FUZZ = settings(deadline=None, max_examples=600, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.data())
def test_mutated_requests_are_refused_or_approved_for_what_they_say(pki, chains, data):
    request = data.draw(st.sampled_from(REQUESTS))
    tail = bytearray(request.client_hello + request.params)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(tail) - 1))
        tail[position] = data.draw(st.integers(0, 255))
    try:
        approved = check(request, chains["ecdsa-p256"], tail=bytes(tail))
    except Refusal:
        return
    end = 4 + int.from_bytes(tail[1:4], "big")
    hello = parse_client_hello(bytes(tail[:end]))
    assert approved.content == server_key_exchange_content(hello.random, tls12_server_random(request.nonce),
                                                           bytes(tail[end:]))


@pytest.fixture(scope="module", autouse=True)
def _requests(pki):
    REQUESTS[:] = [raw_request(pki), raw_request(pki, groups=(Group.SECP256R1,)), openssl_request(pki)]


REQUESTS: list[Tls12SignatureRequest] = []
