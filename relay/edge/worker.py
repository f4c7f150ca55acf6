"""One worker process of a multi-process edge (`python -m relay.edge.worker`, started by relay/edge/workers.py).

It reads its Handoff (one JSON line) on stdin and then serves SMTP on the
listening sockets it inherited, as the single-process edge does, with:
- its own oracle connections (one pool per worker: each worker signs
  without waiting on another's link, and the oracle's per-peer limits see
  every worker, so they stay one budget for the edge);
- the spool reached through the supervisor's desk (relay/spool/desk.py):
  this process seals and writes, the supervisor owns caps and commits;
- session-ticket keys derived from the supervisor's shared seed, so a
  ticket one worker issued resumes on any other;
- its share of `max_connections` (the total divided by the workers, at
  least 1); per-IP caps, the door and the TLS budget need no share, since
  a client network always reaches the same worker;
- the address book home published, re-read from the supervisor's cache
  file when it changes;
- with [verdict], the supervisor's verdict desk, asked over a link of its
  own (relay/edge/verdict_link.py).
It says READY on stdout once it serves, then reports its metrics there
(relay/edge/worker_metrics.py), and stops on SIGTERM, or when the
supervisor is gone.
"""

import asyncio
import dataclasses
import logging
import os
import socket
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from relay import daemon
from relay.edge import config as edge_config
from relay.edge.server import EdgeMetrics, quiet_aiosmtpd, smtp_servers, start_edge
from relay.edge.verdict_link import ForwardedVerdicts
from relay.edge.worker_metrics import REPORT_EVERY, report
from relay.edge.workers import READY, Handoff, ListenSockets, die_with_parent
from relay.identity import load_identity
from relay.spool.desk import WorkerSpool
from relay.spool.keymaker import KeyMaker
from relay.spool.keys import parse_spool_public_key
from relay.spool.sealed import DEFAULT_CHUNK_SIZE
from relay.tls import SharedTicketSeed, TicketKeyring

log = logging.getLogger("yestls.edge")


def worker_config(config: edge_config.EdgeConfig, count: int) -> edge_config.EdgeConfig:
    """`config` as one of `count` workers sees it: its share of the total connection cap."""
    share = max(1, config.smtp.max_connections // count)
    return dataclasses.replace(config, smtp=dataclasses.replace(config.smtp, max_connections=share))


async def work(handoff: Handoff) -> None:
    config = worker_config(edge_config.load(Path(handoff.config)), handoff.count)
    identity = load_identity(config.oracle.identity_key)
    public_key = parse_spool_public_key(config.spool.public_key)
    stop = daemon.stop_event()
    loop = asyncio.get_running_loop()
    keys = KeyMaker(public_key, DEFAULT_CHUNK_SIZE)
    verdicts = None
    spool = WorkerSpool(socket.socket(fileno=handoff.desk_fd), config.spool.directory, public_key, keys,
                        on_lost=lambda: loop.call_soon_threadsafe(stop.set))
    try:
        tickets = TicketKeyring.from_shared(os.urandom, SharedTicketSeed.from_bytes(bytes.fromhex(handoff.tickets)))
        registry = CollectorRegistry()
        if handoff.verdict_fd >= 0:
            verdicts = ForwardedVerdicts(config.verdict, registry)
            await verdicts.connect(socket.socket(fileno=handoff.verdict_fd))
        edge = await start_edge(config, identity, spool, EdgeMetrics(registry), tickets, verdicts)
        sockets = ListenSockets(tuple(socket.socket(fileno=fd) for fd in handoff.smtp_fds),
                                tuple(socket.socket(fileno=fd) for fd in handoff.implicit_tls_fds))
        servers = await smtp_servers(edge, sockets)
        tasks = edge.background() + [loop.create_task(report_metrics(registry))]
        log.info("edge worker %d of %d serving (pid %d)", handoff.index, handoff.count, os.getpid())
        say(READY)
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for server in servers:
                server.close()
            await edge.pool.close()
            say(report(registry))
    finally:
        if verdicts is not None:
            verdicts.close()
        spool.close()
        keys.close()


def say(line: bytes) -> None:
    """One line to the supervisor (relay/edge/workers.py reads this process's stdout)."""
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()


async def report_metrics(registry: CollectorRegistry) -> None:
    while True:
        await asyncio.sleep(REPORT_EVERY)
        say(report(registry))


def main() -> int:
    die_with_parent()
    quiet_aiosmtpd()
    handoff = Handoff.decode(sys.stdin.buffer.readline())
    return daemon.run(f"edge worker {handoff.index}", lambda: handoff, work,
                      (edge_config.ConfigError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
