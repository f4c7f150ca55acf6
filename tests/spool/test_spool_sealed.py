"""The sealed spool file (relay/spool/sealed.py, docs/spool-format.md).

What home gets back is exactly what the edge sealed, for both suites and every
size that matters to the chunking (empty, small, exactly one chunk, one byte
over, many chunks, 20 MB). Any change to a sealed file — a flipped byte
anywhere, a cut at any length, chunks swapped, duplicated or dropped, bytes
appended, a header edited — and any wrong key fail with SealedError and never
return plaintext. The file holds no run of the plaintext, and sealing a large
message streamed in parts never builds the message in memory.
"""

import hashlib
import io
import json
import os
import random
import tracemalloc

import pytest

from relay.spool.keys import generate_spool_key, load_spool_private_key, parse_spool_public_key
from relay.spool.sealed import (
    DEFAULT_CHUNK_SIZE,
    HEADER,
    MAGIC,
    TAG_LENGTH,
    VERSION,
    SealedError,
    Unsealed,
    encode_metadata,
    key_block_length,
    read_header,
    seal,
    sealed_size,
    unseal,
)

SUITES = ["mlkem768-x25519", "x25519"]
METADATA = {
    "envelope": {"mail_from": "alice@example.net", "rcpt_tos": ["bob@example.org"], "options": ["BODY=8BITMIME"]},
    "connection": {"client": ["192.0.2.7", 40123], "helo": "mx.example.net", "tls": {
        "version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "group": "X25519MLKEM768"}},
    "received": "2025-01-02T03:04:05Z",
    "note": "ünïcödé ✉",
}


class Keys:
    def __init__(self, directory, suite):
        self.public = parse_spool_public_key(generate_spool_key(directory / "spool.key", suite))
        self.private = load_spool_private_key(directory / "spool.key")


@pytest.fixture(scope="module", params=SUITES)
def keys(request, tmp_path_factory):
    return Keys(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    """Another home's keys, of each suite."""
    return {suite: Keys(tmp_path_factory.mktemp("other-" + suite), suite) for suite in SUITES}


def sealed_bytes(keys: Keys, message: bytes, metadata=METADATA, parts: int = 3, spool_id: bytes | None = None,
                 **options) -> bytes:
    out = io.BytesIO()
    step = max(1, -(-len(message) // parts))
    pieces = [message[i:i + step] for i in range(0, len(message), step)]
    written = seal(out, keys.public, spool_id or os.urandom(16), metadata, pieces, **options)
    assert written == len(out.getvalue())
    return out.getvalue()


def content_length(metadata, message_length: int) -> int:
    return 4 + len(encode_metadata(metadata)) + message_length


# --- round trips ------------------------------------------------------------------------------------------------

ONE_CHUNK = DEFAULT_CHUNK_SIZE - content_length(METADATA, 0)


@pytest.mark.parametrize("length", [0, 1, 1000, ONE_CHUNK - 1, ONE_CHUNK, ONE_CHUNK + 1, 2 * DEFAULT_CHUNK_SIZE,
                                    3 * DEFAULT_CHUNK_SIZE + 12345, 20 * 1024 * 1024],
                         ids=["empty", "one-byte", "small", "just-under-a-chunk", "exactly-one-chunk",
                              "one-byte-over", "two-chunks-ish", "multi-chunk", "20MB"])
def test_round_trip(keys, length):
    message = random.Random(length).randbytes(length)
    spool_id = os.urandom(16)
    sealed = sealed_bytes(keys, message, spool_id=spool_id)
    assert len(sealed) == sealed_size(keys.public.suite, METADATA, length)
    opened = unseal(sealed, keys.private)
    assert opened == Unsealed(spool_id, METADATA, message)


def test_the_chunking_is_as_documented(keys):
    """Exactly one chunk of content fits one chunk; one byte more makes a second, holding that byte."""
    header_and_key = HEADER.size + key_block_length(keys.public.suite)
    one = sealed_bytes(keys, bytes(ONE_CHUNK))
    assert len(one) == header_and_key + DEFAULT_CHUNK_SIZE + TAG_LENGTH
    two = sealed_bytes(keys, bytes(ONE_CHUNK + 1))
    assert len(two) == header_and_key + DEFAULT_CHUNK_SIZE + TAG_LENGTH + 1 + TAG_LENGTH


def test_parts_of_any_shape_and_type_give_the_same_message(keys):
    message = random.Random(1).randbytes(300_000)
    rng = random.Random(2)
    parts, pos = [], 0
    while pos < len(message):
        size = rng.choice([0, 1, 7, 1000, DEFAULT_CHUNK_SIZE - 1, DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE + 1, 200_000])
        piece = message[pos:pos + size]
        parts.append(rng.choice([bytes, bytearray, memoryview])(piece))
        pos += size
    out = io.BytesIO()
    seal(out, keys.public, os.urandom(16), METADATA, iter(parts))
    assert unseal(out.getvalue(), keys.private).message == message


@pytest.mark.parametrize("chunk_size", [1, 16, 1000])
def test_other_chunk_sizes_round_trip_and_need_no_setting_to_open(keys, chunk_size):
    message = b"Subject: hi\r\n\r\n" + bytes(range(256)) * 20
    sealed = sealed_bytes(keys, message, chunk_size=chunk_size)
    assert len(sealed) == sealed_size(keys.public.suite, METADATA, len(message), chunk_size)
    assert unseal(sealed, keys.private).message == message


def test_unseal_reads_a_file_object_even_one_that_returns_short_reads(keys, tmp_path):
    message = random.Random(3).randbytes(200_000)
    sealed = sealed_bytes(keys, message)
    path = tmp_path / "sealed"
    path.write_bytes(sealed)
    with open(path, "rb") as file:
        assert unseal(file, keys.private).message == message

    class Trickle(io.RawIOBase):
        """A pipe-like source: every read returns 1..997 bytes."""

        def __init__(self, data):
            self.data, self.pos, self.rng = data, 0, random.Random(4)

        def read(self, n=-1):
            n = min(n, self.rng.randint(1, 997))
            piece = self.data[self.pos:self.pos + n]
            self.pos += len(piece)
            return piece

    assert unseal(Trickle(sealed), keys.private).message == message


def test_the_same_message_seals_differently_every_time(keys):
    spool_id = os.urandom(16)
    first = sealed_bytes(keys, b"same", spool_id=spool_id)
    second = sealed_bytes(keys, b"same", spool_id=spool_id)
    assert first[:HEADER.size] == second[:HEADER.size]
    assert first[HEADER.size:] != second[HEADER.size:]


# --- what the file shows --------------------------------------------------------------------------------------

def test_the_header_shows_only_magic_version_suite_and_the_random_id(keys):
    spool_id = os.urandom(16)
    sealed = sealed_bytes(keys, b"x" * 5000, spool_id=spool_id)
    header = read_header(sealed)
    assert (header.version, header.suite, header.spool_id) == (VERSION, keys.public.suite, spool_id)
    assert sealed[:HEADER.size] == MAGIC + bytes([VERSION, keys.public.suite.code]) + spool_id
    assert read_header(sealed[:HEADER.size]) == header


@pytest.mark.parametrize("length", [100, 3 * DEFAULT_CHUNK_SIZE])
def test_the_sealed_file_holds_no_run_of_the_plaintext(keys, length):
    marker = os.urandom(32)
    metadata_marker = os.urandom(32).hex()
    filler = random.Random(5).randbytes(length)
    message = filler[:length // 2] + marker + filler[length // 2:]
    metadata = {**METADATA, "envelope": {**METADATA["envelope"], "mail_from": metadata_marker + "@example.net"}}
    sealed = sealed_bytes(keys, message, metadata=metadata)
    for piece in (marker, marker[:16], marker[16:], metadata_marker.encode(), b"alice@example.net",
                  b"bob@example.org", b"192.0.2.7", json.dumps(METADATA["connection"]["tls"]).encode()[:20]):
        assert piece not in sealed
    assert unseal(sealed, keys.private).message == message


def test_read_header_refuses_what_is_not_a_sealed_file(keys):
    sealed = sealed_bytes(keys, b"hello")
    with pytest.raises(SealedError, match="26-byte header"):
        read_header(sealed[:25])
    with pytest.raises(SealedError, match="magic"):
        read_header(b"From alice@example.net\r\n" + bytes(10))
    with pytest.raises(SealedError, match="version 2"):
        read_header(sealed[:8] + b"\x02" + sealed[9:])
    with pytest.raises(SealedError, match="unknown suite"):
        read_header(sealed[:9] + b"\x09" + sealed[10:])


# --- tampering: every change is caught -------------------------------------------------------------------------

SMALL_CHUNK = 64


@pytest.fixture(scope="module")
def small(keys):
    """A message over five 64-byte chunks: small enough to try every byte and every cut."""
    message = random.Random(6).randbytes(5 * SMALL_CHUNK - content_length({"k": 1}, 0) - 10)
    sealed = sealed_bytes(keys, message, metadata={"k": 1}, chunk_size=SMALL_CHUNK)
    start = HEADER.size + key_block_length(keys.public.suite)
    full = SMALL_CHUNK + TAG_LENGTH
    chunks = [sealed[i:i + full] for i in range(start, len(sealed), full)]
    assert len(chunks) == 5 and len(chunks[-1]) == SMALL_CHUNK - 10 + TAG_LENGTH
    assert unseal(sealed, keys.private).message == message
    return sealed, start, chunks


def refused(sealed: bytes, private_key) -> SealedError:
    with pytest.raises(SealedError) as caught:
        unseal(sealed, private_key)
    return caught.value


@pytest.mark.parametrize("bit", [0x01, 0x80])
def test_flipping_any_bit_of_the_file_is_detected(keys, small, bit):
    sealed, _, _ = small
    for index in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[index] ^= bit
        refused(bytes(tampered), keys.private)


def test_cutting_the_file_at_any_length_is_detected(keys, small):
    sealed, _, _ = small
    for length in range(len(sealed)):
        refused(sealed[:length], keys.private)


def test_cutting_at_each_chunk_boundary_is_detected_as_a_missing_final_chunk(keys, small):
    sealed, start, chunks = small
    for count in range(len(chunks)):
        boundary = start + count * (SMALL_CHUNK + TAG_LENGTH)
        error = refused(sealed[:boundary], keys.private)
        if count:
            assert f"chunk {count - 1} fails authentication" in str(error)


def test_reordered_duplicated_or_dropped_chunks_are_detected(keys, small):
    sealed, start, chunks = small
    head = sealed[:start]
    variants = []
    for i in range(len(chunks)):
        for j in range(len(chunks)):
            if i != j:
                swapped = list(chunks)
                swapped[i], swapped[j] = swapped[j], swapped[i]
                variants.append(swapped)
        variants.append(chunks[:i] + chunks[i + 1:])             # dropped
        variants.append(chunks[:i + 1] + chunks[i:])             # duplicated in place
        variants.append(chunks + [chunks[i]])                    # repeated at the end
    for variant in variants:
        refused(head + b"".join(variant), keys.private)


@pytest.mark.parametrize("extra", [b"\x00", b"x" * TAG_LENGTH, b"\x00" * (SMALL_CHUNK + TAG_LENGTH)],
                         ids=["one-byte", "a-tag", "a-whole-chunk"])
def test_bytes_after_the_final_chunk_are_detected(keys, small, extra):
    sealed, _, _ = small
    refused(sealed + extra, keys.private)


def test_a_final_chunk_that_fills_a_whole_chunk_still_rejects_appended_bytes(keys):
    message = bytes(ONE_CHUNK)
    sealed = sealed_bytes(keys, message)
    refused(sealed + sealed[-(DEFAULT_CHUNK_SIZE + TAG_LENGTH):], keys.private)
    refused(sealed + b"\x00", keys.private)


def test_changing_the_header_spool_id_is_detected(keys, small):
    sealed, _, _ = small
    tampered = sealed[:HEADER.size - 16] + os.urandom(16) + sealed[HEADER.size:]
    assert "key block does not open" in str(refused(tampered, keys.private))


def test_a_header_from_another_file_does_not_fit(keys):
    first, second = sealed_bytes(keys, b"one"), sealed_bytes(keys, b"two")
    refused(second[:HEADER.size] + first[HEADER.size:], keys.private)
    # Key block from one file, chunks from another: the chunks fail under the wrong data key.
    start = HEADER.size + key_block_length(keys.public.suite)
    refused(first[:start] + second[start:], keys.private)


def test_another_homes_key_opens_nothing(keys, other_keys):
    sealed = sealed_bytes(keys, b"for this home only")
    same_suite = other_keys[keys.public.suite.name]
    assert "does not open with this key" in str(refused(sealed, same_suite.private))
    other_suite = other_keys[next(s for s in SUITES if s != keys.public.suite.name)]
    assert "sealed with suite" in str(refused(sealed, other_suite.private))


def test_relabelling_the_suite_is_detected(keys, other_keys):
    """The suite byte changed to the other suite: a key of that suite cannot open it either."""
    sealed = sealed_bytes(keys, b"hello")
    other = other_keys[next(s for s in SUITES if s != keys.public.suite.name)]
    relabelled = sealed[:9] + bytes([other.public.suite.code]) + sealed[10:]
    refused(relabelled, other.private)
    refused(relabelled, keys.private)


# --- what seal refuses -------------------------------------------------------------------------------------

def test_seal_refuses_bad_arguments(keys):
    with pytest.raises(ValueError, match="16 bytes"):
        seal(io.BytesIO(), keys.public, b"short", {}, [b""])
    with pytest.raises(TypeError):
        seal(io.BytesIO(), keys.public, os.urandom(16), ["not", "a", "dict"], [b""])
    with pytest.raises(TypeError):
        seal(io.BytesIO(), keys.public, os.urandom(16), {"bytes": b"not JSON"}, [b""])
    with pytest.raises(ValueError, match="limit"):
        seal(io.BytesIO(), keys.public, os.urandom(16), {"big": "x" * (1024 * 1024)}, [b""])
    with pytest.raises(ValueError, match="chunk size"):
        seal(io.BytesIO(), keys.public, os.urandom(16), {}, [b""], chunk_size=0)


# --- memory ---------------------------------------------------------------------------------------------------

class CountingSink:
    """Where the sealed bytes go: counted and hashed, not kept."""

    def __init__(self):
        self.written = 0
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.written += len(data)
        self.digest.update(data)
        return len(data)


def test_sealing_50_mb_in_1_mb_parts_never_holds_the_message(keys):
    part_size, count = 1024 * 1024, 50

    def parts():
        for index in range(count):
            yield index.to_bytes(4, "big") * (part_size // 4)  # the caller holds one part at a time

    sink = CountingSink()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        written = seal(sink, keys.public, os.urandom(16), METADATA, parts())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == sink.written == sealed_size(keys.public.suite, METADATA, part_size * count)
    # One part (1 MiB) the caller made, a chunk or two of ours: nowhere near the 50 MiB message.
    assert peak < 4 * part_size, f"sealing peaked at {peak} bytes"
