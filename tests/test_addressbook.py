"""The site's address book (relay/addressbook.py): what each address delivers to, and what a book may say."""

import json

import pytest

from relay.addressbook import AddressBook, AddressBookError, from_json, load

BOOK = {
    "domains": ["example.org", "example.net"],
    "mailboxes": ["user@example.org", "other@example.org", "ann@example.net"],
    "aliases": {"info@example.net": ["user@example.org", "ann@example.net"],
                "abuse@example.org": ["user@example.org"]},
    "catch_all": {"example.net": "ann@example.net"},
    "plus_separator": "+",
}


@pytest.fixture
def book() -> AddressBook:
    return from_json(BOOK)


@pytest.mark.parametrize("address, mailboxes", [
    ("user@example.org", ("user@example.org",)),
    ("USER@Example.ORG", ("user@example.org",)),
    ("user+tag@example.org", ("user@example.org",)),
    ("user+a+b@example.org", ("user@example.org",)),
    ("info@example.net", ("user@example.org", "ann@example.net")),
    ("info+lists@example.net", ("user@example.org", "ann@example.net")),
    ("abuse@example.org", ("user@example.org",)),
    ("anything@example.net", ("ann@example.net",)),                    # the catch-all
    ("postmaster@example.org", ("ann@example.net",)),                  # no alias: the first mailbox, sorted
    ("nobody@example.org", ()),
    ("nobody+user@example.org", ()),
    ("+tag@example.org", ()),
    ("user@example.com", ()),                                          # not our domain
    ("user", ()),
])
def test_what_an_address_delivers_to(book, address, mailboxes):
    assert book.deliver_to(address) == mailboxes
    assert book.accepts(address) is bool(mailboxes)


def test_postmaster_goes_to_its_alias_when_there_is_one():
    book = from_json({**BOOK, "aliases": {"postmaster@example.org": ["other@example.org"]}})
    assert book.deliver_to("postmaster@example.org") == ("other@example.org",)


def test_plus_addressing_can_be_turned_off(book):
    off = from_json({**BOOK, "plus_separator": ""})
    assert off.deliver_to("user+tag@example.org") == ()
    minus = from_json({**BOOK, "plus_separator": "-"})
    assert minus.deliver_to("user-tag@example.org") == ("user@example.org",)


def test_the_book_round_trips_through_json_and_a_file(book, tmp_path):
    path = tmp_path / "addresses.json"
    path.write_text(json.dumps(book.to_json()))
    assert load(path) == book == from_json(json.loads(json.dumps(book.to_json())))


@pytest.mark.parametrize("change, problem", [
    ({"domains": []}, "domains"),
    ({"domains": "example.org"}, "domains"),
    ({"mailboxes": ["user@example.com"]}, "not at one of the domains"),
    ({"mailboxes": ["us er@example.org"]}, "mailbox"),
    ({"mailboxes": ["user@example.org\r\nRCPT TO:<x@y.z>"]}, "mailbox"),
    ({"aliases": {"info@example.net": ["stranger@example.com"]}}, "not at one of the domains"),
    ({"aliases": {"info@example.net": ["nosuch@example.org"]}}, "must point to mailboxes"),
    ({"aliases": {"user@example.org": ["other@example.org"]}}, "also a mailbox"),
    ({"aliases": {"info@example.net": []}}, "must point to mailboxes"),
    ({"catch_all": {"example.com": "user@example.org"}}, "not one of the domains"),
    ({"catch_all": {"example.net": "nosuch@example.net"}}, "must point to a mailbox"),
    ({"plus_separator": "ab"}, "plus_separator"),
    ({"plus_separator": "x"}, "plus_separator"),
    ({"surprise": 1}, "unknown keys"),
])
def test_a_book_that_does_not_add_up_is_refused_with_the_reason(change, problem):
    with pytest.raises(AddressBookError) as refused:
        from_json({**BOOK, **change})
    assert problem in str(refused.value)


def test_a_broken_file_names_itself(tmp_path):
    path = tmp_path / "addresses.json"
    path.write_text("{not json")
    with pytest.raises(AddressBookError) as refused:
        load(path)
    assert str(path) in str(refused.value)
