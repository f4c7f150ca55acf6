"""relay/aio/starttls.py against the aiosmtpd it was written for; and `with_enhanced_code`.

The adapter reaches into aiosmtpd's internals (its docstring lists them).
These tests fail, with a message saying what to re-check, when:
- the installed aiosmtpd is not the version the adapter names, or the pin
  in pyproject.toml says another one; importing the adapter under another
  version is an ImportError that names both versions;
- a name in the docstring's list is gone or has changed kind (attribute set
  in `SMTP.__init__`, coroutine method, method with a given parameter,
  exception class), or the docstring lists a name this test does not know;
- the aiosmtpd code paths the adapter counts on no longer read those names
  the way it expects (the `smtp_*` method table, the 5-argument
  `handle_EHLO` hook).

The adapter's own command loop (commands run as their lines arrive; one that
must wait finishes in a task from where it stopped) is tested here too: a
command that needs no waiting makes no task, and `_finish` gives a coroutine
what a task would (results, exceptions, cancellation, bare yields).

`with_enhanced_code` (RFC 2034 / RFC 3463) is tested on its own: codes by
reply, replies left alone, the class digit always that of the reply, and
idempotence.
"""

import asyncio
import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import aiosmtpd
import aiosmtpd.smtp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import relay.aio.starttls as adapter
from relay.aio.starttls import _ENHANCED, AIOSMTPD_VERSION, KeylessSMTP, with_enhanced_code
from relay.edge.handler import EdgeHandler, TransactionRules
from relay.edge.recipients import RecipientPolicy

ROOT = Path(__file__).resolve().parents[2]
SMTP = aiosmtpd.smtp.SMTP
RECHECK = (f"relay/aio/starttls.py was written against aiosmtpd {AIOSMTPD_VERSION}'s internals; "
           "re-read that aiosmtpd's smtp.py and fix the adapter before changing this test")


# --- the version --------------------------------------------------------------------------------

def test_installed_aiosmtpd_is_the_adapters_version():
    assert aiosmtpd.__version__ == AIOSMTPD_VERSION, f"aiosmtpd {aiosmtpd.__version__} is installed. {RECHECK}"


def test_pyproject_pins_the_adapters_version():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in dependencies if re.match(r"^aiosmtpd\b", d)]
    assert pins == [f"aiosmtpd=={AIOSMTPD_VERSION}"], f"pyproject.toml has {pins}. {RECHECK}"


def test_another_aiosmtpd_version_refuses_to_import():
    script = ("import aiosmtpd; aiosmtpd.__version__ = '99.0'\n"
              "import relay.aio.starttls\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode != 0
    assert "ImportError" in run.stderr and AIOSMTPD_VERSION in run.stderr and "99.0" in run.stderr, run.stderr


# --- the internals the docstring lists ----------------------------------------------------------

def documented_internals() -> set[str]:
    """The backquoted names in the adapter docstring's list of aiosmtpd internals (its "- " lines)."""
    doc = adapter.__doc__
    listed = doc[doc.index("internals"):doc.index("It also adds")]
    listed = listed[listed.index("\n- "):]
    return set(re.findall(r"`\.?(\w+)`", listed))


@pytest.fixture
def smtp():
    """A KeylessSMTP as the edge makes it (not connected), on a loop of its own."""
    loop = asyncio.new_event_loop()
    rules = TransactionRules("mx.example.org", "example.org", 100, lambda server: None,
                             lambda: RecipientPolicy(frozenset({"example.org"})))
    server = KeylessSMTP(EdgeHandler(rules, spool=None, metrics=None), tls_setup=lambda peer: ("config", "signer"),
                         hostname="mx.example.org", timeout=123.0, loop=loop, enable_SMTPUTF8=True)
    yield server
    loop.close()


def instance_attribute(value=None):
    def check(smtp, name):
        assert name in vars(smtp), f"SMTP.__init__ no longer sets self.{name}"
        assert vars(smtp)[name] == value, f"SMTP.__init__ sets self.{name} = {vars(smtp)[name]!r}, not {value!r}"
    return check


def coroutine_method(*parameters):
    def check(smtp, name):
        method = getattr(SMTP, name, None)
        assert inspect.iscoroutinefunction(method), f"SMTP.{name} is no longer a coroutine method"
        assert list(inspect.signature(method).parameters)[1:] == list(parameters), inspect.signature(method)
    return check


def plain_method(*parameters):
    def check(smtp, name):
        method = getattr(SMTP, name, None)
        assert inspect.isfunction(method) and not inspect.iscoroutinefunction(method), f"SMTP.{name} changed kind"
        assert list(inspect.signature(method).parameters)[1:] == list(parameters), inspect.signature(method)
    return check


def exception_class(smtp, name):
    found = getattr(aiosmtpd.smtp, name, None)
    assert isinstance(found, type) and issubclass(found, Exception), f"aiosmtpd.smtp.{name} is no exception class"
    assert adapter.TLSSetupException is found


def size_limit(value):
    def check(smtp, name):
        # A command line longer than command_size_limit is answered 500 without running its command (none is
        # held after it); one longer than line_length_limit is not even kept.
        assert getattr(SMTP, name) == value, f"SMTP.{name} is {getattr(SMTP, name)!r}, not {value}"
    return check


def the_data_command_prelude(smtp, name):
    # What aiosmtpd's DATA does before its 354 and after the content; KeylessSMTP.smtp_DATA does the same.
    source = inspect.getsource(SMTP.smtp_DATA)
    steps = ["await self.check_helo_needed()", 'await self.check_auth_needed("DATA")', "if not self.envelope.rcpt_tos:",
             "if arg:", "await self.push('354", "self._set_post_data_state()"]
    positions = [source.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), dict(zip(steps, positions))
    getattr(SMTP, name)  # and the name itself is there


def getaddr_method(smtp, name):
    # MAIL and RCPT parse their path through it; the adapter's fast path overrides it.
    plain_method("arg")(smtp, name)
    for command in (SMTP.smtp_MAIL, SMTP.smtp_RCPT):
        assert "self._getaddr(" in inspect.getsource(command), f"{command.__name__} no longer calls _getaddr"


def local_part_limit(smtp, name):
    assert isinstance(SMTP.local_part_limit, int), "SMTP.local_part_limit is no longer an int class attribute"
    assert "self.local_part_limit" in inspect.getsource(SMTP._getaddr)


def state_as_init_sets_it(smtp, name):
    # KeylessSMTP does not call SMTP.__init__: it sets the same state without the per-session lookups, and
    # without asyncio's StreamReaderProtocol state under it (no stream reader or writer: its own command loop).
    reference = KeylessSMTP.__new__(KeylessSMTP)
    SMTP.__init__(reference, smtp.event_handler, hostname="mx.example.org", timeout=123.0, loop=smtp.loop,
                  enable_SMTPUTF8=True)
    streams = KeylessSMTP.__new__(KeylessSMTP)
    asyncio.StreamReaderProtocol.__init__(streams, asyncio.StreamReader(loop=smtp.loop),
                                         client_connected_cb=smtp._cb_client_connected, loop=smtp.loop)
    theirs = {key: value for key, value in vars(reference).items() if key not in vars(streams)}
    ours = vars(smtp)
    assert not set(vars(streams)) & set(ours), "KeylessSMTP sets StreamReaderProtocol's state"
    assert set(theirs) <= set(ours), f"SMTP.__init__ sets more: {sorted(set(theirs) - set(ours))}"
    for key, value in theirs.items():
        mine = ours[key]
        if isinstance(value, dict):   # the verbs, AUTH mechanisms and hooks: the same names, the same functions
            assert value.keys() == mine.keys(), key
            assert all(getattr(getattr(v, "method", v), "__func__", v) == getattr(getattr(mine[k], "method", mine[k]),
                                                                              "__func__", mine[k])
                       for k, v in value.items()), key
        elif isinstance(value, (asyncio.StreamReader, asyncio.Future)) or callable(value):
            assert type(value) is type(mine), key
        else:
            assert value == mine, f"{key}: SMTP.__init__ sets {value!r}, KeylessSMTP {mine!r}"
    verbs = {name[len("smtp_"):] for name in dir(KeylessSMTP) if name.startswith("smtp_")}
    assert set(smtp._smtp_methods) == verbs and {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "STARTTLS"} <= verbs
    assert set(smtp._auth_methods) == {"LOGIN", "PLAIN"}   # aiosmtpd's built-in ones (our AUTH refuses all)


def the_timer_connection_lost_cancels(smtp, name):
    # Our lazy _reset_timeout keeps aiosmtpd's handle in it: connection_lost cancels whatever it holds.
    assert vars(smtp)[name] is None, "SMTP.__init__ no longer starts without a timer"
    assert "self._timeout_handle.cancel()" in inspect.getsource(SMTP.connection_lost), RECHECK


def a_new_session(smtp, name):
    # connection_made starts each session (and the one after STARTTLS) as aiosmtpd's does, with these.
    plain_method()(smtp, name)
    assert f"self.{name}()" in inspect.getsource(SMTP.connection_made), RECHECK


def handler_hook_caller(smtp, name):
    # QUIT calls the handler's hook as aiosmtpd's QUIT does; MISSING: the handler has none.
    coroutine_method("command", "args")(smtp, name)
    assert adapter.MISSING is aiosmtpd.smtp.MISSING and "return MISSING" in inspect.getsource(SMTP._call_handler_hook)


EXPECTED = {
    "__init__": state_as_init_sets_it,
    "_getaddr": getaddr_method,
    "local_part_limit": local_part_limit,
    "command_size_limit": size_limit(512),
    "check_helo_needed": coroutine_method("helo"),
    "check_auth_needed": coroutine_method("caller_method"),
    "_set_post_data_state": the_data_command_prelude,
    "envelope": instance_attribute(None),
    "_tls_handshake_okay": instance_attribute(True),
    "_create_session": a_new_session,
    "_set_rset_state": a_new_session,
    "_call_handler_hook": handler_hook_caller,
    "line_length_limit": size_limit(1001),
    "_reset_timeout": plain_method("duration"),
    "_timeout_handle": the_timer_connection_lost_cancels,
    "_timeout_cb": plain_method(),
    "_timeout_duration": instance_attribute(123.0),
    "push": coroutine_method("status"),
    "handle_exception": coroutine_method("error"),
    "TLSSetupException": exception_class,
}


def test_the_docstring_lists_exactly_the_checked_internals():
    assert documented_internals() == set(EXPECTED), (
        "relay/aio/starttls.py's docstring lists other aiosmtpd internals than this test checks: "
        f"documented {sorted(documented_internals())}, checked {sorted(EXPECTED)}")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_internal_exists_with_its_kind(smtp, name):
    try:
        EXPECTED[name](smtp, name)
    except AssertionError as error:
        raise AssertionError(f"aiosmtpd internal {name!r}: {error}. {RECHECK}") from None


def test_reset_timeout_uses_the_duration_or_the_command_timeout():
    source = inspect.getsource(SMTP._reset_timeout)
    assert "duration or self._timeout_duration" in source, RECHECK


def test_the_timer_follows_the_deadline_lazily(smtp, monkeypatch):
    """One timer per session: a later deadline leaves it be (it re-arms when it fires early), an earlier
    one re-arms it at once, and it closes the session only once the deadline has passed."""
    now = [1000.0]
    monkeypatch.setattr(smtp.loop, "time", lambda: now[0])
    closed = []
    monkeypatch.setattr(smtp, "_timeout_cb", lambda: closed.append(now[0]))
    smtp._reset_timeout(10.0)
    first = smtp._timeout_handle
    assert first.when() == 1010.0
    now[0] = 1004.0
    smtp._reset_timeout()          # the command timeout, 123 s: later, so the same timer
    assert smtp._timeout_handle is first and smtp._deadline == 1127.0
    smtp._reset_timeout(2.0)       # brought forward: re-armed now
    assert first.cancelled() and smtp._timeout_handle.when() == 1006.0
    now[0] = 1005.0
    smtp._reset_timeout(30.0)      # later again: the 1006 timer stays
    assert smtp._timeout_handle.when() == 1006.0
    now[0] = 1006.0
    smtp._timeout_due()            # fired early: re-armed for the rest, nothing closed
    assert smtp._timeout_handle.when() == 1035.0 and closed == []
    now[0] = 1035.0
    smtp._timeout_due()
    assert closed == [1035.0]
    smtp._reset_timeout(5.0)       # after it fired, a reset arms a new timer
    assert smtp._timeout_handle.when() == 1040.0 and not smtp._timeout_handle.cancelled()
    smtp._timeout_handle.cancel()


def test_commands_dispatch_to_the_adapters_methods(smtp):
    for command in ("STARTTLS", "AUTH", "VRFY", "EHLO", "HELO", "DATA", "BDAT"):
        method = smtp._smtp_methods.get(command)
        assert method is not None and method.__func__ is getattr(KeylessSMTP, f"smtp_{command}"), (
            f"{command} does not dispatch to KeylessSMTP.smtp_{command}. {RECHECK}")


def test_the_edge_handlers_ehlo_hook_is_the_current_form(smtp):
    assert smtp._ehlo_hook_ver == "new", RECHECK
    assert set(smtp._handle_hooks) >= {"EHLO", "MAIL", "RCPT"}
    # The handler's dir() names only what aiosmtpd looks for: every hook of its class is still found.
    hooks = {name[len("handle_"):] for name in vars(EdgeHandler) if name.startswith("handle_")}
    assert set(smtp._handle_hooks) == hooks
    # DATA content never reaches aiosmtpd's own DATA hook: the adapter streams it to open_message's sink.
    assert "DATA" not in smtp._handle_hooks and callable(smtp.event_handler.open_message)


def test_the_adapter_takes_no_name_its_base_classes_use(smtp):
    """A name of ours that aiosmtpd or asyncio also uses would change their state behind them (a `_paused`
    of ours once made asyncio's drain() wait for ever)."""
    bases = [SMTP, *SMTP.__mro__[1:], asyncio.BufferedProtocol]
    used = set()
    for base in bases:
        try:
            used |= set(re.findall(r"self\.(\w+)", inspect.getsource(base)))
        except (OSError, TypeError):
            used |= set(vars(base))
    ours = set(re.findall(r"self\.(\w+)\s*(?::[^=\n]+)?=(?!=)", inspect.getsource(KeylessSMTP).replace(
        inspect.getsource(KeylessSMTP._set_aiosmtpd_state), "")))   # that one sets aiosmtpd's own (compared above)
    shared_on_purpose = {"peer", "tls_context", "transport", "session", "envelope", "_tls_protocol",
                         "_original_transport", "_timeout_handle", "_tls_handshake_okay"}
    assert ours & used <= shared_on_purpose, f"the adapter sets names its bases use: {sorted(ours & used - shared_on_purpose)}"


class RecordingTransport:
    def __init__(self):
        self.writes = []
        self.reading = True

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def recording(smtp) -> RecordingTransport:
    smtp.transport, smtp.session = RecordingTransport(), aiosmtpd.smtp.Session(smtp.loop)
    return smtp.transport


def test_replies_to_pipelined_commands_go_out_together(smtp):
    """A 250 waits while the next command is already read, and leaves with the next reply; a refusal, a
    221, or a 250 with no command waiting go out at once, with whatever was held before them."""
    transport = recording(smtp)
    smtp._lines.extend([b"RCPT TO:<a@example.org>\r\n", b"DATA\r\n"])

    def push(*replies, may_hold=True):
        for reply in replies:
            smtp._reply(reply, may_hold=may_hold)

    push("250 OK")                                # MAIL's, RCPT and DATA waiting
    assert transport.writes == []
    smtp._lines.popleft()
    push("250 OK")                                # RCPT's, DATA waiting
    assert transport.writes == []
    smtp._lines.popleft()
    push("354 End data with <CR><LF>.<CR><LF>")   # nothing waits: all three in one write
    assert transport.writes == [b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"]
    smtp._lines.append(b"QUIT\r\n")
    push("250 2.0.0 OK queued as 1", may_hold=False)   # the message's own 250: never held
    push("550 5.1.1 No such user")                # a refusal: never held
    assert transport.writes[1:] == [b"250 2.0.0 OK queued as 1\r\n", b"550 5.1.1 No such user\r\n"]
    push("250 OK")
    assert len(transport.writes) == 3 and smtp._unsent
    push("221 2.0.0 Bye")                         # QUIT's: never held, and takes the held 250 with it
    assert transport.writes[3:] == [b"250 2.0.0 OK\r\n221 2.0.0 Bye\r\n"] and not smtp._unsent
    smtp.transport = None


def test_a_refusal_written_directly_sends_the_held_replies_first(smtp):
    sent = []
    smtp.transport = type("Transport", (), {"write": lambda self, data: sent.append(bytes(data))})()
    smtp._unsent += b"250 2.0.0 OK\r\n"
    smtp._write_now(b"521 5.5.2 bare LF\r\n")
    assert sent == [b"250 2.0.0 OK\r\n521 5.5.2 bare LF\r\n"] and not smtp._unsent
    smtp.transport = None


def test_help_still_lists_data(smtp):
    assert smtp._syntax_available(smtp._smtp_methods["DATA"]), RECHECK


@pytest.mark.parametrize("greeting", [True, False])
def test_a_multi_line_reply_goes_out_in_one_write(smtp, greeting):
    """Each write is a system call (25 us on the VM that benchmarks the edge): EHLO's eight lines are one."""
    transport = recording(smtp)
    smtp._greeting_lines = greeting
    refusals = []
    smtp._on_refusal = refusals.append

    async def reply(*lines):
        for line in lines:
            await smtp.push(line)

    def sent(*lines):
        return b"".join((line if greeting else with_enhanced_code(line)) + b"\r\n" for line in lines)

    smtp.loop.run_until_complete(reply("250-mx.example.org", "250-PIPELINING", "250 HELP"))
    assert transport.writes == [sent(b"250-mx.example.org", b"250-PIPELINING", b"250 HELP")]
    smtp.loop.run_until_complete(reply("550-first", "550 last", "250 OK"))
    assert transport.writes[1:] == [sent(b"550-first", b"550 last"), sent(b"250 OK")]
    assert len(refusals) == 1 and smtp._errors == 1   # one reply, counted once
    assert smtp._awaiting_reply is False


# --- the command loop ------------------------------------------------------------------------------

def test_commands_that_need_not_wait_run_at_once_without_a_task(smtp):
    transport = recording(smtp)
    smtp._lines.extend([b"NOOP\r\n", b"NOOP\r\n"])
    smtp._run_lines()
    assert smtp._running is None and not smtp._lines and not asyncio.all_tasks(smtp.loop)
    assert transport.writes == [b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n"]


def waiting_verb(smtp) -> asyncio.Future:
    """A WAIT command for this session that answers "250 waited" once the returned future is done."""
    gate = smtp.loop.create_future()

    async def smtp_WAIT(arg):
        await gate
        await smtp.push("250 waited")

    smtp._smtp_methods["WAIT"] = smtp_WAIT
    return gate


def test_lines_behind_a_waiting_command_wait_for_it(smtp):
    transport = recording(smtp)
    gate = waiting_verb(smtp)
    smtp._lines.extend([b"WAIT\r\n", b"NOOP\r\n"])
    smtp._run_lines()
    assert smtp._running is not None and list(smtp._lines) == [b"NOOP\r\n"] and transport.writes == []
    smtp.loop.call_soon(gate.set_result, None)
    smtp.loop.run_until_complete(asyncio.wait([smtp._running]))
    assert smtp._running is None and not smtp._lines
    assert transport.writes == [b"250 2.0.0 waited\r\n250 2.0.0 OK\r\n"]


def test_lines_behind_a_waiting_command_are_bounded(smtp):
    """A client that keeps pipelining while a command waits (a DNS check, a commit) is not read from once
    HELD_INPUT_LIMIT bytes of its lines wait; reading goes on once they have run."""
    transport = recording(smtp)
    gate = waiting_verb(smtp)
    smtp._input(b"WAIT\r\n", 6)
    flood = b"NOOP\r\n" * 1000
    sent = 0
    while transport.reading and sent < 4 * adapter.HELD_INPUT_LIMIT:
        smtp._input(flood, len(flood))
        sent += len(flood)
    assert not transport.reading, "still reading with all that waiting"
    assert adapter.HELD_INPUT_LIMIT < smtp._lines_bytes <= adapter.HELD_INPUT_LIMIT + len(flood)
    assert smtp._lines_bytes == sum(len(line) for line in smtp._lines)
    smtp.loop.call_soon(gate.set_result, None)
    smtp.loop.run_until_complete(asyncio.wait([smtp._running]))
    assert transport.reading and not smtp._lines and smtp._lines_bytes == 0
    assert b"".join(transport.writes).count(b"250 2.0.0 OK\r\n") == sent // len(b"NOOP\r\n")
    smtp.transport = None


def stepped(smtp, coroutine) -> asyncio.Task:
    """`coroutine` run as a command is (_step); it must wait, so it goes on in a task: run to its end."""
    smtp._step(coroutine)
    task = smtp._running
    assert task is not None, "the coroutine did not wait"
    smtp.loop.run_until_complete(asyncio.wait([task]))
    return task


def test_finish_gives_the_coroutine_results_exceptions_bare_yields_and_timers(smtp):
    loop, seen = smtp.loop, []

    def later(value=None, error=None):
        future = loop.create_future()
        loop.call_soon(*((future.set_exception, error) if error else (future.set_result, value)))
        return future

    async def command():
        seen.append(await later(5))
        try:
            await later(error=ValueError("refused"))
        except ValueError as error:
            seen.append(str(error))
        await asyncio.sleep(0)
        seen.append(await asyncio.sleep(0.01, "slept"))
        return "done"

    task = stepped(smtp, command())
    assert task.result() == "done" and seen == [5, "refused", "slept"]


def test_cancelling_the_task_reaches_the_coroutine(smtp):
    loop, seen = smtp.loop, []
    never = loop.create_future()

    async def command():
        try:
            await never
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    smtp._step(command())
    loop.call_soon(smtp._running.cancel)
    task = smtp._running
    loop.run_until_complete(asyncio.wait([task]))
    assert task.cancelled() and never.cancelled() and seen == ["cancelled"]


def test_a_cancellation_after_the_future_is_done_still_reaches_the_coroutine(smtp):
    """The task is cancelled when the future it waits on is done but has not woken it: the future cannot be
    cancelled any more, so the cancellation must be thrown into the coroutine, not lost."""
    loop, seen = smtp.loop, []
    future = loop.create_future()

    async def command():
        try:
            seen.append(await future)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    smtp._step(command())
    task = smtp._running

    def done_then_cancelled():
        future.set_result(1)
        task.cancel()

    loop.call_soon(done_then_cancelled)
    loop.run_until_complete(asyncio.wait([task]))
    assert task.cancelled() and seen == ["cancelled"]


# --- with_enhanced_code -------------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    (b"250 OK", b"250 2.0.0 OK"),
    (b"221 Bye", b"221 2.0.0 Bye"),
    (b"500 Error: bad syntax", b"500 5.5.2 Error: bad syntax"),
    (b"501 Syntax: HELO hostname", b"501 5.5.4 Syntax: HELO hostname"),
    (b"502 EXPN not implemented", b"502 5.5.1 EXPN not implemented"),
    (b"503 Error: need MAIL command", b"503 5.5.1 Error: need MAIL command"),
    (b"552 Error: Too much mail data", b"552 5.3.4 Error: Too much mail data"),
    (b"553 Error: malformed address", b"553 5.1.3 Error: malformed address"),
    (b"554 Command refused due to lack of security", b"554 5.7.0 Command refused due to lack of security"),
    (b"555 MAIL FROM parameters not recognized", b"555 5.5.4 MAIL FROM parameters not recognized"),
    (b"421 Too many connections", b"421 4.3.0 Too many connections"),
    (b"451 Temporary failure", b"451 4.3.0 Temporary failure"),
    (b"250-first line", b"250-2.0.0 first line"),  # RFC 2034: each line of a multi-line reply
])
def test_a_code_is_added(reply, expected):
    assert with_enhanced_code(reply) == expected


@pytest.mark.parametrize("reply", [
    b"550 5.7.1 Relaying denied",      # has one
    b"452 4.5.3 Too many recipients",
    b"421 4.7.0 Too many errors",
    b"250 2.0.0",                      # a code and no text
    b"354 End data with <CR><LF>.<CR><LF>",   # 3xx: RFC 3463 has no class 3
    b"220 mx.example.org ESMTP",       # not in the table: left as is
    b"299 odd",
    b"250",                            # too short to have text
    b"",
])
def test_a_reply_is_left_alone(reply):
    assert with_enhanced_code(reply) == reply


def test_the_class_digit_is_the_replys():
    for code, enhanced in _ENHANCED.items():
        assert enhanced[:1] == code[:1], (code, enhanced)
        assert re.fullmatch(rb"[245]\.\d{1,3}\.\d{1,3}", enhanced), enhanced
        assert with_enhanced_code(code + b" text") == code + b" " + enhanced + b" text"


def test_a_code_that_looks_half_right_is_not_taken_for_one():
    assert with_enhanced_code(b"250 1.2.3 text") == b"250 2.0.0 1.2.3 text"    # class 1 does not exist
    assert with_enhanced_code(b"250 2.0 text") == b"250 2.0.0 2.0 text"        # two parts
    assert with_enhanced_code(b"250 2.0.0text") == b"250 2.0.0 2.0.0text"      # no separator after it


@given(code=st.sampled_from(sorted(_ENHANCED) + [b"220", b"354", b"299"]),
       separator=st.sampled_from([b" ", b"-"]), text=st.binary(max_size=40))
def test_idempotent_and_only_inserts(code, separator, text):
    reply = code + separator + text
    once = with_enhanced_code(reply)
    assert with_enhanced_code(once) == once
    assert once == reply or (once[:4] == reply[:4] and once[4:].endswith(reply[4:])
                             and re.fullmatch(rb"[245]\.\d{1,3}\.\d{1,3} ", once[4:len(once) - len(reply) + 4]))



# --- the fast path for plain paths agrees with aiosmtpd's parser ---------------------------------------------

PATHS = [
    "<user@example.org>", "<user@example.org> SIZE=100", "<user@example.org>  SIZE=1 BODY=8BITMIME",
    "<user@example.org> SIZE=1 ", "<User.Name+tag@Mail.Example.ORG>", "<>", "<user@example.org>x",
    "user@example.org", "<user@example.org> (comment) SIZE=1", "<user@example.org>\tSIZE=1",
    '<"quoted local"@example.org>', "<@relay.example:user@example.org>", "<user@[192.0.2.1]>",
    "<a..b@example.org>", "<.a@example.org>", "<a.@example.org>", "<a@-example.org>", "<a@example-.org>",
    "<a@example..org>", "<a@example.org.>", "<ü@example.org>", "<a@exämple.org>", "< user@example.org>",
    "<user@example.org >", "<user @example.org>", "<user@example.org> SIZE=1(x)", "<a@b>", "<a@b> ",
    "<" + "x" * 70 + "@example.org>", "<" + "x" * 64 + "@example.org>", "<a@b.c> A=1\r\n", "<a@b.c>\n",
]


def assert_same_answer(smtp, arg: str) -> None:
    """The parser's answer; where the parser raises (it does on a lone "<"), a malformed path (None, None)."""
    try:
        expected = SMTP._getaddr(smtp, arg)
    except Exception:  # noqa: BLE001 - the adapter's answer to it is checked
        expected = (None, None)
    assert smtp._getaddr(arg) == expected, arg


@pytest.mark.parametrize("arg", PATHS)
def test_the_plain_path_fast_path_answers_as_the_parser_does(smtp, arg):
    assert_same_answer(smtp, arg)


@given(st.text(alphabet='ab.@<>-_+ ()"[]:,;\tü1=Z', max_size=24))
def test_the_fast_path_agrees_with_the_parser_on_any_text(arg):
    loop = asyncio.new_event_loop()
    try:
        rules = TransactionRules("mx.example.org", "example.org", 100, lambda server: None,
                                 lambda: RecipientPolicy(frozenset({"example.org"})))
        server = KeylessSMTP(EdgeHandler(rules, spool=None, metrics=None), tls_setup=lambda peer: None,
                             hostname="mx.example.org", loop=loop)
        assert_same_answer(server, arg)
        assert_same_answer(server, "<" + arg.replace("<", "").replace(">", "") + ">")
    finally:
        loop.close()


@pytest.mark.parametrize("arg, path, rest", [
    ("<user@example.org>", "user@example.org", ""),
    ("<user@example.org> SIZE=100 BODY=8BITMIME", "user@example.org", "SIZE=100 BODY=8BITMIME"),
    ("<User.Name+tag@Mail.Example.ORG>", "User.Name+tag@Mail.Example.ORG", ""),
])
def test_what_most_senders_write_takes_the_fast_path(smtp, arg, path, rest):
    plain = adapter._PLAIN_PATH.fullmatch(arg)
    assert plain and (plain.group(1), plain.group(2) or "") == (path, rest), arg
    assert smtp._getaddr(arg) == (path, rest)
