"""The YesTLS services of the deployment (roles yestls, key_oracle, edge_relay,
home_mail): running, listening only where docs/deploy.md says, hardened, the
keys on the host that uses them with the right owners, and the whole path
working: a STARTTLS session at the edge signed by the oracle at home, and a
real message sent to the edge and read back over IMAPS at home.
"""

from __future__ import annotations

import base64
import email.utils
import json
import os
import re
import smtplib
import socket
import ssl
import subprocess
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from scenario import (
    acme_root,
    address,
    client_name,
    container,
    find_in_directory,
    find_in_filesystem,
    mailbox,
    messages_with,
    read_secret,
    site,
    wait_for,
)

MX = site()["site_mx_name"]
MAILBOX = mailbox()
EDGE_TUNNEL = site()["site_tunnel_edge_address"]
HOME_TUNNEL = site()["site_tunnel_home_address"]
# the edge's certificate comes from the scenario's ACME server (test_certificates.py)
ACME_ROOT = acme_root()

YESTLS_UNITS = [("edge", "yestls-edge.service"), ("home", "yestls-oracle.service"), ("home", "yestls-intake.service")]
KEYSTORE = "/var/lib/yestls-signer/keystore"
AUDIT_LOG = "/var/log/yestls-oracle/audit.jsonl"
EDGE_IDENTITY = "/var/lib/yestls-edge/identity.key"
SPOOL_KEY = "/var/lib/yestls-intake/spool.key"
INTAKE_IDENTITY = "/var/lib/yestls-intake/identity.key"
ACME_IDENTITY = "/var/lib/yestls-acme/identity.key"
ACME_ACCOUNT_KEY = "/var/lib/yestls-acme/account.key.pem"
CLIENT_TLS_KEY = "/etc/yestls/client-tls/key.pem"
DKIM_KEYS = ["/etc/dkimkeys/yestls-rsa.key", "/etc/dkimkeys/yestls-ed25519.key"]
DOVEADM_API_KEY = "/etc/dovecot/private/doveadm-api.key"
SPOOL_QUEUE = "/var/spool/yestls/queue"

# docs/deploy.md, "Services, users, addresses": every TCP listener of each host,
# as (address, port) -> the unit that owns it. Docker's embedded DNS server
# (127.0.0.11, a random port) is the only other listener the containers have.
LISTENERS = {
    "edge": {
        ("0.0.0.0", 25): "yestls-edge.service",
        # ACME HTTP-01 tokens, the MTA-STS policy
        ("0.0.0.0", 80): "yestls-edge.service",
        ("0.0.0.0", 443): "yestls-edge.service",
        (EDGE_TUNNEL, 7444): "yestls-edge.service",
        (EDGE_TUNNEL, 9465): "yestls-edge.service",
        # the door's own resolver (DNSBL and SPF lookups), on loopback
        ("127.0.0.1", 53): "unbound.service",
    },
    "home": {
        (HOME_TUNNEL, 7443): "yestls-oracle.service",
        (HOME_TUNNEL, 9464): "yestls-oracle.service",
        ("0.0.0.0", 993): "dovecot.service",
        ("127.0.0.1", 8080): "dovecot.service",
        # home's Postfix (roles/home_postfix): submission, and port 25 for home's own processes only
        ("0.0.0.0", 465): "postfix@-.service",
        ("0.0.0.0", 587): "postfix@-.service",
        ("127.0.0.1", 25): "postfix@-.service",
        # its validating resolver and the MTA-STS policy map, on loopback
        ("127.0.0.1", 53): "unbound.service",
        ("127.0.0.1", 8461): "postfix-mta-sts-resolver.service",
        # rspamd (roles/home_spam): its normal worker for the intake, its controller for learning
        ("127.0.0.1", 11333): "rspamd.service",
        ("127.0.0.1", 11334): "rspamd.service",
    },
}
DOCKER_DNS = "127.0.0.11"


def listeners(name: str, protocol: str = "t") -> dict[tuple[str, int], str]:
    """Listening sockets of a container -> the systemd unit that owns each
    (ss -e shows the socket's cgroup, so no process needs to be readable)."""
    found = {}
    for line in container(name).check_output(f"ss -l{protocol}nHe").splitlines():
        fields = line.split()
        host, _, port = fields[3].rpartition(":")
        cgroup = next((f for f in fields if f.startswith("cgroup:")), "cgroup:")
        found[(host.strip("[]"), int(port))] = cgroup.rsplit("/", 1)[-1]
    return found


@pytest.mark.parametrize(("name", "unit"), YESTLS_UNITS + [("home", "dovecot.service"), ("home", "yestls-egress.service")],
                         ids=lambda v: v.split(".")[0])
def test_service_runs_now_and_at_boot(name, unit):
    service = container(name).service(unit)
    assert service.is_running
    assert service.is_enabled


@pytest.mark.parametrize("name", ["edge", "home"])
def test_tcp_listeners_are_exactly_those_of_the_deployment(name):
    """The oracle, the spool service and the metrics on the tunnel address
    only, SMTP on 25, IMAPS on 993, doveadm's API on loopback; the intake
    nowhere; nothing else."""
    found = {where: unit for where, unit in listeners(name).items() if where[0] != DOCKER_DNS}
    assert found == LISTENERS[name]


@pytest.mark.parametrize("name", ["edge", "home"])
def test_no_yestls_service_listens_on_udp(name):
    assert [where for where, unit in listeners(name, "u").items() if unit.startswith("yestls-")] == []


@pytest.mark.parametrize(("name", "unit"), YESTLS_UNITS, ids=lambda v: v.split(".")[0])
def test_systemd_exposure_is_ok(name, unit):
    """`systemd-analyze security`: 2.0 or less ("OK") for every YesTLS unit."""
    out = container(name).check_output(f"systemd-analyze security --no-pager {unit}")
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
    assert score <= 2.0, out


@pytest.mark.parametrize(("name", "unit"), YESTLS_UNITS, ids=lambda v: v.split(".")[0])
def test_service_runs_as_its_own_user_with_no_capability_but_port_25(name, unit):
    host = container(name)
    pid = host.check_output(f"systemctl show -p MainPID --value {unit}")
    status = host.file(f"/proc/{pid}/status").content_string
    uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
    assert host.check_output(f"id -u {unit.removesuffix('.service')}") == uid
    effective = int(re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.M).group(1), 16)
    bounding = int(re.search(r"^CapBnd:\s+([0-9a-f]+)", status, re.M).group(1), 16)
    net_bind_service = 1 << 10
    expected = net_bind_service if unit == "yestls-edge.service" else 0
    assert (effective, bounding) == (expected, expected)
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)


def keystore_keys() -> list[str]:
    paths = container("home").check_output(f"find {KEYSTORE} -name '*.key.pem' -type f").split()
    assert paths, "no TLS key in the keystore"
    return paths


@pytest.mark.parametrize(
    ("name", "path", "owner", "group", "mode"),
    [
        ("home", KEYSTORE, "yestls-signer", "yestls-signer", 0o700),
        ("home", "/var/lib/yestls-intake", "yestls-intake", "yestls-intake", 0o700),
        ("home", SPOOL_KEY, "yestls-intake", "yestls-intake", 0o600),
        ("home", INTAKE_IDENTITY, "yestls-intake", "yestls-intake", 0o600),
        ("home", "/var/lib/yestls-acme", "yestls-acme", "yestls-acme", 0o700),
        ("home", ACME_IDENTITY, "yestls-acme", "yestls-acme", 0o600),
        ("home", ACME_ACCOUNT_KEY, "yestls-acme", "yestls-acme", 0o600),
        ("home", CLIENT_TLS_KEY, "root", "root", 0o600),
        ("home", "/etc/yestls/client-tls", "root", "root", 0o700),
        ("home", DKIM_KEYS[0], "root", "root", 0o600),
        ("home", DKIM_KEYS[1], "root", "root", 0o600),
        ("home", "/etc/dkimkeys", "root", "root", 0o700),
        ("home", DOVEADM_API_KEY, "root", "root", 0o600),
        ("home", "/etc/yestls/intake.toml", "root", "yestls-intake", 0o640),
        ("edge", EDGE_IDENTITY, "yestls-edge", "yestls-edge", 0o600),
        ("edge", "/var/spool/yestls", "yestls-edge", "yestls-edge", 0o700),
    ],
)
def test_key_and_secret_files_belong_to_their_user_only(name, path, owner, group, mode):
    file = container(name).file(path)
    assert (file.user, file.group, file.mode) == (owner, group, mode)


def test_tls_keys_at_home_belong_to_the_signer_only():
    for path in keystore_keys():
        file = container("home").file(path)
        assert (file.user, file.group, file.mode) == ("yestls-signer", "yestls-signer", 0o600)


def signer_unit() -> str:
    """One running signing process's unit (yestls-signer@<n>-<pid>-<uid>.service)."""
    units = container("home").check_output(
        "systemctl list-units --type=service --state=running --plain --no-legend 'yestls-signer@*'").split()
    assert units, "no signing process runs"
    return units[0]


def cgroup_limit(host, control_group: str, v2: str, v1: str) -> str:
    """A limit of the unit's cgroup as the kernel enforces it: the unified hierarchy's file, or the v1
    memory controller's (the scenario's containers run on the host's cgroups, v1 or v2)."""
    unified = host.file(f"/sys/fs/cgroup{control_group}/{v2}")
    if unified.exists:
        return unified.content_string.strip()
    return host.file(f"/sys/fs/cgroup/memory{control_group}/{v1}").content_string.strip()


# (host, unit) -> whether it holds a secret or plaintext mail. Those get a memory cap, no swap and
# no core dump; the oracle's front, which holds neither, a memory cap and no core dump.
LIMITED_UNITS = {
    ("edge", "yestls-edge.service"): True,
    ("home", "yestls-intake.service"): True,
    ("home", "yestls-signer@"): True,  # a running instance
    ("home", "yestls-oracle.service"): False,
}


@pytest.mark.parametrize(("name", "unit"), list(LIMITED_UNITS), ids=lambda v: v.split(".")[0])
def test_memory_swap_and_core_limits_are_in_force(name, unit):
    """Configured (`systemctl show`) and in force: the running process's core size
    limit (/proc/PID/limits) and its cgroup's memory limit; no swap where v2 enforces it."""
    host = container(name)
    secret = LIMITED_UNITS[(name, unit)]
    unit = signer_unit() if unit.endswith("@") else unit
    show = dict(line.split("=", 1) for line in host.check_output(
        f"systemctl show -p MemoryMax -p MemorySwapMax -p LimitCORE -p MainPID -p ControlGroup {unit}").splitlines())
    assert show["LimitCORE"] == "0"
    limits = host.file(f"/proc/{show['MainPID']}/limits").content_string
    assert re.search(r"^Max core file size\s+0\s+0\s+bytes", limits, re.M), limits
    memory_max = int(show["MemoryMax"])  # "infinity" fails here: a cap is set
    total_kib = re.search(r"^MemTotal:\s+(\d+) kB", host.file("/proc/meminfo").content_string, re.M).group(1)
    assert memory_max < int(total_kib) * 1024
    assert int(cgroup_limit(host, show["ControlGroup"], "memory.max", "memory.limit_in_bytes")) == memory_max
    if secret:
        assert show["MemorySwapMax"] == "0"
        swap = host.file(f"/sys/fs/cgroup{show['ControlGroup']}/memory.swap.max")
        # cgroup v1 has no per-unit swap limit systemd sets; v2 must hold the 0 in force
        assert not swap.exists or swap.content_string.strip() == "0"


def pem_needles(label: str, pem: bytes) -> dict[str, bytes]:
    """A PEM private key as it could turn up elsewhere: its private value raw,
    its DER, the file as base64 (slurp's form), and each line of its base64
    body that carries private bytes (a line holding only public-key bytes
    also appears, legitimately, in the public key's own PEM)."""
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        secret = key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")
    elif isinstance(key, rsa.RSAPrivateKey):
        secret = key.private_numbers().d.to_bytes((key.key_size + 7) // 8, "big").lstrip(b"\0")
    else:  # Ed25519
        secret = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                   serialization.NoEncryption())
    body = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    der = base64.b64decode(b"".join(body))
    start = der.index(secret)
    needles = {f"{label} (private value)": secret, f"{label} (DER)": der,
               f"{label} (file as base64)": base64.b64encode(pem)}
    for number, line in enumerate(body, 1):
        first = (number - 1) * 48  # 64 base64 characters per line: 48 bytes
        if first < start + len(secret) and start < first + len(line) * 3 // 4:
            needles[f"{label} (PEM line {number})"] = line
    assert any("PEM line" in name for name in needles)
    return needles


def spool_key_needles(text: bytes) -> dict[str, bytes]:
    """The spool key file's secret lines (relay/spool/keys.py), in base64 and raw."""
    needles = {"spool key (file as base64)": base64.b64encode(text)}
    for field in (b"mlkem768-seed", b"x25519"):
        match = re.search(rb"^" + field + rb": *([A-Za-z0-9+/=]+)$", text, re.M)
        assert match, f"no {field!r} line in the spool key"
        needles[f"spool key {field.decode()} (base64)"] = match.group(1)
        needles[f"spool key {field.decode()} (raw)"] = base64.b64decode(match.group(1))
    return needles


def home_secrets() -> dict[str, bytes]:
    """Every private key home made (TLS, spool, intake identity, the ACME
    client's identity and account, the clients' TLS key, DKIM) and
    the doveadm API key, in each form a leak could take."""
    needles = {}
    for path in keystore_keys():
        needles.update(pem_needles(f"TLS key {Path(path).name}", read_secret("home", path)))
    needles.update(spool_key_needles(read_secret("home", SPOOL_KEY)))
    needles.update(pem_needles("intake identity key", read_secret("home", INTAKE_IDENTITY)))
    needles.update(pem_needles("ACME client identity key", read_secret("home", ACME_IDENTITY)))
    needles.update(pem_needles("ACME account key", read_secret("home", ACME_ACCOUNT_KEY)))
    needles.update(pem_needles("clients' TLS key", read_secret("home", CLIENT_TLS_KEY)))
    needles.update(pem_needles("DKIM RSA key", read_secret("home", DKIM_KEYS[0])))
    needles["DKIM Ed25519 key"] = read_secret("home", DKIM_KEYS[1]).strip()
    needles["doveadm API key"] = read_secret("home", DOVEADM_API_KEY).strip()
    return needles


def test_no_private_key_of_home_anywhere_on_the_edge():
    """Every file of the edge (root filesystem and tmpfs mounts; not /proc,
    /sys, /dev), streamed to the controller and searched there."""
    edge_key = pem_needles("edge identity key", read_secret("edge", EDGE_IDENTITY))
    control = {"edge identity key (PEM line 1)": edge_key["edge identity key (PEM line 1)"]}
    # and the backup's passphrase (roles/home_backup: at home only, like the keys it protects)
    passphrase = {"home's backup passphrase": site()["site_backup_passphrase"].encode()}
    found = find_in_filesystem("edge", home_secrets() | control | passphrase)
    # the search finds what is there: the edge's own key, in its key file
    assert (EDGE_IDENTITY, "edge identity key (PEM line 1)") in found
    assert [hit for hit in found if not hit[1].startswith("edge ")] == []


def test_no_private_key_of_home_in_task_results_or_on_the_controller():
    """Only CSRs and chains travel: the results of every task of converge
    and idempotence (community.general.log_plays) and Molecule's working
    directory hold none of home's secrets, but do hold the clients' name's
    CSR (the hand path; the MX's certificate comes by ACME, its CSR stays
    at home)."""
    ephemeral = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
    assert list(ephemeral.rglob(f"{client_name()}.clients.csr.pem")), "the CSR was not fetched to the controller"
    assert not list(ephemeral.rglob(f"{MX}.csr.pem")), "the MX's CSR went to the controller: not by ACME?"
    assert find_in_directory(ephemeral, home_secrets()) == []


def edge_address() -> str:
    return address("edge")


def audit_lines() -> list[dict]:
    text = container("home").file(AUDIT_LOG).content_string
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_starttls_at_the_edge_completes_with_homes_certificate_and_home_audits_it(tmp_path):
    """From outside (the controller): STARTTLS to the edge's port 25, the
    chain verified against the ACME server's root alone, for the MX name; the oracle at
    home signed that very handshake (its client random is in the audit log)."""
    keylog = tmp_path / "keylog"
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"{edge_address()}:25",
            "-starttls",
            "smtp",
            "-servername",
            MX,
            "-verify_hostname",
            MX,
            "-verify_return_error",
            "-CAfile",
            ACME_ROOT,
            "-no-CApath",
            "-no-CAstore",
            "-keylogfile",
            str(keylog),
            "-brief",
        ],
        input="QUIT\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Verification: OK" in result.stderr
    assert f"Verified peername: {MX}" in result.stderr
    assert "Protocol version: TLSv1.3" in result.stderr
    randoms = {line.split()[1] for line in keylog.read_text().splitlines() if line.startswith("CLIENT_")}
    assert len(randoms) == 1
    client_random = randoms.pop().lower()

    def signed():
        return [line for line in audit_lines() if line.get("client_random") == client_random]

    lines = wait_for(signed, timeout=10)
    assert len(lines) == 1, f"no audit line for client random {client_random}"
    assert lines[0]["outcome"] == "signed"
    assert lines[0]["peer"] == "edge"
    assert lines[0]["server_name"] == MX


class SMTPToEdge(smtplib.SMTP):
    """SMTP to the MX name (STARTTLS checks the certificate for it), connected
    to the edge's address on the scenario's Internet."""

    def _get_socket(self, host, port, timeout):
        return socket.create_connection((edge_address(), port), timeout)


def test_a_message_sent_to_the_edge_is_read_over_imaps_at_home():
    """The whole path: from outside, STARTTLS to the edge (home's certificate,
    signed by the oracle at home), sealed into the edge's spool, pulled by the
    intake over the tunnel, delivered to Dovecot by LMTP, read over IMAPS from
    home's LAN (the controller is on it) with home's own certificate."""
    token = uuid.uuid4().hex
    message = EmailMessage()
    message["From"] = "sender@sender.test"
    message["To"] = MAILBOX
    message["Subject"] = f"YesTLS molecule {token}"
    # a Date and a Message-ID, as every real client adds: without them rspamd
    # scores the message high enough for Junk, and this test reads the INBOX
    message["Date"] = email.utils.formatdate()
    message["Message-ID"] = email.utils.make_msgid(domain="sender.test")
    message.set_content(f"Sent through the edge, read at home: {token}\n")
    tls = ssl.create_default_context(cafile=ACME_ROOT)
    with SMTPToEdge(MX, 25, local_hostname="sender.test", timeout=30) as smtp:
        smtp.starttls(context=tls)
        assert smtp.send_message(message) == {}

    def delivered() -> bytes | None:
        found = messages_with(token)
        return found[-1] if found else None

    received = wait_for(delivered, timeout=90, interval=2)
    assert received, "the message did not arrive in the mailbox at home"
    assert f"Sent through the edge, read at home: {token}".encode() in received
    assert f"Authentication-Results: {MX};".encode() in received
    assert re.search(rb"by " + MX.encode() + rb" \(YesTLS\) with ESMTPS", received)
    assert b"X-YesTLS-Spool-Id: " in received
    # home acknowledged it: the edge's spool keeps no copy
    assert wait_for(lambda: container("edge").check_output(f"ls -A {SPOOL_QUEUE}") == "", timeout=30)
