"""The spool service (relay/spool/service.py) and home's client (relay/spool/client.py), over real loopback.

A real TunnelService named "spool" serves a real Spool in this process; home
connects with SpoolClient and its identity key. What home sees: nothing
before it proves its key, messages listed in order, sealed files fetched in
pieces byte for byte, acknowledged messages gone from the edge's disk, and a
long-poll that answers as soon as a message is accepted. What a wrong caller
sees: not_authenticated, not_found, bad_request, or a closed connection when
it is not on the allowlist — each audited and counted. Every wait is bounded.
"""

import asyncio
import base64
import json
import os
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from relay import rpc, tunnel
from relay.audit import AuditLog
from relay.rpc import Code, RemoteError
from relay.spool import service as service_module
from relay.spool.client import SpoolClient
from relay.spool.keys import generate_spool_key, load_spool_private_key, parse_spool_public_key
from relay.spool.metrics import SpoolMetrics
from relay.spool.protocol import MAX_FETCH, MAX_FRAME, SERVICE
from relay.spool.sealed import unseal
from relay.spool.service import NOT_FOUND, SpoolService
from relay.spool.store import Spool
from relay.tunnel import Peer

TIMEOUT = 20.0
METADATA = {"envelope": {"mail_from": "alice@example.net", "rcpt_tos": ["bob@example.org"]}}


def run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    public = parse_spool_public_key(generate_spool_key(directory / "spool.key"))
    return public, load_spool_private_key(directory / "spool.key")


class Edge:
    """The edge's half: a spool, its service on 127.0.0.1, the audit log and the metrics registry."""

    def __init__(self, directory, public_key, extra_methods=None):
        self.home_identity = Ed25519PrivateKey.generate()
        self.spool = Spool(directory / "spool", public_key, 1 << 30, 10_000)
        self.audit_path = directory / "audit.jsonl"
        self.audit = AuditLog(self.audit_path)
        self.registry = CollectorRegistry()
        SpoolMetrics(self.spool, self.registry)
        peer = Peer(name="home", addresses=frozenset({"127.0.0.1"}), identity=self.home_identity.public_key(),
                    max_connections=4, max_in_flight=32, rate=50.0, burst=100)
        self.service = SpoolService(self.spool, (peer,), self.audit, self.registry, extra_methods=extra_methods)
        self.servers: list[asyncio.Server] = []

    async def start(self) -> "Edge":
        self.servers = await self.service.serve((("127.0.0.1", 0),))
        return self

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]

    def client(self, identity=None, **options) -> SpoolClient:
        return SpoolClient("127.0.0.1", self.port, identity or self.home_identity, timeout=5, **options)

    async def accept(self, message: bytes) -> str:
        """As the SMTP layer does it: in a thread, durable when it returns."""
        return await asyncio.to_thread(self.spool.accept, METADATA, [message], size=len(message))

    def audit_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
            await server.wait_closed()
        self.audit.close()
        self.spool.close()


def with_edge(tmp_path, keys, test, **options):
    async def main():
        edge = await Edge(tmp_path, keys[0], **options).start()
        try:
            return await test(edge)
        finally:
            await edge.stop()

    return run(main())


async def raw_connection(edge: Edge, local_host: str | None = None) -> rpc.RpcConnection:
    loop = asyncio.get_running_loop()
    local = (local_host, 0) if local_host else None
    _, connection = await asyncio.wait_for(loop.create_connection(
        lambda: rpc.RpcConnection(max_frame=MAX_FRAME), "127.0.0.1", edge.port, local_addr=local), 5)
    return connection


async def home_connection(edge: Edge) -> rpc.RpcConnection:
    connection = await raw_connection(edge)
    await tunnel.authenticate(connection, SERVICE, edge.home_identity, 5)
    return connection


async def refusal(call) -> RemoteError:
    with pytest.raises(RemoteError) as refused:
        await call
    return refused.value


# --- the identity proof and the allowlist --------------------------------------------------------------------

def test_nothing_is_served_before_home_proves_its_key(tmp_path, keys):
    async def test(edge):
        await edge.accept(b"secret-ish")
        connection = await raw_connection(edge)
        for method in ("list", "fetch", "ack", "wait", "stats"):
            error = await refusal(connection.call(method, {"id": "ab" * 16}, timeout=5))
            assert error.code == Code.NOT_AUTHENTICATED
        hello = await connection.call("hello", timeout=5)
        assert hello.meta["service"] == "yestls-spool"
        connection.close()
        assert edge.spool.stats().depth == 1
        return edge.metric("yestls_spool_refusals_total", reason=Code.NOT_AUTHENTICATED)

    assert with_edge(tmp_path, keys, test) == 5


def test_a_key_that_is_not_homes_is_refused(tmp_path, keys):
    async def test(edge):
        stranger = edge.client(identity=Ed25519PrivateKey.generate())
        error = await refusal(stranger.connect())
        assert error.code == Code.NOT_AUTHENTICATED
        assert stranger.connection is None
        with pytest.raises(ConnectionError):
            await stranger.list()
        # The oracle's answer is worthless here: the service name is in the signed message.
        connection = await raw_connection(edge)
        hello = await connection.call("hello", timeout=5)
        transport = connection.transport
        message = tunnel.auth_message("oracle", bytes.fromhex(hello.meta["challenge"]),
                                      transport.get_extra_info("peername"), transport.get_extra_info("sockname"))
        signature = base64.b64encode(edge.home_identity.sign(message)).decode()
        error = await refusal(connection.call("auth", {"signature": signature}, timeout=5))
        assert error.code == Code.NOT_AUTHENTICATED
        connection.close()
        return [(line["method"], line["outcome"]) for line in edge.audit_lines()]

    assert with_edge(tmp_path, keys, test) == [("auth", "refused:not_authenticated")] * 2


def test_a_peer_outside_the_allowlist_is_disconnected_and_audited(tmp_path, keys):
    async def test(edge):
        connection = await raw_connection(edge, local_host="127.0.0.2")
        with pytest.raises(ConnectionError):
            await connection.call("hello", timeout=5)
        await asyncio.wait_for(connection.closed, 5)
        client = edge.client(source="127.0.0.2")
        with pytest.raises((ConnectionError, OSError)):
            await client.connect()
        return edge.audit_lines(), edge.metric("yestls_spool_refusals_total", reason="peer_not_allowed")

    lines, refusals = with_edge(tmp_path, keys, test)
    assert refusals == 2
    assert [(line["peer"], line["method"], line["outcome"]) for line in lines] == \
        [("127.0.0.2", "connect", "refused:peer_not_allowed")] * 2


# --- list, fetch, ack ---------------------------------------------------------------------------------------

def test_home_lists_fetches_in_pieces_unseals_and_acknowledges(tmp_path, keys):
    messages = [b"Subject: one\r\n\r\n1\r\n", os.urandom(3 * MAX_FETCH + 12345), b"Subject: three\r\n\r\n3\r\n"]

    async def test(edge):
        ids = [await edge.accept(message) for message in messages]
        async with edge.client() as home:
            listed = (await home.list()).messages
            assert [m.id for m in listed] == ids
            assert [m.size for m in listed] == [edge.spool.size(i) for i in ids]
            assert [m.accepted for m in listed] == sorted(m.accepted for m in listed)
            for spool_id, message in zip(ids, messages):
                sealed = await home.fetch(spool_id)
                assert sealed == edge.spool.read(spool_id, 0, edge.spool.size(spool_id))
                opened = unseal(sealed, keys[1])
                assert (opened.spool_id.hex(), opened.metadata, opened.message) == (spool_id, METADATA, message)
                await home.ack(spool_id)
                assert spool_id not in [m.id for m in (await home.list()).messages]
            assert (await home.list()).messages == []
            assert os.listdir(edge.spool.queue_dir) == []
            stats = await home.stats()
            assert (stats["depth"], stats["bytes"], stats["accepted"]) == (0, 0, 3)
        return ids, edge.audit_lines(), edge.metric("yestls_spool_requests_total", method="fetch", outcome="ok")

    ids, lines, fetches = with_edge(tmp_path, keys, test)
    assert fetches == 1 + 4 + 1  # the big file took four pieces
    outcomes = [(line["method"], line.get("id"), line["outcome"]) for line in lines]
    assert outcomes == [("auth", None, "ok")] + [entry for spool_id in ids for entry in
                                                 [("fetch", spool_id, "ok"), ("ack", spool_id, "deleted")]]


def test_fetch_returns_the_bytes_asked_for_capped_at_the_frame(tmp_path, keys):
    async def test(edge):
        spool_id = await edge.accept(os.urandom(MAX_FETCH + 5000))
        size = edge.spool.size(spool_id)
        whole = edge.spool.read(spool_id, 0, size)
        connection = await home_connection(edge)
        piece = await connection.call("fetch", {"id": spool_id, "offset": 100, "length": 50}, timeout=5)
        assert piece.meta == {"size": size} and piece.tail == whole[100:150]
        capped = await connection.call("fetch", {"id": spool_id, "offset": 0, "length": 10 * MAX_FETCH}, timeout=5)
        assert capped.tail == whole[:MAX_FETCH]
        default = await connection.call("fetch", {"id": spool_id}, timeout=5)
        assert default.tail == whole[:MAX_FETCH]
        end = await connection.call("fetch", {"id": spool_id, "offset": size}, timeout=5)
        assert end.tail == b""
        error = await refusal(connection.call("fetch", {"id": spool_id, "offset": size + 1}, timeout=5))
        assert error.code == Code.BAD_REQUEST and "past the end" in error.message
        connection.close()

    with_edge(tmp_path, keys, test)


def test_unknown_and_acknowledged_ids_are_not_found(tmp_path, keys):
    async def test(edge):
        spool_id = await edge.accept(b"once")
        async with edge.client() as home:
            await home.ack(spool_id)
            for call in (home.ack(spool_id), home.fetch(spool_id), home.fetch("0" * 32), home.ack("f" * 32)):
                error = await refusal(call)
                assert error.code == NOT_FOUND
        return edge.metric("yestls_spool_refusals_total", reason=NOT_FOUND)

    assert with_edge(tmp_path, keys, test) == 4


BAD_PARAMS = [
    ("fetch", {}),
    ("fetch", {"id": "../../../etc/passwd"}),
    ("fetch", {"id": "AB" * 16}),
    ("fetch", {"id": "ab" * 16 + "/"}),
    ("fetch", {"id": 12}),
    ("fetch", {"id": ["ab" * 16]}),
    ("fetch", {"id": "ab" * 16, "offset": -1}),
    ("fetch", {"id": "ab" * 16, "offset": 1.5}),
    ("fetch", {"id": "ab" * 16, "offset": True}),
    ("fetch", {"id": "ab" * 16, "length": "10"}),
    ("ack", {}),
    ("ack", {"id": "00000000000000000000-" + "ab" * 16}),
    ("list", {"after": "nope"}),
    ("list", {"limit": 0}),
    ("wait", {"after": "x" * 32}),
    ("wait", {"timeout": -1}),
    ("wait", {"timeout": "soon"}),
    ("wait", {"timeout": False}),
]


def test_bad_parameters_are_bad_requests_and_change_nothing(tmp_path, keys):
    async def test(edge):
        spool_id = await edge.accept(b"keep me")
        connection = await home_connection(edge)
        for method, params in BAD_PARAMS:
            error = await refusal(connection.call(method, params, timeout=5))
            assert error.code == Code.BAD_REQUEST, (method, params, error)
        error = await refusal(connection.call("decrypt", {"id": spool_id}, timeout=5))
        assert error.code == Code.UNKNOWN_METHOD
        assert [e.id for e in edge.spool.list()] == [spool_id]
        connection.close()
        return edge.metric("yestls_spool_refusals_total", reason=Code.BAD_REQUEST)

    assert with_edge(tmp_path, keys, test) == len(BAD_PARAMS)


def test_list_pages_through_a_long_spool_in_order(tmp_path, keys, monkeypatch):
    monkeypatch.setattr(service_module, "MAX_LIST", 2)

    async def test(edge):
        ids = [await edge.accept(bytes([i])) for i in range(5)]
        connection = await home_connection(edge)
        page = await connection.call("list", {"limit": 1000}, timeout=5)
        assert [m["id"] for m in page.meta["messages"]] == ids[:2] and page.meta["more"] is True
        connection.close()
        async with edge.client() as home:
            return ids, [m.id for m in (await home.list()).messages]

    ids, listed = with_edge(tmp_path, keys, test)
    assert listed == ids


# --- the long-poll -----------------------------------------------------------------------------------------

def test_wait_answers_as_soon_as_a_message_is_accepted(tmp_path, keys):
    async def test(edge):
        async with edge.client() as home:
            waiting = asyncio.ensure_future(home.wait(None, 50))
            await asyncio.sleep(0.05)   # let the request reach the edge; not a timing assertion
            assert not waiting.done()
            first = await edge.accept(b"first")
            assert await asyncio.wait_for(waiting, TIMEOUT) is True
            # After the newest id: nothing yet; then the next accept wakes it.
            assert await home.wait(first, 0.05) is False
            waiting = asyncio.ensure_future(home.wait(first, 50))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            second = await edge.accept(b"second")
            assert await asyncio.wait_for(waiting, TIMEOUT) is True
            assert [m.id for m in (await home.list()).messages] == [first, second]
            # Several waits at once all wake.
            waits = [asyncio.ensure_future(home.wait(second, 50)) for _ in range(3)]
            await asyncio.sleep(0.05)
            await edge.accept(b"third")
            assert await asyncio.wait_for(asyncio.gather(*waits), TIMEOUT) == [True] * 3

    with_edge(tmp_path, keys, test)


def test_the_edge_caps_how_long_a_wait_holds(tmp_path, keys, monkeypatch):
    monkeypatch.setattr(service_module, "MAX_WAIT", 0.05)

    async def test(edge):
        connection = await home_connection(edge)
        reply = await connection.call("wait", {"after": None, "timeout": 10 ** 9}, timeout=TIMEOUT)
        connection.close()
        return reply.meta

    assert with_edge(tmp_path, keys, test) == {"ready": False}


def test_a_dropped_connection_leaves_no_wait_behind(tmp_path, keys):
    async def test(edge):
        home = edge.client()
        await home.connect()
        waiting = asyncio.ensure_future(home.wait(None, 50))
        while not edge.spool._waiters:
            await asyncio.sleep(0.01)
        await home.close()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(waiting, TIMEOUT)
        while edge.spool._waiters:
            await asyncio.sleep(0.01)
        while edge.metric("yestls_spool_connections"):
            await asyncio.sleep(0.01)

    with_edge(tmp_path, keys, test)


# --- metrics and extra methods ------------------------------------------------------------------------------

def test_the_metrics_show_requests_connections_and_the_spool(tmp_path, keys):
    started = time.time()

    async def test(edge):
        await edge.accept(b"one")
        await edge.accept(b"two" * 1000)
        async with edge.client() as home:
            assert edge.metric("yestls_spool_connections") == 1
            await home.list()
            await home.stats()
        stats = edge.spool.stats()
        return {
            "list": edge.metric("yestls_spool_requests_total", method="list", outcome="ok"),
            "stats": edge.metric("yestls_spool_requests_total", method="stats", outcome="ok"),
            "auth": edge.metric("yestls_spool_requests_total", method="auth", outcome="ok"),
            "depth": edge.metric("yestls_spool_depth"),
            "bytes": edge.metric("yestls_spool_bytes"),
            "age": edge.metric("yestls_spool_oldest_age_seconds"),
            "accepted": edge.metric("yestls_spool_accepted_total"),
            "full": edge.metric("yestls_spool_full_total", reason="bytes"),
        }, stats

    values, stats = with_edge(tmp_path, keys, test)
    assert values["list"] == values["stats"] == values["auth"] == 1
    assert values["depth"] == 2 and values["bytes"] == stats.bytes and values["accepted"] == 2
    # the oldest message's age, in seconds: not a timestamp, not negative, not older than this test
    assert 0 <= values["age"] <= time.time() - started and values["full"] == 0


def test_extra_methods_sit_behind_the_same_gate(tmp_path, keys):
    received = []

    async def mailboxes(connection, frame):
        received.append(frame.meta["mailboxes"])
        return {"count": len(frame.meta["mailboxes"])}, b""

    async def test(edge):
        stranger = await raw_connection(edge)
        error = await refusal(stranger.call("mailboxes", {"mailboxes": ["x@example.org"]}, timeout=5))
        assert error.code == Code.NOT_AUTHENTICATED
        stranger.close()
        connection = await home_connection(edge)
        reply = await connection.call("mailboxes", {"mailboxes": ["bob@example.org"]}, timeout=5)
        connection.close()
        return reply.meta

    assert with_edge(tmp_path, keys, test, extra_methods={"mailboxes": mailboxes}) == {"count": 1}
    assert received == [["bob@example.org"]]


def test_extra_methods_cannot_replace_the_spools_own(tmp_path, keys):
    async def ack(connection, frame):
        return {}, b""

    peer = Peer(name="home", addresses=frozenset({"127.0.0.1"}), identity=Ed25519PrivateKey.generate().public_key(),
                max_connections=4, max_in_flight=32, rate=50.0, burst=100)
    with Spool(tmp_path / "spool", keys[0], 1 << 30, 10) as spool:
        with pytest.raises(ValueError, match="ack"):
            SpoolService(spool, (peer,), AuditLog(tmp_path / "audit.jsonl"), extra_methods={"ack": ack})
