"""TLS 1.2's cryptography: suites, PRF, master secret, keys, Finished and AEAD records.

RFC 5246 (PRF, key block, Finished), RFC 7627 (extended master secret),
RFC 5288/5289 (AES-GCM: 4-byte salt from the key block, 8-byte explicit nonce
on the wire) and RFC 7905 (ChaCha20-Poly1305: 12-byte IV xored with the
sequence number, nothing on the wire). Only ECDHE suites with an AEAD exist
here: no CBC, no RSA key transport, no static DH.

`Protection12` has the TLS 1.3 `Protection`'s shape (`seal`, `open_into`,
`seq`), so the connection's sending and alert code serves both versions.
"""

import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .constants import TLS12, CipherSuite12
from .wire import u8, u16

MASTER_SECRET_LEN = 48
VERIFY_DATA_LEN = 12
EXPLICIT_NONCE_LEN = 8
TAG_LEN = 16


class Auth:
    """Which certificate key a suite needs."""

    ECDSA = "ECDSA"   # ECDSA and Ed25519 keys (RFC 8422)
    RSA = "RSA"


@dataclass(frozen=True)
class Suite12:
    code: CipherSuite12
    auth: str
    hash_name: str       # the PRF's hash, and the Finished and session hash
    key_len: int
    iv_len: int          # from the key block: 4 (GCM salt) or 12 (ChaCha20)
    aead: type

    @property
    def name(self) -> str:
        return "TLS_" + self.code.name

    @property
    def explicit_nonce(self) -> bool:
        return self.aead is AESGCM


SUITES12 = {s.code: s for s in (
    Suite12(CipherSuite12.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, Auth.ECDSA, "sha256", 16, 4, AESGCM),
    Suite12(CipherSuite12.ECDHE_RSA_WITH_AES_128_GCM_SHA256, Auth.RSA, "sha256", 16, 4, AESGCM),
    Suite12(CipherSuite12.ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, Auth.ECDSA, "sha384", 32, 4, AESGCM),
    Suite12(CipherSuite12.ECDHE_RSA_WITH_AES_256_GCM_SHA384, Auth.RSA, "sha384", 32, 4, AESGCM),
    Suite12(CipherSuite12.ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, Auth.ECDSA, "sha256", 32, 12, ChaCha20Poly1305),
    Suite12(CipherSuite12.ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256, Auth.RSA, "sha256", 32, 12, ChaCha20Poly1305),
)}


def prf(hash_name: str, secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """PRF(secret, label, seed) = P_hash(secret, label + seed) (RFC 5246 section 5)."""
    seed = label + seed
    out = bytearray()
    a = seed
    while len(out) < length:
        a = hmac.digest(secret, a, hash_name)
        out += hmac.digest(secret, a + seed, hash_name)
    return bytes(out[:length])


def extended_master_secret(suite: Suite12, premaster: bytes, session_hash: bytes) -> bytes:
    """RFC 7627 4: the master secret bound to the whole handshake up to ClientKeyExchange."""
    return prf(suite.hash_name, premaster, b"extended master secret", session_hash, MASTER_SECRET_LEN)


def master_secret(suite: Suite12, premaster: bytes, client_random: bytes, server_random: bytes) -> bytes:
    """RFC 5246 8.1, for clients that do not offer the extended master secret."""
    return prf(suite.hash_name, premaster, b"master secret", client_random + server_random, MASTER_SECRET_LEN)


def verify_data(suite: Suite12, master: bytes, label: bytes, transcript_hash: bytes) -> bytes:
    """Finished.verify_data (RFC 5246 7.4.9); label b"client finished" or b"server finished"."""
    return prf(suite.hash_name, master, label, transcript_hash, VERIFY_DATA_LEN)


def key_block(suite: Suite12, master: bytes, client_random: bytes,
              server_random: bytes) -> tuple["Protection12", "Protection12"]:
    """(client's write protection, server's write protection) from the key block (RFC 5246 6.3)."""
    block = prf(suite.hash_name, master, b"key expansion", server_random + client_random,
                2 * (suite.key_len + suite.iv_len))
    k, i = suite.key_len, suite.iv_len
    client_key, server_key = block[:k], block[k:2 * k]
    client_iv, server_iv = block[2 * k:2 * k + i], block[2 * k + i:2 * k + 2 * i]
    return Protection12(suite, client_key, client_iv), Protection12(suite, server_key, server_iv)


class Protection12:
    """One direction's TLS 1.2 AEAD record protection and sequence number."""

    __slots__ = ("suite", "_aead", "_iv", "seq")

    def __init__(self, suite: Suite12, key: bytes, iv: bytes):
        self.suite = suite
        self._aead = suite.aead(key)
        self._iv = iv
        self.seq = 0

    def _nonce(self, explicit: bytes) -> bytes:
        if self.suite.explicit_nonce:
            return self._iv + explicit
        return (int.from_bytes(self._iv, "big") ^ self.seq).to_bytes(12, "big")

    def _aad(self, content_type: int, length: int) -> bytes:
        return self.seq.to_bytes(8, "big") + u8(content_type) + u16(TLS12) + u16(length)

    def seal(self, content_type: int, content: bytes) -> bytes:
        """A whole record carrying `content`. The explicit nonce is the sequence number (unique per key)."""
        explicit = self.seq.to_bytes(EXPLICIT_NONCE_LEN, "big") if self.suite.explicit_nonce else b""
        sealed = explicit + self._aead.encrypt(self._nonce(explicit), content, self._aad(content_type, len(content)))
        self.seq += 1
        return u8(content_type) + u16(TLS12) + u16(len(sealed)) + sealed

    def overhead(self) -> int:
        return TAG_LEN + (EXPLICIT_NONCE_LEN if self.suite.explicit_nonce else 0)

    def open_into(self, header: bytes, payload: bytes, inner: memoryview) -> bool:
        """Decrypt into `inner` (exactly len(payload) - overhead() bytes); False when it does not authenticate."""
        explicit_len = EXPLICIT_NONCE_LEN if self.suite.explicit_nonce else 0
        if len(payload) < explicit_len + TAG_LEN:
            return False
        explicit = payload[:explicit_len]
        aad = self._aad(header[0], len(payload) - explicit_len - TAG_LEN)
        try:
            self._aead.decrypt_into(self._nonce(explicit), payload[explicit_len:], aad, inner)
        except InvalidTag:
            return False
        self.seq += 1
        return True
