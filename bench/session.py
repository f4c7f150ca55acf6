#!/usr/bin/env python3
"""CPU per message of the edge's SMTP session and of its shared spool, in one process, with no network or disk.

bench/smtp.py measures the whole edge against Postfix over loopback, with
fsync: the truth, but noisy (this machine's fsync cost drifts from run to
run by a fifth). This one measures two of the edge's layers on their own,
steadily enough to see a 5% change, each against the simplest thing that
does the same job:

session
    The edge's session as `yestls edge serve` runs it: KeylessSMTP
    (relay/aio/starttls.py) with EdgeHandler (relay/edge/handler.py),
    a recipient policy for example.org, its metrics, its INFO log line per
    message (into a file), its default executor of SEAL_THREADS threads.
    Each message is one session on an in-memory transport (no sockets):
    the greeting, EHLO, MAIL+RCPT+DATA pipelined, the 10 KiB message of
    bench/smtp.py, its commit, QUIT. The reference: bench/smtp_floor.py's
    FloorSession (no checks, no per-session state, no log line), fed the
    same bytes. Both seal into the same kind of spool (relay.spool.store.Spool
    on tmpfs, so fsync costs nothing; message keys made before the clock
    starts, so HPKE is out of both). Measured: the event loop thread's CPU
    per message (time.thread_time), where the sessions run; the commit
    threads' CPU is the spool's, the same for both.
    `value session_loop_cpu_us_edge`, `value session_loop_cpu_us_floor`,
    `ratio session_loop_cpu` (edge over floor).

spool_desk
    A message written through an edge worker's spool (relay/spool/desk.py:
    WorkerSpool asks SpoolDesk for room and for the commit over a
    socketpair; both ends in this process here, with their threads) against
    the same Spool written directly, as a one-process edge does:
    open_async, the message, commit in a thread, eight messages at a time.
    Measured: the process's CPU per message, all threads.
    `value spool_cpu_us_desk`, `value spool_cpu_us_direct`, `ratio
    spool_desk_cpu` (desk over direct).

Rounds alternate (edge then floor, desk then direct, the order swapped every
round) and the totals are summed over rounds.

Run it
    .venv/bin/python bench/session.py [--rounds 3] [--messages 2000]
"""

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from prometheus_client import CollectorRegistry  # noqa: E402
from smtp import MESSAGE_SIZE, bench_message  # noqa: E402
from smtp_floor import FloorSession  # noqa: E402

from relay import daemon  # noqa: E402
from relay.aio.starttls import KeylessSMTP  # noqa: E402
from relay.edge.handler import SEAL_THREADS, EdgeHandler, TransactionRules  # noqa: E402
from relay.edge.recipients import RecipientPolicy  # noqa: E402
from relay.edge.server import EdgeMetrics  # noqa: E402
from relay.spool.desk import SpoolDesk, WorkerSpool, desk_pair  # noqa: E402
from relay.spool.keys import generate_spool_key, parse_spool_public_key  # noqa: E402
from relay.spool.sealed import DEFAULT_CHUNK_SIZE, new_message_key  # noqa: E402
from relay.spool.store import Spool  # noqa: E402
from tests.edge_smtp import dot_stuff  # noqa: E402

HOSTNAME = "mx.example.org"
PEER = ("127.0.0.1", 40000)


class KeysMadeAhead:
    """Message keys (relay.spool.store.MessageKeys) made before the clock starts: HPKE is not what is measured."""

    def __init__(self, public_key, count: int):
        self.public_key = public_key
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self._keys = [new_message_key(public_key) for _ in range(count)]

    def take(self):
        return self._keys.pop()


class MemoryTransport:
    """What a session writes to, in memory; `queued` is done once the message's 250 was written."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol):
        self.loop = loop
        self.protocol = protocol
        self.writes: list[bytes] = []
        self.closing = False
        self.queued = loop.create_future()

    def write(self, data) -> None:
        data = bytes(data)
        self.writes.append(data)
        if b" OK queued as " in data and not self.queued.done():
            self.queued.set_result(None)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def get_extra_info(self, name: str, default=None):
        return PEER if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Feeder:
    """Bytes into a protocol as asyncio would hand them over: buffered (get_buffer/buffer_updated) or not."""

    def __init__(self, protocol):
        self.protocol = protocol

    def __call__(self, data: bytes) -> None:
        if hasattr(self.protocol, "buffer_updated"):
            buffer = self.protocol.get_buffer(len(data))
            buffer[:len(data)] = data
            self.protocol.buffer_updated(len(data))
        else:
            self.protocol.data_received(data)


class SessionBench:
    def __init__(self, directory: Path, messages: int, rounds: int):
        public_key = parse_spool_public_key(generate_spool_key(directory / "spool.key"))
        self.keys = KeysMadeAhead(public_key, 2 * messages * rounds + 200)
        self.spool = Spool(directory / "spool", public_key, 1 << 40, 1 << 24, message_keys=self.keys)
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(ThreadPoolExecutor(SEAL_THREADS))
        self.floor_commits = ThreadPoolExecutor(SEAL_THREADS)
        self.metrics = EdgeMetrics(CollectorRegistry())
        rules = TransactionRules(HOSTNAME, "example.org", 100, lambda server: None,
                                 lambda: RecipientPolicy(frozenset({"example.org"})))
        self.handler = EdgeHandler(rules, self.spool, self.metrics)
        body = bench_message(MESSAGE_SIZE)
        self.envelope = (b"MAIL FROM:<sender@client.sender.test> SIZE=%d\r\nRCPT TO:<user@example.org>\r\nDATA\r\n"
                         % len(body))
        self.content = dot_stuff(body) + b".\r\n"

    def edge_session(self):
        return KeylessSMTP(self.handler, tls_setup=lambda peer: None, hostname=HOSTNAME, ident="ESMTP YesTLS",
                           data_size_limit=26214400, enable_SMTPUTF8=True, decode_data=False,
                           on_refusal=self.metrics.refused)

    def floor_session(self):
        return FloorSession(self.spool, self.floor_commits)

    async def one(self, make) -> None:
        protocol = make()
        transport = MemoryTransport(self.loop, protocol)
        feed = Feeder(protocol)
        protocol.connection_made(transport)
        feed(b"EHLO client.sender.test\r\n")
        feed(self.envelope)
        await asyncio.sleep(0)
        feed(self.content)
        await asyncio.wait_for(transport.queued, 30)
        feed(b"QUIT\r\n")
        await asyncio.sleep(0)
        if not any(reply.startswith(b"221") for reply in transport.writes):
            raise RuntimeError(f"the session did not end as expected: {transport.writes!r}")

    def measure(self, make, messages: int) -> float:
        """Event loop thread CPU seconds for `messages` sessions, one after the other."""
        async def run() -> float:
            started = time.thread_time()
            for _ in range(messages):
                await self.one(make)
            return time.thread_time() - started
        return self.loop.run_until_complete(run())


async def through(spool, messages: int, metadata: dict, body: bytes) -> None:
    """`messages` written into `spool` as the edge does, eight at a time."""
    loop = asyncio.get_running_loop()

    async def one() -> None:
        writer = await spool.open_async(metadata, size=len(body))
        writer.write(body)
        await loop.run_in_executor(None, writer.commit)

    for _ in range(messages // 8):
        await asyncio.gather(*[one() for _ in range(8)])


def desk_rounds(directory: Path, messages: int, rounds: int) -> dict[str, float]:
    public_key = parse_spool_public_key(generate_spool_key(directory / "desk.key"))
    keys = KeysMadeAhead(public_key, 2 * messages * rounds + 200)
    spool = Spool(directory / "desk-spool", public_key, 1 << 40, 1 << 24, message_keys=keys)
    owner_end, worker_end = desk_pair()
    desk = SpoolDesk(spool, ThreadPoolExecutor(SEAL_THREADS, "spool-commit"))
    desk.attach(owner_end, "bench")
    worker = WorkerSpool(worker_end, spool.directory, public_key, keys)
    metadata = {"mail_from": "sender@client.sender.test", "rcpt_tos": ["user@example.org"], "received_at": 0.0}
    body = bench_message(MESSAGE_SIZE)
    totals = {"desk": 0.0, "direct": 0.0}
    try:
        for number in range(rounds):
            order = [("desk", worker), ("direct", spool)]
            for name, target in order if number % 2 == 0 else reversed(order):
                started = time.process_time()
                asyncio.run(through(target, messages, metadata, body))
                totals[name] += time.process_time() - started
    finally:
        worker.close()
        spool.close()
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--messages", type=int, default=2000, help="messages per round and side")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 50 or not 8 <= args.messages <= 100_000:
        parser.error("--rounds must be 1..50, --messages 8..100000")
    logging.basicConfig(level=logging.INFO, format=daemon.LOG_FORMAT, filename=os.devnull)
    logging.getLogger("mail.log").setLevel(logging.WARNING)   # as relay/edge/server.py sets it
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    directory = Path(tempfile.mkdtemp(prefix="yestls-bench-session-", dir=base))
    try:
        bench = SessionBench(directory, args.messages, args.rounds)
        bench.measure(bench.edge_session, 100)   # warm-up: imports, caches, the executor's threads
        bench.measure(bench.floor_session, 100)
        loop_cpu = {"edge": 0.0, "floor": 0.0}
        for number in range(args.rounds):
            order = [("edge", bench.edge_session), ("floor", bench.floor_session)]
            for name, make in order if number % 2 == 0 else reversed(order):
                loop_cpu[name] += bench.measure(make, args.messages)
        desk = desk_rounds(directory, args.messages, args.rounds)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    count = args.messages * args.rounds
    print("# YesTLS: CPU per 10 KiB message of the edge's session layers and of its shared spool, in one process")
    print(f"# {args.rounds} interleaved rounds of {args.messages} messages per side; spool on "
          f"{'tmpfs' if base else 'the temporary directory'}; keys made ahead; Python {sys.version.split()[0]}")
    print(f"value session_loop_cpu_us_edge {loop_cpu['edge'] / count * 1e6:.0f}")
    print(f"value session_loop_cpu_us_floor {loop_cpu['floor'] / count * 1e6:.0f}")
    print(f"ratio session_loop_cpu {loop_cpu['edge'] / loop_cpu['floor']:.2f}")
    print(f"value spool_cpu_us_desk {desk['desk'] / count * 1e6:.0f}")
    print(f"value spool_cpu_us_direct {desk['direct'] / count * 1e6:.0f}")
    print(f"ratio spool_desk_cpu {desk['desk'] / desk['direct']:.2f}")


if __name__ == "__main__":
    main()
