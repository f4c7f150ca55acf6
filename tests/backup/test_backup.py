"""Home's backup and its restore (relay/backup/) with the real restic and SQLite; systemctl and doveadm are
stood in for (the Molecule scenario runs the real ones: molecule/default/tests/test_rebuild_home.py).

A backup of a made-up home (keys, a ledger, a Maildir) is restored into an empty directory standing for
a fresh host: every byte, mode and owner is back, the ledger's rows, the mail; the intake was paused
around the copies; a wrong passphrase changes nothing; a live home is refused.
"""

import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from relay.backup import config as backup_config
from relay.backup import manifest as manifests
from relay.backup import restore, take
from relay.backup.manifest import Entry, Kind, Manifest
from relay.backup.restic import Restic, ResticError
from relay.config import ConfigError
from relay.home.ledger import Ledger
from relay.status import backup_rows

ME = pwd.getpwuid(os.getuid()).pw_name
USERS = ("user@example.org", "other@example.org")


class FakeHost:
    """systemctl and doveadm as the backup calls them; anything else (restic) really runs."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[list[str]] = []
        self.intake_active = True
        self.fail_copy = False

    def home(self, user: str) -> Path:
        return self.root / "var/vmail" / user.split("@")[1] / user.split("@")[0]

    def __call__(self, command, **kwargs):
        if command[0] not in ("systemctl", "doveadm", "groupadd", "useradd"):
            return subprocess.run(command, **kwargs)
        self.calls.append(list(command))
        out, code = "", 0
        match command:
            case ["systemctl", "is-active", "--quiet", _]:
                code = 0 if self.intake_active else 3
            case ["systemctl", "stop", _]:
                self.intake_active = False
            case ["systemctl", "start", _]:
                self.intake_active = True
            case ["doveadm", "user", "*"]:
                out = "\n".join(USERS) + "\n"
            case ["doveadm", "config", "-h", "mail_location"]:
                out = "maildir:~/Maildir\n"
            case ["doveadm", "user", "-f", "home", user]:
                out = f"{self.home(user)}\n"
            case ["doveadm", "backup", "-u", user, location]:
                if self.fail_copy:
                    return subprocess.CompletedProcess(command, 75, "", "Error: dsync: mailbox locked")
                assert not self.intake_active, "the mail was copied while the intake ran"
                target = Path(location.removeprefix("maildir:"))
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(self.home(user) / "Maildir", target)
        return subprocess.CompletedProcess(command, code, out, "")

    def commands(self, program: str) -> list[list[str]]:
        return [c for c in self.calls if c[0] == program]


def _write(path: Path, data: bytes, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


@pytest.fixture
def home(tmp_path):
    """A made-up home under tmp_path/host: keys, a ledger with rows, two users' mail; its backup.toml."""
    host = tmp_path / "host"
    keys = {
        _write(host / "var/lib/yestls-intake/spool.key", os.urandom(64), 0o600): None,
        _write(host / "var/lib/yestls-intake/identity.key", os.urandom(32), 0o600): None,
        _write(host / "var/lib/yestls-signer/keystore/mx.key", os.urandom(48), 0o400): None,
        _write(host / "etc/wireguard/wg0.key", b"wg-private-key\n", 0o600): None,
        _write(host / "etc/yestls/intake.toml", b"# config\n", 0o644): None,
    }
    os.chmod(host / "var/lib/yestls-signer/keystore", 0o700)
    (host / "etc/yestls/current").symlink_to("intake.toml")
    ledger = Ledger(host / "var/lib/yestls-intake/ledger.sqlite")
    edge = ledger.edge("edge")
    for n in range(3):
        edge.save(edge.start(f"{n:032x}", ["user@example.org"]))
    edge.mark_acked([f"{0:032x}"])
    ledger.close()
    _write(host / "var/lib/yestls-intake/status.json", b"{}", 0o644)
    fake = FakeHost(host)
    for user in USERS:
        maildir = fake.home(user) / "Maildir"
        for folder in ("cur", "new", "tmp", ".Junk/cur", ".Junk/new", ".Junk/tmp"):
            (maildir / folder).mkdir(parents=True)
        _write(maildir / "cur" / f"1.{user}:2,S", f"Subject: for {user}\r\n\r\nhello\r\n".encode(), 0o600)
        _write(maildir / ".Junk/new" / "2.spam", b"Subject: spam\r\n\r\nbuy\r\n", 0o600)
    state = tmp_path / "backup-state"
    _write(tmp_path / "backup.pass", b"correct horse battery staple\n", 0o600)
    toml = _write(tmp_path / "backup.toml", f"""
repository = "{tmp_path / 'repository'}"
password_file = "{tmp_path / 'backup.pass'}"
paths = ["{host / 'var/lib/yestls-intake'}", "{host / 'var/lib/yestls-signer'}", "{host / 'etc/wireguard'}",
         "{host / 'etc/yestls'}"]
exclude = ["{host}/var/lib/yestls-intake/ledger.sqlite*", "{host}/var/lib/yestls-intake/status.json"]
staging = "{state / 'staging'}"
status_file = "{state / 'status.json'}"
ledger = "{host / 'var/lib/yestls-intake/ledger.sqlite'}"
mail_user = "{ME}"
max_age_hours = 24
[retention]
daily = 2
weekly = 0
monthly = 0
""".encode(), 0o644)
    config = backup_config.load(toml)
    Restic(config.repository, config.password_file).init()
    return config, fake, list(keys)


def _tree(top: Path) -> dict[str, tuple[int, bytes | str | None]]:
    found = {}
    for directory, _, files in os.walk(top):
        for name in [*files, ""]:
            path = Path(directory, name)
            st = os.lstat(path)
            content = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else None
            found[str(path.relative_to(top))] = (st.st_mode, content)
    return found


def _rows(ledger_path: Path) -> list[tuple]:
    db = sqlite3.connect(ledger_path)
    try:
        return db.execute("SELECT spool_id, state, recipients, acked FROM messages ORDER BY spool_id").fetchall()
    finally:
        db.close()


def test_a_backup_restored_on_a_fresh_host_gives_back_every_key_the_ledger_and_the_mail(home, tmp_path):
    config, fake, _ = home
    snapshot = take.take(config, run=fake)
    assert snapshot.files > 0 and snapshot.bytes_added > 0
    # the intake was stopped for the copies and started again before restic ran
    order = [c[:2] for c in fake.calls if c[0] == "systemctl"]
    assert order == [["systemctl", "is-active"], ["systemctl", "stop"], ["systemctl", "start"]]
    assert fake.intake_active

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    done = restore.restore(config, run=fake, root=fresh)
    assert (done.mailboxes, done.users_made) == (2, ())
    restored = fresh / fake.root.relative_to("/")
    before, after = _tree(fake.root), _tree(restored)
    # everything is back, byte for byte and mode for mode, but what the backup leaves out on purpose
    left_out = {"var/lib/yestls-intake/status.json", "var/lib/yestls-intake/ledger.sqlite-wal",
                "var/lib/yestls-intake/ledger.sqlite-shm", "var/lib/yestls-intake/ledger.sqlite"}
    assert {k: v for k, v in before.items() if k not in left_out and not k.startswith("var/vmail")} == \
        {k: v for k, v in after.items() if k not in left_out and not k.startswith("var/vmail")}
    rows = _rows(fake.root / "var/lib/yestls-intake/ledger.sqlite")
    assert len(rows) == 3 and rows[0][3] == 1  # three messages, the first acknowledged
    assert _rows(restored / "var/lib/yestls-intake/ledger.sqlite") == rows
    for user in USERS:
        maildir = fake.home(user).relative_to(fake.root) / "Maildir"
        mail = {k: v[1] for k, v in _tree(fake.root / maildir).items() if v[1] is not None}
        assert mail and {k: v[1] for k, v in _tree(restored / maildir).items() if v[1] is not None} == mail
    # the scratch directory that held every key is gone
    assert not restore.scratch(config).exists()


def test_the_status_file_and_yestls_status_show_the_last_backup(home):
    config, fake, _ = home
    toml = Path(str(config.staging.parent.parent / "backup.toml"))
    [never] = backup_rows(toml, time.time(), home=True)
    assert never.text.startswith("NEVER")
    snapshot = take.take(config, run=fake)
    status = take.BackupStatus.read(config.status_file)
    assert (status.snapshot, status.last_error) == (snapshot.id, None)
    assert isinstance(status.intake_paused_seconds, float), "the running intake was not paused"
    [fresh] = backup_rows(toml, time.time(), home=True)
    assert fresh.text.startswith(time.strftime("%Y-")) and snapshot.id in fresh.text and "OLD" not in fresh.text
    [old] = backup_rows(toml, time.time() + 25 * 3600, home=True)
    assert old.text.startswith("OLD (over 24 h)")
    assert backup_rows(None, time.time(), home=True)[0].unknown.startswith("NOT BACKED UP")
    assert backup_rows(None, time.time(), home=False) == []


def test_a_failed_copy_starts_the_intake_again_and_is_recorded(home):
    config, fake, _ = home
    fake.fail_copy = True
    with pytest.raises(take.BackupError, match="mailbox locked"):
        take.take(config, run=fake)
    assert fake.intake_active, "the intake stayed stopped after a failed backup"
    status = take.BackupStatus.read(config.status_file)
    assert status.last_success is None and "mailbox locked" in status.last_error
    toml = config.staging.parent.parent / "backup.toml"
    assert "FAILED: " in backup_rows(toml, time.time(), home=True)[0].text
    fake.fail_copy = False
    take.take(config, run=fake)
    assert take.BackupStatus.read(config.status_file).last_error is None


def test_an_intake_that_was_not_running_is_not_started(home):
    config, fake, _ = home
    fake.intake_active = False
    take.take(config, run=fake)
    assert [c[1] for c in fake.commands("systemctl")] == ["is-active"]
    assert not fake.intake_active
    assert take.BackupStatus.read(config.status_file).intake_paused_seconds is None


def test_a_wrong_passphrase_fails_clearly_and_changes_nothing(home, tmp_path):
    config, fake, _ = home
    take.take(config, run=fake)
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not the passphrase\n")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(ResticError, match="passphrase in password_file is not this repository's"):
        restore.restore(config, restic=Restic(config.repository, wrong), run=fake, root=fresh)
    assert list(fresh.iterdir()) == []
    assert not restore.scratch(config).exists()
    with pytest.raises(ResticError, match="passphrase"):
        Restic(config.repository, wrong).snapshots()


def test_no_repository_says_how_to_make_one(tmp_path):
    (tmp_path / "pass").write_text("a passphrase of some length\n")
    restic = Restic(str(tmp_path / "nothing-here"), tmp_path / "pass")
    assert restic.exists() is False
    with pytest.raises(ResticError, match="yestls backup init"):
        restic.snapshots()
    assert restic.init() is True and restic.init() is False


def test_a_live_home_is_refused(home, tmp_path):
    config, fake, _ = home
    take.take(config, run=fake)
    with pytest.raises(restore.RestoreError, match="has a ledger already"):
        restore.restore(config, run=fake, root=Path("/"))
    fresh = tmp_path / "fresh"
    maildir = fresh / fake.home(USERS[1]).relative_to("/") / "Maildir" / "cur"
    maildir.mkdir(parents=True)
    (maildir / "x").write_bytes(b"Subject: new\r\n\r\n")
    with pytest.raises(restore.RestoreError, match="holds mail already"):
        restore.restore(config, run=fake, root=fresh)
    assert not (fresh / config.ledger.relative_to("/")).exists()


def test_owners_missing_on_the_new_host_are_made_by_name(home):
    _, fake, _ = home
    manifest = Manifest("old", 0.0, (Entry("/etc/x", Kind.FILE, "yestls-nosuch", "yestls-nosuch", 0o600),
                                     Entry("/etc/y", Kind.FILE, "root", "yestls-nogroup", 0o640)),
                        Entry("/l", Kind.FILE, "root", "root", 0o600), "yestls-nomail", ())
    made = restore._ensure_owners(manifest, fake)
    assert made == ("group yestls-nogroup", "group yestls-nosuch", "user yestls-nomail", "user yestls-nosuch")
    assert fake.commands("useradd")[1][-3:] == ["--gid", "yestls-nosuch", "yestls-nosuch"]
    assert fake.commands("useradd")[0][-2:] == ["--user-group", "yestls-nomail"]


def test_the_ledger_copy_is_consistent_while_a_writer_commits(home):
    config, fake, _ = home
    config.staging.parent.mkdir()
    stop = threading.Event()

    def write():
        ledger = Ledger(config.ledger)
        edge = ledger.edge("edge")
        n = 100
        while not stop.is_set():
            edge.save(edge.start(f"{n:032x}", ["user@example.org"]))
            n += 1
        ledger.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(5):
            take.copy_ledger(config.ledger, config.staging.parent / "copy.sqlite")
            db = sqlite3.connect(config.staging.parent / "copy.sqlite")
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert db.execute("SELECT count(*) FROM messages").fetchone()[0] >= 3
            db.close()
    finally:
        stop.set()
        writer.join()


def test_the_manifest_names_owners_and_skips_what_is_excluded(home):
    config, fake, keys = home
    take.take(config, run=fake)
    manifest = manifests.read(config.staging / manifests.NAME)
    paths = {e.path: e for e in manifest.entries}
    for key in keys:
        assert paths[str(key)].user == ME and paths[str(key)].mode == os.stat(key).st_mode & 0o7777
    assert paths[str(fake.root / "etc/yestls/current")].kind is Kind.SYMLINK
    assert not any("ledger.sqlite" in p or p.endswith("status.json") for p in paths)
    assert manifest.ledger.path == str(config.ledger)
    assert [m.user for m in manifest.mailboxes] == sorted(USERS)
    data = json.loads((config.staging / manifests.NAME).read_bytes())
    data["format"] = 99
    (config.staging / manifests.NAME).write_text(json.dumps(data))
    with pytest.raises(manifests.ManifestError, match="format 99"):
        manifests.read(config.staging / manifests.NAME)


@pytest.mark.parametrize(("change", "error"), [
    ('staging = "/srv/keys/staging"', "inside the paths"),
    ("[retention]\ndaily = 0\nweekly = 0\nmonthly = 0", "every snapshot would be forgotten"),
    ('colour = "blue"', "colour: unknown setting"),
    ('max_age_hours = 0', "max_age_hours"),
])
def test_backup_toml_errors_name_the_setting(tmp_path, change, error):
    base = {"repository": '"/srv/backup"', "password_file": '"/etc/yestls/backup.pass"', "paths": '["/srv/keys"]',
            "staging": '"/var/lib/yestls-backup/staging"', "status_file": '"/var/lib/yestls-backup/status.json"',
            "ledger": '"/var/lib/yestls-intake/ledger.sqlite"'}
    key = change.split(" ", 1)[0]
    lines = [f"{k} = {v}" for k, v in base.items() if k != key]
    path = tmp_path / "backup.toml"
    path.write_text("\n".join([*lines, change]) + "\n")
    with pytest.raises(ConfigError, match=error):
        backup_config.load(path)
