"""The home spool key pair: what the edge seals mail to, and what home alone can open it with.

The private key is made at home (`generate_spool_key`) and never leaves it;
the edge's config holds only the public key, as one line of text:

    mlkem768-x25519:<base64 of the ML-KEM-768 public key (1184 bytes) || the X25519 public key (32 bytes)>
    x25519:<base64 of the X25519 public key (32 bytes)>

The suite names the HPKE (RFC 9180) KEM; both suites use HKDF-SHA256 and
AES-256-GCM. The default, "mlkem768-x25519", is the hybrid post-quantum KEM:
a disk snapshot kept for years stays sealed unless both ML-KEM-768 and X25519
fall.

The private key file is text, written once (mode 0600, never overwritten):

    # comment lines and blank lines are ignored
    yestls-spool-private-key: 1
    suite: mlkem768-x25519
    mlkem768-seed: <base64 of the 64-byte ML-KEM-768 seed>
    x25519: <base64 of the 32-byte X25519 private key>

(an "x25519" key has no mlkem768-seed line). `write_spool_key` is the one
writer of this file, for a new key and for one typed back from its paper
copy (relay.spool.paper). Loading refuses a file others can read or that
another user owns, like relay.identity's edge key.
"""

import base64
import binascii
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from relay.private_files import create_private_file, read_private_file

FILE_FORMAT = "yestls-spool-private-key"
FILE_VERSION = "1"
MLKEM768_PUBLIC_LENGTH = 1184
MLKEM768_SEED_LENGTH = 64
X25519_LENGTH = 32


@dataclass(frozen=True)
class Suite:
    """One sealing suite: its name in key text, its byte in a sealed file's header, its HPKE KEM."""

    name: str
    code: int
    kem: hpke.KEM
    enc_length: int   # the HPKE encapsulated key's length
    public_length: int
    private_length: int   # SpoolPrivateKey.raw's

    @property
    def hpke(self) -> hpke.Suite:
        return hpke.Suite(self.kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


MLKEM768_X25519 = Suite("mlkem768-x25519", 1, hpke.KEM.MLKEM768_X25519, 1088 + 32,
                        MLKEM768_PUBLIC_LENGTH + X25519_LENGTH, MLKEM768_SEED_LENGTH + X25519_LENGTH)
X25519 = Suite("x25519", 2, hpke.KEM.X25519, 32, X25519_LENGTH, X25519_LENGTH)
SUITES = {suite.name: suite for suite in (MLKEM768_X25519, X25519)}
SUITES_BY_CODE = {suite.code: suite for suite in SUITES.values()}
DEFAULT_SUITE = MLKEM768_X25519.name


class SpoolKeyError(Exception):
    """An unusable spool private key file; the message names the file and the fix."""


@dataclass(frozen=True, eq=False)
class SpoolPublicKey:
    suite: Suite
    key: "hpke.MLKEM768X25519PublicKey | X25519PublicKey"   # what hpke.Suite.encrypt takes
    raw: bytes   # the components, concatenated as in the text form

    @property
    def text(self) -> str:
        return f"{self.suite.name}:{base64.b64encode(self.raw).decode('ascii')}"

    def __eq__(self, other) -> bool:
        return isinstance(other, SpoolPublicKey) and self.text == other.text

    def __hash__(self) -> int:
        return hash(self.text)


@dataclass(frozen=True, eq=False)
class SpoolPrivateKey:
    suite: Suite
    key: "hpke.MLKEM768X25519PrivateKey | X25519PrivateKey"   # what hpke.Suite.decrypt takes
    public_key: SpoolPublicKey
    # The private components, concatenated: the ML-KEM-768 seed (mlkem768-x25519 only), then the X25519 key.
    raw: bytes = field(repr=False)


def _suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise ValueError(f"unknown spool key suite {name!r}; choose one of {', '.join(SUITES)}") from None


def spool_private_key(suite: Suite, raw: bytes) -> SpoolPrivateKey:
    """The key whose private components are `raw` (SpoolPrivateKey.raw); ValueError if it has the wrong length."""
    if len(raw) != suite.private_length:
        raise ValueError(f"a {suite.name} private key has {suite.private_length} bytes, not {len(raw)}")
    x25519 = X25519PrivateKey.from_private_bytes(raw[-X25519_LENGTH:])
    x25519_public = x25519.public_key().public_bytes_raw()
    if suite is MLKEM768_X25519:
        mlkem = MLKEM768PrivateKey.from_seed_bytes(raw[:MLKEM768_SEED_LENGTH])
        public_raw = mlkem.public_key().public_bytes_raw() + x25519_public
        public = SpoolPublicKey(suite, hpke.MLKEM768X25519PublicKey(mlkem.public_key(), x25519.public_key()),
                                public_raw)
        return SpoolPrivateKey(suite, hpke.MLKEM768X25519PrivateKey(mlkem, x25519), public, raw)
    return SpoolPrivateKey(suite, x25519, SpoolPublicKey(suite, x25519.public_key(), x25519_public), raw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def generate_spool_key(path: Path, suite: str = DEFAULT_SUITE) -> str:
    """Write a new spool private key to `path` (mode 0600, never overwriting); returns the public key text."""
    chosen = _suite(suite)
    raw = X25519PrivateKey.generate().private_bytes_raw()
    if chosen is MLKEM768_X25519:
        raw = MLKEM768PrivateKey.generate().private_bytes_raw() + raw
    key = spool_private_key(chosen, raw)
    write_spool_key(path, key)
    return key.public_key.text


def write_spool_key(path: Path, key: SpoolPrivateKey) -> None:
    """Write `key` to a new file at `path` in the format above (mode 0600, never overwriting)."""
    lines = [
        "# YesTLS home spool private key: opens the mail the edge seals. Keep it at home, readable only by",
        "# the intake's user. Mail sealed to it cannot be read without it: back it up like a password.",
        f"{FILE_FORMAT}: {FILE_VERSION}",
        f"suite: {key.suite.name}",
    ]
    if key.suite is MLKEM768_X25519:
        lines.append(f"mlkem768-seed: {_b64(key.raw[:MLKEM768_SEED_LENGTH])}")
    lines.append(f"x25519: {_b64(key.raw[-X25519_LENGTH:])}")
    try:
        create_private_file(Path(path), ("\n".join(lines) + "\n").encode("ascii"))
    except FileExistsError:
        raise SpoolKeyError(f"spool key {path} already exists: refusing to replace it (mail sealed to it could "
                            f"no longer be opened); remove it first if you mean to replace it") from None
    except OSError as error:
        raise SpoolKeyError(f"spool key {path} cannot be written ({error.strerror}); "
                            f"choose a path in an existing directory the intake's user can write") from None


def load_spool_private_key(path: Path, owner_uid: int | None = None) -> SpoolPrivateKey:
    """The spool key at `path`, refused unless only `owner_uid` (default: this process's user) can read it."""
    data = read_private_file(Path(path), os.getuid() if owner_uid is None else owner_uid, SpoolKeyError,
                             "spool key", f"yestls keys spool-new --out {path}")
    try:
        return _parse_private_key(data)
    except ValueError as error:
        raise SpoolKeyError(f"spool key {path}: {error}; make a key with `yestls keys spool-new --out FILE`") from None


def _parse_private_key(data: bytes) -> SpoolPrivateKey:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("not a spool key file (not ASCII text)") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise ValueError(f"line {line[:40]!r} is not 'name: value'")
        if name in fields:
            raise ValueError(f"{name!r} appears twice")
        fields[name] = value
    if fields.get(FILE_FORMAT) != FILE_VERSION:
        raise ValueError(f"not a spool key file (no '{FILE_FORMAT}: {FILE_VERSION}' line)")
    suite = _suite(fields.get("suite", ""))
    expected = {FILE_FORMAT, "suite", "x25519"} | ({"mlkem768-seed"} if suite is MLKEM768_X25519 else set())
    if set(fields) != expected:
        extra, missing = sorted(set(fields) - expected), sorted(expected - set(fields))
        raise ValueError(f"a {suite.name} key has the fields {sorted(expected)}; "
                         f"missing {missing}, unexpected {extra}")
    raw = _decode_field(fields, "x25519", X25519_LENGTH)
    if suite is MLKEM768_X25519:
        raw = _decode_field(fields, "mlkem768-seed", MLKEM768_SEED_LENGTH) + raw
    return spool_private_key(suite, raw)


def _decode_field(fields: dict[str, str], name: str, length: int) -> bytes:
    try:
        raw = base64.b64decode(fields[name], validate=True)
    except binascii.Error:
        raise ValueError(f"{name} is not valid base64") from None
    if len(raw) != length:
        raise ValueError(f"{name} holds {len(raw)} bytes, not {length}")
    return raw


def parse_spool_public_key(text: str) -> SpoolPublicKey:
    """The key in a "SUITE:<base64>" line (`yestls keys spool-new` prints it); ValueError says what is malformed."""
    text = text.strip()
    shown = text[:60] + ("..." if len(text) > 60 else "")
    name, sep, encoded = text.partition(":")
    if not sep:
        raise ValueError(f"spool public key {shown!r} must start with the suite: "
                         f"{' or '.join(repr(s + ':') for s in SUITES)}")
    if name not in SUITES:
        raise ValueError(f"spool public key {shown!r} names the unknown suite {name!r}; "
                         f"expected one of {', '.join(SUITES)}")
    suite = SUITES[name]
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError(f"spool public key {shown!r} is not valid base64 after {name + ':'!r}") from None
    if len(raw) != suite.public_length:
        raise ValueError(f"spool public key {shown!r} holds {len(raw)} bytes; a {name} public key has "
                         f"{suite.public_length} (was the line cut or wrapped?)")
    # One spelling per key, so configs compare equal as text too.
    if _b64(raw) != encoded:
        raise ValueError(f"spool public key {shown!r} is not in canonical base64")
    try:
        if suite is MLKEM768_X25519:
            mlkem = MLKEM768PublicKey.from_public_bytes(raw[:MLKEM768_PUBLIC_LENGTH])
            x25519 = X25519PublicKey.from_public_bytes(raw[MLKEM768_PUBLIC_LENGTH:])
            key = hpke.MLKEM768X25519PublicKey(mlkem, x25519)
        else:
            key = X25519PublicKey.from_public_bytes(raw)
    except ValueError as error:
        raise ValueError(f"spool public key {shown!r} is not a valid {name} key: {error}") from None
    return SpoolPublicKey(suite, key, raw)
