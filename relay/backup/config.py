"""backup.toml: where home's backup goes, what it holds, how long it is kept (roles/home_backup writes it).

    repository = "/srv/backup/yestls"          # any restic repository: a path, sftp:, s3:, rest:, ...
    password_file = "/etc/yestls/backup.pass"   # the user's passphrase; never on the edge, never in the repository
    paths = ["/var/lib/yestls-signer/keystore", "/etc/wireguard", ...]   # backed up as they are
    exclude = ["/var/lib/yestls-intake/ledger.sqlite*"]                # taken consistently instead (staging)
    staging = "/var/lib/yestls-backup/staging"  # the ledger's and the mailboxes' consistent copies
    status_file = "/var/lib/yestls-backup/status.json"
    ledger = "/var/lib/yestls-intake/ledger.sqlite"
    intake_unit = "yestls-intake.service"       # paused while the ledger and the mail are copied
    mail_user = "vmail"                         # owns the mailboxes' copy (doveadm backup runs as it)
    max_age_hours = 36                          # `yestls status` warns after this long without a success
    [retention]                                 # restic forget --keep-*
    daily = 7
    weekly = 5
    monthly = 12

Backend credentials (S3 keys, an sftp identity) are restic's own environment
variables, which the systemd unit reads from an EnvironmentFile: nothing here.
"""

from dataclasses import dataclass
from pathlib import Path

from relay.config import ConfigError, Table

DEFAULT_PATH = Path("/etc/yestls/backup.toml")


@dataclass(frozen=True)
class Retention:
    daily: int
    weekly: int
    monthly: int

    def restic_flags(self) -> list[str]:
        return ["--keep-daily", str(self.daily), "--keep-weekly", str(self.weekly),
                "--keep-monthly", str(self.monthly)]


@dataclass(frozen=True)
class BackupConfig:
    repository: str
    password_file: Path
    paths: tuple[Path, ...]
    exclude: tuple[str, ...]
    staging: Path
    status_file: Path
    ledger: Path
    intake_unit: str
    mail_user: str
    max_age_hours: float
    retention: Retention

    @property
    def ledger_copy(self) -> Path:
        return self.staging / "ledger.sqlite"

    @property
    def mail_copy(self) -> Path:
        return self.staging / "mail"


def _paths(table: Table, key: str) -> tuple[Path, ...]:
    values = table.get(key, list, check=lambda v: all(isinstance(p, str) and p.startswith("/") for p in v),
                       hint="a list of absolute paths")
    return tuple(Path(p) for p in values)


def _count(table: Table, key: str, default: int) -> int:
    return table.get(key, int, default=default, check=lambda n: 0 <= n <= 1000, hint="a count from 0 to 1000")


def load(path: Path = DEFAULT_PATH) -> BackupConfig:
    table = Table.load(path)
    absolute = {"check": lambda p: p.startswith("/"), "hint": "an absolute path"}
    config = BackupConfig(
        repository=table.get("repository", str, check=bool, hint="a restic repository: a path, sftp:..., s3:..."),
        password_file=Path(table.get("password_file", str, **absolute)),
        paths=_paths(table, "paths"),
        exclude=tuple(table.get("exclude", list, default=[], check=lambda v: all(isinstance(p, str) for p in v),
                                hint="a list of restic exclude patterns")),
        staging=Path(table.get("staging", str, **absolute)),
        status_file=Path(table.get("status_file", str, **absolute)),
        ledger=Path(table.get("ledger", str, **absolute)),
        intake_unit=table.get("intake_unit", str, default="yestls-intake.service"),
        mail_user=table.get("mail_user", str, default="vmail", check=bool, hint="the user owning the mailboxes"),
        max_age_hours=float(table.get("max_age_hours", (int, float), default=36, check=lambda h: h > 0,
                                      hint="hours, more than 0")),
        retention=_retention(table.table("retention")),
    )
    table.done()
    if config.staging in config.paths or any(config.staging.is_relative_to(p) for p in config.paths):
        raise ConfigError(f"{path}: staging {config.staging} is inside the paths backed up; it is added itself")
    return config


def _retention(table: Table) -> Retention:
    retention = Retention(_count(table, "daily", 7), _count(table, "weekly", 5), _count(table, "monthly", 12))
    table.done()
    if not (retention.daily or retention.weekly or retention.monthly):
        raise table.error("daily", "daily, weekly and monthly are all 0: every snapshot would be forgotten")
    return retention
