"""A sans-I/O TLS server connection whose one signature is made elsewhere.

TLS 1.3 is here; a client whose best version is TLS 1.2 is served by the
methods of relay/tls/server12.py, mixed in, once its ClientHello is read.

Bytes in (`receive_data`), events and bytes out (`data_to_send`). When the
handshake reaches CertificateVerify the connection returns a
`SignatureRequest` and waits for `provide_signature()`; it checks the
signature against the certificate before sending it. Time and randomness are
injected; nothing here does I/O.

Any bad input ends the connection: the right fatal alert is queued in
`data_to_send()` and the matching `TLSAlert` subclass is raised.
"""

import hashlib
import hmac
from collections.abc import Callable

from relay.scrub import wipe

from . import keyshare, messages
from .certs import select_certificate
from .config import ServerConfig
from .constants import (
    HELLO_RETRY_REQUEST_RANDOM,
    MAX_CIPHERTEXT,
    MAX_INNER_PLAINTEXT,
    MAX_PLAINTEXT,
    TLS12,
    TLS13,
    AlertDescription,
    AlertLevel,
    ContentType,
    ExtensionType,
    HandshakeType,
    KeyUpdateRequest,
    PskMode,
    SignatureScheme,
)
from .errors import (
    BadRecordMac,
    ConnectionClosed,
    DecodeError,
    DecryptError,
    HandshakeFailure,
    IllegalParameter,
    InternalError,
    MissingExtension,
    NoApplicationProtocol,
    PeerAlert,
    ProtocolVersion,
    RecordOverflow,
    TLSAlert,
    UnexpectedMessage,
)
from .events import (
    CloseNotifyReceived,
    ConnectionEnded,
    DataReceived,
    Event,
    HandshakeComplete,
    KeyUpdateReceived,
    SessionInfo,
    SignatureRequest,
)
from .keyschedule import SUITES, TAG_LEN, KeySchedule, Suite, finished_mac, next_traffic_secret, resumption_psk
from .messages import ClientHello, extension
from .record import Protection, RecordReader
from .server12 import Tls12Server
from .signing import Transcript, certificate_verify_content, verify
from .state import State
from .tickets import SessionState
from .wire import u16, u32, vec8, vec16

# RFC 8446 5.5: AES-GCM keys are good for 2^24.5 full records; rekey well before.
RECORDS_PER_KEY = 2**24
# Record overhead of our protected records: content type byte and AEAD tag.
_INNER_OVERHEAD = 17
_ZERO_PADDING = bytes(MAX_CIPHERTEXT)


def _content_type_index(buffer: bytearray, length: int) -> int:
    """Where the content type is in a TLSInnerPlaintext of `length` bytes: its last nonzero byte (-1: none).

    Padding is rare: the common case is one look at the last byte. Otherwise
    the zeros are measured by halving with `endswith` (C speed, no copy of
    the plaintext), so a record of padding costs no Python loop per byte.
    """
    if length and buffer[length - 1]:
        return length - 1
    zeros, most = 0, length   # the last `zeros` bytes are zero; more than `most` are not
    while zeros < most:
        middle = (zeros + most + 1) // 2
        if buffer.endswith(memoryview(_ZERO_PADDING)[:middle], 0, length):
            zeros = middle
        else:
            most = middle - 1
    return length - zeros - 1


class ServerConnection(Tls12Server):
    def __init__(self, config: ServerConfig, *, random: Callable[[int], bytes], now: Callable[[], float]):
        self.config = config
        self._random = random
        self._now = now
        self.state = State.START
        self._records = RecordReader()
        # Each protected record is decrypted here, in place, and wiped once its content has moved on.
        self._plaintext = memoryview(bytearray(MAX_CIPHERTEXT))
        self._handshake_buffer = bytearray()
        self._out: list[bytes] = []
        self._pending_handshake = bytearray()  # handshake bytes not yet framed
        self._read: Protection | None = None
        self._write: Protection | None = None
        self._transcript = Transcript()
        self._suite: Suite | None = None
        self._key_schedule: KeySchedule | None = None
        self._group: int | None = None
        self._first_hello: ClientHello | None = None
        self._hrr_cookie: bytes | None = None
        self._sent_ccs = False
        self._received_ccs = False
        self._early_data_budget = -1       # >= 0 while skipping rejected 0-RTT data
        self._max_send_fragment = MAX_PLAINTEXT
        # Our record_size_limit binds the client only once it has seen it,
        # which needs the client to have offered the extension (RFC 8449 4).
        self._receive_limit = MAX_INNER_PLAINTEXT
        self._client_handshake_secret = b""
        self._server_handshake_secret = b""
        self._client_application_secret = b""
        self._signature_request: SignatureRequest | None = None
        self._expected_client_finished = b""
        self._resumption_master = b""
        self._tickets_sent = 0
        # One KeyUpdate answers any number of requests until we send data
        # again (RFC 8446 4.6.3), so a flood of requests cannot grow our output.
        self._key_update_answered = False
        self._peer_closed = False
        self._closed_write = False
        self.session: SessionInfo | None = None
        self._session_fields: dict = {}  # SessionInfo's fields, filled in as they are chosen
        self.client_hello: ClientHello | None = None   # the hello that was answered
        self.version: int | None = None                 # TLS13 or TLS12 once the first ClientHello is read
        # TLS 1.2's (relay/tls/server12.py)
        self._suite12 = None
        self._server_random = b""
        self._ecdhe = None
        self._master12 = b""
        self._pending_read = None
        self._pending_write = None
        self._resumed12 = False
        self._secure_renegotiation = False
        self._alpn12: bytes | None = None
        self._ignored12 = 0

    # --- public API ---------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Process bytes from the peer; `b""` means the transport reached EOF."""
        events: list[Event] = []
        if not data:
            if self.state is not State.CLOSED:
                self.state = State.CLOSED
                events.append(ConnectionEnded(clean=self._peer_closed))
            return events
        if self.state is State.CLOSED or self._peer_closed:
            return events  # RFC 8446 6.1: data after close_notify is ignored
        self._records.feed(data)
        self._guard(self._process_records, events)
        return events

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def provide_signature(self, signature: bytes) -> None:
        """The signer's answer to the pending `SignatureRequest`."""
        if self.state is not State.WAIT_SIGNATURE:
            raise ConnectionClosed("no signature is pending")
        self._guard(self._finish_server_flight12 if self.version == TLS12 else self._finish_server_flight, signature)

    def signature_failed(self) -> None:
        """The signer could not sign: end the handshake with internal_error."""
        if self.state is State.WAIT_SIGNATURE:
            self._send_alert(AlertDescription.internal_error)
            self.state = State.CLOSED

    def send_data(self, data: bytes) -> None:
        ready = (State.CONNECTED,) if self.version == TLS12 else (State.WAIT_FINISHED, State.CONNECTED)
        if self.state not in ready or self._closed_write:
            raise ConnectionClosed("cannot send application data now")
        self._key_update_answered = False
        step = self._max_send_fragment
        for start in range(0, len(data), step):
            self._rekey_if_worn()
            self._out.append(self._write.seal(ContentType.APPLICATION_DATA, data[start:start + step]))

    def update_keys(self, request_peer_update: bool = False) -> None:
        """Send a KeyUpdate and switch to the next sending key."""
        if self.state is not State.CONNECTED or self._closed_write:
            raise ConnectionClosed("key update needs an established connection")
        if self.version == TLS12:
            raise ConnectionClosed("TLS 1.2 has no key update")
        self._send_key_update(KeyUpdateRequest.REQUESTED if request_peer_update else KeyUpdateRequest.NOT_REQUESTED)

    def close(self) -> None:
        """Send close_notify; nothing more can be sent afterwards."""
        if not self._closed_write and self.state is not State.CLOSED:
            self._send_alert(AlertDescription.close_notify)
        self._closed_write = True
        if self._peer_closed:
            self.state = State.CLOSED

    @property
    def handshake_complete(self) -> bool:
        return self.session is not None

    # --- error handling -----------------------------------------------------

    def _guard(self, step, arg) -> None:
        try:
            step(arg)
        except TLSAlert as alert:
            self._fail(alert)
            raise
        except PeerAlert:
            self.state = State.CLOSED
            raise
        except Exception as bug:  # a bug must still end in an alert, never a hang
            alert = InternalError(f"unexpected {type(bug).__name__}: {bug}")
            self._fail(alert)
            raise alert from bug

    def _fail(self, alert: TLSAlert) -> None:
        if self.state is not State.CLOSED:
            self._send_alert(alert.description)
        self.state = State.CLOSED

    def _send_alert(self, description: int) -> None:
        # An alert ends what we were saying: a flight held for its signature is dropped.
        self._pending_handshake.clear()
        level = AlertLevel.WARNING if description == AlertDescription.close_notify else AlertLevel.FATAL
        payload = bytes((level, description))
        if self._write is None:
            self._out.append(_plaintext_record(ContentType.ALERT, payload))
        else:
            self._out.append(self._write.seal(ContentType.ALERT, payload))

    # --- records ------------------------------------------------------------

    def _process_records(self, events: list[Event]) -> None:
        while self.state is not State.CLOSED and not self._peer_closed:
            record = self._records.next_record(after_hello=self.state is not State.START)
            if record is None:
                return
            self._process_record(*record, events)

    def _process_record(self, content_type: int, header: bytes, payload: bytes, events: list[Event]) -> None:
        if self.version == TLS12:
            self._process_record12(content_type, header, payload, events)
            return
        if self._handshake_buffer and content_type != ContentType.HANDSHAKE and self._read is None:
            raise UnexpectedMessage("record interleaved with a fragmented handshake message")
        if content_type == ContentType.CHANGE_CIPHER_SPEC:
            self._receive_change_cipher_spec(payload)
            return
        if content_type == ContentType.ALERT and (self._read is None or self.session is None):
            # Before the client has our ServerHello its alerts are in plaintext.
            self._receive_alert(payload, events)
            return
        if self._read is None:
            if content_type == ContentType.HANDSHAKE:
                self._receive_handshake_fragment(payload, events)
            elif content_type == ContentType.APPLICATION_DATA and self._early_data_budget >= 0:
                self._skip_early_data(payload)  # 0-RTT sent before our HelloRetryRequest
            else:
                raise UnexpectedMessage(f"record type {content_type} before encryption starts")
            return
        if content_type != ContentType.APPLICATION_DATA:
            raise UnexpectedMessage(f"unprotected record type {content_type} after encryption started")
        inner = self._plaintext[:max(len(payload) - TAG_LEN, 0)]
        if not self._read.open_into(header, payload, inner):
            if self._early_data_budget >= 0:
                self._skip_early_data(payload)
                return
            raise BadRecordMac("record does not authenticate")
        self._early_data_budget = -1
        try:
            self._receive_inner_plaintext(inner, events)
        finally:
            wipe(inner)

    def _receive_inner_plaintext(self, inner: memoryview, events: list[Event]) -> None:
        """`inner` is a view of the record plaintext buffer, wiped once this returns."""
        if len(inner) > self._receive_limit:
            raise RecordOverflow(f"record plaintext of {len(inner)} bytes exceeds our limit")
        end = _content_type_index(inner.obj, len(inner))
        if end < 0:
            raise UnexpectedMessage("protected record without a content type")
        content_type = inner[end]
        if not end and content_type in (ContentType.HANDSHAKE, ContentType.ALERT):
            raise UnexpectedMessage("zero-length handshake or alert record")  # RFC 8446 5.4
        if self._handshake_buffer and content_type != ContentType.HANDSHAKE:
            raise UnexpectedMessage("record interleaved with a fragmented handshake message")
        if content_type == ContentType.APPLICATION_DATA:
            if self.state is not State.CONNECTED:
                raise UnexpectedMessage("application data before the handshake finished")
            data = bytearray(end)            # the receiver's to wipe once it has used it
            memoryview(data)[:] = inner[:end]
            events.append(DataReceived(data))
        elif content_type == ContentType.HANDSHAKE:
            self._receive_handshake_fragment(bytes(inner[:end]), events)
        elif content_type == ContentType.ALERT:
            self._receive_alert(bytes(inner[:end]), events)
        else:
            raise UnexpectedMessage(f"protected record of type {content_type}")

    def _receive_change_cipher_spec(self, payload: bytes) -> None:
        # RFC 8446 5: one unprotected 0x01, after the first ClientHello and
        # before the client's Finished, is dropped; anything else is an error.
        in_window = self.state in (State.WAIT_SECOND_HELLO, State.WAIT_SIGNATURE, State.WAIT_FINISHED)
        if payload != b"\x01" or not in_window or self._received_ccs:
            raise UnexpectedMessage("change_cipher_spec outside the compatibility window")
        self._received_ccs = True

    def _skip_early_data(self, payload: bytes) -> None:
        self._early_data_budget -= max(len(payload) - _INNER_OVERHEAD, 0)
        if self._early_data_budget < 0:
            raise UnexpectedMessage("more rejected early data than max_early_data_size")

    def _receive_alert(self, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 2:
            raise DecodeError("alert record is not exactly one alert")
        description = payload[1]
        if description == AlertDescription.close_notify:
            self._peer_closed = True
            events.append(CloseNotifyReceived())
        elif description != AlertDescription.user_canceled:
            # TLS 1.3: every other alert is fatal whatever its level says.
            raise PeerAlert(description)

    def _receive_handshake_fragment(self, fragment: bytes, events: list[Event]) -> None:
        if not fragment:
            raise UnexpectedMessage("zero-length handshake fragment")
        buf = self._handshake_buffer
        buf += fragment
        while len(buf) >= 4:
            length = int.from_bytes(buf[1:4], "big")
            if length > self.config.max_handshake_message:
                raise IllegalParameter(f"handshake message of {length} bytes is too large")
            if len(buf) < 4 + length:
                return
            message = bytes(buf[:4 + length])
            del buf[:4 + length]
            changes_keys = self._receive_handshake_message(message, events)
            if changes_keys and buf:
                raise UnexpectedMessage("handshake message crosses a key change")

    # --- handshake ----------------------------------------------------------

    def _receive_handshake_message(self, message: bytes, events: list[Event]) -> bool:
        """Handle one whole message; True when it ends a key epoch."""
        if self.version == TLS12:
            return self._receive_handshake_message12(message, events)
        msg_type = message[0]
        if msg_type == HandshakeType.CLIENT_HELLO and self.state in (State.START, State.WAIT_SECOND_HELLO):
            self._receive_client_hello(message, events)
            return True
        if msg_type == HandshakeType.FINISHED and self.state is State.WAIT_FINISHED:
            self._receive_client_finished(message, events)
            return True
        if msg_type == HandshakeType.KEY_UPDATE and self.state is State.CONNECTED:
            self._receive_key_update(message, events)
            return True
        raise UnexpectedMessage(f"handshake message {msg_type} in state {self.state.name}")

    def _receive_client_hello(self, raw: bytes, events: list[Event]) -> None:
        hello = messages.parse_client_hello(raw)
        retry = self.state is State.WAIT_SECOND_HELLO
        if retry:
            self._early_data_budget = -1  # 0-RTT skipping after a HelloRetryRequest ends here
        version = _negotiate_version(hello, self.config.tls12)
        if retry and version != TLS13:
            raise IllegalParameter("the second ClientHello no longer offers TLS 1.3")
        self.version = version
        if version == TLS12:
            self._receive_client_hello12(hello, raw, events)
            return
        if hello.compression_methods != b"\x00":
            raise IllegalParameter("TLS 1.3 allows only null compression")
        _check_mandatory_extensions(hello)

        suite = self._choose_suite(hello, retry)
        group, client_share = self._choose_group(hello, retry)
        if retry:
            self._check_second_hello(hello)
        if client_share is None:
            self._transcript.add(raw)
            self._send_hello_retry_request(hello, suite, group)
            return

        self.client_hello = hello
        if hello.record_size_limit is not None:
            self._max_send_fragment = min(MAX_PLAINTEXT, hello.record_size_limit - 1)
            self._receive_limit = self.config.record_size_limit
        alpn = self._choose_alpn(hello)
        resumed = self._accept_psk(hello, suite)  # binders cover the transcript before this hello
        self._transcript.add(raw)
        if resumed is not None:
            psk_index, state = resumed
            chain_and_scheme = None
        else:
            psk_index, state = None, None
            if hello.signature_algorithms is None:
                raise MissingExtension("certificate authentication needs signature_algorithms")
            chain_and_scheme = select_certificate(
                self.config.certificates, hello.server_name,
                hello.signature_algorithms, hello.signature_algorithms_cert,
            )
            if chain_and_scheme is None:
                raise HandshakeFailure("no certificate fits the client's signature_algorithms")
        if hello.early_data:
            # Early data is never accepted (its replay safety is not worth it
            # for SMTP); the client's 0-RTT records are skipped.
            self._early_data_budget = self.config.ticket_early_data_size
        self._send_server_hello(hello, group, client_share, psk_index, state)
        self._session_fields = dict(
            version="TLSv1.3", cipher_suite=self._suite.name, group=keyshare.group_name(group),
            signature_scheme=None, resumed=state is not None, server_name=hello.server_name, alpn=alpn,
            client_random=hello.random,
        )
        self._send_encrypted_extensions(hello, alpn)
        if chain_and_scheme is None:
            self._send_server_finished()
        else:
            events.append(self._request_signature(hello, *chain_and_scheme))

    def _choose_suite(self, hello: ClientHello, retry: bool) -> Suite:
        code = next((s for s in self.config.cipher_suites if s in hello.cipher_suites), None)
        if code is None:
            raise HandshakeFailure("no cipher suite in common")
        suite = SUITES[code]
        if retry and suite is not self._suite:
            raise IllegalParameter("second ClientHello changed the cipher suite choice")
        if self._suite is None:
            self._suite = suite
            self._transcript.start_hash(suite.hash_name)
        return suite

    def _choose_group(self, hello: ClientHello, retry: bool) -> tuple[int, bytes | None]:
        shares: dict[int, bytes] = {}
        for group, share in hello.key_shares:
            if group in shares:
                raise IllegalParameter("two key shares for one group")
            if group not in hello.groups:
                raise IllegalParameter("key share for a group not in supported_groups")
            shares[group] = share
        if retry:
            if list(shares) != [self._group]:
                raise IllegalParameter("second ClientHello lacks the one key share asked for")
            return self._group, shares[self._group]
        mutual = [g for g in self.config.groups if g in hello.groups]
        if not mutual:
            raise HandshakeFailure("no key exchange group in common")
        if self.config.insist_on_preferred_group:
            group = mutual[0]
        else:
            group = next((g for g in mutual if g in shares), mutual[0])
        self._group = group
        return group, shares.get(group)

    def _check_second_hello(self, hello: ClientHello) -> None:
        first = self._first_hello
        if hello.session_id != first.session_id:
            raise IllegalParameter("second ClientHello changed legacy_session_id")
        if hello.early_data:
            raise IllegalParameter("early_data in the second ClientHello")
        if self._hrr_cookie is not None and hello.cookie != self._hrr_cookie:
            raise IllegalParameter("second ClientHello does not echo the cookie")

    def _choose_alpn(self, hello: ClientHello) -> bytes | None:
        if not self.config.alpn_protocols or hello.alpn is None:
            return None
        chosen = next((p for p in self.config.alpn_protocols if p in hello.alpn), None)
        if chosen is None:
            raise NoApplicationProtocol("no application protocol in common")
        return chosen

    def _accept_psk(self, hello: ClientHello, suite: Suite) -> tuple[int, SessionState] | None:
        """The offered ticket we resume, after checking its binder; None for a full handshake."""
        if hello.psks is None or self.config.tickets is None:
            return None
        if PskMode.PSK_DHE_KE not in hello.psk_modes:
            return None  # psk_ke alone would give up forward secrecy
        now = self._now()
        for index, (identity, _age) in enumerate(hello.psks.identities):
            state = self.config.tickets.open(identity, now)
            if state is None or state.protocol != TLS13 or SUITES.get(state.cipher_suite) is None:
                continue
            if SUITES[state.cipher_suite].hash_name != suite.hash_name:
                continue
            if state.server_name != hello.server_name:
                continue  # a session is resumed only for the name it was made for
            self._check_binder(hello, index, state.psk, suite)
            return index, state
        return None

    def _check_binder(self, hello: ClientHello, index: int, psk: bytes, suite: Suite) -> None:
        binder_key = KeySchedule(suite, psk).derive(b"res binder", _empty_hash(suite))
        truncated = hello.raw[:hello.psks.truncated_length]
        expected = finished_mac(suite, binder_key, self._transcript.digest(truncated))
        if not hmac.compare_digest(expected, hello.psks.binders[index]):
            raise DecryptError("PSK binder does not verify")

    def _send_hello_retry_request(self, hello: ClientHello, suite: Suite, group: int) -> None:
        if self.state is State.WAIT_SECOND_HELLO:
            raise IllegalParameter("second ClientHello still has no usable key share")
        self._first_hello = hello
        self._transcript.replace_first_hello()
        extensions = [extension(ExtensionType.KEY_SHARE, u16(group))]
        if self.config.hello_retry_cookie is not None:
            self._hrr_cookie = self.config.hello_retry_cookie(self._transcript.digest())
            extensions.append(extension(ExtensionType.COOKIE, vec16(self._hrr_cookie)))
        extensions.append(extension(ExtensionType.SUPPORTED_VERSIONS, u16(TLS13)))
        hrr = messages.server_hello(HELLO_RETRY_REQUEST_RANDOM, hello.session_id, suite.code, extensions)
        self._transcript.add(hrr)
        self._out.append(_plaintext_record(ContentType.HANDSHAKE, hrr))
        self._send_compatibility_ccs(hello)
        if hello.early_data:
            self._early_data_budget = self.config.ticket_early_data_size
        self.state = State.WAIT_SECOND_HELLO

    def _send_server_hello(self, hello, group, client_share, psk_index, state) -> None:
        suite = self._suite
        random = self._random(32)
        server_share, shared_secret = keyshare.respond(group, client_share, self._random)
        self._key_schedule = KeySchedule(suite, state.psk if state else None)
        extensions = []
        if psk_index is not None:
            extensions.append(extension(ExtensionType.PRE_SHARED_KEY, u16(psk_index)))
        extensions.append(extension(ExtensionType.KEY_SHARE, u16(group) + vec16(server_share)))
        extensions.append(extension(ExtensionType.SUPPORTED_VERSIONS, u16(TLS13)))
        server_hello = messages.server_hello(random, hello.session_id, suite.code, extensions)
        self._transcript.add(server_hello)
        self._out.append(_plaintext_record(ContentType.HANDSHAKE, server_hello))
        self._send_compatibility_ccs(hello)

        schedule = self._key_schedule
        schedule.advance(shared_secret)
        hello_hash = self._transcript.digest()
        self._client_handshake_secret = schedule.derive(b"c hs traffic", hello_hash)
        self._server_handshake_secret = schedule.derive(b"s hs traffic", hello_hash)
        self._read = Protection(suite, self._client_handshake_secret)
        self._write = Protection(suite, self._server_handshake_secret)

    def _send_compatibility_ccs(self, hello: ClientHello) -> None:
        # Middlebox compatibility (RFC 8446 D.4): a client that sent a session
        # id gets one change_cipher_spec after our first hello.
        if hello.session_id and not self._sent_ccs:
            self._out.append(_plaintext_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01"))
            self._sent_ccs = True

    def _send_encrypted_extensions(self, hello: ClientHello, alpn: bytes | None) -> None:
        extensions = []
        advertised = self.config.groups if self.config.advertised_groups is None else self.config.advertised_groups
        if advertised:
            extensions.append(extension(ExtensionType.SUPPORTED_GROUPS, vec16(b"".join(u16(g) for g in advertised))))
        if hello.record_size_limit is not None:
            extensions.append(extension(ExtensionType.RECORD_SIZE_LIMIT, u16(self.config.record_size_limit)))
        if hello.server_name is not None:
            extensions.append(extension(ExtensionType.SERVER_NAME, b""))
        if alpn is not None:
            extensions.append(extension(ExtensionType.ALPN, vec16(vec8(alpn))))
        self._queue_handshake(messages.encrypted_extensions(extensions))

    def _request_signature(self, hello: ClientHello, chain, scheme: SignatureScheme) -> SignatureRequest:
        self._queue_handshake(messages.certificate(chain.der_chain))
        self._session_fields["signature_scheme"] = scheme.name.lower()
        self._signature_request = SignatureRequest(
            handshake_messages=tuple(self._transcript.messages),
            scheme=scheme,
            certificate=chain,
            server_name=hello.server_name,
            cipher_suite=self._suite.code,
            content=certificate_verify_content(self._transcript.digest()),
        )
        self.state = State.WAIT_SIGNATURE
        return self._signature_request

    def _finish_server_flight(self, signature: bytes) -> None:
        request = self._signature_request
        if not verify(request.certificate.public_key, request.scheme, request.content, signature):
            raise InternalError("the signer's signature does not verify against the certificate")
        self._queue_handshake(messages.certificate_verify(request.scheme, signature))
        self._signature_request = None
        self._send_server_finished()

    def _send_server_finished(self) -> None:
        suite = self._suite
        verify_data = finished_mac(suite, self._server_handshake_secret, self._transcript.digest())
        self._queue_handshake(messages.finished(verify_data))
        self._flush_handshake()

        schedule = self._key_schedule
        schedule.advance(None)
        server_finished_hash = self._transcript.digest()
        self._client_application_secret = schedule.derive(b"c ap traffic", server_finished_hash)
        server_application_secret = schedule.derive(b"s ap traffic", server_finished_hash)
        self._expected_client_finished = finished_mac(suite, self._client_handshake_secret, server_finished_hash)
        self._write = Protection(suite, server_application_secret)
        self.state = State.WAIT_FINISHED

    def _receive_client_finished(self, message: bytes, events: list[Event]) -> None:
        if len(message) - 4 != len(self._expected_client_finished):
            raise DecodeError(f"Finished of {len(message) - 4} bytes, not {len(self._expected_client_finished)}")
        if not hmac.compare_digest(message[4:], self._expected_client_finished):
            raise DecryptError("client Finished does not verify")
        self._transcript.add(message)
        self._resumption_master = self._key_schedule.derive(b"res master", self._transcript.digest())
        self._read = Protection(self._suite, self._client_application_secret)
        self._transcript.forget_messages()
        self._key_schedule = None
        self.state = State.CONNECTED
        self._early_data_budget = -1
        self.session = SessionInfo(**self._session_fields)
        for _ in range(self.config.tickets_per_handshake if self.config.tickets else 0):
            self._send_new_session_ticket()
        self._flush_handshake()
        events.append(HandshakeComplete(self.session))

    def _send_new_session_ticket(self) -> None:
        nonce = u16(self._tickets_sent)
        self._tickets_sent += 1
        age_add = int.from_bytes(self._random(4), "big")
        tickets = self.config.tickets
        state = SessionState(
            cipher_suite=self._suite.code,
            psk=resumption_psk(self._suite, self._resumption_master, nonce),
            issued_at_ms=int(self._now() * 1000),
            lifetime=tickets.lifetime,
            age_add=age_add,
            server_name=self.session.server_name,
            alpn=self.session.alpn,
        )
        extensions = []
        if self.config.ticket_early_data_size:
            extensions.append(extension(ExtensionType.EARLY_DATA, u32(self.config.ticket_early_data_size)))
        ticket = tickets.seal(state, self._now())
        self._queue_handshake(messages.new_session_ticket(tickets.lifetime, age_add, nonce, ticket, extensions))

    def _receive_key_update(self, message: bytes, events: list[Event]) -> None:
        if len(message) != 5:
            raise DecodeError("KeyUpdate body is not one byte")
        request = message[4]
        if request not in (KeyUpdateRequest.NOT_REQUESTED, KeyUpdateRequest.REQUESTED):
            raise IllegalParameter(f"KeyUpdate request_update {request}")
        self._read = Protection(self._suite, next_traffic_secret(self._suite, self._read.secret))
        if request == KeyUpdateRequest.REQUESTED and not self._closed_write and not self._key_update_answered:
            self._send_key_update(KeyUpdateRequest.NOT_REQUESTED)
            self._key_update_answered = True
        events.append(KeyUpdateReceived(update_requested=request == KeyUpdateRequest.REQUESTED))

    def _send_key_update(self, request: int) -> None:
        self._queue_handshake(messages.key_update(request))
        self._flush_handshake()
        self._write = Protection(self._suite, next_traffic_secret(self._suite, self._write.secret))

    def _rekey_if_worn(self) -> None:
        if self._write.seq >= RECORDS_PER_KEY and self.version == TLS12:
            self.close()   # TLS 1.2 cannot rekey without renegotiation, which is not done
            raise ConnectionClosed("TLS 1.2 connection worn out its key: closed")
        if self._write.seq >= RECORDS_PER_KEY and self.state is State.CONNECTED:
            self._send_key_update(KeyUpdateRequest.NOT_REQUESTED)

    # --- output -------------------------------------------------------------

    def _queue_handshake(self, message: bytes) -> None:
        if self.state is not State.CONNECTED:  # post-handshake messages are not in the transcript
            self._transcript.add(message)
        self._pending_handshake += message

    def _flush_handshake(self) -> None:
        """Frame the queued handshake bytes into records under the current key."""
        pending = self._pending_handshake
        if not pending:
            return
        step = self._max_send_fragment
        for start in range(0, len(pending), step):
            fragment = bytes(pending[start:start + step])
            if self._write is None:   # TLS 1.2's first flight
                self._out.append(_plaintext_record(ContentType.HANDSHAKE, fragment))
            else:
                self._out.append(self._write.seal(ContentType.HANDSHAKE, fragment))
        pending.clear()


def _plaintext_record(content_type: int, payload: bytes) -> bytes:
    return bytes((content_type, 3, 3)) + len(payload).to_bytes(2, "big") + payload


def _negotiate_version(hello: ClientHello, tls12: bool) -> int:
    """TLS13 when the client offers it (RFC 8446 4.2.1); TLS12 when that is its best and we serve it."""
    version = messages.best_version(hello)
    if version == TLS13:
        if hello.legacy_version != TLS12:
            raise ProtocolVersion(f"ClientHello legacy_version 0x{hello.legacy_version:04x} is not 0x0303")
        return TLS13
    if version is None:
        raise ProtocolVersion("client offers neither TLS 1.3 nor TLS 1.2 (nothing older is served)")
    if not tls12:
        raise ProtocolVersion("client does not offer TLS 1.3, and TLS 1.2 is off")
    return TLS12


def _check_mandatory_extensions(hello: ClientHello) -> None:
    # RFC 8446 9.2 and 4.2.9.
    if (hello.groups is None) != (hello.key_shares is None):
        raise MissingExtension("supported_groups and key_share must come together")
    if hello.groups is None:
        raise MissingExtension("no supported_groups: only (EC)DHE key exchange is offered")
    if hello.psks is not None and hello.psk_modes is None:
        raise MissingExtension("pre_shared_key without psk_key_exchange_modes")


def _empty_hash(suite: Suite) -> bytes:
    return hashlib.new(suite.hash_name).digest()

