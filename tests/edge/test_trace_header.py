"""The HELO name as the edge writes it into its Received header (relay/edge/handler.py `_clean`)."""

from hypothesis import given
from hypothesis import strategies as st

from relay.edge.handler import _clean


def kept(text: str) -> str:
    """What may appear: printable characters but parentheses and backslashes (no comment games), 255 at most."""
    return "".join(c for c in text if c.isprintable() and c not in "()\\")[:255]


@given(st.text(max_size=400) | st.text(alphabet="abc.-()\\\r\n\t\x00é", max_size=300))
def test_only_printable_characters_outside_comments_are_kept(text):
    assert _clean(text) == kept(text)


def test_a_plain_name_is_kept_whole_and_a_long_one_cut():
    assert _clean("client.sender.test") == "client.sender.test"
    assert _clean("a" * 300) == "a" * 255
    assert _clean("evil) by mx.example.org (") == "evil by mx.example.org "
