"""A scriptable TLS 1.3 client for tests: any ClientHello, then any record, under the right keys.

    client = RawClient(config, leaf.key)       # owns a fresh ServerConnection
    client.handshake()                          # a full handshake; SignatureRequests signed with leaf.key
    client.send_protected(ContentType.HANDSHAKE, handshake_message(HandshakeType.KEY_UPDATE, b"\\x02"))

`client.drive_to(State.WAIT_FINISHED)` stops a handshake at any engine state;
`client.protect(...)` seals a record without sending it, for tests that
corrupt, split or concatenate records themselves.

`Hello` is a ClientHello as plain fields plus an ordered list of
(extension type, data) pairs: a test adds, drops, duplicates or reorders
extensions, or changes any field, before it is sent. Offered PSKs are kept
apart and encoded as the last extension with real binders.

Everything the server sends is taken from `data_to_send()` after every call,
also when the call raised, and decrypted as it arrives: `client.records`
holds every record, `client.alerts` the alert payloads, so a test asserts on
the exact alert that went on the wire. Key shares: x25519, P-256, P-384;
cipher suites: whatever the server picks from the engine's suites.
"""

import dataclasses
import os
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from relay.tls import ServerConfig, ServerConnection, SignatureRequest, State
from relay.tls.constants import (
    TLS12,
    TLS13,
    AlertLevel,
    CipherSuite,
    ContentType,
    ExtensionType,
    Group,
    HandshakeType,
    KeyUpdateRequest,
    PskMode,
    SignatureScheme,
)
from relay.tls.keyschedule import (
    SUITES,
    TAG_LEN,
    KeySchedule,
    Suite,
    finished_mac,
    next_traffic_secret,
    resumption_psk,
)
from relay.tls.messages import extension, handshake_message
from relay.tls.record import HEADER_LEN, Protection
from relay.tls.signing import is_hello_retry_request, sign, transcript_hash
from relay.tls.wire import Reader, u8, u16, u32, vec8, vec16

SERVER_NAME = "mx.example.org"
SIGNATURE_SCHEMES = (
    SignatureScheme.ECDSA_SECP256R1_SHA256,
    SignatureScheme.ECDSA_SECP384R1_SHA384,
    SignatureScheme.ECDSA_SECP521R1_SHA512,
    SignatureScheme.RSA_PSS_RSAE_SHA256,
    SignatureScheme.RSA_PSS_RSAE_SHA384,
    SignatureScheme.RSA_PSS_RSAE_SHA512,
    SignatureScheme.ED25519,
)


# --- extension data ----------------------------------------------------------

def versions_data(*versions: int) -> bytes:
    return vec8(b"".join(u16(v) for v in versions))


def groups_data(*groups: int) -> bytes:
    return vec16(b"".join(u16(g) for g in groups))


def key_share_data(*shares: tuple[int, bytes]) -> bytes:
    return vec16(b"".join(u16(group) + vec16(share) for group, share in shares))


def schemes_data(*schemes: int) -> bytes:
    return vec16(b"".join(u16(s) for s in schemes))


def psk_modes_data(*modes: int) -> bytes:
    return vec8(bytes(modes))


def server_name_data(name: str) -> bytes:
    return vec16(u8(0) + vec16(name.encode()))


def record_size_limit_data(limit: int) -> bytes:
    return u16(limit)


def cookie_data(cookie: bytes) -> bytes:
    return vec16(cookie)


def pre_shared_key_data(identities: list[tuple[bytes, int]], binders: list[bytes]) -> bytes:
    offered = b"".join(vec16(identity) + u32(age) for identity, age in identities)
    return vec16(offered) + vec16(b"".join(vec8(b) for b in binders))


# --- records -----------------------------------------------------------------

def split_handshake(data: bytes) -> list[bytes]:
    """Whole handshake messages, headers included, written independently of the engine's and the
    oracle's parsers (tests compare against them); a truncated message is a test failure."""
    out = []
    while data:
        length = 4 + int.from_bytes(data[1:4], "big")
        assert len(data) >= length, "truncated handshake message"
        out.append(data[:length])
        data = data[length:]
    return out


def record(content_type: int, payload: bytes, version: int = TLS12) -> bytes:
    """One plaintext record, as is: no length or type checks."""
    return u8(content_type) + u16(version) + u16(len(payload)) + payload


def records(content_type: int, payload: bytes, cuts: list[int]) -> bytes:
    """`payload` fragmented into several records of one type at the offsets in `cuts`."""
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(payload)), len(payload)]
    return b"".join(record(content_type, payload[a:b]) for a, b in zip(bounds, bounds[1:]))


def sslv2_client_hello() -> bytes:
    """An SSL 2.0-format CLIENT-HELLO offering TLS 1.0, as very old clients send."""
    cipher_specs = bytes.fromhex("00002f" "000035" "010080")
    challenge = bytes(16)
    body = u8(1) + u16(0x0301) + u16(len(cipher_specs)) + u16(0) + u16(len(challenge)) + cipher_specs + challenge
    return u16(0x8000 | len(body)) + body


class RecordKey(Protection):
    """One direction's traffic key that can also seal any TLSInnerPlaintext (padding, bad types, nothing)."""

    def seal(self, content_type: int, content: bytes, padding: int = 0) -> bytes:
        return self.seal_inner(content + u8(content_type) + bytes(padding))

    def seal_inner(self, inner: bytes) -> bytes:
        header = u8(ContentType.APPLICATION_DATA) + u16(TLS12) + u16(len(inner) + TAG_LEN)
        return header + self._aead.encrypt(self._nonce(), inner, header)

    def next(self) -> "RecordKey":
        """The key after a KeyUpdate."""
        return RecordKey(self.suite, next_traffic_secret(self.suite, self.secret))


# --- ClientHello -------------------------------------------------------------

@dataclass
class PskOffer:
    identity: bytes
    obfuscated_age: int
    suite: Suite
    psk: bytes
    binder: bytes | None = None  # None: the correct binder, computed when the hello is sent


@dataclass
class Hello:
    random: bytes
    legacy_version: int = TLS12
    session_id: bytes = b""
    cipher_suites: list[int] = field(default_factory=lambda: [CipherSuite.AES_128_GCM_SHA256])
    compression_methods: bytes = b"\x00"
    # Sent in this order. None leaves the extensions block out (a TLS 1.0-style hello).
    extensions: list[tuple[int, bytes]] | None = field(default_factory=list)
    psks: list[PskOffer] = field(default_factory=list)  # the pre_shared_key extension, always last
    trailing: bytes = b""  # bytes after the extensions block, inside the message

    def get(self, ext_type: int) -> bytes | None:
        return next((data for t, data in self.extensions if t == ext_type), None)

    def set(self, ext_type: int, data: bytes) -> "Hello":
        """Replace the extension where it is, or append it."""
        for i, (t, _) in enumerate(self.extensions):
            if t == ext_type:
                self.extensions[i] = (ext_type, data)
                return self
        self.extensions.append((ext_type, data))
        return self

    def add(self, ext_type: int, data: bytes) -> "Hello":
        """Append the extension, even if it is already there."""
        self.extensions.append((ext_type, data))
        return self

    def remove(self, ext_type: int) -> "Hello":
        self.extensions = [(t, d) for t, d in self.extensions if t != ext_type]
        return self

    def move(self, ext_type: int, index: int) -> "Hello":
        """Put the (first) extension of this type at `index` (-1: last before pre_shared_key)."""
        i = next(i for i, (t, _) in enumerate(self.extensions) if t == ext_type)
        entry = self.extensions.pop(i)
        self.extensions.insert(len(self.extensions) if index == -1 else index, entry)
        return self

    def copy(self) -> "Hello":
        extensions = None if self.extensions is None else list(self.extensions)
        return dataclasses.replace(self, extensions=extensions, psks=list(self.psks))

    def binders_length(self) -> int:
        """Bytes the binders list takes at the end of the extensions block."""
        return 2 + sum(1 + offer.suite.hash_len for offer in self.psks) if self.psks else 0

    def encode(self, binders: list[bytes] | None = None) -> bytes:
        """The handshake message; PSK binders are zeros unless given."""
        body = (
            u16(self.legacy_version) + self.random + vec8(self.session_id)
            + vec16(b"".join(u16(s) for s in self.cipher_suites)) + vec8(self.compression_methods)
        )
        if self.extensions is not None:
            blob = b"".join(extension(t, data) for t, data in self.extensions)
            if self.psks:
                binders = binders or [bytes(offer.suite.hash_len) for offer in self.psks]
                identities = [(offer.identity, offer.obfuscated_age) for offer in self.psks]
                blob += extension(ExtensionType.PRE_SHARED_KEY, pre_shared_key_data(identities, binders))
            body += vec16(blob)
        return handshake_message(HandshakeType.CLIENT_HELLO, body + self.trailing)


@dataclass
class Ticket:
    """A NewSessionTicket, with the PSK it stands for."""

    identity: bytes
    age_add: int
    lifetime: int
    suite: Suite
    psk: bytes
    max_early_data: int | None

    def offer(self, age_ms: int = 0) -> PskOffer:
        return PskOffer(self.identity, (age_ms + self.age_add) % 2**32, self.suite, self.psk)


@dataclass
class Received:
    """One record from the server; `content` is None when it could not be decrypted."""

    content_type: int
    content: bytes | None
    protected: bool


# --- the client ----------------------------------------------------------------

class RawClient:
    def __init__(self, config: ServerConfig, key=None, *, auto_sign: bool = True,
                 now=time.time, random=os.urandom):
        self.server = ServerConnection(config, random=random, now=now)
        self.key = key
        self.auto_sign = auto_sign
        self.signature_requests: list[SignatureRequest] = []
        self.events: list = []
        # What the server sent.
        self.records: list[Received] = []
        self.server_messages: list[bytes] = []
        self.application_data = b""
        self.tickets: list[Ticket] = []
        self.last_output = b""  # the server's output drained after the last call
        # Handshake state.
        self.transcript: list[bytes] = []   # handshake messages of both sides, as on the wire
        self.suite: Suite | None = None
        self.hello_retry_group: int | None = None
        self.hello_retry_cookie: bytes | None = None
        self.offered_psks: list[bytes] = []    # in the last ClientHello sent
        self.selected_psk: int | None = None
        self.read: Protection | None = None    # server -> client
        self.write: RecordKey | None = None    # client -> server
        self.early: RecordKey | None = None    # client_early_traffic_secret, for 0-RTT records
        self.finished_verify_data = b""        # what our Finished must say
        self.undecryptable = False             # lost track of the server's keys (fuzzed input)
        self._private_keys: dict[int, object] = {}
        self._schedule: KeySchedule | None = None
        self._client_handshake_secret = b""
        self._server_handshake_secret = b""
        self._client_application_secret = b""
        self._resumption_master = b""
        self._inbound = bytearray()
        self._server_handshake = bytearray()

    # --- building hellos -------------------------------------------------------

    def hello(self, *, suites=(CipherSuite.AES_128_GCM_SHA256,), groups=(Group.X25519,), shares=None,
              schemes=SIGNATURE_SCHEMES, server_name: str | None = SERVER_NAME, session_id: bytes = b"",
              ticket: Ticket | None = None, early_data: bool = False) -> Hello:
        """A valid TLS 1.3 ClientHello; `shares` (default: the first group) get real key shares.

        Extensions, in order: server_name, supported_groups, signature_algorithms,
        key_share, supported_versions, psk_key_exchange_modes (psk_dhe_ke),
        early_data if asked; a ticket becomes the pre_shared_key offer.
        """
        shares = groups[:1] if shares is None else shares
        hello = Hello(random=os.urandom(32), session_id=session_id, cipher_suites=list(suites))
        if server_name is not None:
            hello.add(ExtensionType.SERVER_NAME, server_name_data(server_name))
        hello.add(ExtensionType.SUPPORTED_GROUPS, groups_data(*groups))
        hello.add(ExtensionType.SIGNATURE_ALGORITHMS, schemes_data(*schemes))
        hello.add(ExtensionType.KEY_SHARE, key_share_data(*((g, self.key_share(g)) for g in shares)))
        hello.add(ExtensionType.SUPPORTED_VERSIONS, versions_data(TLS13))
        hello.add(ExtensionType.PSK_KEY_EXCHANGE_MODES, psk_modes_data(PskMode.PSK_DHE_KE))
        if early_data:
            hello.add(ExtensionType.EARLY_DATA, b"")
        if ticket is not None:
            hello.psks.append(ticket.offer())
        return hello

    def retry_hello(self, first: Hello) -> Hello:
        """The second ClientHello RFC 9846 4.2.2 asks for after the HelloRetryRequest."""
        assert self.hello_retry_group is not None, "no HelloRetryRequest received"
        second = first.copy()
        group = self.hello_retry_group
        second.set(ExtensionType.KEY_SHARE, key_share_data((group, self.key_share(group))))
        second.remove(ExtensionType.EARLY_DATA)
        if self.hello_retry_cookie is not None:
            second.set(ExtensionType.COOKIE, cookie_data(self.hello_retry_cookie))
        return second

    def key_share(self, group: int) -> bytes:
        """Our public key share for `group`, made on first use."""
        if group not in self._private_keys:
            if group == Group.X25519:
                self._private_keys[group] = x25519.X25519PrivateKey.generate()
            else:
                curve = {Group.SECP256R1: ec.SECP256R1(), Group.SECP384R1: ec.SECP384R1()}[group]
                self._private_keys[group] = ec.generate_private_key(curve)
        public = self._private_keys[group].public_key()
        if group == Group.X25519:
            return public.public_bytes_raw()
        return public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)

    def encode_hello(self, hello: Hello) -> bytes:
        """The hello's bytes with correct PSK binders over the transcript so far."""
        raw = hello.encode()
        if not hello.psks or hello.extensions is None:
            return raw
        truncated = raw[:len(raw) - len(hello.trailing) - hello.binders_length()]
        binders = []
        for offer in hello.psks:
            if offer.binder is not None:
                binders.append(offer.binder)
                continue
            suite = offer.suite
            binder_key = KeySchedule(suite, offer.psk).derive(b"res binder", transcript_hash(suite.hash_name, []))
            covered = transcript_hash(suite.hash_name, [*self.transcript, truncated])  # RFC 9846 4.3.11.2
            binders.append(finished_mac(suite, binder_key, covered))
        return hello.encode(binders)

    # --- sending -----------------------------------------------------------------

    def call(self, function, *args):
        """Run a server method, then take and decrypt what it queued, also when it raised."""
        try:
            return function(*args)
        finally:
            self.last_output = self.server.data_to_send()
            self.absorb(self.last_output)

    def send(self, data: bytes) -> list:
        """Bytes to the server; returns its events, answering SignatureRequests when auto_sign."""
        events = self.call(self.server.receive_data, data)
        self.events += events
        for event in events:
            if isinstance(event, SignatureRequest):
                self.signature_requests.append(event)
                if self.auto_sign:
                    self.call(self.server.provide_signature, sign(self.key, event.scheme, event.content))
        return events

    def send_record(self, content_type: int, payload: bytes) -> list:
        return self.send(record(content_type, payload))

    def protect(self, content_type: int, content: bytes, padding: int = 0) -> bytes:
        """A record under our current key, not yet sent."""
        assert self.write is not None, "no client traffic key yet"
        return self.write.seal(content_type, content, padding)

    def send_protected(self, content_type: int, content: bytes, padding: int = 0) -> list:
        return self.send(self.protect(content_type, content, padding))

    def send_handshake(self, message: bytes) -> list:
        """A handshake message in one record, protected once we have a key."""
        if self.write is None:
            return self.send_record(ContentType.HANDSHAKE, message)
        return self.send_protected(ContentType.HANDSHAKE, message)

    def send_hello(self, hello: Hello | None = None, *, extra: bytes = b"") -> list:
        """Send a ClientHello (plus `extra` bytes in the same record) and take the server's answer."""
        return self.send_record(ContentType.HANDSHAKE, self.prepare_hello(hello or self.hello()) + extra)

    def prepare_hello(self, hello: Hello) -> bytes:
        """The hello's bytes, taken into our transcript as sent: the caller sends them however it likes."""
        raw = self.encode_hello(hello)
        self.transcript.append(raw)
        self.offered_psks = [offer.psk for offer in hello.psks]
        if hello.psks and hello.get(ExtensionType.EARLY_DATA) is not None:
            suite = hello.psks[0].suite
            early_secret = KeySchedule(suite, hello.psks[0].psk).derive(
                b"c e traffic", transcript_hash(suite.hash_name, self.transcript)
            )
            self.early = RecordKey(suite, early_secret)
        return raw

    def early_record(self, content: bytes, padding: int = 0) -> bytes:
        """A 0-RTT application data record under the client early traffic key."""
        assert self.early is not None, "offer early_data with a ticket first"
        return self.early.seal(ContentType.APPLICATION_DATA, content, padding)

    def finished(self) -> bytes:
        return handshake_message(HandshakeType.FINISHED, self.finished_verify_data)

    def send_finished(self, message: bytes | None = None, padding: int = 0) -> list:
        """Our Finished (the right one unless `message` is given); then switch to application keys."""
        assert self.finished_verify_data, "the server's Finished has not arrived"
        message = message or self.finished()
        record_bytes = self.protect(ContentType.HANDSHAKE, message, padding)
        self.switch_to_application_keys(message)
        return self.send(record_bytes)

    def switch_to_application_keys(self, finished: bytes) -> None:
        """After our Finished: application key, resumption secret."""
        self.transcript.append(finished)
        self._resumption_master = self._schedule.derive(b"res master", self._hash())
        self.write = RecordKey(self.suite, self._client_application_secret)

    def handshake(self, hello: Hello | None = None) -> list:
        """A whole handshake, through HelloRetryRequest if there is one."""
        hello = hello or self.hello()
        events = self.send_hello(hello)
        if self.hello_retry_group is not None:
            events += self.send_hello(self.retry_hello(hello))
        events += self.send_finished()
        assert self.server.handshake_complete, "the server did not complete the handshake"
        return events

    def drive_to(self, state: State) -> "RawClient":
        """Bring a fresh connection to `state` the ordinary way (WAIT_SIGNATURE: the request stays unanswered)."""
        if state is State.WAIT_SECOND_HELLO:
            self.send_hello(self.hello(shares=()))
        elif state is State.WAIT_SIGNATURE:
            self.auto_sign = False
            self.send_hello()
        elif state is State.WAIT_FINISHED:
            self.send_hello()
        elif state is State.CONNECTED:
            self.handshake()
        assert self.server.state is state, f"reached {self.server.state.name}, not {state.name}"
        return self

    def send_application_data(self, data: bytes, padding: int = 0) -> list:
        return self.send_protected(ContentType.APPLICATION_DATA, data, padding)

    def send_key_update(self, request: int = KeyUpdateRequest.NOT_REQUESTED) -> list:
        """A KeyUpdate under the current key; later records use the next one."""
        record_bytes = self.protect(ContentType.HANDSHAKE, handshake_message(HandshakeType.KEY_UPDATE, u8(request)))
        self.write = self.write.next()
        return self.send(record_bytes)

    def send_alert(self, description: int, level: int = AlertLevel.FATAL) -> list:
        payload = bytes((level, description))
        if self.write is None:
            return self.send_record(ContentType.ALERT, payload)
        return self.send_protected(ContentType.ALERT, payload)

    # --- what the server sent ------------------------------------------------------

    @property
    def alerts(self) -> list[bytes]:
        return [r.content for r in self.records if r.content_type == ContentType.ALERT]

    def absorb(self, data: bytes) -> None:
        """Take server output: split records, decrypt, follow the handshake and its keys."""
        self._inbound += data
        while len(self._inbound) >= HEADER_LEN:
            length = int.from_bytes(self._inbound[3:5], "big")
            if len(self._inbound) < HEADER_LEN + length:
                return
            header = bytes(self._inbound[:HEADER_LEN])
            payload = bytes(self._inbound[HEADER_LEN:HEADER_LEN + length])
            del self._inbound[:HEADER_LEN + length]
            self._absorb_record(header, payload)

    def _absorb_record(self, header: bytes, payload: bytes) -> None:
        content_type = header[0]
        if content_type != ContentType.APPLICATION_DATA or (self.read is None and not self.undecryptable):
            self.records.append(Received(content_type, payload, protected=False))
            if content_type == ContentType.HANDSHAKE:
                self._absorb_handshake(payload)
            return
        inner = None if self.read is None else self.read.open(header, payload)
        if inner is None:
            self.undecryptable = True
            self.records.append(Received(content_type, None, protected=True))
            return
        inner = inner.rstrip(b"\x00")
        content_type, content = inner[-1], inner[:-1]
        self.records.append(Received(content_type, content, protected=True))
        if content_type == ContentType.HANDSHAKE:
            self._absorb_handshake(content)
        elif content_type == ContentType.APPLICATION_DATA:
            self.application_data += content

    def _absorb_handshake(self, fragment: bytes) -> None:
        buf = self._server_handshake
        buf += fragment
        while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[1:4], "big"):
            length = int.from_bytes(buf[1:4], "big")
            message = bytes(buf[:4 + length])
            del buf[:4 + length]
            self.server_messages.append(message)
            self._on_server_message(message)

    def _on_server_message(self, message: bytes) -> None:
        msg_type = message[0]
        if msg_type == HandshakeType.SERVER_HELLO:
            self._on_server_hello(message)
        elif msg_type in (HandshakeType.ENCRYPTED_EXTENSIONS, HandshakeType.CERTIFICATE,
                          HandshakeType.CERTIFICATE_VERIFY):
            self.transcript.append(message)
        elif msg_type == HandshakeType.FINISHED:
            self._on_server_finished(message)
        elif msg_type == HandshakeType.NEW_SESSION_TICKET:
            self._on_new_session_ticket(message)
        elif msg_type == HandshakeType.KEY_UPDATE:
            self.read = Protection(self.read.suite, next_traffic_secret(self.read.suite, self.read.secret))

    def _on_server_hello(self, message: bytes) -> None:
        r = Reader(message, 4)
        r.u16()
        r.take(32)
        r.vector(1)
        self.suite = SUITES[r.u16()]
        r.u8()
        extensions = {}
        block = r.sub(2)
        while block.remaining():
            ext_type = block.u16()
            extensions[ext_type] = block.vector(2)
        self.transcript.append(message)
        share = extensions.get(ExtensionType.KEY_SHARE, b"")
        if is_hello_retry_request(message):
            self.hello_retry_group = int.from_bytes(share[:2], "big")
            cookie = extensions.get(ExtensionType.COOKIE)
            self.hello_retry_cookie = cookie[2:] if cookie is not None else None
            return
        if ExtensionType.PRE_SHARED_KEY in extensions:
            self.selected_psk = int.from_bytes(extensions[ExtensionType.PRE_SHARED_KEY], "big")
        group, server_share = int.from_bytes(share[:2], "big"), share[4:]
        shared = self._shared_secret(group, server_share)
        if shared is None:  # a fuzzed hello whose share we did not make
            self.undecryptable = True
            return
        psk = None
        if self.selected_psk is not None:
            if self.selected_psk >= len(self.offered_psks):  # a fuzzed hello we did not prepare
                self.undecryptable = True
                return
            psk = self.offered_psks[self.selected_psk]
        self._schedule = KeySchedule(self.suite, psk)
        self._schedule.advance(shared)
        hello_hash = self._hash()
        self._client_handshake_secret = self._schedule.derive(b"c hs traffic", hello_hash)
        self._server_handshake_secret = self._schedule.derive(b"s hs traffic", hello_hash)
        self.read = Protection(self.suite, self._server_handshake_secret)
        self.write = RecordKey(self.suite, self._client_handshake_secret)

    def _shared_secret(self, group: int, server_share: bytes) -> bytes | None:
        private = self._private_keys.get(group)
        if private is None:
            return None
        try:
            if group == Group.X25519:
                return private.exchange(x25519.X25519PublicKey.from_public_bytes(server_share))
            peer = ec.EllipticCurvePublicKey.from_encoded_point(private.curve, server_share)
            return private.exchange(ec.ECDH(), peer)
        except ValueError:
            return None

    def _on_server_finished(self, message: bytes) -> None:
        expected = finished_mac(self.suite, self._server_handshake_secret, self._hash())
        if message[4:] != expected:
            raise AssertionError("the server's Finished does not verify")
        self.transcript.append(message)
        self._schedule.advance(None)
        finished_hash = self._hash()
        self._client_application_secret = self._schedule.derive(b"c ap traffic", finished_hash)
        self.read = Protection(self.suite, self._schedule.derive(b"s ap traffic", finished_hash))
        self.finished_verify_data = finished_mac(self.suite, self._client_handshake_secret, finished_hash)

    def _on_new_session_ticket(self, message: bytes) -> None:
        r = Reader(message, 4)
        lifetime, age_add, nonce, identity = r.u32(), r.u32(), r.vector(1), r.vector(2)
        max_early_data = None
        block = r.sub(2)
        while block.remaining():
            ext_type, data = block.u16(), block.vector(2)
            if ext_type == ExtensionType.EARLY_DATA:
                max_early_data = int.from_bytes(data, "big")
        psk = resumption_psk(self.suite, self._resumption_master, nonce)
        self.tickets.append(Ticket(identity, age_add, lifetime, self.suite, psk, max_early_data))

    def _hash(self) -> bytes:
        return transcript_hash(self.suite.hash_name, self.transcript)
