"""TLS 1.2 (RFC 5246) for clients that cannot speak TLS 1.3: the half of `ServerConnection` that serves them.

`ServerConnection` (relay/tls/server.py) reads the first ClientHello, and
when the client's highest version is TLS 1.2 it hands the connection to the
methods here; they share its record reader, output queue, transcript and
alert handling. What is served, and nothing else:

- ECDHE_ECDSA and ECDHE_RSA with AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305
  (relay/tls/tls12.py); groups x25519, P-256, P-384. No RSA key transport:
  its private-key operation is a decryption, which the oracle does not offer,
  and it has no forward secrecy (docs/keyless-tls.md).
- The one signature, the ServerKeyExchange's, is a `Tls12SignatureRequest`:
  the server_random comes from a nonce (relay.tls.signing.tls12_server_random)
  so a remote signer knows what it signs; it ends with the downgrade sentinel,
  as does every TLS 1.2 server_random of ours.
- Extended master secret (RFC 7627) when offered. Session tickets (RFC 5077)
  only for sessions with it; a ticket of such a session offered without it
  is handshake_failure (RFC 7627 5.3). No session-ID resumption: tickets keep
  the edge stateless, as in TLS 1.3.
- Secure renegotiation indication (RFC 5746) sent when the client signals
  it; renegotiation itself is refused with a no_renegotiation warning.
- TLS_FALLBACK_SCSV (RFC 7507) from a client that could do better is
  inappropriate_fallback: we speak TLS 1.3.
"""

import hmac

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay.scrub import wipe

from . import keyshare, messages
from .constants import (
    DOWNGRADE_TLS12,
    EMPTY_RENEGOTIATION_INFO_SCSV,
    FALLBACK_SCSV,
    MAX_PLAINTEXT,
    TLS12,
    AlertDescription,
    AlertLevel,
    ContentType,
    ExtensionType,
    Group,
    HandshakeType,
)
from .errors import (
    BadRecordMac,
    DecodeError,
    DecryptError,
    HandshakeFailure,
    IllegalParameter,
    InappropriateFallback,
    InternalError,
    PeerAlert,
    RecordOverflow,
    UnexpectedMessage,
)
from .events import CloseNotifyReceived, DataReceived, Event, HandshakeComplete, SessionInfo, Tls12SignatureRequest
from .messages import ClientHello, extension
from .signing import (
    ecdhe_params,
    schemes_for_key_tls12,
    server_key_exchange_content,
    tls12_nonce,
    tls12_server_random,
    verify,
)
from .state import State
from .tickets import SessionState
from .tls12 import (
    SUITES12,
    VERIFY_DATA_LEN,
    Auth,
    Suite12,
    extended_master_secret,
    key_block,
    master_secret,
    verify_data,
)
from .wire import Reader, vec8, vec16

# Warning alerts and refused renegotiations a peer may send before it is cut off.
MAX_IGNORED = 4


def auth_of(public_key) -> str:
    """The suites' authentication a certificate key serves: RSA, or ECDSA (Ed25519 too, RFC 8422)."""
    return Auth.RSA if isinstance(public_key, rsa.RSAPublicKey) else Auth.ECDSA


_CURVE_GROUPS = {"secp256r1": 0x0017, "secp384r1": 0x0018, "secp521r1": 0x0019}


def key_fits_groups(public_key, groups: list[int] | None) -> bool:
    """RFC 8422 5.1: in TLS 1.2 the client's supported_groups also names the curves an ECDSA certificate may use."""
    if groups is None or not isinstance(public_key, ec.EllipticCurvePublicKey):
        return True
    return _CURVE_GROUPS.get(public_key.curve.name) in groups


class Tls12Server:
    """Mixed into ServerConnection: every name here is TLS 1.2's (the state lives on the connection)."""

    # --- ClientHello ----------------------------------------------------------------

    def _receive_client_hello12(self, hello: ClientHello, raw: bytes, events: list[Event]) -> None:
        if 0 not in hello.compression_methods:
            raise IllegalParameter("the ClientHello does not offer null compression")
        if FALLBACK_SCSV in hello.cipher_suites:
            raise InappropriateFallback("TLS_FALLBACK_SCSV with TLS 1.2: this server speaks TLS 1.3")
        if hello.renegotiation_info not in (None, b""):
            raise HandshakeFailure("renegotiation_info is not empty in an initial handshake (RFC 5746 3.6)")
        self._secure_renegotiation = (EMPTY_RENEGOTIATION_INFO_SCSV in hello.cipher_suites
                                      or hello.renegotiation_info is not None)
        if hello.point_formats is not None and 0 not in hello.point_formats:
            raise IllegalParameter("ec_point_formats lacks the uncompressed form (RFC 8422 5.1.2)")
        self.client_hello = hello
        self._transcript.add(raw)
        self._alpn12 = self._choose_alpn(hello)
        state = self._open_ticket12(hello)
        if state is not None:
            self._resume12(hello, state, events)
        else:
            events.append(self._request_key_exchange_signature(hello, raw))

    def _open_ticket12(self, hello: ClientHello) -> SessionState | None:
        if not hello.session_ticket or self.config.tickets is None:
            return None
        state = self.config.tickets.open(hello.session_ticket, self._now())
        if state is None or state.protocol != TLS12 or state.server_name != hello.server_name:
            return None
        if state.cipher_suite not in hello.cipher_suites or state.cipher_suite not in self.config.cipher_suites12:
            return None
        if not hello.extended_master_secret:
            raise HandshakeFailure("the ticket's session has the extended master secret and this ClientHello "
                                   "does not offer it (RFC 7627 5.3)")
        return state

    def _choose12(self, hello: ClientHello):
        """(suite, chain, scheme, group) in our preference order; HandshakeFailure when nothing fits."""
        if hello.signature_algorithms is None:
            raise HandshakeFailure("no signature_algorithms: TLS 1.2 would fall back to SHA-1, which is not served")
        if hello.groups is None:
            groups = [Group.SECP256R1]   # RFC 8422 4: absent, the server picks; P-256 is what such clients have
        else:
            groups = [g for g in self.config.groups12 if g in hello.groups]
        if not groups:
            raise HandshakeFailure("no TLS 1.2 ECDHE group in common (x25519, P-256, P-384)")
        chains = self.config.certificates
        named = [c for c in chains if hello.server_name and c.matches(hello.server_name)] or chains
        for code in self.config.cipher_suites12:
            if code not in hello.cipher_suites:
                continue
            suite = SUITES12[code]
            for chain in named:
                if auth_of(chain.public_key) != suite.auth or not key_fits_groups(chain.public_key, hello.groups):
                    continue
                scheme = next((s for s in schemes_for_key_tls12(chain.public_key)
                               if s in hello.signature_algorithms), None)
                if scheme is not None:
                    return suite, chain, scheme, groups[0]
        raise HandshakeFailure("no TLS 1.2 ECDHE-AEAD cipher suite, certificate and signature scheme in common")

    def _request_key_exchange_signature(self, hello: ClientHello, raw: bytes) -> Tls12SignatureRequest:
        suite, chain, scheme, group = self._choose12(hello)
        self._start12(suite)
        nonce = tls12_nonce(self._now(), self._random)
        self._server_random = tls12_server_random(nonce)
        private, public = keyshare.generate(group, self._random)
        self._ecdhe = (group, private)
        params = ecdhe_params(group, public)
        self._session_fields = dict(
            version="TLSv1.2", cipher_suite=suite.name, group=keyshare.group_name(group),
            signature_scheme=scheme.name.lower(), resumed=False, server_name=hello.server_name,
            alpn=self._alpn12, client_random=hello.random,
        )
        self._signature_request = Tls12SignatureRequest(
            client_hello=raw, nonce=nonce, params=params, scheme=scheme, certificate=chain,
            server_name=hello.server_name, cipher_suite=suite.code,
            content=server_key_exchange_content(hello.random, self._server_random, params),
        )
        self.state = State.WAIT_SIGNATURE
        return self._signature_request

    def _start12(self, suite: Suite12) -> None:
        self._suite12 = suite
        self._transcript.start_hash(suite.hash_name)
        self._receive_limit = MAX_PLAINTEXT

    # --- the server's flights ---------------------------------------------------------

    def _finish_server_flight12(self, signature: bytes) -> None:
        request = self._signature_request
        if not verify(request.certificate.public_key, request.scheme, request.content, signature):
            raise InternalError("the signer's signature does not verify against the certificate")
        self._signature_request = None
        hello = self.client_hello
        issue_ticket = self._issues_tickets12(hello)
        session_id = self._random(32) if issue_ticket else b""
        extensions = self._server_hello_extensions12(hello, issue_ticket)
        if hello.point_formats is not None:
            extensions.append(extension(ExtensionType.EC_POINT_FORMATS, vec8(b"\x00")))
        if hello.server_name is not None:
            extensions.append(extension(ExtensionType.SERVER_NAME, b""))
        self._queue_handshake(messages.server_hello(self._server_random, session_id, self._suite12.code, extensions))
        self._queue_handshake(messages.certificate12(request.certificate.der_chain))
        self._queue_handshake(messages.server_key_exchange(request.params, request.scheme, signature))
        self._queue_handshake(messages.server_hello_done())
        self._flush_handshake()
        self.state = State.WAIT_CLIENT_KEY_EXCHANGE

    def _resume12(self, hello: ClientHello, state: SessionState, events: list[Event]) -> None:
        """The abbreviated handshake: ServerHello, [NewSessionTicket], ChangeCipherSpec, Finished."""
        suite = SUITES12[state.cipher_suite]
        self._start12(suite)
        self._server_random = self._random(24) + DOWNGRADE_TLS12
        self._master12 = state.psk
        self._resumed12 = True
        self._session_fields = dict(
            version="TLSv1.2", cipher_suite=suite.name, group="none", signature_scheme=None, resumed=True,
            server_name=hello.server_name, alpn=self._alpn12, client_random=hello.random,
        )
        issue_ticket = self._issues_tickets12(hello)
        extensions = self._server_hello_extensions12(hello, issue_ticket)
        # RFC 5077 3.4: the client's session ID echoed says "resumed".
        self._queue_handshake(messages.server_hello(self._server_random, hello.session_id, suite.code, extensions))
        self._make_keys12()
        if issue_ticket:
            self._queue_ticket12()
        self._send_change_cipher_spec_and_finished12()
        self.state = State.WAIT_CHANGE_CIPHER_SPEC

    def _issues_tickets12(self, hello: ClientHello) -> bool:
        return (self.config.tickets is not None and hello.extended_master_secret
                and hello.session_ticket is not None)

    def _server_hello_extensions12(self, hello: ClientHello, issue_ticket: bool) -> list[bytes]:
        extensions = []
        if self._secure_renegotiation:
            extensions.append(extension(ExtensionType.RENEGOTIATION_INFO, vec8(b"")))
        if hello.extended_master_secret:
            extensions.append(extension(ExtensionType.EXTENDED_MASTER_SECRET, b""))
        if issue_ticket:
            extensions.append(extension(ExtensionType.SESSION_TICKET, b""))
        if self._alpn12 is not None:
            extensions.append(extension(ExtensionType.ALPN, vec16(vec8(self._alpn12))))
        return extensions

    def _make_keys12(self) -> None:
        self._pending_read, self._pending_write = key_block(
            self._suite12, self._master12, self.client_hello.random, self._server_random)

    def _queue_ticket12(self) -> None:
        tickets = self.config.tickets
        state = SessionState(
            cipher_suite=self._suite12.code, psk=self._master12, issued_at_ms=int(self._now() * 1000),
            lifetime=tickets.lifetime, age_add=0, server_name=self.client_hello.server_name,
            alpn=self._alpn12, protocol=TLS12,
        )
        self._queue_handshake(messages.new_session_ticket12(tickets.lifetime, tickets.seal(state, self._now())))

    def _send_change_cipher_spec_and_finished12(self) -> None:
        self._flush_handshake()   # in plaintext: the write state is still null
        self._out.append(bytes((ContentType.CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1)))
        self._write = self._pending_write
        self._queue_handshake(messages.finished(self._finished12(b"server finished")))
        self._flush_handshake()

    def _finished12(self, label: bytes) -> bytes:
        return verify_data(self._suite12, self._master12, label, self._transcript.digest())

    # --- the client's flight ----------------------------------------------------------

    def _receive_handshake_message12(self, message: bytes, events: list[Event]) -> bool:
        msg_type, state = message[0], self.state
        if msg_type == HandshakeType.CLIENT_KEY_EXCHANGE and state is State.WAIT_CLIENT_KEY_EXCHANGE:
            self._receive_client_key_exchange(message)
            return True
        if msg_type == HandshakeType.FINISHED and state is State.WAIT_FINISHED:
            self._receive_client_finished12(message, events)
            return True
        if msg_type == HandshakeType.CLIENT_HELLO and state is State.CONNECTED:
            self._refuse_renegotiation()
            return False
        raise UnexpectedMessage(f"handshake message {msg_type} in TLS 1.2 state {state.name}")

    def _receive_client_key_exchange(self, message: bytes) -> None:
        r = Reader(message, 4)
        point = r.vector(1, 1)
        r.expect_end()
        group, private = self._ecdhe
        self._ecdhe = None
        premaster = keyshare.complete(group, private, point)
        self._transcript.add(message)
        suite, hello = self._suite12, self.client_hello
        if hello.extended_master_secret:
            self._master12 = extended_master_secret(suite, premaster, self._transcript.digest())
        else:
            self._master12 = master_secret(suite, premaster, hello.random, self._server_random)
        self._make_keys12()
        self.state = State.WAIT_CHANGE_CIPHER_SPEC

    def _receive_change_cipher_spec12(self, payload: bytes) -> None:
        if payload != b"\x01":
            raise DecodeError("change_cipher_spec is not the one byte 1")
        if self.state is not State.WAIT_CHANGE_CIPHER_SPEC:
            raise UnexpectedMessage(f"change_cipher_spec in TLS 1.2 state {self.state.name}")
        self._read, self._pending_read = self._pending_read, None
        self.state = State.WAIT_FINISHED

    def _receive_client_finished12(self, message: bytes, events: list[Event]) -> None:
        if len(message) != 4 + VERIFY_DATA_LEN:
            raise DecodeError(f"Finished of {len(message) - 4} bytes, not {VERIFY_DATA_LEN}")
        if not hmac.compare_digest(message[4:], self._finished12(b"client finished")):
            raise DecryptError("client Finished does not verify")
        self._transcript.add(message)
        if not self._resumed12:
            if self._issues_tickets12(self.client_hello):
                self._queue_ticket12()
            self._send_change_cipher_spec_and_finished12()
        self._master12 = b""
        self._transcript.forget_messages()
        self.state = State.CONNECTED
        self.session = SessionInfo(**self._session_fields)
        events.append(HandshakeComplete(self.session))

    def _refuse_renegotiation(self) -> None:
        self._ignored12 += 1
        if self._ignored12 > MAX_IGNORED:
            raise UnexpectedMessage("renegotiation asked for again after being refused")
        self._out.append(self._write.seal(ContentType.ALERT, bytes((AlertLevel.WARNING,
                                                                     AlertDescription.no_renegotiation))))

    # --- records --------------------------------------------------------------------

    def _process_record12(self, content_type: int, header: bytes, payload: bytes, events: list[Event]) -> None:
        if self._handshake_buffer and content_type != ContentType.HANDSHAKE:
            raise UnexpectedMessage("record interleaved with a fragmented handshake message")
        if self._read is None:
            self._receive_plaintext12(content_type, memoryview(payload), events)
            return
        inner = self._plaintext[:max(len(payload) - self._read.overhead(), 0)]
        if not self._read.open_into(header, payload, inner):
            raise BadRecordMac("record does not authenticate")
        try:
            self._receive_plaintext12(content_type, inner, events)
        finally:
            wipe(inner)

    def _receive_plaintext12(self, content_type: int, data: memoryview, events: list[Event]) -> None:
        """One record's plaintext (a view wiped once this returns)."""
        if len(data) > MAX_PLAINTEXT:
            raise RecordOverflow(f"record plaintext of {len(data)} bytes exceeds {MAX_PLAINTEXT}")
        if content_type == ContentType.APPLICATION_DATA:
            if self.state is not State.CONNECTED:
                raise UnexpectedMessage("application data before the handshake finished")
            if data:
                events.append(DataReceived(bytearray(data)))
        elif content_type == ContentType.HANDSHAKE:
            self._receive_handshake_fragment(bytes(data), events)
        elif content_type == ContentType.CHANGE_CIPHER_SPEC:
            self._receive_change_cipher_spec12(bytes(data))
        else:
            self._receive_alert12(bytes(data), events)

    def _receive_alert12(self, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 2:
            raise DecodeError("alert record is not exactly one alert")
        level, description = payload
        if description == AlertDescription.close_notify:
            self._peer_closed = True
            events.append(CloseNotifyReceived())
        elif level == AlertLevel.FATAL:
            raise PeerAlert(description)
        elif level != AlertLevel.WARNING:
            raise IllegalParameter(f"alert level {level}")
        else:
            self._ignored12 += 1   # a warning (user_canceled, no_renegotiation...): noted, not obeyed
            if self._ignored12 > MAX_IGNORED:
                raise UnexpectedMessage("too many warning alerts")

