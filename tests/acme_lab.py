"""An ACME lab on loopback for the ACME tests: Pebble (the ACME test server, Debian's `pebble`), Knot (a DNS
server that resolves the test names for Pebble and takes RFC 2136 updates with TSIG), and a stand-in for the
edge's side of HTTP-01 (the real store of relay/edge/acme.py behind a TunnelService, and a tiny port-80
responder on Pebble's httpPort).

    with acme_lab(tmp_path, NAMES) as lab, StandInEdge(lab.http_port) as edge:
        site = lab.site_toml(tmp_path / "site.toml", state_dir, edge=edge)
        ...

Pebble's API certificate comes from the test PKI (tests/pki.py); its
trust anchor is `lab.ca_bundle`. Pebble runs with PEBBLE_VA_NOSLEEP=1, no
nonce rejection and no authorization reuse, so every order is validated.
"""

import asyncio
import base64
import http.server
import os
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
from prometheus_client import CollectorRegistry

from relay.audit import AuditLog
from relay.edge.acme import AcmeChallenges
from relay.identity import generate_identity, load_identity, parse_public_key_text
from relay.spool.metrics import SpoolServiceMetrics
from relay.spool.protocol import ACME_METHODS, MAX_FRAME, SERVICE
from relay.tunnel import Peer, TunnelService

from .oracle_home import free_port
from .pki import make_pki

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
KNOTD = "/usr/sbin/knotd"
ZONE = "example.org"
TSIG_NAME = "yestls-acme."
START_TIMEOUT = 30.0


@dataclass
class AcmeLab:
    directory: Path
    directory_url: str
    ca_bundle: Path
    http_port: int
    dns_port: int
    tsig_secret_file: Path
    processes: list = field(default_factory=list)

    def site_toml(self, path: Path, state_dir: Path, *, edge: "StandInEdge | None" = None,
                  identity_key: Path | None = None, directory_url: str | None = None,
                  more_edges: tuple[int, ...] = ()) -> Path:
        """site.toml with [acme]: HTTP-01 through `edge` (and the tunnel service ports `more_edges`, after it),
        or DNS-01 to Knot without one."""
        if edge is not None:
            edges = ", ".join(f'"127.0.0.1:{port}"' for port in (edge.port, *more_edges))
            challenge = (f'challenge = "http-01"\nedges = [{edges}]\n'
                         f'identity_key = "{identity_key or edge.identity_path}"\n')
        else:
            challenge = (f'challenge = "dns-01"\n[acme.dns01]\nserver = "127.0.0.1:{self.dns_port}"\n'
                         f'zone = "{ZONE}"\ntsig_name = "{TSIG_NAME}"\ntsig_algorithm = "hmac-sha256"\n'
                         f'tsig_secret_file = "{self.tsig_secret_file}"\n')
        path.write_text(
            'domains = ["example.org"]\nmx_names = ["mx.example.org"]\nedge_addresses = ["192.0.2.10"]\n'
            "[acme]\n"
            f'directory = "{directory_url or self.directory_url}"\n'
            'email = "postmaster@example.org"\n'
            f'ca_bundle = "{self.ca_bundle}"\n'
            f'state_dir = "{state_dir}"\n'
            + challenge)
        return path

    def txt(self, name: str) -> list[str]:
        """The TXT values Knot answers for `name` now."""
        response = dns.query.tcp(dns.message.make_query(name, dns.rdatatype.TXT), "127.0.0.1", port=self.dns_port,
                                 timeout=5)
        return [b"".join(r.strings).decode() for rrset in response.answer for r in rrset]


def _wait(ready, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} did not start:\n{log.read_text(errors='replace')}")


@contextmanager
def acme_lab(directory: Path, names: tuple[str, ...]):
    directory.mkdir(parents=True, exist_ok=True)
    tls = make_pki(directory / "pebble-tls", names=("localhost",), key_types=("ecdsa-p256",))
    api_port, management_port, http_port, tls_port, dns_port = (free_port() for _ in range(5))
    secret_file = directory / "tsig.secret"
    secret = base64.b64encode(os.urandom(32)).decode()
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)

    knot = directory / "knot"
    knot.mkdir()
    records = "".join(f"{name}. A 127.0.0.1\n" for name in names)
    (knot / f"{ZONE}.zone").write_text(
        f"$TTL 60\n@ SOA ns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 60\n@ NS ns.{ZONE}.\n"
        f"ns A 127.0.0.1\n{records}")
    (knot / "knot.conf").write_text(
        f'server:\n    rundir: "{knot}"\n    listen: 127.0.0.1@{dns_port}\n'
        f"key:\n  - id: {TSIG_NAME}\n    algorithm: hmac-sha256\n    secret: {secret}\n"
        f"acl:\n  - id: acme\n    key: {TSIG_NAME}\n    action: update\n"
        f'database:\n    storage: "{knot}"\n'
        f'template:\n  - id: default\n    storage: "{knot}"\n    zonefile-sync: -1\n    journal-content: none\n'
        f'zone:\n  - domain: {ZONE}\n    file: "{ZONE}.zone"\n    acl: acme\n'
        "log:\n  - target: stderr\n    any: info\n")
    pebble_config = directory / "pebble.json"
    leaf = tls.leaves["ecdsa-p256"]
    pebble_config.write_text(
        '{"pebble": {'
        f'"listenAddress": "127.0.0.1:{api_port}", "managementListenAddress": "127.0.0.1:{management_port}", '
        f'"certificate": "{leaf.chain_pem}", "privateKey": "{leaf.key_pem}", '
        f'"httpPort": {http_port}, "tlsPort": {tls_port}, "ocspResponderURL": "", '
        '"externalAccountBindingRequired": false}}')
    lab = AcmeLab(directory, f"https://localhost:{api_port}/dir", tls.ca_pem, http_port, dns_port, secret_file)
    try:
        knot_log = directory / "knot.log"
        with open(knot_log, "wb") as log:
            lab.processes.append(subprocess.Popen([KNOTD, "-c", str(knot / "knot.conf")], stdout=log,
                                                  stderr=subprocess.STDOUT))
        _wait(lambda: lab.txt(f"ns.{ZONE}") == [], "knotd", knot_log)
        pebble_log = directory / "pebble.log"
        environment = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
                       "PEBBLE_AUTHZREUSE": "0"}
        with open(pebble_log, "wb") as log:
            lab.processes.append(subprocess.Popen(
                [PEBBLE, "-config", str(pebble_config), "-dnsserver", f"127.0.0.1:{dns_port}"],
                stdout=log, stderr=subprocess.STDOUT, env=environment))
        _wait(lambda: "Listening on" in pebble_log.read_text(), "pebble", pebble_log)
        yield lab
    finally:
        for process in lab.processes:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class StandInEdge:
    """The edge's HTTP-01 side, minimal: relay/edge/acme.py's store behind the tunnel gate (service "spool",
    home's ACME identity allowlisted for the two methods), and GET /.well-known/acme-challenge/<token> on
    `http_port`. `fetched` lists the tokens the CA asked for; `broken` makes every answer a 404; `calls` the
    tunnel methods home called, with their token. `home`: another edge whose ACME identity this one allowlists
    (one home, several edges); else a new identity in `directory`."""

    def __init__(self, directory: Path, http_port: int, *, home: "StandInEdge | None" = None):
        if home is None:
            self.identity_path = directory / "home-acme-identity.key"
            identity = parse_public_key_text(generate_identity(self.identity_path))
        else:
            self.identity_path = home.identity_path
            identity = load_identity(self.identity_path).public_key()
        self.challenges = AcmeChallenges()
        self.calls: list[tuple[str, str]] = []
        peer = Peer(name="home-acme", addresses=frozenset({"127.0.0.1"}), identity=identity, max_connections=4,
                    max_in_flight=8, rate=50.0, burst=100, methods=ACME_METHODS)
        self.audit = AuditLog(directory / "edge-audit.jsonl")
        self.service = TunnelService(SERVICE, (peer,), self._recorded(self.challenges.methods()), self.audit,
                                     SpoolServiceMetrics(CollectorRegistry()), max_frame=MAX_FRAME)
        self.http_port = http_port
        self.fetched: list[str] = []
        self.broken = False
        self.loop = asyncio.new_event_loop()
        self.port = 0

    def _recorded(self, methods: dict) -> dict:
        def recording(name, handler):
            async def call(connection, frame):
                self.calls.append((name, frame.meta.get("token")))
                return await handler(connection, frame)
            return call

        return {name: recording(name, handler) for name, handler in methods.items()}

    def held(self) -> int:
        """How many challenges the store holds now."""
        return asyncio.run_coroutine_threadsafe(self._held(), self.loop).result(5)

    async def _held(self) -> int:
        return len(self.challenges)

    async def _answer(self, token: str) -> str | None:
        return self.challenges.key_authorization(token)

    def __enter__(self) -> "StandInEdge":
        ready = threading.Event()

        def run_loop():
            asyncio.set_event_loop(self.loop)
            server = self.loop.run_until_complete(
                self.loop.create_server(self.service.new_connection, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
            server.close()

        self.loop_thread = threading.Thread(target=run_loop, daemon=True)
        self.loop_thread.start()
        ready.wait(10)
        edge = self

        class Responder(http.server.BaseHTTPRequestHandler):
            def do_GET(self):   # noqa: N802 - http.server's name
                token = self.path.removeprefix("/.well-known/acme-challenge/")
                edge.fetched.append(token)
                answer = None if edge.broken else asyncio.run_coroutine_threadsafe(
                    edge._answer(token), edge.loop).result(5)
                body = (answer or "not found").encode()
                self.send_response(200 if answer else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", self.http_port), Responder)
        self.http_thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.http_thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(10)
        self.audit.close()
