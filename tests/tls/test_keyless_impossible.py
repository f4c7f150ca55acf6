"""A server without the private key never receives a byte of application data.

The project's first idea was a cloud server that accepts TLS without the key,
records the sessions and decrypts them at home later. These tests play that
*keyless recorder* against a real client (Python's ssl, i.e. OpenSSL) over
loopback. The recorder does everything a server can do without the key, and
keeps every byte the client sends; the client's application writes the mail as
soon as it is connected. The client refuses to finish the handshake, so the
write never happens and the recording holds handshake messages and an alert,
nothing else. That holds for a client that checks the certificate and for an
opportunistic one that does not (as most MTAs with STARTTLS): both check the
handshake signature and Finished. Each case has a control: the same recorder
given the key does receive the mail, and the same analysis finds it, so the
analysis can fail.

docs/keyless-tls.md explains the protocol steps these tests exercise.
"""

import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import padding, x25519

from relay.tls import messages
from relay.tls.certs import CertificateChain
from relay.tls.constants import (
    TLS13,
    AlertDescription,
    AlertLevel,
    CipherSuite,
    ContentType,
    ExtensionType,
    Group,
    HandshakeType,
    SignatureScheme,
)
from relay.tls.keyschedule import SUITES, KeySchedule, Suite, finished_mac
from relay.tls.keyshare import respond
from relay.tls.messages import parse_client_hello
from relay.tls.record import Protection, RecordReader
from relay.tls.signing import Transcript, certificate_verify_content, schemes_for_key, sign
from relay.tls.wire import u16, vec16

from .. import tls12
from ..pki import new_key
from ..rawclient import split_handshake

MARKER = b"the secret mail"
SERVER_NAME = "mx.example.org"
IO_TIMEOUT = 10.0  # the longest any one socket wait may take
QUIET = 1.0        # how long the RSA recorder waits for more after the client's Finished
JOIN_TIMEOUT = 30.0

pytestmark = pytest.mark.timeout(120)  # a backstop: every wait above is bounded already


# --- the client: OpenSSL, whose application sends the mail once connected ---

class MailClient(threading.Thread):
    """Connects, and the moment the handshake returns, writes MARKER."""

    def __init__(self, context: ssl.SSLContext, port: int):
        super().__init__(daemon=True)
        self.context = context
        self.port = port
        self.connected = False
        self.sent_marker = False
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT) as raw:
                with self.context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
                    self.connected = True
                    tls.sendall(MARKER)
                    self.sent_marker = True
                    # TCP FIN without close_notify, then wait for the server to hang up,
                    # so closing cannot reset the connection under unread bytes.
                    tls.shutdown(socket.SHUT_WR)
                    while tls.recv(4096):
                        pass
        except OSError as error:  # ssl.SSLError is an OSError
            self.error = error


def tls13_client(pki, opportunistic: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    if opportunistic:
        # What most MTAs do with STARTTLS: accept any certificate. The
        # handshake's own signature and Finished are still checked.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def tls12_client(pki, ciphers: str, opportunistic: bool = False) -> ssl.SSLContext:
    context = tls13_client(pki, opportunistic)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    return context


# Both kinds of client: one that checks the certificate, and one that does not.
CLIENTS = pytest.mark.parametrize("opportunistic", [False, True], ids=["verifying-client", "opportunistic-client"])


# --- the recorder's side of the wire ----------------------------------------

class RecordingSocket:
    """The server's end of one connection; every byte the client sends is kept in `received`."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.received = bytearray()
        self._records = RecordReader()
        self.eof = False

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def next_record(self, wait: float = IO_TIMEOUT) -> tuple[int, bytes, bytes] | None:
        """The next whole record the client sent, or None at EOF or after `wait` seconds of nothing."""
        deadline = time.monotonic() + wait
        while True:
            record = self._records.next_record(after_hello=True)
            if record is not None:
                return record
            remaining = deadline - time.monotonic()
            if self.eof or remaining <= 0:
                return None
            self.conn.settimeout(remaining)
            try:
                data = self.conn.recv(65536)
            except TimeoutError:
                return None
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
            self.received += data
            self._records.feed(data)

    def client_hello(self) -> bytes:
        buffer = b""
        while len(buffer) < 4 or len(buffer) < 4 + int.from_bytes(buffer[1:4], "big"):
            record = self.next_record()
            assert record is not None, "no ClientHello"
            content_type, _, payload = record
            assert content_type == ContentType.HANDSHAKE
            buffer += payload
        assert buffer[0] == HandshakeType.CLIENT_HELLO
        return buffer

    def record_until_end(self) -> None:
        """Keep recording until the client hangs up (or is silent for IO_TIMEOUT)."""
        while self.next_record() is not None:
            pass


def plaintext_record(content_type: int, payload: bytes) -> bytes:
    return bytes((content_type, 3, 3)) + u16(len(payload)) + payload


CHANGE_CIPHER_SPEC = plaintext_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01")


def converse(context: ssl.SSLContext, serve):
    """Run `serve(RecordingSocket)` against MailClient(context); returns (client, what serve returned)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(IO_TIMEOUT)
        client = MailClient(context, listener.getsockname()[1])
        client.start()
        try:
            conn, _ = listener.accept()
            with conn:
                result = serve(RecordingSocket(conn))
        finally:
            client.join(JOIN_TIMEOUT)
        assert not client.is_alive(), "the client is still running"
    return client, result


def split_records(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """Every record in a recording, in order; a recording that ends mid-record is a test failure."""
    reader = RecordReader()
    reader.feed(data)
    records = []
    while (record := reader.next_record(after_hello=True)) is not None:
        records.append(record)
    assert sum(len(header) + len(payload) for _, header, payload in records) == len(data)
    return records



@dataclass
class Seen:
    """One record the client sent, as the analysis could read it."""

    content_type: int
    content: bytes
    key: str  # "plaintext", or which key opened it


def handshake_name(msg_type: int) -> str:
    if msg_type == tls12.CLIENT_KEY_EXCHANGE:  # TLS 1.2 only: not among the engine's types
        return "CLIENT_KEY_EXCHANGE"
    return HandshakeType(msg_type).name


def handshake_types(seen: list[Seen]) -> list[str]:
    return [
        handshake_name(m[0])
        for s in seen if s.content_type == ContentType.HANDSHAKE
        for m in split_handshake(s.content)
    ]


def alerts(seen: list[Seen]) -> list[tuple[int, int]]:
    return [(s.content[0], s.content[1]) for s in seen if s.content_type == ContentType.ALERT]


def application_data(seen: list[Seen]) -> bytes:
    return b"".join(s.content for s in seen if s.content_type == ContentType.APPLICATION_DATA)


def assert_handshake_failed(client: MailClient, reason: str) -> None:
    assert isinstance(client.error, ssl.SSLError), f"the client did not fail with an SSLError: {client.error!r}"
    assert client.error.reason == reason, client.error


def assert_no_mail(client: MailClient, received: bytes, seen: list[Seen]) -> None:
    assert not client.connected and not client.sent_marker
    assert isinstance(client.error, ssl.SSLError), client.error
    assert {s.content_type for s in seen} <= {ContentType.HANDSHAKE, ContentType.CHANGE_CIPHER_SPEC,
                                              ContentType.ALERT}
    assert application_data(seen) == b""
    assert MARKER not in received
    assert not any(MARKER in s.content for s in seen)


def assert_got_mail(client: MailClient, received: bytes, seen: list[Seen]) -> None:
    """The control: with the key, the very same analysis finds the mail."""
    assert client.error is None and client.sent_marker
    assert application_data(seen) == MARKER
    assert MARKER not in received  # on the wire it was encrypted


# --- TLS 1.3 ------------------------------------------------------------------

@dataclass
class Tls13Recording:
    received: bytes
    suite: Suite
    client_handshake_secret: bytes
    client_application_secret: bytes


def tls13_recorder(chain: CertificateChain, certificate_verify):
    """A TLS 1.3 server with the real chain and no key of its own.

    It does its own x25519 exchange, so it holds every handshake and
    application traffic secret. `certificate_verify(transcript_hash)` returns
    the CertificateVerify message it sends, or None to send none at all.
    """

    def serve(wire: RecordingSocket) -> Tls13Recording:
        client_hello = wire.client_hello()
        hello = parse_client_hello(client_hello)
        assert TLS13 in (hello.supported_versions or [])
        server_share, shared_secret = respond(Group.X25519, dict(hello.key_shares)[Group.X25519], os.urandom)
        suite = SUITES[CipherSuite.AES_128_GCM_SHA256]
        server_hello = messages.server_hello(os.urandom(32), hello.session_id, suite.code, [
            messages.extension(ExtensionType.SUPPORTED_VERSIONS, u16(TLS13)),
            messages.extension(ExtensionType.KEY_SHARE, u16(Group.X25519) + vec16(server_share)),
        ])
        transcript = Transcript()
        transcript.add(client_hello)
        transcript.add(server_hello)
        transcript.start_hash(suite.hash_name)
        schedule = KeySchedule(suite)
        schedule.advance(shared_secret)
        client_handshake_secret = schedule.derive(b"c hs traffic", transcript.digest())
        server_handshake_secret = schedule.derive(b"s hs traffic", transcript.digest())

        flight = [messages.encrypted_extensions([]), messages.certificate(chain.der_chain)]
        for message in flight:
            transcript.add(message)
        verify = certificate_verify(transcript.digest())
        if verify is not None:
            flight.append(verify)
            transcript.add(verify)
        server_finished = messages.finished(finished_mac(suite, server_handshake_secret, transcript.digest()))
        flight.append(server_finished)
        transcript.add(server_finished)
        schedule.advance(None)
        client_application_secret = schedule.derive(b"c ap traffic", transcript.digest())

        write = Protection(suite, server_handshake_secret)
        wire.send(
            plaintext_record(ContentType.HANDSHAKE, server_hello)
            + CHANGE_CIPHER_SPEC
            + b"".join(write.seal(ContentType.HANDSHAKE, message) for message in flight)
        )
        wire.record_until_end()
        return Tls13Recording(bytes(wire.received), suite, client_handshake_secret, client_application_secret)

    return serve


def tls13_read_everything(recording: Tls13Recording) -> list[Seen]:
    """Every record the client sent: plaintext ones as they are, protected ones opened.

    A protected record that opens under neither the client's handshake key nor
    its application key fails the test: nothing in the recording stays unread.
    """
    keys = [
        ("client handshake key", Protection(recording.suite, recording.client_handshake_secret)),
        ("client application key", Protection(recording.suite, recording.client_application_secret)),
    ]
    seen = []
    for content_type, header, payload in split_records(recording.received):
        if content_type != ContentType.APPLICATION_DATA:
            seen.append(Seen(content_type, payload, "plaintext"))
            continue
        for name, protection in keys:  # noqa: B007 - `name` is read after the break
            inner = protection.open(header, payload)
            if inner is not None:
                break
        else:
            raise AssertionError("a protected record opens under no key the recorder holds")
        inner = inner.rstrip(b"\x00")
        seen.append(Seen(inner[-1], inner[:-1], name))
    return seen


# What the recorder sends for CertificateVerify: each takes the leaf and returns
# `certificate_verify(transcript_hash)` for tls13_recorder.

def _scheme(leaf) -> SignatureScheme:
    return schemes_for_key(leaf.cert.public_key())[0]


def sign_with_another_key(leaf):
    """The recorder's own key of the same type: a well-formed signature, by the wrong key."""
    own_key = new_key(leaf.key_type)
    scheme = _scheme(leaf)
    return lambda transcript_hash: messages.certificate_verify(
        scheme, sign(own_key, scheme, certificate_verify_content(transcript_hash))
    )


def replay_an_old_signature(leaf):
    """A CertificateVerify the real key made for some earlier handshake.

    It is made here, before the connection: during the handshake the recorder
    has only this signature, never the key.
    """
    scheme = _scheme(leaf)
    earlier = certificate_verify_content(os.urandom(32))
    message = messages.certificate_verify(scheme, sign(leaf.key, scheme, earlier))
    return lambda transcript_hash: message


def send_no_certificate_verify(leaf):
    """Skip it: Certificate, then Finished straight away."""
    return lambda transcript_hash: None


def sign_with_the_key(leaf):
    """The control: what a server holding the key sends."""
    scheme = _scheme(leaf)
    return lambda transcript_hash: messages.certificate_verify(
        scheme, sign(leaf.key, scheme, certificate_verify_content(transcript_hash))
    )


KEY_TYPES = ["ecdsa-p256", "rsa-2048"]


@CLIENTS
@pytest.mark.parametrize("key_type", KEY_TYPES)
@pytest.mark.parametrize(
    "forgery, reason, alert",
    [
        pytest.param(sign_with_another_key, "BAD_SIGNATURE", AlertDescription.decrypt_error, id="another-key"),
        pytest.param(replay_an_old_signature, "BAD_SIGNATURE", AlertDescription.decrypt_error, id="old-signature"),
        pytest.param(send_no_certificate_verify, "UNEXPECTED_MESSAGE", AlertDescription.unexpected_message,
                     id="no-certificate-verify"),
    ],
)
def test_tls13_recorder_without_the_key_gets_no_application_data(pki, key_type, forgery, reason, alert, opportunistic):
    leaf = pki.leaves[key_type]

    client, recording = converse(tls13_client(pki, opportunistic), tls13_recorder(leaf.chain, forgery(leaf)))

    # OpenSSL checks CertificateVerify before Finished and stops there (RFC 9846 4.5.2).
    assert_handshake_failed(client, reason)
    # The recorder holds the client's handshake and application keys (it did the
    # x25519 exchange itself), so it reads every record; there is nothing to read.
    # (OpenSSL sends this alert in plaintext, before it ever switches keys.)
    seen = tls13_read_everything(recording)
    assert_no_mail(client, recording.received, seen)
    # After its ClientHello the client sent no handshake message: no Finished.
    assert handshake_types(seen) == ["CLIENT_HELLO"]
    assert alerts(seen) == [(AlertLevel.FATAL, alert)]


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_tls13_control_the_same_recorder_with_the_key_gets_the_mail(pki, key_type):
    leaf = pki.leaves[key_type]
    client, recording = converse(tls13_client(pki), tls13_recorder(leaf.chain, sign_with_the_key(leaf)))

    seen = tls13_read_everything(recording)
    assert_got_mail(client, recording.received, seen)
    assert handshake_types(seen) == ["CLIENT_HELLO", "FINISHED"]
    assert [s.key for s in seen if s.content_type == ContentType.APPLICATION_DATA] == ["client application key"]


# --- TLS 1.2 ------------------------------------------------------------------

@dataclass
class Tls12Recording:
    received: bytes               # every byte the client sent
    server_messages: list[bytes]  # ServerHello .. ServerHelloDone, as the recorder sent them
    premaster: bytes | None       # the premaster secret, if the server itself could learn it
    client_finished_received: bool
    server_finished_sent: bool

    @property
    def server_random(self) -> bytes:
        return self.server_messages[0][6:38]


def tls12_recorder(chain: CertificateChain, suite: int, *, decrypt_premaster=None, sign_params=None,
                   server_random: bytes | None = None, ecdhe_key: x25519.X25519PrivateKey | None = None):
    """A TLS 1.2 server with the real chain.

    RSA key transport: it learns the premaster secret only through
    `decrypt_premaster(encrypted)`; None means it has no key. ECDHE_RSA: it has
    its own x25519 key, so it would learn the premaster secret from any
    ClientKeyExchange; `sign_params(content)` returns (scheme, signature) for
    its ServerKeyExchange.

    Knowing the premaster secret, it answers the client's Finished with its own
    as a real server does. Not knowing it, it waits QUIET seconds for anything
    more after the client's Finished, then hangs up.
    """

    def serve(wire: RecordingSocket) -> Tls12Recording:
        client_hello = wire.client_hello()
        hello = parse_client_hello(client_hello)
        assert suite in hello.cipher_suites
        random = server_random or os.urandom(32)
        flight = [tls12.server_hello(random, suite), tls12.certificate(chain.der_chain)]
        own_key = None
        if suite == tls12.ECDHE_RSA_WITH_AES_128_GCM_SHA256:
            own_key = ecdhe_key or x25519.X25519PrivateKey.generate()
            params = tls12.ecdhe_params(Group.X25519, own_key.public_key().public_bytes_raw())
            scheme, signature = sign_params(tls12.server_key_exchange_content(hello.random, random, params))
            flight.append(tls12.server_key_exchange(params, scheme, signature))
        flight.append(tls12.server_hello_done())
        wire.send(plaintext_record(ContentType.HANDSHAKE, b"".join(flight)))

        handshake = [client_hello, *flight]
        premaster = None
        client_changed_cipher = client_finished_received = server_finished_sent = False
        wait = IO_TIMEOUT
        while (record := wire.next_record(wait)) is not None:
            content_type, _, payload = record
            if content_type == ContentType.CHANGE_CIPHER_SPEC:
                client_changed_cipher = True
            elif content_type == ContentType.HANDSHAKE and not client_changed_cipher:
                for message in split_handshake(payload):
                    handshake.append(message)
                    if message[0] != tls12.CLIENT_KEY_EXCHANGE:
                        continue
                    if own_key is not None:
                        peer = x25519.X25519PublicKey.from_public_bytes(tls12.ecdh_public(message))
                        premaster = own_key.exchange(peer)
                    elif decrypt_premaster is not None:
                        premaster = decrypt_premaster(tls12.encrypted_premaster(message))
            elif content_type == ContentType.HANDSHAKE:  # the client's Finished, encrypted
                client_finished_received = True
                if premaster is None:
                    wait = QUIET  # the client now waits for our Finished, which cannot be made
                    continue
                master = tls12.master_secret(premaster, hello.random, random)
                keys = tls12.key_block(master, hello.random, random)
                client_finished = tls12.GcmRecords(keys.client_key, keys.client_salt).open(content_type, payload)
                assert client_finished == tls12.finished(tls12.verify_data(master, b"client finished", handshake))
                handshake.append(client_finished)
                server_finished = tls12.finished(tls12.verify_data(master, b"server finished", handshake))
                write = tls12.GcmRecords(keys.server_key, keys.server_salt)
                wire.send(CHANGE_CIPHER_SPEC + write.seal(ContentType.HANDSHAKE, server_finished))
                server_finished_sent = True
        return Tls12Recording(bytes(wire.received), flight, premaster, client_finished_received, server_finished_sent)

    return serve


def tls12_master_secret(recording: Tls12Recording, premaster: bytes) -> bytes:
    client_hello = split_handshake(split_records(recording.received)[0][2])[0]
    return tls12.master_secret(premaster, parse_client_hello(client_hello).random, recording.server_random)


def tls12_read_everything(recording: Tls12Recording, premaster: bytes) -> list[Seen]:
    """Decrypt a TLS 1.2 recording later, given its premaster secret: every record, in order.

    A protected record that does not open fails the test (InvalidTag).
    """
    records = split_records(recording.received)
    client_random = parse_client_hello(split_handshake(records[0][2])[0]).random
    keys = tls12.key_block(tls12_master_secret(recording, premaster), client_random, recording.server_random)
    protected = tls12.GcmRecords(keys.client_key, keys.client_salt)
    seen = []
    changed_cipher = False
    for content_type, _, payload in records:
        if changed_cipher:
            seen.append(Seen(content_type, protected.open(content_type, payload), "client write key"))
        else:
            seen.append(Seen(content_type, payload, "plaintext"))
            changed_cipher = content_type == ContentType.CHANGE_CIPHER_SPEC
    return seen


def tls12_rsa_premaster_with_the_key(recording: Tls12Recording, private_key) -> bytes:
    """'Decrypt later at home': the premaster secret from the recorded ClientKeyExchange."""
    records = split_records(recording.received)
    client_hello = parse_client_hello(split_handshake(records[0][2])[0])
    client_key_exchange = split_handshake(records[1][2])[0]
    premaster = private_key.decrypt(tls12.encrypted_premaster(client_key_exchange), padding.PKCS1v15())
    assert len(premaster) == tls12.PREMASTER_LEN
    assert premaster[:2] == u16(client_hello.legacy_version)  # RFC 5246 7.4.7.1: a real premaster secret
    return premaster


RSA_KEY_TRANSPORT = "AES128-GCM-SHA256"
ECDHE_RSA = "ECDHE-RSA-AES128-GCM-SHA256"


@CLIENTS
def test_tls12_rsa_key_transport_client_sends_nothing_before_the_server_finished(pki, opportunistic):
    leaf = pki.leaves["rsa-2048"]
    serve = tls12_recorder(leaf.chain, tls12.RSA_WITH_AES_128_GCM_SHA256)

    client, recording = converse(tls12_client(pki, RSA_KEY_TRANSPORT, opportunistic), serve)

    # The client sent its Finished, then waited for the server's until the recorder hung up.
    assert recording.client_finished_received and not recording.server_finished_sent
    assert isinstance(client.error, ssl.SSLEOFError), client.error
    assert [content_type for content_type, _, _ in split_records(recording.received)] == [
        ContentType.HANDSHAKE,            # ClientHello
        ContentType.HANDSHAKE,            # ClientKeyExchange
        ContentType.CHANGE_CIPHER_SPEC,
        ContentType.HANDSHAKE,            # Finished, encrypted
    ]

    # Decrypt later, at home, with the key: every record opens, the client's
    # Finished checks out, and that is all there is. The mail never left the client.
    premaster = tls12_rsa_premaster_with_the_key(recording, leaf.key)
    seen = tls12_read_everything(recording, premaster)
    assert_no_mail(client, recording.received, seen)
    assert handshake_types(seen) == ["CLIENT_HELLO", "CLIENT_KEY_EXCHANGE", "FINISHED"]
    client_hello, client_key_exchange = seen[0].content, seen[1].content
    handshake = [client_hello, *recording.server_messages, client_key_exchange]
    master = tls12_master_secret(recording, premaster)
    assert seen[3].content == tls12.finished(tls12.verify_data(master, b"client finished", handshake))
    assert alerts(seen) == []


def test_tls12_rsa_control_a_server_that_holds_the_key_gets_the_mail(pki):
    leaf = pki.leaves["rsa-2048"]
    serve = tls12_recorder(
        leaf.chain, tls12.RSA_WITH_AES_128_GCM_SHA256,
        decrypt_premaster=lambda encrypted: leaf.key.decrypt(encrypted, padding.PKCS1v15()),
    )

    client, recording = converse(tls12_client(pki, RSA_KEY_TRANSPORT), serve)

    assert recording.server_finished_sent
    seen = tls12_read_everything(recording, tls12_rsa_premaster_with_the_key(recording, leaf.key))
    assert_got_mail(client, recording.received, seen)
    assert handshake_types(seen) == ["CLIENT_HELLO", "CLIENT_KEY_EXCHANGE", "FINISHED"]


PSS = SignatureScheme.RSA_PSS_RSAE_SHA256


def _signing_with(key):
    return lambda content: (PSS, sign(key, PSS, content))


@CLIENTS
def test_tls12_ecdhe_recorder_signing_with_another_key_gets_no_application_data(pki, opportunistic):
    leaf = pki.leaves["rsa-2048"]
    another_key = new_key("rsa-2048")
    serve = tls12_recorder(leaf.chain, tls12.ECDHE_RSA_WITH_AES_128_GCM_SHA256, sign_params=_signing_with(another_key))

    client, recording = converse(tls12_client(pki, ECDHE_RSA, opportunistic), serve)

    assert_ecdhe_client_stopped_at_server_key_exchange(client, recording)


@CLIENTS
def test_tls12_ecdhe_recorder_replaying_an_old_signature_gets_no_application_data(pki, opportunistic):
    """The real key signed these very params and server random, earlier, for another client.

    Only ClientHello.random differs, and that is enough (RFC 5246 7.4.3).
    """
    leaf = pki.leaves["rsa-2048"]
    server_random, ecdhe_key = os.urandom(32), x25519.X25519PrivateKey.generate()
    params = tls12.ecdhe_params(Group.X25519, ecdhe_key.public_key().public_bytes_raw())
    earlier = sign(leaf.key, PSS, tls12.server_key_exchange_content(os.urandom(32), server_random, params))
    serve = tls12_recorder(leaf.chain, tls12.ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                           sign_params=lambda content: (PSS, earlier), server_random=server_random,
                           ecdhe_key=ecdhe_key)

    client, recording = converse(tls12_client(pki, ECDHE_RSA, opportunistic), serve)

    assert_ecdhe_client_stopped_at_server_key_exchange(client, recording)


def assert_ecdhe_client_stopped_at_server_key_exchange(client: MailClient, recording: Tls12Recording) -> None:
    assert_handshake_failed(client, "BAD_SIGNATURE")
    # No ClientKeyExchange, so not even the recorder's own ECDHE key yields a premaster secret.
    assert recording.premaster is None and not recording.client_finished_received
    seen = [Seen(content_type, payload, "plaintext") for content_type, _, payload in split_records(recording.received)]
    assert_no_mail(client, recording.received, seen)
    assert handshake_types(seen) == ["CLIENT_HELLO"]
    assert alerts(seen) == [(AlertLevel.FATAL, AlertDescription.decrypt_error)]


def test_tls12_ecdhe_control_a_server_that_holds_the_key_gets_the_mail(pki):
    leaf = pki.leaves["rsa-2048"]
    serve = tls12_recorder(leaf.chain, tls12.ECDHE_RSA_WITH_AES_128_GCM_SHA256, sign_params=_signing_with(leaf.key))

    client, recording = converse(tls12_client(pki, ECDHE_RSA), serve)

    assert recording.server_finished_sent
    seen = tls12_read_everything(recording, recording.premaster)
    assert_got_mail(client, recording.received, seen)
    assert handshake_types(seen) == ["CLIENT_HELLO", "CLIENT_KEY_EXCHANGE", "FINISHED"]
