"""Wire the engine to OpenSSL (Python's ssl.SSLObject) in memory, no sockets.

`MemoryPair` moves bytes between the two until neither has anything to say,
answering the engine's signature requests with a local key, and records
every event and exception so tests can assert on them.
"""

import os
import ssl
import time

from relay.tls import ServerConfig, ServerConnection, SignatureRequest, Tls12SignatureRequest, TLSError
from relay.tls.signing import sign


class MemoryPair:
    def __init__(self, config: ServerConfig, client_context: ssl.SSLContext, key, server_hostname="mx.example.org",
                 session=None, now=time.time, random=os.urandom):
        self.server = ServerConnection(config, random=random, now=now)
        self.key = key
        self.to_client = ssl.MemoryBIO()
        self.to_server = ssl.MemoryBIO()
        self.client = client_context.wrap_bio(
            self.to_client, self.to_server, server_side=False, server_hostname=server_hostname, session=session
        )
        self.events = []
        self.server_error: TLSError | None = None
        self.signature_requests: list[SignatureRequest | Tls12SignatureRequest] = []

    def _server_step(self) -> bool:
        moved = False
        data = self.to_server.read()
        if data:
            moved = True
            try:
                new = self.server.receive_data(data)
            except TLSError as error:
                self.server_error = error
                new = []
            for event in new:
                self.events.append(event)
                if isinstance(event, (SignatureRequest, Tls12SignatureRequest)):
                    self.signature_requests.append(event)
                    self.server.provide_signature(sign(self.key, event.scheme, event.content))
        out = self.server.data_to_send()
        if out:
            moved = True
            self.to_client.write(out)
        return moved

    def pump(self, limit: int = 50) -> None:
        for _ in range(limit):
            if not self._server_step():
                return

    def handshake(self) -> None:
        for _ in range(20):
            try:
                self.client.do_handshake()
                self.pump()
                return
            except ssl.SSLWantReadError:
                if not self._server_step():
                    raise AssertionError("handshake stalled") from None

    def client_read(self, n: int = 65536) -> bytes:
        self.pump()
        return self.client.read(n)

    def server_data(self) -> bytes:
        from relay.tls import DataReceived

        return b"".join(e.data for e in self.events if isinstance(e, DataReceived))


def signature_requests(pki, key_type: str, count: int) -> list[SignatureRequest]:
    """SignatureRequests from `count` real full handshakes (the engine and Python's ssl, in memory)."""
    leaf = pki.leaves[key_type]
    config = ServerConfig([leaf.chain], tickets=None)
    requests = []
    for _ in range(count):
        pair = MemoryPair(config, client_context(pki.ca_pem), leaf.key)
        pair.handshake()
        requests.extend(pair.signature_requests)
    assert len(requests) == count, f"made {len(requests)} signature requests, wanted {count}"
    return requests


def client_context(ca_pem, **options) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    for name, value in options.items():
        setattr(ctx, name, value)
    return ctx
