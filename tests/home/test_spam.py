"""relay/home/spam.py: rspamd's answer read into a Verdict, its headers kept to one field each, the token.

rspamd itself runs in the Molecule scenario; here a stand-in (tests/fake_rspamd.py)
answers with JSON of rspamd 3.4's shape, and hostile variants of it.
"""

import asyncio
import base64
import json
import os
import time

import pytest

from relay.home.headers import header_fields
from relay.home.spam import (
    MAX_TOKEN,
    MessageFacts,
    SpamAction,
    SpamFilter,
    SpamFilterError,
    Verdict,
    VerdictKeyError,
    load_verdict_key,
    open_verdict,
    parse_answer,
    seal_verdict,
)

from ..fake_rspamd import GTUBE, Answer, run_fake_rspamd, verdict_json

MX = "mx.example.org"
MESSAGE = b"From: a@example.net\r\nSubject: s\r\n\r\nbody\r\n"
METADATA = {"mail_from": "a@example.net", "rcpt_tos": ["u@example.org", "v@example.org"],
            "client_address": "192.0.2.7:41000", "helo": "client.example.net"}


def judge(url: str, message: bytes = MESSAGE, metadata: dict = METADATA, timeout: float = 5.0) -> Verdict:
    return asyncio.run(SpamFilter(url, timeout, MX).judge(message, MessageFacts.from_metadata(metadata, "ab" * 16)))


def answer_with(add_headers, action="no action", score=0.5) -> bytes:
    return json.dumps({"action": action, "score": score, "required_score": 15, "symbols": {"A": {}, "B": {}},
                       "milter": {"add_headers": add_headers}}).encode()


# --- the answer ---------------------------------------------------------------

def test_a_real_shaped_answer_becomes_a_verdict_with_its_headers():
    verdict = parse_answer(verdict_json("add header", 7.5, {"BAYES_SPAM": 5.0, "R_SPF_FAIL": 2.5}, MX, "a@b"))
    assert verdict.action is SpamAction.ADD_HEADER and verdict.score == 7.5 and verdict.required_score == 15
    assert verdict.symbols == ("BAYES_SPAM", "R_SPF_FAIL") and verdict.junk and verdict.refusal() is None
    block = verdict.header_block()
    names = [f.name for f in header_fields(block + b"\r\n")]
    assert names == [b"authentication-results", b"x-spamd-result", b"x-spam"]
    assert block.startswith(f"Authentication-Results: {MX};\r\n\tspf=none".encode())   # rspamd's LF folds, CRLF
    assert block.endswith(b"X-Spam: Yes\r\n") and b"\n\t" in block and b"\r\n\r\n" not in block


@pytest.mark.parametrize("action, junk, refusal", [
    ("no action", False, None), ("greylist", False, None), ("add header", True, None),
    ("rewrite subject", True, None), ("soft reject", True, "451 4.7.1"), ("reject", True, "550 5.7.1"),
])
def test_each_action_has_one_meaning(action, junk, refusal):
    verdict = parse_answer(answer_with({}, action))
    assert verdict.junk is junk
    assert (verdict.refusal() or "")[:9] == (refusal or "")
    assert verdict.header_block() == f"X-Spam: {'Yes' if junk else 'No'}\r\n".encode()


def test_header_values_in_each_form_rspamd_writes():
    verdict = parse_answer(answer_with({"X-Spam-Status": "No, score=0.5",
                                        "X-Rspamd-Score": {"value": "0.5", "order": 1},
                                        "X-Spamd-Bar": [{"value": "/", "order": 0}, "+"]}))
    assert verdict.headers == (("X-Rspamd-Score", "0.5"), ("X-Spam-Status", "No, score=0.5"),
                               ("X-Spamd-Bar", "/"), ("X-Spamd-Bar", "+"))


@pytest.mark.parametrize("name, value", [
    ("X-Spamd-Result", "default: False\r\nX-Injected: 1"),       # a second field
    ("X-Spamd-Result", "default: False\nX-Injected: 1"),         # the same with rspamd's bare LF
    ("X-Spamd-Result", "default: False\rX-Injected: 1"),         # a bare CR, which some readers end lines at
    ("X-Spamd-Result", "default: \x00False"),                    # NUL
    ("X-Spamd-Result", "default: False\n"),                      # ends the header block early
    ("X-Spamd-Result", "default: False\n\n\tbody"),              # an empty line
    ("X-Spamd-Result", "x" * 9000),                              # oversize
    ("X-Spamd-Result", 42),                                      # not text
    ("X-Spam", "No"),                                            # ours, not rspamd's to set
    ("Received", "from forged"),                                 # any other field
    ("X-Spamd-Result: x\r\nX-Injected", "1"),                    # a name that is not one
])
def test_a_header_that_is_not_one_field_of_ours_is_dropped_and_the_rest_kept(name, value, caplog):
    verdict = parse_answer(answer_with({name: value, "X-Rspamd-Score": "0.5"}))
    assert verdict.headers == (("X-Rspamd-Score", "0.5"),)
    block = verdict.header_block()
    assert [f.name for f in header_fields(block + b"\r\n")] == [b"x-rspamd-score", b"x-spam"]
    assert b"X-Injected" not in block and caplog.text


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"score": 1}', b'{"action": "discard", "score": 1, "required_score": 15}',
    b'{"action": "reject", "score": "high", "required_score": 15}',
    b'{"action": "reject", "score": NaN, "required_score": 15}',
    b'{"action": "reject", "score": true, "required_score": 15}',
])
def test_an_answer_that_is_not_a_verdict_is_an_error(body):
    with pytest.raises(SpamFilterError, match="not a verdict"):
        parse_answer(body)


# --- the request --------------------------------------------------------------

def test_the_envelope_goes_to_rspamd_in_its_request_headers():
    with run_fake_rspamd() as rspamd:
        verdict = judge(rspamd.url)
        (request,) = rspamd.requests
    assert verdict.action is SpamAction.NO_ACTION
    assert request.path == "/checkv2" and request.body == MESSAGE
    headers = request.headers
    assert (headers["IP"], headers["Helo"], headers["From"], headers["MTA-Name"], headers["Queue-Id"]) == (
        "192.0.2.7", "client.example.net", "a@example.net", MX, "ab" * 16)
    assert headers.get_all("Rcpt") == ["u@example.org", "v@example.org"]
    assert "X-YesTLS-SPF" not in headers   # the edge did not check SPF: rspamd's rule does, at home


@pytest.mark.parametrize("claim, sent", [
    ({"result": "pass", "domain": "example.net"}, "pass"), ({"result": "fail", "domain": "x"}, "fail"),
    ({"result": "temperror", "domain": ""}, "temperror"),
    ({"result": "pass\r\nX-Injected: 1"}, None), ({"result": "bogus"}, None), ("pass", None), (None, None),
])
def test_the_edges_spf_result_goes_to_rspamd_when_it_is_one(claim, sent):
    with run_fake_rspamd() as rspamd:
        judge(rspamd.url, metadata={**METADATA, "spf": claim})
        (request,) = rspamd.requests
    assert request.headers.get("X-YesTLS-SPF") == sent and "X-Injected" not in str(request.headers)


def test_gtube_is_refused_while_the_sender_waits():
    with run_fake_rspamd() as rspamd:
        verdict = judge(rspamd.url, MESSAGE + GTUBE + b"\r\n")
    assert verdict.action is SpamAction.REJECT and verdict.refusal().startswith("550 5.7.1 ")


@pytest.mark.parametrize("metadata", [
    {"helo": "x\r\nX-Injected: 1", "mail_from": "a@example.net"},
    {"helo": "h", "mail_from": "a@example.net\r\nX-Injected: 1"},
    {"helo": "h\rX-Injected: 1", "mail_from": "a@example.net", "rcpt_tos": ["u@example.org\nX-Injected: 1"]},
    {"helo": "h", "client_address": "127.0.0.1\r\nX-Injected: 1:25"},
    {"helo": ["not", "text"], "mail_from": {"not": "text"}, "client_address": 7, "rcpt_tos": "u@example.org"},
    {"helo": "h" * 300, "mail_from": "<>"},
])
def test_metadata_from_the_edge_never_becomes_a_request_header_of_its_own(metadata):
    with run_fake_rspamd() as rspamd:
        judge(rspamd.url, metadata=metadata)
        (request,) = rspamd.requests
    assert "X-Injected" not in request.headers and "X-Injected" not in str(request.headers)
    facts = MessageFacts.from_metadata(metadata)
    assert all(value.isprintable() and len(value) <= 256
               for value in (facts.helo, facts.mail_from, facts.client_ip, *facts.recipients))
    assert request.headers["From"] == (facts.mail_from or "<>")


@pytest.mark.parametrize("answer, message", [
    (Answer(500, b"internal error"), "HTTP 500"),
    (Answer(200, b"x" * (1024 * 1024 + 1)), "over"),
    (Answer(200, b'{"action": "no action"'), "not a verdict"),
])
def test_a_broken_filter_is_an_error_not_a_verdict(answer, message):
    with run_fake_rspamd() as rspamd:
        rspamd.answer = lambda request: answer
        with pytest.raises(SpamFilterError, match=message):
            judge(rspamd.url)


def test_a_slow_filter_is_an_error_after_the_timeout():
    with run_fake_rspamd() as rspamd:
        def slow(request):
            time.sleep(2)
            return Answer(body=verdict_json("no action", 0, {}, MX, ""))
        rspamd.answer = slow
        with pytest.raises(SpamFilterError, match="did not answer in 0.3 s"):
            judge(rspamd.url, timeout=0.3)


def test_no_filter_listening_is_an_error():
    with run_fake_rspamd() as rspamd:
        url = rspamd.url
    with pytest.raises(SpamFilterError, match="rspamd at 127.0.0.1"):
        judge(url)


@pytest.mark.parametrize("url", ["https://127.0.0.1:11333", "127.0.0.1:11333", "http://"])
def test_the_filter_address_is_plain_http(url):
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        SpamFilter(url, 5, MX)


# --- the token ------------------------------------------------------------------

KEY = bytes(range(32))
VERDICT = parse_answer(verdict_json("add header", 7.5, {"BAYES_SPAM": 7.5}, MX, "a@b"))


def test_a_token_opens_for_its_message_with_home_key_only():
    token = seal_verdict(KEY, MESSAGE, VERDICT)
    assert open_verdict(KEY, token, MESSAGE) == VERDICT
    assert open_verdict(KEY, token, MESSAGE + b"x") is None               # another message
    assert open_verdict(bytes(32), token, MESSAGE) is None                # another key
    body, tag = token.split(".")
    forged = json.dumps({**VERDICT.to_dict(), "action": "no action"}).encode()
    forged_body = base64.urlsafe_b64encode(forged).rstrip(b"=").decode()
    assert open_verdict(KEY, f"{forged_body}.{tag}", MESSAGE) is None      # the edge's wishful "ham"


@pytest.mark.parametrize("token", [None, 7, "", ".", "a.b.c", "nodot", "!!.!!", "a" * (MAX_TOKEN + 1)])
def test_a_token_that_is_not_one_opens_to_nothing(token):
    assert open_verdict(KEY, token, MESSAGE) is None


def test_the_verdict_key_is_made_once_owner_only_and_read_back(tmp_path):
    path = tmp_path / "verdict.key"
    key = load_verdict_key(path)
    assert len(key) == 32 and os.stat(path).st_mode & 0o777 == 0o600
    assert load_verdict_key(path) == key
    os.chmod(path, 0o640)
    with pytest.raises(VerdictKeyError, match="chmod 600"):
        load_verdict_key(path)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    with pytest.raises(VerdictKeyError, match="16 bytes, not 32"):
        load_verdict_key(short)
