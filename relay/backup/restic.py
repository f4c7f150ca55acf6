"""restic, the tool that keeps home's backups: run as a subprocess, its answers typed.

Why restic (Debian's package) and not borgbackup: both encrypt, deduplicate
and keep versions, but restic reaches every common backend by itself (a local
disk, sftp, S3 and its clones, its REST server, rclone) where borg needs borg
on the far side of an ssh link; restic's repository format is documented and
its `check --read-data` verifies every byte. Our side is small: one command
line per operation, with the repository and the passphrase file given by
backup.toml and the backend's credentials from the environment (the unit's
EnvironmentFile), and restic's failures turned into errors that say what to fix.
"""

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

RESTIC = "restic"
TAG = "yestls-home"


class ResticError(Exception):
    """restic failed; the message says how and, where we can tell, what to do."""


@dataclass(frozen=True)
class Snapshot:
    id: str
    files: int
    bytes_added: int
    bytes_processed: int
    seconds: float


def _explain(stderr: str) -> str:
    text = stderr.strip().splitlines()
    unread = [e for e in map(_json_line, text) if e.get("message_type") == "error"]
    if unread:
        error = unread[0].get("error") or {}
        reason = os.strerror(error["Err"]) if isinstance(error.get("Err"), int) else error
        return (f"{len(unread)} file(s) could not be read, first {unread[0].get('item')} ({reason}); "
                "no snapshot is counted as a success until every file is read")
    last = next((line for line in reversed(text) if line.startswith("Fatal:")), text[-1] if text else "")
    if "wrong password" in stderr:
        return f"{last} (the passphrase in password_file is not this repository's)"
    if "Is there a repository at the following location?" in stderr or "unable to open config file" in stderr:
        return f"{last} (no repository there yet: `yestls backup init` makes one)"
    return last or "no message"


class Restic:
    def __init__(self, repository: str, password_file: Path, run: Callable = subprocess.run):
        self.repository = repository
        self.password_file = password_file
        self._run = run

    def _command(self, *args: str, timeout: float | None = None, ok: Sequence[int] = (0,)) -> str:
        # The repository and the passphrase go in the environment, not argv (ps shows argv to everyone;
        # the passphrase itself is only ever in its file).
        env = {**os.environ, "RESTIC_REPOSITORY": self.repository, "RESTIC_PASSWORD_FILE": str(self.password_file)}
        env.pop("RESTIC_PASSWORD", None)
        env.pop("RESTIC_PASSWORD_COMMAND", None)
        try:
            done = self._run([RESTIC, *args], env=env, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise ResticError("restic is not installed (Debian: apt install restic)") from None
        except subprocess.TimeoutExpired:
            raise ResticError(f"restic {args[0]} did not finish in {timeout:.0f} s") from None
        if done.returncode not in ok:
            raise ResticError(f"restic {args[0]} failed (exit {done.returncode}): {_explain(done.stderr)}")
        return done.stdout

    def exists(self) -> bool:
        """True when a repository with our passphrase is there; False when there is none; ResticError else."""
        try:
            self._command("cat", "config")
        except ResticError as error:
            if "yestls backup init" in str(error):
                return False
            raise
        return True

    def init(self) -> bool:
        """Make the repository unless it exists; True when it was made."""
        if self.exists():
            return False
        self._command("init")
        return True

    def backup(self, paths: Sequence[Path], exclude: Sequence[str]) -> Snapshot:
        args = ["backup", "--json", "--tag", TAG]
        for pattern in exclude:
            args += ["--exclude", pattern]
        out = self._command(*args, *map(str, paths))
        summary = next((m for m in map(_json_line, out.splitlines()) if m.get("message_type") == "summary"), None)
        if summary is None:
            raise ResticError("restic backup printed no summary")
        return Snapshot(summary["snapshot_id"], summary["total_files_processed"], summary["data_added"],
                        summary["total_bytes_processed"], summary["total_duration"])

    def forget(self, keep: Sequence[str]) -> None:
        self._command("forget", "--tag", TAG, "--prune", *keep)

    def check(self, read_data_subset: str | None = None) -> None:
        self._command("check", *(["--read-data-subset", read_data_subset] if read_data_subset else []))

    def snapshots(self) -> list[dict]:
        return json.loads(self._command("snapshots", "--json", "--tag", TAG) or "[]")

    def restore(self, snapshot: str, target: Path, include: Sequence[str] = ()) -> None:
        args = ["restore", snapshot, "--target", str(target)]
        for pattern in include:
            args += ["--include", pattern]
        self._command(*args)


def _json_line(line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
