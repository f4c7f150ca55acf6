#!/usr/bin/env python3
"""Can one address drain home's signing budget? A ClientHello flood while a genuine sender delivers over STARTTLS.

What runs
    `yestls edge serve` and its key oracle (tests/edge_site.py) on loopback.
    The edge has its default TLS budget per client (edge.toml [tls]: 30
    full handshakes a minute per address, burst 10; 120 a minute per /24).
    The oracle signs at most `--oracle-rate` (5) per second for the edge,
    burst 10: its default is 50, but on this machine the flooder, the edge
    and the oracle share the cores, and a Python flooder here reaches a few
    dozen ClientHellos a second, where a real attacker has cores of its
    own. The budget scaled down keeps the question the same: can one
    address spend it? The flooder, on 127.0.5.2, runs `--flooders` threads that each
    connect, EHLO, STARTTLS and send a fresh ClientHello (Python's ssl, a
    memory BIO), read what comes back and hang up: every one asks for a
    signature unless the edge declines it. The genuine sender, on
    127.0.6.2 (another /24), delivers one message every `--interval`
    seconds (2.5: 24 a minute, a busy correspondent) over verified STARTTLS
    (TLS 1.3, the test CA) for `--seconds`, a full handshake each time (no
    session reuse: the costly case; an MTA that resumes costs nothing).

    The reference is the same run with the per-client budget lifted (what
    the edge did before it had one): the oracle's own limit is then the
    only one, and the flood spends it.

What it prints
    `# ...` the flood's attempts and the oracle's signatures, for both runs;
    `value genuine_starttls_success_pct N`: the genuine sender's messages
        that got a 250 over TLS, in percent, with the budget (goal 100);
    `# without the per-client budget: ...` the same, for comparison.

Run it
    .venv/bin/python bench/handshake_flood.py [--seconds 20] [--interval 2.5] [--flooders 8] [--oracle-rate 5]
"""

import argparse
import json
import ssl
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FLOODER, GENUINE = "127.0.5.2", "127.0.6.2"
# The edge before it had a budget: no limit per client, and a client whose TLS failed is not asked to wait.
NO_BUDGET = ("handshakes_per_minute = 1000000\nhandshake_burst = 100000\nnetwork_handshakes_per_minute = 1000000\n"
             "network_handshake_burst = 100000\nstarttls_per_minute = 1000000\nstarttls_burst = 100000\n"
             "retry_after = 0.001\n")


def flood_class():
    from tests.background import Background
    from tests.edge_smtp import SmtpClient

    class Flood(Background):
        """Threads sending ClientHellos after STARTTLS from one address, until stopped."""

        def __init__(self, port: int, threads: int):
            super().__init__(threads, join_timeout=30)
            self.port = port
            self.attempts = 0
            self.hellos = 0       # ClientHellos that reached the edge (after its 220 to STARTTLS)
            self.context = ssl.create_default_context()
            self.context.check_hostname, self.context.verify_mode = False, ssl.CERT_NONE

        def work(self, index: int) -> None:
            self.attempts += 1
            try:
                with SmtpClient.connect(self.port, source=FLOODER, timeout=5) as client:
                    if client.greeting.code != 220:
                        return
                    client.ehlo()
                    if client.command("STARTTLS").code != 220:
                        return
                    outgoing = ssl.MemoryBIO()
                    tls = self.context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="mx.example.org")
                    try:
                        tls.do_handshake()
                    except ssl.SSLWantReadError:
                        pass
                    client.send(outgoing.read())  # the ClientHello
                    self.hellos += 1
                    client.sock.recv(65536)  # the server's flight, or its alert
            except (OSError, AssertionError):
                time.sleep(0.01)

    return Flood


def genuine_sender(port: int, cafile: str, seconds: float, interval: float) -> tuple[int, int]:
    """(messages tried, messages accepted over TLS): one every `interval` seconds for `seconds`."""
    from tests.edge_smtp import SmtpClient, queued_id

    tried = ok = 0
    start = time.monotonic()
    while time.monotonic() < start + seconds:
        time.sleep(max(0.0, start + tried * interval - time.monotonic()))
        tried += 1
        try:
            with SmtpClient.connect(port, source=GENUINE, timeout=10) as client:
                client.ehlo()
                client.starttls(ssl.create_default_context(cafile=cafile))
                client.ehlo()
                queued_id(client.deliver("a@sender.example.net", ["user@example.org"],
                                         b"Subject: genuine\r\n\r\nbody\r\n"))
                ok += 1
        except (OSError, AssertionError, ssl.SSLError):
            pass  # counted: it is the next message's turn
    return tried, ok


def signatures(audit_log: Path) -> int:
    return sum(1 for line in audit_log.read_text().splitlines() if json.loads(line).get("outcome") == "signed")


def run_once(directory: Path, pki, args, budget: bool) -> dict:
    from tests.edge_site import make_edge_site, start_edge
    from tests.oracle_home import start_oracle

    site = make_edge_site(directory, pki, tls_options="" if budget else NO_BUDGET)
    with open(site.oracle.config, "a") as config:   # the [[peer]] table is the file's last
        config.write(f"rate = {args.oracle_rate}\nburst = {2 * int(args.oracle_rate)}\n")
    oracle = start_oracle(site.oracle)
    edge = None
    try:
        edge = start_edge(site, timeout=60)
        with flood_class()(site.smtp_port, args.flooders) as flood:
            time.sleep(1.0)  # the flood is on before the sender comes
            tried, ok = genuine_sender(site.smtp_port, str(pki.ca_pem), args.seconds, args.interval)
        return {"tried": tried, "ok": ok, "attempts": flood.attempts, "hellos": flood.hellos,
                "signatures": signatures(site.oracle.audit_log)}
    finally:
        for process in filter(None, [edge.process if edge else None, oracle.process]):
            if process.poll() is None:
                process.terminate()
                process.wait(30)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=2.5, help="seconds between the genuine messages")
    parser.add_argument("--flooders", type=int, default=8)
    parser.add_argument("--oracle-rate", type=float, default=5.0, help="signatures per second the oracle allows")
    args = parser.parse_args(argv)

    from tests.pki import make_pki

    with tempfile.TemporaryDirectory(prefix="yestls-bench-flood-") as tmp:
        pki = make_pki(Path(tmp) / "pki", key_types=("ecdsa-p256",))
        results = {budget: run_once(Path(tmp) / ("budget" if budget else "none"), pki, args, budget)
                   for budget in (True, False)}
    for budget, r in results.items():
        name = "with the per-client budget" if budget else "without the per-client budget"
        pct = 100.0 * r["ok"] / max(r["tried"], 1)
        print(f"# {name}: flood {r['attempts']} connections, {r['hellos']} ClientHellos; "
              f"oracle signed {r['signatures']}; "
              f"genuine sender {r['ok']}/{r['tried']} over TLS ({pct:.1f}%)")
    with_budget = results[True]
    print(f"value genuine_starttls_success_pct {100.0 * with_budget['ok'] / max(with_budget['tried'], 1):.1f}")


if __name__ == "__main__":
    main()
