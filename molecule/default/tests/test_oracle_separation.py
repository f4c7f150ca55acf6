"""The key oracle's privilege separation at home (roles/key_oracle; docs/oracle.md,
"Processes"), tried as the users themselves rather than read off the unit files:

- the network-facing front (yestls-oracle) cannot read any key file, nor
  list the keystore; the signer's user (yestls-signer) can;
- the signing processes, started by systemd per connection to the signer
  socket, run as yestls-signer in a network namespace of their own with no
  inet socket, while the front is on the host's network;
- the signer socket admits the front's group only; and what the front's user
  gets there is what a compromised front would get: the chains (public) and
  policy-checked signatures, nothing for a bare digest;
- a home deployed before the split (keystore in /var/lib/yestls-oracle, the
  front's) keeps its key when playbooks/home.yml runs again.
"""

from __future__ import annotations

import json
import re

import pytest
from mailpath import oracle_reachable_from_edge
from scenario import container, run_playbook, wait_for

KEYSTORE = "/var/lib/yestls-signer/keystore"
OLD_KEYSTORE = "/var/lib/yestls-oracle/keystore"  # before the signing processes had their own user
SIGNER_SOCKET = "/run/yestls-signer/signer.sock"
FRONT_UNIT = "yestls-oracle.service"
FRONT, SIGNER = "yestls-oracle", "yestls-signer"
SIGNERS = 2  # key_oracle_signers' default: the front's connections, one signing process each
PYTHON = "/opt/yestls/bin/python"


def home():
    return container("home")


def as_user(user: str, command: str):
    """Run `command` (a shell-quoted string) on home as `user`."""
    return home().run(f"runuser -u {user} -- {command}")


def key_files() -> list[str]:
    paths = home().check_output(f"find {KEYSTORE} -name '*.key.pem' -type f").split()
    assert paths, "no TLS key in the keystore"
    return paths


def signer_pids() -> list[int]:
    """Main PIDs of the running signing processes (yestls-signer@<n>-<pid>-<uid>.service)."""
    units = home().check_output(
        "systemctl list-units --type=service --state=running --plain --no-legend 'yestls-signer@*'").splitlines()
    return [int(home().check_output(f"systemctl show -p MainPID --value {line.split()[0]}")) for line in units]


def uid_of(pid: int) -> int:
    status = home().file(f"/proc/{pid}/status").content_string
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))


def test_the_front_cannot_read_any_key_file_and_the_signer_can():
    for path in key_files():
        front = as_user(FRONT, f"head -c 0 {path}")
        assert front.rc != 0 and "Permission denied" in front.stderr, (path, front.stderr)
        assert as_user(SIGNER, f"head -c 0 {path}").rc == 0, path  # the same open, as the key's user
    listing = as_user(FRONT, f"ls {KEYSTORE}")
    assert listing.rc != 0 and "Permission denied" in listing.stderr
    assert as_user(SIGNER, f"ls {KEYSTORE}").rc == 0
    # nor by way of a group: the front's user is in no group of the signer's
    assert SIGNER not in home().check_output(f"id -nG {FRONT}").split()


def interfaces(pid: int) -> list[str]:
    """The network interfaces a process sees (its network namespace's), from /proc/PID/net/dev."""
    lines = home().file(f"/proc/{pid}/net/dev").content_string.splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines)


def test_the_signing_processes_run_as_the_signer_with_no_network():
    front = int(home().check_output(f"systemctl show -p MainPID --value {FRONT_UNIT}"))
    signer_uid = int(home().check_output(f"id -u {SIGNER}"))
    assert uid_of(front) != signer_uid
    assert "wg0" in interfaces(front)  # the control: the front is on the host's network, the tunnel's too
    pids = signer_pids()
    assert len(pids) == SIGNERS, pids
    for pid in pids:
        assert uid_of(pid) == signer_uid
        # a network namespace of its own, with loopback only, and no inet socket in it
        assert interfaces(pid) == ["lo"]
        for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
            lines = home().file(f"/proc/{pid}/net/{table}").content_string.splitlines()
            assert lines[1:] == [], (pid, table, lines)


@pytest.mark.parametrize("user", ["nobody", "yestls-intake", SIGNER, "dovecot"])
def test_the_signer_socket_is_not_for_other_users(user):
    assert home().file(SIGNER_SOCKET).is_socket
    connect = as_user(user, f"{PYTHON} -I -c 'import socket; socket.socket(socket.AF_UNIX).connect(\"{SIGNER_SOCKET}\")'")
    assert connect.rc != 0 and "PermissionError" in connect.stderr, connect.stderr


_AS_THE_FRONT = """
import json, socket, sys
from relay.rpc import FrameDecoder, Kind, encode_frame
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(30)
sock.connect(sys.argv[1])
decoder = FrameDecoder()
def call(frame_id, meta, tail=b""):
    sock.sendall(encode_frame(Kind.REQUEST, frame_id, meta, tail))
    while not (frames := decoder.feed(sock.recv(65536))):
        pass
    return {"kind": frames[0].kind.name, "meta": frames[0].meta, "tail": len(frames[0].tail)}
listing = call(1, {"method": "certificates"})
key_id = listing["meta"]["certificates"][0]["key_id"]
digest = call(2, {"method": "sign", "key_id": key_id, "scheme": 0x0403}, bytes(32))
decrypt = call(3, {"method": "decrypt", "key_id": key_id}, bytes(256))
print(json.dumps({"listing": listing, "digest": digest, "decrypt": decrypt}))
"""


def test_the_fronts_user_on_the_socket_gets_chains_and_refusals_only():
    """What a compromised front could ask its signing process: the chains it
    already knows, and a policy refusal for anything but a live TLS 1.3 handshake."""
    host = home()
    assert oct(host.file(SIGNER_SOCKET).mode) == oct(0o660)
    assert (host.file(SIGNER_SOCKET).user, host.file(SIGNER_SOCKET).group) == ("root", FRONT)
    out = host.check_output("runuser -u %s -- %s -I -c %s %s", FRONT, PYTHON, _AS_THE_FRONT, SIGNER_SOCKET)
    got = json.loads(out)
    listing = got["listing"]
    assert listing["kind"] == "RESPONSE" and listing["tail"] == 0
    assert [sorted(entry) for entry in listing["meta"]["certificates"]] == [["chain", "key_id", "key_type", "schemes"]]
    assert "PRIVATE" not in json.dumps(listing)
    assert (got["digest"]["kind"], got["digest"]["meta"]["code"]) == ("ERROR", "policy.not_a_transcript")
    assert (got["decrypt"]["kind"], got["decrypt"]["meta"]["code"]) == ("ERROR", "unknown_method")


def test_a_keystore_left_at_its_old_place_is_moved_with_its_key():
    """The layout of a home deployed before the split, then playbooks/home.yml
    as a user runs it after upgrading: the same key (no new one, no new CSR),
    now the signer's, and the oracle up again for the edge."""
    host = home()
    listing = f"/opt/yestls/bin/yestls keys list --keystore {KEYSTORE}"
    keys = as_user(SIGNER, listing)
    assert keys.rc == 0 and keys.stdout.strip(), keys.stderr
    host.check_output(f"systemctl stop {FRONT_UNIT} yestls-signer.socket")
    host.check_output(f"install -d -o {FRONT} -g {FRONT} -m 0700 /var/lib/{FRONT}")
    host.check_output(f"mv {KEYSTORE} {OLD_KEYSTORE}")
    host.check_output(f"chown -R {FRONT}:{FRONT} {OLD_KEYSTORE}")
    run_playbook("home.yml")
    assert not host.file(OLD_KEYSTORE).exists
    assert as_user(SIGNER, listing).stdout == keys.stdout
    for path in key_files():
        key = host.file(path)
        assert (key.user, key.group, key.mode) == (SIGNER, SIGNER, 0o600)
    assert host.service(FRONT_UNIT).is_running
    assert wait_for(lambda: len(signer_pids()) == SIGNERS, timeout=30)
    assert wait_for(oracle_reachable_from_edge, timeout=60), "the edge did not get its oracle back"
