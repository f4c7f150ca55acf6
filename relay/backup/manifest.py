"""The backup's manifest: who owns each file saved, and where each copy goes back.

restic keeps numeric owners; a rebuilt home gives its users other numbers.
So each backup writes staging/manifest.json: every directory, file and link
under the saved paths with its owner and group *by name* and its mode, the
ledger's place and owner, and for each mailbox copy the Maildir it came from.
The restore (relay/backup/restore.py) reads it back and puts everything where
it was, owned by the users of the new host with those names.
"""

import enum
import fnmatch
import grp
import json
import os
import pwd
import socket
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from relay.backup.config import BackupConfig
from relay.private_files import write_atomically

FORMAT = 1
NAME = "manifest.json"


class ManifestError(Exception):
    pass


class Kind(enum.StrEnum):
    DIRECTORY = "dir"
    FILE = "file"
    SYMLINK = "symlink"


@dataclass(frozen=True)
class Entry:
    path: str
    kind: Kind
    user: str
    group: str
    mode: int


@dataclass(frozen=True)
class Mailbox:
    user: str       # the Dovecot user
    copy: str       # its mirror under staging/mail
    maildir: str    # where its Maildir was (and goes back to)


@dataclass(frozen=True)
class Manifest:
    host: str
    time: float
    entries: tuple[Entry, ...]
    ledger: Entry
    mail_owner: str
    mailboxes: tuple[Mailbox, ...]


def _name(table, number: int) -> str:
    try:
        return table(number)[0]
    except KeyError:
        return str(number)   # an owner without a name: kept as its number


def entry(path: Path) -> Entry:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        kind = Kind.DIRECTORY
    elif stat.S_ISLNK(st.st_mode):
        kind = Kind.SYMLINK
    elif stat.S_ISREG(st.st_mode):
        kind = Kind.FILE
    else:
        raise ManifestError(f"{path} is neither a file, a directory nor a link; keep such things out of paths")
    return Entry(str(path), kind, _name(pwd.getpwuid, st.st_uid), _name(grp.getgrgid, st.st_gid),
                 stat.S_IMODE(st.st_mode))


def _excluded(path: Path, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(str(path), pattern) for pattern in patterns)


def walk(paths: tuple[Path, ...], exclude: tuple[str, ...]) -> list[Entry]:
    """Every entry under `paths` (links not followed) but the excluded, parents before children."""
    entries = []
    for top in paths:
        if not os.path.lexists(top):
            raise ManifestError(f"{top} (in backup.toml's paths) does not exist; remove it from paths")
        for directory, subdirectories, files in os.walk(top):
            here = Path(directory)
            if _excluded(here, exclude):
                subdirectories[:] = []
                continue
            entries.append(entry(here))
            subdirectories.sort()
            links = [d for d in subdirectories if (here / d).is_symlink()]
            subdirectories[:] = [d for d in subdirectories if d not in links]
            entries += [entry(here / name) for name in sorted([*files, *links])
                        if not _excluded(here / name, exclude)]
        if not top.is_dir():
            entries.append(entry(top))
    return entries


def write(config: BackupConfig, homes: list[dict]) -> Manifest:
    manifest = Manifest(socket.gethostname(), time.time(), tuple(walk(config.paths, config.exclude)),
                        entry(config.ledger), config.mail_user, tuple(Mailbox(**home) for home in homes))
    data = {"format": FORMAT, **asdict(manifest)}
    write_atomically(config.staging / NAME, json.dumps(data, indent=1).encode() + b"\n")
    return manifest


def read(path: Path) -> Manifest:
    try:
        data = json.loads(path.read_bytes())
        if data.get("format") != FORMAT:
            raise ManifestError(f"{path}: format {data.get('format')!r}, this YesTLS reads {FORMAT}")
        return Manifest(data["host"], data["time"],
                        tuple(_entry(e) for e in data["entries"]), _entry(data["ledger"]), data["mail_owner"],
                        tuple(Mailbox(**m) for m in data["mailboxes"]))
    except FileNotFoundError:
        raise ManifestError(f"{path} is not in the snapshot: it was not made by `yestls backup run`") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ManifestError(f"{path} cannot be read: {error!r}") from None


def _entry(data: dict) -> Entry:
    path = data["path"]
    if not isinstance(path, str) or not path.startswith("/") or "/../" in path + "/":
        raise ValueError(f"path {path!r} is not absolute and plain")
    return Entry(path, Kind(data["kind"]), str(data["user"]), str(data["group"]), int(data["mode"]) & 0o7777)
