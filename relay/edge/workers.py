"""The supervisor's side of a multi-process edge: `[smtp] workers` processes accepting SMTP on one port.

`yestls edge serve` with workers above 1 keeps, in its own process, what
must exist once: the spool (and its desk, relay/spool/desk.py), the spool
service home pulls from, the web listener, metrics, ACME tokens, the
before-queue verdict desk. It makes one SO_REUSEPORT listening group per
SMTP address (relay/edge/reuseport.py: a client network always reaches the
same worker, so per-IP caps and per-network budgets hold exactly inside
it) and starts worker k (relay/edge/worker.py) with socket k of each group,
its end of a spool desk link, and the shared session-ticket seed. Each
worker's counters reach the supervisor's metrics page through its stdout
(relay/edge/worker_metrics.py).

The supervisor keeps its copy of every listening socket for its whole
life: a worker that dies leaves its socket in the group (the kernel would
otherwise renumber the group), connections for it wait in its backlog, and
the worker started again in its place takes them. A worker that exits is
started again after 1 s, a pause that doubles up to 30 s while it keeps
dying young (within 10 s). The workers die with the supervisor (PR_SET_PDEATHSIG, and
their desk link closing).
"""

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from relay.daemon import restart_pause
from relay.edge import config as edge_config
from relay.edge.connections import SMTP_BACKLOG
from relay.edge.reuseport import listen_group
from relay.edge.verdict import VerdictDesk
from relay.edge.verdict_link import MAX_JSON, serve_verdicts
from relay.edge.worker_metrics import PREFIX, Sums
from relay.spool.desk import SpoolDesk, desk_pair
from relay.tls import TicketKeyring

log = logging.getLogger("yestls.edge")

READY = b"ready\n"        # a worker's first line on stdout, once it serves
START_TIMEOUT = 60.0      # seconds a worker has to say READY
RESTART_PAUSE = (1.0, 30.0)
YOUNG = 10.0              # a worker that lived less than this died young: the next pause doubles


@dataclass(frozen=True)
class ListenSockets:
    """One worker's share of the listening groups: socket k of each SMTP and implicit-TLS address."""

    smtp: tuple[socket.socket, ...]
    implicit_tls: tuple[socket.socket, ...]


@dataclass(frozen=True)
class Handoff:
    """What a worker is started with, written as one JSON line on its stdin (file descriptors it inherits)."""

    config: str
    index: int
    count: int
    desk_fd: int
    smtp_fds: tuple[int, ...]
    implicit_tls_fds: tuple[int, ...]
    tickets: str   # SharedTicketSeed bytes, hex
    verdict_fd: int = -1   # the worker's end of its verdict link (relay/edge/verdict_link.py), with [verdict]

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> "Handoff":
        data = json.loads(line)
        return cls(config=str(data["config"]), index=int(data["index"]), count=int(data["count"]),
                   desk_fd=int(data["desk_fd"]), smtp_fds=tuple(int(fd) for fd in data["smtp_fds"]),
                   implicit_tls_fds=tuple(int(fd) for fd in data["implicit_tls_fds"]), tickets=str(data["tickets"]),
                   verdict_fd=int(data["verdict_fd"]))


class Workers:
    def __init__(self, config: edge_config.EdgeConfig, config_path: Path, desk: SpoolDesk, tickets: TicketKeyring,
                 sums: Sums, verdict: VerdictDesk | None):
        self.config = config
        self.verdict = verdict
        self.sums = sums
        self.config_path = Path(config_path).resolve()
        self.desk = desk
        self.tickets = tickets
        self.count = config.smtp.workers
        self.groups: list[list[socket.socket]] = []
        self.implicit_groups: list[list[socket.socket]] = []
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self._watchers: list[asyncio.Task] = []
        self._readers: dict[int, asyncio.Task] = {}
        self._links: dict[int, asyncio.Task] = {}   # each worker's verdict link, with [verdict]
        self._stopping = False

    async def start(self) -> None:
        """Listen, then start every worker and wait until each serves; OSError or WorkerFailed otherwise."""
        settings = self.config.smtp
        self.groups = [listen_group(host, port, self.count, SMTP_BACKLOG) for host, port in settings.listen]
        self.implicit_groups = [listen_group(host, port, self.count, SMTP_BACKLOG)
                                for host, port in settings.implicit_tls_listen]
        for index in range(self.count):
            await self._start(index)
        self._watchers = [asyncio.get_running_loop().create_task(self._watch(index)) for index in range(self.count)]

    def sockets(self, index: int) -> ListenSockets:
        return ListenSockets(tuple(group[index] for group in self.groups),
                             tuple(group[index] for group in self.implicit_groups))

    async def _start(self, index: int) -> None:
        owner_end, worker_end = desk_pair()
        asking, answering = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) if self.verdict else (None, None)
        share = self.sockets(index)
        handoff = Handoff(str(self.config_path), index, self.count, worker_end.fileno(),
                          tuple(s.fileno() for s in share.smtp), tuple(s.fileno() for s in share.implicit_tls),
                          self.tickets.share(time.time()).to_bytes().hex(), asking.fileno() if asking else -1)
        inherited = [handoff.desk_fd, *handoff.smtp_fds, *handoff.implicit_tls_fds]
        if asking is not None:
            inherited.append(handoff.verdict_fd)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay.edge.worker", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, pass_fds=inherited)
        finally:
            worker_end.close()
            if asking is not None:
                asking.close()
        self.desk.attach(owner_end, f"worker {index}")
        if answering is not None:
            reader, writer = await asyncio.open_unix_connection(sock=answering, limit=MAX_JSON)
            self._links[index] = asyncio.get_running_loop().create_task(
                serve_verdicts(self.verdict, reader, writer, str(index)))
        process.stdin.write(handoff.encode())
        await process.stdin.drain()
        process.stdin.close()
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)
        except asyncio.TimeoutError:
            line = b""
        if line != READY:
            if process.returncode is None:
                process.kill()
            status = await process.wait()
            raise WorkerFailed(f"edge worker {index} did not start (exit status {status}); its log says why")
        self.processes[index] = process
        self.sums.started(index)
        self._readers[index] = asyncio.get_running_loop().create_task(self._read(index, process))

    async def _read(self, index: int, process: asyncio.subprocess.Process) -> None:
        """A worker's stdout after READY: its metrics reports, until it exits."""
        while line := await process.stdout.readline():
            if line.startswith(PREFIX):
                self.sums.take(index, line.rstrip(b"\n"))
        self.sums.stopped(index)

    async def _watch(self, index: int) -> None:
        pause = 0.0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            status = await self.processes[index].wait()
            if self._stopping:
                return
            pause = restart_pause(pause, loop.time() - started, RESTART_PAUSE, YOUNG)
            log.warning("edge worker %d exited (status %s); starting it again in %.0f s; its clients' "
                        "connections wait in its backlog meanwhile", index, status, pause)
            while not self._stopping:
                await asyncio.sleep(pause)
                try:
                    await self._start(index)
                    log.info("edge worker %d serves again", index)
                    break
                except (OSError, WorkerFailed) as error:
                    pause = min(pause * 2, RESTART_PAUSE[1])
                    log.warning("%s; trying again in %.0f s", error, pause)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every worker (each finishes its commits under way), SIGKILL any still there after `timeout`."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        running = [p for p in self.processes.values() if p.returncode is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        if running:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=timeout)
            for process in running:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        for reader in self._readers.values():   # the last reports, written as each worker stopped
            await asyncio.wait([reader], timeout=timeout)
        for link in self._links.values():
            link.cancel()
        for group in self.groups + self.implicit_groups:
            for sock in group:
                sock.close()


class WorkerFailed(Exception):
    pass


def die_with_parent() -> None:
    """SIGKILL this process when the process that started it dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:   # PR_SET_PDEATHSIG = 1
        log.warning("cannot ask to die with the supervisor: %s", os.strerror(ctypes.get_errno()))
