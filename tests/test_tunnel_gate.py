"""The tunnel gate (relay/tunnel.py) under attack from the peer's own host, in process, over real loopback.

Any process on the edge (or at home) can connect from the allowlisted
address. What it must not get: the genuine peer locked out by connections
that never authenticate (silent, half a frame, a challenge taken, pings, a
wrong answer), however many; a connection held open past the auth deadline
by trickling or pinging; the audit log or the service's log flooded by
refusals (they are summarized past the rate, and every one is counted); a
big line from a big field; unbounded memory from a peer that never reads.
The genuine peer authenticates and is served through all of it, and an
authenticated connection is never evicted. The oracle's and the spool's
gates are this one (tests/oracle/test_oracle_service.py runs the same attacks
against a real oracle process and its signatures). Every wait is bounded.
"""

import asyncio
import base64
import json
import logging
import socket

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from relay import rpc, tunnel
from relay.audit import MAX_LINE, AuditLog
from relay.config import ConfigError, Table
from relay.identity import public_key_text
from relay.rpc import HEADER, VERSION, Code, Kind, RemoteError
from relay.spool.metrics import SpoolServiceMetrics
from relay.tunnel import Peer, Reason, TunnelService

from .hostile_peers import (
    close_all,
    closed_by_peer,
    open_sockets,
    prove,
    request,
    send,
    send_unless_closed,
    send_until_stalled,
    still_open,
)

TIMEOUT = 30.0
SERVICE = "test"
MAX_FRAME = 64 * 1024
BIG = 1 << 20


def run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


PEER_OPTIONS = {"max_connections": 2, "max_in_flight": 32, "rate": 50.0, "burst": 100}


class Gate:
    """A TunnelService on 127.0.0.1 with `echo` and `big` (1 MiB) behind it, a real AuditLog and real metrics."""

    def __init__(self, directory, *, audit_options: dict | None = None, more_peers: tuple[Peer, ...] = (),
                 **peer_options):
        self.identity = Ed25519PrivateKey.generate()
        self.peer = Peer(name="home", addresses=frozenset({"127.0.0.1"}), identity=self.identity.public_key(),
                         **{**PEER_OPTIONS, **peer_options})
        self.audit_path = directory / "audit.jsonl"
        self.audit = AuditLog(self.audit_path, **(audit_options or {}))
        self.registry = CollectorRegistry()
        self.service = TunnelService(SERVICE, (self.peer, *more_peers), {"echo": self._echo, "big": self._big},
                                     self.audit, SpoolServiceMetrics(self.registry), max_frame=MAX_FRAME)
        self.server_sides: list[rpc.RpcConnection] = []
        self.servers: list[asyncio.Server] = []

    async def _echo(self, connection, frame):
        return {"echo": frame.meta.get("n")}, frame.tail

    async def _big(self, connection, frame):
        return {}, b"b" * BIG

    async def start(self) -> "Gate":
        make = self.service.new_connection

        def recorded():
            connection = make()
            self.server_sides.append(connection)
            return connection

        loop = asyncio.get_running_loop()
        self.servers = [await loop.create_server(recorded, "127.0.0.1", 0)]
        return self

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]

    async def connect(self, **options) -> rpc.RpcConnection:
        return await asyncio.wait_for(rpc.connect("127.0.0.1", self.port, max_frame=4 * BIG, **options), 5)

    async def genuine(self) -> rpc.RpcConnection:
        """The peer itself: connect, hello, auth, as relay.oracle.client and relay.spool.client do."""
        connection = await self.connect()
        await tunnel.authenticate(connection, SERVICE, self.identity, 5)
        return connection

    def refusals(self, reason: str) -> float:
        return self.registry.get_sample_value("yestls_spool_refusals_total", {"reason": reason}) or 0.0

    def audit_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for connection in self.server_sides:
            if connection.transport is not None:
                connection.transport.abort()
        self.audit.close()


def with_gate(tmp_path, test, **options):
    async def main():
        gate = await Gate(tmp_path, **options).start()
        try:
            return await test(gate)
        finally:
            await gate.stop()

    return run(main())


async def proved_and_served(gate: Gate, connection: rpc.RpcConnection, n: int) -> None:
    reply = await connection.call("echo", {"n": n}, b"tail", timeout=5)
    assert reply.meta == {"echo": n} and reply.tail == b"tail"


# --- what a connection that never authenticates does ----------------------------------------------------------

async def silent(sock, gate):
    pass


async def takes_a_challenge(sock, gate):
    await send(sock, request(1, "hello"))


async def sends_half_a_header(sock, gate):
    await send(sock, request(1, "hello")[:6])


async def announces_a_big_frame(sock, gate):
    await send(sock, HEADER.pack(VERSION, Kind.REQUEST, 0, 1, MAX_FRAME) + b"\x00" * 100)


async def pings(sock, gate):
    await send(sock, b"".join(request(n, "ping") for n in range(50)))


async def answers_wrongly(sock, gate):
    await send(sock, request(1, "hello") + request(2, "auth", {"signature": base64.b64encode(bytes(64)).decode()}))


async def answers_with_another_key(sock, gate):
    """A stranger's key, on a challenge read properly: refused, and still waiting."""
    await prove(sock, SERVICE, Ed25519PrivateKey.generate())


HOLDERS = {f.__name__: f for f in (silent, takes_a_challenge, sends_half_a_header, announces_a_big_frame, pings,
                                   answers_wrongly, answers_with_another_key)}


@pytest.mark.parametrize("how", list(HOLDERS))
def test_connections_that_never_authenticate_cannot_lock_the_peer_out(tmp_path, how):
    """Forty of them with room for four: the oldest are closed as new ones come, and the peer's two connections
    (max_connections) prove its key and are served. Connections opened after that do not touch them."""
    async def test(gate):
        holders = await open_sockets(gate.port, 40)
        for sock in holders:
            await HOLDERS[how](sock, gate)
        try:
            peers = [await gate.genuine() for _ in range(2)]
            for n, connection in enumerate(peers):
                await proved_and_served(gate, connection, n)
            later = await open_sockets(gate.port, 40)
            for sock in later:
                await HOLDERS[how](sock, gate)
            for n, connection in enumerate(peers):
                await proved_and_served(gate, connection, 10 + n)
            evicted_first = [await closed_by_peer(sock, 5) for sock in holders]
            waiting = [await still_open(sock) for sock in later[-4:]]
            for connection in peers:
                connection.close()
            close_all(later)
            return evicted_first, waiting, gate.refusals(Reason.EVICTED)
        finally:
            close_all(holders)

    evicted_first, waiting, evicted = with_gate(tmp_path, test, max_unauthenticated=4, auth_timeout=60)
    assert all(evicted_first), "an old unauthenticated connection was left open"
    assert all(waiting), "the newest waiting connections should still be open"
    # 36 of the first 40 went as they came; the peer's first connection took the place of a 37th (its second
    # found room: the first had left the waiting ones on proving its key); the later 40 pushed out the last 3
    # and 36 of their own.
    assert evicted == 36 + 1 + 3 + 36


def test_a_fifth_authenticated_connection_is_answered_busy_and_closed_and_holders_do_not_count(tmp_path):
    async def test(gate):
        holders = await open_sockets(gate.port, 3)
        peers = [await gate.genuine() for _ in range(2)]
        extra = await gate.connect()
        with pytest.raises(RemoteError) as refused:
            await tunnel.authenticate(extra, SERVICE, gate.identity, 5)
        await asyncio.wait_for(extra.closed, 5)
        assert all([await still_open(sock) for sock in holders])
        for n, connection in enumerate(peers):
            await proved_and_served(gate, connection, n)
        # A new challenge on a proved connection gives its slot back: another connection may take it.
        await peers[0].call("hello", timeout=5)
        with pytest.raises(RemoteError):
            await peers[0].call("echo", timeout=5)
        third = await gate.genuine()
        await proved_and_served(gate, third, 3)
        close_all(holders)
        for connection in peers + [third]:
            connection.close()
        return refused.value, gate.audit_lines(), gate.refusals(Reason.TOO_MANY_CONNECTIONS)

    refused, lines, counted = with_gate(tmp_path, test, max_unauthenticated=4, auth_timeout=60)
    assert refused.code == Code.BUSY and "2 authenticated connections" in refused.message
    assert counted == 1
    assert [(line["method"], line["outcome"]) for line in lines if line["outcome"].startswith("refused:")][0] == \
        ("auth", "refused:too_many_connections")


def test_an_authenticated_connection_is_served_through_a_reconnect_flood(tmp_path):
    """An attacker that reconnects as fast as it is evicted: the peer's proved connection is never evicted."""
    async def test(gate):
        peer = await gate.genuine()
        stop = asyncio.Event()

        async def churn():
            opened = 0
            held: list = []
            while not stop.is_set() and opened < 2000:
                held += await open_sockets(gate.port, 1)
                await send(held[-1], request(1, "hello"))
                opened += 1
                if len(held) > 8:
                    close_all(held[:-8])
                    held = held[-8:]
            close_all(held)
            return opened

        flood = asyncio.ensure_future(churn())
        for n in range(200):
            await proved_and_served(gate, peer, n)
            await asyncio.sleep(0)
        stop.set()
        opened = await flood
        assert not peer.closed.done()
        peer.close()
        return opened, gate.refusals(Reason.EVICTED)

    opened, evicted = with_gate(tmp_path, test, max_unauthenticated=4, auth_timeout=60)
    assert opened > 8 and evicted >= 1


# --- the auth deadline -----------------------------------------------------------------------------------------

async def keeps_pinging(sock, gate):
    for n in range(200):
        await send(sock, request(n, "ping"))
        await asyncio.sleep(0.1)


async def trickles_a_frame(sock, gate):
    frame = request(1, "hello", {"padding": "p" * 1000})
    for byte in range(len(frame)):
        await send(sock, frame[byte:byte + 1])
        await asyncio.sleep(0.1)


async def keeps_asking_challenges(sock, gate):
    for n in range(200):
        await send(sock, request(n, "hello"))
        await asyncio.sleep(0.1)


async def proves_then_asks_a_new_challenge(sock, gate):
    assert await prove(sock, SERVICE, gate.identity)
    await send(sock, request(3, "hello"))


SLOW = {f.__name__: f for f in (silent, takes_a_challenge, sends_half_a_header, announces_a_big_frame,
                                answers_wrongly, keeps_pinging, trickles_a_frame, keeps_asking_challenges,
                                proves_then_asks_a_new_challenge)}


def test_a_connection_that_does_not_authenticate_in_time_is_closed_whatever_it_does(tmp_path):
    async def test(gate):
        peer = await gate.genuine()
        socks = await open_sockets(gate.port, len(SLOW))
        behaviours = [asyncio.ensure_future(behave(sock, gate)) for behave, sock in zip(SLOW.values(), socks)]
        closed = [await closed_by_peer(sock, 15) for sock in socks]
        for behaviour in behaviours:
            behaviour.cancel()
        await asyncio.gather(*behaviours, return_exceptions=True)
        close_all(socks)
        # The proved connection is older than all of them, and still served.
        await proved_and_served(gate, peer, 1)
        peer.close()
        return dict(zip(SLOW, closed)), gate.audit_lines(), gate.refusals(Reason.AUTH_TIMEOUT)

    closed, lines, counted = with_gate(tmp_path, test, auth_timeout=1.0)
    assert closed == {name: True for name in SLOW}
    assert counted == len(SLOW)
    timeouts = [line for line in lines if line["outcome"] == "refused:auth_timeout"]
    assert len(timeouts) == len(SLOW)
    assert all(line["peer"] == "home" and line["authenticated"] is False and line["method"] == "connect"
               for line in timeouts)


# --- floods: counted in full, audited within the rate ------------------------------------------------------------

def test_a_flood_of_refusals_is_counted_in_full_and_summarized_in_the_audit(tmp_path, caplog):
    requests, bad_frames, strangers = 3000, 60, 60

    async def test(gate):
        unproved = await gate.connect()
        for _ in range(0, requests, 30):
            results = await asyncio.gather(*(unproved.call("echo", timeout=5) for _ in range(30)),
                                           return_exceptions=True)
            assert all(isinstance(r, RemoteError) and r.code == Code.NOT_AUTHENTICATED for r in results)
        unproved.close()
        for _ in range(bad_frames):
            [sock] = await open_sockets(gate.port, 1)
            await send(sock, HEADER.pack(2, Kind.REQUEST, 0, 1, 6) + b"\x00\x00\x00\x02{}")
            assert await closed_by_peer(sock, 5)
            sock.close()
        for _ in range(strangers):
            [sock] = await open_sockets(gate.port, 1, local_host="127.0.0.2")
            assert await closed_by_peer(sock, 5)
            sock.close()
        # The peer's own refusals are another source, with its own budget.
        peer = await gate.genuine()
        with pytest.raises(RemoteError):
            await peer.call("decrypt", timeout=5)
        peer.close()
        counted = {reason: gate.refusals(reason) for reason in
                   (Code.NOT_AUTHENTICATED, Reason.BAD_FRAME, Reason.PEER_NOT_ALLOWED, Code.UNKNOWN_METHOD)}
        return counted

    with caplog.at_level(logging.INFO):
        counted = with_gate(tmp_path, test, audit_options={"refusal_rate": 0.001, "refusal_burst": 5})
    assert counted == {Code.NOT_AUTHENTICATED: requests, Reason.BAD_FRAME: bad_frames,
                       Reason.PEER_NOT_ALLOWED: strangers, Code.UNKNOWN_METHOD: 1}
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    refused = [line for line in lines if line["outcome"].startswith("refused:")]
    summaries = [line for line in lines if line["outcome"] == "summarized"]
    assert len(lines) < 40, f"{len(lines)} audit lines for {requests + bad_frames + strangers} refusals"
    # Written or summarized, each refusal is in the audit exactly once.
    for outcome, total in (("refused:not_authenticated", requests), ("refused:bad_frame", bad_frames),
                           ("refused:peer_not_allowed", strangers)):
        written = sum(line["outcome"] == outcome for line in refused)
        assert written + sum(s["outcomes"].get(outcome, 0) for s in summaries) == total, outcome
    sources = {(s["peer"], s.get("authenticated")) for s in summaries}
    assert sources == {("home", False), ("127.0.0.2", None)}
    assert [line["method"] for line in refused if line.get("authenticated") is not False
            and line["peer"] == "home"] == ["decrypt"]
    # The service's own log says no more than the audit does.
    warnings = [r.getMessage() for r in caplog.records if r.name in ("yestls.tunnel", "yestls.rpc")]
    assert len(warnings) <= 2 * 5 and all(len(message) < 300 for message in warnings)


# --- big fields ------------------------------------------------------------------------------------------------

BIG_REQUESTS = {
    "a 1 MiB method (over the frame cap)": request(1, "m" * BIG),
    "a 60 KiB method": request(1, "m" * 60_000),
    "a method that is an object": request(1, {"x" * 100: ["y" * 100] * 200}),
    "a method that is a number": request(1, 10 ** 4000),
}


@pytest.mark.parametrize("name", list(BIG_REQUESTS))
@pytest.mark.parametrize("proved", [False, True], ids=["unauthenticated", "authenticated"])
def test_big_fields_make_bounded_audit_lines(tmp_path, name, proved, caplog):
    async def test(gate):
        [sock] = await open_sockets(gate.port, 1)
        if proved:
            assert await prove(sock, SERVICE, gate.identity)
        await send_unless_closed(sock, BIG_REQUESTS[name])  # over the cap: refused from its header, maybe closed early
        for _ in range(200):
            if any(line["outcome"].startswith("refused:") for line in gate.audit_lines()):
                break
            await asyncio.sleep(0.01)
        sock.close()
        return (tmp_path / "audit.jsonl").read_bytes().splitlines(keepends=True)

    with caplog.at_level(logging.INFO):
        raw = with_gate(tmp_path, test)
    refused = [line for line in raw if b'"refused:' in line]
    assert refused, raw
    for line in raw:
        assert len(line) <= MAX_LINE
        json.loads(line)
    assert all(len(r.getMessage()) < 400 for r in caplog.records)


# --- backpressure through the gate -------------------------------------------------------------------------------

def test_a_proved_peer_that_never_reads_its_answers_holds_a_bounded_buffer(tmp_path):
    """It asks for 1 MiB answers and reads nothing: the service stops reading it, holds at most the high-water mark
    and one answer, and serves another connection meanwhile."""
    async def test(gate):
        [sock] = await open_sockets(gate.port, 1, receive_buffer=4096)
        assert await prove(sock, SERVICE, gate.identity)
        server_side = gate.server_sides[-1]
        for _ in range(500):
            if server_side.state.get("authenticated"):
                break
            await asyncio.sleep(0.01)
        assert server_side.state["authenticated"]
        server_side.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = await send_until_stalled(sock, request(9, "big"), lambda: not server_side.transport.is_reading(),
                                        limit=16 << 20)
        assert sent < 16 << 20, "the service kept reading from a peer that reads nothing"
        buffered = server_side.transport.get_write_buffer_size()
        other = await gate.genuine()
        await proved_and_served(gate, other, 1)
        other.close()
        sock.close()
        return buffered

    buffered = with_gate(tmp_path, test)
    assert BIG // 2 < buffered <= rpc.WRITE_HIGH_WATER + BIG + 1024, buffered


# --- what each peer may call ([[peer]] methods) ------------------------------------------------------------------

def test_a_peer_limited_to_some_methods_is_refused_the_others_audited_and_counted(tmp_path, caplog):
    async def test(gate):
        connection = await gate.genuine()
        await proved_and_served(gate, connection, 1)
        with pytest.raises(RemoteError) as refused:
            await connection.call("big", timeout=5)
        await proved_and_served(gate, connection, 2)  # the connection goes on
        with pytest.raises(RemoteError) as unknown:
            await connection.call("nothing", timeout=5)
        connection.close()
        return refused.value, unknown.value, gate.audit_lines(), gate.refusals(Code.NOT_PERMITTED)

    refused, unknown, lines, counted = with_gate(tmp_path, test, methods=frozenset({"echo"}))
    assert refused.code == Code.NOT_PERMITTED == "not_permitted" and "'big'" in refused.message
    assert unknown.code == Code.UNKNOWN_METHOD
    assert counted == 1
    assert {"peer": "home", "method": "big", "outcome": "refused:not_permitted"}.items() <= \
        next(line for line in lines if line["method"] == "big").items()
    assert any("home called big" in r.getMessage() for r in caplog.records)


def test_two_peers_on_one_address_are_told_apart_by_the_key_they_prove(tmp_path):
    """Home's intake (every method) and home's ACME client (echo only) share home's tunnel address."""
    acme_key = Ed25519PrivateKey.generate()
    acme = Peer(name="acme", addresses=frozenset({"127.0.0.1"}), identity=acme_key.public_key(),
                **{**PEER_OPTIONS, "max_connections": 1}, methods=frozenset({"echo"}))

    async def test(gate):
        intake = await gate.genuine()
        tokens = await gate.connect()
        await tunnel.authenticate(tokens, SERVICE, acme_key, 5)
        await proved_and_served(gate, tokens, 1)
        with pytest.raises(RemoteError) as refused:
            await tokens.call("big", timeout=5)
        big = await intake.call("big", timeout=5)
        # Each counts against its own max_connections: the ACME client's one slot is taken, the intake's is not.
        second_acme = await gate.connect()
        with pytest.raises(RemoteError) as busy:
            await tunnel.authenticate(second_acme, SERVICE, acme_key, 5)
        second_intake = await gate.genuine()
        await proved_and_served(gate, second_intake, 2)
        # A stranger's key is neither.
        stranger = await gate.connect()
        with pytest.raises(RemoteError) as strange:
            await tunnel.authenticate(stranger, SERVICE, Ed25519PrivateKey.generate(), 5)
        for connection in (intake, tokens, second_intake, stranger):
            connection.close()
        return refused.value, len(big.tail), busy.value, strange.value, gate.audit_lines()

    refused, big, busy, strange, lines = with_gate(tmp_path, test, more_peers=(acme,))
    assert refused.code == Code.NOT_PERMITTED and big == BIG
    assert busy.code == Code.BUSY and "acme has 1 authenticated" in busy.message
    assert strange.code == Code.NOT_AUTHENTICATED
    assert [line["peer"] for line in lines if line["method"] == "auth" and line["outcome"] == "ok"] == \
        ["home", "acme", "home"]


def test_a_peer_allowed_a_method_the_service_lacks_is_a_configuration_error(tmp_path):
    peer = Peer(name="acme", addresses=frozenset({"127.0.0.1"}), identity=Ed25519PrivateKey.generate().public_key(),
                **PEER_OPTIONS, methods=frozenset({"echo", "acme_challenge_put"}))
    with pytest.raises(ValueError, match="acme: the test service has no method acme_challenge_put"):
        TunnelService(SERVICE, (peer,), {"echo": None}, None, None, max_frame=MAX_FRAME)


def peers_config(tmp_path, *peers: str) -> Table:
    path = tmp_path / "service.toml"
    path.write_text("".join(f"[[peer]]\naddresses = [\"10.77.0.2\"]\n{peer}\n" for peer in peers))
    return Table.load(path)


def identity_line() -> str:
    return f'identity = "{public_key_text(Ed25519PrivateKey.generate().public_key())}"\n'


def test_peer_methods_in_the_config(tmp_path):
    intake, acme = tunnel.load_peers(peers_config(
        tmp_path, f'name = "intake"\n{identity_line()}',
        f'name = "acme"\n{identity_line()}methods = ["acme_challenge_put", "acme_challenge_delete"]'), "home")
    assert intake.methods is None and intake.may_call("fetch")
    assert acme.methods == {"acme_challenge_put", "acme_challenge_delete"}
    assert acme.may_call("acme_challenge_put") and not acme.may_call("fetch")


@pytest.mark.parametrize("peers, error", [
    (['name = "a"\nmethods = []'], "methods: [] is not valid"),
    (['name = "a"\nmethods = ["fetch", 3]'], "is not a list of method names"),
    (['name = "a"\nmethods = "fetch"'], "methods: 'fetch' is not valid"),
    (['name = "a"', 'name = "a"'], "the same name"),
])
def test_bad_peer_methods_and_names_are_refused(tmp_path, peers, error):
    with pytest.raises(ConfigError) as refused:
        tunnel.load_peers(peers_config(tmp_path, *(f"{p}\n{identity_line()}" for p in peers)), "home")
    assert error in str(refused.value)


def test_two_peers_with_one_key_are_refused(tmp_path):
    same = identity_line()
    with pytest.raises(ConfigError, match="the same identity"):
        tunnel.load_peers(peers_config(tmp_path, f'name = "a"\n{same}', f'name = "b"\n{same}'), "home")
