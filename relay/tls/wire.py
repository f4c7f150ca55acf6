"""Bounded reading and writing of TLS presentation-language structures.

Every read checks the length before it uses it; running past the end or
leaving bytes behind is a `DecodeError` (the decode_error alert).
"""

import struct

from .errors import DecodeError

_U16 = struct.Struct(">H").unpack_from


class Reader:
    # Hot: every ClientHello (edge) and every signature request (oracle) is
    # read through it, so the common reads avoid nested calls.
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None):
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        start = self.pos
        stop = start + n
        if stop > self.end:
            raise DecodeError("message truncated")
        self.pos = stop
        return self.data[start:stop]

    def uint(self, size: int) -> int:
        start = self.pos
        stop = start + size
        if stop > self.end:
            raise DecodeError("message truncated")
        self.pos = stop
        return int.from_bytes(self.data[start:stop], "big")

    def u8(self) -> int:
        pos = self.pos
        if pos >= self.end:
            raise DecodeError("message truncated")
        self.pos = pos + 1
        return self.data[pos]

    def u16(self) -> int:
        pos = self.pos
        if pos + 2 > self.end:
            raise DecodeError("message truncated")
        self.pos = pos + 2
        return _U16(self.data, pos)[0]

    def u24(self) -> int:
        return self.uint(3)

    def u32(self) -> int:
        return self.uint(4)

    def vector(self, length_size: int, minimum: int = 0, maximum: int | None = None) -> bytes:
        """opaque<minimum..maximum> with a `length_size`-byte length prefix."""
        n = self.uint(length_size)
        if n < minimum or (maximum is not None and n > maximum):
            raise DecodeError(f"vector length {n} outside {minimum}..{maximum}")
        return self.take(n)

    def sub(self, length_size: int, minimum: int = 0) -> "Reader":
        """A reader over the next length-prefixed vector, advancing past it."""
        n = self.uint(length_size)
        if n < minimum:
            raise DecodeError(f"vector length {n} below {minimum}")
        start = self.pos
        stop = start + n
        if stop > self.end:
            raise DecodeError("vector runs past its container")
        self.pos = stop
        return Reader(self.data, start, stop)

    def uint_list(self, length_size: int, item_size: int, minimum: int = 0) -> list[int]:
        """A vector of fixed-size integers (cipher suites, groups, schemes, ...)."""
        inner = self.sub(length_size, minimum)
        count, rest = divmod(inner.end - inner.pos, item_size)
        if rest:
            raise DecodeError("list length is not a multiple of its item size")
        if item_size == 2:
            return list(struct.unpack_from(f">{count}H", inner.data, inner.pos))
        if item_size == 1:
            return list(inner.data[inner.pos:inner.end])
        return [inner.uint(item_size) for _ in range(count)]

    def expect_end(self) -> None:
        if self.pos != self.end:
            raise DecodeError(f"{self.end - self.pos} unexpected trailing bytes")


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def vec8(data: bytes) -> bytes:
    return u8(len(data)) + data


def vec16(data: bytes) -> bytes:
    return u16(len(data)) + data


def vec24(data: bytes) -> bytes:
    return u24(len(data)) + data
