"""A multi-process edge (`[smtp] workers = 2`): relay/edge/workers.py, worker.py, reuseport.py, spool/desk.py.

One edge with two workers and an implicit-TLS listener serves the module.
Clients come from several loopback networks (127.0.N.1), which the kernel
spreads over the workers by source network. What must hold:
- mail from every network, plaintext and STARTTLS, is answered 250 only
  once its sealed file is in queue/; it unseals to what was sent; home's
  spool service (in the supervisor) lists it;
- both workers took connections: the group really is several processes;
- a session ticket one worker issued resumes a session on the other
  (shared, ratcheted ticket keys), with Python's ssl as the client;
- the per-IP cap holds across workers: one address's third connection is
  refused while its first two are open, because one network always reaches
  one worker;
- the supervisor's metrics page adds up the workers' counters and open
  connections;
- a worker killed with SIGKILL is started again by the supervisor, its
  clients are served after it, the other worker's are served meanwhile,
  and its unfinished tmp/ files are gone.
The before-queue verdict with two workers: tests/edge/test_edge_verdict.py
runs all its cases on both kinds of edge.
"""

import asyncio
import re
import ssl
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.edge.reuseport import worker_for
from relay.edge.worker_metrics import REPORT_EVERY
from relay.spool.sealed import unseal

from ..edge_site import make_edge_site, start_edge, worker_pids
from ..edge_smtp import MX_NAME, SmtpClient, queued_id, tls_context
from ..oracle_home import run_oracle
from .test_edge_crash import list_through_service

WORKERS = 2
TIMEOUT = 30.0


def sources_for(worker: int, count: int = 2) -> list[str]:
    """Loopback client addresses (one per /24) that the kernel sends to `worker`."""
    found = [f"127.0.{n}.1" for n in range(1, 200) if worker_for(f"127.0.{n}.1", WORKERS) == worker]
    return found[:count]


@pytest.fixture(scope="module")
def edge(pki, tmp_path_factory):
    site = make_edge_site(tmp_path_factory.mktemp("workers"), pki, implicit_tls=True,
                          smtp_options=f"workers = {WORKERS}\nmax_connections_per_ip = 2\n")
    with run_oracle(site.oracle):
        process = start_edge(site)
        try:
            wait_for(lambda: len(worker_pids(process)) == WORKERS, "both workers to serve", process)
            yield site, process
        finally:
            process.stop()


def wait_for(condition, what: str, process) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {process.log()[-3000:]}"
        time.sleep(0.05)


def deliver(site, source: str, marker: str, *, starttls_context: ssl.SSLContext | None = None) -> str:
    client = SmtpClient.connect(site.smtp_port, source=source)
    with client:
        client.expect("EHLO client.test", 250)
        if starttls_context is not None:
            client.expect("STARTTLS", 220)
            client.sock = starttls_context.wrap_socket(client.sock, server_hostname=MX_NAME)
            client.expect("EHLO client.test", 250)
        client.expect("MAIL FROM:<alice@client.test>", 250)
        client.expect("RCPT TO:<user@example.org>", 250)
        client.expect("DATA", 354)
        client.send(f"Subject: {marker}\r\n\r\n{marker}\r\n.\r\n".encode())
        spool_id = queued_id(client.read_reply())
        client.expect("QUIT", 221)
    return spool_id


def check_sealed(site, spool_id: str, marker: str) -> None:
    found = [p for p in site.spooled_files() if p.name.endswith(spool_id)]
    assert len(found) == 1, spool_id
    opened = unseal(found[0].read_bytes(), site.spool_private_key)
    assert opened.message.endswith(f"Subject: {marker}\r\n\r\n{marker}\r\n".encode())


def test_mail_from_every_network_is_sealed_and_both_workers_serve(edge, pki):
    site, process = edge
    pids = worker_pids(process)
    seen_by = set()
    for worker in range(WORKERS):
        for n, source in enumerate(sources_for(worker)):
            marker = f"w{worker}-{n}-{time.monotonic_ns()}"
            spool_id = deliver(site, source, marker, starttls_context=tls_context(pki) if n % 2 else None)
            check_sealed(site, spool_id, marker)
            seen_by.add(worker)
    assert seen_by == set(range(WORKERS))
    # Each worker logged its own accepted messages: both processes took mail.
    log = process.log()
    assert set(pids) == set(range(WORKERS))
    assert len(re.findall(r"accepted [0-9a-f]{32}", log)) >= 2 * WORKERS
    assert {p.name.rsplit("-", 1)[1] for p in site.spooled_files()} == asyncio.run(list_through_service(site))


def test_a_ticket_from_one_worker_resumes_on_the_other(edge, pki):
    site, _ = edge
    context = tls_context(pki)
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    first = SmtpClient.connect(site.implicit_tls_port, tls=context, source=sources_for(0)[0])
    with first:
        first.expect("EHLO client.test", 250)     # the ticket arrives with the first records read
        session = first.sock.session
        assert session is not None and session.has_ticket
    second = SmtpClient.connect(site.implicit_tls_port, tls=context, session=session, source=sources_for(1)[0])
    with second:
        assert second.sock.session_reused
        second.expect("EHLO client.test", 250)


def test_the_per_ip_cap_holds_across_workers(edge):
    site, _ = edge
    source = sources_for(1)[1]
    held = [SmtpClient.connect(site.smtp_port, source=source) for _ in range(2)]
    try:
        third = SmtpClient.connect(site.smtp_port, source=source)
        with third:
            assert third.greeting.code == 421 and "from your address" in third.greeting.text
        # Another address of another network is not held back by this one.
        with SmtpClient.connect(site.smtp_port, source=sources_for(0)[1]) as other:
            assert other.greeting.code == 220
    finally:
        for client in held:
            client.close()


def test_a_worker_killed_is_started_again_and_the_other_serves_meanwhile(edge, pki):
    site, process = edge
    victim = worker_pids(process)[0]
    survivor_source, victim_source = sources_for(1)[0], sources_for(0)[0]
    # A message half-written on the victim: its tmp/ file must go when the worker dies.
    client = SmtpClient.connect(site.smtp_port, source=victim_source)
    client.expect("EHLO client.test", 250)
    client.expect("MAIL FROM:<alice@client.test>", 250)
    client.expect("RCPT TO:<user@example.org>", 250)
    client.expect("DATA", 354)
    client.send(b"Subject: cut\r\n\r\n" + b"x" * 300_000 + b"\r\n")
    wait_for(lambda: list((site.spool_dir / "tmp").iterdir()), "the half-written message's tmp/ file", process)
    subprocess.run(["kill", "-9", str(victim)], check=True)
    assert client.sock.recv(1) == b""                 # the victim's connection is gone, no 250
    client.close()
    spool_id = deliver(site, survivor_source, "while-one-is-down")
    check_sealed(site, spool_id, "while-one-is-down")
    wait_for(lambda: worker_pids(process)[0] != victim, "worker 0 to be started again", process)
    assert re.search(r"edge worker 0 exited \(status -9\)", process.log())
    assert "the worker left 1 message(s) unfinished" in process.log()
    assert list((site.spool_dir / "tmp").iterdir()) == []
    spool_id = deliver(site, victim_source, "after-restart", starttls_context=tls_context(pki))
    check_sealed(site, spool_id, "after-restart")


def metric(site, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{site.metrics_port}/metrics", timeout=TIMEOUT) as page:
        text = page.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_the_supervisors_metrics_add_up_the_workers(edge):
    site, process = edge
    # Earlier tests' last reports may still be on their way (a worker reports every second): settle first.
    time.sleep(2 * REPORT_EVERY + 0.5)
    accepted = metric(site, "yestls_edge_messages_accepted_total")
    refused = metric(site, "yestls_edge_refused_total", reason="too_many_connections_from_ip")
    for worker in range(WORKERS):
        deliver(site, sources_for(worker)[0], f"counted-{worker}")
    wait_for(lambda: metric(site, "yestls_edge_messages_accepted_total") == accepted + WORKERS,
             "both workers' accepted messages on the supervisor's page", process)
    source = sources_for(1)[1]
    held = [SmtpClient.connect(site.smtp_port, source=source) for _ in range(2)]
    held.append(SmtpClient.connect(site.smtp_port, source=sources_for(0)[1]))
    try:
        wait_for(lambda: metric(site, "yestls_edge_smtp_connections") == 3, "3 open connections", process)
        with SmtpClient.connect(site.smtp_port, source=source) as third:
            assert third.greeting.code == 421
        wait_for(lambda: metric(site, "yestls_edge_refused_total", reason="too_many_connections_from_ip")
                 == refused + 1, "the refusal counted", process)
    finally:
        for client in held:
            client.close()
    wait_for(lambda: metric(site, "yestls_edge_smtp_connections") == 0, "no open connection", process)
