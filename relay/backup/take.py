"""Taking home's backup: a consistent copy of the ledger and the mailboxes, then restic.

The intake is the only writer of both the ledger and new mail, so the copy is
made while it is stopped: a point where every message the ledger calls
delivered is in the mailboxes, and every message not yet acknowledged is still
on the edge, sealed. Stopping it costs nothing but a short wait: mail queues
on the edge (sealed) and is pulled when it starts again. The copies go to the
staging directory: the ledger by SQLite's backup API (a consistent file even
were a writer running), each mailbox by `doveadm backup` (dsync: Dovecot's own
locks, incremental after the first run; the user keeps reading and moving mail
meanwhile). Then the intake starts again and restic saves the staging
directory with the keys and configuration listed in backup.toml, forgets by
the retention, and the result goes to the status file `yestls status` reads.
"""

import json
import logging
import os
import pwd
import sqlite3
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from relay.backup import manifest
from relay.backup.config import BackupConfig
from relay.backup.restic import Restic, ResticError, Snapshot
from relay.private_files import write_atomically

log = logging.getLogger("yestls.backup")


class BackupError(Exception):
    pass


@dataclass
class BackupStatus:
    """The status file: what `yestls status` shows about backups."""
    last_attempt: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    snapshot: str | None = None
    files: int | None = None
    bytes_added: int | None = None
    bytes_processed: int | None = None
    seconds: float | None = None
    intake_paused_seconds: float | None = None
    last_check: float | None = None
    last_check_error: str | None = None

    @classmethod
    def read(cls, path: Path) -> "BackupStatus":
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(asdict(self), indent=1).encode() + b"\n")


def _run(command: list[str], what: str, run: Callable, timeout: float | None = None) -> str:
    try:
        done = run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BackupError(f"{what}: {error}") from None
    if done.returncode != 0:
        raise BackupError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


@contextmanager
def intake_paused(unit: str, run: Callable):
    """The intake stopped for the copies, started again after (if it was running), whatever happens.

    Yields whether it was running (and so was paused)."""
    active = run(["systemctl", "is-active", "--quiet", unit]).returncode == 0
    if active:
        _run(["systemctl", "stop", unit], f"stopping {unit}", run)
    try:
        yield active
    finally:
        if active:
            _run(["systemctl", "start", unit], f"starting {unit} again", run)


def copy_ledger(ledger: Path, copy: Path) -> None:
    """A consistent copy of the intake's ledger (SQLite's online backup), replacing the last one."""
    if not ledger.exists():
        raise BackupError(f"the ledger {ledger} does not exist; set backup.toml's `ledger` to intake.toml's")
    partial = copy.with_name(copy.name + ".partial")
    partial.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        target = sqlite3.connect(partial)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()
    os.chmod(partial, 0o600)
    os.replace(partial, copy)


def mail_users(run: Callable) -> list[str]:
    return sorted(set(_run(["doveadm", "user", "*"], "listing the mailboxes (doveadm user '*')", run).split()))


def copy_mailboxes(users: list[str], copy: Path, mail_user: str, run: Callable) -> None:
    """Each user's mailboxes mirrored into copy/USER by dsync; mirrors of users that are gone are kept
    (restic's history has them either way; deleting is the user's to do)."""
    try:
        owner = pwd.getpwnam(mail_user)
    except KeyError:
        raise BackupError(f"mail_user {mail_user!r} does not exist; set it to the user owning the mailboxes") from None
    copy.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(copy, owner.pw_uid, owner.pw_gid)
    for user in users:
        if "/" in user or user.startswith("."):
            raise BackupError(f"doveadm names a user {user!r} that cannot be a directory name")
        _run(["doveadm", "backup", "-u", user, f"maildir:{copy / user}"], f"copying {user}'s mail (doveadm backup)",
             run)


def mail_homes(users: list[str], copy: Path, run: Callable) -> list[dict]:
    """Where each user's Maildir is (mail_location maildir:~/DIR), for the restore to put the copy back."""
    location = _run(["doveadm", "config", "-h", "mail_location"], "reading Dovecot's mail_location", run).strip()
    kind, _, where = location.partition(":")
    where = where.split(":", 1)[0]
    if kind != "maildir" or not where.startswith("~/"):
        raise BackupError(f"Dovecot's mail_location {location!r} is not maildir:~/DIR, the layout the backup knows")
    homes = []
    for user in users:
        home = _run(["doveadm", "user", "-f", "home", user], f"reading {user}'s home", run).strip()
        if not home.startswith("/"):
            raise BackupError(f"doveadm gives {user} the home {home!r}, not an absolute path")
        homes.append({"user": user, "copy": str(copy / user), "maildir": str(Path(home) / where[2:])})
    return homes


def take(config: BackupConfig, run: Callable = subprocess.run, restic: Restic | None = None,
         now: Callable[[], float] = time.time) -> Snapshot:
    """One backup: the copies with the intake paused, restic, retention; the status file either way."""
    restic = restic or Restic(config.repository, config.password_file, run)
    status = BackupStatus.read(config.status_file)
    status.last_attempt = now()
    try:
        config.staging.mkdir(mode=0o711, parents=True, exist_ok=True)
        users = mail_users(run)
        homes = mail_homes(users, config.mail_copy, run)
        started = time.monotonic()
        with intake_paused(config.intake_unit, run) as paused:
            copy_ledger(config.ledger, config.ledger_copy)
            copy_mailboxes(users, config.mail_copy, config.mail_user, run)
        status.intake_paused_seconds = round(time.monotonic() - started, 3) if paused else None
        manifest.write(config, homes)
        snapshot = restic.backup([*config.paths, config.staging], config.exclude)
        restic.forget(config.retention.restic_flags())
    except (BackupError, ResticError, OSError, sqlite3.Error) as error:
        status.last_error = str(error)
        status.write(config.status_file)
        raise BackupError(str(error)) from None
    status.last_success, status.last_error = now(), None
    status.snapshot, status.files = snapshot.id, snapshot.files
    status.bytes_added, status.bytes_processed = snapshot.bytes_added, snapshot.bytes_processed
    status.seconds = round(snapshot.seconds, 3)
    status.write(config.status_file)
    pause = f"the intake paused {status.intake_paused_seconds} s" if paused else "the intake was not running"
    log.info("backup %s: %d files, %d bytes new of %d, %.1f s (%s)", snapshot.id,
             snapshot.files, snapshot.bytes_added, snapshot.bytes_processed, snapshot.seconds, pause)
    return snapshot


def check(config: BackupConfig, run: Callable = subprocess.run, restic: Restic | None = None,
          read_data_subset: str | None = None, now: Callable[[], float] = time.time) -> None:
    """restic check of the repository (and a share of its data); the result in the status file."""
    restic = restic or Restic(config.repository, config.password_file, run)
    status = BackupStatus.read(config.status_file)
    status.last_check = now()
    try:
        restic.check(read_data_subset)
    except ResticError as error:
        status.last_check_error = str(error)
        status.write(config.status_file)
        raise BackupError(str(error)) from None
    status.last_check_error = None
    status.write(config.status_file)
