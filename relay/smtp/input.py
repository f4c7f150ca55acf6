"""What an SMTP server reads from its client, checked byte by byte: command lines, then DATA content.

Sans-I/O, like relay/tls: bytes in, decisions out; the asyncio side lives in
relay/aio/starttls.py.

The rule (RFC 5321 2.3.8): CR and LF appear only together, as CRLF. A bare
LF or a bare CR, in a command or in message content, is the raw material of
SMTP smuggling: software that ends lines or messages differently from us
(`\\n.\\r\\n`, `\\r.\\r`...) would see a second message where we saw one. So,
like Postfix with `smtpd_forbid_bare_newline = reject` and Sendmail's fix for
CVE-2023-51765, the edge does not normalise or guess: the first bare CR or
bare LF ends the session with `521 5.5.2`, before anything after it is read
as a command or sealed as content. Content ends only at CRLF "." CRLF.

`CommandScanner` reads command input: it finds the first bare CR or LF, and
the end of a `DATA`, `BDAT` or `STARTTLS` line, after which the bytes that
follow must not be taken for commands until the server has answered (content
after a 354 or a BDAT, TLS after a 220, RFC 3207 4.2's discarded plaintext).

`DataReader` reads DATA content as it arrives: it removes the dot-stuffing
(RFC 5321 4.5.2), finds the end, and hands the content to a sink piece by
piece, never holding the message. A message over the size limit or with a
NUL byte is read to its end and then refused; a bare CR or LF stops at once.
"""

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

CR, LF, DOT = 0x0D, 0x0A, 0x2E


class Violation(Enum):
    """Why input is refused."""

    BARE_LF = "bare LF"        # ends the session (521 5.5.2)
    BARE_CR = "bare CR"        # ends the session (521 5.5.2)
    NUL = "NUL byte"           # content only: the message is refused after its end (554 5.6.0)
    TOO_BIG = "too big"        # content only: refused after its end (552 5.3.4)

    @property
    def ends_session(self) -> bool:
        return self in (Violation.BARE_LF, Violation.BARE_CR)


class Hold(Enum):
    """A command after which input waits for the server's answer (content after 354, TLS after 220)."""

    DATA = b"DATA"
    BDAT = b"BDAT"          # a chunk of content follows the line at once (RFC 3030)
    STARTTLS = b"STARTTLS"


_VERBS = {hold.value: hold for hold in Hold}
_HEAD = max(len(verb) for verb in _VERBS) + 1  # a line's first bytes: enough to see its verb


@dataclass(frozen=True)
class Scan:
    """`data[start:end]` is plain command input; `stop` says why the scan ended before the data's end."""

    end: int
    stop: Violation | Hold | None = None


class CommandScanner:
    """Command input: CRLF lines only; says where a DATA, BDAT or STARTTLS command line ends.

    A line is such a command when its verb (what comes before the
    first space) is one of them and it is at most `command_limit` bytes
    without its CRLF: longer lines are refused as too long, never run.
    """

    def __init__(self, command_limit: int):
        self.command_limit = command_limit
        self._cr = False          # the last byte seen was a CR
        self._head = b""          # the current line's first bytes (up to _HEAD)
        self._length = 0          # the current line's length so far

    def reset(self) -> None:
        """Forget a partial line (its input was discarded)."""
        self._cr = False
        self._head = b""
        self._length = 0

    def scan(self, data: bytes, start: int = 0, end: int | None = None) -> Scan:
        """Scan `data[start:end]` (a bytes or bytearray: it is searched, not copied)."""
        n = len(data) if end is None else end
        i = start
        if self._cr and i < n:
            if data[i] != LF:
                return Scan(i, Violation.BARE_CR)
            i += 1
            hold = self._line_end(1)
            if hold is not None:
                return Scan(i, hold)
        while i < n:
            lf = data.find(b"\n", i, n)
            line_end = n if lf < 0 else lf
            cr = data.find(b"\r", i, line_end)
            if cr >= 0 and cr != line_end - 1:
                return Scan(cr, Violation.BARE_CR)  # a CR with something other than LF after it
            if lf < 0:
                self._cr = cr >= 0   # the piece ends with a CR: its LF may come next
                self._extend(data, i, n)
                return Scan(n)
            if cr < 0:
                return Scan(lf, Violation.BARE_LF)
            self._extend(data, i, lf + 1)
            i = lf + 1
            hold = self._line_end(0)
            if hold is not None:
                return Scan(i, hold)
        return Scan(n)

    def _extend(self, data: bytes, start: int, end: int) -> None:
        if len(self._head) < _HEAD:
            self._head += data[start:min(end, start + _HEAD - len(self._head))]
        self._length += end - start

    def _line_end(self, extra: int) -> Hold | None:
        """The line just ended (`extra`: its LF, not yet counted); the command to hold after, if any."""
        head, length = self._head, self._length + extra - 2
        self.reset()
        if length > self.command_limit:
            return None
        verb = head[:length].split(b" ", 1)[0].upper()
        return _VERBS.get(verb)


# DataReader states: where in a line the last byte left us.
_LINE, _MID, _CR, _DOT, _DOT_CR = range(5)


class DataReader:
    """DATA content from the 354 to CRLF "." CRLF, un-stuffed, handed to `sink` as it arrives.

    `feed(data)` returns where in `data` the content ended (what follows
    belongs to the commands after DATA). Once `done`, `violation` says whether
    the message must be refused; `size` counts the content's bytes. The sink
    gets memoryviews valid only during the call: it must copy what it keeps.
    It gets nothing more once the size limit is passed or a violation found.
    """

    def __init__(self, sink: Callable[[memoryview], None], max_size: int):
        self._sink = sink
        self.max_size = max_size
        self._state = _LINE
        self.size = 0
        self.violation: Violation | None = None
        self.done = False

    def feed(self, data: bytes, start: int = 0, end: int | None = None) -> int:
        """Read `data[start:end]` (bytes or bytearray, searched in place); the position content ended at."""
        view = memoryview(data)
        n = len(data) if end is None else end
        i = start
        while i < n and not self.done:
            state = self._state
            if state == _MID:
                i = self._bulk(data, view, i, n)
                continue
            byte = data[i]
            if state == _LINE:
                if byte == DOT:
                    self._state = _DOT     # the dot is held: stuffing, or the end
                    i += 1
                else:
                    self._state = _MID
            elif state == _DOT:
                if byte == CR:
                    self._state = _DOT_CR
                    i += 1
                else:
                    self._state = _MID     # the dot was stuffing: dropped
            elif state == _DOT_CR:
                if byte == LF:
                    self.done = True       # CRLF "." CRLF
                    i += 1
                else:
                    self._fail(Violation.BARE_CR)
            else:  # _CR: a CR held back at the end of the last piece
                if byte == LF:
                    self._emit(b"\r\n")
                    self._state = _LINE
                    i += 1
                else:
                    self._fail(Violation.BARE_CR)
        return i

    def _bulk(self, data: bytes, view: memoryview, i: int, n: int) -> int:
        """From the middle of a line: everything up to the next line that starts with a dot (or `n`)."""
        found = data.find(b"\r\n.", i, n)
        if found >= 0:
            end = resume = found + 2
            self._state = _LINE
        elif data[n - 1] == CR:
            end, resume = n - 1, n  # its LF may be in the next piece
            self._state = _CR
        else:
            end = resume = n
            self._state = _LINE if data.endswith(b"\r\n", i, n) else _MID
        crlf = data.count(b"\r\n", i, end)
        if data.count(b"\n", i, end) != crlf or data.count(b"\r", i, end) != crlf:
            self._fail(_first_bare(data, i, end))
            return n
        if self.violation is None and data.find(b"\x00", i, end) >= 0:
            self.violation = Violation.NUL
        self._emit(view[i:end])
        return resume

    def _emit(self, piece) -> None:
        self.size += len(piece)
        if self.violation is None and self.size > self.max_size:
            self.violation = Violation.TOO_BIG
        if self.violation is None:
            self._sink(piece if isinstance(piece, memoryview) else memoryview(piece))

    def _fail(self, violation: Violation) -> None:
        self.violation = violation
        self.done = True


def _first_bare(data: bytes, start: int, end: int) -> Violation:
    """Which comes first in `data[start:end]`, known to hold one: a bare LF or a bare CR (for the log)."""
    for i in range(start, end):
        if data[i] == LF and (i == start or data[i - 1] != CR):
            return Violation.BARE_LF
        if data[i] == CR and (i + 1 == end or data[i + 1] != LF):
            return Violation.BARE_CR
    raise AssertionError("no bare CR or LF where the counts said there was one")
