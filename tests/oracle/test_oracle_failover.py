"""Two key oracles behind one OraclePool: failover, recovery, and what is never retried.

Two `yestls oracle serve` subprocesses hold the same key (two homes made
from the same test PKI) and allowlist the same edge identity. The pool runs
in the test's event loop, as the engine's signer for an in-process
`relay.tls_serve` server that many concurrent Python ssl clients hit.

- Killing (SIGKILL) an oracle in the middle of the load, while the pool awaits
  signatures from it (it is stopped first, so they are certainly unanswered),
  loses no handshake: each request it held is retried on the other one. The pool's health goes "degraded"; with the killed oracle restarted
  on its port it returns to "up" by itself, and that oracle signs again
  (it alone is left when the other is then killed).
- Both oracles down: health "down", and sign raises OracleUnavailable at
  once, not after the request timeout.
- An oracle that stops answering (SIGSTOP: a silent tunnel, not a closed
  connection) while the other is up: signatures still succeed, on the other.
  Both stopped: OracleUnavailable within the request timeout.
- A policy refusal is final: one oracle is asked, one refusal audited.
"""

import asyncio
import dataclasses
import hashlib
import os
import re
import signal
import ssl
from contextlib import suppress
from dataclasses import dataclass

import pytest

from relay.identity import load_identity, public_key_text
from relay.oracle.client import OraclePool, OracleRefused, OracleUnavailable
from relay.tls import ServerConfig
from relay.tls_serve import start_server

from ..memory import client_context, signature_requests
from ..oracle_home import OracleHome, OracleProcess, make_oracle_home, start_oracle

pytestmark = pytest.mark.timeout(240)

KEY_TYPE = "ecdsa-p256"
SERVER_NAME = "mx.example.org"
# Far above the load, so only failures (not the rate limit) decide what happens.
PEER_OPTIONS = "rate = 100000.0\nburst = 100000\nmax_in_flight = 256\n"
REQUEST_TIMEOUT = 2.0
BACKOFF = (0.1, 1.0)        # reconnect backoff of the pool's links: recovery is seen within seconds
WAIT = 20.0                 # bound on every wait for a state change
HANDSHAKES = 240
CONCURRENCY = 24
KILL_AFTER = 60             # handshakes completed before an oracle is killed
CLIENT_TIMEOUT = 30.0


# --- two oracles, one key, one edge identity ---------------------------------------------------

def share_identity(home: OracleHome, identity_home: OracleHome) -> OracleHome:
    """`home`'s oracle.toml allowlisting `identity_home`'s edge identity instead of its own."""
    text = public_key_text(load_identity(identity_home.identity_path).public_key())
    config = home.config.read_text()
    new_config, count = re.subn(r'^identity = "[^"]*"$', f'identity = "{text}"', config, flags=re.MULTILINE)
    assert count == 1, config
    home.config.write_text(new_config)
    return dataclasses.replace(home, identity_path=identity_home.identity_path)


class Oracles:
    """Oracle subprocesses started by a test; every one (and its signing processes) is killed at teardown."""

    def __init__(self):
        self.started: list[OracleProcess] = []
        self.signers: set[int] = set()

    def start(self, home: OracleHome) -> OracleProcess:
        oracle = start_oracle(home)
        self.started.append(oracle)
        self.signers.update(signer_pids(oracle.process.pid))
        return oracle

    async def start_async(self, home: OracleHome) -> OracleProcess:
        return await asyncio.to_thread(self.start, home)

    def stop_all(self) -> None:
        for oracle in self.started:
            with suppress(OSError):
                oracle.process.send_signal(signal.SIGCONT)  # a stopped one too
            if oracle.process.poll() is None:
                oracle.kill()
        for pid in self.signers:  # they end on EOF from their front; make sure
            with suppress(OSError):
                if "relay.oracle.signer" in read_cmdline(pid):
                    os.kill(pid, signal.SIGKILL)


def read_cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as file:
        return file.read().decode(errors="replace")


def signer_pids(parent: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with suppress(OSError):
            with open(f"/proc/{name}/stat") as file:
                if int(file.read().rsplit(")", 1)[1].split()[1]) == parent:
                    pids.append(int(name))
    return pids


@pytest.fixture
def homes(pki, tmp_path):
    first = make_oracle_home(tmp_path / "home-a", pki, (KEY_TYPE,), peer_options=PEER_OPTIONS)
    second = make_oracle_home(tmp_path / "home-b", pki, (KEY_TYPE,), peer_options=PEER_OPTIONS)
    assert first.key_ids == second.key_ids  # the same key in both keystores
    return first, share_identity(second, first)


@pytest.fixture
def oracles():
    running = Oracles()
    try:
        yield running
    finally:
        running.stop_all()


def signed(home: OracleHome) -> int:
    return sum(1 for line in home.audit_lines() if line["method"] == "sign" and line["outcome"] == "signed")


def sign_refusals(home: OracleHome) -> list[dict]:
    return [line for line in home.audit_lines() if line["method"] == "sign" and line["outcome"] != "signed"]


# --- the pool, the engine, the clients -----------------------------------------------------------

def new_pool(homes) -> OraclePool:
    return OraclePool([("127.0.0.1", home.port) for home in homes], homes[0].identity,
                      request_timeout=REQUEST_TIMEOUT, backoff=BACKOFF)


async def wait_until(condition, what: str, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"not {what} after {timeout:g} s")
        await asyncio.sleep(0.02)


def record_failed_calls(pool: OraclePool) -> list[tuple[int, str]]:
    """(oracle port, method) of every call a link could not complete: what the pool then retried elsewhere."""
    failed = []
    for link in pool.links:
        async def call(method, params, tail, timeout, _link=link, _call=link.call):
            try:
                return await _call(method, params, tail, timeout)
            except (ConnectionError, asyncio.TimeoutError):
                failed.append((_link.port, method))
                raise

        link.call = call
    return failed


async def https_get(port: int, context: ssl.SSLContext) -> dict[str, str]:
    """One TLS connection to the engine: handshake, one request, the responder's body as {field: value}."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=SERVER_NAME)
    try:
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        body = (await reader.readexactly(length)).decode()
    finally:
        writer.close()
        with suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return dict(field.split("=", 1) for field in body.split())


@dataclass
class Load:
    bodies: list
    errors: list


async def run_load(port: int, context: ssl.SSLContext, count: int, progress: asyncio.Event | None = None,
                   progress_at: int = 0) -> Load:
    """`count` handshakes, CONCURRENCY at a time; `progress` is set once `progress_at` have completed."""
    load = Load([], [])
    queue = iter(range(count))

    async def worker():
        for _ in queue:
            try:
                load.bodies.append(await asyncio.wait_for(https_get(port, context), CLIENT_TIMEOUT))
            except (OSError, ssl.SSLError, asyncio.TimeoutError, asyncio.IncompleteReadError) as error:
                load.errors.append(repr(error))
            if progress is not None and len(load.bodies) + len(load.errors) >= progress_at:
                progress.set()

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return load


async def engine_for(pool: OraclePool):
    chains = [chain for _, chain in await pool.certificates()]
    server = await start_server(ServerConfig(chains, tickets=None), pool, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def freeze_an_oracle_with_signatures_in_flight(pool: OraclePool, oracles: Oracles) -> OracleProcess:
    """SIGSTOP an oracle while the pool awaits at least one signature from it, and return it.

    Two calls pending on a link make one of them a sign (pings go one at a
    time). Stopping the process first, then letting the answers it had already
    written arrive, makes "pending" mean "will never be answered" when it is
    then killed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while loop.time() < deadline:
        busy = next((link for link in pool.links if link.connection and link.connection.pending_calls >= 2), None)
        if busy is None:
            await asyncio.sleep(0)
            continue
        oracle = next(o for o in oracles.started if o.port == busy.port and o.process.poll() is None)
        oracle.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.1)
        if busy.connection is not None and busy.connection.pending_calls >= 2:
            return oracle
        oracle.process.send_signal(signal.SIGCONT)
    raise AssertionError(f"no oracle had signatures in flight within {WAIT:g} s")


# --- tests ---------------------------------------------------------------------------------------

def test_killing_an_oracle_mid_load_loses_no_handshake_and_recovery_is_automatic(pki, homes, oracles):
    home_a, home_b = homes
    context = client_context(pki.ca_pem)

    async def scenario():
        oracles.start(home_a)
        oracles.start(home_b)
        pool = new_pool(homes)
        await pool.start()
        server = None
        try:
            await wait_until(lambda: pool.health().state == "up", "both oracles ready")
            server, port = await engine_for(pool)
            failed_calls = record_failed_calls(pool)

            # The load; once KILL_AFTER handshakes are done, kill an oracle that has signatures in flight.
            progress = asyncio.Event()
            load_task = asyncio.create_task(run_load(port, context, HANDSHAKES, progress, KILL_AFTER))
            await asyncio.wait_for(progress.wait(), WAIT * 3)
            victim = await freeze_an_oracle_with_signatures_in_flight(pool, oracles)
            victim_home, other_home = (home_a, home_b) if victim.port == home_a.port else (home_b, home_a)
            victim.kill()  # SIGKILL, with signatures unanswered
            load = await asyncio.wait_for(load_task, 120)

            assert load.errors == [], f"{len(load.errors)} handshakes lost: {load.errors[:5]}"
            assert len(load.bodies) == HANDSHAKES
            assert {b["scheme"] for b in load.bodies} == {"ecdsa_secp256r1_sha256"}
            assert {b["resumed"] for b in load.bodies} == {"no"}
            assert signed(other_home) > 0
            assert signed(victim_home) + signed(other_home) >= HANDSHAKES
            # Signatures were in flight on the killed oracle; the pool retried them on the other.
            assert (victim.port, "sign") in failed_calls

            await wait_until(lambda: pool.health().state == "degraded", "degraded with one oracle killed")
            health = {link.address: link.state for link in pool.health().links}
            assert health[f"127.0.0.1:{victim_home.port}"] != "ready"
            assert health[f"127.0.0.1:{other_home.port}"] == "ready"

            # The killed oracle comes back on its port: the pool reconnects by itself.
            restarted = await oracles.start_async(victim_home)
            await wait_until(lambda: pool.health().state == "up", "up again after the restart")

            # ...and it signs: kill the other one, and handshakes still complete, through it alone.
            before = signed(victim_home)
            next(o for o in oracles.started if o.port == other_home.port).kill()
            await wait_until(lambda: pool.health().state == "degraded", "degraded with the other oracle killed")
            after = await run_load(port, context, 20)
            assert after.errors == [] and len(after.bodies) == 20
            assert signed(victim_home) == before + 20

            # Both down: health says so, and signing fails at once with OracleUnavailable.
            restarted.kill()
            await wait_until(lambda: pool.health().state == "down", "down with both oracles killed")
            request = signature_requests(pki, KEY_TYPE, 1)[0]
            with pytest.raises(OracleUnavailable):  # not asyncio.TimeoutError: no waiting for an answer
                await asyncio.wait_for(pool.sign(request), REQUEST_TIMEOUT)
            assert not pool.health().available
        finally:
            if server is not None:
                server.close()
            await pool.close()

    asyncio.run(scenario())


def test_a_policy_refusal_is_not_retried_on_the_other_oracle(pki, homes, oracles):
    home_a, home_b = homes
    request = signature_requests(pki, KEY_TYPE, 1)[0]
    # A bare digest where the handshake messages belong: every oracle's policy refuses it.
    digest = dataclasses.replace(request, handshake_messages=(hashlib.sha256(b"anything").digest(),))

    async def scenario():
        oracles.start(home_a)
        oracles.start(home_b)
        pool = new_pool(homes)
        await pool.start()
        try:
            await wait_until(lambda: pool.health().state == "up", "both oracles ready")
            await pool.certificates()
            with pytest.raises(OracleRefused) as refused:
                await pool.sign(digest)
            assert refused.value.code.startswith("policy.")
            # The real transcript is signed: the refusal was about the request, not the oracles.
            assert len(await pool.sign(request)) > 0
        finally:
            await pool.close()

    asyncio.run(scenario())
    refusals = sign_refusals(home_a) + sign_refusals(home_b)
    assert len(refusals) == 1, refusals  # one oracle asked, once
    assert refusals[0]["outcome"].startswith("refused:policy.")
    assert signed(home_a) + signed(home_b) == 1


def test_a_stalled_oracle_does_not_fail_signatures_the_other_can_make(pki, homes, oracles):
    """SIGSTOP: the connection stays open and nothing answers, as when the tunnel silently drops packets."""
    home_a, home_b = homes
    requests = signature_requests(pki, KEY_TYPE, 8)

    async def scenario():
        oracles.start(home_a)
        oracles.start(home_b)
        pool = new_pool(homes)
        await pool.start()
        try:
            await wait_until(lambda: pool.health().state == "up" and all(link.rtt for link in pool.links),
                             "both oracles ready and pinged")
            await pool.certificates()
            # Stall the oracle the pool prefers (the lowest round-trip time): the requests go to it first.
            preferred = min(pool.links, key=lambda link: link.rtt)
            stalled = next(o for o in oracles.started if o.port == preferred.port)
            other = next(o for o in oracles.started if o is not stalled)
            stalled.process.send_signal(signal.SIGSTOP)
            outcomes = await asyncio.gather(*(pool.sign(r) for r in requests), return_exceptions=True)
            failed = [repr(o) for o in outcomes if isinstance(o, BaseException)]
            assert failed == [], f"{len(failed)} of {len(requests)} signatures failed with one oracle stalled: " \
                                 f"{failed[:2]}"

            # Both stalled: OracleUnavailable, within the request timeout (not one timeout per oracle).
            other.process.send_signal(signal.SIGSTOP)
            with pytest.raises(OracleUnavailable):  # the pool's own deadline, before this bound
                await asyncio.wait_for(pool.sign(requests[0]), REQUEST_TIMEOUT + 1)
        finally:
            await pool.close()

    asyncio.run(scenario())
