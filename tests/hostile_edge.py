"""A compromised edge for home's tests: the real spool and spool service, in a thread, sealing what a test
gives them and answering what a test makes them answer.

    with hostile_edge(tmp_path / "edge") as edge:
        spool_id = edge.seal(metadata, message)      # sealed to home's key, any metadata, any bytes
        edge.lie("fetch", answer)                    # async answer(params, honest) -> (meta, tail) sent instead
        intake = make_intake(edge, dovecot)          # intake.toml pointing at it (tests/home_site.py)
        with run_intake(intake) as process: ...      # the real `yestls intake serve`
        edge.requests                                # [(method, params), ...] home sent, in order

HPKE's base mode authenticates no sender: whoever has home's public spool
key (every edge has it) seals files home opens. So an edge that was broken
into can seal any metadata and message bytes it likes, and answer the spool
protocol however it likes; this helper does both through the real
relay.spool.store.Spool and relay.spool.service.SpoolService, with an
`answer` in front of any method: it gets the request's parameters and
`honest()`, the real handler's (meta, tail), to change or ignore; it may
raise relay.rpc.RemoteError. It runs on the edge's own event loop (another
thread). The edge needs no oracle and no SMTP: what it serves is all home
ever sees of an edge.
"""

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from relay.audit import AuditLog
from relay.identity import generate_identity, load_identity
from relay.rpc import Frame, RpcConnection
from relay.spool import store
from relay.spool.keys import generate_spool_key, load_spool_private_key, parse_spool_public_key
from relay.spool.service import SpoolService
from relay.spool.store import Spool
from relay.tunnel import Peer

Answer = Callable[[dict, Callable[[], Awaitable[tuple[dict, bytes]]]], Awaitable[tuple[dict, bytes]]]

# What a real edge records besides the envelope (relay/edge/handler.py), for the intake's SPF/DKIM/DMARC.
CONNECTION = {"client_address": "127.0.0.1:2525", "helo": "sender.example.net", "tls": None}
# The trace header a real edge puts first inside the sealed message (tests/intake_mail.py's split_trace expects
# one): seal EDGE_RECEIVED + what the sender sent.
EDGE_RECEIVED = (b"Received: from sender.example.net ([127.0.0.1])\r\n\tby mx.example.org (YesTLS) with ESMTPS;\r\n"
                 b"\tSun, 29 Nov 2026 12:00:00 +0000\r\n")


@dataclass
class HostileEdge:
    directory: Path
    spool_key_path: Path        # home's private spool key: the intake's spool_key
    home_identity_path: Path    # home's identity, the spool service's one peer: the intake's identity_key
    spool: Spool
    service: SpoolService
    loop: asyncio.AbstractEventLoop
    spool_service_port: int
    honest_methods: dict = field(default_factory=dict)        # the service's own handlers, by method
    requests: list[tuple[str, dict]] = field(default_factory=list)

    @property
    def spool_private_key(self):
        return load_spool_private_key(self.spool_key_path)

    def seal(self, metadata: dict, message: bytes, *, spool_id: str | None = None) -> str:
        """A message in the spool as a compromised edge would seal it; its spool id (chosen by the edge too,
        when given: the spool draws it from os.urandom, replaced for the one call)."""
        if spool_id is None:
            return self.spool.accept({**CONNECTION, **metadata}, [message], size=len(message))
        chosen = bytes.fromhex(spool_id)
        real = os.urandom
        try:
            store.os.urandom = lambda n: chosen if n == len(chosen) else real(n)
            return self.spool.accept({**CONNECTION, **metadata}, [message], size=len(message))
        finally:
            store.os.urandom = real

    def sealed_file(self, spool_id: str) -> bytes:
        return self.spool.read(spool_id, 0, self.spool.size(spool_id))

    def spooled_ids(self) -> list[str]:
        return [entry.id for entry in self.spool.list()]

    def lie(self, method: str, answer: Answer) -> None:
        """From now on `method` is answered by `await answer(params, honest)` (see the module)."""
        honest = self.honest_methods[method]

        async def lying(connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
            params = {k: v for k, v in frame.meta.items() if k != "method"}
            return await answer(params, lambda: honest(connection, frame))

        self._set(method, lying)

    def honest(self, method: str) -> None:
        """`method` answers truthfully again."""
        self._set(method, self.honest_methods[method])

    def _set(self, method: str, handler) -> None:
        """Swap the handler on the edge's loop, and return once it is in place."""
        async def swap() -> None:
            self.service.gate.methods[method] = self._recorded(method, handler)

        asyncio.run_coroutine_threadsafe(swap(), self.loop).result(timeout=10)

    def _recorded(self, method: str, handler):
        async def recording(connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
            self.requests.append((method, {k: v for k, v in frame.meta.items() if k != "method"}))
            return await handler(connection, frame)

        return recording

    def fetched(self, spool_id: str) -> int:
        """How many fetch requests home sent for `spool_id`."""
        return sum(1 for method, params in self.requests if method == "fetch" and params.get("id") == spool_id)


@contextmanager
def hostile_edge(directory: Path, *, home: "HostileEdge | None" = None):
    """`home`: another edge whose home this one serves too (its spool key and home's identity); else new ones."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "home").mkdir(exist_ok=True)
    if home is None:
        spool_key_path = directory / "home" / "spool.key"
        public_key = parse_spool_public_key(generate_spool_key(spool_key_path))
        identity_path = directory / "home" / "intake-identity.key"
        generate_identity(identity_path)
    else:
        spool_key_path, identity_path = home.spool_key_path, home.home_identity_path
        public_key = home.spool.public_key
    peer = Peer(name="home", addresses=frozenset({"127.0.0.1"}), identity=load_identity(identity_path).public_key(),
                max_connections=8, max_in_flight=128, rate=1000.0, burst=1000)
    spool = Spool(directory / "spool", public_key, max_bytes=1 << 34, max_files=1_000_000)
    audit = AuditLog(directory / "spool-audit.jsonl")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="hostile-edge", daemon=True)
    thread.start()

    async def start() -> tuple[SpoolService, list[asyncio.Server]]:
        service = SpoolService(spool, (peer,), audit, CollectorRegistry())
        return service, await service.serve((("127.0.0.1", 0),))

    service, servers = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    edge = HostileEdge(directory, spool_key_path, identity_path, spool, service, loop,
                       servers[0].sockets[0].getsockname()[1], dict(service.gate.methods))
    for method in edge.honest_methods:
        edge.honest(method)
    try:
        yield edge
    finally:
        async def stop() -> None:
            for server in servers:
                server.close()
                await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        audit.close()
        spool.close()
