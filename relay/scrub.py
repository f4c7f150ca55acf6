"""Overwriting plaintext the process is done with, so a later look at its memory finds zeros.

Python frees memory without clearing it: a message's bytes would stay in
freed heap blocks until something reuses them. The buffers that hold mail
plaintext on the edge (the receive buffer, TLS record plaintext, the chunk
being sealed) are bytearrays written in place through memoryviews, and are
wiped here as soon as their content has moved on. `bytearray[a:b] = x`
would make a temporary copy of `x` first (CPython does, for anything but a
bytearray): assign through a memoryview instead.
"""

_ZEROS = memoryview(bytes(256 * 1024))


def wipe(buffer: memoryview | bytearray, length: int | None = None) -> None:
    """Overwrite the first `length` bytes of `buffer` (all of it by default) with zeros."""
    view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
    length = len(view) if length is None else length
    while length > 0:
        step = min(length, len(_ZEROS))
        view[length - step:length] = _ZEROS[:step]
        length -= step
