"""RFC 8448's example handshakes, replayed through the engine byte for byte.

The trace's randoms and ephemeral keys are injected through the engine's
`random` source (consumed in order: ServerHello.random, the key share's
private key, then each ticket's age_add), the trace's RSA-PSS signature comes
back from the signer (RSA-PSS is randomised, so only the trace's own
signature reproduces its bytes), and a stand-in ticket sealer returns the
trace's opaque ticket.
"""

from collections import deque

import pytest
from cryptography import x509

from relay.tls import (
    CertificateChain,
    CloseNotifyReceived,
    DataReceived,
    HandshakeComplete,
    ServerConfig,
    ServerConnection,
    SessionState,
    SignatureRequest,
    State,
)
from relay.tls.constants import CipherSuite, Group
from relay.tls.errors import DecryptError
from relay.tls.keyschedule import SUITES
from relay.tls.record import Protection
from relay.tls.wire import Reader

from ..rfc8448 import Trace

TRACE = Trace()
NOW = 1_700_000_000.0


class ScriptedRandom:
    """Hands out the trace's random values in the order the engine asks for them."""

    def __init__(self, *values: bytes):
        self.values = deque(values)

    def __call__(self, n: int) -> bytes:
        value = self.values.popleft()
        assert len(value) == n, f"engine asked for {n} random bytes, the script has {len(value)} next"
        return value


class TraceTicketSealer:
    """Stands in for TicketKeyring: seals to the trace's ticket and opens it back."""

    def __init__(self, ticket: bytes, lifetime: int, state: SessionState | None = None):
        self.ticket = ticket
        self.lifetime = lifetime
        self.sealed: list[SessionState] = []
        self.state = state

    def seal(self, state: SessionState, now: float) -> bytes:
        self.sealed.append(state)
        return self.ticket

    def open(self, ticket: bytes, now: float) -> SessionState | None:
        return self.state if ticket == self.ticket else None


def trace_chain(section: int) -> CertificateChain:
    message = TRACE.value(section, "{server}  construct a Certificate", "Certificate")
    r = Reader(message, 4)
    r.vector(1)  # certificate_request_context
    entries = r.sub(3)
    der = entries.vector(3)
    return CertificateChain.from_certificates([x509.load_der_x509_certificate(der)], min_rsa_bits=1024)


def trace_signature(section: int) -> bytes:
    message = TRACE.value(section, "{server}  construct a CertificateVerify", "CertificateVerify")
    return message[8:]  # header (4), scheme (2), signature length (2)


def server_random(section: int, occurrence: int = 0) -> bytes:
    return TRACE.value(section, "{server}  construct a ServerHello", "ServerHello", occurrence)[6:38]


def ticket_of_section_3() -> tuple[int, bytes]:
    nst = TRACE.value(3, "{server}  construct a NewSessionTicket", "NewSessionTicket")
    r = Reader(nst, 4)
    r.u32()  # lifetime
    age_add = r.u32()
    r.vector(1)  # nonce
    return age_add, r.vector(2)


def records(section: int, step: str, occurrence: int = 0) -> bytes:
    return TRACE.value(section, step, "complete record", occurrence)


def signed_by_trace(conn: ServerConnection, events, section: int) -> SignatureRequest:
    requests = [e for e in events if isinstance(e, SignatureRequest)]
    assert len(requests) == 1
    conn.provide_signature(trace_signature(section))
    return requests[0]


def test_simple_1rtt_handshake_section_3():
    age_add, ticket = ticket_of_section_3()
    sealer = TraceTicketSealer(ticket, lifetime=30)
    config = ServerConfig(
        [trace_chain(3)],
        # The trace's server lists every group of the client's in EncryptedExtensions.
        advertised_groups=(0x1D, 0x17, 0x18, 0x19, 0x100, 0x101, 0x102, 0x103, 0x104),
        tickets=sealer,
        ticket_early_data_size=1024,
    )
    random = ScriptedRandom(
        server_random(3),
        TRACE.value(3, "{server}  create an ephemeral x25519", "private key"),
        age_add.to_bytes(4, "big"),
    )
    conn = ServerConnection(config, random=random, now=lambda: NOW)

    events = conn.receive_data(records(3, "{client}  send handshake record"))
    server_hello = records(3, "{server}  send handshake record", 0)
    assert conn.data_to_send() == server_hello
    request = signed_by_trace(conn, events, 3)
    assert request.scheme == 0x0804
    assert request.server_name == "server"
    assert conn.data_to_send() == records(3, "{server}  send handshake record", 1)

    events = conn.receive_data(records(3, "{client}  send handshake record", 1))
    assert [type(e) for e in events] == [HandshakeComplete]
    assert conn.data_to_send() == records(3, "{server}  send handshake record", 2)  # NewSessionTicket
    resumption = TRACE.value(3, "{server}  generate resumption secret", "expanded")
    assert sealer.sealed[0].psk == resumption

    events = conn.receive_data(records(3, "{client}  send application_data record"))
    payload = TRACE.value(3, "{client}  send application_data record", "payload")
    assert events == [DataReceived(payload)]
    conn.send_data(payload)
    assert conn.data_to_send() == records(3, "{server}  send application_data record")

    events = conn.receive_data(records(3, "{client}  send alert record"))
    assert events == [CloseNotifyReceived()]
    conn.close()
    assert conn.data_to_send() == records(3, "{server}  send alert record")
    assert conn.state is State.CLOSED


def resumption_config(early_data_size: int = 1024) -> tuple[ServerConfig, TraceTicketSealer]:
    age_add, ticket = ticket_of_section_3()
    state = SessionState(
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        psk=TRACE.value(3, "{server}  generate resumption secret", "expanded"),
        issued_at_ms=int(NOW * 1000) - 5,
        lifetime=30,
        age_add=age_add,
        server_name="server",
        alpn=None,
    )
    sealer = TraceTicketSealer(ticket, lifetime=30, state=state)
    config = ServerConfig([trace_chain(3)], tickets=sealer, ticket_early_data_size=early_data_size)
    return config, sealer


def test_resumed_handshake_section_4_up_to_refusing_early_data():
    config, _ = resumption_config()
    random = ScriptedRandom(
        server_random(4),
        TRACE.value(4, "{server}  create an ephemeral x25519", "private key"),
    )
    conn = ServerConnection(config, random=random, now=lambda: NOW)

    # The binder is checked here: a wrong one would raise DecryptError.
    events = conn.receive_data(records(4, "{client}  send handshake record"))
    assert events == []  # resumption: no signature request
    out = conn.data_to_send()
    server_hello = records(4, "{server}  send handshake record")
    assert out.startswith(server_hello)

    # Same ClientHello and ServerHello, so the same handshake secrets: the
    # trace's server handshake key opens our encrypted flight.
    suite = SUITES[CipherSuite.AES_128_GCM_SHA256]
    server_hs = TRACE.value(4, '{server}  derive secret "tls13 s hs traffic"', "expanded")
    flight = out[len(server_hello):]
    inner = Protection(suite, server_hs).open(flight[:5], flight[5:])
    assert inner is not None and inner[-1] == 22
    trace_ee = TRACE.value(4, "{server}  construct a EncryptedExtensions", "EncryptedExtensions")
    assert inner.startswith(bytes([8]))
    # Ours lacks the trace's early_data extension (00 2a 00 00): early data is refused.
    assert b"\x00\x2a\x00\x00" in trace_ee
    ee_len = int.from_bytes(inner[1:4], "big")
    assert b"\x00\x2a\x00\x00" not in inner[:4 + ee_len]
    assert conn.session is None

    # The client's 0-RTT record (sealed with the early traffic key) is skipped.
    assert conn.receive_data(records(4, "{client}  send application_data record")) == []
    assert conn.state is State.WAIT_FINISHED
    assert conn.data_to_send() == b""


def test_resumption_binder_is_checked_section_4():
    config, _ = resumption_config()
    random = ScriptedRandom(server_random(4), TRACE.value(4, "{server}  create an ephemeral x25519", "private key"))
    conn = ServerConnection(config, random=random, now=lambda: NOW)
    client_hello = bytearray(records(4, "{client}  send handshake record"))
    client_hello[-1] ^= 1  # the last byte belongs to the binder
    with pytest.raises(DecryptError):
        conn.receive_data(bytes(client_hello))
    assert conn.data_to_send() == bytes([21, 3, 3, 0, 2, 2, 51])  # plaintext fatal decrypt_error


def test_hello_retry_request_section_5():
    hrr = TRACE.value(5, "{server}  construct a ServerHello", "ServerHello", 0)
    cookie_at = hrr.index(b"\x00\x2c") + 4
    cookie = hrr[cookie_at + 2: cookie_at + 2 + int.from_bytes(hrr[cookie_at:cookie_at + 2], "big")]
    config = ServerConfig(
        [trace_chain(5)],
        groups=(Group.SECP256R1, Group.SECP384R1, Group.X25519),
        insist_on_preferred_group=True,  # the trace's server asks for P-256 despite the x25519 share
        hello_retry_cookie=lambda first_hello_hash: cookie,
        tickets=None,
    )
    random = ScriptedRandom(
        server_random(5, occurrence=1),  # the first "ServerHello" is the HelloRetryRequest
        TRACE.value(5, "{server}  create an ephemeral P-256", "private key"),
    )
    conn = ServerConnection(config, random=random, now=lambda: NOW)

    assert conn.receive_data(records(5, "{client}  send handshake record", 0)) == []
    assert conn.data_to_send() == records(5, "{server}  send handshake record", 0)
    assert conn.state is State.WAIT_SECOND_HELLO

    events = conn.receive_data(records(5, "{client}  send handshake record", 1))
    assert conn.data_to_send() == records(5, "{server}  send handshake record", 1)
    request = signed_by_trace(conn, events, 5)
    assert request.handshake_messages[1] == hrr  # the signer sees the whole exchange
    assert conn.data_to_send() == records(5, "{server}  send handshake record", 2)

    events = conn.receive_data(records(5, "{client}  send handshake record", 2))
    assert [type(e) for e in events] == [HandshakeComplete]
    assert events[0].session.group == "secp256r1"
    assert conn.data_to_send() == b""  # no tickets configured

    assert conn.receive_data(records(5, "{client}  send alert record")) == [CloseNotifyReceived()]
    conn.close()
    assert conn.data_to_send() == records(5, "{server}  send alert record")
