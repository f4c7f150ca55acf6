"""tlslite-ng 0.8.2 (pure Python; ML-KEM from kyber-py) as the client, over loopback.

The one client here that speaks the post-quantum hybrid X25519MLKEM768. tlslite
does not verify certificates itself, so each test compares the chain it got
with the test PKI's. A socket wrapper keeps the raw bytes, to see the
HelloRetryRequest and the record sizes on the wire.
tlslite-ng has no client-side 0-RTT, so early data is left to OpenSSL and GnuTLS.
"""

import socket
import warnings

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # tlslite's package __init__ imports asyncore
    from tlslite import HandshakeSettings, TLSConnection
    from tlslite.constants import KeyUpdateMessageType
    from tlslite.errors import TLSRemoteAlert

from relay.tls.constants import AlertDescription, Group

from ..interop_helpers import HRR_RANDOM, KEY_TYPES, SCHEME_OF_KEY, TIMEOUT, response_bodies

pytestmark = pytest.mark.interop

# tlslite cipher name -> the engine's suite name
SUITES = {
    "aes128gcm": "TLS_AES_128_GCM_SHA256",
    "aes256gcm": "TLS_AES_256_GCM_SHA384",
    "chacha20-poly1305": "TLS_CHACHA20_POLY1305_SHA256",
}
# tlslite group name -> the engine's group name
GROUPS = {
    "x25519mlkem768": "X25519MLKEM768",
    "x25519": "x25519",
    "secp256r1": "secp256r1",
    "secp384r1": "secp384r1",
}


class RecordingSocket:
    """A socket that keeps a copy of every byte sent and received."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.sent = bytearray()
        self.received = bytearray()

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        self.received += data
        return data

    def send(self, data) -> int:
        count = self._sock.send(data)
        self.sent += bytes(data[:count])
        return count

    def sendall(self, data) -> None:
        self._sock.sendall(data)
        self.sent += bytes(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def records(stream: bytes) -> list[tuple[int, int]]:
    """(content type, length) of each TLS record in a byte stream."""
    found, offset = [], 0
    while offset + 5 <= len(stream):
        length = int.from_bytes(stream[offset + 3:offset + 5], "big")
        found.append((stream[offset], length))
        offset += 5 + length
    return found


def tls13_settings(**fields) -> HandshakeSettings:
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    for name, value in fields.items():
        setattr(settings, name, value)
    return settings


@pytest.fixture
def connect():
    """connect(server, settings, session=, alpn=, server_name=, record_size=) -> (TLSConnection, RecordingSocket).

    The connection has finished its handshake; record_size makes tlslite send records of at most that size.
    """
    sockets = []

    def open_connection(server, settings, *, session=None, alpn=None, server_name="mx.example.org",
                        record_size=None):
        raw = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
        sockets.append(raw)
        recorder = RecordingSocket(raw)
        connection = TLSConnection(recorder)
        if record_size is not None:
            connection.recordSize = record_size  # tlslite then cuts handshake messages too
        connection.handshakeClientCert(settings=settings, session=session, serverName=server_name, alpn=alpn)
        return connection, recorder

    yield open_connection
    for raw in sockets:
        raw.close()


def request(connection: TLSConnection, data: bytes = b"GET / HTTP/1.0\r\n\r\n") -> dict[str, str]:
    """Send one request; read until the body of its answer is complete."""
    connection.write(data)
    received = b""
    for _ in range(64):  # the answer is a few hundred bytes; the socket read has a timeout
        chunk = connection.read()
        assert chunk, f"server closed before answering; got {received!r}"
        received += chunk
        bodies = response_bodies(received.decode())
        if bodies:
            assert received.startswith(b"HTTP/1.0 200 OK\r\n")
            return bodies[0]
    raise AssertionError(f"no complete answer in 64 reads: {received!r}")


def assert_chain_is(connection: TLSConnection, pki, key_type: str) -> None:
    chain = [cert.bytes for cert in connection.session.serverCertChain.x509List]
    assert chain == [pki.leaves[key_type].cert.public_bytes(Encoding.DER), pki.ca_cert.public_bytes(Encoding.DER)]


def saw_hello_retry(recorder: RecordingSocket) -> bool:
    return HRR_RANDOM in recorder.received


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_group(pki, tls_server, connect, key_type, group):
    server = tls_server((key_type,))
    connection, recorder = connect(server, tls13_settings(eccCurves=[group], keyShares=[group]))
    body = request(connection)
    assert connection.getVersionName() == "TLS 1.3"
    connection.close()
    assert_chain_is(connection, pki, key_type)
    assert not saw_hello_retry(recorder)
    assert body["group"] == GROUPS[group]
    assert body["scheme"] == SCHEME_OF_KEY[key_type]
    assert body["resumed"] == "no"


@pytest.mark.parametrize("cipher", SUITES)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_cipher_suite(pki, tls_server, connect, key_type, cipher):
    server = tls_server((key_type,))
    connection, _ = connect(server, tls13_settings(cipherNames=[cipher]))
    body = request(connection)
    assert connection.getCipherName() == cipher
    connection.close()
    assert_chain_is(connection, pki, key_type)
    assert body["cipher"] == SUITES[cipher]
    assert body["group"] == "X25519MLKEM768"  # tlslite's default first share, the engine's first group
    assert body["scheme"] == SCHEME_OF_KEY[key_type]


# (client groups, client's key shares, ServerConfig overrides, group the HRR asks for)
HELLO_RETRIES = {
    "share-server-lacks": (["x448", "secp384r1"], ["x448"], {}, "secp384r1"),
    "insist-on-hybrid": (["x25519mlkem768", "x25519"], ["x25519"], {"insist_on_preferred_group": True},
                         "X25519MLKEM768"),
    "no-share-at-all": (["secp256r1", "x25519"], [], {}, "x25519"),  # server preference order
    "with-cookie": (["x448", "x25519"], ["x448"], {"hello_retry_cookie": lambda digest: b"yestls-cookie" + digest},
                    "x25519"),
}


@pytest.mark.parametrize("case", HELLO_RETRIES)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_hello_retry(pki, tls_server, connect, key_type, case):
    groups, shares, overrides, retry_group = HELLO_RETRIES[case]
    server = tls_server((key_type,), **overrides)
    connection, recorder = connect(server, tls13_settings(eccCurves=groups, keyShares=shares))
    body = request(connection)
    connection.close()
    assert saw_hello_retry(recorder)
    assert_chain_is(connection, pki, key_type)
    assert body["group"] == retry_group
    if "hello_retry_cookie" in overrides:
        # The cookie came in the HelloRetryRequest and went back in the second ClientHello.
        assert b"yestls-cookie" in recorder.received and b"yestls-cookie" in recorder.sent


@pytest.mark.parametrize("hello_retry", [False, True], ids=["same-share", "after-hrr"])
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_resumption_with_session_object(pki, tls_server, connect, key_type, hello_retry):
    server = tls_server((key_type,))
    first, _ = connect(server, tls13_settings())
    first_body = request(first)  # reading the answer also takes in the NewSessionTicket
    first.close()
    assert first_body["resumed"] == "no" and not first.resumed

    # after-hrr: the second hello's PSK binder then covers the HelloRetryRequest.
    settings = tls13_settings(eccCurves=["x448", "x25519"], keyShares=["x448"]) if hello_retry else tls13_settings()
    again, recorder = connect(server, settings, session=first.session)
    body = request(again)
    again.close()
    assert again.resumed
    assert saw_hello_retry(recorder) == hello_retry
    assert body["resumed"] == "yes"
    assert body["cipher"] == first_body["cipher"]
    assert body["sni"] == "mx.example.org"


@pytest.mark.parametrize("message_type", [KeyUpdateMessageType.update_requested,
                                          KeyUpdateMessageType.update_not_requested],
                         ids=["requested", "not-requested"])
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_key_update_then_requests_still_work(tls_server, connect, key_type, message_type):
    server = tls_server((key_type,))
    connection, _ = connect(server, tls13_settings())
    request(connection)
    for _ in range(2):
        client_secret, server_secret = connection.session.cl_app_secret, connection.session.sr_app_secret
        for _ in connection.send_keyupdate_request(message_type):
            pass
        body = request(connection)  # sent under the new key; the answer read back
        assert body["version"] == "TLSv1.3"
        assert connection.session.cl_app_secret != client_secret
        # Asked to, the server updated its sending key too (tlslite followed its KeyUpdate).
        server_updated = connection.session.sr_app_secret != server_secret
        assert server_updated == (message_type == KeyUpdateMessageType.update_requested)
    connection.close()


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_alpn(tls_server, connect, key_type):
    server = tls_server((key_type,), alpn_protocols=(b"h2", b"http/1.1"))
    connection, _ = connect(server, tls13_settings(), alpn=[bytearray(b"http/1.1"), bytearray(b"h2")])
    body = request(connection)
    connection.close()
    assert connection.session.appProto == b"h2"  # the server's preference wins
    assert body["alpn"] == "h2"


def test_alpn_without_common_protocol_is_refused(tls_server, connect):
    server = tls_server(alpn_protocols=(b"smtp",))
    with pytest.raises(TLSRemoteAlert) as refused:
        connect(server, tls13_settings(), alpn=[bytearray(b"h2")])
    assert refused.value.description == AlertDescription.no_application_protocol


@pytest.mark.parametrize("key_type", ["rsa-2048", "ed25519"])
def test_client_record_size_limit(tls_server, connect, key_type):
    # The client takes at most 64-byte TLSInnerPlaintexts: every protected
    # record the engine sends, handshake flight included, must fit.
    server = tls_server((key_type,))
    connection, recorder = connect(server, tls13_settings(record_size_limit=64))
    body = request(connection)
    connection.close()
    protected = [length for kind, length in records(recorder.received) if kind == 23]
    assert len(protected) > 10  # the certificate alone needed many records
    assert max(protected) == 64 + 16  # inner plaintext plus the AEAD tag
    assert body["scheme"] == SCHEME_OF_KEY[key_type]


def test_server_record_size_limit(tls_server, connect):
    # The engine advertises 256: tlslite cuts a 3 KB request into small records
    # and the engine reassembles it.
    server = tls_server(record_size_limit=256)
    connection, recorder = connect(server, tls13_settings())
    big_request = b"GET / HTTP/1.0\r\n" + b"X-Padding: " + b"p" * 3000 + b"\r\n\r\n"
    body = request(connection, big_request)
    connection.close()
    sent = [length for kind, length in records(recorder.sent) if kind == 23]
    assert max(sent) <= 256 + 16
    assert len(sent) > 3000 // 256
    assert body["version"] == "TLSv1.3"


def test_no_common_group_is_refused(tls_server, connect):
    server = tls_server(groups=(Group.SECP384R1,))
    with pytest.raises(TLSRemoteAlert) as refused:
        connect(server, tls13_settings(eccCurves=["x25519", "secp256r1"], keyShares=["x25519"]))
    assert refused.value.description == AlertDescription.handshake_failure


def test_server_picks_its_preferred_group_among_all_shares(tls_server, connect):
    # Shares for every group: a large ClientHello; the engine takes its first, the hybrid.
    server = tls_server()
    every = ["secp384r1", "secp256r1", "x25519", "x25519mlkem768"]
    connection, recorder = connect(server, tls13_settings(eccCurves=every, keyShares=every))
    body = request(connection)
    connection.close()
    assert not saw_hello_retry(recorder)
    assert records(recorder.sent)[0][1] > 1200 + 32 + 65 + 97  # ML-KEM-768 key + the others
    assert body["group"] == "X25519MLKEM768"


def test_ticket_is_not_resumed_under_another_server_name(tls_server, connect):
    server = tls_server()
    first, _ = connect(server, tls13_settings(), server_name="mx.example.org")
    request(first)
    first.close()
    ticket = bytes(first.session.tickets[0].ticket)
    # tlslite itself refuses to offer a session under another name; pretend it was made for
    # localhost, as a careless or hostile client could.
    first.session.serverName = "localhost"

    again, recorder = connect(server, tls13_settings(), session=first.session, server_name="localhost")
    body = request(again)
    again.close()
    assert ticket in recorder.sent  # tlslite offered the mx.example.org ticket...
    assert not again.resumed        # ...and the engine made a full handshake instead
    assert body["resumed"] == "no"
    assert body["sni"] == "localhost"
    assert body["scheme"] == SCHEME_OF_KEY["ecdsa-p256"]


def test_session_with_another_hash_is_not_resumed(tls_server, connect):
    # A ticket from a SHA-384 suite offered with only a SHA-256 suite: the binder
    # hash cannot match, so the engine must answer with a full handshake.
    server = tls_server()
    first, _ = connect(server, tls13_settings(cipherNames=["aes256gcm"]))
    request(first)
    first.close()
    ticket = bytes(first.session.tickets[0].ticket)

    again, recorder = connect(server, tls13_settings(cipherNames=["aes128gcm"]), session=first.session)
    body = request(again)
    again.close()
    assert not again.resumed
    assert body["resumed"] == "no"
    assert body["cipher"] == "TLS_AES_128_GCM_SHA256"
    assert ticket in recorder.sent, "tlslite did not offer the ticket: the test proves nothing"


@pytest.mark.parametrize("hello_retry", [False, True], ids=["one-hello", "after-hrr"])
def test_client_hello_fragmented_over_many_records(tls_server, connect, hello_retry):
    # The hybrid share makes a ~1.4 KB ClientHello; in 100-byte records it spans
    # 15 records, and after an HRR the second ClientHello does too.
    shares = ["secp256r1"] if hello_retry else ["x25519mlkem768"]
    server = tls_server(insist_on_preferred_group=hello_retry)
    connection, recorder = connect(
        server, tls13_settings(eccCurves=["x25519mlkem768", "secp256r1"], keyShares=shares), record_size=100)
    body = request(connection)
    connection.close()
    handshake_records = [length for kind, length in records(recorder.sent) if kind == 22]
    assert len(handshake_records) > 12 and max(handshake_records) == 100
    assert saw_hello_retry(recorder) == hello_retry
    assert body["group"] == "X25519MLKEM768"

