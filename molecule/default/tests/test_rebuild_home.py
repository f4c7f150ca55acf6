"""Rebuilding home from its backup (roles/home_backup, playbooks/restore-home.yml, docs/backup.md).

Mail is delivered, a backup is taken while more arrives, then home's intake
stops and more mail waits sealed on the edge. Home's container is then
destroyed entirely and a new, empty one made like it; restore-home.yml puts
the backup back and runs site.yml. Every message is in the mailbox exactly
once (those that waited on the edge too: sealed to the old spool key), the
edge serves the same certificate, home has the same WireGuard, spool and
identity keys, and mail sent after the rebuild carries DKIM signatures that
verify against the records published before it.

The backup taken while mail arrives is checked for consistency: its ledger
and its mailbox copies agree, message by message.

This module runs last (conftest.py): it replaces the home container.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from mailpath import spool_files, submit, wait_until_sent
from scenario import address, container, mailbox, messages_with, run_playbook, wait_for
from submission import CORRESPONDENT, HELO, authentication_on_internet, login_of, message, received_at_correspondent
from submission import submit as submit_from_phone
from test_certificates import served_chain

pytestmark = pytest.mark.rebuild

BACKUP_TOML = "/etc/yestls/backup.toml"
INTAKE = "yestls-intake.service"
DELIVERY_TIMEOUT = 120
KEYS = {  # what must survive the rebuild byte for byte (public halves: their private keys never leave home)
    "spool key": "cat /var/lib/yestls-intake/spool.pub",
    "intake identity": "cat /var/lib/yestls-intake/identity.pub",
    "WireGuard": "wg show wg0 public-key",
    "DKIM records": "cat /etc/dkimkeys/yestls-dns-records.txt",
}

# On home: the snapshot restored into a scratch directory; its ledger and its mailbox copies compared.
_SNAPSHOT_CONTENTS = r"""
import email, json, os, sqlite3, subprocess, sys, tempfile, tomllib
config = tomllib.load(open(sys.argv[1], "rb"))
env = dict(os.environ, RESTIC_REPOSITORY=config["repository"], RESTIC_PASSWORD_FILE=config["password_file"])
with tempfile.TemporaryDirectory() as scratch:
    subprocess.run(["restic", "restore", "latest", "--target", scratch], env=env, check=True, capture_output=True)
    staging = scratch + config["staging"]
    db = sqlite3.connect(staging + "/ledger.sqlite")
    ledger = {spool_id: {"state": state, "recipients": json.loads(recipients)}
              for spool_id, state, recipients in db.execute("SELECT spool_id, state, recipients FROM messages")}
    mail = {}
    for directory, _, files in os.walk(staging + "/mail"):
        for name in files:
            if os.path.basename(directory) not in ("cur", "new"):
                continue
            with open(os.path.join(directory, name), "rb") as file:
                spool_id = email.message_from_binary_file(file).get("X-YesTLS-Spool-Id")
            if spool_id:
                mail.setdefault(spool_id.strip(), []).append(os.path.relpath(directory, staging))
print(json.dumps({"ledger": ledger, "mail": mail}))
"""


def _keys() -> dict[str, str]:
    return {name: container("home").check_output(command) for name, command in KEYS.items()}


def _backup() -> dict:
    """A backup now, by the unit the nightly timer starts (its sandbox, its environment)."""
    home = container("home")
    run = home.run("systemctl start yestls-backup.service")
    assert run.rc == 0, home.run("journalctl -u yestls-backup.service -n 30 --no-pager").stdout
    return json.loads(container("home").check_output("yestls status --json"))["backup"]["last success"]


def _recreate_home() -> float:
    """home's container removed and a new one made like it (image, networks, capabilities, devices, tmpfs,
    volumes: the backup repository's disk is one), from `docker inspect`; returns when its systemd runs."""
    info = json.loads(subprocess.run(["docker", "inspect", "home"], check=True, capture_output=True).stdout)[0]
    host, config = info["HostConfig"], info["Config"]
    networks = list(info["NetworkSettings"]["Networks"])
    command = ["docker", "run", "-d", "--name", "home", "--hostname", config["Hostname"],
               "--cgroupns", host.get("CgroupnsMode") or "host", "--network", networks[0]]
    command += [arg for cap in host.get("CapAdd") or [] for arg in ("--cap-add", cap)]
    command += [arg for device in host.get("Devices") or []
                for arg in ("--device", f"{device['PathOnHost']}:{device['PathInContainer']}")]
    command += [arg for path, options in (host.get("Tmpfs") or {}).items()
                for arg in ("--tmpfs", f"{path}:{options}" if options else path)]
    command += [arg for bind in host.get("Binds") or [] for arg in ("-v", bind)]
    command += [arg for key, value in (host.get("Sysctls") or {}).items() for arg in ("--sysctl", f"{key}={value}")]
    command += [config["Image"], *(config.get("Cmd") or [])]
    subprocess.run(["docker", "rm", "-f", "home"], check=True, capture_output=True)
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True)
    for network in networks[1:]:
        subprocess.run(["docker", "network", "connect", network, "home"], check=True, capture_output=True)
    address.cache_clear()  # the new container may have new addresses
    booted = wait_for(lambda: subprocess.run(["docker", "exec", "home", "systemctl", "is-system-running"],
                                             capture_output=True, text=True).stdout.strip() in ("running", "degraded"),
                      timeout=120)
    assert booted, "the new home container's systemd did not boot"
    return time.monotonic() - started


def _in_inbox_once(marker: str) -> bool:
    return len(messages_with(marker)) == 1


def test_home_rebuilt_from_its_backup_has_every_message_once_and_the_same_keys():
    home = container("home")
    before = [f"yestls-rebuild-before-{uuid.uuid4().hex}" for _ in range(2)]
    for marker in before:
        submit(marker)
    for marker in before:
        assert wait_for(lambda m=marker: _in_inbox_once(m), timeout=DELIVERY_TIMEOUT, interval=2), marker

    # a backup while mail arrives: the burst's messages are each in both the ledger and the mailboxes, or
    # in neither (still on the edge then), never in one only
    burst = [f"yestls-rebuild-burst-{uuid.uuid4().hex}" for _ in range(6)]
    with ThreadPoolExecutor(2) as pool:
        sending = pool.submit(lambda: [submit(m) for m in burst])
        started = time.monotonic()
        last = _backup()
        backup_seconds = time.monotonic() - started
        sending.result()
    spool_ids = {marker: wait_until_sent(marker, timeout=90).spool_id for marker in burst}
    contents = json.loads(home.check_output("python3 -c %s %s", _SNAPSHOT_CONTENTS, BACKUP_TOML))
    ledger, mail = contents["ledger"], contents["mail"]
    assert [i for i, where in mail.items() if len(where) != 1 and i in spool_ids.values()] == []
    for spool_id in mail:  # nothing in the mailboxes the ledger does not know: it would be delivered again
        assert ledger.get(spool_id, {}).get("state") == "done", (spool_id, ledger.get(spool_id))
    for marker, spool_id in spool_ids.items():
        delivered = any(r["status"] == "delivered" for r in ledger.get(spool_id, {}).get("recipients", {}).values())
        assert delivered == (spool_id in mail), (marker, spool_id, ledger.get(spool_id), mail.get(spool_id))
    assert last["snapshot"] and last["files"] > 0, last

    # the final backup; then home's intake stops and mail waits on the edge, sealed to home's spool key
    _backup()
    home.check_output("systemctl stop %s", INTAKE)
    waiting = [f"yestls-rebuild-waiting-{uuid.uuid4().hex}" for _ in range(2)]
    for marker in waiting:
        submit(marker)
    for marker in waiting:
        wait_until_sent(marker, timeout=90)
    assert len(spool_files()) >= len(waiting)
    keys, chain = _keys(), served_chain()

    # a wrong passphrase: a clear failure, and the live home unchanged (its ledger, its scratch directory)
    ledger_sum = home.check_output("sha256sum /var/lib/yestls-intake/ledger.sqlite")
    home.check_output("sed 's|^password_file = .*|password_file = \"/root/wrong.pass\"|' %s > /root/wrong.toml",
                      BACKUP_TOML)
    home.check_output("echo 'not the passphrase at all' > /root/wrong.pass")
    wrong = home.run("yestls backup restore --config /root/wrong.toml")
    assert wrong.rc == 1 and "passphrase in password_file is not this repository's" in wrong.stderr, wrong.stderr
    assert home.check_output("sha256sum /var/lib/yestls-intake/ledger.sqlite") == ledger_sum
    assert not home.file("/var/lib/yestls-backup/restore").exists

    # home is gone; a new one, then the restore
    boot_seconds = _recreate_home()
    assert not container("home").file("/var/lib/yestls-intake").exists
    started = time.monotonic()
    run_playbook("restore-home.yml", timeout=1200)
    restore_seconds = time.monotonic() - started

    # every message exactly once, those that waited on the edge too; the edge's spool drains
    for marker in [*before, *burst, *waiting]:
        assert wait_for(lambda m=marker: _in_inbox_once(m), timeout=DELIVERY_TIMEOUT, interval=2), \
            (marker, len(messages_with(marker)))
    assert wait_for(lambda: spool_files() == [], timeout=60), spool_files()
    assert _keys() == keys
    assert served_chain() == chain

    # DKIM after the rebuild: signed with the same keys, verified against the records published before
    marker = f"yestls-rebuild-out-{uuid.uuid4().hex}"
    session = submit_from_phone(587, login_of(mailbox()), mailbox(), [CORRESPONDENT],
                                message(marker, mailbox(), CORRESPONDENT))
    assert session.code("DATA") == 250, session.steps
    received = wait_for(lambda: received_at_correspondent(marker), timeout=DELIVERY_TIMEOUT, interval=2)
    assert received, f"{marker} did not reach {CORRESPONDENT} after the rebuild"
    checked = authentication_on_internet(received, address("edge"), mailbox(), HELO)
    assert sorted((s["a"], s["ok"]) for s in checked["dkim"]) == [("ed25519-sha256", True), ("rsa-sha256", True)]

    # the rebuilt home backs up to the same repository (its timer would; here at once)
    after = _backup()
    assert after["snapshot"] and after["snapshot"] != last["snapshot"], after
    print(f"rebuild: backup {backup_seconds:.1f} s ({last['bytes_processed']} bytes, {last['files']} files), "
          f"new container {boot_seconds:.1f} s, restore-home.yml {restore_seconds:.1f} s; "
          f"key digests {hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:12]}")
