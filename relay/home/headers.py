"""A message's header block as Dovecot reads it, and taking header fields out of it byte for byte.

The intake removes fields only home may write (a forged Authentication-Results
with our name, an X-YesTLS-Spool-Id) from messages whatever the edge sealed,
so it must see the fields Dovecot will store, not the ones a stricter parser
would. Dovecot's header parser (lib-mail message-header-parser.c) ends a
line at LF, with or without one CR before it; ends the header block at the
first empty line ("\\n" or "\\r\\n"); continues a field on a line that
starts with a space or tab; and names a field by what precedes its first
colon, spaces and tabs before the colon dropped (RFC 5322's obsolete
syntax). This module does the same. (Dovecot storing mail with LF line ends
also reads a "\\r\\r\\n" line as empty, ending the block sooner; the block
read here is then the longer one, so nothing Dovecot takes for a header
escapes the check.)

Other readers (MUAs, filters, and the DATA fallback of relay/home/lmtp.py,
which makes every bare CR a line end) may also end a line at a bare CR:
`Field.readings()` is a field as they read it, so a field hidden behind a
bare CR inside another one is found too, and the whole field holding it is
removed.

Kept fields, the order of fields and the body stay exactly as they were
(DKIM signatures over them keep verifying). Python's email package is not
used: it re-serialises what it parses and ends the header block at the
first line it cannot parse, which is not where Dovecot ends it.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

_EMPTY_LINE = re.compile(rb"\n\r?\n")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+")                   # Dovecot's lines: to each LF
_ANY_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")  # a lenient reader's: to each CRLF, CR or LF
_LINE_ENDS = re.compile(rb"[\r\n]")


@dataclass(frozen=True)
class Field:
    raw: bytes   # the whole field as it is in the message: its folded lines and their line ends

    @property
    def name(self) -> bytes | None:
        """The field name, lower-cased, spaces and tabs around it dropped; None for a line without a colon."""
        first_line = _LINE.match(self.raw).group()
        name, colon, _ = first_line.partition(b":")
        return name.strip(b" \t").lower() if colon else None

    @property
    def value(self) -> bytes:
        """What follows the first colon, unfolded (every CR and LF removed)."""
        return _LINE_ENDS.sub(b"", self.raw.partition(b":")[2])

    def readings(self) -> list["Field"]:
        """The field as a reader that also ends lines at a bare CR reads it: one or more fields."""
        if b"\r" not in self.raw.replace(b"\r\n", b""):
            return [self]
        return _group(_ANY_LINE.findall(self.raw))


def header_end(message: bytes) -> int:
    """Where the header block ends: the offset of the empty line after it (the message's length if none)."""
    if message.startswith((b"\n", b"\r\n")):
        return 0
    empty = _EMPTY_LINE.search(message)
    return empty.start() + 1 if empty else len(message)


def header_fields(message: bytes) -> list[Field]:
    """The fields of the header block in order, each with its continuation lines."""
    return _group(_LINE.findall(message[:header_end(message)]))


def without_fields(message: bytes, unwanted: Callable[[Field], bool]) -> tuple[bytes, list[Field]]:
    """The message without each header field of which any reading is `unwanted`; and the fields removed.

    The message itself is returned when nothing is removed.
    """
    end = header_end(message)
    kept: list[bytes] = []
    removed: list[Field] = []
    for field in _group(_LINE.findall(message[:end])):
        if any(unwanted(reading) for reading in field.readings()):
            removed.append(field)
        else:
            kept.append(field.raw)
    if not removed:
        return message, removed
    return b"".join(kept) + message[end:], removed


def _group(lines: list[bytes]) -> list[Field]:
    fields: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    return [Field(b"".join(lines)) for lines in fields]
