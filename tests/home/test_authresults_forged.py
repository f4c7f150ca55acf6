"""Incoming header fields only home may write are removed in every form a reader could take for one.

Authentication-Results claiming our name (mx.example.org) go (RFC 8601 5),
in every legal form authres parses (folded right after the colon, comments
before and after the id, a version, any case, space before the colon, bare
LF line ends), and in forms it cannot parse that still name us (an unknown
version, a quoted id, bad syntax, too long or too deeply nested to parse). So
does every X-YesTLS-Spool-Id, which doveadm looks up for the exactly-once
check. The header block ends where Dovecot ends it (the first empty line,
LF or CRLF); a field hidden behind a bare CR inside another goes with it.
Everything else — other hosts' results, the other fields, the body — stays
byte for byte. And the Authentication-Results the intake adds is one field,
whatever the edge put in the HELO, sender or client address it names.
"""

import pytest

from relay.home.authresults import MAX_PARSED_VALUE, ForgedResultsFilter
from relay.home.headers import header_end, header_fields
from relay.home.intake import without_spool_id_headers

CHECKER = ForgedResultsFilter("mx.example.org")

TOP = b"Received: from a.example\r\n\tby mx.example.org\r\nFrom: a@example.net\r\n"
REST = (b"Authentication-Results: other.example; spf=fail smtp.mailfrom=example.net\r\n"
        b"Subject: s\r\n\r\n"
        b"Authentication-Results: mx.example.org; in the body, untouched\r\n"
        b"X-YesTLS-Spool-Id: in the body, untouched\r\n")


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


LONG_RESULTS = "; ".join(f"spf=pass smtp.mailfrom=user{i}@example.net" for i in range(300)).encode()
assert len(LONG_RESULTS) > MAX_PARSED_VALUE

FORGED_RESULTS = {  # name -> (the forged field, the line ends of the message around it)
    "plain": (b"Authentication-Results: mx.example.org; spf=pass\r\n", "crlf"),
    "folded right after the colon": (b"Authentication-Results:\r\n mx.example.org; spf=pass\r\n", "crlf"),
    "folded over several lines": (b"Authentication-Results: mx.example.org;\r\n\tspf=pass\r\n\tdkim=pass\r\n",
                                  "crlf"),
    "a comment before the id": (b"Authentication-Results: (x) mx.example.org; spf=pass\r\n", "crlf"),
    "nested comments before the id": (b"Authentication-Results: (a (b) c) mx.example.org; dkim=pass\r\n", "crlf"),
    "a version after the id": (b"Authentication-Results: mx.example.org 1; spf=pass\r\n", "crlf"),
    "comments around the version": (b"Authentication-Results: mx.example.org (c) 1 (v); spf=pass\r\n", "crlf"),
    "upper-case name and id": (b"AUTHENTICATION-RESULTS: MX.EXAMPLE.ORG; spf=pass\r\n", "crlf"),
    "mixed-case id, none": (b"authentication-results: Mx.Example.Org; none\r\n", "crlf"),
    "space before the colon": (b"Authentication-Results : mx.example.org; spf=pass\r\n", "crlf"),
    "a tab before the colon": (b"Authentication-Results\t: mx.example.org; spf=pass\r\n", "crlf"),
    "bare LF line ends": (b"Authentication-Results: mx.example.org; spf=pass\n", "lf"),
    "folded with bare LFs": (b"Authentication-Results:\n mx.example.org;\n spf=pass\n", "lf"),
    "a bare LF among CRLFs": (b"Authentication-Results: mx.example.org; spf=pass\n", "crlf"),
    "a trailing dot on the id": (b"Authentication-Results: mx.example.org.; spf=pass\r\n", "crlf"),
    "an unknown version (unparsed)": (b"Authentication-Results: mx.example.org 2; spf=pass\r\n", "crlf"),
    "a quoted id (unparsed)": (b'Authentication-Results: "mx.example.org"; spf=pass\r\n', "crlf"),
    "no result (unparsed)": (b"Authentication-Results: mx.example.org\r\n", "crlf"),
    "bad syntax (unparsed)": (b"Authentication-Results: mx.example.org; spf\r\n", "crlf"),
    "an unbalanced comment (unparsed)": (b"Authentication-Results: (a;b mx.example.org; spf=pass\r\n", "crlf"),
    "too long to parse": (b"Authentication-Results: mx.example.org; " + LONG_RESULTS + b"\r\n", "crlf"),
    "comments nested too deep to parse": (
        b"Authentication-Results: " + b"(" * 3000 + b")" * 3000 + b" mx.example.org; spf=pass\r\n", "crlf"),
    "hidden behind a bare CR in another field": (
        b"X-Note: hello\rAuthentication-Results: mx.example.org; dkim=pass\r\n", "crlf"),
    "after a line of one CR": (b"Authentication-Results: mx.example.org; spf=pass\r\n", "crlf", b"X-A: a\r\n\r\r\n"),
}

FOREIGN_RESULTS = {  # name -> a header block and body that must come back unchanged
    "another host's": b"Authentication-Results: other.example; spf=pass\r\n",
    "another host's naming us in a property": (
        b"Authentication-Results: other.example; spf=pass smtp.helo=mx.example.org\r\n"),
    "another host's naming us in a comment": (
        b"Authentication-Results: other.example (relayed by mx.example.org); spf=pass\r\n"),
    "a subdomain of our id": b"Authentication-Results: a.mx.example.org; spf=pass\r\n",
    "our id as a prefix": b"Authentication-Results: mx.example.org.evil; spf=pass\r\n",
    "another field name": b"X-Authentication-Results: mx.example.org; spf=pass\r\n",
    "another host's, unparseable": b"Authentication-Results: other.example; garbage\r\n",
}

SPOOL_IDS = {  # name -> (the forged field, line ends)
    "plain": (b"X-YesTLS-Spool-Id: " + b"0" * 32 + b"\r\n", "crlf"),
    "lower case, no space": (b"x-yestls-spool-id:" + b"0" * 32 + b"\r\n", "crlf"),
    "upper case": (b"X-YESTLS-SPOOL-ID: anything\r\n", "crlf"),
    "folded, space before the colon": (b"X-YesTLS-Spool-Id :\r\n " + b"0" * 32 + b"\r\n", "crlf"),
    "bare LF line ends": (b"X-YesTLS-Spool-Id: " + b"0" * 32 + b"\n", "lf"),
    "hidden behind a bare CR": (b"X-Note: hi\rX-YesTLS-Spool-Id: " + b"0" * 32 + b"\r\n", "crlf"),
}


def around(field: bytes, line_ends: str, before: bytes = b"") -> tuple[bytes, bytes]:
    """(a message holding `field` among other fields, after `before`; the same message without it)."""
    top, rest = (TOP, REST) if line_ends == "crlf" else (lf(TOP), lf(REST))
    return top + before + field + rest, top + before + rest


@pytest.mark.parametrize("name", FORGED_RESULTS)
def test_forged_results_with_our_name_are_removed_and_nothing_else(name, caplog):
    message, expected = around(*FORGED_RESULTS[name])
    assert CHECKER.without_forged_results(message) == expected
    assert "removed 1 incoming Authentication-Results header(s) forged with our name" in caplog.text


@pytest.mark.parametrize("name", FOREIGN_RESULTS)
def test_other_results_the_fields_and_the_body_stay_byte_for_byte(name):
    message, _ = around(FOREIGN_RESULTS[name], "crlf")
    assert CHECKER.without_forged_results(message) == message


@pytest.mark.parametrize("name", SPOOL_IDS)
def test_every_incoming_spool_id_header_is_removed(name):
    message, expected = around(*SPOOL_IDS[name])
    kept, removed = without_spool_id_headers(message)
    assert kept == expected and len(removed) == 1


def test_a_message_without_such_headers_is_returned_as_it_is():
    message = b"From: a@example.net\r\nSubject: s\r\n\r\nAuthentication-Results: mx.example.org; spf=pass\r\n"
    assert CHECKER.without_forged_results(message) is message
    assert without_spool_id_headers(message)[0] is message


@pytest.mark.parametrize("message, end", [
    (b"A: 1\r\nB: 2\r\n\r\nbody", 12),
    (b"A: 1\nB: 2\n\nbody", 10),
    (b"A: 1\r\nB: 2\n\r\nbody", 11),
    (b"A: 1\r\nB: 2\r\n\nbody", 12),
    (b"A: 1\r\n \r\nB: 2\r\n\r\nbody", 15),      # a line of one space continues A
    (b"A: 1\r\n\r\r\nB: 2\r\n\r\nbody", 15),     # a line of one CR is not empty to Dovecot's parser
    (b"A: 1\rB: 2\r\n\r\nbody", 11),            # a bare CR ends no line
    (b"\r\nbody", 0),
    (b"A: 1\r\nno body", 13),
])
def test_the_header_block_ends_at_the_first_empty_line_as_dovecot_reads_it(message, end):
    assert header_end(message) == end


def test_fields_keep_their_continuation_lines_and_line_ends():
    message = b"A: 1\r\n 2\nb :\t3\n\t4\r\nno colon\r\n\r\nbody"
    fields = header_fields(message)
    assert [f.raw for f in fields] == [b"A: 1\r\n 2\n", b"b :\t3\n\t4\r\n", b"no colon\r\n"]
    assert [f.name for f in fields] == [b"a", b"b", None]
    assert fields[1].value == b"\t3\t4"
