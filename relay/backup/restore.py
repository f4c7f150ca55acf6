"""Rebuilding home from a backup: everything back in place before any role could make a new key.

`yestls backup restore` on a fresh host (playbooks/restore-home.yml runs it
before site.yml):

1. restic restores the snapshot into a private directory. A wrong passphrase
   or a missing repository fails here, before anything on the host changed.
2. It refuses a host that already has a ledger or mail (a live home): a
   restore replaces keys, and must never do that to a running one by accident.
3. The users and groups the manifest names are made when missing (system
   users without a shell; the roles adjust them after).
4. Each directory, file and link goes back with its owner by name and its
   mode; the ledger copy becomes the ledger; each mailbox copy becomes its
   Maildir, owned by the mail user. The private directory is deleted: it
   held every key.

Then site.yml finds the keys (the roles make one only where none exists), the
same WireGuard key (the edge sees the same peer), the same TLS key (same
TLSA), the same spool key (mail waiting sealed on the edge opens) and the same
ledger (nothing delivered twice).
"""

import grp
import logging
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.backup import manifest as manifests
from relay.backup.config import BackupConfig
from relay.backup.manifest import Entry, Kind, Manifest
from relay.backup.restic import Restic
from relay.private_files import fsync_directory

log = logging.getLogger("yestls.backup")


class RestoreError(Exception):
    pass


@dataclass(frozen=True)
class Restored:
    snapshot: str
    host: str
    entries: int
    mailboxes: int
    users_made: tuple[str, ...]


def scratch(config: BackupConfig) -> Path:
    return config.staging.parent / "restore"


def _refuse_a_live_home(ledger: Path, manifest: Manifest, root: Path) -> None:
    if ledger.exists():
        raise RestoreError(f"this host has a ledger already ({ledger}): it is a running home, and a restore "
                           "replaces its keys and mail. Restore on a fresh host, or move the ledger away first")
    for mailbox in manifest.mailboxes:
        maildir = root / mailbox.maildir.lstrip("/")
        if maildir.exists() and any(maildir.iterdir()):
            raise RestoreError(f"{maildir} ({mailbox.user}) holds mail already; a restore fills empty mailboxes only")


def _ensure_owners(manifest: Manifest, run: Callable) -> tuple[str, ...]:
    """Make the groups and users the manifest names that this host lacks (owners kept as numbers are left)."""
    entries = [*manifest.entries, manifest.ledger]
    made, groups_made = [], set()
    for group in sorted({e.group for e in entries}):
        if not group.isdigit() and _group(group) is None:
            _command(["groupadd", "--system", group], run)
            made.append(f"group {group}")
            groups_made.add(group)
    for user in sorted({e.user for e in entries} | {manifest.mail_owner}):
        if user.isdigit() or _user(user) is not None:
            continue
        own_group = ["--gid", user] if user in groups_made or _group(user) is not None else ["--user-group"]
        _command(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                  "--shell", "/usr/sbin/nologin", *own_group, user], run)
        made.append(f"user {user}")
    return tuple(made)


def _user(name: str):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _group(name: str) -> str | None:
    try:
        return grp.getgrnam(name).gr_name
    except KeyError:
        return None


def _command(command: list[str], run: Callable) -> None:
    done = run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RestoreError(f"{' '.join(command)} failed: {done.stderr.strip()}")


def _ids(entry_user: str, entry_group: str) -> tuple[int, int]:
    uid = int(entry_user) if entry_user.isdigit() else pwd.getpwnam(entry_user).pw_uid
    gid = int(entry_group) if entry_group.isdigit() else grp.getgrnam(entry_group).gr_gid
    return uid, gid


def _place(entry: Entry, source: Path, target: Path) -> None:
    uid, gid = _ids(entry.user, entry.group)
    if entry.kind is Kind.DIRECTORY:
        target.mkdir(parents=True, exist_ok=True)
    elif entry.kind is Kind.SYMLINK:
        if os.path.lexists(target):
            target.unlink()
        target.symlink_to(os.readlink(source))
        os.lchown(target, uid, gid)
        return
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.restore")
        shutil.copyfile(source, partial, follow_symlinks=False)
        os.chmod(partial, 0o600)
        with open(partial, "rb") as file:
            os.fsync(file.fileno())
        os.replace(partial, target)
    os.chown(target, uid, gid)
    os.chmod(target, entry.mode)


def _place_maildir(source: Path, target: Path, owner: str) -> None:
    account = pwd.getpwnam(owner)
    uid, gid = account.pw_uid, account.pw_gid
    for parent in reversed(target.parents):
        if not parent.exists():
            parent.mkdir()
            os.chown(parent, uid, gid)
    shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    for directory, _, files in os.walk(target):
        os.chown(directory, uid, gid)
        for name in files:
            os.lchown(os.path.join(directory, name), uid, gid)
    fsync_directory(target.parent)


def restore(config: BackupConfig, snapshot: str = "latest", run: Callable = subprocess.run,
            restic: Restic | None = None, root: Path = Path("/")) -> Restored:
    """Everything of `snapshot` back in place under `root` (/ but in tests); see the module."""
    restic = restic or Restic(config.repository, config.password_file, run)
    work = scratch(config)
    if work.exists():
        shutil.rmtree(work)
    work.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    work.mkdir(mode=0o700)
    try:
        restic.restore(snapshot, work)
        found = work / config.staging.relative_to("/")
        manifest = manifests.read(found / manifests.NAME)
        _refuse_a_live_home(root / config.ledger.relative_to("/"), manifest, root)
        made = _ensure_owners(manifest, run)
        placed = 0
        for entry in manifest.entries:
            source = work / entry.path.lstrip("/")
            if not os.path.lexists(source):
                log.warning("%s is in the manifest but not in the snapshot; left out", entry.path)
                continue
            _place(entry, source, root / entry.path.lstrip("/"))
            placed += 1
        _place(manifest.ledger, found / config.ledger_copy.name, root / manifest.ledger.path.lstrip("/"))
        for mailbox in manifest.mailboxes:
            copy = work / mailbox.copy.lstrip("/")
            _place_maildir(copy, root / mailbox.maildir.lstrip("/"), manifest.mail_owner)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("restored snapshot %s of %s: %d entries, %d mailboxes%s", snapshot, manifest.host, placed,
             len(manifest.mailboxes), f"; made {', '.join(made)}" if made else "")
    return Restored(snapshot, manifest.host, placed, len(manifest.mailboxes), made)

