#!/usr/bin/env python3
"""The key oracle's cost: signatures per second through it, and the handshake latency it adds.

What runs
    A temporary keystore with one key of `--key-type` (the test PKI's, via
    tests/pki.py and tests/oracle_home.py) and `yestls oracle serve` with
    `--signers` signing processes, on loopback, rate limit out of the way.

    Throughput. This process opens one authenticated connection to the oracle
    (relay.oracle.client.OracleLink: hello, auth with the edge identity) and
    keeps `--in-flight` (64) sign requests in flight on it, each answered
    request replaced at once by the next. The requests are built beforehand
    from real handshakes (the engine and Python's ssl in memory,
    tests/memory.py), so the client's work per request is one frame out, one
    frame in. Rounds alternate with the reference: the same key signing the
    same CertificateVerify contents in this one process, a plain loop of
    `key.sign(content, ec.ECDSA(hashes.SHA256()))` (for other key types the
    scheme's own call: RSA-PSS with a digest-length salt, Ed25519). Around the
    oracle rounds the CPU time of every process (this client, the oracle's
    front, its signing processes) is read from /proc, to show where a
    signature's cost goes.

    Added handshake latency. Two `yestls tls-serve` processes with the same
    chain, no session tickets: one `--oracle` (signing through the oracle
    above, as the edge does), one `--cert/--key` (LocalKeySigner, the key in
    process). A Python ssl client makes `--handshakes` sequential full
    handshakes with each, interleaved one by one (oracle, local, local,
    oracle, ... so neither is always first), timing connect() to the end of
    do_handshake(): for TLS 1.3 that spans the server's flight, which waits
    for the signature.

    How the latency is reduced: the headline `oracle_added_latency_pXX_ms` is
    the percentile of the oracle handshakes minus the same percentile of the
    local ones (pXX(oracle) - pXX(local)), over the interleaved samples. The
    distribution of per-pair differences (oracle_i - local_i) was considered
    and is printed too, as a comment: for the median the two agree, but a
    pair's two handshakes have independent noise, so the p99 of differences
    measures the spread of (noise_oracle - noise_local) as much as the oracle:
    two identical servers would show a positive "added p99" of about
    sqrt(2) x 2.3 sigma. What a sender sees is the quantile shift: its 99th
    percentile handshake finishes that much later. Interleaving keeps the
    drift of the machine (other processes, frequency) out of the shift.

What it prints
    `# ...` lines: the reference, the settings, per-round ratios (to judge
    noise), CPU per signature by process, latency details.
    `value raw_sign_rate` / `value oracle_sign_rate`: signatures per second.
    `ratio oracle_sign_rate`: oracle / raw; target >= 0.85 for ECDSA P-256.
    `value oracle_added_latency_p50_ms` / `_p99_ms`: target p99 <= 2 ms.

    The machine matters: the reference uses one core, the oracle path uses
    this client, the front and the signing processes at once. On a 2-core
    machine they share two cores.

Run it
    .venv/bin/python bench/oracle.py [--key-type ecdsa-p256|ecdsa-p384|rsa-2048|ed25519]
        [--signers N] [--in-flight 64] [--seconds 2] [--rounds 3] [--handshakes 1000]
        [--profile DIR]
    `--profile DIR` profiles the oracle's front and signing processes
    (cProfile counting CPU time, started and stopped by signals through a
    sitecustomize hook given to the oracle only) during one extra throughput
    round after the measured ones, writes DIR/{front,signer}-PID.pstats and
    prints each role's top functions by own CPU time per signature. The
    profiler slows them several-fold; read the shares, not the absolutes.
"""

import argparse
import asyncio
import itertools
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SERVER_NAME = "mx.example.org"
PEER_OPTIONS = "rate = 1000000000.0\nburst = 1000000000\nmax_in_flight = 1024\n"
TRANSCRIPTS = 64               # distinct real handshakes the requests cycle through
WARMUP_SECONDS = 0.3           # of each oracle round, not counted
LATENCY_WARMUP = 50            # handshakes per server before the measured ones
SOCKET_TIMEOUT = 10.0          # every client socket operation
START_TIMEOUT = 20.0           # a subprocess must be listening within this
CALL_TIMEOUT = 30.0            # an oracle round must end within its length plus this


# --- setup ------------------------------------------------------------------------------------------

def raw_signer(key, scheme):
    """The reference: one `cryptography` call per signature, its arguments built once."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    from relay.tls import SignatureScheme

    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = ec.ECDSA({SignatureScheme.ECDSA_SECP256R1_SHA256: hashes.SHA256,
                              SignatureScheme.ECDSA_SECP384R1_SHA384: hashes.SHA384}[scheme]())
        return lambda content: key.sign(content, algorithm)
    if isinstance(key, rsa.RSAPrivateKey):
        hash_cls = {SignatureScheme.RSA_PSS_RSAE_SHA256: hashes.SHA256, SignatureScheme.RSA_PSS_RSAE_SHA384: hashes.SHA384,
                    SignatureScheme.RSA_PSS_RSAE_SHA512: hashes.SHA512}[scheme]
        pss, digest = padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=hash_cls.digest_size), hash_cls()
        return lambda content: key.sign(content, pss, digest)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign
    raise SystemExit(f"no reference signer for {type(key).__name__}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    children.append(int(entry.name))
            except OSError:
                pass
    return children


# --- throughput ---------------------------------------------------------------------------------

def raw_round(sign, contents: list[bytes], seconds: float) -> tuple[int, float]:
    """(signatures, seconds) of a plain signing loop."""
    count = 0
    cycle = itertools.cycle(contents)
    start = time.perf_counter()
    end = start + seconds
    while True:
        for _ in range(32):
            sign(next(cycle))
        count += 32
        now = time.perf_counter()
        if now >= end:
            return count, now - start


async def oracle_round(connection, frames: list[tuple[dict, bytes]], seconds: float,
                       in_flight: int) -> tuple[int, float, int]:
    """(signatures counted, seconds counted, all answered) with `in_flight` requests outstanding on one connection.

    Completions in the first WARMUP_SECONDS are not counted; requests stop
    being replaced after `seconds`, and the round ends when all are answered.
    """
    loop = asyncio.get_running_loop()
    cycle = itertools.cycle(frames)
    start = loop.time()
    counted_from, end = start + WARMUP_SECONDS, start + seconds
    state = {"outstanding": 0, "counted": 0, "answered": 0, "errors": []}
    finished = loop.create_future()

    def issue() -> None:
        params, tail = next(cycle)
        state["outstanding"] += 1
        connection.call_nowait("sign", params, tail).add_done_callback(answered)

    def answered(future) -> None:
        state["outstanding"] -= 1
        now = loop.time()
        if future.cancelled() or future.exception() is not None:
            state["errors"].append(repr(future.exception()) if not future.cancelled() else "cancelled")
        else:
            state["answered"] += 1
            state["counted"] += counted_from <= now <= end
        if now < end and not state["errors"]:
            issue()
        elif state["outstanding"] == 0 and not finished.done():
            finished.set_result(None)

    for _ in range(in_flight):
        issue()
    await asyncio.wait_for(finished, seconds + CALL_TIMEOUT)
    if state["errors"]:
        raise RuntimeError(f"oracle answered with errors: {state['errors'][:3]}")
    return state["counted"], end - counted_from, state["answered"]


def per_call_us(function, items: list, seconds: float = 0.3) -> float:
    """Mean microseconds of function(item), cycling over `items` for about `seconds`."""
    count, cycle = 0, itertools.cycle(items)
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(16):
            function(next(cycle))
        count += 16
    return elapsed / count * 1e6


def signer_stages(home, frames: list[tuple[dict, bytes]]) -> dict[str, float]:
    """What a signing process does per request, timed here without its socket: where its CPU goes."""
    from relay.oracle import policy, signer
    from relay.oracle.keystore import Keystore
    from relay.rpc import FrameDecoder, Kind, encode_frame
    from relay.tls import signing

    keys = signer.SignerKeys(Keystore(home.keystore))
    keys.reload()
    entry = keys.by_id[frames[0][0]["key_id"]]
    scheme = frames[0][0]["scheme"]
    wire = [encode_frame(Kind.REQUEST, i + 1, {"method": "sign", **params}, tail)
            for i, (params, tail) in enumerate(frames)]
    decoded = [FrameDecoder(signer.MAX_FRAME).feed(frame)[0] for frame in wire]
    approved = [policy.check_certificate_verify(tail, scheme, entry.chain) for _, tail in frames]
    return {
        "decode frame": per_call_us(lambda frame: FrameDecoder(signer.MAX_FRAME).feed(frame), wire),
        "policy check": per_call_us(lambda item: policy.check_certificate_verify(item[1], scheme, entry.chain), frames),
        "sign": per_call_us(lambda a: signing.sign(entry.private_key, a.scheme, a.content), approved),
        "answer (all but I/O)": per_call_us(lambda frame: signer.answer(frame, keys), decoded),
    }


async def measure_throughput(args, home, oracle_pid: int, requests, key) -> dict:
    from relay.oracle.client import OracleLink
    from relay.oracle.keystore import key_id
    from relay.tls.signing import verify

    link = OracleLink("127.0.0.1", home.port, home.identity, ping_interval=3600.0)
    link.start()
    try:
        await asyncio.wait_for(link.ready.wait(), START_TIMEOUT)
        kid = key_id(key.public_key())
        frames = [({"key_id": kid, "scheme": int(r.scheme)}, b"".join(r.handshake_messages)) for r in requests]
        # The oracle's answers are real signatures over what the engine asked for.
        for request, (params, tail) in zip(requests[:4], frames):
            answer = await link.connection.call("sign", params, tail, timeout=CALL_TIMEOUT)
            if not verify(request.certificate.public_key, request.scheme, request.content, answer.tail):
                raise RuntimeError("the oracle's signature does not verify")
        signers = child_pids(oracle_pid)
        sign = raw_signer(key, requests[0].scheme)
        contents = [r.content for r in requests]
        raw, oracle = [], []
        cpu = Counter()
        answered, wall = 0, 0.0
        for _ in range(args.rounds):
            raw.append(raw_round(sign, contents, args.seconds))
            before = {"client": time.process_time(), "front": cpu_seconds(oracle_pid),
                      **{f"signer {pid}": cpu_seconds(pid) for pid in signers}}
            round_started = time.perf_counter()
            counted, seconds, total = await oracle_round(link.connection, frames, args.seconds + WARMUP_SECONDS,
                                                         args.in_flight)
            oracle.append((counted, seconds))
            answered += total
            wall += time.perf_counter() - round_started
            after = {"client": time.process_time(), "front": cpu_seconds(oracle_pid),
                     **{f"signer {pid}": cpu_seconds(pid) for pid in signers}}
            for name in before:
                cpu[name] += after[name] - before[name]
        stages = signer_stages(home, frames)
        profile = None
        if args.profile:
            profile = await profile_round(args, link.connection, frames, oracle_pid, signers)
        return dict(raw=raw, oracle=oracle, cpu=dict(cpu), answered=answered, wall=wall, signers=signers,
                    stages=stages, profile=profile)
    finally:
        await link.close()


# --- profiling (cProfile on the CPU clock, inside the oracle's processes) ----------------------------

# Put on PYTHONPATH for the oracle only: every Python process it starts (the front and the signing
# processes, which inherit its environment) imports this at start-up. SIGUSR1 starts a profiler that
# counts CPU time (time.process_time), not wall time, so waiting for the other processes is not
# charged; SIGUSR2 stops it and writes DIR/<role>-<pid>.pstats. Without the signals it costs nothing.
PROFILE_HOOK = """\
import os, signal, sys

_directory = os.environ.get("YESTLS_BENCH_PROFILE_DIR")
_argv = " ".join(getattr(sys, "orig_argv", []))
_role = "front" if "relay.cli" in _argv else "signer" if "relay.oracle.signer" in _argv else None
if _directory and _role:
    import cProfile, time

    _profile = cProfile.Profile(time.process_time)

    def _start(signum, frame):
        _profile.enable()

    def _stop(signum, frame):
        _profile.disable()
        path = os.path.join(_directory, f"{_role}-{os.getpid()}.pstats")
        _profile.dump_stats(path + ".part")
        os.rename(path + ".part", path)

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
"""


def install_profile_hook(directory: Path, profile_dir: Path) -> None:
    """Make the oracle started next carry PROFILE_HOOK (start_oracle passes os.environ on)."""
    hook = directory / "profile-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PROFILE_HOOK)
    profile_dir.mkdir(parents=True, exist_ok=True)
    for old in profile_dir.glob("*.pstats"):
        old.unlink()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    os.environ["YESTLS_BENCH_PROFILE_DIR"] = str(profile_dir.resolve())


async def profile_round(args, connection, frames, oracle_pid: int, signers: list[int]) -> dict:
    """An extra throughput round with the oracle's processes profiled; not part of the reported rates."""
    pids = {"front": [oracle_pid], "signer": signers}
    every = [pid for group in pids.values() for pid in group]
    for pid in every:
        os.kill(pid, signal.SIGUSR1)
    await asyncio.sleep(0.1)
    counted, _, answered = await oracle_round(connection, frames, args.seconds + WARMUP_SECONDS, args.in_flight)
    for pid in every:
        os.kill(pid, signal.SIGUSR2)
    paths = {role: [args.profile / f"{role}-{pid}.pstats" for pid in group] for role, group in pids.items()}
    deadline = time.monotonic() + 30
    while not all(path.exists() for group in paths.values() for path in group):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the oracle's processes wrote no profile into {args.profile}")
        await asyncio.sleep(0.05)
    return {"answered": answered, "paths": paths}


def print_profile(role: str, paths: list[Path], signatures: int, top: int = 16) -> None:
    """The functions with the most own CPU time per signature, over all of a role's processes."""
    import pstats

    stats = pstats.Stats(*map(str, paths))
    total = sum(entry[2] for entry in stats.stats.values())
    print(f"# profile {role} ({len(paths)} process{'es' if len(paths) > 1 else ''}): "
          f"{total / signatures * 1e6:.0f} us CPU per signature (profiled); per signature, top {top} by own time:")
    print("#   own us  share  with callees us  calls  function")
    entries = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]
    for (file, line, function), (_, calls, own, cumulative, _) in entries:
        where = function if file == "~" else f"{Path(file).name}:{line}({function})"
        print(f"#   {own / signatures * 1e6:6.1f} {100 * own / total:5.1f}% {cumulative / signatures * 1e6:10.1f}"
              f" {calls / signatures:9.2f}  {where}")


# --- handshake latency -------------------------------------------------------------------------------

def start_tls_serve(directory: Path, name: str, *options) -> tuple[subprocess.Popen, int]:
    """`yestls tls-serve ... --tickets 0` on a free loopback port, logging to a file; (process, port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = directory / f"tls-serve-{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "yestls"), "tls-serve", "--listen", f"127.0.0.1:{port}",
             "--tickets", "0", *map(str, options)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if "tls-serve listening on" in log_path.read_text():
            return process, port
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    process.wait(5)
    raise RuntimeError(f"tls-serve {name} did not start:\n{log_path.read_text()}")


def handshake_seconds(context: ssl.SSLContext, port: int) -> float:
    """Seconds from connect() to the end of the handshake; then a close_notify exchange, not timed, so the
    server has finished with this connection before the next one starts."""
    start = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    try:
        # Without it the close_notify waits, by Nagle's rule, for the ACK the server delays by 40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = context.wrap_socket(sock, server_hostname=SERVER_NAME)  # the handshake, to our Finished
        elapsed = time.perf_counter() - start
        plain = tls.unwrap()  # our close_notify, then the server's
        if plain.recv(1) != b"":
            raise RuntimeError("tls-serve sent data after its close_notify")
        plain.close()
    finally:
        sock.close()
    return elapsed


def measure_latency(args, directory: Path, pki, home) -> dict:
    leaf = pki.leaves[args.key_type]
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    servers = []
    try:
        servers.append(start_tls_serve(directory, "oracle", "--oracle", f"127.0.0.1:{home.port}",
                                       "--identity-key", home.identity_path))
        servers.append(start_tls_serve(directory, "local", "--cert", leaf.chain_pem, "--key", leaf.key_pem))
        (_, oracle_port), (_, local_port) = servers
        for _ in range(LATENCY_WARMUP):
            handshake_seconds(context, oracle_port)
            handshake_seconds(context, local_port)
        oracle, local = [], []
        for i in range(args.handshakes):
            if i % 2:
                local.append(handshake_seconds(context, local_port))
                oracle.append(handshake_seconds(context, oracle_port))
            else:
                oracle.append(handshake_seconds(context, oracle_port))
                local.append(handshake_seconds(context, local_port))
    finally:
        for process, _ in servers:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
    return dict(oracle=oracle, local=local)


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- the run ---------------------------------------------------------------------------------------

def run(args) -> None:
    from tests.memory import signature_requests
    from tests.oracle_home import make_oracle_home, start_oracle
    from tests.pki import make_pki

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="yestls-bench-oracle-") as tmp:
        tmp = Path(tmp)
        pki = make_pki(tmp / "pki", key_types=(args.key_type,))
        home = make_oracle_home(tmp / "home", pki, (args.key_type,), signers=args.signers, peer_options=PEER_OPTIONS)
        key = pki.leaves[args.key_type].key
        requests = signature_requests(pki, args.key_type, TRANSCRIPTS)
        if args.profile:
            install_profile_hook(tmp, args.profile)
        oracle = start_oracle(home)
        try:
            throughput = asyncio.run(measure_throughput(args, home, oracle.process.pid, requests, key))
            latency = measure_latency(args, tmp, pki, home)
            audited = sum(1 for line in home.audit_lines() if line.get("outcome") == "signed")
        finally:
            oracle.stop()  # SIGTERM: it stops its signing processes
    report(args, throughput, latency, audited, time.perf_counter() - started)


def report(args, t: dict, lat: dict, audited: int, elapsed: float) -> None:
    import cryptography
    from cryptography.hazmat.backends.openssl import backend

    raw_rate = sum(n for n, _ in t["raw"]) / sum(s for _, s in t["raw"])
    oracle_rate = sum(n for n, _ in t["oracle"]) / sum(s for _, s in t["oracle"])
    round_ratios = [(o / os_) / (r / rs) for (o, os_), (r, rs) in zip(t["oracle"], t["raw"])]
    print("# YesTLS key oracle benchmark: signatures through `yestls oracle serve`, and the handshake latency added")
    print(f"# reference: raw `cryptography` {cryptography.__version__} ({backend.openssl_version_text()}) signing "
          f"of the same key and contents in one process (Python {sys.version.split()[0]}), a plain key.sign() loop")
    print(f"# key {args.key_type}, signers {args.signers}, {args.in_flight} in flight on one authenticated "
          f"connection, {args.rounds} interleaved rounds of {args.seconds:g} s; {os.cpu_count()} CPUs")
    print("# per-round oracle/raw ratios: " + " ".join(f"{x:.2f}" for x in round_ratios))
    per = {name: seconds / t["answered"] * 1e6 for name, seconds in t["cpu"].items()}
    signer_us = sum(v for k, v in per.items() if k.startswith("signer"))
    print(f"# CPU per signature through the oracle: client {per['client']:.0f} us, front {per['front']:.0f} us, "
          f"signing processes {signer_us:.0f} us ({', '.join(f'{v:.0f}' for k, v in per.items() if k.startswith('signer'))}); "
          f"raw signing {1e6 / raw_rate:.0f} us")
    print(f"# CPU busy during the oracle rounds: {sum(t['cpu'].values()) / t['wall']:.2f} of {os.cpu_count()} cores "
          f"(client, front and signing processes together)")
    print("# a signing process's work per request, timed in this process without sockets: "
          + ", ".join(f"{name} {us:.0f} us" for name, us in t["stages"].items()))
    print(f"value raw_sign_rate {raw_rate:.0f}")
    print(f"value oracle_sign_rate {oracle_rate:.0f}")
    print(f"ratio oracle_sign_rate {oracle_rate / raw_rate:.2f}")

    o, loc = lat["oracle"], lat["local"]
    diffs = [a - b for a, b in zip(o, loc)]
    ms = 1e3
    print(f"# handshakes: {len(o)} per server, sequential, interleaved; Python ssl client, loopback, no tickets")
    for p in (50, 90, 99):
        print(f"# p{p}: oracle {percentile(o, p) * ms:.2f} ms, local {percentile(loc, p) * ms:.2f} ms, "
              f"shift {(percentile(o, p) - percentile(loc, p)) * ms:.2f} ms; per-pair difference "
              f"p{p} {percentile(diffs, p) * ms:.2f} ms")
    print(f"# max: oracle {max(o) * ms:.2f} ms, local {max(loc) * ms:.2f} ms; oracle signed {audited} in all (audit log)")
    print(f"value oracle_handshake_p50_ms {percentile(o, 50) * ms:.2f}")
    print(f"value local_handshake_p50_ms {percentile(loc, 50) * ms:.2f}")
    print(f"value oracle_handshake_p99_ms {percentile(o, 99) * ms:.2f}")
    print(f"value local_handshake_p99_ms {percentile(loc, 99) * ms:.2f}")
    print(f"value oracle_added_latency_p50_ms {(percentile(o, 50) - percentile(loc, 50)) * ms:.2f}")
    print(f"value oracle_added_latency_p99_ms {(percentile(o, 99) - percentile(loc, 99)) * ms:.2f}")
    print("# targets: oracle_sign_rate >= 0.85 (ECDSA P-256), oracle_added_latency_p99_ms <= 2")
    if t["profile"]:
        print(f"# PROFILED: an extra round after the measured ones, {t['profile']['answered']} signatures")
        for role, paths in t["profile"]["paths"].items():
            print_profile(role, paths, t["profile"]["answered"])
    print(f"# elapsed {elapsed:.1f} s")


def main(argv=None) -> None:
    from tests.pki import KEY_TYPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--key-type", choices=KEY_TYPES, default="ecdsa-p256")
    parser.add_argument("--signers", type=int, default=min(os.cpu_count() or 1, 4),
                        help="the oracle's signing processes (default: the oracle's own default, %(default)s here)")
    parser.add_argument("--in-flight", type=int, default=64, help="sign requests outstanding on the connection")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds per side")
    parser.add_argument("--handshakes", type=int, default=1000, help="measured handshakes per server (latency)")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="cProfile the oracle's processes into DIR")
    args = parser.parse_args(argv)
    if not 1 <= args.signers <= 64:
        parser.error("--signers must be 1..64")
    if not 1 <= args.in_flight <= 1024:
        parser.error("--in-flight must be 1..1024")
    if not 0.5 <= args.seconds <= 60 or not 1 <= args.rounds <= 20:
        parser.error("--seconds must be 0.5..60 and --rounds 1..20")
    if not 100 <= args.handshakes <= 100_000:
        parser.error("--handshakes must be 100..100000")
    run(args)


if __name__ == "__main__":
    main()
