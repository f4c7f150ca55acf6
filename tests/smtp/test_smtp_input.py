"""SMTP input as the edge reads it: command lines and DATA content, against a byte-by-byte model of the rules.

The model below is the specification written the slow, obvious way; the
readers under test are written for speed (bulk searches). Hypothesis feeds
both the same streams, cut into pieces at random places, and the answers
must agree: where the content ends, what it is after un-stuffing, and which
rule a stream breaks.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.input import CommandScanner, DataReader, Hold, Violation

COMMAND_LIMIT = 512

# --- the model ---------------------------------------------------------------------------------------


def model_data(stream: bytes, max_size: int = 1 << 30):
    """(content, violation, bytes consumed, done) for DATA content, one byte at a time."""
    content = bytearray()
    violation = None
    i, line_start = 0, True
    while i < len(stream):
        if line_start and stream[i:i + 3] == b".\r\n":
            return bytes(content), violation, i + 3, True
        if line_start and stream[i:i + 1] == b".":
            if len(stream) - i < 3 and b".\r\n".startswith(stream[i:]):
                break  # perhaps the end: not known yet
            i += 1  # a stuffed dot
        line_start = False
        byte = stream[i]
        if byte == 0x0D:
            if i + 1 == len(stream):
                break
            if stream[i + 1] != 0x0A:
                return bytes(content), Violation.BARE_CR, None, True
            content += b"\r\n"
            i += 2
            line_start = True
        elif byte == 0x0A:
            return bytes(content), Violation.BARE_LF, None, True
        else:
            if byte == 0 and violation is None:
                violation = Violation.NUL
            content.append(byte)
            i += 1
        if violation is None and len(content) > max_size:
            violation = Violation.TOO_BIG
    return bytes(content), violation, None, False


def model_commands(stream: bytes):
    """[(offset after the line, Hold)] for each DATA/BDAT/STARTTLS line, then (None, Violation) if one is broken."""
    events = []
    i = line_start = 0
    while i < len(stream):
        byte = stream[i]
        if byte == 0x0D:
            if i + 1 == len(stream):
                break
            if stream[i + 1] != 0x0A:
                return events + [(None, Violation.BARE_CR)]
            i += 2
            line = stream[line_start:i - 2]
            verb = line.split(b" ", 1)[0].upper()
            if len(line) <= COMMAND_LIMIT and verb in (b"DATA", b"BDAT", b"STARTTLS"):
                events.append((i, Hold(verb)))
            line_start = i
        elif byte == 0x0A:
            return events + [(None, Violation.BARE_LF)]
        else:
            i += 1
    return events


# --- driving the readers in pieces -------------------------------------------------------------------

def pieces(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:])] or [b""]


# Around each piece, as in a receive buffer: bytes the readers must never look at.
AROUND = b"\r\n.\r\n\n\r\x00DATA\r\n"


def in_buffer(chunk: bytes) -> tuple[bytearray, int, int]:
    """`chunk` inside a larger bytearray, and where it starts and ends there."""
    return bytearray(AROUND + chunk + AROUND), len(AROUND), len(AROUND) + len(chunk)


def read_data(chunks: list[bytes], max_size: int = 1 << 30):
    got = bytearray()
    reader = DataReader(lambda view: got.extend(view), max_size)
    consumed = 0
    for chunk in chunks:
        buffer, start, end = in_buffer(chunk)
        used = reader.feed(buffer, start, end) - start
        if reader.done:
            consumed += used
            break
        assert used == len(chunk), "a piece not all taken before the end"
        consumed += used
    return bytes(got), reader, consumed


def scan_commands(chunks: list[bytes]):
    scanner = CommandScanner(COMMAND_LIMIT)
    events, offset = [], 0
    for piece in chunks:
        chunk, first, last = in_buffer(piece)
        position = first
        while position < last:
            scan = scanner.scan(chunk, position, last)
            assert position <= scan.end <= last
            position = scan.end
            if isinstance(scan.stop, Violation):
                return events + [(None, scan.stop)]
            if isinstance(scan.stop, Hold):
                events.append((offset + scan.end - first, scan.stop))
            else:
                assert scan.end == last
        offset += len(piece)
    return events


ALPHABET = st.sampled_from([b"a", b"b", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"\x00", b" ",
                            b"DATA", b"data", b"BDAT", b"STARTTLS", b"QUIT"])
streams = st.lists(ALPHABET, max_size=60).map(b"".join)
cut_points = st.lists(st.integers(min_value=0, max_value=400), max_size=8)


@settings(max_examples=3000, deadline=None)
@given(stream=streams, cuts=cut_points)
def test_data_reader_agrees_with_the_model(stream, cuts):
    content, violation, consumed, done = model_data(stream)
    got, reader, used = read_data(pieces(stream, cuts))
    assert reader.done == done
    if done:
        assert reader.violation == violation
        if not (violation and violation.ends_session):
            assert got == content or violation is Violation.NUL
            assert reader.size == len(content)
            assert used == consumed
    else:
        assert reader.violation in (None, Violation.NUL) and content.startswith(got) and used == len(stream)


@settings(max_examples=3000, deadline=None)
@given(stream=streams, cuts=cut_points)
def test_command_scanner_agrees_with_the_model(stream, cuts):
    assert scan_commands(pieces(stream, cuts)) == model_commands(stream)


@settings(max_examples=500, deadline=None)
@given(lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                      max_size=30), cuts=cut_points)
def test_stuffed_content_comes_back_exactly(lines, cuts):
    """What a correct client sends (CRLF lines, leading dots doubled, CRLF . CRLF) is read back byte for byte."""
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    got, reader, used = read_data(pieces(stuffed + b".\r\nQUIT\r\n", cuts))
    assert reader.done and used == len(stuffed) + 3
    assert reader.violation == (Violation.NUL if b"\x00" in message else None)
    if reader.violation is None:
        assert got == message


# --- the smuggling forms, one by one -------------------------------------------------------------------

SECOND = b"MAIL FROM:<a@evil.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nsmuggled\r\n"
# Each a line end + "." + line end that some software takes for the end of the message.
FALSE_ENDS = {
    "LF.LF": (b"\n.\n", Violation.BARE_LF),
    "LF.CRLF": (b"\n.\r\n", Violation.BARE_LF),
    "CR.CR": (b"\r.\r", Violation.BARE_CR),
    "CRLF.LF": (b"\r\n.\n", Violation.BARE_LF),
    "CR.CRLF": (b"\r.\r\n", Violation.BARE_CR),
    "CRLF.CR": (b"\r\n.\r", Violation.BARE_CR),
    "LF..CRLF": (b"\n..\r\n", Violation.BARE_LF),
    "CR..CR": (b"\r..\r", Violation.BARE_CR),
    "CRLF..LF": (b"\r\n..\n", Violation.BARE_LF),
    "CR.LF": (b"\r.\n", Violation.BARE_CR),
}


@pytest.mark.parametrize("false_end, expected", FALSE_ENDS.values(), ids=FALSE_ENDS.keys())
@pytest.mark.parametrize("piece_size", [1, 2, 3, 7, 1 << 20])
def test_a_false_end_never_ends_the_message_and_stops_the_session(false_end, expected, piece_size):
    stream = b"Subject: hi\r\n\r\nbody" + false_end + SECOND + b".\r\nQUIT\r\n"
    got, reader, _ = read_data([stream[i:i + piece_size] for i in range(0, len(stream), piece_size)])
    assert reader.done and reader.violation is expected and expected.ends_session
    assert b"smuggled" not in got and b"MAIL FROM" not in got


@pytest.mark.parametrize("false_end", [form for form, _ in FALSE_ENDS.values()], ids=FALSE_ENDS.keys())
def test_a_false_end_in_a_command_line_stops_the_session(false_end):
    stream = b"NOOP" + false_end + b"RSET\r\n"
    assert scan_commands([stream])[-1][1] in (Violation.BARE_LF, Violation.BARE_CR)


@pytest.mark.parametrize("where", ["start", "middle", "before the end"])
def test_nul_is_read_to_the_end_then_refused(where):
    body = {"start": b"\x00body\r\n", "middle": b"bo\x00dy\r\n", "before the end": b"body\x00\r\n"}[where]
    got, reader, used = read_data([b"Subject: x\r\n\r\n" + body + b".\r\nQUIT\r\n"])
    assert reader.done and reader.violation is Violation.NUL
    assert used == len(b"Subject: x\r\n\r\n" + body) + 3  # the QUIT after it is a command again


def test_too_big_is_read_to_the_end_then_refused_and_the_sink_gets_no_more():
    line = b"x" * 78 + b"\r\n"
    got, reader, used = read_data([line * 100 + b".\r\n"], max_size=1000)
    assert reader.done and reader.violation is Violation.TOO_BIG
    assert len(got) <= 1000 and reader.size == 8000 and used == 8003


def test_an_empty_message_and_dot_lines():
    assert read_data([b".\r\n"])[0] == b""
    stream = b"..\r\n...\r\n. \r\n.x\r\n.\r\n"
    got, reader, used = read_data([stream + b"QUIT\r\n"])
    assert got == b".\r\n..\r\n \r\nx\r\n" and reader.violation is None and used == len(stream)


def test_long_lines_go_through_whole():
    line = b"w" * 5000 + b"\r\n"
    got, reader, _ = read_data([line + b".\r\n"])
    assert got == line and reader.violation is None


def test_data_bdat_and_starttls_lines_are_held_after_and_only_within_the_command_limit():
    stream = b"EHLO x\r\nDATA\r\ndata  \r\nDATA x\r\nstarttls\r\nDATAX\r\nNOOP DATA\r\nbdat 10 LAST\r\n" \
             + b"DATA " + b"y" * COMMAND_LIMIT + b"\r\n"
    holds = scan_commands([stream])
    assert [hold for _, hold in holds] == [Hold.DATA, Hold.DATA, Hold.DATA, Hold.STARTTLS, Hold.BDAT]
    assert holds[0][0] == len(b"EHLO x\r\nDATA\r\n")
