"""A sans-I/O TLS server engine (TLS 1.3, and TLS 1.2 for old clients) whose private-key operation happens elsewhere.

    conn = ServerConnection(config, random=os.urandom, now=time.time)
    events = conn.receive_data(bytes_from_peer)
    send(conn.data_to_send())

TLS 1.3, and TLS 1.2 with ECDHE and an AEAD (relay/tls/server12.py). A
`SignatureRequest` (TLS 1.2: `Tls12SignatureRequest`) event means: sign `request.content` (or have the key
oracle check and sign `request.handshake_messages`), then call
`conn.provide_signature(signature)`.
"""

from .certs import CertificateChain
from .config import ServerConfig
from .constants import AlertDescription, CipherSuite, Group, SignatureScheme
from .errors import ConnectionClosed, PeerAlert, TLSAlert, TLSError
from .events import (
    CloseNotifyReceived,
    ConnectionEnded,
    DataReceived,
    HandshakeComplete,
    KeyUpdateReceived,
    SessionInfo,
    SignatureRequest,
    Tls12SignatureRequest,
)
from .server import ServerConnection, State
from .tickets import SessionState, SharedTicketSeed, TicketKeyring

__all__ = [
    "AlertDescription", "CertificateChain", "CipherSuite", "CloseNotifyReceived", "ConnectionClosed",
    "ConnectionEnded", "DataReceived", "Group", "HandshakeComplete", "KeyUpdateReceived", "PeerAlert",
    "ServerConfig", "ServerConnection", "SessionInfo", "SessionState", "SharedTicketSeed", "SignatureRequest",
    "SignatureScheme", "State", "TLSAlert", "TLSError", "TicketKeyring", "Tls12SignatureRequest",
]
