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
from relay.config import parse_address
from relay.identity import IdentityError, load_identity
from relay.oracle.client import OraclePool
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


def _address(option: str, value: str) -> tuple[str, int]:
    try:
        return parse_address(value)
    except ValueError as error:
        raise SystemExit(f"tls-serve: {option}: {error}") from None


async def _signer_and_chains(args) -> tuple[Signer, list[CertificateChain], OraclePool | None]:
    """Sign in-process with --cert/--key, or ask the key oracle(s) with --oracle."""
    if not args.oracle:
        if not args.cert:
            raise SystemExit("tls-serve: give --cert and --key, or --oracle and --identity-key")
        pairs = load_chains(args.cert, args.key)
        return LocalKeySigner(pairs), [chain for chain, _ in pairs], None
    if args.cert or args.key:
        raise SystemExit("tls-serve: with --oracle the chains come from the oracle; drop --cert/--key")
    if args.alpn:
        raise SystemExit("tls-serve: --alpn needs --cert/--key: the key oracle signs no handshake that selects an "
                         "application protocol but http/1.1 for an mta-sts. name, the edge's MTA-STS listener "
                         "(policy.alpn_selected)")
    if args.identity_key is None:
        raise SystemExit("tls-serve: --oracle needs --identity-key (made by `yestls keys identity-new`)")
    try:
        identity = load_identity(args.identity_key)
    except IdentityError as error:
        raise SystemExit(f"tls-serve: {error}") from None
    pool = OraclePool([_address("--oracle", o) for o in args.oracle], identity)
    await pool.start()
    if not await pool.wait_ready(args.oracle_wait):
        health = "; ".join(f"{h.address}: {h.last_error}" for h in pool.health().links)
        await pool.close()
        raise SystemExit(f"tls-serve: no oracle ready after {args.oracle_wait:g}s ({health})")
    chains = [chain for _, chain in await pool.certificates()]
    return pool, chains, pool


def run(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, port = _address("--listen", args.listen)

    async def main() -> None:
        signer, chains, pool = await _signer_and_chains(args)
        config = ServerConfig(
            chains,
            tickets=TicketKeyring(os.urandom) if args.tickets else None,
            tickets_per_handshake=args.tickets,
            alpn_protocols=tuple(p.encode() for p in args.alpn),
            insist_on_preferred_group=args.insist_on_preferred_group,
            tls12=not args.no_tls12,
            ticket_early_data_size=args.ticket_early_data,
            **({"groups": tuple(args.groups)} if args.groups else {}),
        )
        server = await start_server(config, signer, host, port)
        logging.getLogger("yestls.tls").info("tls-serve listening on %s:%d", host, port)
        try:
            async with server:
                await server.serve_forever()
        finally:
            if pool is not None:
                await pool.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
