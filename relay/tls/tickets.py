"""Session tickets: resumption state sealed under keys that live only in memory.

A ticket lets a returning client resume with PSK-DHE, which needs no
signature: that is how TLS keeps working for known senders while home (and
its key oracle) is offline. The keys rotate every `rotate_every` seconds and
are forgotten once no ticket they sealed can still be valid; a restart forgets
them all, which only costs returning clients one full handshake.

The keys come from one of two sources. `TicketKeyring(random)` draws a random
key at each rotation: its tickets resume only in this process.
`TicketKeyring.shared(random, seed, now)` derives them from a secret seed, so
that workers started from its `share()` seal and open the same tickets. Unix
time is cut into epochs of `rotate_every` seconds; epoch e's key seals during
the epoch and opens until `lifetime` after it ends. seed(e+1) is
HKDF-Expand(seed(e), "yestls ticket ratchet"), and epoch e's key id and key are
HKDF-Expand(seed(e), "yestls ticket key id" / "yestls ticket key"). A keyring
keeps only the seed of the oldest epoch whose tickets may still be open, so a
process compromised later does not give away the keys of expired tickets.

Ticket layout: key id (8) | nonce (12) | AES-256-GCM(state) with the key id
as associated data.

Shared seed layout (`SharedTicketSeed.to_bytes()`, 49 bytes, integers
big-endian): version (1) = 1 | epoch (8) | lifetime (4) | rotate_every (4) |
seed of that epoch (32).
"""

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .constants import TLS12, TLS13
from .errors import DecodeError
from .keyschedule import hkdf_expand
from .wire import Reader, u8, u16, u32, vec8

STATE_VERSION = 2
KEY_ID_LEN = 8
NONCE_LEN = 12
SEED_LEN = 32
SHARED_VERSION = 1
_SHARED_HEADER = struct.Struct(">BQII")  # version, epoch, lifetime, rotate_every; the seed follows


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


def _check_periods(lifetime: int, rotate_every: int) -> None:
    if not 1 <= lifetime <= 604800:
        raise ValueError("ticket lifetime must be 1..604800 seconds (RFC 8446 4.6.1)")
    if rotate_every < 1:
        raise ValueError("ticket key rotation period must be at least 1 second")


@dataclass(frozen=True)
class SharedTicketSeed:
    """What a worker needs to seal and open its siblings' tickets: the seed of `epoch`, the oldest
    epoch whose tickets may still be open. A secret: hand it over only on a private pipe."""

    epoch: int
    seed: bytes = field(repr=False)
    lifetime: int
    rotate_every: int

    def __post_init__(self) -> None:
        if not 0 <= self.epoch < 2**64:
            raise ValueError("ticket epoch must be 0..2^64-1")
        if len(self.seed) != SEED_LEN:
            raise ValueError(f"ticket seed must be {SEED_LEN} bytes")
        _check_periods(self.lifetime, self.rotate_every)
        if self.rotate_every >= 2**32:
            raise ValueError("ticket key rotation period must be under 2^32 seconds")

    def to_bytes(self) -> bytes:
        return _SHARED_HEADER.pack(SHARED_VERSION, self.epoch, self.lifetime, self.rotate_every) + self.seed

    @classmethod
    def from_bytes(cls, data: bytes) -> "SharedTicketSeed":
        if len(data) != _SHARED_HEADER.size + SEED_LEN:
            raise ValueError(f"a shared ticket seed is {_SHARED_HEADER.size + SEED_LEN} bytes, not {len(data)}")
        version, epoch, lifetime, rotate_every = _SHARED_HEADER.unpack_from(data)
        if version != SHARED_VERSION:
            raise ValueError(f"unknown shared ticket seed version {version}")
        return cls(epoch, bytes(data[_SHARED_HEADER.size:]), lifetime, rotate_every)


class TicketKeyring:
    """Seals and opens session tickets; the keys never leave this object (a shared keyring's
    seed leaves it through `share()`, for sibling workers)."""

    def __init__(self, random: Callable[[int], bytes], lifetime: int = 86400, rotate_every: int = 3600):
        _check_periods(lifetime, rotate_every)
        self.lifetime = lifetime
        self.rotate_every = rotate_every
        self._random = random  # nonces
        self._keys: _RandomKeys | _RatchetedKeys = _RandomKeys(random, lifetime, rotate_every)

    @classmethod
    def shared(cls, random: Callable[[int], bytes], seed: bytes, now: float,
               lifetime: int = 86400, rotate_every: int = 3600) -> "TicketKeyring":
        """The first keyring of a group of workers, from a fresh secret seed (os.urandom(32))."""
        _check_periods(lifetime, rotate_every)
        return cls.from_shared(random, SharedTicketSeed(int(now // rotate_every), seed, lifetime, rotate_every))

    @classmethod
    def from_shared(cls, random: Callable[[int], bytes], shared: SharedTicketSeed) -> "TicketKeyring":
        """A keyring that seals and opens the same tickets as the one `shared` came from."""
        keyring = cls(random, shared.lifetime, shared.rotate_every)
        keyring._keys = _RatchetedKeys(shared)
        return keyring

    def share(self, now: float) -> SharedTicketSeed:
        """What a new worker needs (TicketKeyring.from_shared), ratcheted past every expired epoch."""
        if not isinstance(self._keys, _RatchetedKeys):
            raise ValueError("a keyring of random keys has nothing to share: build it with TicketKeyring.shared")
        return self._keys.share(now)

    def seal(self, state: SessionState, now: float) -> bytes:
        key_id, cipher = self._keys.sealing_key(now)
        nonce = self._random(NONCE_LEN)
        return key_id + nonce + cipher.encrypt(nonce, state.encode(), key_id)

    def open(self, ticket: bytes, now: float) -> SessionState | None:
        """The state in `ticket`, or None for anything not sealed here, tampered with or expired."""
        cipher = self._keys.opening_key(ticket[:KEY_ID_LEN], now)
        if cipher is None or len(ticket) < KEY_ID_LEN + NONCE_LEN + 16:
            return None
        nonce = ticket[KEY_ID_LEN:KEY_ID_LEN + NONCE_LEN]
        try:
            state = SessionState.decode(cipher.decrypt(nonce, ticket[KEY_ID_LEN + NONCE_LEN:], ticket[:KEY_ID_LEN]))
        except (InvalidTag, DecodeError, UnicodeDecodeError):
            return None
        return state if state.valid_at(now) else None


class _RandomKeys:
    """A random key every rotate_every seconds from when one is first needed, kept a lifetime more."""

    def __init__(self, random: Callable[[int], bytes], lifetime: int, rotate_every: int):
        self._random = random
        self._lifetime = lifetime
        self._rotate_every = rotate_every
        self._keys: dict[bytes, tuple[float, AESGCM]] = {}  # key id -> (created, cipher)
        self._current: bytes | None = None

    def sealing_key(self, now: float) -> tuple[bytes, AESGCM]:
        current = self._keys.get(self._current)
        if current is None or now - current[0] >= self._rotate_every:
            self._current = self._random(KEY_ID_LEN)
            self._keys[self._current] = (now, AESGCM(self._random(32)))
            self._forget_old_keys(now)
        return self._current, self._keys[self._current][1]

    def opening_key(self, key_id: bytes, now: float) -> AESGCM | None:
        self._forget_old_keys(now)
        key = self._keys.get(key_id)
        return None if key is None else key[1]

    def _forget_old_keys(self, now: float) -> None:
        # A key seals tickets for rotate_every seconds; each lives lifetime more.
        horizon = self._rotate_every + self._lifetime
        for key_id, (created, _) in list(self._keys.items()):
            if now - created > horizon:
                del self._keys[key_id]


class _RatchetedKeys:
    """Epoch e's key, derived from seed(e); only the seed of the oldest epoch still open is kept."""

    def __init__(self, shared: SharedTicketSeed):
        self._lifetime = shared.lifetime
        self._rotate_every = shared.rotate_every
        self._epoch = shared.epoch
        self._seed = shared.seed  # seed(self._epoch)
        self._keys: dict[int, tuple[bytes, AESGCM]] = {}  # epoch (self._epoch onwards) -> (key id, cipher)

    def sealing_key(self, now: float) -> tuple[bytes, AESGCM]:
        return self._keys[self._advance(now)]

    def opening_key(self, key_id: bytes, now: float) -> AESGCM | None:
        self._advance(now)
        return next((cipher for known, cipher in self._keys.values() if known == key_id), None)

    def share(self, now: float) -> SharedTicketSeed:
        self._advance(now)
        return SharedTicketSeed(self._epoch, self._seed, self._lifetime, self._rotate_every)

    def _advance(self, now: float) -> int:
        """Ratchet past the epochs whose tickets have all expired and derive the keys up to `now`'s
        epoch, which is returned (or the oldest kept, for a clock behind it)."""
        # Epoch e's tickets may be open while now < (e + 1) * rotate_every + lifetime.
        while self._epoch < (now - self._lifetime) // self._rotate_every:
            self._keys.pop(self._epoch, None)
            self._seed = _next_seed(self._seed)
            self._epoch += 1
        current = max(int(now // self._rotate_every), self._epoch)
        if current not in self._keys:
            seed = self._seed
            for epoch in range(self._epoch, current + 1):
                if epoch not in self._keys:
                    self._keys[epoch] = _epoch_key(seed)
                seed = _next_seed(seed)
        return current


def _next_seed(seed: bytes) -> bytes:
    return hkdf_expand("sha256", seed, b"yestls ticket ratchet", SEED_LEN)


def _epoch_key(seed: bytes) -> tuple[bytes, AESGCM]:
    return (hkdf_expand("sha256", seed, b"yestls ticket key id", KEY_ID_LEN),
            AESGCM(hkdf_expand("sha256", seed, b"yestls ticket key", 32)))
