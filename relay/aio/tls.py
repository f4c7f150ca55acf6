"""Run the sans-I/O TLS engine over an asyncio transport.

`TLSServerProtocol` is the raw connection's protocol. It feeds the engine,
hands each `SignatureRequest` to an async signer (a local key in tests and in
`yestls tls-serve`, the key oracle on the edge), and once the handshake is done
gives the application protocol a `TLSTransport` that reads and writes
plaintext, like asyncio's own SSL layer does. The bytes given to the
application's `data_received` are wiped when it returns: it copies what it
keeps (mail plaintext must not linger in freed memory).
"""

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Protocol

from relay.scrub import wipe
from relay.tls import (
    CloseNotifyReceived,
    DataReceived,
    HandshakeComplete,
    ServerConfig,
    ServerConnection,
    SignatureRequest,
    Tls12SignatureRequest,
    TLSError,
)
from relay.tls.events import AnySignatureRequest
from relay.tls.signing import sign

log = logging.getLogger("yestls.tls")


class Signer(Protocol):
    async def sign(self, request: AnySignatureRequest) -> bytes: ...


class SignatureDeclined(Exception):
    """The signer would not ask for this signature (the client is over its budget): the handshake
    ends with internal_error, and the signer has already counted and logged it."""


class LocalKeySigner:
    """Signs with private keys held in this process (tests, `yestls tls-serve --key`)."""

    def __init__(self, pairs):
        # pairs: (CertificateChain, private key); looked up by the leaf certificate.
        self._keys = {chain.der_chain[0]: key for chain, key in pairs}

    async def sign(self, request: AnySignatureRequest) -> bytes:
        return sign(self._keys[request.certificate.der_chain[0]], request.scheme, request.content)


class TLSServerProtocol(asyncio.Protocol):
    def __init__(
        self,
        config: ServerConfig,
        signer: Signer,
        app_protocol: asyncio.BaseProtocol,
        *,
        handshake_timeout: float = 30.0,
        sign_timeout: float = 10.0,
        random: Callable[[int], bytes] = os.urandom,
        now: Callable[[], float] = time.time,
        handshake_waiter: asyncio.Future | None = None,
    ):
        """`handshake_waiter`, if given, gets the SessionInfo or the reason the handshake failed."""
        self.engine = ServerConnection(config, random=random, now=now)
        self._signer = signer
        self._app = app_protocol
        self._handshake_timeout = handshake_timeout
        self._sign_timeout = sign_timeout
        self._transport: asyncio.Transport | None = None
        self._tls_transport: TLSTransport | None = None
        self._sign_task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._waiter = handshake_waiter

    # --- raw transport side ---------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._handshake_timeout, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.engine.receive_data(data)
        except TLSError as error:
            self._fail(error)
            return
        for event in events:
            if isinstance(event, DataReceived):
                try:
                    self._app.data_received(event.data)
                finally:
                    wipe(event.data)  # mail plaintext: the application has copied what it keeps
            elif isinstance(event, (SignatureRequest, Tls12SignatureRequest)):
                self._sign_task = asyncio.get_running_loop().create_task(self._sign(event))
            elif isinstance(event, HandshakeComplete):
                self._handshake_done(event)
            elif isinstance(event, CloseNotifyReceived):
                self._peer_closed()
        self._flush()

    def eof_received(self) -> bool:
        self.engine.receive_data(b"")
        if self._tls_transport is not None:
            self._app.eof_received()
        return False  # let asyncio close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._resolve_waiter(ConnectionError("connection lost during the TLS handshake"))
        if self._timer:
            self._timer.cancel()
        if self._sign_task and not self._sign_task.done():
            self._sign_task.cancel()
        if self._tls_transport is not None:
            self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._tls_transport is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._tls_transport is not None:
            self._app.resume_writing()

    # --- handshake ------------------------------------------------------------

    async def _sign(self, request: AnySignatureRequest) -> None:
        try:
            signature = await asyncio.wait_for(self._signer.sign(request), self._sign_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - any signer failure ends this handshake only
            if not isinstance(error, SignatureDeclined):
                log.warning("%s: signer failed (%s: %s); handshake aborted", self._peer(), type(error).__name__,
                            error)
            self.engine.signature_failed()
            self._resolve_waiter(error)
            self._flush()
            self._close_transport()
            return
        if self._closed:
            return
        try:
            self.engine.provide_signature(signature)
        except TLSError as error:
            self._fail(error)
            return
        self._flush()

    def _handshake_done(self, event: HandshakeComplete) -> None:
        if self._timer:
            self._timer.cancel()
        s = event.session
        log.info(
            "%s: %s %s %s%s", self._peer(), s.version, s.cipher_suite, s.group,
            " resumed" if s.resumed else f" {s.signature_scheme}",
        )
        self._tls_transport = TLSTransport(self)
        self._app.connection_made(self._tls_transport)
        self._resolve_waiter(None, event.session)

    def _handshake_timed_out(self) -> None:
        if not self.engine.handshake_complete and not self._closed:
            log.info("%s: handshake timed out", self._peer())
            self._close_transport(abort=True)

    def _peer_closed(self) -> None:
        if self._tls_transport is not None:
            keep_open = self._app.eof_received()
            if keep_open:
                return
        self.engine.close()
        self._flush()
        self._close_transport()

    def _fail(self, error: TLSError) -> None:
        log.info("%s: TLS connection ended: %s", self._peer(), error)
        self._resolve_waiter(error)
        self._flush()
        self._close_transport()

    # --- plumbing -------------------------------------------------------------

    def _resolve_waiter(self, error: Exception | None, session=None) -> None:
        if self._waiter is not None and not self._waiter.done():
            if error is None:
                self._waiter.set_result(session)
            else:
                self._waiter.set_exception(error)

    def _flush(self) -> None:
        data = self.engine.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _close_transport(self, abort: bool = False) -> None:
        if self._transport is not None and not self._transport.is_closing():
            if abort:
                self._transport.abort()
            else:
                self._transport.close()

    def _peer(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "peer"

    @property
    def raw_transport(self) -> asyncio.Transport:
        return self._transport


class TLSTransport(asyncio.Transport):
    """What the application protocol sees: a plaintext transport."""

    def __init__(self, tls: TLSServerProtocol):
        super().__init__({"tls_session": tls.engine.session})
        self._tls = tls
        self._closing = False

    def get_extra_info(self, name, default=None):
        if name in self._extra:
            return self._extra[name]
        return self._tls.raw_transport.get_extra_info(name, default)

    def write(self, data) -> None:
        if self._closing:
            return
        try:
            self._tls.engine.send_data(bytes(data))
        except TLSError as error:
            self._tls._fail(error)
            return
        self._tls._flush()

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._tls.engine.close()
        self._tls._flush()
        self._tls._close_transport()

    def abort(self) -> None:
        self._closing = True
        self._tls._close_transport(abort=True)

    def is_closing(self) -> bool:
        return self._closing or self._tls.raw_transport.is_closing()

    def pause_reading(self) -> None:
        self._tls.raw_transport.pause_reading()

    def resume_reading(self) -> None:
        self._tls.raw_transport.resume_reading()

    def is_reading(self) -> bool:
        return self._tls.raw_transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._tls.raw_transport.get_write_buffer_size()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._tls.raw_transport.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol) -> None:
        self._tls._app = protocol

    def get_protocol(self):
        return self._tls._app


def tls_listener(tls_setup: Callable[[object], tuple[ServerConfig, Signer] | None],
                 app_factory: Callable[[], asyncio.Protocol], *, admit: Callable[[object], bool] | None = None,
                 release: Callable[[object], None] | None = None, handshake_timeout: float = 30.0):
    """A protocol factory for a listener where TLS starts at once (SMTP's implicit TLS, HTTPS).

    `admit(peer)` runs before the handshake (a handshake costs a signature at
    home): False closes the connection at once; an admitted one is given to
    `release(peer)` when it ends, handshake or not. `tls_setup(peer)` is the
    configuration and signer for that client, or None (closed: nothing can be
    said in cleartext on a TLS port, the client sees the close and retries).
    """
    return lambda: _ImplicitTLS(tls_setup, app_factory, admit, release, handshake_timeout)


class _ImplicitTLS(asyncio.Protocol):
    """Admission, then the TLS layer with the application on it; closed at once when either says no."""

    def __init__(self, tls_setup, app_factory, admit, release, handshake_timeout: float):
        self._tls_setup = tls_setup
        self._app_factory = app_factory
        self._admit = admit
        self._release = release
        self._handshake_timeout = handshake_timeout
        self._admitted = False
        self._peer = None
        self._tls: TLSServerProtocol | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._peer = transport.get_extra_info("peername")
        admitted = self._admit is None or self._admit(self._peer)
        self._admitted = admitted and self._admit is not None
        setup = self._tls_setup(self._peer) if admitted else None
        if setup is None:
            self._end_admission()
            transport.abort()
            return
        config, signer = setup
        self._tls = TLSServerProtocol(config, signer, self._app_factory(), handshake_timeout=self._handshake_timeout)
        self._tls.connection_made(transport)

    # The TLS layer does the rest; this protocol stays the transport's, to release the admission at the end.
    def data_received(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.data_received(data)

    def eof_received(self) -> bool:
        return self._tls.eof_received() if self._tls is not None else False

    def pause_writing(self) -> None:
        if self._tls is not None:
            self._tls.pause_writing()

    def resume_writing(self) -> None:
        if self._tls is not None:
            self._tls.resume_writing()

    def connection_lost(self, exc) -> None:
        if self._tls is not None:
            self._tls.connection_lost(exc)
        self._end_admission()

    def _end_admission(self) -> None:
        if self._admitted and self._release is not None:
            self._release(self._peer)
        self._admitted = False
