"""Server configuration: what the engine offers and in which order."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .certs import CertificateChain
from .constants import MAX_INNER_PLAINTEXT, CipherSuite, CipherSuite12, Group
from .tickets import SessionState


class TicketSealer(Protocol):
    lifetime: int

    def seal(self, state: SessionState, now: float) -> bytes: ...

    def open(self, ticket: bytes, now: float) -> SessionState | None: ...


@dataclass
class ServerConfig:
    certificates: list[CertificateChain]
    # Server preference order, most preferred first.
    cipher_suites: tuple[int, ...] = (
        CipherSuite.AES_128_GCM_SHA256,
        CipherSuite.AES_256_GCM_SHA384,
        CipherSuite.CHACHA20_POLY1305_SHA256,
    )
    groups: tuple[int, ...] = (Group.X25519MLKEM768, Group.X25519, Group.SECP256R1, Group.SECP384R1)
    # False: take the most preferred group the client already sent a share for
    # (no extra round trip). True: HelloRetryRequest for the most preferred
    # group the client supports even when it sent another usable share.
    insist_on_preferred_group: bool = False
    # Groups listed in EncryptedExtensions so clients learn our preference;
    # None lists `groups`, () sends nothing.
    advertised_groups: tuple[int, ...] | None = None
    alpn_protocols: tuple[bytes, ...] = ()
    # The largest TLSInnerPlaintext we accept (RFC 8449), 64..2^14+1.
    record_size_limit: int = MAX_INNER_PLAINTEXT
    tickets: TicketSealer | None = None
    tickets_per_handshake: int = 1
    # Advertised in tickets; early data itself is always refused and skipped.
    # Nonzero only to exercise clients' 0-RTT paths; it is also the skip budget.
    ticket_early_data_size: int = 0
    max_handshake_message: int = 65536
    # TLS 1.2 for clients that cannot speak TLS 1.3 (relay/tls/server12.py); a
    # client that offers TLS 1.3 always gets TLS 1.3.
    tls12: bool = True
    cipher_suites12: tuple[int, ...] = (
        CipherSuite12.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        CipherSuite12.ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        CipherSuite12.ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        CipherSuite12.ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        CipherSuite12.ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        CipherSuite12.ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    )
    groups12: tuple[int, ...] = (Group.X25519, Group.SECP256R1, Group.SECP384R1)
    # An opaque HelloRetryRequest cookie, from the first ClientHello's hash;
    # the second ClientHello must echo it.
    hello_retry_cookie: Callable[[bytes], bytes] | None = None

    def __post_init__(self) -> None:
        if not self.certificates:
            raise ValueError("ServerConfig needs at least one certificate chain")
        for suite in self.cipher_suites:
            CipherSuite(suite)  # ValueError names the unknown value
        for group in self.groups:
            Group(group)
        for suite in self.cipher_suites12:
            CipherSuite12(suite)
        if Group.X25519MLKEM768 in self.groups12:
            raise ValueError("TLS 1.2 has no hybrid groups: X25519MLKEM768 cannot be in groups12")
        if not self.cipher_suites or not self.groups:
            raise ValueError("ServerConfig needs at least one cipher suite and one group")
        if not 64 <= self.record_size_limit <= MAX_INNER_PLAINTEXT:
            raise ValueError(f"record_size_limit must be 64..{MAX_INNER_PLAINTEXT}")
        if not 0 <= self.tickets_per_handshake <= 8:
            raise ValueError("tickets_per_handshake must be 0..8")
