"""A paper copy of home's spool private key: text a person copies by hand and types back.

`yestls keys export-spool --paper` prints it, `yestls keys import-spool`
reads it back (relay/keys/cli.py); docs/spool-format.md, "Paper copy of the
spool key", shows it in use. Format 1, for a mlkem768-x25519 key:

    # YesTLS home spool PRIVATE key, paper copy (format 1): whoever holds it can open home's mail.
    # suite mlkem768-x25519, public key fingerprint 0f3a9c41d2e87b65
    # Type it back with `yestls keys import-spool`: the numbered lines and the checksum line.
    1: aeaq 2k3b ... (6 groups of 4)  cc
    ...
    7: xxxx xxxx xxxx x  cc
    checksum: kkkk kkkk  cc

The key bytes are one version byte (1), the suite's byte (as in a sealed
file: 1 mlkem768-x25519, 2 x25519), then SpoolPrivateKey.raw: the 64-byte
ML-KEM-768 seed and the 32-byte X25519 key (98 bytes: 157 characters, 7
lines, the last of 13), or the X25519 key alone (34 bytes: 55 characters, 3
lines, the last of 7). They are written in base32 (RFC 4648 alphabet, no
padding; printed in lower case, read in either), 24 characters (15 bytes) a
line in groups of 4. Each line starts with its number and a colon and ends
with its check: the first two base32 characters (10 bits) of
SHA-256("N:" + the line's characters in upper case, no spaces), N the line
number in decimal; so a typo, or a line typed under the wrong number, is
found on its line, except 1 time in 1024. The checksum line holds the first
5 bytes of SHA-256 of the key bytes (8 characters), with a check of its own
computed the same way with "checksum" for N; it catches a line copied from
another key's paper and a typo that slipped past its line's check. The
fingerprint is the first 16 hex digits of SHA-256 of the public key line
(`yestls keys spool-new` prints it; spool.pub holds it), so a person can
tell which key a paper is for with `printf %s "$(cat spool.pub)" | sha256sum`.

Reading ignores blank lines, lines starting with "#" and any line that does
not start with a digit or "checksum" (the header, copied or not), the
spaces inside a line and case; lines may come in any order since each names
its number. It names every line that is wrong, then a missing line, then the
checksum.

Why base32 and not a word list (BIP-39's 2048 words, the PGP word list): the
key is 98 bytes, about 75 words, some 450 letters to write and type against
157 characters here; base32 needs no list to ship or trust (the standard
library has it), its alphabet has no 0, 1, 8 or 9 to confuse with O, I or l,
B or g, and BIP-39's own checksum is made for 16 to 32 bytes of entropy, not
for this key. Words are easier to read aloud; this paper is copied by the
person who types it back, and the per-line checks find a typo where it is.
"""

import base64
import hashlib
import re

from relay.spool.keys import SUITES_BY_CODE, SpoolPrivateKey, SpoolPublicKey, spool_private_key

PAPER_VERSION = 1
GROUP = 4            # characters a group
LINE = 6 * GROUP     # characters a line (15 bytes)
CHECK = 2            # characters of a line's check
CHECKSUM_BYTES = 5   # of SHA-256 of the key bytes: 8 characters
CHECKSUM_LABEL = "checksum"
ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
LOOKALIKES = {"0": "o", "1": "l or i", "8": "b", "9": "g"}

_KEY_LINE = re.compile(r"(\d+)\s*:(.*)")
_CHECKSUM_LINE = re.compile(CHECKSUM_LABEL + r"\s*:(.*)", re.IGNORECASE)


class PaperError(ValueError):
    """Text that is not a paper copy of a spool key; the message names the line that is wrong, or the checksum."""


def fingerprint(public_key: SpoolPublicKey) -> str:
    """The first 16 hex digits of SHA-256 of the public key line, as `sha256sum` shows them."""
    return hashlib.sha256(public_key.text.encode("ascii")).hexdigest()[:16]


def paper_text(key: SpoolPrivateKey) -> str:
    """The paper copy of `key`: the header, the numbered lines, the checksum line (format above)."""
    payload = bytes([PAPER_VERSION, key.suite.code]) + key.raw
    lines = [
        f"# YesTLS home spool PRIVATE key, paper copy (format {PAPER_VERSION}): whoever holds it can open "
        f"home's mail.",
        f"# suite {key.suite.name}, public key fingerprint {fingerprint(key.public_key)}",
        "# Type it back with `yestls keys import-spool`: the numbered lines and the checksum line.",
    ]
    chars = _b32(payload)
    for number, start in enumerate(range(0, len(chars), LINE), 1):
        lines.append(_line(str(number), chars[start:start + LINE]))
    lines.append(_line(CHECKSUM_LABEL, _b32(_checksum(payload))))
    return "\n".join(lines) + "\n"


def read_paper(text: str) -> SpoolPrivateKey:
    """The key a paper copy holds; PaperError names what is wrong and where."""
    numbered, checksum = _parse(text)
    errors = [f"line {n}: {problem}" for n, problem in sorted(_line_problems(numbered).items())]
    if checksum is not None and _check(CHECKSUM_LABEL, checksum[:-CHECK]) != checksum[-CHECK:]:
        errors.append("checksum line: check does not match: a typo on this line")
    if errors:
        raise PaperError("; ".join(errors))
    if 1 not in numbered:
        raise PaperError("line 1 is missing (it names the key's suite)")
    first = numbered[1][:-CHECK]
    if len(first) < 8:
        raise PaperError(f"line 1: {len(first)} characters where the paper has {LINE}")
    version, code = base64.b32decode(first[:8])[:2]
    if version != PAPER_VERSION:
        raise PaperError(f"line 1: paper copy format {version} is unknown; this yestls reads format "
                         f"{PAPER_VERSION} (was the paper written by a newer yestls?)")
    if code not in SUITES_BY_CODE:
        known = ", ".join(f"{c} {suite.name}" for c, suite in sorted(SUITES_BY_CODE.items()))
        raise PaperError(f"line 1: suite code {code} is unknown (known: {known})")
    suite = SUITES_BY_CODE[code]
    total = -(-(2 + suite.private_length) * 8 // 5)
    count = -(-total // LINE)
    missing = [f"line {n} is missing" for n in range(1, count + 1) if n not in numbered]
    extra = [f"line {n}: a {suite.name} key has {count} lines (is this line from another paper?)"
             for n in sorted(numbered) if n > count]
    if missing or extra:
        raise PaperError("; ".join(missing + extra))
    if checksum is None:
        raise PaperError(f"the checksum line is missing (after line {count}: '{CHECKSUM_LABEL}: ...')")
    for n in range(1, count + 1):
        expected = min(LINE, total - (n - 1) * LINE)
        if len(numbered[n]) - CHECK != expected:
            raise PaperError(f"line {n}: {len(numbered[n]) - CHECK} characters where a {suite.name} key's "
                             f"paper has {expected} (is this line from another paper?)")
    chars = "".join(numbered[n][:-CHECK] for n in range(1, count + 1))
    payload = base64.b32decode(chars + "=" * (-len(chars) % 8))
    if _b32(payload) != chars:
        raise PaperError(f"line {count}: its last character cannot end a key: a typo on this line")
    if _b32(_checksum(payload)) != checksum[:-CHECK]:
        raise PaperError("checksum does not match: every line passes its own check, so a line is from "
                         "another key's paper, or a typo slipped past its line's check (1 time in 1024): "
                         "compare each line with the paper again")
    return spool_private_key(suite, payload[2:])


def _parse(text: str) -> tuple[dict[int, str], str | None]:
    """The key lines by number and the checksum line, each as its characters in upper case without spaces."""
    numbered: dict[int, str] = {}
    checksum = None
    errors = []
    for place, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key_line = _KEY_LINE.fullmatch(line)
        checksum_line = _CHECKSUM_LINE.fullmatch(line)
        if key_line is None and line[0].isdigit():
            errors.append(f"input line {place} ({line[:20]!r}): a key line starts with its number and a colon")
            continue
        if key_line is None and checksum_line is None:
            continue   # the header, copied or not
        label = f"line {int(key_line[1])}" if key_line else "checksum line"
        body = "".join((key_line[2] if key_line else checksum_line[1]).split()).upper()
        wrong = sorted(set(body) - ALPHABET)
        if wrong:
            hints = "".join(f" ({c} is probably {LOOKALIKES[c]})" for c in wrong if c in LOOKALIKES)
            errors.append(f"{label}: {', '.join(map(repr, wrong))} not in base32 (a to z, 2 to 7){hints}")
        elif len(body) <= CHECK:
            errors.append(f"{label}: too short to hold its check")
        elif key_line is None:
            if checksum is not None:
                errors.append("the checksum line is given twice")
            checksum = body
        elif int(key_line[1]) in numbered:
            errors.append(f"{label} is given twice")
        else:
            numbered[int(key_line[1])] = body
    if errors:
        raise PaperError("; ".join(errors))
    if not numbered and checksum is None:
        raise PaperError("no key lines found: each starts with its number and a colon, '1: ...'")
    return numbered, checksum


def _line_problems(numbered: dict[int, str]) -> dict[int, str]:
    """Each line whose check does not match, with what it is likely to be."""
    last = max(numbered)
    problems = {}
    for n, body in numbered.items():
        data = body[:-CHECK]
        if _check(str(n), data) == body[-CHECK:]:
            continue
        problem = "check does not match: a typo on this line"
        if len(data) > LINE:
            problem += f" ({len(data)} characters; a line has at most {LINE})"
        elif n < last and len(data) < LINE:
            problem += f" ({len(data)} characters; every line but the last has {LINE})"
        problems[n] = problem
    return problems


def _line(label: str, chars: str) -> str:
    groups = " ".join(chars[i:i + GROUP] for i in range(0, len(chars), GROUP))
    return f"{label}: {groups.lower()}  {_check(label, chars).lower()}"


def _check(label: str, chars: str) -> str:
    return _b32(hashlib.sha256(f"{label}:{chars}".encode("ascii")).digest()[:2])[:CHECK]


def _checksum(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()[:CHECKSUM_BYTES]


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=")


