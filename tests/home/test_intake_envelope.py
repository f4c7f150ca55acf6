"""The envelope the intake takes from sealed metadata: an RFC 5321 path for LMTP, or an EnvelopeError.

What a real edge records passes unchanged (the null sender as "" too);
anything that could end an LMTP command, break out of the angle brackets,
exceed RFC 5321's lengths, carry non-ASCII without SMTPUTF8, or is not an
address at all is refused with a reason. Real-path tests of the same (the
message quarantined, nobody's mailbox touched) are in
tests/home/test_intake_hostile_content.py.
"""

import unicodedata

import pytest

from relay.home.envelope import MAX_RECIPIENTS, Envelope, EnvelopeError, envelope_from_metadata
from relay.smtp.address import AddressError, check_mailbox

ACCEPTED = [
    ("user@example.org", False),
    ("first.last+tag@sub.example.org", False),
    ("!#$%&'*+-/=?^_`{|}~@example.org", False),
    ('"with space"@example.org', False),
    ('"quoted\\"pair"@example.org', False),
    ("user@[192.0.2.1]", False),
    ("user@[IPv6:2001:db8::1]", False),
    ("user@localhost", False),
    ("a" * 64 + "@example.org", False),
    ("u@" + ".".join(["a" * 63] * 3) + "." + "b" * 60, False),   # 254 octets in all
    ("zoë@exämple.org", True),
    ("用户@例子.广告", True),
]

REFUSED = [
    ("user@example.org>\r\nRCPT TO:<victim@example.org", False, "'>'"),
    ("user@example.org\r\nRCPT TO:victim@example.org", False, "'\\r'"),
    ("user@example.org\nRCPT TO:<victim@example.org>", False, "'\\n'"),
    ("user@example.org\r", False, "'\\r'"),
    ("us\x00er@example.org", False, "'\\x00'"),
    ("us\x7fer@example.org", False, "'\\x7f'"),
    ("us\x85er@example.org", True, "'\\x85'"),           # C1 next-line
    ("us\u2028er@example.org", True, "'\\u2028'"),       # line separator
    ("user@example.org> NOTIFY=NEVER", False, "'>'"),
    ("<user@example.org>", False, "'<'"),
    ('"a>b"@example.org', False, "'>'"),
    ("user", False, "no @domain"),
    ("@example.org", False, "local part"),
    ("a..b@example.org", False, "local part"),
    (".a@example.org", False, "local part"),
    ("a b@example.org", False, "local part"),
    ("user@", False, "domain"),
    ("user@-example.org", False, "domain"),
    ("user@example..org", False, "domain"),
    ("user@example.org.", False, "domain"),
    ("user@exa_mple.org", False, "domain"),
    ("user@[300.1.1.1]", False, "domain"),
    ("user@[IPv6:nope]", False, "domain"),
    ("a" * 65 + "@example.org", False, "longer than 64"),
    ("u@" + "a" * 64 + ".org", False, "domain"),
    ("u@" + ".".join(["a" * 63] * 3) + "." + "b" * 61, False, "255 octets"),
    ("zoë@example.org", False, "SMTPUTF8"),
    ("user@exämple.org", False, "SMTPUTF8"),
    ("user@ex\u00e4-.org", True, "domain"),
    ("user@\ud800.org", True, "Unicode"),
    (42, False, "not a string"),
    (None, False, "not a string"),
    (["user@example.org"], False, "not a string"),
]


@pytest.mark.parametrize("address, smtputf8", ACCEPTED)
def test_real_addresses_are_accepted_unchanged(address, smtputf8):
    assert check_mailbox(address, smtputf8) == address


@pytest.mark.parametrize("address, smtputf8, reason", REFUSED)
def test_addresses_unfit_for_an_lmtp_path_are_refused_with_a_reason(address, smtputf8, reason):
    with pytest.raises(AddressError) as refused:
        check_mailbox(address, smtputf8)
    assert reason in str(refused.value)
    assert "\r" not in str(refused.value) and "\n" not in str(refused.value), "the reason is one log line"


@pytest.mark.parametrize("smtputf8", [False, True])
def test_every_ascii_character_is_judged_as_its_unicode_category_says(smtputf8):
    """ASCII addresses take a shorter path through the character check: it refuses exactly the characters
    whose category the long path refuses (controls, DEL) and `<`, `>`, at the start, middle and end."""
    for code in range(128):
        character = chr(code)
        forbidden = unicodedata.category(character) == "Cc" or character in "<>"
        for address in (f"{character}a@example.org", f"a{character}b@example.org", f"a@example.org{character}"):
            try:
                check_mailbox(address, smtputf8)
                refused_for_it = False
            except AddressError as error:
                refused_for_it = f"holds the character {character!r}" in str(error)
            assert refused_for_it == forbidden, (code, address)


def test_what_a_real_edge_records_is_the_envelope():
    metadata = {"mail_from": "alice@sender.example.net", "rcpt_tos": ["user@example.org", "second@example.org"],
                "smtputf8": False, "mail_options": ["BODY=8BITMIME"], "helo": "sender.example.net"}
    assert envelope_from_metadata(metadata) == Envelope(
        "alice@sender.example.net", ("user@example.org", "second@example.org"), False)


@pytest.mark.parametrize("recorded", ["<>", ""])
def test_the_null_sender_is_allowed_for_mail_from_only(recorded):
    assert envelope_from_metadata({"mail_from": recorded, "rcpt_tos": ["user@example.org"]}).mail_from == ""
    with pytest.raises(EnvelopeError):
        envelope_from_metadata({"mail_from": "alice@example.net", "rcpt_tos": [recorded]})


@pytest.mark.parametrize("metadata, reason", [
    ({"rcpt_tos": ["user@example.org"]}, "no mail_from"),
    ({"mail_from": "a@example.net"}, "rcpt_tos is None"),
    ({"mail_from": "a@example.net", "rcpt_tos": []}, "non-empty list"),
    ({"mail_from": "a@example.net", "rcpt_tos": "user@example.org"}, "non-empty list"),
    ({"mail_from": "a@example.net", "rcpt_tos": {"user@example.org": 1}}, "non-empty list"),
    ({"mail_from": "a@example.net", "rcpt_tos": ["user@example.org", 7]}, "rcpt_tos[1]"),
    ({"mail_from": "a@example.net", "rcpt_tos": ["user@example.org", "v@example.org>\r\nDATA"]}, "rcpt_tos[1]"),
    ({"mail_from": "a@example.net", "rcpt_tos": ["user@example.org"] * (MAX_RECIPIENTS + 1)}, "more than"),
    ({"mail_from": "a@example.net", "rcpt_tos": ["user@example.org"], "smtputf8": "yes"}, "smtputf8"),
    ({"mail_from": "a@example.net", "rcpt_tos": ["user@example.org"], "smtputf8": 1}, "smtputf8"),
    ({"mail_from": 5, "rcpt_tos": ["user@example.org"]}, "mail_from"),
])
def test_an_envelope_that_is_not_one_is_refused_whole(metadata, reason):
    with pytest.raises(EnvelopeError) as refused:
        envelope_from_metadata(metadata)
    assert reason in str(refused.value)


def test_smtputf8_lets_utf8_addresses_through():
    envelope = envelope_from_metadata({"mail_from": "zoë@exämple.org", "rcpt_tos": ["用户@例子.广告"],
                                       "smtputf8": True})
    assert envelope == Envelope("zoë@exämple.org", ("用户@例子.广告",), True)
