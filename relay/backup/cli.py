"""`yestls backup`: home's backup (docs/backup.md). Run as root: it reads every key it saves."""

import argparse
import logging
import sys
from pathlib import Path

from relay.backup.config import DEFAULT_PATH
from relay.config import ConfigError


def add_parsers(subparsers) -> None:
    backup = subparsers.add_parser("backup", help="home's encrypted backup with restic (init, run, check, snapshots)",
                                   description="Keys, the intake's ledger, the mailboxes and home's configuration "
                                               "in a restic repository; see docs/backup.md.")
    commands = backup.add_subparsers(dest="backup_command", required=True)
    commands.add_parser("init", help="make the repository unless it exists (with the passphrase in password_file)")
    commands.add_parser("run", help="take a backup now (the timer runs this), then forget by the retention")
    check = commands.add_parser("check", help="restic check of the repository's structure (and some of its data)")
    check.add_argument("--read-data-subset", metavar="N/M|P%",
                       help="also read and verify this share of the data (restic's syntax: 1/7, 5%%)")
    commands.add_parser("snapshots", help="list the snapshots (JSON)")
    restore = commands.add_parser("restore", help="on a fresh host: put a snapshot's keys, ledger and mail back "
                                                  "in place (playbooks/restore-home.yml runs it before site.yml)")
    restore.add_argument("--snapshot", default="latest", help="the snapshot's id (default %(default)s)")
    for command in commands.choices.values():
        command.add_argument("--config", type=Path, default=DEFAULT_PATH, metavar="PATH",
                             help="backup.toml (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    import json

    from relay.backup import config as backup_config
    from relay.backup import restore, take
    from relay.backup.manifest import ManifestError
    from relay.backup.restic import Restic, ResticError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="yestls backup: %(levelname)s %(message)s", stream=sys.stderr)
    name = f"yestls backup {args.backup_command}"
    try:
        config = backup_config.load(args.config)
        restic = Restic(config.repository, config.password_file)
        if args.backup_command == "init":
            print(f"{name}: {'made' if restic.init() else 'found'} the repository {config.repository}")
        elif args.backup_command == "run":
            take.take(config, restic=restic)
        elif args.backup_command == "check":
            take.check(config, restic=restic, read_data_subset=args.read_data_subset)
            print(f"{name}: {config.repository} is sound")
        elif args.backup_command == "snapshots":
            json.dump(restic.snapshots(), sys.stdout, indent=1)
            sys.stdout.write("\n")
        elif args.backup_command == "restore":
            done = restore.restore(config, args.snapshot, restic=restic)
            print(f"{name}: snapshot {done.snapshot} of {done.host} is back: {done.entries} files and directories, "
                  f"{done.mailboxes} mailboxes, the ledger" + (f"; made {', '.join(done.users_made)}"
                                                               if done.users_made else ""))
    except (ConfigError, ResticError, take.BackupError, restore.RestoreError, ManifestError, OSError) as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 1
    return 0
