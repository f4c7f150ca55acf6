"""The edge's HTTP request reader (relay/http.py): what it accepts, what it refuses with which status.

Each hostile input an attacker would try on port 80 or 443 gets its status:
bare LF or CR, NUL, obs-fold, absolute-form, oversized lines and header
blocks, other methods and versions, bodies. The reader gives the same answer
however the bytes are split, and nothing but a RequestError ever escapes.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.http import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    BadRequest,
    HeadersTooLarge,
    MethodNotAllowed,
    Request,
    RequestError,
    RequestReader,
    State,
    UriTooLong,
    VersionNotSupported,
    response,
)

TOKEN_PATH = "/.well-known/acme-challenge/LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
GOOD = f"GET {TOKEN_PATH} HTTP/1.1\r\nHost: mx.example.org\r\nUser-Agent: test\r\nAccept: */*\r\n\r\n".encode()


def read(data: bytes, chunk: int | None = None) -> Request | None:
    reader = RequestReader()
    if chunk is None:
        return reader.receive_data(data)
    result = None
    for i in range(0, len(data), chunk):
        result = reader.receive_data(data[i:i + chunk]) or result
    return result


def test_a_plain_get_is_read():
    request = read(GOOD)
    assert request == Request("GET", TOKEN_PATH, "HTTP/1.1", "mx.example.org",
                              (("host", "mx.example.org"), ("user-agent", "test"), ("accept", "*/*")))
    assert request.path == TOKEN_PATH


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_the_same_request_however_it_is_split(chunk):
    assert read(GOOD, chunk) == read(GOOD)


def test_nothing_until_the_header_block_ends_and_nothing_read_after_it():
    reader = RequestReader()
    assert reader.receive_data(GOOD[:-2]) is None and reader.state is State.HEADERS
    request = reader.receive_data(GOOD[-2:] + b"GET /second HTTP/1.1\r\n\n\x00")
    assert request.target == TOKEN_PATH and reader.state is State.DONE
    assert reader.receive_data(b"more") is None


@pytest.mark.parametrize("raw, host, target", [
    (b"HEAD /.well-known/mta-sts.txt HTTP/1.1\r\nHOST: MTA-STS.Example.ORG.:443\r\n\r\n", "mta-sts.example.org",
     "/.well-known/mta-sts.txt"),
    (b"GET / HTTP/1.0\r\n\r\n", None, "/"),
    (b"GET /a?b=c/d%20e HTTP/1.1\r\nHost: [2001:db8::1]:80\r\nContent-Length: 0\r\n\r\n", "[2001:db8::1]",
     "/a?b=c/d%20e"),
    (b"GET /%2e%2e/%2E HTTP/1.1\r\nHost: 192.0.2.1\r\nX-Empty:\r\nX-Tab:\ta\tb \r\n\r\n", "192.0.2.1",
     "/%2e%2e/%2E"),
])
def test_requests_that_are_accepted(raw, host, target):
    request = read(raw)
    assert (request.host, request.target) == (host, target)


BAD = {
    "bare LF ending the request line": (b"GET / HTTP/1.1\nHost: a\r\n\r\n", BadRequest, "bare LF"),
    "bare LF ending a header": (b"GET / HTTP/1.1\r\nHost: a\n\r\n", BadRequest, "bare LF"),
    "bare LF ending the block": (b"GET / HTTP/1.1\r\nHost: a\r\n\n", BadRequest, "bare LF"),
    "bare CR in a header": (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", BadRequest, "bare CR"),
    "NUL in the target": (b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest, "not origin-form"),
    "NUL in a header value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", BadRequest, "visible ASCII"),
    "NUL in a header name": (b"GET / HTTP/1.1\r\nHo\x00st: a\r\n\r\n", BadRequest, "not a header field"),
    "obs-text in a value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n", BadRequest, "visible ASCII"),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", BadRequest, "obs-fold"),
    "space before the colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", BadRequest, "not a header field"),
    "no colon": (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", BadRequest, "not a header field"),
    "absolute-form": (b"GET http://mx.example.org/ HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest, "absolute-form"),
    "asterisk-form": (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest, "not origin-form"),
    "backslash path": (b"GET /..\\x HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest, "not origin-form"),
    "broken percent-escape": (b"GET /%2 HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest, "not origin-form"),
    "fragment": (b"GET /#x HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest, "not origin-form"),
    "two spaces": (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest, "METHOD SP TARGET"),
    "tab separator": (b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest, "not an HTTP request line"),
    "leading empty line": (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", BadRequest, "METHOD SP TARGET"),
    "HTTP/0.9": (b"GET /\r\n\r\n", BadRequest, "METHOD SP TARGET"),
    "no Host in HTTP/1.1": (b"GET / HTTP/1.1\r\n\r\n", BadRequest, "without a Host"),
    "two Hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", BadRequest, "more than one Host"),
    "Host with a path": (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", BadRequest, "not a host"),
    "Host with user info": (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", BadRequest, "not a host"),
    "content": (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", BadRequest, "with content"),
    "chunked": (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", BadRequest,
                "Transfer-Encoding"),
    "POST": (b"POST / HTTP/1.1\r\nHost: a\r\n\r\n", MethodNotAllowed, "POST"),
    "lower-case get": (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", MethodNotAllowed, "get"),
    "CONNECT": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", MethodNotAllowed, "CONNECT"),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", VersionNotSupported, "HTTP/2.0"),
    "HTTP/1.2": (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", VersionNotSupported, "HTTP/1.2"),
    "not a version": (b"GET / HTTPS/1.1\r\nHost: a\r\n\r\n", BadRequest, "not an HTTP version"),
    "TLS on the plain port": (bytes.fromhex("160301") + b"\x00" * 60 + b"\r\n\r\n", BadRequest,
                              "not an HTTP request line"),
    "long target": (b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\nHost: a\r\n\r\n", UriTooLong, "1024"),
    "long garbage line": (b"x" * (MAX_REQUEST_LINE + 1), BadRequest, "not an HTTP request line"),
    "binary start": (b"\x16\x03\x01\x02\x00", BadRequest, "not an HTTP request line"),
    "long method": (b"A" * 17, BadRequest, "not an HTTP request line"),
    "huge header": (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n", HeadersTooLarge,
                    "8192"),
    "many headers": (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * MAX_HEADERS + b"\r\n", HeadersTooLarge,
                     "header lines"),
    "many small headers past the block size": (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 2000 + b"\r\n" * 1
                                               + (b"Y: " + b"b" * 2000 + b"\r\n") * 4 + b"\r\n", HeadersTooLarge,
                                               "header block"),
}


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_bad_requests_get_their_status(name, chunk):
    raw, error, words = BAD[name]
    reader = RequestReader()
    with pytest.raises(error) as refused:
        for i in range(0, len(raw), chunk or len(raw)):
            reader.receive_data(raw[i:i + (chunk or len(raw))])
    assert words in refused.value.message
    assert reader.state is State.FAILED
    with pytest.raises(BadRequest):
        reader.receive_data(b"GET / HTTP/1.1\r\n")


def test_a_huge_line_is_refused_before_it_is_all_buffered():
    reader = RequestReader()
    with pytest.raises(HeadersTooLarge):
        reader.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
        for _ in range(1000):
            reader.receive_data(b"a" * 1000)
    assert len(reader._buffer) <= MAX_HEADER_BYTES + 1000


@pytest.mark.parametrize("data", [b"", b"GET / HT"])
def test_eof_before_the_request_ends_is_a_bad_request(data):
    reader = RequestReader()
    reader.receive_data(data) if data else None
    with pytest.raises(BadRequest, match="connection ended"):
        reader.receive_data(b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_any_bytes_give_a_request_or_a_request_error(data, chunk):
    reader = RequestReader()
    try:
        for i in range(0, len(data), chunk):
            reader.receive_data(data[i:i + chunk])
        reader.receive_data(b"")
    except RequestError as error:
        assert error.status in (400, 405, 414, 431, 505) and error.message


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.binary(min_size=1, max_size=3))
def test_a_mutated_request_is_read_or_refused_never_crashes(position, replacement):
    data = GOOD[:position] + replacement + GOOD[position + 1:]
    try:
        request = read(data)
    except RequestError:
        return
    if request is not None:
        assert "\r" not in request.target + "".join(v for _, v in request.headers)


def test_responses():
    ok = response(200, b"version: STSv1\r\n", now=0)
    assert ok == (b"HTTP/1.1 200 OK\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: 16\r\nConnection: close\r\nX-Content-Type-Options: nosniff\r\n\r\n"
                  b"version: STSv1\r\n")
    head = response(200, b"version: STSv1\r\n", head=True, now=0)
    assert head == ok[:-16]
    refused = response(405, now=0)
    assert b"Allow: GET, HEAD\r\n" in refused and refused.endswith(b"\r\n\r\n405 Method Not Allowed\r\n")
    assert response(404, head=True).endswith(b"Content-Length: 15\r\nConnection: close\r\n"
                                             b"X-Content-Type-Options: nosniff\r\n\r\n")
