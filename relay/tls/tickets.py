"""Session tickets: resumption state sealed under keys that live only in memory.

A ticket lets a returning client resume with PSK-DHE, which needs no
signature: that is how TLS keeps working for known senders while home (and
its key oracle) is offline. The keys rotate every `rotate_every` seconds and
are forgotten once no ticket they sealed can still be valid; a restart forgets
them all, which only costs returning clients one full handshake.

Ticket layout: key id (8) | nonce (12) | AES-256-GCM(state) with the key id
as associated data.
"""

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .constants import TLS12, TLS13
from .errors import DecodeError
from .wire import Reader, u8, u16, u32, vec8

STATE_VERSION = 2
KEY_ID_LEN = 8
NONCE_LEN = 12


@dataclass(frozen=True)
class SessionState:
    """What a ticket resumes. TLS 1.3: `psk` is the resumption PSK. TLS 1.2: `psk` is the
    master secret, and only sessions with the extended master secret get a ticket."""

    cipher_suite: int
    psk: bytes
    issued_at_ms: int
    lifetime: int       # seconds
    age_add: int
    server_name: str | None
    alpn: bytes | None
    protocol: int = TLS13

    def encode(self) -> bytes:
        return (
            u8(STATE_VERSION) + u16(self.cipher_suite) + vec8(self.psk)
            + self.issued_at_ms.to_bytes(8, "big") + u32(self.lifetime) + u32(self.age_add)
            + vec8((self.server_name or "").encode()) + vec8(self.alpn or b"") + u16(self.protocol)
        )

    @classmethod
    def decode(cls, data: bytes) -> "SessionState":
        r = Reader(data)
        if r.u8() != STATE_VERSION:
            raise DecodeError("unknown session state version")
        state = cls(
            cipher_suite=r.u16(), psk=r.vector(1), issued_at_ms=r.uint(8), lifetime=r.u32(),
            age_add=r.u32(), server_name=r.vector(1).decode() or None, alpn=r.vector(1) or None,
            protocol=r.u16(),
        )
        if state.protocol not in (TLS12, TLS13):
            raise DecodeError("unknown protocol version in session state")
        r.expect_end()
        return state

    def valid_at(self, now: float) -> bool:
        age_ms = int(now * 1000) - self.issued_at_ms
        return 0 <= age_ms <= self.lifetime * 1000


class TicketKeyring:
    """Seals and opens session tickets; the keys never leave this object."""

    def __init__(self, random: Callable[[int], bytes], lifetime: int = 86400, rotate_every: int = 3600):
        if not 1 <= lifetime <= 604800:
            raise ValueError("ticket lifetime must be 1..604800 seconds (RFC 8446 4.6.1)")
        if rotate_every < 1:
            raise ValueError("ticket key rotation period must be at least 1 second")
        self.lifetime = lifetime
        self.rotate_every = rotate_every
        self._random = random
        self._keys: dict[bytes, tuple[float, AESGCM]] = {}  # key id -> (created, cipher)
        self._current: bytes | None = None

    def seal(self, state: SessionState, now: float) -> bytes:
        key_id = self._current_key(now)
        nonce = self._random(NONCE_LEN)
        return key_id + nonce + self._keys[key_id][1].encrypt(nonce, state.encode(), key_id)

    def open(self, ticket: bytes, now: float) -> SessionState | None:
        """The state in `ticket`, or None for anything not sealed here, tampered with or expired."""
        self._forget_old_keys(now)
        key = self._keys.get(ticket[:KEY_ID_LEN])
        if key is None or len(ticket) < KEY_ID_LEN + NONCE_LEN + 16:
            return None
        nonce = ticket[KEY_ID_LEN:KEY_ID_LEN + NONCE_LEN]
        try:
            state = SessionState.decode(key[1].decrypt(nonce, ticket[KEY_ID_LEN + NONCE_LEN:], ticket[:KEY_ID_LEN]))
        except (InvalidTag, DecodeError, UnicodeDecodeError):
            return None
        return state if state.valid_at(now) else None

    def _current_key(self, now: float) -> bytes:
        current = self._keys.get(self._current)
        if current is None or now - current[0] >= self.rotate_every:
            self._current = self._random(KEY_ID_LEN)
            self._keys[self._current] = (now, AESGCM(self._random(32)))
            self._forget_old_keys(now)
        return self._current

    def _forget_old_keys(self, now: float) -> None:
        # A key seals tickets for rotate_every seconds; each lives lifetime more.
        horizon = self.rotate_every + self.lifetime
        for key_id, (created, _) in list(self._keys.items()):
            if now - created > horizon:
                del self._keys[key_id]
