"""Cipher suites and the TLS 1.3 key schedule (RFC 8446 section 7).

HKDF is written on the stdlib's `hmac.digest`, which calls OpenSSL's one-shot
HMAC: a handshake derives about twenty secrets, and this is the cheapest way to
do each one.
"""

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .constants import CipherSuite
from .wire import u16, vec8


@dataclass(frozen=True)
class Suite:
    code: CipherSuite
    hash_name: str
    hash_len: int
    key_len: int
    aead: type

    @property
    def name(self) -> str:
        return "TLS_" + self.code.name


SUITES = {
    CipherSuite.AES_128_GCM_SHA256: Suite(CipherSuite.AES_128_GCM_SHA256, "sha256", 32, 16, AESGCM),
    CipherSuite.AES_256_GCM_SHA384: Suite(CipherSuite.AES_256_GCM_SHA384, "sha384", 48, 32, AESGCM),
    CipherSuite.CHACHA20_POLY1305_SHA256: Suite(
        CipherSuite.CHACHA20_POLY1305_SHA256, "sha256", 32, 32, ChaCha20Poly1305
    ),
}

IV_LEN = 12
TAG_LEN = 16


def hkdf_extract(hash_name: str, salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt, ikm, hash_name)


def hkdf_expand(hash_name: str, prk: bytes, info: bytes, length: int) -> bytes:
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), hash_name)
        out += block
        counter += 1
    return out[:length]


def hkdf_expand_label(hash_name: str, secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    info = u16(length) + vec8(b"tls13 " + label) + vec8(context)
    return hkdf_expand(hash_name, secret, info, length)


def traffic_keys(suite: Suite, secret: bytes) -> tuple[bytes, bytes]:
    """(key, iv) for one direction from its traffic secret."""
    key = hkdf_expand_label(suite.hash_name, secret, b"key", b"", suite.key_len)
    iv = hkdf_expand_label(suite.hash_name, secret, b"iv", b"", IV_LEN)
    return key, iv


def next_traffic_secret(suite: Suite, secret: bytes) -> bytes:
    """application_traffic_secret_N+1, for KeyUpdate."""
    return hkdf_expand_label(suite.hash_name, secret, b"traffic upd", b"", suite.hash_len)


def finished_mac(suite: Suite, base_key: bytes, transcript_hash: bytes) -> bytes:
    finished_key = hkdf_expand_label(suite.hash_name, base_key, b"finished", b"", suite.hash_len)
    return hmac.digest(finished_key, transcript_hash, suite.hash_name)


def resumption_psk(suite: Suite, resumption_master: bytes, ticket_nonce: bytes) -> bytes:
    return hkdf_expand_label(suite.hash_name, resumption_master, b"resumption", ticket_nonce, suite.hash_len)


class KeySchedule:
    """Early -> handshake -> master secret, with Derive-Secret at each stage.

    `secret` is the current stage's secret; `derive(label, transcript_hash)`
    is Derive-Secret on it; `advance(ikm)` moves to the next stage.
    """

    def __init__(self, suite: Suite, psk: bytes | None = None):
        self.suite = suite
        self._zeros = bytes(suite.hash_len)
        self._empty_hash = hashlib.new(suite.hash_name).digest()
        self.secret = hkdf_extract(suite.hash_name, self._zeros, psk or self._zeros)

    def derive(self, label: bytes, transcript_hash: bytes) -> bytes:
        return hkdf_expand_label(self.suite.hash_name, self.secret, label, transcript_hash, self.suite.hash_len)

    def advance(self, ikm: bytes | None) -> None:
        salt = self.derive(b"derived", self._empty_hash)
        self.secret = hkdf_extract(self.suite.hash_name, salt, ikm or self._zeros)

