"""Crash safety of the edge: SIGKILL at random points while senders deliver; no 250 is ever lost.

Several client threads deliver messages over new connections (some with
STARTTLS, verified against the test CA, some in plaintext; one to three
transactions per connection) while the test kills `yestls edge serve` with
SIGKILL at random moments and starts it again on the same config. Every
message carries a unique id in its subject and body.

What must hold afterwards, as a sender and home would see it:
- every message that got `250 ... queued as <id>` is in `queue/` under that
  spool id, and unseals with home's key to exactly the bytes that were sent
  (after the edge's own `Received:` header), with its envelope;
- every file in `queue/` unseals: nothing half-written is ever visible there,
  and each is one of the messages sent, whole (a message cut off before its
  250 may or may not be there: the sender retries);
- leftovers in `tmp/` are removed by the next start, which logs how many;
- home's spool service, after the last restart, lists exactly what is in
  `queue/`.

The seed is printed on failure; YESTLS_CRASH_SEED=N replays its kill times.
"""

import asyncio
import os
import random
import re
import signal
import smtplib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

from relay.spool.client import SpoolClient
from relay.spool.sealed import unseal
from relay.spool.store import NAME_PATTERN

from ..edge_site import make_edge_site, start_edge, worker_pids
from ..oracle_home import run_oracle

CLIENTS = 6                 # concurrent sending threads
KILLS = 8                   # SIGKILLs of the edge under load
UP_SECONDS = (0.3, 1.5)     # the edge runs this long (uniform) before each kill
SOCKET_TIMEOUT = 10.0       # every client socket operation
RUN_LIMIT = 30.0            # the whole kill loop stops by then, however many kills it got
RECEIVED = re.compile(rb"Received: [^\r\n]*(?:\r\n\t[^\r\n]*)*\r\n\Z")
QUEUED = re.compile(r"2\.0\.0 OK queued as ([0-9a-f]{32})\Z")


@dataclass
class Sent:
    message_id: str
    data: bytes
    tls: bool
    spool_id: str | None = None  # set when the edge answered 250


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: dict[str, Sent] = field(default_factory=dict)       # every message whose DATA was started
    accepted: dict[str, Sent] = field(default_factory=dict)   # spool id -> the message it acknowledged
    cut_sessions: int = 0       # sessions the edge's death interrupted
    refused_connects: int = 0   # connects while the edge was down
    deferred: int = 0           # 4xx replies (e.g. the oracle's rate limit, then "retry later"): a sender retries
    errors: list[str] = field(default_factory=list)   # anything else: a reply or failure a crash does not explain


class Deferred(Exception):
    """The edge answered 4xx: the sender leaves and tries again later (a real MTA keeps the message queued)."""


def make_message(tag: str, rng: random.Random) -> bytes:
    """A message with its id in the subject and body, CRLF lines, some starting with a dot (dot-stuffing)."""
    size = rng.choice((300, 2_000, 10_000, 70_000, 200_000))  # past 64 KiB: several sealed chunks
    lines = [f"Subject: crash test {tag}".encode(), f"Message-ID: <{tag}@sender.test>".encode(), b"",
             f"id {tag}".encode(), b".a line that smtplib dot-stuffs", b"."]
    filler = (tag.encode() + b" ") * 8
    total = sum(len(line) + 2 for line in lines)
    while total < size:
        lines.append(filler)
        total += len(filler) + 2
    return b"\r\n".join(lines) + b"\r\n"


def sender(number: int, port: int, cafile: str, seed: int, stop: threading.Event, tally: Tally) -> None:
    """Client `number` sends from 127.0.<number>.1: each client is a network of its own (and, with several
    workers, each network reaches one worker)."""
    rng = random.Random(seed * 1000 + number)
    context = ssl.create_default_context(cafile=cafile)
    sequence = 0
    while not stop.is_set():
        use_tls = rng.random() < 0.5
        try:
            client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=SOCKET_TIMEOUT,
                                  source_address=(f"127.0.{number}.1", 0))
        except (ConnectionRefusedError, smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected,
                ConnectionResetError):
            with tally.lock:
                tally.refused_connects += 1
            stop.wait(0.02)
            continue
        try:
            client.ehlo()
            if use_tls:
                client._host = "mx.example.org"  # the name the certificate is checked against
                client.starttls(context=context)
                client.ehlo()
            for _ in range(rng.randint(1, 3)):
                sequence += 1
                tag = f"c{number}-{sequence}-{os.urandom(6).hex()}"
                sent = Sent(tag, make_message(tag, rng), use_tls)
                code, reply = client.mail("sender@sender.test")
                if code == 250:
                    code, reply = client.rcpt(f"user{number}@example.org")
                if 400 <= code < 500:
                    raise Deferred
                assert code == 250, (code, reply)
                with tally.lock:
                    tally.sent[tag] = sent
                code, reply = client.data(sent.data)   # smtplib raises unless 354, returns the final reply
                if 400 <= code < 500:
                    raise Deferred
                assert code == 250, (code, reply)
                match = QUEUED.search(reply.decode())
                assert match, reply
                sent.spool_id = match.group(1)
                with tally.lock:
                    tally.accepted[sent.spool_id] = sent
                if stop.is_set():
                    break
            client.quit()
        except Deferred:
            with tally.lock:
                tally.deferred += 1
            client.quit()
        except (smtplib.SMTPServerDisconnected, ConnectionError, ssl.SSLError, TimeoutError, socket.timeout):
            with tally.lock:
                tally.cut_sessions += 1
        except Exception as error:  # noqa: BLE001 - reported by the test, with the seed
            with tally.lock:
                tally.errors.append(f"client {number}: {error!r}")
            return
        finally:
            client.close()


class Senders:
    """CLIENTS sender threads, started at once, each from a network of its own, until `stop`."""

    def __init__(self, site, pki, seed: int, tally: Tally):
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=sender, daemon=True,
                                         args=(n, site.smtp_port, str(pki.ca_pem), seed, self._stop, tally))
                        for n in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def stop(self) -> bool:
        """Tell them to stop and wait (each bounded by its socket timeout); True once every one has."""
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=SOCKET_TIMEOUT + 5)
        return not any(thread.is_alive() for thread in self.threads)


def test_sigkill_under_load_loses_no_acknowledged_message(tmp_path, pki):
    seed = int(os.environ.get("YESTLS_CRASH_SEED") or int.from_bytes(os.urandom(4), "big"))
    rng = random.Random(seed)
    site = make_edge_site(tmp_path, pki, smtp_options="max_connections_per_ip = 50\n")
    tmp_dir, queue_dir = site.spool_dir / "tmp", site.spool_dir / "queue"
    tally = Tally()
    kills, leftovers = 0, []   # leftovers: files in tmp/ while the edge was dead, per kill
    restarts = []              # the EdgeProcess of each restart
    with run_oracle(site.oracle):
        edge = start_edge(site)
        senders = Senders(site, pki, seed, tally)
        try:
            deadline = time.monotonic() + RUN_LIMIT
            while kills < KILLS and time.monotonic() < deadline:
                time.sleep(rng.uniform(*UP_SECONDS))
                edge.process.kill()          # SIGKILL: no handler, no cleanup
                edge.process.wait(timeout=10)
                kills += 1
                leftovers.append(sorted(os.listdir(tmp_dir)))
                if kills < KILLS:
                    edge = start_edge(site)
                    restarts.append((edge, len(leftovers[-1])))
            assert senders.stop(), "a client thread did not stop"

            # A crash's leftover for certain (a prefix of a real sealed file), then a start with no load.
            accepted_files = sorted(queue_dir.iterdir())
            assert accepted_files, f"nothing was accepted (seed {seed})"
            planted = tmp_dir / (os.urandom(16).hex() + ".tmp")
            planted.write_bytes(accepted_files[0].read_bytes()[:1000])
            in_tmp = len(os.listdir(tmp_dir))
            edge = start_edge(site)
            assert os.listdir(tmp_dir) == [], "tmp/ keeps leftovers after a restart"
            assert re.search(rf"removed {in_tmp} unfinished file\(s\)", edge.log()), edge.log()[-3000:]
            listed = asyncio.run(list_through_service(site))
        finally:
            edge.kill()
            senders.stop()

    context = f"(seed {seed}, {kills} kills, {len(tally.sent)} sent, {len(tally.accepted)} acknowledged)"
    # Each restart removed exactly the leftovers its predecessor's death left in tmp/.
    for restarted, count in restarts:
        if count:
            assert re.search(rf"removed {count} unfinished file\(s\)", restarted.log()), context
    check_spool(site, tally, listed, context)
    assert kills == KILLS, context
    print(f"crash test {context}: {tally.cut_sessions} sessions cut, {tally.deferred} deferred, "
          f"{len(os.listdir(queue_dir)) - len(tally.accepted)} stored without a 250, "
          f"tmp/ leftovers per kill {[len(names) for names in leftovers]}")


def check_spool(site, tally: Tally, listed: set[str], context: str) -> None:
    """Everything in queue/ is a whole message that was sent: nothing half-written, nothing foreign; no
    acknowledged message is lost, each is under the id its 250 named; home's listing is queue/."""
    queue_dir = site.spool_dir / "queue"
    key = site.spool_private_key
    stored = {}
    for path in sorted(queue_dir.iterdir()):
        match = NAME_PATTERN.fullmatch(path.name)
        assert match, f"{path.name} is not a spool file name {context}"
        opened = unseal(path.read_bytes(), key)   # SealedError for a truncated or altered file
        spool_id = match.group(2)
        assert opened.spool_id.hex() == spool_id, context
        tag = re.search(rb"^Subject: crash test (\S+)\r$", opened.message, re.M).group(1).decode()
        sent = tally.sent[tag]
        assert opened.message.endswith(sent.data), f"{path.name} is not what was sent {context}"
        assert RECEIVED.fullmatch(opened.message[:-len(sent.data)]), context
        assert opened.metadata["rcpt_tos"] == [f"user{tag[1:].split('-')[0]}@example.org"], context
        assert opened.metadata["mail_from"] == "sender@sender.test", context
        assert (opened.metadata["tls"] is not None) == sent.tls, context
        stored[spool_id] = tag

    missing = [sent.message_id for spool_id, sent in tally.accepted.items() if stored.get(spool_id) != sent.message_id]
    assert not missing, f"acknowledged but not in the spool: {missing[:5]} {context}"
    assert listed == set(stored), f"home's listing differs from queue/ {context}"

    assert not tally.errors, f"{tally.errors[:5]} {context}"
    # The run did what it claims: kills under load, both kinds of session accepted.
    assert tally.cut_sessions > 0, f"no session was ever interrupted by a kill {context}"
    assert {sent.tls for sent in tally.accepted.values()} == {True, False}, context


WORKER_KILLS = 6


def test_sigkill_of_workers_under_load_loses_no_acknowledged_message(tmp_path, pki):
    """With two workers: SIGKILL one worker at a time under load (the supervisor starts it again), then the
    supervisor itself (the workers die with it); the same guarantees hold, and the desk, not a restart,
    removed each dead worker's unfinished files."""
    seed = int(os.environ.get("YESTLS_CRASH_SEED") or int.from_bytes(os.urandom(4), "big"))
    rng = random.Random(seed)
    site = make_edge_site(tmp_path, pki, smtp_options="workers = 2\nmax_connections_per_ip = 50\n")
    tmp_dir = site.spool_dir / "tmp"
    tally = Tally()
    kills = 0
    with run_oracle(site.oracle):
        edge = start_edge(site)
        senders = Senders(site, pki, seed, tally)
        try:
            while kills < WORKER_KILLS:
                time.sleep(rng.uniform(*UP_SECONDS))
                victim = kills % 2      # in turn: each worker restarted after 1 s, then 2, then 4 (dying young)
                serving = {victim: worker_pids(edge)[victim]}
                os.kill(serving[victim], signal.SIGKILL)
                kills += 1
                wait_until(lambda gone=serving[victim], index=victim: worker_pids(edge)[index] != gone,
                           f"worker {victim} started again", edge)
            edge.process.kill()            # the supervisor: its workers die with it
            edge.process.wait(timeout=10)
            assert senders.stop(), "a client thread did not stop"
            log = edge.log()
            edge = start_edge(site)
            assert os.listdir(tmp_dir) == [], "tmp/ keeps leftovers after a restart"
            listed = asyncio.run(list_through_service(site))
        finally:
            edge.kill()
            senders.stop()

    context = f"(seed {seed}, {kills} worker kills, {len(tally.sent)} sent, {len(tally.accepted)} acknowledged)"
    assert len(re.findall(r"edge worker \d exited \(status -9\)", log)) == kills, context
    check_spool(site, tally, listed, context)
    print(f"worker crash test {context}: {tally.cut_sessions} sessions cut, {tally.deferred} deferred, "
          f"{log.count('message(s) unfinished')} deaths left unfinished files the desk removed")


def wait_until(condition, what: str, edge, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {edge.log()[-3000:]}"
        time.sleep(0.05)


async def list_through_service(site) -> set[str]:
    """The ids home's intake would see, through the restarted edge's spool service."""
    async with SpoolClient("127.0.0.1", site.spool_service_port, site.home_identity, timeout=10) as client:
        return {message.id for message in (await client.list()).messages}
