"""aiosmtpd with the keyless TLS engine: the one place that touches aiosmtpd's internals.

aiosmtpd's STARTTLS builds an `ssl.SSLContext`-based layer; ours is the
keyless engine. `KeylessSMTP` replaces `smtp_STARTTLS` and relies on these
aiosmtpd 1.4.6 internals (tests/test_starttls_adapter.py fails loudly if
any changes):
- `_tls_protocol` (truthy once TLS is on; aiosmtpd reads `._extra` from it
  when the TLS layer calls `connection_made` again after the handshake),
- `_original_transport` (set before the hand-off, so that second
  `connection_made` is taken as the TLS one and the plaintext buffer is
  cleared, RFC 3207 4.2),
- `_handle_client`, `_reset_timeout`, `_timeout_duration`, `push`,
  `TLSSetupException`, `tls_context` (only its truthiness: STARTTLS is
  offered in EHLO when it is truthy).
It also adds what an MX needs that aiosmtpd lacks: enhanced status codes on
every reply (RFC 2034), a data timeout that restarts with each chunk, a cap on
errors per session, a refusal at greeting, and no AUTH or VRFY.
"""

import asyncio
import logging
import re
from collections.abc import Callable

import aiosmtpd
from aiosmtpd.smtp import SMTP, TLSSetupException

from relay.aio.tls import Signer, TLSServerProtocol
from relay.tls import ServerConfig

log = logging.getLogger("yestls.smtp")

AIOSMTPD_VERSION = "1.4.6"
if aiosmtpd.__version__ != AIOSMTPD_VERSION:  # the internals above are this version's
    raise ImportError(f"relay.aio.starttls is written for aiosmtpd {AIOSMTPD_VERSION}, found {aiosmtpd.__version__}")

_HAS_ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
# RFC 2034 3 / RFC 3463: the class digit follows the reply; the rest by reply
# code, as Postfix sends them. The greeting, EHLO/HELO lines, 354 and 334 carry none.
_ENHANCED = {
    b"221": b"2.0.0", b"250": b"2.0.0", b"251": b"2.1.5", b"252": b"2.0.0",
    b"421": b"4.3.0", b"450": b"4.2.0", b"451": b"4.3.0", b"452": b"4.3.1", b"454": b"4.7.0",
    b"500": b"5.5.2", b"501": b"5.5.4", b"502": b"5.5.1", b"503": b"5.5.1", b"504": b"5.5.4",
    b"530": b"5.7.0", b"550": b"5.1.1", b"551": b"5.1.6", b"552": b"5.3.4", b"553": b"5.1.3",
    b"554": b"5.7.0", b"555": b"5.5.4",
}


def with_enhanced_code(reply: bytes) -> bytes:
    code = reply[:3]
    if _HAS_ENHANCED.match(reply) or code not in _ENHANCED or len(reply) < 4:
        return reply
    return reply[:4] + _ENHANCED[code] + b" " + reply[4:]


class _SMTPTLSProtocol(TLSServerProtocol):
    @property
    def _extra(self) -> dict:
        # aiosmtpd stores this as session.ssl after STARTTLS.
        return {"tls_session": self.engine.session}


class KeylessSMTP(SMTP):
    """aiosmtpd's SMTP with STARTTLS through the keyless engine.

    `tls_setup()` returns (ServerConfig, signer) or None when TLS cannot be
    offered right now (no certificate yet, or the oracle policy says so).
    `admission.admit(smtp)` returns a reply line to close with instead of the
    greeting (too many connections, oracle away), or None; every admitted
    connection is later given to `admission.release(smtp)`.
    """

    def __init__(self, handler, *, tls_setup: Callable[[], tuple[ServerConfig, Signer] | None],
                 admission=None, data_timeout: float = 600.0, handshake_timeout: float = 30.0,
                 max_errors: int = 10, implicit_tls: bool = False,
                 on_refusal: Callable[[str], None] | None = None, **options):
        """`on_refusal(enhanced code)` counts each 4xx/5xx reply the handler did not count itself
        (the handler sets `refusal_counted` when it did)."""
        self._tls_setup = tls_setup
        self._on_refusal = on_refusal
        self.refusal_counted = False
        self._admission = admission
        self._released = False
        self._data_timeout = data_timeout
        self._handshake_timeout = handshake_timeout
        self._max_errors = max_errors
        self._errors = 0
        self._in_data = False
        self._greeting_lines = False
        self.implicit_tls = implicit_tls
        super().__init__(handler, **options)

    # aiosmtpd asks `if self.tls_context` to decide whether to offer STARTTLS.
    @property
    def tls_context(self):
        return not self.implicit_tls and self._tls_setup() is not None

    @tls_context.setter
    def tls_context(self, value) -> None:
        pass  # aiosmtpd's __init__ stores its argument here; ours is tls_setup

    @property
    def tls_session(self):
        """The SessionInfo of this connection's TLS, or None in plaintext."""
        ssl = self.session.ssl if self.session is not None else None
        return ssl.get("tls_session") if ssl else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None and self.transport is None
        if first and self._admission is not None:
            self.peer = transport.get_extra_info("peername")
            refusal = self._admission.admit(self)
            if refusal is not None:
                transport.write(with_enhanced_code(refusal.encode()) + b"\r\n")
                transport.close()
                self.session = None
                return
        super().connection_made(transport)
        if first and self.implicit_tls:
            # The listener's TLS layer is under us already: no STARTTLS, and
            # the session records the TLS parameters as after STARTTLS.
            self._tls_protocol = True
            self.session.ssl = {"tls_session": transport.get_extra_info("tls_session")}
            _log_tls(self.session.peer, self.tls_session)

    def connection_lost(self, error) -> None:
        if self.session is None:  # refused at greeting
            return
        if self._admission is not None and not self._released:
            self._released = True
            self._admission.release(self)
        super().connection_lost(error)

    def eof_received(self):
        if self.session is None:
            return False
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self._in_data:
            self._reset_timeout(self._data_timeout)  # a slow sender gets the timeout per chunk
        super().data_received(data)

    async def push(self, status) -> None:
        reply = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") if isinstance(status, str) else status
        if not self._greeting_lines:
            reply = with_enhanced_code(reply)
        await super().push(reply)
        refusal = reply[:1] in (b"4", b"5")
        if refusal and not self.refusal_counted and self._on_refusal is not None:
            self._on_refusal(reply[4:9].decode("ascii", "replace").strip() or reply[:3].decode())
        self.refusal_counted = False
        if refusal and reply[:3] != b"421":
            self._errors += 1
            if self._errors >= self._max_errors and self.transport is not None:
                await super().push(b"421 4.7.0 Too many errors in this session, goodbye")
                self.transport.close()

    async def smtp_EHLO(self, hostname: str) -> None:
        self._greeting_lines = True  # RFC 2034 3: EHLO and HELO replies carry no enhanced codes
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._greeting_lines = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._greeting_lines = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._greeting_lines = False

    async def smtp_DATA(self, arg: str) -> None:
        self._in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self._in_data = False
        if self.transport is not None:  # not after the connection was lost mid-DATA
            self._reset_timeout()

    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        setup = None if self._tls_protocol else self._tls_setup()
        if setup is None:
            await self.push("454 4.7.0 TLS not available")
            return
        config, signer = setup
        await self.push("220 2.0.0 Ready to start TLS")
        waiter = self.loop.create_future()
        tls = _SMTPTLSProtocol(config, signer, self, handshake_waiter=waiter,
                               handshake_timeout=self._handshake_timeout)
        self._tls_protocol = tls
        self._original_transport = self.transport
        self._original_transport.set_protocol(tls)
        tls.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the handshake failed: aiosmtpd closes the connection
            raise TLSSetupException() from error
        _log_tls(self.session.peer, tls.engine.session)

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push("502 5.5.1 AUTH is not offered: this is an MX, not a submission server")

    async def smtp_VRFY(self, arg: str) -> None:
        await self.push("502 5.5.1 VRFY command is disabled")


def _log_tls(peer, session) -> None:
    # One line per TLS session; its client random is the key to the oracle's
    # audit line for the same handshake (none when resumed: nothing was signed).
    if session is None:
        return
    address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
    log.info("%s: TLS established: %s %s %s sni=%s %s client_random=%s", address, session.version,
             session.cipher_suite, session.group, session.server_name or "-",
             "resumed" if session.resumed else f"signed={session.signature_scheme}", session.client_random.hex())


def implicit_tls_protocol(config_and_signer: Callable[[], tuple[ServerConfig, Signer] | None],
                          smtp_factory: Callable[[], KeylessSMTP], handshake_timeout: float = 30.0):
    """A protocol factory for a listener where TLS starts at once (no STARTTLS)."""
    def factory():
        setup = config_and_signer()
        smtp = smtp_factory()
        if setup is None:
            return _Refuse()
        config, signer = setup
        return TLSServerProtocol(config, signer, smtp, handshake_timeout=handshake_timeout)
    return factory


class _Refuse(asyncio.Protocol):
    """TLS cannot be offered now: close at once; the sender retries later."""

    def connection_made(self, transport) -> None:
        transport.abort()
