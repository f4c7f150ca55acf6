"""What a server signature covers, and how each signature scheme makes it.

This is the one module both sides of keyless TLS import: the engine builds the
content it asks to be signed and verifies the signature it gets back; the key
oracle rebuilds the same content from the handshake messages it is sent, to
know exactly what it signs. Keep it free of engine state.
"""

import hashlib
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from .constants import DOWNGRADE_TLS12, HELLO_RETRY_REQUEST_RANDOM, HandshakeType, SignatureScheme
from .wire import u8, u16, u24, vec8

SERVER_CERTIFICATE_VERIFY_CONTEXT = b"TLS 1.3, server CertificateVerify"

# --- TLS 1.2's ServerKeyExchange -----------------------------------------------
#
# A TLS 1.2 signature covers client_random || server_random || params, which
# a signer cannot tie to a handshake of its own (the classic keyless weakness:
# Bhargavan et al., "Content delivery over TLS", 2017; the IETF LURK answer).
# So the signer never takes a server_random from the edge: it derives it from
# an edge nonce, with the downgrade sentinel in its last 8 bytes, and builds
# params from a curve and point it has checked. The engine derives the same
# server_random from the same nonce to send it. The nonce starts with the
# time it was made, so a signer can refuse stale and repeated ones.

TLS12_NONCE_LEN = 32
NAMED_CURVE = 3              # ECCurveType named_curve (RFC 8422 5.4)
_SERVER_RANDOM_LABEL = b"yestls tls12 server_random"


def tls12_nonce(now: float, random) -> bytes:
    """The edge's nonce for one ServerKeyExchange: 8 bytes of milliseconds, 24 random bytes."""
    return struct.pack(">Q", int(now * 1000)) + random(TLS12_NONCE_LEN - 8)


def tls12_nonce_time(nonce: bytes) -> float:
    return struct.unpack(">Q", nonce[:8])[0] / 1000


def tls12_server_random(nonce: bytes) -> bytes:
    """The server_random of a full TLS 1.2 handshake: derived from the nonce, never chosen by the edge."""
    return hashlib.sha256(_SERVER_RANDOM_LABEL + nonce).digest()[:24] + DOWNGRADE_TLS12


def ecdhe_params(group: int, public: bytes) -> bytes:
    """ServerECDHParams (RFC 8422 5.4): named_curve, the curve, the point."""
    return u8(NAMED_CURVE) + u16(group) + vec8(public)


def server_key_exchange_content(client_random: bytes, server_random: bytes, params: bytes) -> bytes:
    """What a TLS 1.2 ServerKeyExchange signature covers (RFC 5246 7.4.3)."""
    return client_random + server_random + params


def certificate_verify_content(transcript_hash: bytes) -> bytes:
    """RFC 8446 4.4.3: the bytes a server's CertificateVerify signs."""
    return b"\x20" * 64 + SERVER_CERTIFICATE_VERIFY_CONTEXT + b"\x00" + transcript_hash


class Transcript:
    """The handshake messages so far and their running hash.

    The hash function is known only once the cipher suite is chosen, so the
    messages are kept and hashed from then on. After a HelloRetryRequest the
    first ClientHello is replaced, in the hash only, by a message_hash message
    (RFC 8446 4.4.1); `messages` always keeps what was on the wire.
    """

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self._hash = None

    def add(self, message: bytes) -> None:
        self.messages.append(message)
        if self._hash is not None:
            self._hash.update(message)

    def start_hash(self, hash_name: str) -> None:
        self._hash = hashlib.new(hash_name)
        for message in self.messages:
            self._hash.update(message)

    def replace_first_hello(self) -> None:
        """Fold the first ClientHello into message_hash, before the HelloRetryRequest is added."""
        first_hash = self._hash.digest()
        self._hash = hashlib.new(self._hash.name)
        self._hash.update(message_hash(first_hash))

    def digest(self, extra: bytes = b"") -> bytes:
        """The hash of the messages so far, plus `extra` (a truncated ClientHello)."""
        h = self._hash.copy()
        if extra:
            h.update(extra)
        return h.digest()

    def forget_messages(self) -> None:
        self.messages = []


def message_hash(first_client_hello_hash: bytes) -> bytes:
    return bytes([HandshakeType.MESSAGE_HASH]) + u24(len(first_client_hello_hash)) + first_client_hello_hash


def is_hello_retry_request(message: bytes) -> bool:
    return message[:1] == bytes([HandshakeType.SERVER_HELLO]) and message[6:38] == HELLO_RETRY_REQUEST_RANDOM


def transcript_hash(hash_name: str, messages: list[bytes]) -> bytes:
    """Transcript-Hash over complete handshake messages, HelloRetryRequest rule included."""
    transcript = Transcript()
    transcript.start_hash(hash_name)
    for i, message in enumerate(messages):
        if i == 1 and is_hello_retry_request(message):
            transcript.replace_first_hello()
        transcript.add(message)
    return transcript.digest()


# --- signature schemes -----------------------------------------------------

_ECDSA = {
    SignatureScheme.ECDSA_SECP256R1_SHA256: ("secp256r1", hashes.SHA256),
    SignatureScheme.ECDSA_SECP384R1_SHA384: ("secp384r1", hashes.SHA384),
    SignatureScheme.ECDSA_SECP521R1_SHA512: ("secp521r1", hashes.SHA512),
}
_RSA_PSS = {
    SignatureScheme.RSA_PSS_RSAE_SHA256: hashes.SHA256,
    SignatureScheme.RSA_PSS_RSAE_SHA384: hashes.SHA384,
    SignatureScheme.RSA_PSS_RSAE_SHA512: hashes.SHA512,
}
# TLS 1.2 only (RFC 8446 4.2.3 keeps them out of TLS 1.3 handshakes).
_RSA_PKCS1 = {
    SignatureScheme.RSA_PKCS1_SHA256: hashes.SHA256,
    SignatureScheme.RSA_PKCS1_SHA384: hashes.SHA384,
    SignatureScheme.RSA_PKCS1_SHA512: hashes.SHA512,
}


def schemes_for_key(public_key) -> tuple[SignatureScheme, ...]:
    """The TLS 1.3 schemes a key can sign with, in the order a server prefers them."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return tuple(s for s, (curve, _) in _ECDSA.items() if curve == public_key.curve.name)
    if isinstance(public_key, rsa.RSAPublicKey):
        return tuple(_RSA_PSS)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return (SignatureScheme.ED25519,)
    return ()


def schemes_for_key_tls12(public_key) -> tuple[SignatureScheme, ...]:
    """The TLS 1.2 schemes a key signs a ServerKeyExchange with: TLS 1.3's, then RSA PKCS#1 v1.5 for RSA keys."""
    schemes = schemes_for_key(public_key)
    if isinstance(public_key, rsa.RSAPublicKey):
        schemes += tuple(_RSA_PKCS1)
    return schemes


def _pss(hash_cls) -> padding.PSS:
    # TLS 1.3 fixes the PSS salt length to the digest length (RFC 8446 4.2.3).
    return padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=hash_cls.digest_size)


def sign(private_key, scheme: int, content: bytes) -> bytes:
    """Sign `content` with `scheme`; the caller has checked the scheme fits the key."""
    if scheme in _ECDSA:
        return private_key.sign(content, ec.ECDSA(_ECDSA[scheme][1]()))
    if scheme in _RSA_PSS:
        hash_cls = _RSA_PSS[scheme]
        return private_key.sign(content, _pss(hash_cls), hash_cls())
    if scheme in _RSA_PKCS1:
        return private_key.sign(content, padding.PKCS1v15(), _RSA_PKCS1[scheme]())
    if scheme == SignatureScheme.ED25519:
        return private_key.sign(content)
    raise ValueError(f"unsupported signature scheme 0x{scheme:04x}")


def verify(public_key, scheme: int, content: bytes, signature: bytes) -> bool:
    """True when `signature` is `scheme`'s signature over `content` by `public_key`."""
    if scheme not in schemes_for_key_tls12(public_key):
        return False
    try:
        if scheme in _ECDSA:
            public_key.verify(signature, content, ec.ECDSA(_ECDSA[scheme][1]()))
        elif scheme in _RSA_PSS:
            hash_cls = _RSA_PSS[scheme]
            public_key.verify(signature, content, _pss(hash_cls), hash_cls())
        elif scheme in _RSA_PKCS1:
            public_key.verify(signature, content, padding.PKCS1v15(), _RSA_PKCS1[scheme]())
        else:
            public_key.verify(signature, content)
    except (InvalidSignature, ValueError):
        return False
    return True
