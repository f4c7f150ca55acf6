"""The edge's identity key: how the edge service proves itself to the key oracle.

An Ed25519 key born on the edge and readable only by the edge service's user.
WireGuard already says which host a connection comes from; this key says
which process: the oracle allowlists its public key, in the text form
`public_key_text` prints ("ed25519:" + base64 of the 32 raw bytes), so no
other process on the edge can use the oracle.
"""

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from relay.private_files import create_private_file, read_private_file

PREFIX = "ed25519:"


class IdentityError(Exception):
    """An unusable identity key file; the message names the file and the fix."""


def generate_identity(path: Path) -> str:
    """Write a new identity key to `path` (never overwriting); returns its public key text."""
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        create_private_file(Path(path), pem)
    except FileExistsError:
        raise IdentityError(f"identity key {path} already exists: refusing to replace it (the oracle allowlists "
                            f"its public key); remove it first if you mean to make a new identity") from None
    except OSError as error:
        raise IdentityError(f"identity key {path} cannot be written ({error.strerror}); "
                            f"choose a path in an existing directory the edge's user can write") from None
    return public_key_text(private_key.public_key())


def load_identity(path: Path, owner_uid: int | None = None) -> Ed25519PrivateKey:
    """The identity key at `path`, refused unless only `owner_uid` (default: this process's user) can read it."""
    owner_uid = os.getuid() if owner_uid is None else owner_uid
    data = read_private_file(Path(path), owner_uid, IdentityError, "identity key",
                             f"yestls keys identity-new --out {path}")
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        private_key = None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise IdentityError(f"identity key {path} is not an unencrypted PEM Ed25519 private key; "
                            f"make one with `yestls keys identity-new --out FILE`")
    return private_key


def public_key_text(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public_key_text(text: str) -> Ed25519PublicKey:
    """The key in an "ed25519:<base64>" line; ValueError says what is malformed."""
    text = text.strip()
    if not text.startswith(PREFIX):
        raise ValueError(f"identity public key {text[:60]!r} must start with {PREFIX!r}")
    try:
        raw = base64.b64decode(text[len(PREFIX):], validate=True)
    except binascii.Error:
        raise ValueError(f"identity public key {text[:60]!r} is not valid base64 after {PREFIX!r}") from None
    if len(raw) != 32:
        raise ValueError(f"identity public key {text[:60]!r} holds {len(raw)} bytes, an Ed25519 key has 32")
    public_key = Ed25519PublicKey.from_public_bytes(raw)
    # One spelling per key, so allowlist entries compare equal as text too.
    if public_key_text(public_key) != text:
        raise ValueError(f"identity public key {text[:60]!r} is not in canonical base64")
    return public_key
