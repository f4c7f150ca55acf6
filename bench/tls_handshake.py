#!/usr/bin/env python3
"""The TLS engine's server cost against OpenSSL's, measured side by side.

What runs
    One server process hosts, in one asyncio loop on loopback ports, with the
    same certificate chain and key:
      engine   relay.tls through relay.aio.tls.TLSServerProtocol and a
               LocalKeySigner (the signature is made in-process, as in
               `yestls tls-serve`);
      openssl  Python's ssl, `loop.create_server(..., ssl=context)`;
      plain    the same application without TLS: the floor (kernel, asyncio,
               application) both TLS servers stand on;
      tls12_engine, tls12_openssl
               the same two TLS servers for TLS 1.2 clients, each on a port
               of its own: the engine with the same configuration (it serves
               TLS 1.2 to a client that offers nothing newer), OpenSSL with a
               context held to TLS 1.2.
    For TLS 1.3 both TLS servers are held to TLS_AES_128_GCM_SHA256 and
    x25519; for TLS 1.2 to ECDHE-ECDSA-AES128-GCM-SHA256 (with
    `--key-type rsa-2048`: ECDHE-RSA-AES128-GCM-SHA256) and x25519, with the
    extended master secret the client offers. OpenSSL is held through an
    OPENSSL_CONF given to the server process only and its contexts' settings;
    the client checks the version and suite on every connection, and that no
    session was resumed. Neither server issues session tickets, so every
    connection is a full handshake (OpenSSL still files each TLS 1.2 session
    in its server-side session-ID cache, which Python cannot turn off; the
    engine keeps nothing). All answer the same tiny protocol: a line `N` asks
    for N bytes; a line `+N` announces N bytes the server counts and
    acknowledges with one byte; the client closes.

    One client process (this one: Python's ssl, i.e. an OpenSSL client, the
    same for every server; for the tls12_* servers its context has
    maximum_version TLSv1_2, as a client without TLS 1.3 would) runs
    interleaved rounds (engine, openssl, plain, tls12_engine, tls12_openssl,
    engine, ...) of new connections, each a full handshake plus a 100-byte
    request and answer, from `--concurrency` threads; then interleaved TLS 1.3
    transfer rounds: a `--bulk-mb` body from each server (bulk) and one to
    each server (upload, which is what a mail server mostly does). Around
    every round the client asks the server process, over its stdin/stdout
    pipe, for its own CPU time (time.process_time: user + system, so the
    kernel's loopback work counts), once the round's connections are closed
    on the server's side too. Interleaving puts every server under the same
    machine noise.

What it prints
    `# ...` lines: what was compared (the reference is named on the
    `# reference:` line), the settings, the per-round handshake ratios of
    each version (to judge noise), the costs above the plain-TCP floor, the
    upload ratios.
    `value <metric> <n>`: absolute figures. `*_handshake_cpu_us` is the server
    process's CPU per connection (handshake, one request, close), TLS 1.2 for
    `tls12_*` and TLS 1.3 otherwise; `*_handshakes_per_second` is
    connections per wall second seen by the client; `*_bulk_mb_per_s` /
    `*_upload_mb_per_s` are body bytes (10^6) per wall second seen by the
    client; `*_cpu_ms_per_mb` is the server's CPU per MB moved. Handshake
    figures are totals over all rounds; transfer figures are the best round
    of each server (their noise is one-sided and comes in modes).
    `ratio handshake_cpu`: engine CPU per handshake / OpenSSL's. Above 1 the
        engine costs more; the project's target is <= 1.5.
    `ratio handshake_cpu_tls12`: the same for TLS 1.2 full handshakes
        (tls12_engine / tls12_openssl); the target is <= 1.5 too.
    `ratio handshakes_per_second`: engine / OpenSSL, higher is better. The
        client's own cost is in it, so it understates the servers' gap.
    `ratio bulk_throughput`: engine MB/s / OpenSSL MB/s for the bulk body,
        higher is better; the target is >= 0.5.

    Both TLS servers pay asyncio's Python-level costs (the engine its
    adapter, OpenSSL asyncio's sslproto), as they do when deployed; OpenSSL's
    C core alone is cheaper than the `openssl_*` figures say.

Run it
    make bench, or
    .venv/bin/python bench/tls_handshake.py [--handshakes 2000] [--rounds 10]
        [--bulk-mb 25] [--bulk-rounds 7] [--key-type ecdsa-p256|ecdsa-p384|rsa-2048|ed25519]
        [--concurrency 4] [--profile DIR]
    `--profile DIR` runs cProfile in the server process during the engine's
    measured rounds only, writes
    DIR/engine-{handshake,handshake-tls12,bulk,upload}.pstats (read them with
    `python -m pstats`) and prints the top entries per handshake and per MB.
    cProfile times by the wall clock, so a system call during which the
    client process ran on our CPU looks long; the engine's figures from such
    a run include the profiler's overhead.
"""

import argparse
import os
import select
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SERVER_NAME = "mx.example.org"
CIPHER_SUITE = "TLS_AES_128_GCM_SHA256"
# The TLS 1.2 suite compared, by the certificate key: (OpenSSL's name, the engine's CipherSuite12 name).
TLS12_SUITES = {
    "ecdsa": ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
    "rsa": ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
}
# Every side measured, in the order of each interleaved round; transfers are measured on TLS 1.3 only.
HANDSHAKE_SIDES = ("engine", "openssl", "plain", "tls12_engine", "tls12_openssl")
TRANSFER_SIDES = ("engine", "openssl", "plain")
HANDSHAKE_ANSWER = 100          # bytes answered on each handshake-round connection
MAX_REQUEST_LINE = 32
MAX_ANSWER = 1 << 31
WRITE_CHUNK = 64 * 1024
CONNECT_TIMEOUT = 10.0          # every client socket operation
CONTROL_TIMEOUT = 30.0          # every answer on the control pipe
WARMUP_HANDSHAKES = 20

# Given to the server process only: its OpenSSL then offers exactly what the
# engine is configured with (the TLS 1.2 context sets its version and suite
# itself). The client keeps the system's defaults.
OPENSSL_SERVER_CONF = f"""\
openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1.3
Ciphersuites = {CIPHER_SUITE}
Groups = X25519
"""


# --- server process -----------------------------------------------------------

def serve(args) -> None:
    import asyncio

    asyncio.run(_serve(args))


async def _serve(args) -> None:
    import asyncio
    import cProfile
    import ssl

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from relay.aio.tls import LocalKeySigner, TLSServerProtocol
    from relay.tls import CertificateChain, CipherSuite, Group, ServerConfig
    from relay.tls.constants import CipherSuite12

    pki = Path(args.pki)
    chain_pem = pki / f"{args.key_type}.chain.pem"
    key_pem = pki / f"{args.key_type}.key.pem"

    chain = CertificateChain.from_pem(chain_pem.read_bytes())
    key = load_pem_private_key(key_pem.read_bytes(), password=None)
    openssl_suite12, engine_suite12 = tls12_suite(args.key_type)
    config = ServerConfig(
        [chain], cipher_suites=(CipherSuite.AES_128_GCM_SHA256,), groups=(Group.X25519,), tickets=None,
        tls12=True, cipher_suites12=(CipherSuite12[engine_suite12],), groups12=(Group.X25519,),
    )
    signer = LocalKeySigner([(chain, key)])

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(chain_pem, key_pem)
    context.num_tickets = 0
    offered = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.3"]
    if offered != [CIPHER_SUITE]:
        raise SystemExit(f"bench server: OpenSSL offers {offered}, not only {CIPHER_SUITE}; OPENSSL_CONF not applied")

    context12 = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context12.minimum_version = context12.maximum_version = ssl.TLSVersion.TLSv1_2
    context12.set_ciphers(openssl_suite12)
    context12.options |= ssl.OP_NO_TICKET
    context12.load_cert_chain(chain_pem, key_pem)
    offered = [c["name"] for c in context12.get_ciphers() if c["protocol"] == "TLSv1.2"]
    if offered != [openssl_suite12]:
        raise SystemExit(f"bench server: OpenSSL offers {offered} for TLS 1.2, not only {openssl_suite12}")

    tracker = ConnectionTracker()
    body = os.urandom(WRITE_CHUNK)
    loop = asyncio.get_running_loop()

    def engine():
        return TLSServerProtocol(config, signer, SizedAnswer(tracker, body))

    def application():
        return SizedAnswer(tracker, body)

    servers = {
        "engine": await loop.create_server(engine, "127.0.0.1", 0),
        "openssl": await loop.create_server(application, "127.0.0.1", 0, ssl=context),
        # The same protocol without TLS: the floor (kernel, asyncio, application) both servers stand on.
        "plain": await loop.create_server(application, "127.0.0.1", 0),
        # A port of its own, so that every side is told apart the same way; a TLS 1.2 client decides the version.
        "tls12_engine": await loop.create_server(engine, "127.0.0.1", 0),
        "tls12_openssl": await loop.create_server(application, "127.0.0.1", 0, ssl=context12),
    }

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    profiles: dict[str, cProfile.Profile] = {}

    def reply(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    reply(f"ready {ssl.OPENSSL_VERSION.split()[1]} {' '.join(f'{side}={_port(s)}' for side, s in servers.items())}")
    try:
        while True:
            line = (await reader.readline()).decode().split()
            if not line or line[0] == "quit":  # EOF too: the client is gone
                break
            if line[0] in ("cpu", "cpu-now"):
                if line[0] == "cpu":  # a round ends when its connections are closed on our side too
                    await asyncio.wait_for(tracker.idle.wait(), CONTROL_TIMEOUT / 2)
                reply(f"cpu {time.process_time():.6f} {tracker.served}")
            elif line[0] == "profile" and line[1] == "on":
                profiles.setdefault(line[2], cProfile.Profile()).enable()
                reply("ok")
            elif line[0] == "profile" and line[1] == "off":
                for profile in profiles.values():
                    profile.disable()
                reply("ok")
            elif line[0] == "profile" and line[1] == "dump":
                for name, profile in profiles.items():
                    profile.dump_stats(Path(line[2]) / f"engine-{name}.pstats")
                reply("ok")
            else:
                reply(f"error unknown command {' '.join(line)}")
    finally:
        for server in servers.values():
            server.close()
        for server in servers.values():
            await asyncio.wait_for(server.wait_closed(), 5)


def _port(server) -> int:
    return server.sockets[0].getsockname()[1]


def tls12_suite(key_type: str) -> tuple[str, str]:
    """(OpenSSL's name, the engine's CipherSuite12 name) of the TLS 1.2 suite compared for `key_type`."""
    return TLS12_SUITES["rsa" if key_type.startswith("rsa") else "ecdsa"]


class ConnectionTracker:
    """How many connections the application protocol has served, and whether any is still open."""

    def __init__(self) -> None:
        import asyncio

        self.open = 0
        self.served = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def opened(self) -> None:
        self.open += 1
        self.served += 1
        self.idle.clear()

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0:
            self.idle.set()


class SizedAnswer:
    """The application protocol of both servers.

    Requests are lines. `N` asks for N bytes, written in chunks as the
    transport's flow control allows. `+N` announces N bytes from the client,
    which are counted and dropped, then answered with one byte. The client
    closes the connection.
    """

    def __init__(self, tracker: ConnectionTracker, chunk: bytes):
        self._tracker = tracker
        self._chunk = memoryview(chunk)
        self._buffer = b""
        self._to_send = 0
        self._to_drop = 0
        self._paused = False
        self._transport = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._tracker.opened()

    def connection_lost(self, exc) -> None:
        self._tracker.closed()

    def data_received(self, data: bytes) -> None:
        if self._to_drop:
            data = self._drop(data)
        self._buffer += data
        self._next_requests()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._write_some()
        self._next_requests()

    def _next_requests(self) -> None:
        while not self._to_send and not self._to_drop and b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            upload = line.startswith(b"+")
            digits = line[1:] if upload else line
            if not digits.isdigit() or int(digits) > MAX_ANSWER:
                self._transport.close()
                return
            if upload:
                self._to_drop = int(digits)
                rest, self._buffer = self._buffer, b""
                self._buffer = self._drop(rest)
            else:
                self._to_send = int(digits)
                self._write_some()
        if len(self._buffer) > MAX_REQUEST_LINE and not self._to_send:
            self._transport.close()

    def _drop(self, data: bytes) -> bytes:
        """Count uploaded bytes off `data`; what follows the upload is returned."""
        taken = min(self._to_drop, len(data))
        self._to_drop -= taken
        if self._to_drop:
            return b""
        self._transport.write(b"k")
        return data[taken:]

    def _write_some(self) -> None:
        chunk = self._chunk
        while self._to_send and not self._paused and not self._transport.is_closing():
            n = min(len(chunk), self._to_send)
            self._transport.write(chunk[:n])
            self._to_send -= n


# --- client process -----------------------------------------------------------

class ServerProcess:
    """The server process and its control pipe; every answer is awaited with a timeout."""

    def __init__(self, pki_dir: Path, key_type: str, conf: Path):
        env = dict(os.environ, OPENSSL_CONF=str(conf))
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", "--pki", str(pki_dir), "--key-type", key_type],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=str(REPO),
        )
        self._pending = b""
        ready = self._answer("ready")
        self.openssl_version = ready[0]
        self.ports = {side: int(port) for side, _, port in (word.partition("=") for word in ready[1:])}

    def command(self, line: str, expect: str) -> list[str]:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._answer(expect)

    def cpu(self, wait_idle: bool = True) -> tuple[float, int]:
        """The server's process CPU seconds and connections served; by default once none is open."""
        seconds, served = self.command("cpu" if wait_idle else "cpu-now", "cpu")
        return float(seconds), int(served)

    def _answer(self, expect: str) -> list[str]:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + CONTROL_TIMEOUT
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"bench server gave no {expect!r} answer within {CONTROL_TIMEOUT:.0f} s")
            data = os.read(fd, 4096)
            if not data:
                raise RuntimeError(f"bench server exited (status {self.proc.poll()}) before its {expect!r} answer")
            self._pending += data
        line, _, self._pending = self._pending.partition(b"\n")
        words = line.decode().split()
        if not words or words[0] != expect:
            raise RuntimeError(f"bench server answered {line!r}, expected {expect!r}")
        return words[1:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc.stdout.close()


@dataclass(frozen=True)
class Target:
    """A side as the client sees it: its port and, for TLS, the client's context and what must be negotiated."""

    port: int
    context: object = None   # an ssl.SSLContext; None: plain TCP
    version: str = ""        # as ssl.SSLSocket.version() names it
    cipher: str = ""         # as ssl.SSLSocket.cipher() names it


def connect(target: Target):
    """A TLS connection checked to be a full handshake with the parameters compared; plain TCP without a context."""
    import socket

    raw = socket.create_connection(("127.0.0.1", target.port), timeout=CONNECT_TIMEOUT)
    # Without it Nagle holds the request behind the client's Finished until the
    # server's delayed ACK: 40 ms of nothing per connection.
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if target.context is None:
        return raw
    try:
        tls = target.context.wrap_socket(raw, server_hostname=SERVER_NAME)
    except BaseException:
        raw.close()
        raise
    version, cipher = tls.version(), tls.cipher()[0]
    if version != target.version or cipher != target.cipher or tls.session_reused:
        tls.close()
        raise RuntimeError(f"port {target.port} negotiated {version} {cipher} (resumed: {tls.session_reused}), "
                           f"not a full {target.version} {target.cipher} handshake")
    return tls


def ask(tls, size: int, buffer: memoryview) -> None:
    """Request `size` bytes and read exactly that many."""
    tls.sendall(b"%d\n" % size)
    got = 0
    while got < size:
        n = tls.recv_into(buffer, min(len(buffer), size - got))
        if not n:
            raise RuntimeError(f"server closed after {got} of {size} bytes")
        got += n


def one_connection(target: Target) -> None:
    buffer = memoryview(bytearray(HANDSHAKE_ANSWER))
    with connect(target) as tls:
        ask(tls, HANDSHAKE_ANSWER, buffer)


def handshake_round(server: ServerProcess, pool, target: Target, n: int) -> tuple[float, float]:
    """(server CPU seconds, client wall seconds) for `n` new connections, `concurrency` at a time."""
    cpu_before, served_before = server.cpu()
    start = time.perf_counter()
    futures = [pool.submit(one_connection, target) for _ in range(n)]
    try:
        for future in futures:
            future.result(timeout=CONNECT_TIMEOUT * 3)
    except BaseException:
        for future in futures:
            future.cancel()  # the ones not started: leaving the pool waits only for running ones
        raise
    wall = time.perf_counter() - start
    cpu_after, served_after = server.cpu()
    if served_after - served_before != n:
        raise RuntimeError(f"server counted {served_after - served_before} connections, client made {n}")
    return cpu_after - cpu_before, wall


def bulk_round(server: ServerProcess, target: Target, size: int) -> tuple[float, float]:
    """(server CPU seconds, client wall seconds) for one `size`-byte answer on a connection already set up."""
    buffer = memoryview(bytearray(1 << 20))
    with connect(target) as tls:
        tls.settimeout(CONNECT_TIMEOUT * 3)
        ask(tls, 1, buffer)  # the server has processed our Finished: only the body is measured
        cpu_before, _ = server.cpu(wait_idle=False)
        start = time.perf_counter()
        ask(tls, size, buffer)
        wall = time.perf_counter() - start
    cpu_after, _ = server.cpu()
    return cpu_after - cpu_before, wall


def upload_round(server: ServerProcess, target: Target, body: bytes) -> tuple[float, float]:
    """(server CPU seconds, client wall seconds) for receiving `body` on a connection already set up."""
    buffer = memoryview(bytearray(1))
    with connect(target) as tls:
        tls.settimeout(CONNECT_TIMEOUT * 3)
        ask(tls, 1, buffer)
        cpu_before, _ = server.cpu(wait_idle=False)
        start = time.perf_counter()
        tls.sendall(b"+%d\n" % len(body))
        tls.sendall(body)
        if tls.recv_into(buffer, 1) != 1:
            raise RuntimeError("server closed before acknowledging the upload")
        wall = time.perf_counter() - start
    cpu_after, _ = server.cpu()
    return cpu_after - cpu_before, wall


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run(args) -> None:
    import ssl

    from tests.pki import make_pki

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="yestls-bench-") as tmp:
        tmp = Path(tmp)
        pki = make_pki(tmp / "pki", key_types=(args.key_type,))
        conf = tmp / "openssl-server.cnf"
        conf.write_text(OPENSSL_SERVER_CONF)
        context = ssl.create_default_context(cafile=str(pki.ca_pem))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context12 = ssl.create_default_context(cafile=str(pki.ca_pem))
        context12.maximum_version = ssl.TLSVersion.TLSv1_2   # a client without TLS 1.3
        suite12 = tls12_suite(args.key_type)[0]

        server = ServerProcess(tmp / "pki", args.key_type, conf)
        try:
            ports = server.ports
            targets = {
                "engine": Target(ports["engine"], context, "TLSv1.3", CIPHER_SUITE),
                "openssl": Target(ports["openssl"], context, "TLSv1.3", CIPHER_SUITE),
                "plain": Target(ports["plain"]),
                "tls12_engine": Target(ports["tls12_engine"], context12, "TLSv1.2", suite12),
                "tls12_openssl": Target(ports["tls12_openssl"], context12, "TLSv1.2", suite12),
            }
            results = measure(args, server, targets)
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                server.command(f"profile dump {args.profile.resolve()}", "ok")
        finally:
            server.stop()
    report(args, server, results, time.perf_counter() - started)
    if args.profile:
        total_mb = args.bulk_mb * args.bulk_rounds
        print_profiles(args.profile, {"handshake": (args.handshakes, "handshake"),
                                      "handshake-tls12": (args.handshakes, "handshake"),
                                      "bulk": (total_mb, "MB"), "upload": (total_mb, "MB")})


def measure(args, server: ServerProcess, targets: dict[str, Target]) -> dict:
    """Interleaved rounds; per side, lists of (server CPU seconds, client wall seconds)."""
    handshakes = {side: [] for side in HANDSHAKE_SIDES}
    bulk = {side: [] for side in TRANSFER_SIDES}
    upload = {side: [] for side in TRANSFER_SIDES}
    counts = split(args.handshakes, args.rounds)

    def timed(kind: str, side: str, measure_round, *round_args) -> tuple[float, float]:
        """One round of `side`'s; the engine's are profiled, if asked, into DIR/engine-<kind>.pstats."""
        profiling = args.profile and side in ("engine", "tls12_engine")
        if profiling:
            server.command(f"profile on {kind}", "ok")
        result = measure_round(server, *round_args)
        if profiling:
            server.command("profile off", "ok")
        return result

    with ThreadPoolExecutor(args.concurrency) as pool:
        for side in HANDSHAKE_SIDES:
            handshake_round(server, pool, targets[side], WARMUP_HANDSHAKES)
        for n in counts:
            for side in HANDSHAKE_SIDES:
                kind = "handshake-tls12" if side.startswith("tls12_") else "handshake"
                handshakes[side].append(timed(kind, side, handshake_round, pool, targets[side], n))
    size = args.bulk_mb * 1_000_000
    body = os.urandom(size)
    for _ in range(args.bulk_rounds):
        for side in TRANSFER_SIDES:
            bulk[side].append(timed("bulk", side, bulk_round, targets[side], size))
            upload[side].append(timed("upload", side, upload_round, targets[side], body))
    return dict(counts=counts, handshakes=handshakes, bulk=bulk, upload=upload)


def report(args, server: ServerProcess, r: dict, elapsed: float) -> None:
    import cryptography
    from cryptography.hazmat.backends.openssl import backend

    total = sum(r["counts"])
    mb = args.bulk_mb
    cpu_us, per_second, mb_per_s, cpu_ms_per_mb = {}, {}, {}, {}
    for side, rounds in r["handshakes"].items():
        cpu_us[side] = sum(c for c, _ in rounds) / total * 1e6
        per_second[side] = total / sum(w for _, w in rounds)
    # Transfers are best of their rounds: their noise is one-sided and comes in
    # modes (a round runs at ~1x or ~2x the CPU per MB, for either server).
    for side, rounds in r["bulk"].items():
        mb_per_s[side] = mb / min(w for _, w in rounds)
        cpu_ms_per_mb[side] = min(c for c, _ in rounds) * 1e3 / mb
    up_mb_per_s, up_cpu_ms_per_mb = {}, {}
    for side, rounds in r["upload"].items():
        up_mb_per_s[side] = mb / min(w for _, w in rounds)
        up_cpu_ms_per_mb[side] = min(c for c, _ in rounds) * 1e3 / mb

    def round_ratios(engine: str, openssl: str) -> str:
        return " ".join(f"{e[0] / o[0]:.2f}" for e, o in zip(r["handshakes"][engine], r["handshakes"][openssl]))

    tls_us = {side: cpu_us[side] - cpu_us["plain"] for side in ("engine", "openssl", "tls12_engine", "tls12_openssl")}
    tls_ms_per_mb = {side: cpu_ms_per_mb[side] - cpu_ms_per_mb["plain"] for side in ("engine", "openssl")}

    print("# YesTLS server benchmark: full TLS 1.3 and TLS 1.2 handshakes, TLS 1.3 bulk transfer, "
          "one server process")
    print(f"# engine: relay.tls via relay.aio.tls.TLSServerProtocol, cryptography {cryptography.__version__} "
          f"({backend.openssl_version_text()})")
    print(f"# reference: Python ssl / OpenSSL {server.openssl_version} server "
          f"(asyncio create_server(ssl=...), Python {sys.version.split()[0]})")
    print(f"# key {args.key_type}, {CIPHER_SUITE}, x25519, no tickets; {total} handshakes per server in "
          f"{args.rounds} interleaved rounds, {args.concurrency} client threads; "
          f"bulk {mb} MB x {args.bulk_rounds} per server")
    print(f"# TLS 1.2 (tls12_*): client maximum_version TLSv1_2, {tls12_suite(args.key_type)[0]}, x25519, "
          f"extended master secret, no tickets; {total} handshakes per server in the same interleaved rounds")
    if args.profile:
        print(f"# PROFILED: engine figures include cProfile's overhead; stats in {args.profile}")
    print(f"# upload (client to server, what an MX mostly does): engine/openssl MB/s "
          f"x{up_mb_per_s['engine'] / up_mb_per_s['openssl']:.2f}, server CPU per MB "
          f"x{up_cpu_ms_per_mb['engine'] / up_cpu_ms_per_mb['openssl']:.2f}")
    print("# per-round handshake_cpu ratios: " + round_ratios("engine", "openssl"))
    print("# per-round handshake_cpu_tls12 ratios: " + round_ratios("tls12_engine", "tls12_openssl"))
    print(f"# above the plain-TCP floor: handshake engine {tls_us['engine']:.0f} us, openssl "
          f"{tls_us['openssl']:.0f} us (x{tls_us['engine'] / tls_us['openssl']:.2f}); bulk engine "
          f"{tls_ms_per_mb['engine']:.2f} ms/MB, openssl {tls_ms_per_mb['openssl']:.2f} ms/MB")
    print(f"# above the plain-TCP floor, TLS 1.2: handshake engine {tls_us['tls12_engine']:.0f} us, openssl "
          f"{tls_us['tls12_openssl']:.0f} us (x{tls_us['tls12_engine'] / tls_us['tls12_openssl']:.2f})")
    for side in ("engine", "openssl", "plain", "tls12_engine", "tls12_openssl"):
        print(f"value {side}_handshake_cpu_us {cpu_us[side]:.0f}")
    for side in ("engine", "openssl"):
        print(f"value {side}_handshakes_per_second {per_second[side]:.0f}")
    for side in ("engine", "openssl"):
        print(f"value {side}_bulk_mb_per_s {mb_per_s[side]:.0f}")
    for side in ("engine", "openssl", "plain"):
        print(f"value {side}_bulk_cpu_ms_per_mb {cpu_ms_per_mb[side]:.3f}")
    for side in ("engine", "openssl"):
        print(f"value {side}_upload_mb_per_s {up_mb_per_s[side]:.0f}")
    for side in ("engine", "openssl", "plain"):
        print(f"value {side}_upload_cpu_ms_per_mb {up_cpu_ms_per_mb[side]:.3f}")
    print(f"ratio handshake_cpu {cpu_us['engine'] / cpu_us['openssl']:.2f}")
    print(f"ratio handshake_cpu_tls12 {cpu_us['tls12_engine'] / cpu_us['tls12_openssl']:.2f}")
    print(f"ratio handshakes_per_second {per_second['engine'] / per_second['openssl']:.2f}")
    print(f"ratio bulk_throughput {mb_per_s['engine'] / mb_per_s['openssl']:.2f}")
    print("# targets: handshake_cpu <= 1.5, handshake_cpu_tls12 <= 1.5, bulk_throughput >= 0.5")
    print(f"# elapsed {elapsed:.1f} s")


def print_profiles(directory: Path, per: dict[str, tuple[float, str]], top: int = 15) -> None:
    import pstats

    for name, (count, unit) in per.items():
        path = directory / f"engine-{name}.pstats"
        entries = sorted(pstats.Stats(str(path)).stats.items(), key=lambda item: -item[1][2])[:top]
        print(f"# profile {path}: own time per {unit} (profiled), top {top}")
        for (file, line, function), (_, calls, own, _, _) in entries:
            where = function if file == "~" else f"{Path(file).name}:{line}({function})"
            print(f"#   {own / count * 1e6:9.1f} us {calls / count:8.1f} calls  {where}")


def main(argv=None) -> None:
    from tests.pki import KEY_TYPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--handshakes", type=int, default=2000,
                        help="full handshakes per server and TLS version, all rounds together")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved handshake rounds per server")
    parser.add_argument("--bulk-mb", type=int, default=25, help="body size of each bulk transfer, in MB (10^6 bytes)")
    parser.add_argument("--bulk-rounds", type=int, default=7, help="interleaved bulk transfers per server")
    parser.add_argument("--key-type", choices=KEY_TYPES, default="ecdsa-p256")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads making connections")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="cProfile the engine's rounds into DIR")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pki", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args)
        return
    if not 1 <= args.rounds <= args.handshakes <= 100_000:
        parser.error("need 1 <= --rounds <= --handshakes <= 100000")
    if not 1 <= args.bulk_mb <= 2000 or not 1 <= args.bulk_rounds <= 100:
        parser.error("--bulk-mb must be 1..2000 and --bulk-rounds 1..100")
    if not 1 <= args.concurrency <= 64:
        parser.error("--concurrency must be 1..64")
    run(args)


if __name__ == "__main__":
    main()
