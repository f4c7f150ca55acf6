#!/usr/bin/env python3
"""Messages per second the edge accepts, against Postfix on the same machine, new connection per message.

What runs
    The edge: `yestls edge serve` with its own key oracle (`yestls oracle
    serve`, one signing process), both started here on loopback with a
    temporary PKI, keystore and home spool key (tests/pki.py,
    tests/oracle_home.py, tests/edge_site.py). The oracle's per-peer rate
    limit (50 signatures/s by default) is lifted, and the edge's connection
    caps are raised to 2000 (per IP too: all load comes from 127.0.0.1), and
    its spool caps out of the way; everything else is the edge's defaults:
    ECDSA P-256 certificate, sealing to the default ML-KEM-768+X25519 suite,
    an INFO log line per message. The oracle, at home in real life, shares
    this machine's cores here.

    The reference: Postfix from Debian (its version is printed), a private
    instance started here with `postfix -c DIR start`: its own main.cf and
    master.cf, queue_directory and data_directory in a temporary directory,
    smtpd on a free loopback port only, no chroot, a log file through
    postlogd (as the edge logs to a file). It is an MX for example.org that
    only queues:
      - `relay_domains = example.org`, `mydestination =` (no local
        delivery), `smtpd_relay_restrictions = reject_unauth_destination`:
        it takes mail for example.org and nothing else, as the edge does;
      - `smtpd_recipient_restrictions = check_recipient_access
        inline:{example.org=HOLD}, permit`: every accepted message goes
        straight to the `hold` queue. Chosen over the alternatives because
        it is the only one where Postfix does exactly the edge's work and no
        more: cleanup(8) writes the queue file, renames it into hold/,
        fsyncs it and only then lets smtpd answer 250 (mail_stream.c), and
        nothing ever picks it up: no qmgr pass, no delivery attempt, no
        defer logs (`defer_transports`, a relay to an unreachable host or
        `default_transport = error:` would all make qmgr and a delivery
        agent work on every message while the benchmark runs, and bounces
        would add messages). `defer_transports = smtp relay` is set as well,
        so a message that somehow left hold/ would still stay queued;
      - the same durability: the queue file is fsync'd before the 250.
        Postfix does not fsync the queue directory after the rename (it
        relies on the file system); the edge does that too (group commit),
        so the edge does slightly more, never less;
      - TLS: the same test CA's ECDSA P-256 certificate for mx.example.org
        (`smtpd_tls_chain_files`), `smtpd_tls_security_level = may`, and a
        Received header with the TLS details (`smtpd_tls_received_header`),
        as the edge writes;
      - what would not be comparable is off: `smtpd_peername_lookup = no`
        (the edge does no DNS; this machine has no resolver), no DNS in the
        SMTP client, and `in_flow_delay = 0` (Postfix would otherwise pause
        up to 1 s per message once arrivals outrun deliveries, which here
        are zero by design).

    The load generator: one separate process (this file with --generator),
    a lean raw SMTP client in `--concurrency` threads (blocking sockets,
    Python's ssl, i.e. OpenSSL; leaner per connection than asyncio's TLS, so
    it leaves the servers more of the machine), the same for both servers.
    Each message is a new TCP connection: greeting, EHLO,
    [STARTTLS, a full TLS 1.3 handshake verified against the test CA, EHLO,]
    then MAIL, RCPT and DATA pipelined as a sending MTA does (RFC 2920;
    `--no-pipelining` sends them one by one), the 10 KiB message (one
    recipient), QUIT, close. A message counts when its DATA got a 250 inside
    the measured window of a round (after `--warmup` seconds).

    Rounds are interleaved in one run (for each round: plain then STARTTLS;
    within each, edge then Postfix, the order swapped every round), so the
    machine's noise falls on both. Around every round the CPU time of each
    side's processes is read from /proc (Postfix: its master and all its
    children, reaped ones included; the edge: its processes and the
    oracle's, split into the supervisor (with several workers: the spool's
    owner, its desk and its commits), the SMTP workers, the key makers and
    the oracle; the generator: its own).

    At the end the queues are counted: the edge's queue/ and Postfix's hold/
    must hold exactly as many files as messages got a 250.

What it prints
    `# ...` lines: the reference's version, the settings, per-round rates,
    CPU per message by side, the queue check.
    `value smtp_accept_<mode>_<server>_msgs_per_s`: messages accepted per
    second over all rounds (mode plain or starttls; server edge or postfix).
    `ratio smtp_accept_plain` and `ratio smtp_accept_starttls`: the edge's
    rate divided by Postfix's; the target is >= 1.0.
    With `--verdict`: a third server, the same edge with `[verdict]` (its
    defaults: budget 3 s, max_size 1 MiB) and a home judge played here (a
    thread of this process) that answers "no action" at once, with a real
    token (relay.home.spam.seal_verdict), over a real spool connection
    (`--concurrency` verdict_wait calls open: the judge is not the
    bottleneck; rspamd's own time is not in it). Then also
    `value smtp_accept_<mode>_edge_verdict_msgs_per_s`, `ratio
    smtp_accept_<mode>_verdict` (that edge's rate over Postfix's), and
    `value edge_verdict_added_ms_p50` / `_p99`: the before-queue round trip
    the edge logs for each verdict (from the end of DATA to home's answer),
    over every message of the verdict rounds.
    With `--floor` (plain only): bench/smtp_floor.py as one more server, a
    minimal asyncio session over the edge's real spool (sealing, keys made
    ahead, fsync and group commit), in `--workers` processes; `ratio
    smtp_accept_plain_floor` is its rate over Postfix's: about the most a
    leaner session in Python could reach, so the distance from it to
    `ratio smtp_accept_plain` is what the edge's session layers cost.

    `value edge_rss_kib_per_idle_session` and `..._idle_tls_session`
    (before the rounds, `--idle-sessions` 1000 by default, 0 skips them):
    the edge's resident memory (VmRSS) grown per idle session with that many
    sessions held open at once, each after EHLO (and STARTTLS and EHLO
    again for the TLS one), on a fresh edge of its own for each (memory
    freed by earlier sessions would hide the growth); the target is <= 50.

    On a 2-core machine the generator, the servers (and the edge's oracle)
    share two cores: read the CPU-per-message lines along with the rates.

Run it
    make bench-smtp (installs Postfix as root when it is missing), or
    .venv/bin/python bench/smtp.py [--rounds 3] [--seconds 4] [--warmup 0.5]
        [--concurrency 16] [--modes plain,starttls] [--no-pipelining] [--verdict] [--floor] [--profile DIR]
        [--idle-sessions 1000] [--workers N]
    `--workers N`: the edge's `[smtp] workers` (default: one per core; the
    `--verdict` edge runs with one). Client k sends from 127.0.k.1 (a /24 of
    its own, for both servers), so a multi-process edge spreads them over
    its workers; the CPU and RSS counted are the edge's whole process tree.
    `--profile DIR` (with `--workers 1`): after the measured rounds, one more round on the edge in
    the last mode of --modes with cProfile running in the edge process (CPU time per thread,
    the event loop's thread and the sealing threads), written to
    DIR/edge-*.pstats, and the top functions printed. The profiler slows
    the edge several-fold: read the shares, not the absolute times.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SERVER_NAME = "mx.example.org"
MESSAGE_SIZE = 10 * 1024
POSTFIX = Path("/usr/sbin/postfix")
POSTCONF = Path("/usr/sbin/postconf")
STEP_TIMEOUT = 10.0            # every client read, connect and handshake
START_TIMEOUT = 30.0           # a server must listen within this
ROUND_GRACE = 30.0             # a round must end within its length plus this
ORACLE_PEER_OPTIONS = "rate = 1000000000.0\nburst = 1000000000\nmax_in_flight = 1024\n"
EDGE_SMTP_OPTIONS = "max_connections = 2000\nmax_connections_per_ip = 2000\n"
EDGE_SPOOL_OPTIONS = "max_bytes = 1099511627776\nmax_files = 100000000\n"


# --- the load generator (a separate process) --------------------------------------------------------

def bench_message(size: int) -> bytes:
    """A message of exactly `size` bytes (CRLF lines, none starting with a dot), then DATA's end."""
    head = (b"From: <bench@sender.test>\r\nTo: <user@example.org>\r\nSubject: YesTLS SMTP benchmark\r\n"
            b"Message-ID: <bench@sender.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, 0123456789 times; then it rests.\r\n"
    body = bytearray()
    while len(head) + len(body) + len(line) <= size - 2:
        body += line
    body += b"x" * (size - 2 - len(head) - len(body)) + b"\r\n"
    message = head + bytes(body)
    assert len(message) == size
    return message + b".\r\n"


class SMTPReplyError(Exception):
    pass


def expect(replies, code: bytes) -> None:
    """Read one (possibly multi-line) reply; SMTPReplyError unless it has `code`."""
    while True:
        line = replies.readline(1000)
        if not line:
            raise SMTPReplyError(f"connection closed waiting for {code.decode()}")
        if line[:3] != code:
            raise SMTPReplyError(f"wanted {code.decode()}, got {line[:120]!r}")
        if line[3:4] != b"-":
            return


def client_address(number: int) -> str:
    """Client `number`'s loopback source address, a /24 of its own: senders come from many networks (a
    multi-process edge steers each network to one worker; Postfix sees the same addresses)."""
    return f"127.0.{number % 250 + 1}.1"


def deliver(port: int, context: ssl.SSLContext | None, message: bytes, pipelining: bool,
            source: str) -> str | None:
    """One message over one new connection; raises unless its DATA got 250 (QUIT's fate does not change that).

    Returns the TLS version and cipher suite, or None in plaintext.
    """
    connection = open_session(port, context, source)
    replies = connection.makefile("rb")
    try:
        tls = f"{connection.version()} {connection.cipher()[0]}" if context is not None else None
        commands = (b"MAIL FROM:<bench@sender.test> SIZE=%d\r\n" % (len(message) - 3),
                    b"RCPT TO:<user@example.org>\r\n", b"DATA\r\n")
        if pipelining:
            connection.sendall(b"".join(commands))
            for code in (b"250", b"250", b"354"):
                expect(replies, code)
        else:
            for command, code in zip(commands, (b"250", b"250", b"354")):
                connection.sendall(command)
                expect(replies, code)
        connection.sendall(message)
        expect(replies, b"250")
        try:
            connection.sendall(b"QUIT\r\n")
            expect(replies, b"221")
        except (OSError, SMTPReplyError):
            pass   # accepted all the same
    finally:
        replies.close()
        connection.close()
    return tls


def open_session(port: int, context: ssl.SSLContext | None, source: str) -> socket.socket:
    """A new session from `source` (a loopback address) after EHLO (after STARTTLS, the handshake verified
    against the test CA, and EHLO again with a context): nothing unread is left on it."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT, source_address=(source, 0))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connection = raw
    try:
        with raw.makefile("rb") as replies:
            expect(replies, b"220")
            raw.sendall(b"EHLO client.sender.test\r\n")
            expect(replies, b"250")
            if context is None:
                return raw
            raw.sendall(b"STARTTLS\r\n")
            expect(replies, b"220")   # nothing follows it before our ClientHello: no buffered bytes lost
        connection = context.wrap_socket(raw, server_hostname=SERVER_NAME)
        with connection.makefile("rb") as replies:
            connection.sendall(b"EHLO client.sender.test\r\n")
            expect(replies, b"250")
        return connection
    except BaseException:
        connection.close()
        raise


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def idle_rss(directory: Path, pki, sessions: int, tls: bool, workers: int) -> dict:
    """The edge's resident memory per idle session: `sessions` held open at once, on an edge of its own.

    A fresh edge (memory freed by earlier sessions would hide the growth); a
    few sessions are opened and closed first so one-time allocations (the
    first session's imports and caches) are not counted; then RSS is read
    before and with all `sessions` held, after each was answered.
    """
    edge = EdgeUnderTest(directory, pki, None, workers=workers)
    try:
        return _held_rss(edge, str(pki.ca_pem), sessions, tls)
    finally:
        edge.stop()


def _held_rss(edge: "EdgeUnderTest", cafile: str, sessions: int, tls: bool) -> dict:
    context = ssl.create_default_context(cafile=cafile) if tls else None
    pid = edge.edge.process.pid
    for number in range(20):
        open_session(edge.port, context, client_address(number)).close()
    time.sleep(0.5)
    before = tree_rss_kib(pid)
    held = []
    try:
        for _ in range(sessions):
            held.append(open_session(edge.port, context, client_address(len(held))))
        time.sleep(0.5)
        after = tree_rss_kib(pid)
    finally:
        for connection in held:
            connection.close()
    return {"sessions": sessions, "tls": tls, "before": before, "after": after,
            "per_session": (after - before) / sessions}


def load_round(port: int, tls: bool, cafile: str, concurrency: int, warmup: float, seconds: float,
               pipelining: bool) -> dict:
    """`concurrency` threads (blocking sockets, Python's ssl), each sending one message per connection
    until the window closes. Threads, not asyncio: asyncio's TLS costs the client a third more CPU per
    connection, CPU the servers share on a small machine."""
    context = ssl.create_default_context(cafile=cafile) if tls else None
    message = bench_message(MESSAGE_SIZE)
    start = time.monotonic()
    counted_from, end = start + warmup, start + warmup + seconds
    lock = threading.Lock()
    state = {"counted": 0, "accepted": 0, "errors": 0, "samples": [], "tls": {}}
    latencies: list[float] = []

    def worker(number: int) -> None:
        while time.monotonic() < end:
            begun = time.monotonic()
            try:
                tls_used = deliver(port, context, message, pipelining, client_address(number))
            except (OSError, SMTPReplyError) as error:   # ssl.SSLError and timeouts are OSErrors
                with lock:
                    if len(state["samples"]) < 5:
                        state["samples"].append(repr(error)[:200])
                    state["errors"] += 1
                time.sleep(0.01)  # a refusing server must not turn this into a busy loop
                continue
            now = time.monotonic()
            with lock:
                state["tls"][str(tls_used)] = state["tls"].get(str(tls_used), 0) + 1
                state["accepted"] += 1
                if counted_from <= now <= end:
                    state["counted"] += 1
                    latencies.append(now - begun)

    cpu = time.process_time()
    threads = [threading.Thread(target=worker, args=(number,), daemon=True) for number in range(concurrency)]
    for thread in threads:
        thread.start()
    deadline = end + ROUND_GRACE
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"load generator threads still busy {ROUND_GRACE:g} s after the round")
    latencies.sort()
    latencies = latencies or [0.0]
    return {**state, "window": seconds, "cpu": time.process_time() - cpu,
            "latency_p50_ms": latencies[len(latencies) // 2] * 1e3,
            "latency_p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3}


def generator_main() -> None:
    """The generator process: one JSON request per stdin line, one JSON result per stdout line."""
    for line in sys.stdin:
        request = json.loads(line)
        result = load_round(**request)
        print(json.dumps(result), flush=True)


class Generator:
    def __init__(self):
        self.process = subprocess.Popen([sys.executable, __file__, "--generator"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def round(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()   # load_round bounds itself; a dead generator gives ""
        if not line:
            raise RuntimeError("the load generator died")
        return json.loads(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


# --- CPU time by process tree ------------------------------------------------------------------------

def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of it and its reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    return table


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot, all cores (/proc/stat; iowait counts as idle)."""
    with open("/proc/stat") as stat:
        fields = [int(f) for f in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def parts_cpu(parts: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds of each part: its processes and their descendants, except those another part names
    (the edge's supervisor without its workers, the workers without their key makers)."""
    table = _processes()
    named = {pid for pids in parts.values() for pid in pids}
    return {part: sum(table[pid][1] for pid in _tree(table, pids, named - set(pids))) for part, pids in parts.items()}


def _descendants(root: int, *markers: str) -> list[list[int]]:
    """For each marker, the live descendants of `root` whose command line contains it."""
    found: list[list[int]] = [[] for _ in markers]
    for pid in _tree(_processes(), [root]) - {root}:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue
        for pids, marker in zip(found, markers):
            if marker.encode() in command:
                pids.append(pid)
    return found


def tree_rss_kib(root: int) -> int:
    """Resident memory of `root` and every live descendant (a multi-process edge: its workers too)."""
    total = 0
    for pid in _tree(_processes(), [root]):
        try:
            total += rss_kib(pid)
        except (OSError, RuntimeError):
            pass   # gone meanwhile, or a zombie
    return total


def _tree(table: dict[int, tuple[int, float]], roots: list[int], stop: set[int] = frozenset()) -> set[int]:
    """`roots` and their descendants, not entering the processes in `stop`."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    todo, seen = list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid in stop or pid not in table:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
    return seen


# --- the edge -----------------------------------------------------------------------------------------

# Given to the edge only (PYTHONPATH): SIGUSR1 starts cProfile in the event loop's thread and in each
# sealing thread (counting that thread's CPU time), SIGUSR2 stops them and writes DIR/edge-<pid>-*.pstats.
PROFILE_HOOK = """\
import os, signal, sys, threading

_directory = os.environ.get("YESTLS_BENCH_PROFILE_DIR")
if _directory and "relay.cli" in " ".join(getattr(sys, "orig_argv", [])):
    import cProfile, functools, time

    _main = cProfile.Profile(time.thread_time)
    _threads = {}
    _on = [False]

    def _patch():
        from relay.spool.store import Spool
        accept = Spool.accept

        @functools.wraps(accept)
        def profiled_accept(self, *args, **kwargs):
            if not _on[0]:
                return accept(self, *args, **kwargs)
            profile = _threads.setdefault(threading.get_ident(), cProfile.Profile(time.thread_time))
            profile.enable()
            try:
                return accept(self, *args, **kwargs)
            finally:
                profile.disable()
        Spool.accept = profiled_accept

    def _start(signum, frame):
        if not _on[0]:
            _patch()
        _on[0] = True
        _main.enable()

    def _stop(signum, frame):
        _main.disable()
        _on[0] = False
        for name, profile in [("loop", _main)] + [(f"seal{i}", p) for i, p in enumerate(_threads.values())]:
            path = os.path.join(_directory, f"edge-{os.getpid()}-{name}.pstats")
            profile.dump_stats(path + ".part")
            os.rename(path + ".part", path)
        open(os.path.join(_directory, "done"), "w").close()

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
"""


class EdgeUnderTest:
    name = "edge"

    def __init__(self, directory: Path, pki, profile_dir: Path | None, verdict: bool = False, workers: int = 1):
        from tests.edge_site import make_edge_site, start_edge
        from tests.oracle_home import start_oracle

        self.site = make_edge_site(directory, pki, smtp_options=EDGE_SMTP_OPTIONS + f"workers = {workers}\n",
                                   spool_options=EDGE_SPOOL_OPTIONS, top_options="[verdict]\n" if verdict else "")
        self.judge: FakeJudge | None = None
        with open(self.site.oracle.config, "a") as config:   # the [[peer]] table is the file's last
            config.write(ORACLE_PEER_OPTIONS)
        self.port = self.site.smtp_port
        self.oracle = start_oracle(self.site.oracle)
        self.edge = None
        saved = dict(os.environ)
        try:
            if profile_dir is not None:
                hook = directory / "profile-hook"
                hook.mkdir()
                (hook / "sitecustomize.py").write_text(PROFILE_HOOK)
                profile_dir.mkdir(parents=True, exist_ok=True)
                for old in list(profile_dir.glob("edge-*.pstats")) + list(profile_dir.glob("done")):
                    old.unlink()
                os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
                os.environ["YESTLS_BENCH_PROFILE_DIR"] = str(profile_dir.resolve())
            self.edge = start_edge(self.site, timeout=START_TIMEOUT)
            if verdict:
                self.judge = FakeJudge(self.site.spool_service_port, self.site.home_identity)
        except BaseException:
            self.stop()
            raise
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def parts(self) -> dict[str, list[int]]:
        """The supervisor (with several workers: the spool's owner, its desk and commits), the SMTP workers,
        the key makers (a child of each process that seals), the oracle."""
        supervisor = self.edge.process.pid
        workers, key_makers = _descendants(supervisor, "relay.edge.worker", "relay.spool.keymaker")
        return {"supervisor": [supervisor], "workers": workers, "key makers": key_makers,
                "oracle": [self.oracle.process.pid]}

    def queued(self) -> int:
        return len(self.site.spooled_files())

    def verdict_ms(self) -> list[float]:
        """The before-queue round trip of every verdict the edge logged, in ms."""
        return [float(ms) for ms in VERDICT_LINE.findall(self.edge.log())]

    def stop(self) -> None:
        if self.judge is not None:
            self.judge.stop()
        processes = ([self.edge.process] if self.edge else []) + [self.oracle.process]
        for process in processes:
            if process.poll() is None:
                process.terminate()   # the oracle stops its signing processes
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


VERDICT_LINE = re.compile(r"verdict .+? from home in ([0-9.]+) ms")


class FloorUnderTest:
    """bench/smtp_floor.py in `workers` processes on one port: the edge's spool under a minimal session."""

    name = "floor"

    def __init__(self, directory: Path, workers: int):
        from relay.spool.keys import generate_spool_key
        from tests.oracle_home import free_port

        directory.mkdir(parents=True)
        public_key = generate_spool_key(directory / "spool.key")
        self.port = free_port()
        self.spools = [directory / f"spool-{number}" for number in range(workers)]
        self.processes = []
        try:
            for spool in self.spools:
                self.processes.append(subprocess.Popen(
                    [sys.executable, str(Path(__file__).with_name("smtp_floor.py")), "--port", str(self.port),
                     "--spool", str(spool), "--public-key", public_key], stdout=subprocess.PIPE, text=True))
                if "listening" not in self.processes[-1].stdout.readline():
                    raise RuntimeError("bench/smtp_floor.py did not start")
        except BaseException:
            self.stop()
            raise

    def parts(self) -> dict[str, list[int]]:
        return {"floor": [process.pid for process in self.processes]}

    def queued(self) -> int:
        return sum(len(os.listdir(spool / "queue")) for spool in self.spools)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


class FakeJudge:
    """Home's judge without rspamd: "no action" at once, with a real token, over a real spool connection."""

    def __init__(self, port: int, identity, workers: int = 16):
        import asyncio

        self.asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.stopping = None
        self.ready = threading.Event()
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(port, identity, workers), daemon=True)
        self.thread.start()
        if not self.ready.wait(START_TIMEOUT) or self.failure:
            raise RuntimeError(f"the bench's judge did not connect to the edge: {self.failure}")

    def _run(self, port: int, identity, workers: int) -> None:
        try:
            self.loop.run_until_complete(self._serve(port, identity, workers))
        except BaseException as error:  # noqa: BLE001 - reported by __init__ or stop
            self.failure.append(error)
            self.ready.set()

    async def _serve(self, port: int, identity, workers: int) -> None:
        from relay.home.spam import SpamAction, Verdict, seal_verdict
        from relay.spool.client import SpoolClient

        asyncio = self.asyncio
        key, verdict = os.urandom(32), Verdict(SpamAction.NO_ACTION, 0.0, 15.0)
        self.stopping = asyncio.Event()
        client = SpoolClient("127.0.0.1", port, identity, timeout=STEP_TIMEOUT)
        await client.connect()

        async def worker() -> None:
            while True:
                request = await client.verdict_wait(30)
                if request is not None:
                    await client.verdict_answer(request.id, verdict.action.value,
                                                seal_verdict(key, request.content, verdict))

        tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
        self.ready.set()
        await asyncio.wait([asyncio.ensure_future(self.stopping.wait()), *tasks],
                           return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()

    def stop(self) -> None:
        if self.stopping is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(STEP_TIMEOUT)


# --- Postfix ------------------------------------------------------------------------------------------

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{port} inet n      -       n       -       {smtpd}   smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
# A private Postfix for bench/smtp.py: an MX for example.org that accepts, fsyncs into hold/, and delivers nothing.
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = mx.example.org
mydomain = example.org
myorigin = example.org
mydestination =
relay_domains = example.org
relay_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_banner = $myhostname ESMTP
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
in_flow_delay = 0
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions = check_recipient_access inline:{{ example.org=HOLD }}, permit
defer_transports = smtp relay
smtpd_tls_security_level = may
smtpd_tls_chain_files = {key}, {chain}
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 0
default_process_limit = {processes}
"""


def postfix_version() -> str:
    """"3.7.11 (Debian package 3.7.11-0+deb12u1)"."""
    out = subprocess.run([str(POSTCONF), "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=30)
    package = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "postfix"], capture_output=True, text=True,
                             timeout=30)
    version = out.stdout.strip() or "unknown"
    return f"{version} (Debian package {package.stdout.strip()})" if package.returncode == 0 else version


class PostfixUnderTest:
    name = "postfix"

    def __init__(self, directory: Path, pki, concurrency: int):
        from tests.oracle_home import free_port

        if not POSTFIX.exists():
            raise SystemExit("bench/smtp.py needs Postfix: run `./scripts/install-packages bench` as root "
                             "(or `make bench-smtp`)")
        self.root = directory
        directory.mkdir(parents=True)
        # Postfix's unprivileged processes must reach their directories; its data directory is theirs.
        for path in (directory.parent, directory):
            path.chmod(0o755)
        (directory / "etc").mkdir()
        (directory / "queue").mkdir()
        (directory / "data").mkdir()
        shutil.chown(directory / "data", "postfix")
        leaf = pki.leaves["ecdsa-p256"]
        self.port = free_port()
        (directory / "etc" / "main.cf").write_text(MAIN_CF.format(
            root=directory, key=leaf.key_pem, chain=leaf.chain_pem, processes=max(100, 4 * concurrency)))
        (directory / "etc" / "master.cf").write_text(MASTER_CF.format(port=self.port, smtpd=max(100, 4 * concurrency)))
        self.config = directory / "etc"
        self.master = None
        self._postfix("start")
        try:
            self.master = self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _postfix(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(POSTFIX), "-c", str(self.config), command], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else "(no maillog)"

    def _master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _wait_listening(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            pid = self._master_pid()
            if pid is not None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=2) as probe:
                        probe.settimeout(STEP_TIMEOUT)
                        if probe.recv(100).startswith(b"220"):
                            probe.sendall(b"QUIT\r\n")
                            return pid
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"Postfix did not start listening on 127.0.0.1:{self.port}:\n{self.log()[-3000:]}")

    def parts(self) -> dict[str, list[int]]:
        return {"postfix": [self.master]}

    def queued(self) -> int:
        return sum(1 for path in (self.root / "queue" / "hold").rglob("*") if path.is_file())

    def _our_processes(self) -> list[int]:
        """Processes whose working directory is this instance's queue (every Postfix daemon's)."""
        queue = str(self.root / "queue")
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/cwd").startswith(queue):
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        self._postfix("stop")
        deadline = time.monotonic() + 15
        while self._our_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self._our_processes():   # did not stop: these, by id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- the run ------------------------------------------------------------------------------------------

def measure(args, generator: Generator, servers: dict, cafile: str) -> list[dict]:
    rounds = []
    for number in range(args.rounds):
        for mode in args.modes:
            names = list(servers)
            order = names[number % len(names):] + names[:number % len(names)]
            for name in order:
                server = servers[name]
                before = parts_cpu(server.parts())
                busy_before = machine_busy()
                wall = time.perf_counter()
                result = generator.round(port=server.port, tls=mode == "starttls", cafile=cafile,
                                         concurrency=args.concurrency, warmup=args.warmup, seconds=args.seconds,
                                         pipelining=args.pipelining)
                wall = time.perf_counter() - wall
                busy = machine_busy()
                parts = {part: cpu - before.get(part, 0.0) for part, cpu in parts_cpu(server.parts()).items()}
                rounds.append({"round": number, "mode": mode, "server": name, **result, "parts": parts,
                               "server_cpu": sum(parts.values()), "machine_busy": busy - busy_before,
                               "wall": wall,
                               "rate": result["counted"] / result["window"]})
    return rounds


def profile_edge(args, generator: Generator, edge: EdgeUnderTest, cafile: str) -> dict:
    pid = edge.edge.process.pid
    os.kill(pid, signal.SIGUSR1)
    time.sleep(0.2)
    result = generator.round(port=edge.port, tls=args.modes[-1] == "starttls", cafile=cafile,
                             concurrency=args.concurrency, warmup=0.0, seconds=args.seconds, pipelining=args.pipelining)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not (args.profile / "done").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the edge wrote no profile into {args.profile}")
        time.sleep(0.05)
    return {"accepted": result["accepted"], "mode": args.modes[-1],
            "paths": sorted(args.profile.glob(f"edge-{pid}-*.pstats"))}


def print_profile(profile: dict, top: int = 30) -> None:
    import pstats

    paths = profile["paths"]
    messages = max(1, profile["accepted"])
    stats = pstats.Stats(*map(str, paths))
    total = sum(entry[2] for entry in stats.stats.values())
    loop = pstats.Stats(str(next(p for p in paths if p.name.endswith("-loop.pstats"))))
    loop_total = sum(entry[2] for entry in loop.stats.values())
    print(f"# PROFILED: one more {profile['mode']} round on the edge, {profile['accepted']} messages; cProfile, CPU time per "
          f"thread: {total / messages * 1e6:.0f} us per message ({loop_total / messages * 1e6:.0f} us in the event "
          f"loop's thread, the rest in {len(paths) - 1} sealing thread(s)); top {top} by own time:")
    print("#   own us  share  with callees us  calls/msg  function")
    for (file, line, function), (_, calls, own, cumulative, _) in sorted(stats.stats.items(),
                                                                          key=lambda item: -item[1][2])[:top]:
        where = function if file == "~" else f"{Path(file).name}:{line}({function})"
        print(f"#   {own / messages * 1e6:6.1f} {100 * own / total:5.1f}% {cumulative / messages * 1e6:10.1f}"
              f" {calls / messages:9.2f}  {where}")


def report(args, rounds: list[dict], version: str, queued: dict, accepted: dict, elapsed: float,
           verdict_ms: list[float] | None = None, idle: list[dict] = ()) -> None:
    def total(mode, server, key):
        return sum(r[key] for r in rounds if r["mode"] == mode and r["server"] == server)

    names = list(accepted)

    print("# YesTLS edge SMTP benchmark: messages accepted per second, 10 KiB, one recipient, new connection each")
    print(f"# reference: Postfix {version} from Debian, a private instance queueing into hold/ "
          f"(queue file fsync'd before 250), same certificate, same load generator")
    print(f"# {args.rounds} interleaved rounds of {args.seconds:g} s (+{args.warmup:g} s warm-up) per server and "
          f"mode; {args.concurrency} concurrent clients in one generator process "
          f"({'pipelined MAIL/RCPT/DATA' if args.pipelining else 'no pipelining'}); {os.cpu_count()} CPUs; "
          f"Python {sys.version.split()[0]}")
    for mode in args.modes:
        per_round = []
        for number in range(args.rounds):
            rate = {r["server"]: r["rate"] for r in rounds if r["mode"] == mode and r["round"] == number}
            per_round.append("/".join(f"{rate[name]:.0f}" for name in names))
        print(f"# {mode}: per-round msg/s {'/'.join(names)}: {' '.join(per_round)}")
        for server in names:
            mine = [r for r in rounds if r["mode"] == mode and r["server"] == server]
            done = max(1, sum(r["accepted"] for r in mine))
            wall = sum(r["wall"] for r in mine)
            parts = {part: sum(r["parts"][part] for r in mine) for part in mine[0]["parts"]}
            server_cpu, generator_cpu = sum(parts.values()), sum(r["cpu"] for r in mine)
            others = sum(r["machine_busy"] for r in mine) - server_cpu - generator_cpu
            split = " + ".join(f"{part} {cpu / done * 1e6:.0f}" for part, cpu in parts.items()) if len(parts) > 1 else ""
            lat50 = sorted(r["latency_p50_ms"] for r in mine)
            print(f"# {mode} {server}: CPU per message: {server} {server_cpu / done * 1e6:.0f} us"
                  f"{f' ({split})' if split else ' (all its processes)'}, generator {generator_cpu / done * 1e6:.0f} us; "
                  f"cores busy: {server} {server_cpu / wall:.2f}, generator {generator_cpu / wall:.2f}, "
                  f"other processes {max(0.0, others) / wall:.2f}, of {os.cpu_count()}; median latency "
                  f"{lat50[len(lat50) // 2]:.1f} ms; errors {sum(r['errors'] for r in mine)}"
                  + (f"; negotiated {', '.join(sorted({k for r in mine for k in r['tls']}))}" if mode == "starttls" else ""))
        for r in rounds:
            if r["mode"] == mode and r["samples"]:
                print(f"#   {r['server']} round {r['round']} errors, e.g.: {'; '.join(r['samples'][:3])}")
    for server in names:
        state = "ok" if queued[server] == accepted[server] else "MISMATCH"
        print(f"# queue check {server}: {queued[server]} queued files for {accepted[server]} messages answered 250: "
              f"{state}")
    rates = {}
    for mode in args.modes:
        for server in names:
            rates[mode, server] = total(mode, server, "counted") / total(mode, server, "window")
            print(f"value smtp_accept_{mode}_{server}_msgs_per_s {rates[mode, server]:.1f}")
    for mode in args.modes:
        print(f"ratio smtp_accept_{mode} {rates[mode, 'edge'] / rates[mode, 'postfix']:.2f}")
        if "floor" in names:
            print(f"ratio smtp_accept_{mode}_floor {rates[mode, 'floor'] / rates[mode, 'postfix']:.2f}")
        if "edge_verdict" in names:
            print(f"ratio smtp_accept_{mode}_verdict {rates[mode, 'edge_verdict'] / rates[mode, 'postfix']:.2f}")
    if verdict_ms is not None:
        ordered = sorted(verdict_ms) or [0.0]
        print(f"# before-queue verdicts: {len(verdict_ms)} round trips logged by the edge "
              f"(end of DATA to home's answer; the judge answers at once, no rspamd)")
        print(f"value edge_verdict_added_ms_p50 {ordered[len(ordered) // 2]:.2f}")
        print(f"value edge_verdict_added_ms_p99 {ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]:.2f}")
    for held in idle:
        kind = "TLS " if held["tls"] else ""
        print(f"# idle {kind}sessions: {held['sessions']} held at once on a fresh edge (after EHLO"
              f"{', STARTTLS and EHLO' if held['tls'] else ''}): its RSS {held['before']} -> {held['after']} KiB")
        print(f"value edge_rss_kib_per_idle_{'tls_' if held['tls'] else ''}session {held['per_session']:.1f}")
    print("# target: smtp_accept_plain and smtp_accept_starttls >= 1.0 (the edge at least as fast as Postfix), "
          "edge_rss_kib_per_idle_session <= 50")
    print(f"# elapsed {elapsed:.1f} s")


def run(args) -> None:
    from tests.pki import make_pki

    started = time.perf_counter()
    version = postfix_version() if POSTCONF.exists() else None
    if not POSTFIX.exists() or version is None:
        raise SystemExit("bench/smtp.py needs Postfix: run `./scripts/install-packages bench` as root "
                         "(or `make bench-smtp`)")
    tmp = Path(tempfile.mkdtemp(prefix="yestls-bench-smtp-"))
    servers, generator, profile, verdict_ms, idle = {}, None, None, None, []
    try:
        pki = make_pki(tmp / "pki", key_types=("ecdsa-p256",))
        servers["postfix"] = PostfixUnderTest(tmp / "postfix", pki, args.concurrency)
        servers["edge"] = EdgeUnderTest(tmp / "edge", pki, args.profile, workers=args.workers)
        if args.verdict:
            servers["edge_verdict"] = EdgeUnderTest(tmp / "edge-verdict", pki, None, verdict=True)
        if args.floor:
            servers["floor"] = FloorUnderTest(tmp / "floor", args.workers)
        if args.idle_sessions:
            idle = [idle_rss(tmp / f"edge-idle-{tls}", pki, args.idle_sessions, tls, args.workers)
                    for tls in (False, True)]
        generator = Generator()
        rounds = measure(args, generator, servers, str(pki.ca_pem))
        accepted = {name: sum(r["accepted"] for r in rounds if r["server"] == name) for name in servers}
        queued = {name: server.queued() for name, server in servers.items()}
        verdict_ms = servers["edge_verdict"].verdict_ms() if args.verdict else None
        if args.profile:
            profile = profile_edge(args, generator, servers["edge"], str(pki.ca_pem))
    finally:
        if generator is not None:
            generator.stop()
        for server in servers.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, rounds, version, queued, accepted, time.perf_counter() - started, verdict_ms, idle)
    if profile:
        print_profile(profile)
    if queued != accepted:
        raise SystemExit("the queues do not hold what was acknowledged (see the queue check lines)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per server and mode")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured length of each round")
    parser.add_argument("--warmup", type=float, default=0.5, help="uncounted start of each round")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent client connections")
    parser.add_argument("--modes", default="plain,starttls", help="plain, starttls or both (comma-separated)")
    parser.add_argument("--no-pipelining", dest="pipelining", action="store_false",
                        help="send MAIL, RCPT and DATA one at a time")
    parser.add_argument("--verdict", action="store_true",
                        help="also an edge with [verdict] and a judge answering at once: the before-queue cost")
    parser.add_argument("--floor", action="store_true",
                        help="also bench/smtp_floor.py (a minimal session over the edge's spool; plain only): "
                             "what the session's layers cost")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="cProfile the edge under STARTTLS load into DIR")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), metavar="N",
                        help="the edge's [smtp] workers (default: one per core; --verdict and --profile use 1)")
    parser.add_argument("--idle-sessions", type=int, default=1000, metavar="N",
                        help="idle sessions held at once for the RSS per session (0: not measured)")
    parser.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generator:
        generator_main()
        return
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not args.modes or any(mode not in ("plain", "starttls") for mode in args.modes):
        parser.error("--modes takes plain, starttls or plain,starttls")
    if not 1 <= args.rounds <= 50 or not 0.5 <= args.seconds <= 120 or not 0 <= args.warmup <= 10:
        parser.error("--rounds must be 1..50, --seconds 0.5..120, --warmup 0..10")
    if not 1 <= args.concurrency <= 256:
        parser.error("--concurrency must be 1..256")
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be 1..64")
    if args.floor and args.modes != ["plain"]:
        parser.error("--floor speaks plain SMTP only: add --modes plain")
    if args.profile and args.workers != 1:
        parser.error("--profile profiles a one-process edge: add --workers 1")
    if not 0 <= args.idle_sessions <= 1900:
        parser.error("--idle-sessions must be 0..1900 (the edge here takes 2000 connections)")
    run(args)


if __name__ == "__main__":
    main()
