#!/usr/bin/env python3
"""The floor under the edge: a minimal asyncio SMTP server with the edge's real spool (bench/smtp.py --floor).

Not a product and not a server to run: a measuring stick. It speaks just
enough plain SMTP for bench/smtp.py's load generator (greeting, EHLO with
PIPELINING, MAIL, RCPT, DATA, QUIT; every line answered in one write per
batch of pipelined commands), checks nothing, and stores each message as
the edge does: `relay.spool.store.Spool` with a `KeyMaker` child (HPKE
ML-KEM-768 + X25519 made ahead, AES-GCM as the content arrives), a
Received header and metadata sealed with it, committed in a thread (the
file fsync'd, renamed into queue/, queue/ fsync'd, group commit), and the
250 only after that. One process per `--workers`, on one SO_REUSEPORT port,
each with a spool of its own (so no spool desk between processes).

What it leaves out is everything the edge's session does besides: aiosmtpd's
verbs and our checks (addresses, recipients, door, TLS budget, limits),
per-session state and timers, the log line, metrics. So `ratio
smtp_accept_plain_floor` (this against Postfix, in the same run) is roughly
the most a leaner session in Python could reach with the edge's sealing and
durability; the gap between it and `ratio smtp_accept_plain` is what the
session's layers cost.

    python bench/smtp_floor.py --port PORT --spool DIR --public-key KEY   (started by bench/smtp.py)
"""

import argparse
import asyncio
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.spool.keymaker import KeyMaker  # noqa: E402
from relay.spool.keys import parse_spool_public_key  # noqa: E402
from relay.spool.sealed import DEFAULT_CHUNK_SIZE  # noqa: E402
from relay.spool.store import Spool  # noqa: E402

END_OF_DATA = b"\r\n.\r\n"
EHLO_REPLY = b"250-floor\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250 8BITMIME\r\n"


class FloorSession(asyncio.Protocol):
    def __init__(self, spool: Spool, commits: ThreadPoolExecutor):
        self.spool = spool
        self.commits = commits
        self.buffer = bytearray()
        self.in_data = False
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(b"220 floor ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies = []
        while True:
            if self.in_data:
                end = self.buffer.find(END_OF_DATA)
                if end < 0:
                    break
                message = bytes(self.buffer[:end + 2])
                del self.buffer[:end + len(END_OF_DATA)]
                self.in_data = False
                self._commit(message)
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            verb = bytes(self.buffer[:4]).upper()
            del self.buffer[:end + 2]
            if verb == b"EHLO":
                replies.append(EHLO_REPLY)
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                replies.append(b"250 2.0.0 OK\r\n")
            elif verb == b"DATA":
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(replies))
                self.transport.close()
                return
            else:
                replies.append(b"502 5.5.1 Not here\r\n")
        if replies:
            self.transport.write(b"".join(replies))

    def _commit(self, message: bytes) -> None:
        metadata = {"mail_from": "floor@example.net", "rcpt_tos": ["floor@example.org"], "received_at": time.time()}
        writer = self.spool.open(metadata, size=None)
        writer.write(b"Received: from floor (floor) by floor; now\r\n")
        writer.write(message)
        committing = asyncio.get_running_loop().run_in_executor(self.commits, writer.commit)
        committing.add_done_callback(self._committed)

    def _committed(self, committing) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if committing.exception() is not None:
            self.transport.write(b"451 4.3.0 Not stored\r\n")
        else:
            self.transport.write(b"250 2.0.0 OK queued as " + committing.result().encode() + b"\r\n")

    def connection_lost(self, error) -> None:
        self.transport = None


async def serve(port: int, spool: Spool) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    commits = ThreadPoolExecutor(4)
    server = await asyncio.get_running_loop().create_server(lambda: FloorSession(spool, commits), sock=listener)
    print("floor listening", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spool", type=Path, required=True)
    parser.add_argument("--public-key", required=True, help="home's spool public key, as edge.toml gives it")
    args = parser.parse_args()
    public_key = parse_spool_public_key(args.public_key)
    keys = KeyMaker(public_key, DEFAULT_CHUNK_SIZE)
    try:
        with Spool(args.spool, public_key, 1 << 40, 1 << 24, message_keys=keys) as spool:
            asyncio.run(serve(args.port, spool))
    finally:
        keys.close()


if __name__ == "__main__":
    main()
