#!/usr/bin/env python3
"""Messages per second from the edge's sealed spool into Dovecot by the intake, against Dovecot's LMTP fed directly.

What runs
    The intake: `yestls intake serve` as deployed, pulling from a running
    `yestls edge serve` (and its key oracle, idle here) over the spool
    service on loopback, unsealing, removing forged trace headers, writing
    its ledger (SQLite, WAL, synchronous=FULL) and delivering by LMTP to a private Dovecot
    (tests/dovecot.py: Maildir, loopback). The sites come from the tests'
    helpers (tests/pki.py, tests/edge_site.py, tests/home_site.py); the
    intake's settings are theirs: 4 sealed messages fetched ahead, doveadm
    configured (it is asked only after a crash). No [spam]: rspamd, a
    process of its own, judges each message in deployment (and is the one
    source of SPF/DKIM/DMARC results); its time is rspamd's, not the
    intake's, and is left out of both sides.

    The reference: Dovecot's own LMTP (the same instance, version printed)
    fed directly with the same messages by relay.home.lmtp.deliver, one at a
    time, a new LMTP connection each: what a simple LMTP client does (the
    intake delivers in order too, a run of fetched messages at a time over
    one pipelined session, relay/home/lmtp.py). The messages carry the same
    trace header the intake adds (X-YesTLS-Spool-Id) and the edge's
    Received, so Dovecot stores the same bytes either way.

    The messages: `--messages` distinct messages of 10 KiB as the sender
    sent them (one recipient), each round.

    A round, interleaved in one run (intake then direct, the order swapped
    every round, so the machine's noise falls on both):
      intake: with the edge stopped, the messages are sealed straight into
        its spool with relay.spool.store.Spool and the site's spool public
        key, as the edge's SMTP side would have; the ledger is removed and
        the mailbox emptied; the edge is started (it indexes the spool);
        then the intake is started. The clock runs from the intake's
        "intake pulling from" log line (its own timestamp: after Python's
        start and the keys are loaded, before it connects) until the edge's
        queue/ is empty (polled every 5 ms). Then the mailbox must hold every
        message and the ledger must say done for each.
      direct: the mailbox emptied, the same messages delivered one by one;
        the clock runs from the first connection to the last reply.
    Around the intake's measured window the CPU time of the intake and of
    the edge is read from /proc.

What it prints
    `# ...` lines: the versions, the settings, per-round rates, CPU per
    message, checks. `value intake_lmtp_msgs_per_s` and
    `value direct_lmtp_msgs_per_s` over all rounds, and
    `ratio intake_lmtp` (intake ÷ direct); the target is >= 0.8.

    `--profile`: two more intake rounds, run inside this process (the
    same relay.home.intake.Intake the command runs) so that it can be
    looked into: one with wall-clock timers on each step of a message
    (fetch wait, unseal, authentication checks, ledger writes, LMTP,
    acknowledgement, status file); the same again under cProfile (wall
    clock; time the event loop spends idle shows as epoll), whose top
    functions are printed. The profiler slows the
    intake: read its shares, not its times.

Run it
    make bench-intake, or
    .venv/bin/python bench/intake.py [--messages 200] [--rounds 3] [--profile]
"""

import argparse
import asyncio
import datetime
import email.utils
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

USER = "user@example.org"
SENDER_DOMAIN = "sender.test"
SENDER = f"bench@{SENDER_DOMAIN}"
MX_NAME = "mx.example.org"
MESSAGE_SIZE = 10 * 1024
ROUND_TIMEOUT = 300.0     # a round must end within this
POLL = 0.005              # seconds between looks at the edge's queue/
TICKS = os.sysconf("SC_CLK_TCK")


def bench_message(number: int, size: int = MESSAGE_SIZE) -> bytes:
    """Message `number` as the sender sent it: exactly `size` bytes, CRLF lines, none starting with a dot."""
    head = (f"From: Bench <{SENDER}>\r\nTo: <{USER}>\r\nSubject: YesTLS intake benchmark {number:06d}\r\n"
            f"Date: Sun, 29 Nov 2026 12:00:00 +0000\r\nMessage-ID: <bench.{number:06d}@{SENDER_DOMAIN}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, 0123456789 times; then it rests.\r\n"
    body = bytearray()
    while len(head) + len(body) + len(line) <= size - 2:
        body += line
    body += b"x" * (size - 2 - len(head) - len(body)) + b"\r\n"
    message = head + bytes(body)
    assert len(message) == size
    return message


def received_header() -> bytes:
    """The trace header the edge prepends (relay/edge/handler.py), for a STARTTLS session from loopback."""
    return (f"Received: from {SENDER_DOMAIN} ([127.0.0.1])\r\n\tby {MX_NAME} (YesTLS) with ESMTPS\r\n"
            "\t(version=TLSv1.3 cipher=TLS_AES_128_GCM_SHA256 group=X25519MLKEM768)\r\n"
            f"\tfor <{USER}>;\r\n\t{email.utils.formatdate(usegmt=True)}\r\n").encode()


def metadata() -> dict:
    """What the edge seals with each message (relay/edge/handler.py)."""
    return {"mail_from": SENDER, "rcpt_tos": [USER], "mail_options": ["SIZE=10240"], "rcpt_options": [],
            "smtputf8": False, "client_address": "127.0.0.1:40000", "helo": SENDER_DOMAIN,
            "tls": {"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "group": "X25519MLKEM768",
                    "resumed": False, "server_name": MX_NAME},
            "received_at": time.time()}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def log_time(log: str, pattern: str) -> float:
    """The timestamp (seconds since the epoch) of the first log line matching `pattern` (logging's asctime)."""
    match = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*" + pattern, log, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no log line matching {pattern!r}:\n{log[-2000:]}")
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


class Bench:
    """The world: a Dovecot, the oracle, the edge (started and stopped per round), intake.toml."""

    def __init__(self, directory: Path, stack):
        from relay.edge import config as edge_config
        from relay.spool.keys import parse_spool_public_key
        from tests.dovecot import run_dovecot
        from tests.edge_site import make_edge_site
        from tests.home_site import make_intake
        from tests.oracle_home import run_oracle
        from tests.pki import make_pki

        pki = make_pki(directory / "pki", key_types=("ecdsa-p256",))
        self.site = make_edge_site(directory / "site", pki,
                                   spool_options="max_bytes = 1099511627776\nmax_files = 100000000\n")
        loaded = edge_config.load(self.site.config)
        self.public_key = parse_spool_public_key(loaded.spool.public_key)
        self.dovecot = stack.enter_context(run_dovecot((USER,)))
        stack.enter_context(run_oracle(self.site.oracle))
        self.intake = make_intake(self.site, self.dovecot)
        self.edge = None
        stack.callback(self.stop_edge)

    # --- the edge and its spool ---------------------------------------------------------------------------

    def start_edge(self) -> None:
        from tests.edge_site import start_edge

        self.edge = start_edge(self.site)

    def stop_edge(self) -> None:
        if self.edge is not None:
            self.edge.stop(timeout=15)
        self.edge = None

    def prefill(self, contents: list[bytes]) -> list[str]:
        """Seal `contents` into the edge's spool (the edge stopped: it owns the spool's lock); their spool ids."""
        from relay.spool.store import Spool

        assert self.edge is None
        with Spool(self.site.spool_dir, self.public_key, max_bytes=1 << 40, max_files=10 ** 8) as spool:
            ids = []
            for content in contents:
                received = received_header()
                ids.append(spool.accept(metadata(), [received, content], size=len(received) + len(content)))
        return ids

    def queue_empty(self) -> bool:
        with os.scandir(self.site.spool_dir / "queue") as entries:
            return next(entries, None) is None

    # --- home ---------------------------------------------------------------------------------------------

    def reset_home(self) -> None:
        """An empty mailbox and no ledger: every round starts from the same state."""
        self.dovecot.doveadm("expunge", "-u", USER, "mailbox", "INBOX", "all")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.intake.ledger}{suffix}").unlink(missing_ok=True)

    def mailbox_count(self) -> int:
        output = self.dovecot.doveadm("mailbox", "status", "-u", USER, "messages", "INBOX")
        return int(re.search(r"messages=(\d+)", output).group(1))

    def ledger_done(self, spool_ids: list[str]) -> int:
        from relay.home.ledger import DONE, Ledger
        from tests.home_site import EDGE

        ledger = Ledger(self.intake.ledger)
        try:
            edge = ledger.edge(EDGE)
            return sum(1 for spool_id in spool_ids if (entry := edge.get(spool_id)) and entry.state == DONE)
        finally:
            ledger.close()

    def check_round(self, what: str, expected: int, spool_ids: list[str] | None = None) -> None:
        count = self.mailbox_count()
        if count != expected:
            raise SystemExit(f"{what}: the mailbox holds {count} messages, expected {expected}")
        if spool_ids is not None:
            done = self.ledger_done(spool_ids)
            if done != len(spool_ids):
                raise SystemExit(f"{what}: the ledger says done for {done} of {len(spool_ids)}")

    def wait_until_queue_empty(self, what: str, log=lambda: "") -> float:
        deadline = time.monotonic() + ROUND_TIMEOUT
        while not self.queue_empty():
            if time.monotonic() > deadline:
                raise SystemExit(f"{what}: the edge's spool did not empty within {ROUND_TIMEOUT:.0f}s\n{log()}")
            time.sleep(POLL)
        return time.time()


def intake_round(bench: Bench, contents: list[bytes]) -> dict:
    """`yestls intake serve` from a pre-filled spool to the last acknowledgement."""
    from tests.home_site import start_intake

    bench.stop_edge()
    spool_ids = bench.prefill(contents)
    bench.reset_home()
    bench.start_edge()
    process = start_intake(bench.intake)
    try:
        cpu_before = {"intake": cpu_seconds(process.process.pid), "edge": cpu_seconds(bench.edge.process.pid)}
        end = bench.wait_until_queue_empty("intake round", process.log)
        cpu = {"intake": cpu_seconds(process.process.pid) - cpu_before["intake"],
               "edge": cpu_seconds(bench.edge.process.pid) - cpu_before["edge"]}
        start = log_time(process.log(), r"intake pulling from")
    finally:
        process.stop(timeout=15)
    bench.check_round("intake round", len(contents), spool_ids)
    return {"seconds": end - start, "messages": len(contents), "cpu": cpu}


def as_delivered(content: bytes) -> bytes:
    """What the intake hands Dovecot for `content`: its trace header, the edge's Received, the message."""
    return b"X-YesTLS-Spool-Id: " + os.urandom(16).hex().encode() + b"\r\n" + received_header() + content


def direct_round(bench: Bench, messages: list[bytes]) -> dict:
    """The same messages straight into Dovecot's LMTP, one after the other, as the intake delivers them."""
    from relay.home.lmtp import deliver

    bench.reset_home()
    address = ("127.0.0.1", bench.dovecot.lmtp_port)

    async def run() -> float:
        started = time.perf_counter()
        for message in messages:
            replies = await deliver(address, SENDER, [USER], message, lhlo=MX_NAME)
            if any(not 200 <= reply.code < 300 for reply in replies.values()):
                raise SystemExit(f"direct LMTP refused a message: {replies}")
        return time.perf_counter() - started

    seconds = asyncio.run(run())
    bench.check_round("direct round", len(messages))
    return {"seconds": seconds, "messages": len(messages)}


# --- the profile -----------------------------------------------------------------------------------------

STEPS = ("fetch wait", "unseal", "forged headers", "ledger", "lmtp", "ack", "status file", "list/stats/wait")


def in_process_round(bench: Bench, contents: list[bytes], *, profiler=None) -> dict:
    """An intake round with relay.home.intake.Intake running in this process, each step timed (wall clock)."""
    from relay.home import config as intake_config
    from relay.home import intake as intake_module
    from relay.home.ledger import EdgeLedger, Ledger
    from relay.home.lmtp import LmtpSession
    from relay.spool.client import SpoolClient

    bench.stop_edge()
    spool_ids = bench.prefill(contents)
    bench.reset_home()
    bench.start_edge()
    spent = dict.fromkeys(STEPS, 0.0)
    calls = dict.fromkeys(STEPS, 0)
    patched: list[tuple[object, str, object]] = []

    def timed(owner, name: str, step: str) -> None:
        original = getattr(owner, name)
        if asyncio.iscoroutinefunction(original):
            @functools.wraps(original)
            async def wrapper(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    spent[step] += time.perf_counter() - started
                    calls[step] += 1
        else:
            @functools.wraps(original)
            def wrapper(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    spent[step] += time.perf_counter() - started
                    calls[step] += 1
        patched.append((owner, name, original))
        setattr(owner, name, wrapper)

    async def run() -> tuple[float, float]:
        config = intake_config.load(bench.intake.config)
        intake = intake_module.Intake(config)
        stop = asyncio.Event()
        if profiler is None:
            timed(intake_module, "unseal", "unseal")
            timed(LmtpSession, "deliver_batch", "lmtp")
            timed(intake.auth, "without_forged_results", "forged headers")
            timed(EdgeLedger, "save", "ledger")
            timed(EdgeLedger, "get", "ledger")
            timed(EdgeLedger, "start", "ledger")
            timed(EdgeLedger, "mark_acked", "ledger")
            timed(Ledger, "counts", "ledger")
            timed(intake, "_write_status", "status file")
            timed(SpoolClient, "ack", "ack")
            for name in ("list", "stats", "wait"):
                timed(SpoolClient, name, "list/stats/wait")
        else:
            profiler.enable()
        started = time.perf_counter()
        task = asyncio.ensure_future(intake.run(stop))
        deadline = time.monotonic() + ROUND_TIMEOUT
        while not bench.queue_empty():
            if task.done() or time.monotonic() > deadline:
                raise SystemExit(f"in-process intake round did not finish: {task}")
            await asyncio.sleep(POLL)
        ended = time.perf_counter()
        if profiler is not None:
            profiler.disable()
        stop.set()
        await asyncio.wait_for(task, 30)
        intake.ledger.close()
        return started, ended

    try:
        started, ended = asyncio.run(run())
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    bench.check_round("profiled round", len(contents), spool_ids)
    total = ended - started
    # Fetches run ahead concurrently; what the message loop waited for them is the time no other step took
    # (this includes the event loop's own work and the 5 ms poll of this process).
    spent["fetch wait"] = total - sum(v for k, v in spent.items() if k not in ("fetch wait", "list/stats/wait"))
    return {"seconds": total, "messages": len(contents), "spent": spent, "calls": calls}


def print_steps(result: dict, title: str) -> None:
    n, total = result["messages"], result["seconds"]
    print(f"# PROFILE {title}: {n} messages in {total:.2f} s ({n / total:.1f} msg/s, {total / n * 1e3:.2f} ms each)")
    print("#   step              ms/msg  share  calls/msg")
    for step in STEPS:
        if step == "list/stats/wait":
            continue
        seconds = result["spent"][step]
        calls = result["calls"][step] / n if step != "fetch wait" else float("nan")
        print(f"#   {step:16s} {seconds / n * 1e3:7.2f} {100 * seconds / total:5.1f}%  {calls:9.1f}")


def print_cprofile(profiler, messages: int, title: str, top: int = 24) -> None:
    import pstats

    stats = pstats.Stats(profiler)
    total = stats.total_tt
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    print(f"# PROFILE cProfile of {title} (wall clock, slowed by the profiler), {messages} messages: "
          f"{total:.2f} s; top functions by own time")
    print("#   own ms/msg  share  cum ms/msg  calls/msg  function")
    for (path, line, name), (_, calls, own, cumulative, _) in rows:
        where = f"{Path(path).name}:{line}({name})" if path != "~" else name
        print(f"#   {own / messages * 1e3:10.3f} {100 * own / total:5.1f}% {cumulative / messages * 1e3:10.3f} "
              f"{calls / messages:10.1f}  {where[:90]}")


# --- the run ---------------------------------------------------------------------------------------------

def run(args) -> None:
    import cProfile
    from contextlib import ExitStack

    started = time.perf_counter()
    version = subprocess.run(["dovecot", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    contents = [bench_message(i) for i in range(args.messages)]
    tmp = Path(tempfile.mkdtemp(prefix="yestls-bench-intake-"))
    rounds = []
    steps = profiler = None
    try:
        with ExitStack() as stack:
            bench = Bench(tmp, stack)
            direct_messages = [as_delivered(content) for content in contents]
            for number in range(args.rounds):
                order = ("intake", "direct") if number % 2 == 0 else ("direct", "intake")
                for side in order:
                    result = intake_round(bench, contents) if side == "intake" else direct_round(bench, direct_messages)
                    rounds.append({"round": number + 1, "side": side, **result})
            if args.profile:
                steps = in_process_round(bench, contents)
                profiler = cProfile.Profile()
                in_process_round(bench, contents, profiler=profiler)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, version, rounds, time.perf_counter() - started)
    if steps is not None:
        direct = [r for r in rounds if r["side"] == "direct"]
        direct_rate = sum(r["messages"] for r in direct) / sum(r["seconds"] for r in direct)
        print_steps(steps, "steps of a message, wall clock, the intake as it is (in this process)")
        print(f"# PROFILE: {steps['messages'] / steps['seconds']:.1f} msg/s in process, "
              f"{steps['messages'] / steps['seconds'] / direct_rate:.2f} of the direct rate")
        print_cprofile(profiler, args.messages, "the intake")


def report(args, version: str, rounds: list[dict], elapsed: float) -> None:
    def rate(side: str) -> float:
        mine = [r for r in rounds if r["side"] == side]
        return sum(r["messages"] for r in mine) / sum(r["seconds"] for r in mine)

    print("# YesTLS intake benchmark: sealed spool -> `yestls intake serve` -> Dovecot LMTP, messages per second")
    print(f"# reference: Dovecot {version.split()[0] if version else '2.3.x'} LMTP fed directly "
          "(relay.home.lmtp.deliver, one message at a time, a new LMTP connection each)")
    print(f"# {args.messages} messages of {MESSAGE_SIZE} bytes as sent (one recipient) per round, {args.rounds} "
          f"interleaved rounds; intake: in_flight 4, no spam filter (rspamd's own time), ledger synchronous=FULL; "
          f"{os.cpu_count()} CPUs shared by intake, edge, Dovecot and this process")
    for number in range(1, args.rounds + 1):
        this = {r["side"]: r for r in rounds if r["round"] == number}
        intake, direct = this["intake"], this["direct"]
        irate, drate = intake["messages"] / intake["seconds"], direct["messages"] / direct["seconds"]
        print(f"# round {number}: intake {irate:.1f} msg/s ({intake['seconds']:.2f} s), direct {drate:.1f} msg/s "
              f"({direct['seconds']:.2f} s), ratio {irate / drate:.2f}")
    intakes = [r for r in rounds if r["side"] == "intake"]
    n = sum(r["messages"] for r in intakes)
    cpu = {part: sum(r["cpu"][part] for r in intakes) for part in ("intake", "edge")}
    wall = sum(r["seconds"] for r in intakes)
    print(f"# CPU per message in the intake rounds: intake {cpu['intake'] / n * 1e3:.2f} ms, "
          f"edge {cpu['edge'] / n * 1e3:.2f} ms; wall {wall / n * 1e3:.2f} ms "
          f"(the intake busy {100 * cpu['intake'] / wall:.0f}% of its wall time)")
    print("# checks: after every round the mailbox held every message; after every intake round the edge's "
          "spool was empty and the ledger said done for each")
    intake_rate, direct_rate = rate("intake"), rate("direct")
    print(f"value intake_lmtp_msgs_per_s {intake_rate:.1f}")
    print(f"value direct_lmtp_msgs_per_s {direct_rate:.1f}")
    print(f"ratio intake_lmtp {intake_rate / direct_rate:.2f}")
    print("# target: ratio intake_lmtp >= 0.8")
    print(f"# elapsed {elapsed:.1f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=200, help="messages per round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per side (default %(default)s)")
    parser.add_argument("--profile", action="store_true",
                        help="two more intake rounds in this process: step timers, then cProfile")
    args = parser.parse_args(argv)
    if not 1 <= args.messages <= 100_000 or not 1 <= args.rounds <= 50:
        parser.error("--messages must be 1..100000, --rounds 1..50")
    run(args)


if __name__ == "__main__":
    main()
