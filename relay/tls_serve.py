"""`yestls tls-serve`: the TLS engine behind a minimal HTTP/1.0 responder.

Generic TLS test tools (openssl s_client, gnutls-cli, tlsfuzzer, ...) drive
the engine through it. Every request (a header block ending in a blank line)
gets `HTTP/1.0 200` with the negotiated parameters as the body; the connection
stays open until the client closes it.
"""

import asyncio
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key

from relay.aio.tls import LocalKeySigner, Signer, TLSServerProtocol
from relay.tls import CertificateChain, ServerConfig, TicketKeyring

MAX_REQUEST = 64 * 1024


class HttpResponder(asyncio.Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.transport.write(self._response())
        if len(self.buffer) > MAX_REQUEST:
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def _response(self) -> bytes:
        s = self.transport.get_extra_info("tls_session")
        # Absent values print empty (a resumed session has no signature scheme).
        body = (
            f"version={s.version} cipher={s.cipher_suite} group={s.group} "
            f"scheme={s.signature_scheme or ''} resumed={'yes' if s.resumed else 'no'} "
            f"sni={s.server_name or ''} alpn={(s.alpn or b'').decode()}\n"
        ).encode()
        head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body


def load_chains(certs: list[Path], keys: list[Path]) -> list[tuple[CertificateChain, object]]:
    if len(certs) != len(keys):
        raise SystemExit("tls-serve: give one --key for each --cert, in the same order")
    pairs = []
    for cert_path, key_path in zip(certs, keys):
        chain = CertificateChain.from_pem(cert_path.read_bytes())
        key = load_pem_private_key(key_path.read_bytes(), password=None)
        if not chain.is_key_of(key):
            raise SystemExit(f"tls-serve: {key_path} is not the key of {cert_path}")
        pairs.append((chain, key))
    return pairs


async def start_server(config: ServerConfig, signer: Signer, host: str, port: int, app_factory=HttpResponder):
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: TLSServerProtocol(config, signer, app_factory()), host, port)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"tls-serve: --listen wants HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def run(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    pairs = load_chains(args.cert, args.key)
    config = ServerConfig(
        [chain for chain, _ in pairs],
        tickets=TicketKeyring(os.urandom) if args.tickets else None,
        tickets_per_handshake=args.tickets,
        alpn_protocols=tuple(p.encode() for p in args.alpn),
        insist_on_preferred_group=args.insist_on_preferred_group,
        ticket_early_data_size=args.ticket_early_data,
        **({"groups": tuple(args.groups)} if args.groups else {}),
    )
    host, port = parse_listen(args.listen)

    async def main() -> None:
        server = await start_server(config, LocalKeySigner(pairs), host, port)
        logging.getLogger("yestls.tls").info("tls-serve listening on %s:%d", host, port)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
