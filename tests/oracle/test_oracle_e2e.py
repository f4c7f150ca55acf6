"""Keyless TLS end to end: `openssl s_client` -> `yestls tls-serve --oracle` -> `yestls oracle serve`.

Three processes on loopback, as deployed minus the tunnel: the oracle
(front process and its signing processes) holds the keys; the edge,
`yestls tls-serve --oracle 127.0.0.1:PORT --identity-key FILE`, holds only
the certificate chains it fetched from the oracle and its own identity key.

- A full handshake per key type (ECDSA P-256, P-384, RSA-2048, Ed25519),
  verified by s_client against the test CA; a request is answered; the
  oracle's audit log holds exactly one `signed` line for it, naming the key,
  the scheme, the SNI and the client random s_client logged.
- The edge never has the private key: its command line and open files name
  no key, and a scan of its memory (as root, /proc/PID/mem) finds none of
  the keys' PEM text, PKCS#8 DER or private numbers (in either byte order)
  while it does find the certificates it serves. The same scan finds the
  private numbers in `yestls tls-serve --cert --key` (same program, key in
  process) and in the oracle's signing processes, and not in the oracle's
  front process, which never loads a key either.
- A resumed handshake through the edge makes no signature: the audit log
  does not grow.
- `tls-serve --oracle --alpn` refuses to start: the oracle signs no
  handshake that selects an application protocol.
"""

import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from relay.tls import SignatureScheme

from ..interop_helpers import KEY_TYPES, SCHEME_OF_KEY, SClient, TlsServe, yestls_command
from ..oracle_home import OracleHome, OracleProcess, free_port, make_oracle_home, start_oracle

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

SERVER_NAME = "mx.example.org"
SCAN_CAP = 4 << 30          # bytes read from one process at most (a Python process maps ~50 MiB)
SCAN_CHUNK = 4 << 20


# --- processes ---------------------------------------------------------------------------------

@dataclass
class KeylessEdge:
    home: OracleHome
    oracle: OracleProcess
    serve: TlsServe

    def sign_lines(self) -> list[dict]:
        return [line for line in self.home.audit_lines() if line["method"] == "sign"]


def child_pids(parent: int) -> list[int]:
    """PIDs whose parent is `parent`, from /proc/*/stat (field 4, after the parenthesised name)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended while we looked
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            children.append(int(entry.name))
    return children


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def signer_pids(oracle: OracleProcess) -> list[int]:
    return [pid for pid in child_pids(oracle.process.pid) if "relay.oracle.signer" in cmdline(pid)]


def stop_oracle(oracle: OracleProcess) -> None:
    """SIGKILL the front; its signing processes end on EOF, or are killed by PID if they linger."""
    signers = signer_pids(oracle) if oracle.process.poll() is None else []
    if oracle.process.poll() is None:
        oracle.kill()
    for pid in signers:
        try:
            if "relay.oracle.signer" in cmdline(pid):
                os.kill(pid, signal.SIGKILL)
        except (OSError, UnicodeDecodeError):
            pass  # already gone


@pytest.fixture(scope="module")
def edge(pki, tmp_path_factory):
    """The oracle with all four test keys (two signing processes) and `tls-serve --oracle` in front of it."""
    home = make_oracle_home(tmp_path_factory.mktemp("oracle-home"), pki, KEY_TYPES, signers=2)
    oracle = start_oracle(home)
    try:
        with TlsServe("--oracle", f"127.0.0.1:{home.port}", "--identity-key", home.identity_path) as serve:
            serve.wait_listening()
            yield KeylessEdge(home, oracle, serve)
    finally:
        stop_oracle(oracle)


@pytest.fixture
def s_client(pki):
    started = []

    def start(server: TlsServe, *options) -> SClient:
        client = SClient(server.address, pki.ca_pem, *options, servername=SERVER_NAME)
        started.append(client)
        return client

    yield start
    for client in started:
        client.kill()


def client_random(keylog: Path) -> str:
    """The ClientHello.random s_client logged (NSS key log: LABEL <client random> <secret>)."""
    found = re.search(r"^CLIENT_HANDSHAKE_TRAFFIC_SECRET ([0-9a-f]{64}) ", keylog.read_text(), re.MULTILINE)
    assert found, f"no client random in {keylog}"
    return found.group(1)


def full_handshake(s_client, edge: KeylessEdge, key_type: str, tmp_path: Path, *options) -> tuple[dict, str, str]:
    """One verified handshake offering only `key_type`'s scheme and one request: (body, output, client random)."""
    keylog = tmp_path / f"{key_type}.keylog"
    client = s_client(edge.serve, "-sigalgs", SCHEME_OF_KEY[key_type], "-keylogfile", keylog, *options)
    assert client.wait_handshake()["kind"] == "New"
    body = client.request()
    if "-sess_out" in options:
        client.wait_ticket()
    output = client.finish()
    assert "Verify return code: 0 (ok)" in output
    return body, output, client_random(keylog)


# --- handshakes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_s_client_handshake_signed_by_the_oracle(edge, s_client, tmp_path, key_type):
    before = len(edge.sign_lines())
    body, output, random = full_handshake(s_client, edge, key_type, tmp_path)

    assert body["version"] == "TLSv1.3"
    assert body["scheme"] == SCHEME_OF_KEY[key_type]
    assert body["resumed"] == "no"
    assert body["sni"] == SERVER_NAME
    assert f"subject=CN = {SERVER_NAME}" in output
    # The oracle signed it, once, and its audit line says what for.
    new = edge.sign_lines()[before:]
    assert len(new) == 1, new
    line = new[0]
    assert line["outcome"] == "signed"
    assert line["peer"] == "edge"
    assert line["key_id"] == edge.home.key_ids[key_type]
    assert line["scheme"] == SignatureScheme[SCHEME_OF_KEY[key_type].upper()]
    assert line["server_name"] == SERVER_NAME
    assert line["client_random"] == random
    assert re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{96}", line["transcript_hash"])


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_resumption_through_the_edge_makes_no_signature(edge, s_client, tmp_path, key_type):
    session = tmp_path / "session.pem"
    before = len(edge.sign_lines())
    first, _, _ = full_handshake(s_client, edge, key_type, tmp_path, "-sess_out", session)
    assert first["resumed"] == "no"
    assert len(edge.sign_lines()) == before + 1

    client = s_client(edge.serve, "-sess_in", session)
    assert client.wait_handshake()["kind"] == "Reused"
    body = client.request()
    output = client.finish()
    assert body["resumed"] == "yes"
    assert body["scheme"] == ""
    assert body["sni"] == SERVER_NAME
    assert "Verify return code: 0 (ok)" in output
    assert len(edge.sign_lines()) == before + 1  # no new signature


# --- where the key is, and is not ----------------------------------------------------------------

def key_needles(key_type: str, key) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(encodings of the whole key, the private numbers alone) that would betray a process holding `key`.

    OpenSSL keeps a big number as little-endian machine words, so a loaded
    key's numbers sit in memory byte-reversed; files and DER hold them
    big-endian. Both orders are looked for.
    """
    pkcs8 = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    encoded = {
        f"{key_type} PKCS#8 PEM": key.private_bytes(serialization.Encoding.PEM, *pkcs8),
        f"{key_type} PKCS#8 DER": key.private_bytes(serialization.Encoding.DER, *pkcs8),
    }
    if isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = {"scalar": (key.private_numbers().private_value, (key.curve.key_size + 7) // 8)}
    elif isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        numbers = {name: (value, (value.bit_length() + 7) // 8) for name, value in (("d", n.d), ("p", n.p), ("q", n.q))}
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        numbers = {"seed": (int.from_bytes(raw, "big"), len(raw))}
    else:
        raise AssertionError(f"no needles for {type(key)}")
    private = {}
    for name, (value, size) in numbers.items():
        big = value.to_bytes(size, "big")
        private[f"{key_type} {name} big-endian"] = big
        private[f"{key_type} {name} little-endian"] = big[::-1]
    return encoded, private


@dataclass
class MemoryScan:
    pid: int
    found: dict[str, list[str]]   # needle name -> names of the regions it was seen in
    bytes_read: int
    regions_read: list[str]
    unreadable: list[str]


def scan_memory(pid: int, needles: dict[str, bytes]) -> MemoryScan:
    """Look for each needle in every readable mapping of `pid` (/proc/PID/maps, /proc/PID/mem), reading
    at most SCAN_CAP bytes; a chunk boundary cannot hide a needle (chunks overlap by the longest one)."""
    found = {name: [] for name in needles}
    overlap = max(len(n) for n in needles.values()) - 1
    bytes_read, regions_read, unreadable = 0, [], []
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            region = fields[5] if len(fields) > 5 else f"anonymous {fields[0]}"
            if not fields[1].startswith("r") or region in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
                continue  # not readable; the kernel's pages hold no process data
            position, previous = start, b""
            while position < end:
                if bytes_read >= SCAN_CAP:
                    raise AssertionError(f"scan of pid {pid} stopped at its {SCAN_CAP}-byte cap: incomplete")
                try:
                    mem.seek(position)
                    chunk = mem.read(min(SCAN_CHUNK, end - position))
                except OSError as error:
                    unreadable.append(f"{region} at {position:#x}: {error.strerror}")
                    break
                if not chunk:
                    unreadable.append(f"{region} at {position:#x}: short read")
                    break
                window = previous + chunk
                for name, needle in needles.items():
                    if region not in found[name] and needle in window:
                        found[name].append(region)
                previous = window[-overlap:] if overlap else b""
                position += len(chunk)
                bytes_read += len(chunk)
            regions_read.append(region)
    return MemoryScan(pid, found, bytes_read, regions_read, unreadable)


def present(scan: MemoryScan, names) -> dict[str, list[str]]:
    return {name: scan.found[name] for name in names if scan.found[name]}


def handshake_with_every_key(s_client, server: TlsServe) -> None:
    """One verified handshake per key type, so each key (or its oracle path) has been used."""
    for key_type in KEY_TYPES:
        client = s_client(server, "-sigalgs", SCHEME_OF_KEY[key_type])
        client.wait_handshake()
        assert client.request()["scheme"] == SCHEME_OF_KEY[key_type]
        assert "Verify return code: 0 (ok)" in client.finish()


def test_the_edge_process_never_holds_the_private_key(edge, pki, s_client):
    home = edge.home
    # Its command line names no key: only the oracle's address and its own (Ed25519 identity) key file.
    argv = cmdline(edge.serve._proc.pid)
    assert "tls-serve" in argv and "--oracle" in argv
    assert "--key" not in argv and "--cert" not in argv
    files = [Path(a).resolve() for a in argv if Path(a).is_file()]
    tls_key_files = {leaf.key_pem.resolve() for leaf in pki.leaves.values()}
    assert not [f for f in files if f in tls_key_files or f.is_relative_to(home.keystore.resolve())], argv
    # Nor are any of its open files in the keystore (nor the test PKI's key files).
    fds = Path(f"/proc/{edge.serve._proc.pid}/fd")
    opened = {os.readlink(fd) for fd in fds.iterdir() if os.path.lexists(fd)}
    assert not [f for f in opened if f.startswith(str(home.keystore.resolve())) or Path(f) in tls_key_files]

    handshake_with_every_key(s_client, edge.serve)
    encoded, private, public = {}, {}, {}
    for key_type, leaf in pki.leaves.items():
        whole, numbers = key_needles(key_type, leaf.key)
        encoded.update(whole)
        private.update(numbers)
        public[f"{key_type} certificate"] = leaf.chain.der_chain[0]
    needles = {**encoded, **private, **public}

    edge_scan = scan_memory(edge.serve._proc.pid, needles)
    assert "[heap]" in edge_scan.regions_read, edge_scan
    # The scan does see what the edge holds: every certificate it served...
    assert set(present(edge_scan, public)) == set(public), edge_scan.found
    # ...and none of the private keys, in any form.
    assert present(edge_scan, {**encoded, **private}) == {}, edge_scan

    # The oracle's front process (network, peers, audit) never loads a key either.
    front_scan = scan_memory(edge.oracle.process.pid, needles)
    assert "[heap]" in front_scan.regions_read, front_scan
    assert present(front_scan, {**encoded, **private}) == {}, front_scan

    # Controls: the same scan finds every key's private numbers where the key is held.
    signers = signer_pids(edge.oracle)
    assert len(signers) == 2, f"expected the oracle's 2 signing processes, found {signers}"
    for pid in signers:
        scan = scan_memory(pid, needles)
        for key_type in KEY_TYPES:
            assert present(scan, [n for n in private if n.startswith(f"{key_type} ")]), (key_type, pid, scan.found)


def test_the_scan_finds_the_key_in_tls_serve_with_a_local_key(pki, s_client):
    """The control for the edge's scan: the same program, given --cert/--key, holds every key it signs with."""
    options = []
    for leaf in pki.leaves.values():
        options += ["--cert", leaf.chain_pem, "--key", leaf.key_pem]
    with TlsServe(*options) as local:
        local.wait_listening()
        handshake_with_every_key(s_client, local)
        private = {}
        for key_type, leaf in pki.leaves.items():
            private.update(key_needles(key_type, leaf.key)[1])
        scan = scan_memory(local._proc.pid, private)
    for key_type in KEY_TYPES:
        assert present(scan, [n for n in private if n.startswith(f"{key_type} ")]), (key_type, scan.found)



def test_tls_serve_with_the_oracle_refuses_alpn(edge):
    """With --cert/--key, --alpn works (test_interop_openssl); with --oracle every handshake would be refused."""
    done = subprocess.run([yestls_command(), "tls-serve", "--listen", f"127.0.0.1:{free_port()}", "--oracle",
                           f"127.0.0.1:{edge.home.port}", "--identity-key", str(edge.home.identity_path),
                           "--alpn", "smtp"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--alpn needs --cert/--key" in done.stderr and "policy.alpn_selected" in done.stderr
