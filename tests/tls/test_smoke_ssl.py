"""Python's ssl (OpenSSL) against the engine, in memory and over loopback."""

import os
import socket

import pytest

from relay.tls import ServerConfig, TicketKeyring

from ..memory import MemoryPair, client_context


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "ed25519"])
def test_full_handshake_then_resumption_in_memory(pki, key_type):
    leaf = pki.leaves[key_type]
    config = ServerConfig([leaf.chain], tickets=TicketKeyring(os.urandom))
    context = client_context(pki.ca_pem)
    first = MemoryPair(config, context, leaf.key)
    first.handshake()
    assert first.server_error is None
    assert first.client.version() == "TLSv1.3"
    assert len(first.signature_requests) == 1
    first.client.write(b"client to server")
    first.pump()
    assert first.server_data() == b"client to server"
    first.server.send_data(b"server to client")
    assert first.client_read() == b"server to client"

    again = MemoryPair(config, context, leaf.key, session=first.client.session)
    again.handshake()
    assert again.client.session_reused
    assert again.server.session.resumed
    assert again.signature_requests == []  # resumption needs no signature


def test_loopback_request_response(pki, tls_server):
    server = tls_server(("ecdsa-p256", "rsa-2048"))
    context = client_context(pki.ca_pem)
    with socket.create_connection((server.host, server.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="mx.example.org") as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            response = b""
            while b"resumed=" not in response:
                chunk = tls.recv(4096)
                assert chunk, "server closed before answering"
                response += chunk
    assert response.startswith(b"HTTP/1.0 200 OK")
    assert b"version=TLSv1.3" in response
