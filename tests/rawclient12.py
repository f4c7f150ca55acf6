"""A TLS 1.2 client that drives the engine's ServerConnection directly, one message at a time.

For the conformance tests (tests/tls/test_tls12_engine.py): it sends what a test
asks for, well formed or not, and keeps what the server sent, decrypted once
the server's ChangeCipherSpec has come. Its record protection and key
derivation are relay/tls/tls12.py's: interop with OpenSSL, GnuTLS,
tlslite-ng and Python's ssl (tests/tls/test_interop_tls12.py) is what shows those
are right; this client shows what the engine does with each wrong input.
"""

import os
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import x25519

from relay.tls import ServerConfig, ServerConnection, Tls12SignatureRequest
from relay.tls.constants import (
    EMPTY_RENEGOTIATION_INFO_SCSV,
    TLS12,
    CipherSuite12,
    ContentType,
    ExtensionType,
    Group,
    HandshakeType,
)
from relay.tls.messages import handshake_message
from relay.tls.signing import Transcript, sign
from relay.tls.tls12 import SUITES12, extended_master_secret, key_block, master_secret, verify_data
from relay.tls.wire import Reader, u8, vec8

from .rawclient import Hello, groups_data, record, schemes_data, server_name_data

SCHEMES = (0x0403, 0x0503, 0x0804, 0x0805, 0x0401, 0x0501, 0x0807)


@dataclass
class ServerHello12:
    random: bytes
    session_id: bytes
    cipher_suite: int
    extensions: dict[int, bytes]


class Raw12:
    def __init__(self, config: ServerConfig, key, *, now=time.time):
        self.server = ServerConnection(config, random=os.urandom, now=now)
        self.key = key
        self.auto_sign = True
        self.requests: list[Tls12SignatureRequest] = []
        self.events: list = []
        self.messages: list[bytes] = []       # the server's handshake messages
        self.alerts: list[tuple[int, int]] = []
        self.application_data = b""
        self.transcript: list[bytes] = []
        self.hello_sent: Hello | None = None
        self.server_hello: ServerHello12 | None = None
        self.master = b""
        self.read = self.write = None           # server -> client, client -> server
        self._pending = self._server_write = None
        self._inbound = bytearray()
        self._handshake = bytearray()
        self._private = x25519.X25519PrivateKey.generate()

    # --- hellos -------------------------------------------------------------------

    def hello(self, *, suites=(CipherSuite12.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,),
              groups=(Group.X25519, Group.SECP256R1, Group.SECP384R1),
              schemes=SCHEMES, ems=True, ticket: bytes | None = b"", secure_renegotiation=True,
              server_name: str | None = "mx.example.org", session_id: bytes = b"") -> Hello:
        """A TLS 1.2 ClientHello: no supported_versions, the TLS 1.2 extensions."""
        cipher_suites = list(suites) + ([EMPTY_RENEGOTIATION_INFO_SCSV] if secure_renegotiation else [])
        hello = Hello(random=os.urandom(32), legacy_version=TLS12, session_id=session_id, cipher_suites=cipher_suites)
        if server_name is not None:
            hello.add(ExtensionType.SERVER_NAME, server_name_data(server_name))
        hello.add(ExtensionType.SUPPORTED_GROUPS, groups_data(*groups))
        hello.add(ExtensionType.EC_POINT_FORMATS, vec8(b"\x00"))
        hello.add(ExtensionType.SIGNATURE_ALGORITHMS, schemes_data(*schemes))
        if ems:
            hello.add(ExtensionType.EXTENDED_MASTER_SECRET, b"")
        if ticket is not None:
            hello.add(ExtensionType.SESSION_TICKET, ticket)
        return hello

    # --- sending --------------------------------------------------------------------

    def send(self, data: bytes) -> list:
        try:
            events = self.server.receive_data(data)
        finally:
            self._absorb(self.server.data_to_send())
        self.events += events
        for event in events:
            if isinstance(event, Tls12SignatureRequest):
                self.requests.append(event)
                if self.auto_sign:
                    self.provide(sign(self.key, event.scheme, event.content))
        return events

    def provide(self, signature: bytes) -> None:
        try:
            self.server.provide_signature(signature)
        finally:
            self._absorb(self.server.data_to_send())

    def send_record(self, content_type: int, payload: bytes) -> list:
        if self.write is not None:
            return self.send(self.write.seal(content_type, payload))
        return self.send(record(content_type, payload))

    def send_handshake(self, message: bytes) -> list:
        self.transcript.append(message)
        return self.send_record(ContentType.HANDSHAKE, message)

    def send_hello(self, hello: Hello | None = None) -> list:
        self.hello_sent = hello or self.hello()
        return self.send_handshake(self.hello_sent.encode())

    def client_key_exchange(self, point: bytes | None = None) -> bytes:
        point = self._private.public_key().public_bytes_raw() if point is None else point
        return handshake_message(HandshakeType.CLIENT_KEY_EXCHANGE, vec8(point))

    def send_client_key_exchange(self, message: bytes | None = None) -> list:
        """Our ClientKeyExchange (the right one unless given); the keys are made from the right one."""
        right = self.client_key_exchange()
        events = self.send_handshake(message or right)
        if message is None:
            self._make_keys(right)
        return events

    def send_change_cipher_spec(self, payload: bytes = b"\x01") -> list:
        events = self.send_record(ContentType.CHANGE_CIPHER_SPEC, payload)
        self.write = self._pending
        return events

    def finished(self, label: bytes = b"client finished") -> bytes:
        digest = self._transcript_hash()
        return handshake_message(HandshakeType.FINISHED, verify_data(self.suite, self.master, label, digest))

    def send_finished(self, message: bytes | None = None) -> list:
        return self.send_handshake(message or self.finished())

    def send_application_data(self, data: bytes) -> list:
        return self.send_record(ContentType.APPLICATION_DATA, data)

    def handshake(self, hello: Hello | None = None) -> list:
        events = self.send_hello(hello)
        if self.resumed:
            self._resumption_keys()
        else:
            events += self.send_client_key_exchange()
        events += self.send_change_cipher_spec()
        events += self.send_finished()
        assert self.server.handshake_complete, "the server did not complete the handshake"
        return events

    # --- what the server said ---------------------------------------------------------

    @property
    def suite(self):
        return SUITES12[self.server_hello.cipher_suite]

    @property
    def resumed(self) -> bool:
        return bool(self.server_hello) and bool(self.server_hello.session_id) \
            and self.server_hello.session_id == self.hello_sent.session_id

    def message(self, msg_type: int) -> bytes | None:
        return next((m for m in self.messages if m[0] == msg_type), None)

    def ticket(self) -> bytes | None:
        message = self.message(HandshakeType.NEW_SESSION_TICKET)
        return None if message is None else Reader(message, 8).vector(2)

    def _absorb(self, data: bytes) -> None:
        self._inbound += data
        while len(self._inbound) >= 5:
            length = int.from_bytes(self._inbound[3:5], "big")
            if len(self._inbound) < 5 + length:
                return
            header, payload = bytes(self._inbound[:5]), bytes(self._inbound[5:5 + length])
            del self._inbound[:5 + length]
            content_type = header[0]
            if self.read is not None:
                plain = memoryview(bytearray(len(payload) - self.read.overhead()))
                assert self.read.open_into(header, payload, plain), "a server record does not authenticate"
                payload = bytes(plain)
            if content_type == ContentType.CHANGE_CIPHER_SPEC:
                if self.read is None and self.server_hello and self.resumed:
                    self._resumption_keys()
                self.read = self._server_write
            elif content_type == ContentType.ALERT:
                self.alerts.append((payload[0], payload[1]))
            elif content_type == ContentType.APPLICATION_DATA:
                self.application_data += payload
            else:
                self._absorb_handshake(payload)

    def _absorb_handshake(self, payload: bytes) -> None:
        self._handshake += payload
        while len(self._handshake) >= 4:
            length = int.from_bytes(self._handshake[1:4], "big")
            if len(self._handshake) < 4 + length:
                return
            message = bytes(self._handshake[:4 + length])
            del self._handshake[:4 + length]
            self.messages.append(message)
            if message[0] == HandshakeType.SERVER_HELLO:
                self.server_hello = _parse_server_hello(message)
            self.transcript.append(message)

    # --- keys ---------------------------------------------------------------------------

    def _transcript_hash(self) -> bytes:
        transcript = Transcript()
        transcript.start_hash(self.suite.hash_name)
        for message in self.transcript:
            transcript.add(message)
        return transcript.digest()

    def _make_keys(self, client_key_exchange: bytes) -> None:
        params = Reader(self.message(HandshakeType.SERVER_KEY_EXCHANGE), 4)
        params.u8(), params.u16()
        server_point = params.vector(1)
        premaster = self._private.exchange(x25519.X25519PublicKey.from_public_bytes(server_point))
        if ExtensionType.EXTENDED_MASTER_SECRET in self.server_hello.extensions:
            index = self.transcript.index(client_key_exchange)
            transcript = Transcript()
            transcript.start_hash(self.suite.hash_name)
            for message in self.transcript[:index + 1]:
                transcript.add(message)
            self.master = extended_master_secret(self.suite, premaster, transcript.digest())
        else:
            self.master = master_secret(self.suite, premaster, self.hello_sent.random, self.server_hello.random)
        self._pending, self._server_write = key_block(self.suite, self.master, self.hello_sent.random,
                                                      self.server_hello.random)

    def resume_with(self, master: bytes) -> None:
        """The master secret of the session a ticket resumes (the test knows it from the first connection)."""
        self.master = master

    def _resumption_keys(self) -> None:
        self._pending, self._server_write = key_block(self.suite, self.master, self.hello_sent.random,
                                                      self.server_hello.random)


def _parse_server_hello(message: bytes) -> ServerHello12:
    r = Reader(message, 4)
    r.u16()
    random = r.take(32)
    session_id = r.vector(1)
    suite = r.u16()
    r.u8()
    extensions = {}
    if r.remaining():
        block = r.sub(2)
        while block.remaining():
            ext_type = block.u16()
            extensions[ext_type] = block.vector(2)
    return ServerHello12(random, session_id, suite, extensions)


def alert(level: int, description: int) -> bytes:
    return u8(level) + u8(description)
