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
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

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
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise IdentityError(f"identity key {path} does not exist; make it with "
                            f"`yestls keys identity-new --out {path}`") from None
    except OSError as error:
        raise IdentityError(f"identity key {path} cannot be opened ({error.strerror}); "
                            f"it must be readable by the edge service's user") from None
    with os.fdopen(fd, "rb") as file:
        # fstat the open file, not the path: what was checked is what is read.
        st = os.fstat(file.fileno())
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"identity key {path} is not a regular file; "
                                f"make one with `yestls keys identity-new --out FILE`")
        if mode & 0o077:
            raise IdentityError(f"identity key {path} has mode {mode:04o}: it must be readable by its owner only; "
                                f"run chmod 600 {path}")
        if st.st_uid != owner_uid:
            raise IdentityError(f"identity key {path} is owned by uid {st.st_uid}, not uid {owner_uid} that runs "
                                f"the edge; run chown {owner_uid} {path}")
        data = file.read()
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


def create_private_file(path: Path, data: bytes) -> None:
    """Create `path` readable by its owner only (whatever the umask), never replacing a file; fsync it."""
    # O_EXCL: never overwrite; O_NOFOLLOW: never write through a planted link; the mode is set at
    # creation, so the secret is never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(fd, 0o600)  # a umask can only have removed bits; make it exact
            file.write(data)
            file.flush()
            os.fsync(fd)
    except BaseException:
        os.unlink(path)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a new or renamed entry in `directory` survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
