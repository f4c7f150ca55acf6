"""aiosmtpd's verbs on our own connection, command loop and TLS: the one place that touches aiosmtpd's internals.

aiosmtpd's STARTTLS builds an `ssl.SSLContext`-based layer; ours is the
keyless engine. And aiosmtpd reads with `readuntil(b"\n")`, which takes a
bare LF for a line end, and holds a whole message in memory before its
handler sees it. So `KeylessSMTP` owns its input: every byte goes through
relay/smtp/input.py first (a bare CR or LF ends the session with 521 5.5.2,
before anything after it is read), only checked command lines are run, and
DATA content goes straight from the socket (or the TLS layer) to the
handler's sink, sealed as it arrives. After a DATA, BDAT or STARTTLS command
line, input is held until that command is answered: the content after a
354, the TLS records after a 220, and whatever a client pipelined behind a
refused one are never mistaken for commands, and plaintext sent behind
STARTTLS is discarded (RFC 3207 4.2).

It owns the connection too (aiosmtpd's `connection_made`, `connection_lost`,
`eof_received` and its command loop `_handle_client` are never run): no
stream reader or writer and no task per session. Commands run as their lines
arrive, in the call that read them; a command that must wait (DATA for its
content and commit, STARTTLS for its handshake, a hook that asks DNS) goes
on in a task from where it stopped (`_step`, `_finish`: Python 3.12's eager
tasks by hand) and the lines behind it wait. An idle session holds 4.8 KiB
where aiosmtpd's loop held 7.5; a message's CPU is a few percent lower
(docs/edge.md, "What runs where").

What is left of aiosmtpd is its verbs (HELO, MAIL, RCPT, RSET, NOOP, HELP,
EXPN: their syntax checks and replies; EHLO is ours, with aiosmtpd's lines)
and its session and envelope. They rely on these aiosmtpd 1.4.6 internals
(tests/aio/test_starttls_adapter.py fails loudly if any changes):
- `_tls_handshake_okay` (aiosmtpd's STARTTLS hook result; always true here),
  `_create_session` and `_set_rset_state` (a new session and envelope at
  connection_made, and again after STARTTLS), `_call_handler_hook` (QUIT's
  hook, as aiosmtpd's QUIT calls it), `handle_exception` (the answer to a
  command that raised),
- `_reset_timeout` (replaced: one timer per session follows the deadline
  lazily), `_timeout_handle` (that timer), `_timeout_cb` (closes the
  connection), `_timeout_duration`, `push` (replaced: the verbs answer
  through it; it writes at once), `TLSSetupException`,
- `command_size_limit` (a command line longer than this is refused without
  being run, so no input is held after it) and `line_length_limit` (one
  longer than this is not even kept), `check_helo_needed`,
  `check_auth_needed`, `_set_post_data_state`, `envelope` (what aiosmtpd's
  own DATA command does before and after the content, which we replace),
- `__init__`, not called: KeylessSMTP sets the state it sets, for the
  options the edge uses, with the verbs (`smtp_*`), built-in AUTH
  mechanisms (`auth_*`) and the handler's hooks (`handle_*`) found once per
  class and handler, where aiosmtpd finds them with `inspect.getmembers()`,
  `dir()` and `inspect.signature()` for each new session (a sixth of a
  plain message's CPU); the test compares both states,
- `_getaddr` and `local_part_limit` (a fast path for the plain `<local@domain>`
  most senders write; anything else goes to aiosmtpd's parser, and
  tests/aio/test_starttls_adapter.py checks that both agree).
It also adds what an MX needs that aiosmtpd lacks: enhanced status codes on
every reply (RFC 2034), a data timeout that restarts with each chunk, a cap on
errors per session, a refusal at greeting, and no AUTH or VRFY.

The door's protocol checks live here too, since they are about bytes and
their timing (policy: relay/edge/door.py): with `door.greet_wait` the
banner waits and a client that talks first is refused (pregreet); with
`door.pipelining`, until EHLO is answered, a command sent before the reply
to the last one (the banner counts) is refused. Either gets `554 5.5.1` and
the end.
"""

import asyncio
import functools
import inspect
import logging
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import aiosmtpd
import aiosmtpd.smtp
from aiosmtpd.smtp import (
    DATA_SIZE_DEFAULT,
    MISSING,
    SMTP,
    TLSSetupException,
    _AuthMechAttr,
    login_always_fail,
    syntax,
)

from relay.aio.tls import Signer, TLSServerProtocol
from relay.edge.door import DoorReason
from relay.scrub import wipe
from relay.smtp.input import CommandScanner, DataReader, Hold, Violation
from relay.tls import ServerConfig

log = logging.getLogger("yestls.smtp")

AIOSMTPD_VERSION = "1.4.6"
if aiosmtpd.__version__ != AIOSMTPD_VERSION:  # the internals above are this version's
    raise ImportError(f"relay.aio.starttls is written for aiosmtpd {AIOSMTPD_VERSION}, found {aiosmtpd.__version__}")

# `<dot-atom@domain>` then nothing, or a space and parameters: what the email parser (aiosmtpd's, ~0.6 ms a
# command) would return unchanged. Quoted local parts, comments, routes, literals, non-ASCII: the parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLAIN_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*)>(?:$| +(?=[^ (\t\r\n])([^\t\r\n(]*)$)")
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


# Input waiting beyond this (held after a DATA/BDAT/STARTTLS line, or command lines behind a command that is
# waiting) stops reading from the client until it is taken (see _regulate_reading).
HELD_INPUT_LIMIT = 64 * 1024
RECEIVE_BUFFER = 64 * 1024
_RECEIVE = threading.local()   # the receive buffer of each thread's event loop (see KeylessSMTP.get_buffer)
# What `open_message` may answer instead of a sink; and the replies for content refused after its end.
_CONTENT_REFUSALS = {
    Violation.TOO_BIG: "552 5.3.4 Message too big for system",
    Violation.NUL: "554 5.6.0 Message refused: it contains NUL bytes",
}


class MessageSink(Protocol):
    """Where DATA content goes as it arrives (the edge: the sealed spool); given by the handler's `open_message`."""

    def write(self, piece: memoryview) -> None:
        """More content, valid only during the call. Failures are the sink's to remember, not to raise."""

    async def finish(self) -> str:
        """The content is complete: the reply to send (250 once it is durable)."""

    def abort(self) -> None:
        """The message is refused or the connection lost: forget it."""


# Unknown commands a session may send before it is ended (aiosmtpd's BOGUS_LIMIT).
MAX_UNKNOWN_COMMANDS = 5


class _Refusal(Enum):
    """A command line refused before its verb is looked up."""

    EMPTY = "500 Error: bad syntax"
    NOT_ASCII = "500 Error: strict ASCII mode"


def _command(line: bytes, utf8: bool) -> "tuple[str, str | None] | _Refusal":
    """A command line (with its CRLF) as (VERB, argument), as aiosmtpd reads one: the argument None when there
    is none, "" when it is only spaces; UTF-8 with surrogate escapes (a byte that is not UTF-8 comes back
    unchanged), or ASCII without SMTPUTF8. Or why it is refused."""
    line = line.rstrip(b"\r\n")
    if not line:
        return _Refusal.EMPTY
    verb, _, arg = line.partition(b" ")
    if not verb.isascii():
        return _Refusal.EMPTY
    verb = verb.upper().decode("ascii")
    if not arg:
        return verb, None
    arg = arg.strip()
    if utf8:
        return verb, arg.decode("utf-8", "surrogateescape")
    if not arg.isascii():
        return _Refusal.NOT_ASCII
    return verb, arg.decode("ascii")


class KeylessSMTP(SMTP, asyncio.BufferedProtocol):
    """aiosmtpd's SMTP with STARTTLS through the keyless engine.

    `tls_setup(peer)` returns (ServerConfig, signer for that client) or None
    when TLS cannot be offered right now (no certificate yet, or the oracle
    policy says so). `admission` (an Admission) decides at the greeting and
    at each STARTTLS; on an implicit-TLS listener, relay.aio.tls.tls_listener
    admits before the handshake and this class is given no admission.
    """

    def __init__(self, handler, *, tls_setup: Callable[[object], tuple[ServerConfig, Signer] | None],
                 admission=None, data_timeout: float = 600.0, handshake_timeout: float = 30.0,
                 max_errors: int = 10, implicit_tls: bool = False,
                 on_refusal: Callable[[str], None] | None = None, door=None, hostname: str,
                 ident: str | None = None, data_size_limit: int | None = DATA_SIZE_DEFAULT,
                 enable_SMTPUTF8: bool = False, decode_data: bool = False, timeout: float = 300.0,
                 loop: asyncio.AbstractEventLoop | None = None):
        """`on_refusal(enhanced code)` counts each 4xx/5xx reply the handler did not count itself
        (the handler sets `refusal_counted` when it did). The handler's `open_message(server, session,
        envelope)` returns a MessageSink for DATA content, or a reply that refuses the DATA command."""
        self._tls_setup = tls_setup
        self._on_refusal = on_refusal
        self.refusal_counted = False
        self._admission = admission
        self._released = False
        self._data_timeout = data_timeout
        self._handshake_timeout = handshake_timeout
        self._max_errors = max_errors
        self._errors = 0
        self._greeting_lines = False
        self.implicit_tls = implicit_tls
        self.peer = None  # the client's (host, port), once connected
        self._scanner = CommandScanner(SMTP.command_size_limit)
        self._held: list[bytearray] | None = None  # input after a DATA/BDAT/STARTTLS line, until it is answered
        self._reading_paused = False
        self._content: DataReader | None = None  # reading DATA content, into:
        self._content_sink: MessageSink | None = None
        self._content_read: asyncio.Future | None = None
        self._door: DoorChecks | None = door
        self._greeted = False         # the banner is sent (pregreet: input before it is refused)
        self._may_pipeline = False    # EHLO was answered (RFC 2920: pipelining only after that)
        self._awaiting_reply = True   # a command (or the banner) is not yet answered
        self._continued: list[bytes] = []   # the lines so far of a multi-line reply
        self._unsent = bytearray()          # replies held back while pipelined commands wait (see push)
        self._deadline = 0.0          # when an idle session is closed (loop time; see _reset_timeout)
        self._timer_armed = False     # aiosmtpd's _timeout_handle is scheduled, for _timeout_due
        # The command loop (see _run_lines): complete command lines waiting to run (None: one too long to keep),
        # the current line's bytes so far, and the command that is waiting for something, if any.
        self._lines: deque[bytes | None] = deque()
        self._lines_bytes = 0         # their length, for _regulate_reading
        self._partial = bytearray()
        self._overlong = False        # the current line passed line_length_limit: its bytes are dropped
        self._running: asyncio.Task | None = None
        self._dispatching = False     # _run_lines is on the stack (a command may feed it more lines)
        self._unknown_left = MAX_UNKNOWN_COMMANDS
        self._write_paused = False    # the transport's buffer is over its high-water mark (flow control)
        self._writable: asyncio.Future | None = None   # a push waiting for it to drain
        self._set_aiosmtpd_state(handler, loop or asyncio.get_running_loop(), hostname=hostname, ident=ident,
                                 data_size_limit=data_size_limit, enable_SMTPUTF8=enable_SMTPUTF8,
                                 decode_data=decode_data, timeout=timeout)

    def _set_aiosmtpd_state(self, handler, loop: asyncio.AbstractEventLoop, *, hostname: str, ident: str | None,
                            data_size_limit: int | None, enable_SMTPUTF8: bool, decode_data: bool,
                            timeout: float) -> None:
        """What aiosmtpd's SMTP.__init__ sets, for the options the edge uses (no AUTH, no PROXY, no call
        limit, no require_starttls), without its lookups on every new session: it finds the verbs, AUTH
        mechanisms and handler hooks with inspect.getmembers() and dir() and reads the EHLO hook's
        signature, a sixth of a plain message's CPU. Here they are found once per class and handler
        (_lookups); tests/aio/test_starttls_adapter.py checks that this sets what SMTP.__init__ sets."""
        lookups = _lookups(type(self), handler)
        self.__ident__ = ident or aiosmtpd.smtp.__ident__
        self.loop = loop
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.command_size_limits.clear()
        self.hostname = hostname
        self.require_starttls = None   # as SMTP.__init__ leaves it without a tls_context: falsy
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = {mechanism: _AuthMechAttr(getattr(self, name), True)
                              for mechanism, name in lookups.auth_mechanisms}
        self._handle_hooks = lookups.hooks
        self._ehlo_hook_ver = lookups.ehlo_hook_ver
        self._smtp_methods = {verb: getattr(self, name) for verb, name in lookups.verbs}
        self._enforce_call_limit = False

    # aiosmtpd asks `if self.tls_context` to decide whether to offer STARTTLS.
    @property
    def tls_context(self):
        return not self.implicit_tls and self._tls_setup(self.peer) is not None

    @tls_context.setter
    def tls_context(self, value) -> None:
        pass  # aiosmtpd's __init__ stores its argument here; ours is tls_setup

    @property
    def tls_session(self):
        """The SessionInfo of this connection's TLS, or None in plaintext."""
        ssl = self.session.ssl if self.session is not None else None
        return ssl.get("tls_session") if ssl else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The connection (or, after STARTTLS, the TLS layer over it): a new session, as aiosmtpd starts one."""
        first = self._original_transport is None and self.transport is None
        if first:
            self.peer = transport.get_extra_info("peername")
        if first and self._admission is not None:
            refusal = self._admission.admit(self.peer, implicit_tls=False)
            if refusal is not None:
                transport.write(with_enhanced_code(refusal.encode()) + b"\r\n")
                transport.close()
                self.session = None
                return
        self._set_rset_state()
        self.session = self._create_session()
        self.session.peer = transport.get_extra_info("peername")
        self._reset_timeout()
        self.transport = transport
        if not first:
            # After STARTTLS (RFC 3207 4.2): nothing the client sent in plaintext is run; a new session.
            self._lines.clear()
            self._lines_bytes = 0
            self._partial.clear()
            self._overlong = False
            self.session.ssl = {"tls_session": transport.get_extra_info("tls_session")}
            return
        if self._door is not None:
            self._door.connected(self.peer[0] if isinstance(self.peer, tuple) else "unknown")
        if self.implicit_tls:
            # The listener's TLS layer is under us already: no STARTTLS, and
            # the session records the TLS parameters as after STARTTLS.
            self._tls_protocol = True
            self.session.ssl = {"tls_session": transport.get_extra_info("tls_session")}
            _log_tls(self.session.peer, self.tls_session)
        self._step(self._greet())

    def connection_lost(self, error) -> None:
        if self.session is None:  # refused at greeting
            return
        if self._content_sink is not None:  # gone mid-DATA: the message is forgotten now, not a turn later
            self._content_sink.abort()
        if self._admission is not None and not self._released:
            self._released = True
            self._admission.release(self.peer)
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
            self._timer_armed = False
        # After STARTTLS the transport is the TLS layer's: the socket's own is closed here.
        if self._original_transport is not None:
            self._original_transport.close()
        if self._running is not None:
            self._running.cancel()
        self._lines.clear()
        self._lines_bytes = 0
        self.transport = None
        self._wake_writer()

    def eof_received(self) -> bool:
        """The client sent its last byte: what it sent is answered (it ran as it arrived); then the end."""
        if self._running is not None:
            self._running.cancel()
        return False

    # Flow control: a push waits while the transport holds more than its high-water mark of replies.
    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # aiosmtpd re-arms its timer on every command (a new TimerHandle, the old one cancelled), and we on
    # every chunk of DATA. Here the deadline moves and one timer follows it lazily: a timer that fires
    # before the deadline re-arms for the rest; only a deadline brought forward re-arms it at once.
    def _reset_timeout(self, duration: float | None = None) -> None:
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        if not self._timer_armed or self._deadline < self._timeout_handle.when():
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)
            self._timer_armed = True

    def _timeout_due(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)
        else:
            self._timer_armed = False
            if self._unsent and self.transport is not None:
                self._write_now(b"")
            self._timeout_cb()

    # --- input ------------------------------------------------------------------------------

    # Plaintext from the socket lands in one buffer (asyncio's BufferedProtocol: recv_into), is wiped as
    # soon as it is read, and only the pieces that must be kept are copied. The buffer is the event loop's
    # (one per thread), shared by all its connections: asyncio calls get_buffer, recv_into and
    # buffer_updated in one go, and buffer_updated has read and wiped what landed before it returns, so
    # no connection's bytes wait in it. (A buffer per connection was 64 KiB of every idle session's RSS.)
    def get_buffer(self, sizehint: int) -> memoryview:
        buffer = getattr(_RECEIVE, "buffer", None)
        if buffer is None:
            buffer = _RECEIVE.buffer = memoryview(bytearray(RECEIVE_BUFFER))
        return buffer

    def buffer_updated(self, nbytes: int) -> None:
        buffer = _RECEIVE.buffer
        try:
            self._input(buffer.obj, nbytes)
        finally:
            wipe(buffer, nbytes)

    def data_received(self, data: bytes) -> None:
        """From the TLS layer: the plaintext of its records."""
        self._input(data, len(data))

    def _input(self, data, end: int) -> None:
        """`data[:end]` (bytes or bytearray) as the client sent it."""
        if self.session is None or self.transport is None or self.transport.is_closing():
            return  # refused at greeting, or ending: nothing more is read
        if self._door is not None and self._content is None and self._held is None and self._door_refuses(data, end):
            return
        if self._content is not None:
            self._reset_timeout(self._data_timeout)  # a slow sender gets the timeout per chunk
            self._read_content(data, 0, end)
        elif self._held is not None:
            self._hold(data, 0, end)
        else:
            self._read_commands(data, 0, end)

    def _door_refuses(self, data, end: int) -> bool:
        """The pregreet and pipelining checks on command input (relay/edge/door.py); True when refused."""
        if end <= 0:
            return False
        if not self._greeted and self._door.greet_wait > 0:
            self._door_refusal(DoorReason.PREGREET, "talking before the greeting")
            return True
        if self._door.pipelining and not self._may_pipeline:
            line_ends = data.count(b"\n", 0, end)
            if self._awaiting_reply or line_ends > 1 or (line_ends == 1 and data[end - 1] != LF_BYTE):
                self._door_refusal(DoorReason.PIPELINING, "a command before the reply to the last one "
                                                          "(PIPELINING only after EHLO)")
                return True
            if line_ends == 1:
                self._awaiting_reply = True
        return False

    def _door_refusal(self, reason: DoorReason, why: str) -> None:
        log.info("%s: %s: refused at the door (%s)", _address(self.peer), why, reason.value)
        self._door.refused(reason)
        if self._on_refusal is not None:
            self._on_refusal("5.5.1")
        self._write_now(f"554 5.5.1 Protocol error: {why}\r\n".encode())
        self.transport.close()

    # --- the command loop ---------------------------------------------------------------------------------

    # Commands run as their lines arrive, in the call that read them, one after the other: most need nothing
    # but the session's state and finish at once, with no task, no stream reader and no turn of the event loop.
    # A command that must wait (DATA for its content and the commit, STARTTLS for the handshake, a hook that
    # asks DNS) goes on in a task from where it stopped (_finish); the lines behind it wait their turn.

    async def _greet(self) -> None:
        """The banner, after the door's greet wait (input during it is a pregreet: relay/edge/door.py)."""
        wait = self._door.greet_wait if self._door is not None else 0
        if wait > 0:
            await asyncio.sleep(wait)
            if self.transport is None or self.transport.is_closing():
                return
        self._greeted = True
        await self.push(f"220 {self.hostname} {self.__ident__}")

    def _take_lines(self, data, start: int, end: int) -> None:
        """`data[start:end]`, checked command input (CRLF line ends only), as lines for _lines. A line longer
        than line_length_limit is not kept: its bytes are dropped as they come and it is answered as too long."""
        while start < end:
            lf = data.find(b"\n", start, end)
            stop = end if lf < 0 else lf + 1
            if not self._overlong:
                self._partial += memoryview(data)[start:stop]
                if len(self._partial) > self.line_length_limit:
                    self._overlong = True
                    self._partial.clear()
            if lf >= 0:
                self._lines.append(None if self._overlong else bytes(self._partial))
                self._lines_bytes += len(self._partial) or 1
                self._partial.clear()
                self._overlong = False
            start = stop
        self._regulate_reading()

    def _run_lines(self) -> None:
        """Run the waiting command lines, in order, until one must wait or the session ends."""
        if self._dispatching:
            return   # a command fed more lines (held input released): the loop below takes them
        self._dispatching = True
        try:
            while self._lines and self._running is None and self.transport is not None \
                    and not self.transport.is_closing():
                line = self._lines.popleft()
                self._lines_bytes -= len(line) if line else 1
                self._step(self._run_line(line))
        finally:
            self._dispatching = False
        self._regulate_reading()

    def _step(self, command) -> None:
        """Run a command's coroutine until it finishes or must wait; then it finishes in a task of its own."""
        try:
            waiting = command.send(None)
        except StopIteration:
            return
        self._running = self.loop.create_task(_finish(command, waiting))
        self._running.add_done_callback(self._command_done)

    def _command_done(self, task: asyncio.Task) -> None:
        if task is not self._running:
            return
        self._running = None
        if not task.cancelled() and task.exception() is not None:   # _run_line answers every error: a bug
            log.error("%s: a command failed: %r", _address(self.peer), task.exception())
        self._run_lines()

    async def _run_line(self, line: bytes | None) -> None:
        """One command line (with its CRLF; None: too long to keep): refused, or run by its verb's method.
        aiosmtpd's loop for what the edge uses of it (no PROXY, no call limits, no require_starttls), without
        its logging of every line and with each command's line limit kept per session."""
        try:
            if line is None:
                await self.push("500 Command line too long")
                return
            parsed = _command(line, self.enable_SMTPUTF8)
            if isinstance(parsed, _Refusal):
                await self.push(parsed.value)
                return
            verb, arg = parsed
            if len(line) - 2 > self._line_limit(verb):
                await self.push("500 Command line too long")
                return
            if not self._tls_handshake_okay and verb != "QUIT":
                await self.push("554 Command refused due to lack of security")
                return
            method = self._smtp_methods.get(verb)
            if method is None:
                self._unknown_left -= 1
                if self._unknown_left < 1:
                    await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                    self.transport.close()
                    return
                await self.push(f'500 Error: command "{verb}" not recognized')
                return
            self._reset_timeout()
            await method(arg)
        except asyncio.CancelledError:
            raise   # the connection is gone
        except ConnectionResetError:
            if self.transport is not None:
                self.transport.close()
        except TLSSetupException as error:
            self.transport.close()
            self.connection_lost(error)
        except Exception as error:  # noqa: BLE001 - a bug in a command answers 451; the session goes on
            try:
                status = await self.handle_exception(error)
            except Exception:  # noqa: BLE001
                log.exception("%s: while answering an exception", _address(self.peer))
                status = "500 Error: Cannot describe error"
            if self.transport is not None:
                await self.push(status)

    def _line_limit(self, verb: str) -> int:
        """The longest command line, without its CRLF, as aiosmtpd counts (RFC 5321 4.5.3.1.4: 512 octets);
        after EHLO, MAIL may carry SIZE= (26 more, RFC 1870) and SMTPUTF8 (10 more, RFC 6531). aiosmtpd keeps
        these in one dict of its class, grown by every session's EHLO: here they are this session's."""
        limit = SMTP.command_size_limit
        if verb == "MAIL" and self.session.extended_smtp:
            limit += (26 if self.data_size_limit else 0) + (10 if self.enable_SMTPUTF8 else 0)
        return limit

    def _read_commands(self, data, start: int, end: int) -> None:
        """Checked command lines, run, up to a bare CR/LF (the end) or a line to hold input after."""
        while start < end:
            scan = self._scanner.scan(data, start, end)
            if scan.end > start:
                self._take_lines(data, start, scan.end)
            if isinstance(scan.stop, Violation):
                self._run_lines()   # the commands before it, then the end
                self._bare_line_end(scan.stop)
                return
            if isinstance(scan.stop, Hold):
                self._held = []
                self._hold(data, scan.end, end)
                break
            start = scan.end
        self._run_lines()

    def _hold(self, data, start: int, end: int) -> None:
        if start < end:
            self._held.append(bytearray(memoryview(data)[start:end]))  # pieces: never grown, so never moved
        self._regulate_reading()

    def _take_held(self) -> list[bytearray]:
        """The held input, for the command that was answered; reading from the client goes on."""
        held, self._held = self._held or [], None
        self._regulate_reading()
        return held

    def _regulate_reading(self) -> None:
        """Reading from the client stops while more than HELD_INPUT_LIMIT bytes of its input wait (held after
        a DATA, BDAT or STARTTLS line, or command lines behind a command that is waiting), and goes on once
        they are taken: however fast a client sends, a session keeps no more than that."""
        if self.transport is None:
            return
        waiting = self._lines_bytes + (sum(map(len, self._held)) if self._held else 0)
        if waiting > HELD_INPUT_LIMIT and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif waiting <= HELD_INPUT_LIMIT and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def _replay(self, held: list[bytearray]) -> None:
        """Held input, read now as if it had just arrived (content, commands, or held again); then wiped."""
        for piece in held:
            self._input(piece, len(piece))
            wipe(piece)

    def _release_held(self) -> None:
        """The held-after command was refused: what came after it is commands again."""
        if self._held is not None:
            self._replay(self._take_held())

    def _read_content(self, data, start: int, end: int) -> None:
        reader = self._content
        used = reader.feed(data, start, end)
        if not reader.done:
            return
        sink, self._content, self._content_sink = self._content_sink, None, None
        if not self._content_read.done():
            self._content_read.set_result(reader)
        if reader.violation is not None and reader.violation.ends_session:
            sink.abort()                           # at once: the plaintext read so far is wiped
            self._bare_line_end(reader.violation)  # and not one more byte is read
        else:
            self._read_commands(data, used, end)   # what the client pipelined after the final dot

    def _bare_line_end(self, violation: Violation) -> None:
        """RFC 5321 2.3.8: no bare CR or LF. Nothing after it is read; the session ends (as Postfix's 521)."""
        peer = self.session.peer if self.session is not None else None
        log.info("%s: %s received: closing the session", _address(peer), violation.value)
        if self._door is not None:
            self._door.refused(DoorReason.BARE_NEWLINE)
        if self._on_refusal is not None:
            self._on_refusal("5.5.2")
        if self.transport is not None and not self.transport.is_closing():
            self._write_now(f"521 5.5.2 {self.hostname} Error: {violation.value} received; lines end "
                            f"with CRLF (RFC 5321 2.3.8)\r\n".encode())
            self.transport.close()

    # Replies to pipelined commands (RFC 2920 3.2: the server may buffer them while more commands are
    # waiting) go out together: a 250 is held back while the client's next command is already waiting to
    # run, and leaves with the next reply (MAIL, RCPT and DATA pipelined: one write for the three, not
    # three). Only 250s are held (a 221 or a refusal may be followed by the end of the session), and
    # never the 250 for a message's content: a client that hears it at once need not send it again.
    # Every write of ours sends what is held first.
    async def push(self, status) -> None:
        """aiosmtpd's verbs answer with it: the reply is written at once; it waits only while the transport's
        buffer is over its high-water mark (a client that does not read its replies)."""
        self._reply(status, may_hold=True)
        while self._write_paused and self.transport is not None:
            if self._writable is None:
                self._writable = self.loop.create_future()
            await self._writable

    def _command_waiting(self) -> bool:
        return bool(self._lines)

    def _write_now(self, data: bytes) -> None:
        """A write outside push (a refusal that ends the session): the replies held back go first."""
        if self._unsent:
            data, self._unsent = bytes(self._unsent) + data, bytearray()
        self.transport.write(data)

    def _reply(self, status, *, may_hold: bool) -> None:
        reply = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") if isinstance(status, str) else status
        if not self._greeting_lines:
            reply = with_enhanced_code(reply)
        if reply[3:4] == b"-":   # a multi-line reply (EHLO's) goes out whole, in one write, with its last line
            self._continued.append(reply + b"\r\n")
            return
        if self._continued:
            reply, self._continued = b"".join(self._continued) + reply, []
        self._awaiting_reply = False   # a reply's last line: the client may send its next command
        if may_hold and reply[:4] == b"250 " and self._command_waiting():
            self._unsent += reply + b"\r\n"
            self.refusal_counted = False
            return
        if self._unsent:
            reply, self._unsent = bytes(self._unsent) + reply, bytearray()
        self._send(reply)
        refusal = reply[:1] in (b"4", b"5")
        if refusal and not self.refusal_counted and self._on_refusal is not None:
            self._on_refusal(reply[4:9].decode("ascii", "replace").strip() or reply[:3].decode())
        self.refusal_counted = False
        if refusal and reply[:3] != b"421":
            self._errors += 1
            if self._errors >= self._max_errors and self.transport is not None:
                self._send(b"421 4.7.0 Too many errors in this session, goodbye")
                self.transport.close()

    def _send(self, reply: bytes) -> None:
        if self.transport is not None:
            self.transport.write(reply + b"\r\n")

    async def smtp_EHLO(self, hostname: str) -> None:
        """aiosmtpd's EHLO (the same lines, then the handler's hook) with its reply written in one go, and no
        AUTH line after STARTTLS: an MX offers no AUTH (smtp_AUTH refuses it)."""
        if not hostname:
            await self.push("501 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        self.session.extended_smtp = True
        lines = [f"250-{self.hostname}"]
        if self.data_size_limit:
            lines.append(f"250-SIZE {self.data_size_limit}")
        if not self._decode_data:
            lines.append("250-8BITMIME")
        if self.enable_SMTPUTF8:
            lines.append("250-SMTPUTF8")
        if self.tls_context and not self._tls_protocol:
            lines.append("250-STARTTLS")
        lines.append("250 HELP")
        if self._ehlo_hook_ver is None:
            self.session.host_name = hostname
        else:
            lines = await self._call_handler_hook("EHLO", hostname, lines)
        # One write for all the lines, with no enhanced codes (RFC 2034 3: not on EHLO's or HELO's reply).
        self._continued.append("".join(line + "\r\n" for line in lines[:-1]).encode("ascii"))
        self._greeting_lines = True
        try:
            await self.push(lines[-1])
        finally:
            self._greeting_lines = False
        self._may_pipeline = True

    async def smtp_HELO(self, hostname: str) -> None:
        self._greeting_lines = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._greeting_lines = False

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's checks, then the content streamed to the handler's sink instead of held in memory."""
        handed_over = False  # the held input went to this message (after it, a new hold is the next command's)
        try:
            if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
                return
            if not self.envelope.rcpt_tos:
                await self.push("503 5.5.1 Error: need RCPT command")
                return
            if arg:
                await self.push("501 5.5.4 Syntax: DATA")
                return
            sink = await self.event_handler.open_message(self, self.session, self.envelope)
            if isinstance(sink, str):
                await self.push(sink)
                return
            handed_over = True
            await self._read_message(sink)
        finally:
            if not handed_over:
                self._release_held()  # refused: what was held after DATA is commands again

    async def _read_message(self, sink: MessageSink) -> None:
        self._content = DataReader(sink.write, self.data_size_limit)
        self._content_sink = sink
        self._content_read = read = self.loop.create_future()
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            self._reset_timeout(self._data_timeout)
            self._replay(self._take_held())
            reader = await read
        except BaseException:
            self._content = self._content_sink = None
            sink.abort()
            raise
        self._set_post_data_state()
        if reader.violation is None:
            reply = await sink.finish()
        else:
            sink.abort()
            if reader.violation.ends_session:
                return  # answered with 521 and closed as soon as it was read
            reply = _CONTENT_REFUSALS[reader.violation]
        if self.transport is not None:  # not after the connection was lost while the message was committed
            self._reply(reply, may_hold=False)
            self._reset_timeout()

    async def smtp_BDAT(self, arg: str) -> None:
        """No CHUNKING is offered: the chunk after this line is content, never commands. Refused, and the end."""
        self._held = None  # the chunk's bytes are dropped, unread
        await self.push("502 5.5.1 BDAT is not offered here (no CHUNKING); send with DATA")
        if self.transport is not None:
            self.transport.close()

    async def smtp_STARTTLS(self, arg: str) -> None:
        if not await self._starttls(arg):
            self._release_held()  # refused: what came after the command is commands

    async def _starttls(self, arg: str) -> bool:
        """True once the TLS layer has the connection (the handshake may still fail); False if refused."""
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return False
        setup = None if self._tls_protocol else self._tls_setup(self.peer)
        if setup is None:
            await self.push("454 4.7.0 TLS not available")
            return False
        refusal = self._admission.starttls(self.peer) if self._admission is not None else None
        if refusal is not None:
            await self.push(refusal)
            return False
        config, signer = setup
        # RFC 3207 4.2: what the client sent behind STARTTLS before our 220 is discarded, never run;
        # what comes after the 220 is TLS, held until the TLS layer takes over the connection.
        self._held = []
        self._scanner.reset()
        await self.push("220 2.0.0 Ready to start TLS")
        waiter = self.loop.create_future()
        tls = TLSServerProtocol(config, signer, self, handshake_waiter=waiter,
                               handshake_timeout=self._handshake_timeout)
        self._tls_protocol = tls
        self._original_transport = self.transport
        self._original_transport.set_protocol(tls)
        tls.connection_made(self._original_transport)
        for early in self._take_held():
            tls.data_received(early)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the handshake failed: aiosmtpd closes the connection
            raise TLSSetupException() from error
        if self._admission is not None:
            self._admission.tls_established(self.peer)
        _log_tls(self.session.peer, tls.engine.session)
        return True

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """MAIL's and RCPT's path and the rest: `<local@domain>` by a regular expression, else aiosmtpd's
        parser (the same answer, tested). A path that parser crashes on is malformed, as one it refuses:
        `553 5.1.3`, not a `451` (retry: forever) and a traceback. Python's email parser was written for
        header fields, not for hostile input: `<` raises IndexError, `<a@[ ` AttributeError or
        UnboundLocalError; whatever it raises, the path is not one we can take."""
        plain = _PLAIN_PATH.fullmatch(arg)
        if plain is None:
            try:
                return super()._getaddr(arg)
            except Exception as error:  # noqa: BLE001 - see above: a malformed path, answered as one
                log.info("%s: a path the email parser fails on (%s): %r", _address(self.peer),
                         type(error).__name__, arg[:100])
                return None, None
        address = plain.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, plain.group(2) or ""

    async def smtp_QUIT(self, arg: str) -> None:
        """aiosmtpd's, without its command task: the lines after QUIT are never run (the transport is closing)."""
        if arg:
            await self.push("501 Syntax: QUIT")
            return
        status = await self._call_handler_hook("QUIT")
        await self.push("221 Bye" if status is MISSING else status)
        self.transport.close()

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push("502 5.5.1 AUTH is not offered: this is an MX, not a submission server")

    async def smtp_VRFY(self, arg: str) -> None:
        await self.push("502 5.5.1 VRFY command is disabled")


@dataclass(frozen=True)
class _Lookups:
    """What SMTP.__init__ looks up for each new session, found once per session class and handler."""

    verbs: tuple[tuple[str, str], ...]             # (verb, method name): smtp_* of the session
    auth_mechanisms: tuple[tuple[str, str], ...]   # (mechanism, method name): aiosmtpd's built-in auth_*
    hooks: dict                                    # aiosmtpd's _handle_hooks: the handler's handle_* methods
    ehlo_hook_ver: str | None                      # "new": the 5-argument handle_EHLO; None: no EHLO hook


@functools.lru_cache(maxsize=16)   # one handler per edge (the tests make more)
def _lookups(cls: type, handler) -> _Lookups:
    names = dir(cls)
    hooks = {name[len("handle_"):]: getattr(handler, name) for name in dir(handler) if name.startswith("handle_")}
    ehlo = hooks.get("EHLO")
    if ehlo is not None and len(inspect.signature(ehlo).parameters) != 5:
        raise TypeError("the handler's handle_EHLO must take (server, session, envelope, hostname, responses)")
    return _Lookups(
        verbs=tuple((name[len("smtp_"):], name) for name in names if name.startswith("smtp_")),
        auth_mechanisms=tuple((getattr(getattr(cls, name), "__auth_mechanism_name__",
                                       name[len("auth_"):].replace("__", "-")), name)
                              for name in names if name.startswith("auth_")),
        hooks=hooks, ehlo_hook_ver=None if ehlo is None else "new")


async def _finish(command, waiting):
    """The rest of a coroutine whose first step (KeylessSMTP._step) stopped on `waiting`: what a task would have
    done from there (Python 3.12's eager tasks, by hand). A coroutine stops on an asyncio future, or on None for
    a bare yield (asyncio.sleep(0)); resumed once the future is done, its `await` returns the future's result or
    raises its exception. A cancellation of this task reaches the coroutine as it would have reached a task."""
    while True:
        if waiting is None:
            await asyncio.sleep(0)
        else:
            # The coroutine's await marked the future as blocking on it, for the task that would run it: the
            # mark is taken back (as asyncio's Task does), so this task's await may wait on the same future.
            waiting._asyncio_future_blocking = False
            try:
                await waiting
            except asyncio.CancelledError as cancelled:
                if not waiting.cancelled():   # this task was cancelled, not the future: the coroutine is told
                    try:
                        waiting = command.throw(cancelled)
                    except StopIteration as done:
                        return done.value
                    continue
            except Exception:  # noqa: BLE001,S110 - the future's own failure: the coroutine's await raises it
                pass
        try:
            waiting = command.send(None)
        except StopIteration as done:
            return done.value


def _log_tls(peer, session) -> None:
    # One line per TLS session; its client random is the key to the oracle's
    # audit line for the same handshake (none when resumed: nothing was signed).
    if session is None:
        return
    log.info("%s: TLS established: %s %s %s sni=%s %s client_random=%s", _address(peer), session.version,
             session.cipher_suite, session.group, session.server_name or "-",
             "resumed" if session.resumed else f"signed={session.signature_scheme}", session.client_random.hex())


def _address(peer) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


LF_BYTE = 0x0A


class DoorChecks(Protocol):
    """The door's protocol checks (the edge's: relay/edge/door.py Door)."""

    greet_wait: float     # seconds the banner waits; > 0: input before it is refused
    pipelining: bool      # refuse a command sent before the reply to the last, until EHLO is answered

    def connected(self, address: str) -> None:
        """A client connected (its DNSBL lookups may start)."""

    def refused(self, reason: DoorReason) -> None:
        """Count a refusal at the door."""


class Admission(Protocol):
    """Who may connect, and start TLS, now (the edge's: relay/edge/server.py)."""

    def admit(self, peer, *, implicit_tls: bool) -> str | None:
        """At the connection: None to go on, or the reply to close with (421 ...)."""

    def release(self, peer) -> None:
        """An admitted connection ended."""

    def starttls(self, peer) -> str | None:
        """At a STARTTLS command: None to go on, or the refusal (454 ...)."""

    def tls_established(self, peer) -> None:
        """That STARTTLS's handshake completed."""
