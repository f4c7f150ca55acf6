"""What `ServerConnection.receive_data()` returns: frozen, one class per event."""

from dataclasses import dataclass

from .certs import CertificateChain
from .constants import SignatureScheme


@dataclass(frozen=True)
class SignatureRequest:
    """The handshake needs its one private-key signature.

    Everything a remote signer needs to check what it signs: the handshake
    messages as sent (first ClientHello through Certificate), the scheme, the
    chain, the SNI. `content` is the exact CertificateVerify input, for a
    signer that holds the key locally. Answer with
    `ServerConnection.provide_signature()` or `signature_failed()`.
    """

    handshake_messages: tuple[bytes, ...]
    scheme: SignatureScheme
    certificate: CertificateChain
    server_name: str | None
    cipher_suite: int
    content: bytes


@dataclass(frozen=True)
class Tls12SignatureRequest:
    """A TLS 1.2 full handshake needs its ServerKeyExchange signed.

    A remote signer gets the ClientHello, the nonce and the ECDHE params, and
    derives the server_random itself (relay.tls.signing.tls12_server_random):
    it never signs bytes the edge chose. `content` is the exact signed input,
    for a signer that holds the key locally. Answer with
    `ServerConnection.provide_signature()` or `signature_failed()`.
    """

    client_hello: bytes
    nonce: bytes
    params: bytes
    scheme: SignatureScheme
    certificate: CertificateChain
    server_name: str | None
    cipher_suite: int
    content: bytes


@dataclass(frozen=True)
class SessionInfo:
    version: str
    cipher_suite: str
    group: str
    signature_scheme: str | None   # None when resumed: no signature was made
    resumed: bool
    server_name: str | None
    alpn: bytes | None
    client_random: bytes   # names the session in logs: the oracle's audit line carries it too


@dataclass(frozen=True)
class HandshakeComplete:
    session: SessionInfo


@dataclass(frozen=True)
class DataReceived:
    """Application data: a bytearray of its own, which the receiver may (and relay/aio/tls.py does) wipe."""

    data: bytearray


@dataclass(frozen=True)
class KeyUpdateReceived:
    update_requested: bool


@dataclass(frozen=True)
class CloseNotifyReceived:
    """The peer closed its side cleanly; call `close()` to close ours."""


@dataclass(frozen=True)
class ConnectionEnded:
    """The transport hit EOF. `clean` is False when no close_notify came first."""

    clean: bool


AnySignatureRequest = SignatureRequest | Tls12SignatureRequest

Event = SignatureRequest | Tls12SignatureRequest | HandshakeComplete | DataReceived | KeyUpdateReceived | CloseNotifyReceived | ConnectionEnded
