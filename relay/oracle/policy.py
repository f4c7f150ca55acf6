"""The key oracle's signing policy: it signs live TLS 1.3 server handshakes and nothing else.

The edge sends the handshake messages as its engine sent them (ClientHello,
ServerHello, EncryptedExtensions, Certificate; or ClientHello,
HelloRetryRequest, ClientHello, ServerHello, EncryptedExtensions,
Certificate), concatenated, with the scheme it wants. `check_certificate_verify`
splits and parses them strictly, checks that they are one consistent TLS 1.3
full handshake whose Certificate is exactly the oracle's own chain for the key,
whose SNI is one of that certificate's names and whose client accepts the
scheme; then it recomputes the transcript hash with the selected suite's hash
and builds the CertificateVerify content itself, with relay.tls.signing, the
module the engine signs and verifies with. Anything else is a `Refusal` with a
stable code (the audit log and metrics count them by code).

The ServerHello, HelloRetryRequest and EncryptedExtensions parsers here accept
what YesTLS's engine sends and nothing more: an extension the engine never
sends in them is a refusal, not something to ignore.

Application protocols (ALPN): the edge is an MX, and its SMTP listeners never
select one. Its one other TLS service is the MTA-STS policy (RFC 8461), which
must be fetched over HTTPS from `mta-sts.<domain>`. So a selected protocol is
refused (`policy.alpn_selected`) unless it is exactly "http/1.1", the client
offered it, and the SNI is a name starting with "mta-sts." (which, as any
SNI, must be one of the certificate's names: `policy.sni_mismatch`). No ALPN
stays accepted for any of the certificate's names, as before. Why this much
and no more: a compromised edge already serves the policy (the HTTP side is
the edge's), so signing its HTTPS handshakes for the policy host gives it
nothing about mail it did not have; it still cannot get a handshake signed
for HTTP under the MX's name (or any name but mta-sts.*), nor for h2,
acme-tls/1 or any other protocol. What it can do with mta-sts.<domain> over
HTTPS is what any holder of that host can: serve browsers other content there
(docs/oracle.md, docs/edge.md).

Every request goes through this check before its signature, so the common
path parses each message once and compares the Certificate against bytes
built once per chain.
"""

import functools
from dataclasses import dataclass
from typing import NamedTuple

from relay.tls import messages
from relay.tls.certs import CertificateChain
from relay.tls.constants import (
    HELLO_RETRY_REQUEST_RANDOM,
    TLS12,
    TLS13,
    CipherSuite,
    ExtensionType,
    Group,
    HandshakeType,
    SignatureScheme,
)
from relay.tls.errors import DecodeError, IllegalParameter, TLSAlert
from relay.tls.keyschedule import SUITES
from relay.tls.messages import ClientHello, best_version, parse_client_hello
from relay.tls.signing import (
    certificate_verify_content,
    is_hello_retry_request,
    schemes_for_key,
    transcript_hash,
)
from relay.tls.wire import Reader

# Refusal codes: short, stable, counted and audited.
NOT_A_TRANSCRIPT = "policy.not_a_transcript"
NOT_TLS13 = "policy.not_tls13"
MALFORMED = "policy.malformed"
PSK_HANDSHAKE = "policy.psk_handshake"
CERTIFICATE_MISMATCH = "policy.certificate_mismatch"
SNI_MISMATCH = "policy.sni_mismatch"
SCHEME_MISMATCH = "policy.scheme_mismatch"
ALPN_SELECTED = "policy.alpn_selected"
# TLS 1.2 ServerKeyExchange (sign_tls12) only
NOT_TLS12 = "policy.not_tls12"                  # the client offers TLS 1.3 (or not even 1.2): no 1.2 signature
SUITE_MISMATCH = "policy.suite_mismatch"        # not an ECDHE-AEAD suite for this key that the client offered
BAD_PARAMS = "policy.bad_params"                # the ECDHE params are not a named curve and a valid point
STALE_NONCE = "policy.stale_nonce"              # the nonce's time is too far from the signer's clock
REPLAYED_NONCE = "policy.replayed_nonce"        # a nonce seen before
# A bug in this module, not a property of the request: still a refusal, never a signature.
INTERNAL_ERROR = "policy.internal_error"

REFUSAL_CODES = frozenset(
    {NOT_A_TRANSCRIPT, NOT_TLS13, MALFORMED, PSK_HANDSHAKE, CERTIFICATE_MISMATCH, SNI_MISMATCH, SCHEME_MISMATCH,
     ALPN_SELECTED, NOT_TLS12, SUITE_MISMATCH, BAD_PARAMS, STALE_NONCE, REPLAYED_NONCE, INTERNAL_ERROR}
)


class Refusal(Exception):
    """The oracle will not sign: `code` says why (one of REFUSAL_CODES), `message` says what it saw."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.facts: dict = {}  # what was learnt before refusing (SNI, client random), for the audit log

    def __repr__(self) -> str:
        return f"Refusal({self.code!r}, {self.message!r})"


@dataclass(frozen=True, slots=True)
class Approved:
    """A request the policy accepts: sign `content` with `scheme`; the rest is for the audit log."""

    content: bytes
    scheme: SignatureScheme
    cipher_suite: CipherSuite
    server_name: str | None
    client_random: bytes
    transcript_hash: bytes


# The two shapes of a full handshake up to the server's Certificate, as message types.
_FULL = [int(t) for t in (HandshakeType.CLIENT_HELLO, HandshakeType.SERVER_HELLO,
                          HandshakeType.ENCRYPTED_EXTENSIONS, HandshakeType.CERTIFICATE)]
_RETRY = _FULL[:2] + _FULL
_MAX_MESSAGES = len(_RETRY)

# Length of the server's key_exchange in a ServerHello, by group (RFC 8446
# 4.2.8.2, draft-ietf-tls-ecdhe-mlkem: ML-KEM-768 ciphertext then X25519).
_SERVER_SHARE_LENGTHS = {
    Group.X25519: 32,
    Group.SECP256R1: 65,
    Group.SECP384R1: 97,
    Group.X25519MLKEM768: 1088 + 32,
}


def check_certificate_verify(handshake_messages: bytes, scheme: int, chain: CertificateChain) -> Approved:
    """What to sign for this request, or `Refusal`: nothing else escapes, whatever the input."""
    seen: dict = {}
    try:
        return _check(handshake_messages, scheme, chain, seen)
    except Refusal as refusal:
        refusal.facts = seen
        raise
    except TLSAlert as error:  # _parsed names the message; this is only a safety net
        raise Refusal(MALFORMED, error.message) from error
    except Exception as bug:
        raise Refusal(INTERNAL_ERROR, f"the policy check failed: {type(bug).__name__}: {bug}") from bug


def expected_certificate_message(chain: CertificateChain) -> bytes:
    """The Certificate message the engine sends for `chain`, byte for byte."""
    return _chain_facts(chain).certificate_message


class _ChainFacts(NamedTuple):
    certificate_message: bytes
    schemes: dict[int, SignatureScheme]  # what the key signs with


@functools.lru_cache(maxsize=64)
def _chain_facts(chain: CertificateChain) -> _ChainFacts:
    # CertificateChain is frozen and hashed by identity: an entry never goes stale.
    schemes = {int(scheme): scheme for scheme in schemes_for_key(chain.public_key)}
    return _ChainFacts(messages.certificate(chain.der_chain), schemes)


def _check(data: bytes, scheme: int, chain: CertificateChain, seen: dict) -> Approved:
    msgs = split_handshake_messages(data)
    if msgs[0][0] != HandshakeType.CLIENT_HELLO:
        raise Refusal(NOT_A_TRANSCRIPT, f"starts with handshake message type {msgs[0][0]}, not a ClientHello")
    first = _parsed(parse_client_hello, msgs[0], "ClientHello")
    seen.update(server_name=first.server_name, client_random=first.random.hex())
    _check_offers_tls13(first)

    types = [m[0] for m in msgs]
    if types == _FULL and not is_hello_retry_request(msgs[1]):
        hrr = None
        hello = first
    elif types == _RETRY and is_hello_retry_request(msgs[1]) and not is_hello_retry_request(msgs[3]):
        hrr = _parsed(parse_server_hello, msgs[1], "HelloRetryRequest")
        hello = _parsed(parse_client_hello, msgs[2], "second ClientHello")
        _check_offers_tls13(hello)
    else:
        raise Refusal(NOT_A_TRANSCRIPT, f"handshake message types {types} are not a TLS 1.3 full handshake")

    _check_client_hello(first)
    if hrr is not None:
        _check_client_hello(hello)
        _check_retry(first, hrr, hello)
    server_hello = _parsed(parse_server_hello, msgs[-3], "ServerHello")
    _check_server_hello(hello, server_hello, hrr)
    _check_encrypted_extensions(hello, _parsed(parse_encrypted_extensions, msgs[-2], "EncryptedExtensions"))

    facts = _chain_facts(chain)
    if msgs[-1] != facts.certificate_message:
        raise Refusal(CERTIFICATE_MISMATCH, "the Certificate message is not this key's certificate chain")
    if first.server_name != hello.server_name:
        raise Refusal(SNI_MISMATCH, "the two ClientHellos name different servers")
    if hello.server_name is not None and not chain.matches(hello.server_name):
        raise Refusal(SNI_MISMATCH, f"server_name {hello.server_name!r} is not a name of this certificate")
    signature_scheme = facts.schemes.get(scheme) if isinstance(scheme, int) else None
    if signature_scheme is None:
        raise Refusal(SCHEME_MISMATCH, f"this key does not sign with scheme {_show(scheme)}")
    if hello.signature_algorithms is None:
        raise Refusal(SCHEME_MISMATCH, "the client sent no signature_algorithms")
    if scheme not in hello.signature_algorithms:
        raise Refusal(SCHEME_MISMATCH, f"the client did not offer scheme {_show(scheme)}")

    suite = SUITES[server_hello.cipher_suite]
    digest = transcript_hash(suite.hash_name, msgs)
    return Approved(
        content=certificate_verify_content(digest),
        scheme=signature_scheme,
        cipher_suite=suite.code,
        server_name=hello.server_name,
        client_random=hello.random,
        transcript_hash=digest,
    )


def _parsed(parser, message: bytes, what: str):
    try:
        return parser(message)
    except TLSAlert as error:
        raise Refusal(MALFORMED, f"{what}: {error.message}") from error


# --- splitting ---------------------------------------------------------------

def split_handshake_messages(data: bytes) -> list[bytes]:
    """Whole handshake messages (header included), at most six; `Refusal` when the bytes are not that."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes) or not data:
        raise Refusal(NOT_A_TRANSCRIPT, "no handshake messages")
    r = Reader(data)
    msgs = []
    try:
        while r.remaining():
            if len(msgs) == _MAX_MESSAGES:
                raise Refusal(NOT_A_TRANSCRIPT, f"more than {_MAX_MESSAGES} handshake messages")
            start = r.pos
            r.take(r.u32() & 0xFFFFFF)  # msg_type u8, length u24: the body must be all there
            msgs.append(data[start:r.pos])
    except DecodeError:
        raise Refusal(NOT_A_TRANSCRIPT, "the bytes do not split into whole handshake messages") from None
    return msgs


# --- server messages, parsed strictly ------------------------------------------

class ServerHello(NamedTuple):
    """A ServerHello or HelloRetryRequest, with the extensions TLS 1.3 gives them."""

    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression_method: int
    selected_version: int | None
    group: int | None
    key_exchange: bytes | None      # None in a HelloRetryRequest
    selected_identity: int | None   # pre_shared_key
    cookie: bytes | None            # HelloRetryRequest only


_SERVER_HELLO_EXTENSIONS = frozenset(
    {ExtensionType.SUPPORTED_VERSIONS, ExtensionType.KEY_SHARE, ExtensionType.PRE_SHARED_KEY}
)
_RETRY_EXTENSIONS = frozenset({ExtensionType.SUPPORTED_VERSIONS, ExtensionType.KEY_SHARE, ExtensionType.COOKIE})


def parse_server_hello(raw: bytes) -> ServerHello:
    """RFC 8446 4.1.3 / 4.1.4, strictly: engine errors (TLSAlert) on anything else."""
    r = Reader(raw, 4)  # the header was checked by the split
    legacy_version = r.u16()
    random = r.take(32)
    session_id = r.vector(1, 0, 32)
    cipher_suite = r.u16()
    compression_method = r.u8()
    extensions = r.sub(2)
    r.expect_end()
    retry = random == HELLO_RETRY_REQUEST_RANDOM
    allowed = _RETRY_EXTENSIONS if retry else _SERVER_HELLO_EXTENSIONS
    version = group = key_exchange = identity = cookie = None
    seen = []
    while extensions.remaining():
        ext_type = extensions.u16()
        data = extensions.sub(2)
        if ext_type not in allowed:
            where = "a HelloRetryRequest" if retry else "a ServerHello"
            raise IllegalParameter(f"extension {ext_type} has no place in {where}")
        if ext_type in seen:
            raise IllegalParameter(f"duplicate extension {ext_type}")
        seen.append(ext_type)
        if ext_type == ExtensionType.SUPPORTED_VERSIONS:
            version = data.u16()
        elif ext_type == ExtensionType.KEY_SHARE:
            group = data.u16()
            if not retry:
                key_exchange = data.vector(2, 1)
        elif ext_type == ExtensionType.PRE_SHARED_KEY:
            identity = data.u16()
        else:
            cookie = data.vector(2, 1)
        data.expect_end()
    return ServerHello(legacy_version, random, session_id, cipher_suite, compression_method,
                       version, group, key_exchange, identity, cookie)


class EncryptedExtensions(NamedTuple):
    record_size_limit: int | None
    server_name_acknowledged: bool
    alpn: bytes | None


def parse_encrypted_extensions(raw: bytes) -> EncryptedExtensions:
    """RFC 8446 4.3.1, limited to what the engine sends: supported_groups, record_size_limit, server_name, ALPN."""
    r = Reader(raw, 4)
    extensions = r.sub(2)
    r.expect_end()
    limit = alpn = None
    server_name = False
    seen = []
    while extensions.remaining():
        ext_type = extensions.u16()
        data = extensions.sub(2)
        if ext_type in seen:
            raise IllegalParameter(f"duplicate extension {ext_type}")
        seen.append(ext_type)
        if ext_type == ExtensionType.SUPPORTED_GROUPS:
            groups = data.sub(2, minimum=2)  # the server's preference, for later connections: not used here
            if groups.remaining() % 2:
                raise DecodeError("supported_groups length is odd")
        elif ext_type == ExtensionType.RECORD_SIZE_LIMIT:
            limit = data.u16()
            if limit < 64:
                raise IllegalParameter(f"record_size_limit {limit} is below 64")
        elif ext_type == ExtensionType.SERVER_NAME:
            server_name = True  # empty: the server used the client's name (RFC 6066 3)
        elif ext_type == ExtensionType.ALPN:
            names = data.sub(2, minimum=2)
            alpn = names.vector(1, 1)
            names.expect_end()  # exactly one protocol (RFC 7301 3.1)
        else:
            raise IllegalParameter(f"extension {ext_type} has no place in EncryptedExtensions")
        data.expect_end()
    return EncryptedExtensions(limit, server_name, alpn)


# --- consistency ---------------------------------------------------------------

def _check_offers_tls13(hello: ClientHello) -> None:
    if best_version(hello) != TLS13:
        raise Refusal(NOT_TLS13, "the ClientHello does not offer TLS 1.3")
    if hello.legacy_version != TLS12:
        raise Refusal(NOT_TLS13, f"ClientHello legacy_version 0x{hello.legacy_version:04x} is not 0x0303")


def _check_client_hello(hello: ClientHello) -> None:
    """What the engine requires of a ClientHello before it answers it (RFC 8446 4.1.2, 4.2.8, 9.2)."""
    if hello.compression_methods != b"\x00":
        raise Refusal(MALFORMED, "the ClientHello offers compression")
    if hello.groups is None or hello.key_shares is None:
        raise Refusal(MALFORMED, "the ClientHello lacks supported_groups or key_share")
    shared = []
    for group, _ in hello.key_shares:
        if group in shared or group not in hello.groups:
            raise Refusal(MALFORMED, "the ClientHello's key shares repeat a group or name one it does not support")
        shared.append(group)


def _check_retry(first: ClientHello, hrr: ServerHello, second: ClientHello) -> None:
    if hrr.legacy_version != TLS12 or hrr.selected_version != TLS13:
        raise Refusal(NOT_TLS13, "the HelloRetryRequest does not select TLS 1.3")
    _check_echo(first, hrr, "HelloRetryRequest")
    if hrr.group is None:
        raise Refusal(MALFORMED, "the HelloRetryRequest has no key_share")
    if hrr.group not in first.groups or any(group == hrr.group for group, _ in first.key_shares):
        raise Refusal(MALFORMED, "the HelloRetryRequest asks for a group the client did not offer or already sent")
    if second.random != first.random or second.session_id != first.session_id:
        raise Refusal(MALFORMED, "the second ClientHello changed its random or legacy_session_id")
    if [group for group, _ in second.key_shares] != [hrr.group]:
        raise Refusal(MALFORMED, "the second ClientHello does not send just the key share asked for")
    if second.cookie != hrr.cookie:
        raise Refusal(MALFORMED, "the second ClientHello does not echo the HelloRetryRequest's cookie")
    if second.early_data:
        raise Refusal(MALFORMED, "early_data in the second ClientHello")


def _check_server_hello(hello: ClientHello, server_hello: ServerHello, hrr: ServerHello | None) -> None:
    if server_hello.legacy_version != TLS12 or server_hello.selected_version != TLS13:
        raise Refusal(NOT_TLS13, "the ServerHello does not select TLS 1.3")
    if server_hello.selected_identity is not None:
        raise Refusal(PSK_HANDSHAKE, "the ServerHello accepts a pre-shared key: that handshake has no CertificateVerify")
    _check_echo(hello, server_hello, "ServerHello")
    group = server_hello.group
    if group is None:
        raise Refusal(MALFORMED, "the ServerHello has no key_share")
    if group not in [g for g, _ in hello.key_shares]:  # (each of them is in supported_groups)
        raise Refusal(MALFORMED, f"the ServerHello's group 0x{group:04x} is not one the client sent a share for")
    if len(server_hello.key_exchange) != _SERVER_SHARE_LENGTHS.get(group):
        raise Refusal(MALFORMED, f"the ServerHello's key share does not fit group 0x{group:04x}")
    if hrr is not None and (server_hello.cipher_suite != hrr.cipher_suite or group != hrr.group):
        raise Refusal(MALFORMED, "the ServerHello's cipher suite or group differs from the HelloRetryRequest's")


def _check_echo(hello: ClientHello, server_hello: ServerHello, what: str) -> None:
    """The fields a server hello copies from, or chooses among, the client's hello."""
    if server_hello.session_id != hello.session_id:
        raise Refusal(MALFORMED, f"the {what}'s legacy_session_id_echo is not the ClientHello's session id")
    if server_hello.compression_method != 0:
        raise Refusal(MALFORMED, f"the {what} selects compression")
    suite = server_hello.cipher_suite
    if suite not in SUITES or suite not in hello.cipher_suites:
        raise Refusal(MALFORMED, f"the {what}'s cipher suite 0x{suite:04x} is not a TLS 1.3 suite the client offered")


def _check_encrypted_extensions(hello: ClientHello, ee: EncryptedExtensions) -> None:
    if ee.server_name_acknowledged and hello.server_name is None:
        raise Refusal(MALFORMED, "EncryptedExtensions acknowledges a server_name the client did not send")
    if ee.record_size_limit is not None and hello.record_size_limit is None:
        raise Refusal(MALFORMED, "EncryptedExtensions has a record_size_limit the client did not offer")
    if ee.alpn is not None:
        _check_alpn(hello, ee.alpn)


# The one application protocol signed for, and the names it is signed for: the MTA-STS policy host's HTTPS.
MTA_STS_ALPN = b"http/1.1"
MTA_STS_PREFIX = "mta-sts."


def _check_alpn(hello: ClientHello, selected: bytes) -> None:
    name = hello.server_name
    if selected != MTA_STS_ALPN or name is None or not name.startswith(MTA_STS_PREFIX):
        raise Refusal(ALPN_SELECTED, f"EncryptedExtensions selects the application protocol {_quote(selected)} for "
                                     f"server_name {name!r}: only http/1.1 for an mta-sts. name is signed")
    if hello.alpn is None or MTA_STS_ALPN not in hello.alpn:
        raise Refusal(ALPN_SELECTED, "EncryptedExtensions selects http/1.1, which the client did not offer")


def _quote(name: bytes) -> str:
    """An ALPN protocol name (1..255 bytes) as a message may show it."""
    return repr(name[:32]) + ("..." if len(name) > 32 else "")


def _show(scheme) -> str:
    return f"0x{scheme:04x}" if isinstance(scheme, int) else repr(scheme)
