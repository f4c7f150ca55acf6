"""The sealed spool file: one accepted message, readable only with the home spool private key.

The format is documented in docs/spool-format.md. In short:

    header     magic "YTLSPOOL" | version u8 (1) | suite u8 | spool id (16 random bytes)
    key block  HPKE-sealed (info = the header) data key (32 bytes) | chunk size u32
    chunks     AES-256-GCM(data key, nonce = counter u64 | 0 0 0 | final flag u8, aad = the header)

The plaintext the chunks carry is `metadata length u32 | metadata (JSON) |
message`. Every chunk but the last holds exactly `chunk size` bytes; only the
last is sealed with the final flag. So a header that was changed, a chunk
flipped, dropped, duplicated or moved, a file cut at any point or with bytes
after its end, all fail authentication (`SealedError`).

`Sealer` (and `seal`, built on it) streams: it holds at most one chunk of
plaintext, zeroed once sealed. `unseal` returns nothing until every chunk has
been checked.
"""

import io
import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay.scrub import wipe
from relay.spool.keys import SUITES_BY_CODE, SpoolPrivateKey, SpoolPublicKey, Suite

MAGIC = b"YTLSPOOL"
VERSION = 1
HEADER = struct.Struct("!8sBB16s")
SPOOL_ID_LENGTH = 16
DATA_KEY_LENGTH = 32
KEY_BLOCK_PLAINTEXT = struct.Struct("!32sI")   # data key, chunk size
HPKE_TAG_LENGTH = 16
TAG_LENGTH = 16
NONCE = struct.Struct("!Q3xB")                  # chunk counter, 3 zero bytes, final flag
METADATA_LENGTH = struct.Struct("!I")
DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024   # what a reader agrees to buffer per chunk
MAX_METADATA = 1024 * 1024


class SealedError(Exception):
    """The file is not a sealed spool file this key can open: altered, truncated, foreign or corrupt."""


@dataclass(frozen=True)
class Header:
    version: int
    suite: Suite
    spool_id: bytes

    def encode(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, self.suite.code, self.spool_id)


@dataclass(frozen=True)
class Unsealed:
    spool_id: bytes
    metadata: dict
    message: bytes


def key_block_length(suite: Suite) -> int:
    return suite.enc_length + KEY_BLOCK_PLAINTEXT.size + HPKE_TAG_LENGTH


def encode_metadata(metadata: dict) -> bytes:
    """The metadata as sealed: compact UTF-8 JSON (ValueError/TypeError if it is not a JSON object)."""
    if not isinstance(metadata, dict):
        raise TypeError("the sealed metadata must be a dict (a JSON object)")
    encoded = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(encoded) > MAX_METADATA:
        raise ValueError(f"metadata of {len(encoded)} bytes exceeds the {MAX_METADATA}-byte limit")
    return encoded


def sealed_size(suite: Suite, metadata: dict, message_length: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """The exact size of the file `seal` writes for this metadata and a message of `message_length` bytes."""
    return sealed_length(suite, len(encode_metadata(metadata)), message_length, chunk_size)


def sealed_length(suite: Suite, metadata_length: int, message_length: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """sealed_size, for metadata already encoded (encode_metadata) to `metadata_length` bytes."""
    content = METADATA_LENGTH.size + metadata_length + message_length
    chunks = max(1, -(-content // chunk_size))
    return HEADER.size + key_block_length(suite) + content + chunks * TAG_LENGTH


def _nonce(counter: int, final: bool) -> bytes:
    return NONCE.pack(counter, 1 if final else 0)


# --- sealing ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MessageKey:
    """What sealing one message starts from, none of it the message's: its spool id, its data key, and
    the key block (the data key and chunk size HPKE-sealed to home, the header as info). So it can be
    made ahead, in another process (relay/spool/keymaker.py)."""

    spool_id: bytes
    data_key: bytes = field(repr=False)
    chunk_size: int
    key_block: bytes

    def __post_init__(self):
        if len(self.spool_id) != SPOOL_ID_LENGTH:
            raise ValueError(f"a spool id is {SPOOL_ID_LENGTH} bytes, not {len(self.spool_id)}")
        if len(self.data_key) != DATA_KEY_LENGTH:
            raise ValueError(f"a data key is {DATA_KEY_LENGTH} bytes, not {len(self.data_key)}")
        if not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size {self.chunk_size} is outside 1..{MAX_CHUNK_SIZE}")


def new_message_key(public_key: SpoolPublicKey, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    spool_id: bytes | None = None) -> MessageKey:
    """A fresh data key sealed to home (the HPKE encapsulation: most of sealing a small message's CPU)."""
    spool_id = os.urandom(SPOOL_ID_LENGTH) if spool_id is None else bytes(spool_id)
    suite = public_key.suite
    header = Header(VERSION, suite, spool_id).encode()
    data_key = os.urandom(DATA_KEY_LENGTH)
    key_block = suite.hpke.encrypt(KEY_BLOCK_PLAINTEXT.pack(data_key, chunk_size), public_key.key, info=header)
    return MessageKey(spool_id, data_key, chunk_size, key_block)


class InlineKeys:
    """Message keys made when asked, in the caller's thread (relay/spool/keymaker.py makes them ahead)."""

    def __init__(self, public_key: SpoolPublicKey, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.public_key = public_key
        self.chunk_size = chunk_size

    def take(self) -> MessageKey:
        return new_message_key(self.public_key, self.chunk_size)


class Sealer:
    """Seals one message as it arrives: header and key block at once, then each chunk as soon as it is full.

    The plaintext of the chunk being filled is the only plaintext kept: one
    buffer of `chunk size` bytes, overwritten with zeros as soon as its chunk
    is sealed (and by `wipe`, for a message abandoned halfway). A chunk goes
    out only once it is known not to be the last.
    """

    def __init__(self, out: BinaryIO, public_key: SpoolPublicKey, key: MessageKey, encoded_metadata: bytes):
        """`encoded_metadata`: encode_metadata's bytes (the caller may have sized the file from them too)."""
        suite = public_key.suite
        if len(key.key_block) != key_block_length(suite):
            raise ValueError(f"a {suite.name} key block is {key_block_length(suite)} bytes, not {len(key.key_block)}")
        header = Header(VERSION, suite, key.spool_id).encode()
        self.out = out
        self.aead = AESGCM(key.data_key)
        self.aad = header
        self.counter = 0
        self.written = 0
        self._buffer = memoryview(bytearray(key.chunk_size))  # slices of it are written to in place, never copied
        self._filled = 0
        self._write_out(header)
        self._write_out(key.key_block)
        self.write(METADATA_LENGTH.pack(len(encoded_metadata)) + encoded_metadata)

    def write(self, data) -> None:
        """Add message bytes (any bytes-like object; it is copied, not kept)."""
        view = memoryview(data).cast("B")
        size = len(self._buffer)
        while len(view):
            if self._filled == size:
                self._emit(final=False)
            take = min(size - self._filled, len(view))
            self._buffer[self._filled:self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]

    def finish(self) -> int:
        """Seal the last chunk; the number of bytes the file holds."""
        self._emit(final=True)
        return self.written

    def wipe(self) -> None:
        """Overwrite the plaintext not yet sealed (the message is abandoned)."""
        wipe(self._buffer, self._filled)
        self._filled = 0

    def _emit(self, final: bool) -> None:
        sealed = self.aead.encrypt(_nonce(self.counter, final), self._buffer[:self._filled], self.aad)
        self.wipe()
        self.counter += 1
        self._write_out(sealed)

    def _write_out(self, data: bytes) -> None:
        self.out.write(data)
        self.written += len(data)


def seal(out: BinaryIO, public_key: SpoolPublicKey, spool_id: bytes, metadata: dict,
         message_parts: Iterable[bytes], *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Write the sealed file for `metadata` and the message (the concatenation of `message_parts`) to `out`.

    Returns the number of bytes written. Parts are consumed one at a time and
    never joined; any bytes-like objects will do.
    """
    sealer = Sealer(out, public_key, new_message_key(public_key, chunk_size, spool_id), encode_metadata(metadata))
    for part in message_parts:
        sealer.write(part)
    return sealer.finish()


# --- unsealing -------------------------------------------------------------------------------------------

def read_header(data: bytes) -> Header:
    """The plaintext header at the start of `data` (at least HEADER.size bytes); SealedError if it is not one."""
    if len(data) < HEADER.size:
        raise SealedError(f"a sealed spool file starts with a {HEADER.size}-byte header; got {len(data)} bytes")
    magic, version, suite_code, spool_id = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SealedError("not a sealed spool file (bad magic)")
    if version != VERSION:
        raise SealedError(f"sealed spool format version {version}; this reader knows version {VERSION}")
    suite = SUITES_BY_CODE.get(suite_code)
    if suite is None:
        raise SealedError(f"sealed to an unknown suite ({suite_code})")
    return Header(version, suite, spool_id)


def _read_exact(source: BinaryIO, length: int) -> bytes:
    """Up to `length` bytes: fewer only at the end of the source."""
    data = source.read(length)
    if data is None:
        raise SealedError("the sealed source is non-blocking and had no data")
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = source.read(length - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _open_chunks(source: BinaryIO, private_key: SpoolPrivateKey) -> tuple[Header, Iterator[bytes]]:
    header_bytes = _read_exact(source, HEADER.size)
    header = read_header(header_bytes)
    if header.suite is not private_key.suite:
        raise SealedError(f"the file is sealed with suite {header.suite.name}, the key is {private_key.suite.name}")
    key_block = _read_exact(source, key_block_length(header.suite))
    if len(key_block) != key_block_length(header.suite):
        raise SealedError("the file ends inside its key block")
    try:
        opened = header.suite.hpke.decrypt(key_block, private_key.key, info=header_bytes)
    except InvalidTag:
        raise SealedError("the key block does not open with this key: another key's file, or the header or "
                          "key block was altered") from None
    if len(opened) != KEY_BLOCK_PLAINTEXT.size:
        raise SealedError("the key block holds the wrong length")
    data_key, chunk_size = KEY_BLOCK_PLAINTEXT.unpack(opened)
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise SealedError(f"the file's chunk size {chunk_size} is outside 1..{MAX_CHUNK_SIZE}")
    return header, _chunks(source, AESGCM(data_key), header_bytes, chunk_size)


def _chunks(source: BinaryIO, aead: AESGCM, aad: bytes, chunk_size: int) -> Iterator[bytes]:
    full = chunk_size + TAG_LENGTH
    counter = 0
    current = _read_exact(source, full)
    while True:
        # The last chunk is the one with nothing after it; it alone must carry the final flag.
        following = _read_exact(source, full) if len(current) == full else b""
        final = not following
        if len(current) < TAG_LENGTH:
            raise SealedError(f"the file ends inside chunk {counter}: it was truncated")
        try:
            yield aead.decrypt(_nonce(counter, final), current, aad)
        except InvalidTag:
            raise SealedError(f"chunk {counter} fails authentication: the file was altered, truncated, "
                              f"reordered or extended") from None
        if final:
            return
        current = following
        counter += 1


def unseal(sealed: bytes | BinaryIO, private_key: SpoolPrivateKey) -> Unsealed:
    """Open a sealed file (its bytes, or a binary file positioned at its start); SealedError if it fails."""
    source = io.BytesIO(sealed) if isinstance(sealed, (bytes, bytearray, memoryview)) else sealed
    header, chunks = _open_chunks(source, private_key)
    content = bytearray()
    metadata_end = None
    for plaintext in chunks:
        content += plaintext
        if metadata_end is None and len(content) >= METADATA_LENGTH.size:
            (length,) = METADATA_LENGTH.unpack_from(content)
            if length > MAX_METADATA:
                raise SealedError(f"the metadata claims {length} bytes, over the {MAX_METADATA}-byte limit")
            metadata_end = METADATA_LENGTH.size + length
    # Only now, with every chunk authenticated, is the content trusted.
    if metadata_end is None or len(content) < metadata_end:
        raise SealedError("the content is shorter than its metadata")
    try:
        metadata = json.loads(content[METADATA_LENGTH.size:metadata_end])
    except (ValueError, RecursionError):
        raise SealedError("the metadata is not JSON") from None
    if not isinstance(metadata, dict):
        raise SealedError("the metadata is not a JSON object")
    del content[:metadata_end]
    return Unsealed(header.spool_id, metadata, bytes(content))
