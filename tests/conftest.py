"""Shared fixtures: a test PKI, the engine serving on loopback from a thread, and TLS client tools."""

import asyncio
import os
import threading
from dataclasses import dataclass

import pytest

from relay.aio.tls import LocalKeySigner
from relay.tls import ServerConfig, TicketKeyring
from relay.tls_serve import start_server

from .interop_helpers import GnutlsCli, SClient
from .pki import make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class RunningServer:
    host: str
    port: int
    config: ServerConfig

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ServerThread:
    """An asyncio loop in a daemon thread serving `yestls tls-serve`'s responder."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = []

    def start(self, config: ServerConfig, signer) -> RunningServer:
        future = asyncio.run_coroutine_threadsafe(start_server(config, signer, "127.0.0.1", 0), self.loop)
        server = future.result(timeout=10)
        self.servers.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        return RunningServer(host, port, config)

    def stop(self):
        async def close_all():
            for server in self.servers:
                server.close()
                await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def tls_server(pki):
    """tls_server(key_types=("ecdsa-p256",), **ServerConfig overrides) -> RunningServer on 127.0.0.1."""
    runner = ServerThread()

    def start(key_types=("ecdsa-p256",), **overrides) -> RunningServer:
        leaves = [pki.leaves[k] for k in key_types]
        overrides.setdefault("tickets", TicketKeyring(os.urandom))
        config = ServerConfig([leaf.chain for leaf in leaves], **overrides)
        signer = LocalKeySigner([(chain, leaf.key) for chain, leaf in zip(config.certificates, leaves)])
        return runner.start(config, signer)

    yield start
    runner.stop()


@pytest.fixture
def s_client(pki):
    """s_client(server, *options, servername=..., ca=...) -> a running SClient, killed at teardown."""
    started = []

    def start(server, *options, ca=None, **kwargs) -> SClient:
        client = SClient(server.address, ca or pki.ca_pem, *options, **kwargs)
        started.append(client)
        return client

    yield start
    for client in started:
        client.kill()


@pytest.fixture
def gnutls_cli(pki):
    """gnutls_cli(server, *options, servername=..., ca=...) -> a running GnutlsCli, killed at teardown."""
    started = []

    def start(server, *options, ca=None, **kwargs) -> GnutlsCli:
        client = GnutlsCli(server.host, server.port, ca or pki.ca_pem, *options, **kwargs)
        started.append(client)
        return client

    yield start
    for client in started:
        client.kill()
