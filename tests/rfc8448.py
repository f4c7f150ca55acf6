"""Read the byte strings out of RFC 8448's example traces.

The trace text lists steps ("{server}  construct a ServerHello handshake
message") and under each, fields ("ServerHello (90 octets):  02 00 ...") whose
hex may wrap over lines and page breaks. `Trace.value(section, step, field)`
returns one field's bytes; `step` matches the start of the step's title.
"""

import re
from pathlib import Path

# A copy of ../shared/reference's trace text (test vectors carry over into the repo).
TRACE_FILE = Path(__file__).parent / "data" / "rfc8448-tls13-example-traces.txt"

_SECTION = re.compile(r"^(\d+)\.  \S")
_STEP = re.compile(r"^   \{(client|server)\}  (.*)$")
_FIELD = re.compile(r"^\s+([A-Za-z][A-Za-z ]*?) \((\d+) octets\):\s*(.*)$")
_PAGE_NOISE = re.compile(r"^(Thomson|Internet-Draft|RFC 8448)\s")
_HEX = re.compile(r"^(?:[0-9a-f]{2}\s*)+$")


class Trace:
    def __init__(self, path: Path = TRACE_FILE):
        self._values: list[tuple[int, str, str, bytes]] = []
        self._parse(path.read_text().splitlines())

    def _parse(self, lines: list[str]) -> None:
        section, step = 0, ""
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if (m := _SECTION.match(line)) and not line.startswith("   "):
                section = int(m.group(1))
            elif m := _STEP.match(line):
                step = f"{{{m.group(1)}}}  {m.group(2)}"
            elif (m := _FIELD.match(line)) and section:
                name, size, rest = m.group(1), int(m.group(2)), m.group(3)
                hex_text = rest if size else ""  # "(0 octets):  (empty)"
                while len(bytes.fromhex(hex_text)) < size and i < len(lines):
                    more = lines[i].strip()
                    i += 1
                    if more and not _PAGE_NOISE.match(more) and _HEX.match(more):
                        hex_text += " " + more
                data = bytes.fromhex(hex_text)
                assert len(data) == size, (section, step, name)
                self._values.append((section, step, name, data))

    def value(self, section: int, step: str, field: str, occurrence: int = 0) -> bytes:
        found = [
            data for sec, title, name, data in self._values
            if sec == section and title.startswith(step) and name == field
        ]
        if len(found) <= occurrence:
            raise KeyError(f"section {section}: no {field!r} under a step starting {step!r}")
        return found[occurrence]
