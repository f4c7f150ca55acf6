"""Incoming Authentication-Results fields forged with our name, removed (RFC 8601 5).

The results themselves are rspamd's (relay/home/spam.py): its SPF, DKIM and
DMARC modules are the one place they are computed, and the field it writes
carries our authserv-id. This module makes sure no field the sender sent can
pass for that one.

**Forged results.** Before adding ours, every incoming Authentication-Results
field that names our authserv-id is removed (RFC 8601 5: a reader trusts the
fields with its border's name, so the border must not pass a forged one).
The fields are those Dovecot will store (relay/home/headers.py: its line
ends, where its header block ends, obsolete space before the colon, a field
hidden behind a bare CR). Each field's value is parsed with authres, which
handles folding, comments before and after the id, a version after it, and
case. Hand-written here, because authres does not do it:

- a field authres cannot parse (bad syntax, an unknown version, a
  quoted-string id, which RFC 8601 allows and authres does not read, or a
  value too long to parse cheaply) is removed when our id appears in it as a
  word at all: a lenient reader could take it for ours, and RFC 8601 5
  allows a border to remove any Authentication-Results field entering its
  trust boundary, so a foreign one mentioning us is lost at worst;
- the id compared without a trailing dot (`mx.example.org.` is the same
  host);
- a cap on the work: authres' parser takes time quadratic in a value's
  length, so values over MAX_PARSED_VALUE bytes, and any once
  MAX_PARSED_PER_MESSAGE bytes were parsed in the message, get the word
  check instead.

Fields of other hosts that authres parses stay byte for byte as they were.
"""

import logging
import re

import authres

from relay.home.headers import Field, header_end, without_fields

log = logging.getLogger("yestls.intake")
FIELD_NAME = b"authentication-results"
MAX_PARSED_VALUE = 8 * 1024             # bytes of one value authres parses (about 25 ms at this length)
MAX_PARSED_PER_MESSAGE = 64 * 1024      # bytes authres parses per message; the rest get the word check


class ForgedResultsFilter:
    def __init__(self, authserv_id: str):
        self.authserv_id = authserv_id
        self._our_id = authserv_id.lower().rstrip(".")
        # Our id as a whole word: not part of a longer name (a.mx.example.org, mx.example.org.evil).
        self._our_id_as_word = re.compile(rf"(?<![\w.-]){re.escape(self._our_id)}\.?(?![\w.-])", re.IGNORECASE)

    def without_forged_results(self, message: bytes) -> bytes:
        """The message without Authentication-Results fields claiming our name (see the module)."""
        if b"authentication-results" not in message[:header_end(message)].lower():
            return message
        budget = [MAX_PARSED_PER_MESSAGE]
        kept, removed = without_fields(message, lambda field: self._forged(field, budget))
        if removed:
            log.warning("removed %d incoming Authentication-Results header(s) forged with our name; first: %r",
                        len(removed), removed[0].raw[:200])
        return kept

    def _forged(self, field: Field, budget: list[int]) -> bool:
        if field.name != FIELD_NAME:
            return False
        value = field.value.decode("utf-8", "replace")
        if len(value) <= min(MAX_PARSED_VALUE, budget[0]):
            budget[0] -= len(value)
            try:
                parsed = authres.AuthenticationResultsHeader.parse_value(value)
            except Exception:  # noqa: BLE001 - authres raises its own errors, RecursionError on deep comments, ...
                pass
            else:
                return parsed.authserv_id.rstrip(".") == self._our_id
        return self._our_id_as_word.search(value) is not None
