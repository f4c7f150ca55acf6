"""The oracle front's side of its signing processes (relay/oracle/signer.py).

The front keeps `count` connections, each to one signing process, sends each
sign request to the least loaded one, and replaces a connection that drops
(retrying until it gets one back). It learns the certificate chains from the
signing processes (`certificates`), so it never opens the keystore.
`certificates()` asks every one of them (each re-reads the keystore then) and
keeps the keys all of them hold, so whichever gets a sign request has the key.

Two ways to reach a signing process:

    SignerSocket(path)       connect to the Unix socket yestls-signer.socket listens
                             on; systemd starts one signing process per connection,
                             as the signer's user, which the front cannot become and
                             whose keystore it cannot read. The deployed way
                             (oracle.toml: signer_socket).
    SpawnedSigners(keystore) start `python -m relay.oracle.signer` over a socketpair,
                             as the front's own user: no privilege separation at
                             all, for tests and development (no signer_socket).
"""

import asyncio
import logging
import socket
import subprocess
import sys
from pathlib import Path

from relay.oracle.keystore import PublicEntry
from relay.oracle.protocol import MAX_FRAME, parse_certificate_listing
from relay.rpc import Code, Frame, RemoteError, RpcConnection

log = logging.getLogger("yestls.oracle")

READY_TIMEOUT = 30.0  # seconds for a new signing process to load its keys and answer
RETRY_FIRST, RETRY_MAX = 0.5, 10.0  # seconds between tries to replace a lost one (doubling)


class SignerError(RuntimeError):
    """No signing process could be reached, or one did not get ready; the message says where to look."""


class SignerSocket:
    """Signing processes behind systemd's socket (yestls-signer.socket, Accept=yes)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    async def open(self, protocol) -> RpcConnection:
        try:
            _, connection = await asyncio.get_running_loop().create_unix_connection(protocol, str(self.path))
        except OSError as error:
            raise SignerError(f"cannot connect to the signer socket {self.path} ({error.strerror or error}); "
                              f"is yestls-signer.socket running, and is this user in its group?") from None
        return connection

    async def reap(self, connection: RpcConnection) -> str:
        """Where to read why a closed connection's process ended (systemd reaps it)."""
        return "its messages are in the journal: journalctl -u 'yestls-signer@*'"


class SpawnedSigners:
    """Signing processes the front starts itself, each over a socketpair, as the front's own user."""

    def __init__(self, keystore: Path):
        self.keystore = Path(keystore)
        self.processes: dict[RpcConnection, subprocess.Popen] = {}

    async def open(self, protocol) -> RpcConnection:
        front, back = socket.socketpair()
        with back:
            process = subprocess.Popen(
                [sys.executable, "-m", "relay.oracle.signer", "--keystore", str(self.keystore),
                 "--fd", str(back.fileno())],
                pass_fds=[back.fileno()], stderr=None,
            )
        _, connection = await asyncio.get_running_loop().create_connection(protocol, sock=front)
        self.processes[connection] = process
        return connection

    async def reap(self, connection: RpcConnection) -> str:
        """Wait for a closed connection's process (it exits on EOF), killed if it lingers; how it ended."""
        process = self.processes.pop(connection, None)
        if process is None:
            return "no such process"
        try:
            code = await asyncio.to_thread(process.wait, 5)
        except subprocess.TimeoutExpired:
            process.kill()
            code = await asyncio.to_thread(process.wait)
        return f"it exited ({code}); see its message above"


class SignerPool:
    """`count` connections to signing processes, reached one way (SignerSocket or SpawnedSigners)."""

    def __init__(self, signers: SignerSocket | SpawnedSigners, count: int):
        self.signers = signers
        self.count = count
        self.connections: list[RpcConnection] = []
        self.key_ids: set[str] = set()
        self.closing = False
        self._replacing: set[asyncio.Task] = set()

    async def start(self) -> list[PublicEntry]:
        """Open every connection; the chains the signing processes hold (all must hold the same keys)."""
        entries: list[PublicEntry] = []
        try:
            for _ in range(self.count):
                connection, held = await self._open()
                self.connections.append(connection)
                ids = {entry.key_id for entry in held}
                if not entries:
                    entries, self.key_ids = held, ids
                elif ids != self.key_ids:
                    raise SignerError(f"the signing processes disagree on the keys: {sorted(self.key_ids)} "
                                      f"and {sorted(ids)}; is the keystore being changed?")
        except BaseException:
            await self.stop()
            raise
        return entries

    async def _open(self) -> tuple[RpcConnection, list[PublicEntry]]:
        connection = await self.signers.open(lambda: RpcConnection(max_frame=MAX_FRAME, on_lost=self._lost))
        try:
            reply = await connection.call("certificates", timeout=READY_TIMEOUT)
            return connection, parse_certificate_listing(reply.meta.get("certificates"))
        except (ConnectionError, asyncio.TimeoutError, RemoteError, ValueError) as error:
            connection.close()
            why = await self.signers.reap(connection)
            reason = "it ended" if isinstance(error, ConnectionError) else str(error) or "no answer in time"
            raise SignerError(f"a signing process did not get ready ({reason}); {why}") from None

    def _lost(self, connection: RpcConnection) -> None:
        if connection not in self.connections:
            return  # one that never got ready: _open says why
        self.connections.remove(connection)
        task = asyncio.get_running_loop().create_task(self._replace(connection))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self, lost: RpcConnection) -> None:
        log.error("a signing process ended (%s); connecting another", await self.signers.reap(lost))
        delay = RETRY_FIRST  # one that dies at once must not spin
        while not self.closing:
            await asyncio.sleep(delay)
            try:
                connection, _ = await self._open()
            except SignerError as error:
                log.error("%s; trying again in %.1f s", error, min(delay * 2, RETRY_MAX))
                delay = min(delay * 2, RETRY_MAX)
                continue
            if self.closing:
                connection.close()
                await self.signers.reap(connection)
                return
            # It read the keystore as it is now; the front's next certificates() brings the others along.
            self.connections.append(connection)
            log.info("connected a new signing process (%d of %d running)", len(self.connections), self.count)
            return

    async def certificates(self) -> list[PublicEntry]:
        """Every signing process re-reads the keystore; the chains of the keys all that answered hold.

        RemoteError (unavailable) if none answered."""
        connections = list(self.connections)
        answers = await asyncio.gather(*(self._listing(c) for c in connections), return_exceptions=True)
        listings = [answer for answer in answers if isinstance(answer, list)]
        for answer in answers:
            if isinstance(answer, BaseException):
                log.warning("a signing process did not list its chains (%s)", answer or type(answer).__name__)
        if not listings:
            raise RemoteError(Code.UNAVAILABLE, "no signing process listed its chains")
        held_by_all = set.intersection(*({entry.key_id for entry in listing} for listing in listings))
        return [entry for entry in listings[0] if entry.key_id in held_by_all]

    @staticmethod
    async def _listing(connection: RpcConnection) -> list[PublicEntry]:
        reply = await connection.call("certificates", timeout=READY_TIMEOUT)
        return parse_certificate_listing(reply.meta.get("certificates"))

    async def sign(self, method: str, params: dict, tail: bytes) -> Frame:
        """`sign` or `sign_tls12`, with the request's parameters as the peer sent them."""
        if not self.connections:
            raise RemoteError(Code.UNAVAILABLE, "no signing process is running")
        connection = min(self.connections, key=lambda c: c.pending_calls)
        try:
            return await connection.call(method, params, tail)
        except ConnectionError:
            raise RemoteError(Code.UNAVAILABLE, "the signing process ended; retry") from None

    async def stop(self) -> None:
        """Close every connection (each signing process sees EOF and exits), then reap what we started."""
        self.closing = True
        for task in list(self._replacing):
            task.cancel()
        connections = list(self.connections)
        self.connections.clear()
        for connection in connections:
            connection.close()
        if connections:
            # The close takes effect on the loop's next turns: let them run before waiting.
            await asyncio.wait([connection.closed for connection in connections], timeout=5)
        for connection in connections:
            await self.signers.reap(connection)
