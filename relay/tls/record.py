"""The TLS 1.3 record layer: framing, and AEAD protection in one direction.

`RecordReader` cuts the inbound byte stream into records, refusing oversized
ones before buffering them. `Protection` is one direction's traffic key: it
seals and opens records, with the per-record nonce from the sequence number
(RFC 8446 5.3).
"""

from cryptography.exceptions import InvalidTag

from .constants import MAX_CIPHERTEXT, MAX_PLAINTEXT, ContentType
from .errors import ProtocolVersion, RecordOverflow, UnexpectedMessage
from .keyschedule import TAG_LEN, Suite, traffic_keys

HEADER_LEN = 5
_VALID_TYPES = frozenset(t.value for t in ContentType)
_APPLICATION_DATA_HEADER = bytes([ContentType.APPLICATION_DATA, 3, 3])


class RecordReader:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0  # records before this offset are consumed
        self._seen_first = False

    def feed(self, data: bytes) -> None:
        if self._pos:
            # Drop consumed records once per read, not once per record: a
            # 256 KiB read holds 16 records and moving the tail 16 times shows.
            del self._buffer[:self._pos]
            self._pos = 0
        self._buffer += data

    def next_record(self, after_hello: bool) -> tuple[int, bytes, bytes] | None:
        """(content type, header, payload) of the next whole record, or None for more data.

        `after_hello`: the first ClientHello has been read, so application
        data records (0-RTT ones included) may be protected and larger.
        """
        buf, pos = self._buffer, self._pos
        if len(buf) - pos < HEADER_LEN:
            if not self._seen_first and len(buf) >= 3:
                _refuse_sslv2_hello(buf)
            return None
        content_type = buf[pos]
        if not self._seen_first:
            _refuse_sslv2_hello(buf)
        if content_type not in _VALID_TYPES:
            raise UnexpectedMessage(f"unknown record type {content_type}")
        if buf[pos + 1] != 3:
            raise UnexpectedMessage("record version is not TLS")
        length = (buf[pos + 3] << 8) | buf[pos + 4]
        protected = after_hello and content_type == ContentType.APPLICATION_DATA
        limit = MAX_CIPHERTEXT if protected else MAX_PLAINTEXT
        if length > limit:
            raise RecordOverflow(f"record of {length} bytes exceeds {limit}")
        end = pos + HEADER_LEN + length
        if len(buf) < end:
            return None
        self._seen_first = True
        self._pos = end
        return content_type, bytes(buf[pos:pos + HEADER_LEN]), bytes(buf[pos + HEADER_LEN:end])

    def buffered(self) -> int:
        return len(self._buffer) - self._pos


def _refuse_sslv2_hello(buf: bytearray) -> None:
    # An SSL 2.0-format ClientHello (high bit set, message type 1) comes only
    # from clients that cannot speak TLS 1.3: tell them so.
    if buf[0] & 0x80 and buf[2] == 1:
        raise ProtocolVersion("SSL 2.0 ClientHello")


class Protection:
    """One direction's traffic secret, key and sequence number."""

    __slots__ = ("suite", "secret", "_aead", "_iv", "seq")

    def __init__(self, suite: Suite, secret: bytes):
        key, iv = traffic_keys(suite, secret)
        self.suite = suite
        self.secret = secret
        self._aead = suite.aead(key)
        self._iv = int.from_bytes(iv, "big")
        self.seq = 0

    def _nonce(self) -> bytes:
        nonce = (self._iv ^ self.seq).to_bytes(12, "big")
        self.seq += 1
        return nonce

    def seal(self, content_type: int, content: bytes) -> bytes:
        """A whole TLSCiphertext record carrying `content` (no padding)."""
        length = len(content) + 1 + TAG_LEN
        header = _APPLICATION_DATA_HEADER + length.to_bytes(2, "big")
        inner = content + bytes((content_type,))
        return header + self._aead.encrypt(self._nonce(), inner, header)

    def open(self, header: bytes, payload: bytes) -> bytes | None:
        """The TLSInnerPlaintext, or None when the record does not authenticate.

        The sequence number advances only on success, so a record skipped as
        rejected early data does not disturb the handshake key.
        """
        inner = memoryview(bytearray(max(len(payload) - TAG_LEN, 0)))
        return bytes(inner) if self.open_into(header, payload, inner) else None

    def open_into(self, header: bytes, payload: bytes, inner: memoryview) -> bool:
        """Decrypt into `inner` (exactly len(payload) - 16 bytes): no copy of the plaintext is made.

        False when the record does not authenticate (`inner` then holds nothing).
        """
        if len(payload) < TAG_LEN:
            return False
        nonce = (self._iv ^ self.seq).to_bytes(12, "big")
        try:
            self._aead.decrypt_into(nonce, payload, header, inner)
        except InvalidTag:
            return False
        self.seq += 1
        return True
