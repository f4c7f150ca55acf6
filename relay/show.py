"""A value that came from a peer, rendered for a log line or an error message: printable, bounded, one line.

`repr` escapes control characters (no forged log lines); reprlib bounds the
length and the depth (a 1 MiB string or a value nested 10,000 deep cannot
blow up a line or recurse).
"""

import reprlib

_shown = reprlib.Repr()
_shown.maxstring = _shown.maxother = 120
_shown.maxlevel = 3


def show(value) -> str:
    return _shown.repr(value)
