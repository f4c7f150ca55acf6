"""A strict, bounded HTTP/1.1 request reader (sans-I/O) and the responses the edge sends.

The edge answers two things over HTTP: ACME HTTP-01 tokens on port 80 and
the MTA-STS policy on 443 (relay/edge/web.py). Each is one GET of one small
resource, read by a machine, one request per connection. So this is a
hand-written reader for exactly that, in relay/tls's shape (a State, one
exception per status, a frozen event), not a general HTTP library: h11 (the
maintained sans-I/O choice) is not a dependency today, and for this one GET
it would add a pinned package to the edge's attack surface while being more
lenient than we want (it accepts bare LF line ends and obs-fold, which a
server that never relays anything has no reason to accept).

    reader = RequestReader()
    request = reader.receive_data(data)   # None until the header block is complete; raises RequestError
    transport.write(response(200, body, head=request.method == "HEAD"))

What it accepts (RFC 9112), and what it answers otherwise:
- a request line `METHOD SP origin-form SP HTTP/1.x CRLF`, single spaces,
  at most MAX_REQUEST_LINE octets (414); methods GET and HEAD (405 with
  Allow for any other token); versions HTTP/1.0 and HTTP/1.1 (505 for
  other HTTP/d.d). Input that cannot begin a request line (not a token of
  at most MAX_METHOD octets then SP: a TLS ClientHello, binary junk) is
  400 as soon as it arrives, not after the timeout;
- the target in origin-form only: `/` then RFC 3986 path and query
  characters, percent-escapes well formed but never decoded (the routes
  compare paths byte for byte, so `%2e%2e` is just a path that is not
  ours). Absolute-form (`http://host/...`) is refused with 400, against
  RFC 9112 3.2.2's "MUST accept": we are no proxy, ACME validators and
  MTA-STS fetchers send origin-form, and a second source for the host
  name is one more thing to get wrong;
- header lines `name: value CRLF`, names RFC 9110 tokens with no white
  space before the colon, values of visible ASCII, SP and HTAB (obs-text,
  NUL and other controls refused); no obs-fold; at most MAX_HEADERS lines
  and MAX_HEADER_BYTES octets for the whole block (431);
- CR and LF only together: a bare CR or LF anywhere is 400;
- exactly one Host in HTTP/1.1 (RFC 9112 3.2), at most one in HTTP/1.0,
  a host name or address with an optional port;
- no content: a Transfer-Encoding, or a Content-Length other than 0, is
  400 (a GET has no use for one, and we never read past the header block).

Anything after the header block is never read: the answer closes the
connection (Connection: close).
"""

import re
from dataclasses import dataclass
from email.utils import formatdate
from enum import Enum, auto

MAX_REQUEST_LINE = 1024    # the longest target we serve is an ACME token path (~160 octets)
MAX_HEADER_BYTES = 8192    # the header block after the request line
MAX_HEADERS = 64
ALLOWED_METHODS = ("GET", "HEAD")

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
MAX_METHOD = 16
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
# origin-form = absolute-path [ "?" query ]; pchar and query characters of RFC 3986, escapes well formed.
_ORIGIN_FORM = re.compile(rb"(/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*)+"
                          rb"(\?(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*)?")
_FIELD_VALUE = re.compile(rb"[\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?|")
# uri-host [ ":" port ]: a reg-name of letters, digits, hyphens and dots, or a bracketed IPv6 literal.
_HOST = re.compile(rb"([A-Za-z0-9\-.]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{0,5})?")


class State(Enum):
    REQUEST_LINE = auto()
    HEADERS = auto()
    DONE = auto()
    FAILED = auto()


class RequestError(Exception):
    """The client's request cannot be served: answer with `status` (and close). `message` is for the log."""

    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(RequestError):
    status = 400


class MethodNotAllowed(RequestError):
    status = 405


class UriTooLong(RequestError):
    status = 414


class HeadersTooLarge(RequestError):
    status = 431


class VersionNotSupported(RequestError):
    status = 505


class RequestTimeout(RequestError):
    """Not raised by the reader (it has no clock): the I/O side's answer to a request that did not arrive in time."""

    status = 408


@dataclass(frozen=True)
class Request:
    method: str
    target: str                     # origin-form, as sent: path and query, never percent-decoded
    version: str                    # "HTTP/1.0" or "HTTP/1.1"
    host: str | None                # lower case, without port or trailing dot; None only in HTTP/1.0
    headers: tuple[tuple[str, str], ...]   # (lower-case name, value), in order

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


class RequestReader:
    """Reads one request's header block; `receive_data(b"")` is EOF."""

    def __init__(self):
        self.state = State.REQUEST_LINE
        self._buffer = bytearray()
        self._request_line: tuple[str, str, str] | None = None
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0

    def receive_data(self, data: bytes) -> Request | None:
        if self.state is State.DONE:
            return None  # one request per connection: what follows it is never read
        if self.state is State.FAILED:
            raise BadRequest("input after a refused request")
        try:
            return self._receive(data)
        except RequestError:
            self.state = State.FAILED
            raise

    def _receive(self, data: bytes) -> Request | None:
        if not data:
            if self._buffer or self.state is not State.REQUEST_LINE:
                raise BadRequest("the connection ended inside the request")
            raise BadRequest("the connection ended before a request")
        self._buffer += data
        while True:
            limit = MAX_REQUEST_LINE if self.state is State.REQUEST_LINE else MAX_HEADER_BYTES - self._header_bytes
            line = self._next_line(limit)
            if line is None:
                return None
            if self.state is State.REQUEST_LINE:
                self._request_line = _request_line(line)
                self.state = State.HEADERS
            elif line:
                self._header_bytes += len(line) + 2
                if len(self._headers) == MAX_HEADERS:
                    raise HeadersTooLarge(f"more than {MAX_HEADERS} header lines")
                self._headers.append(_header_line(line))
            else:
                self.state = State.DONE
                self._buffer.clear()
                return _request(self._request_line, self._headers)

    def _next_line(self, limit: int) -> bytes | None:
        """The next CRLF-ended line without its CRLF, or None until it is all here."""
        buffer = self._buffer
        if self.state is State.REQUEST_LINE:
            _check_method_start(buffer)
        end = buffer.find(b"\r\n", 0, limit + 2)
        bare = _bare_line_end(buffer, end if end >= 0 else min(len(buffer), limit + 1))
        if bare is not None:
            raise BadRequest(f"a bare {bare} (CR and LF come only together)")
        if end < 0:
            if len(buffer) > limit:
                self._too_long()
            return None
        line = bytes(buffer[:end])
        del buffer[:end + 2]
        return line

    def _too_long(self) -> None:
        if self.state is State.REQUEST_LINE:  # its method was checked: it is the target that is too long
            raise UriTooLong(f"the request line is longer than {MAX_REQUEST_LINE} octets")
        raise HeadersTooLarge(f"the header block is longer than {MAX_HEADER_BYTES} octets")


def _check_method_start(buffer: bytearray) -> None:
    """Refuse at once what cannot start a request line (a TLS ClientHello, binary junk), not after the timeout."""
    method = re.split(rb"[ \r]", bytes(buffer[:MAX_METHOD + 1]), maxsplit=1)[0]
    if method and (len(method) > MAX_METHOD or not _TOKEN.fullmatch(method)):
        raise BadRequest(f"not an HTTP request line: {_show(bytes(buffer[:16]))}")


def _bare_line_end(buffer: bytearray, end: int) -> str | None:
    """A CR not followed by LF, or an LF not preceded by CR, before `end` (a CR last in the buffer may be half
    of a CRLF still to come)."""
    lf = buffer.find(b"\n", 0, end)
    if lf >= 0:
        return "LF"
    cr = buffer.find(b"\r", 0, end)
    if cr >= 0 and cr + 1 < len(buffer):
        return "CR"
    return None


def _request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise BadRequest(f"the request line is not METHOD SP TARGET SP VERSION: {_show(line)}")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest(f"the method is not a token: {_show(method)}")
    match = _VERSION.fullmatch(version)
    if match is None:
        raise BadRequest(f"not an HTTP version: {_show(version)}")
    if match.group(1) != b"1" or match.group(2) not in b"01":
        raise VersionNotSupported(f"{version.decode()} (this server speaks HTTP/1.0 and HTTP/1.1)")
    if method.decode() not in ALLOWED_METHODS:
        raise MethodNotAllowed(f"method {_show(method)}")
    if not _ORIGIN_FORM.fullmatch(target):
        form = "absolute-form" if b"://" in target else "not origin-form"
        raise BadRequest(f"the target is {form}: {_show(target)}")
    return method.decode(), target.decode(), version.decode()


def _header_line(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise BadRequest("a header line folded onto the one before (obs-fold)")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise BadRequest(f"not a header field: {_show(line)}")
    value = value.strip(b" \t")
    if not _FIELD_VALUE.fullmatch(value):
        raise BadRequest(f"header {name.decode()!r} has a byte outside visible ASCII, SP and HTAB")
    return name.decode().lower(), value.decode()


def _request(request_line: tuple[str, str, str], headers: list[tuple[str, str]]) -> Request:
    method, target, version = request_line
    hosts = [value for name, value in headers if name == "host"]
    if len(hosts) > 1:
        raise BadRequest("more than one Host header")
    if not hosts and version == "HTTP/1.1":
        raise BadRequest("HTTP/1.1 without a Host header")
    host = _host(hosts[0]) if hosts else None
    if any(name == "transfer-encoding" for name, _ in headers):
        raise BadRequest(f"a {method} with Transfer-Encoding (no content is read)")
    lengths = [value for name, value in headers if name == "content-length"]
    if any(length != "0" for length in lengths):
        raise BadRequest(f"a {method} with content (Content-Length {', '.join(lengths)})")
    return Request(method, target, version, host, tuple(headers))


def _host(value: str) -> str:
    if not _HOST.fullmatch(value.encode()):
        raise BadRequest(f"not a host: {_show(value.encode())}")
    host = value.rpartition(":")[0] if not value.endswith("]") and ":" in value else value
    return host.lower().rstrip(".")


def _show(data: bytes) -> str:
    """Client bytes as a log line may show them: bounded, escaped."""
    return repr(data[:64]) + ("..." if len(data) > 64 else "")


# --- responses -----------------------------------------------------------------------------------------------

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           414: "URI Too Long", 431: "Request Header Fields Too Large", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}


def response(status: int, body: bytes = b"", *, head: bool = False, content_type: str = "text/plain",
             now: float | None = None) -> bytes:
    """A whole HTTP/1.1 response that closes the connection; for HEAD, the headers GET would have had."""
    if not body and status != 200:
        body = f"{status} {REASONS[status]}\r\n".encode()
    lines = [f"HTTP/1.1 {status} {REASONS[status]}", f"Date: {formatdate(now, usegmt=True)}",
             f"Content-Type: {content_type}", f"Content-Length: {len(body)}", "Connection: close",
             "X-Content-Type-Options: nosniff"]
    if status == 405:
        lines.append(f"Allow: {', '.join(ALLOWED_METHODS)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head else body)
