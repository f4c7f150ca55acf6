"""What the Molecule tests share: the containers, the site settings, and probes
that look at the deployment from outside (other hosts, the controller).

The containers are reached with `docker exec` (testinfra's docker backend);
addresses come from `docker inspect`. Nothing here puts one host's secret on
another host: secrets are searched for on the controller, in streams read out
of the containers.
"""

from __future__ import annotations

import imaplib
import json
import os
import socket
import ssl
import subprocess
import sys
import tarfile
import time
from functools import cache
from pathlib import Path

import testinfra
import yaml

SCENARIO_DIR = Path(os.environ.get("MOLECULE_SCENARIO_DIRECTORY", Path(__file__).resolve().parent.parent))
INTERNET = "yestls-internet"  # the Internet of the scenario (molecule.yml)
HOME_LAN = "yestls-homelan"  # home's LAN: only home and the controller are on it

# What a port looks like from a client: "open" (connected), "closed" (the
# host answered with a reset: reachable, nothing listening), "filtered" (no
# answer: the firewall dropped it), "rejected" (the client's own firewall
# refused to let the connection out: "No route to host" at once).
OPEN, CLOSED, FILTERED, REJECTED = "open", "closed", "filtered", "rejected"
REACHABLE = (OPEN, CLOSED)
PROBE_TIMEOUT = 2.0


@cache
def site() -> dict:
    """The site_* settings the scenario deploys with: the group_vars Molecule
    wrote into its inventory (with ${...} expanded), or molecule.yml's when
    the tests run outside Molecule."""
    written = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent")) / "inventory/group_vars/all"
    if written.exists():
        return yaml.safe_load(written.read_text())
    config = yaml.safe_load(os.path.expandvars((SCENARIO_DIR / "molecule.yml").read_text()))
    return config["provisioner"]["inventory"]["group_vars"]["all"]


@cache
def host_settings(name: str) -> dict:
    """A host's own variables in the scenario's inventory (molecule.yml's host_vars: the second edge's)."""
    written = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent")) / f"inventory/host_vars/{name}"
    if written.exists():
        return yaml.safe_load(written.read_text()) or {}
    config = yaml.safe_load(os.path.expandvars((SCENARIO_DIR / "molecule.yml").read_text()))
    return config["provisioner"]["inventory"].get("host_vars", {}).get(name, {})


EDGES = ("edge", "edge2")   # the primary (MX 10) and the second edge (MX 20)


def tunnel_address_of(name: str) -> str:
    """A host's tunnel address: home's and the primary's from the site settings, another edge's its own."""
    if name in ("home", "edge"):
        return site()[f"site_tunnel_{name}_address"]
    return host_settings(name)["edge_tunnel_address"]


def mx_name_of(edge: str) -> str:
    return site()["site_mx_name"] if edge == "edge" else host_settings(edge)["edge_mx_name"]


@cache
def container(name: str) -> testinfra.host.Host:
    return testinfra.get_host(f"docker://{name}")


@cache
def address(name: str, network: str = INTERNET) -> str:
    """The container's address on a docker network of the scenario."""
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{json .NetworkSettings.Networks}}", name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)[network]["IPAddress"]


_PROBE = """
import errno, json, socket, sys
from concurrent.futures import ThreadPoolExecutor
timeout, bind, targets = json.loads(sys.argv[1])
def probe(target):
    s = socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET)
    s.settimeout(timeout)
    try:
        if bind:
            s.bind((bind, 0))
        s.connect(tuple(target))
        return "open"
    except ConnectionRefusedError:
        return "closed"
    except (socket.timeout, TimeoutError):
        return "filtered"
    except OSError as e:
        if e.errno == errno.EHOSTUNREACH:
            return "rejected"
        return "error: %s" % e
    finally:
        s.close()
with ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(list(pool.map(probe, targets))))
"""


def tcp_probe(
    source: str | None, targets: list[tuple[str, int]], user: str = "root", bind: str | None = None
) -> dict[tuple[str, int], str]:
    """Connect to each (address, port) from the container `source` (or from the
    controller when None), all at once, as `user` there, from the address
    `bind` if given; say what each port looked like."""
    args = json.dumps([PROBE_TIMEOUT, bind, targets])
    if source is None:
        assert user == "root", "the controller probes as itself"
        out = subprocess.run(
            ["python3", "-c", _PROBE, args], check=True, capture_output=True, text=True, timeout=30
        ).stdout
    else:
        out = container(source).check_output("runuser -u %s -- python3 -c %s %s", user, _PROBE, args)
    return dict(zip([tuple(t) for t in targets], json.loads(out)))


def run_playbook(playbook: str, *extra_vars: str, timeout: float = 600) -> None:
    """playbooks/<playbook> on the scenario's hosts, the way a user runs it
    again (with `-e` for each of extra_vars), its task results logged with
    the converge's; fails with the end of its output."""
    ephemeral = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
    env = dict(os.environ, ANSIBLE_CONFIG=str(ephemeral / "ansible.cfg"),
               ANSIBLE_LOG_FOLDER=str(ephemeral / "task-results"))
    extra = [arg for var in extra_vars for arg in ("-e", var)]
    result = subprocess.run(
        ["ansible-playbook", "-i", str(ephemeral / "inventory"), *extra,
         str(SCENARIO_DIR.parent.parent / "playbooks" / playbook)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def read_secret(name: str, path: str) -> bytes:
    """A file's bytes, read out of a container (for tests that search for it elsewhere)."""
    return subprocess.run(["docker", "exec", name, "cat", path], check=True, capture_output=True).stdout


def _search_tar(stream, needles: dict[str, bytes], prefix: str) -> list[tuple[str, str]]:
    longest = max(len(n) for n in needles.values())
    found = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            f = tar.extractfile(member)
            path = prefix + member.name.removeprefix("./")
            seen = set()
            tail = b""
            while chunk := f.read(1 << 20):
                window = tail + chunk
                for what, needle in needles.items():
                    if what not in seen and needle in window:
                        seen.add(what)
                        found.append((path, what))
                tail = window[-(longest - 1) :]
    return found


def find_in_filesystem(name: str, needles: dict[str, bytes]) -> list[tuple[str, str]]:
    """Search every file of a container for each needle; return (path, needle
    name) for each hit. The container's files are streamed to the controller
    (`docker export` for its root filesystem, `tar` for the tmpfs mounts that
    export leaves out), so the needles never go into the container."""
    found = []
    export = subprocess.Popen(["docker", "export", name], stdout=subprocess.PIPE)
    try:
        found += _search_tar(export.stdout, needles, "/")
    finally:
        export.stdout.close()
        assert export.wait(timeout=300) == 0, "docker export failed"
    for mount in ("/run", "/run/lock"):
        tar = subprocess.Popen(
            ["docker", "exec", name, "tar", "-C", mount, "--one-file-system", "-cf", "-", "."],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            found += _search_tar(tar.stdout, needles, mount + "/")
        finally:
            tar.stdout.close()
            tar.wait(timeout=300)
    return found


def find_in_process_memory(name: str, needles: dict[str, bytes]) -> dict[str, list[str]]:
    """Search the memory of every process of a container for each needle;
    return {needle name: [the processes holding it]}. Read from the host
    (/proc/PID/mem of the container's processes, as root), so the needles
    never go into the container; tests/process_memory.py does the reading."""
    sys.path.insert(0, str(SCENARIO_DIR.parent.parent / "tests"))
    from process_memory import marker_hits

    pids = subprocess.run(["docker", "top", name, "-eo", "pid,comm"], check=True, capture_output=True,
                          text=True).stdout.splitlines()[1:]
    found: dict[str, list[str]] = {}
    for line in pids:
        pid, command = line.split(None, 1)
        try:
            hits = marker_hits(int(pid), needles)
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        for what, count in hits.items():
            if count:
                found.setdefault(what, []).append(f"{command}[{pid}]")
    return found


def find_in_directory(directory: Path, needles: dict[str, bytes]) -> list[tuple[str, str]]:
    """Search every file under a directory of the controller for each needle."""
    found = []
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [(str(path), what) for what, needle in needles.items() if needle in data]
    return found


def local_address_towards(ip: str) -> str:
    """The controller's source address for packets to ip (on a docker
    network: the bridge's address there)."""
    out = subprocess.run(["ip", "-o", "route", "get", ip], check=True, capture_output=True, text=True).stdout
    return out.split(" src ", 1)[1].split()[0]


def wait_for(predicate, timeout: float = 30.0, interval: float = 1.0):
    """Poll until predicate() is truthy; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def client_name() -> str:
    """The name mail clients connect to (IMAPS, submission): the clients' certificate's name."""
    return site().get("site_client_name", site()["site_mx_name"])


def ca_context() -> ssl.SSLContext:
    """A TLS client context that trusts the scenario's test CA only (the clients' name's certificate)."""
    return ssl.create_default_context(cafile=site()["site_test_ca"]["cert"])


def acme_root() -> str:
    """On the controller: the root of the scenario's ACME server (Pebble), which issued the edge's
    certificate; internet.yml fetched it from Pebble after it started (it changes at every start)."""
    return str(Path(site()["site_acme_ca_bundle"]).parent / "root.pem")


def full_address(mailbox_setting: str) -> str:
    """A site_mailboxes entry as an address: a bare local part is at the first domain."""
    return mailbox_setting if "@" in mailbox_setting else f"{mailbox_setting}@{site()['site_domains'][0]}"


def mailbox() -> str:
    return full_address(site()["site_mailboxes"][0])


def imap_password(address: str | None = None) -> str:
    """The scenario's password of a mailbox (the first one by default)."""
    address = address or mailbox()
    setting = next(m for m in site()["site_mailboxes"] if full_address(m) == address)
    password = site()["site_mailbox_passwords"][setting]
    assert password.startswith("{PLAIN}"), "the scenario's mailbox passwords must be {PLAIN}"
    return password.removeprefix("{PLAIN}")


class IMAPSAtHome(imaplib.IMAP4_SSL):
    """IMAPS to the clients' name, connected to home's LAN address."""

    def _create_socket(self, timeout):
        sock = socket.create_connection((address("home", HOME_LAN), self.port), timeout)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def messages_with(token: str, address: str | None = None, folder: str = "INBOX") -> list[bytes]:
    """Every message in a folder (INBOX by default) of a mailbox (the first
    by default) whose Subject holds token, read over IMAPS from home's LAN
    (the controller is on it), the clients' certificate verified against the
    test CA."""
    address = address or mailbox()
    with IMAPSAtHome(client_name(), 993, ssl_context=ca_context(), timeout=10) as imap:
        imap.login(address, imap_password(address))
        typ, _ = imap.select(folder, readonly=True)
        assert typ == "OK", f"{address} has no folder {folder}"
        _, numbers = imap.search(None, "SUBJECT", token)
        found = []
        for number in numbers[0].split():
            _, parts = imap.fetch(number, "(RFC822)")
            found.append(parts[0][1])
        return found
