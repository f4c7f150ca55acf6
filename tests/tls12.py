"""Just enough TLS 1.2 (RFC 5246) for a test to play a keyless TLS 1.2 server that the engine never is.

tests/tls/test_keyless_impossible.py shows what a TLS 1.2 client does facing a
server without its key, RSA key transport included (which the engine does
not serve). This module holds what that needs beyond the engine's own TLS 1.2
parts (relay/tls/tls12.py, messages.py, signing.py, which it reuses): the
key block for the AES_128_GCM_SHA256 suites of both key exchanges, AES-GCM
records (RFC 5288), a bare ServerHello, and the client's ClientKeyExchange parsed.
"""

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay.tls import tls12
from relay.tls.messages import certificate12 as certificate
from relay.tls.messages import extension, finished, handshake_message, server_hello_done, server_key_exchange
from relay.tls.signing import ecdhe_params, server_key_exchange_content
from relay.tls.wire import Reader, u8, u16, vec8, vec16

TLS12 = 0x0303
RSA_WITH_AES_128_GCM_SHA256 = 0x009C         # RFC 5288
ECDHE_RSA_WITH_AES_128_GCM_SHA256 = 0xC02F   # RFC 5289

CERTIFICATE = 11
SERVER_KEY_EXCHANGE = 12
SERVER_HELLO_DONE = 14
CLIENT_KEY_EXCHANGE = 16
FINISHED = 20

RENEGOTIATION_INFO = 0xFF01  # RFC 5746; OpenSSL 3 refuses servers without it
NAMED_CURVE = 3              # ECCurveType, RFC 8422 5.4

PREMASTER_LEN = 48
VERIFY_DATA_LEN = 12
EXPLICIT_NONCE_LEN = 8
TAG_LEN = 16


def prf(secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """PRF(secret, label, seed) = P_SHA256(secret, label + seed) (RFC 5246 section 5)."""
    return tls12.prf("sha256", secret, label, seed, length)


def master_secret(premaster: bytes, client_random: bytes, server_random: bytes) -> bytes:
    """RFC 5246 section 8.1 (no extended_master_secret: the test server does not echo it)."""
    return prf(premaster, b"master secret", client_random + server_random, 48)


def verify_data(master: bytes, label: bytes, handshake_messages: list[bytes]) -> bytes:
    """Finished.verify_data (RFC 5246 section 7.4.9); label b"client finished" or b"server finished"."""
    return prf(master, label, hashlib.sha256(b"".join(handshake_messages)).digest(), VERIFY_DATA_LEN)


@dataclass(frozen=True)
class KeyBlock:
    client_key: bytes
    server_key: bytes
    client_salt: bytes
    server_salt: bytes


def key_block(master: bytes, client_random: bytes, server_random: bytes) -> KeyBlock:
    """The AES-128-GCM keys and implicit nonces (RFC 5246 section 6.3, RFC 5288 section 3)."""
    block = prf(master, b"key expansion", server_random + client_random, 2 * 16 + 2 * 4)
    return KeyBlock(block[0:16], block[16:32], block[32:36], block[36:40])


class GcmRecords:
    """One direction's AES-GCM record protection: nonce = salt + explicit 8-byte nonce (RFC 5288)."""

    def __init__(self, key: bytes, salt: bytes):
        self._aead = AESGCM(key)
        self._salt = salt
        self.seq = 0

    def _aad(self, content_type: int, length: int) -> bytes:
        return self.seq.to_bytes(8, "big") + u8(content_type) + u16(TLS12) + u16(length)

    def seal(self, content_type: int, content: bytes) -> bytes:
        explicit = self.seq.to_bytes(EXPLICIT_NONCE_LEN, "big")
        sealed = self._aead.encrypt(self._salt + explicit, content, self._aad(content_type, len(content)))
        self.seq += 1
        return record(content_type, explicit + sealed)

    def open(self, content_type: int, payload: bytes) -> bytes:
        """The record's plaintext; raises cryptography's InvalidTag when it does not authenticate."""
        if len(payload) < EXPLICIT_NONCE_LEN + TAG_LEN:
            raise ValueError(f"a {len(payload)}-byte record cannot be AES-GCM protected")
        explicit, sealed = payload[:EXPLICIT_NONCE_LEN], payload[EXPLICIT_NONCE_LEN:]
        aad = self._aad(content_type, len(sealed) - TAG_LEN)
        plaintext = self._aead.decrypt(self._salt + explicit, sealed, aad)
        self.seq += 1
        return plaintext


def record(content_type: int, payload: bytes) -> bytes:
    return u8(content_type) + u16(TLS12) + u16(len(payload)) + payload


# --- server messages -------------------------------------------------------

def server_hello(random: bytes, suite: int) -> bytes:
    """No session id (nothing to resume), and an empty renegotiation_info."""
    body = u16(TLS12) + random + vec8(b"") + u16(suite) + b"\x00"
    body += vec16(extension(RENEGOTIATION_INFO, vec8(b"")))
    return handshake_message(2, body)


# The engine's own builders for the rest of the server's messages.
__all__ = ["certificate", "ecdhe_params", "finished", "server_hello_done", "server_key_exchange",
           "server_key_exchange_content"]


# --- client messages -------------------------------------------------------

def client_key_exchange_body(message: bytes) -> Reader:
    if message[:1] != u8(CLIENT_KEY_EXCHANGE):
        raise ValueError(f"expected ClientKeyExchange, got handshake type {message[0]}")
    return Reader(message, 4)


def encrypted_premaster(message: bytes) -> bytes:
    """EncryptedPreMasterSecret from an RSA ClientKeyExchange (RFC 5246 7.4.7.1)."""
    r = client_key_exchange_body(message)
    encrypted = r.vector(2, 1)
    r.expect_end()
    return encrypted


def ecdh_public(message: bytes) -> bytes:
    """ClientECDiffieHellmanPublic from an ECDHE ClientKeyExchange (RFC 8422 5.7)."""
    r = client_key_exchange_body(message)
    public = r.vector(1, 1)
    r.expect_end()
    return public
