"""Incoming Authentication-Results headers that claim our name are removed (RFC 8601 5); others stay."""

from relay.home.authresults import AuthenticationChecker


def test_forged_results_with_our_name_are_removed_with_their_continuations():
    checker = AuthenticationChecker("mx.example.org")
    message = (b"From: a@example.net\r\n"
               b"Authentication-Results: MX.example.org; spf=pass\r\n  dkim=pass\r\n"
               b"Authentication-Results: other.example; spf=fail\r\n"
               b"Subject: s\r\n\r\n"
               b"Authentication-Results: mx.example.org; in the body, untouched\r\n")
    assert checker.without_forged_results(message) == (
        b"From: a@example.net\r\n"
        b"Authentication-Results: other.example; spf=fail\r\n"
        b"Subject: s\r\n\r\n"
        b"Authentication-Results: mx.example.org; in the body, untouched\r\n")


def test_a_message_without_such_headers_is_returned_unchanged():
    checker = AuthenticationChecker("mx.example.org")
    message = b"From: a@example.net\r\nSubject: s\r\n\r\nbody\r\n"
    assert checker.without_forged_results(message) is message
