"""Files that hold secrets: created readable by their owner only, read only when still so; files replaced whole.

Every private key YesTLS writes (the edge identity, the home spool key, the
oracle's TLS keys) goes through `create_private_file`; the identity and spool
keys are read back through `read_private_file`, which refuses a file others
could read or that another user owns, naming the file and the fix. Every
file YesTLS replaces (a certificate chain, a quarantined message, a cached
address book, the status file) goes through `write_atomically`: a crash
leaves the old file or the new one, never half of one.
"""

import os
import stat
import tempfile
from pathlib import Path


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


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` (owner-only unless `mode` says otherwise): temp file, fsync, rename, fsync the
    directory."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(fd, mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a new or renamed entry in `directory` survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_private_file(path: Path, owner_uid: int, error: type[Exception], what: str, make: str,
                      limit: int = 64 * 1024) -> bytes:
    """The bytes of `path` if it is a regular file only `owner_uid` can read; else `error(message)`.

    `what` names the file in messages ("spool key"), `make` says how to make
    one ("yestls keys spool-new --out FILE").
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; make it with `{make}`") from None
    except OSError as failure:
        raise error(f"{what} {path} cannot be opened ({failure.strerror}); it must be a regular file "
                    f"its service's user can read") from None
    # fstat the open file, not the path: what was checked is what is read. Before
    # fdopen, which refuses a directory with an error of its own.
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{what} {path} is not a regular file; make one with `{make}`")
    with os.fdopen(fd, "rb") as file:
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise error(f"{what} {path} has mode {mode:04o}: it must be readable by its owner only; "
                        f"run chmod 600 {path}")
        if st.st_uid != owner_uid:
            raise error(f"{what} {path} is owned by uid {st.st_uid}, not uid {owner_uid} that runs the "
                        f"service; run chown {owner_uid} {path}")
        return file.read(limit)
