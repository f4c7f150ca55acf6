#!/usr/bin/env python3
"""Plaintext left in the edge's memory after the 250: what root on the edge could read of mail already sealed.

What runs
    `yestls edge serve` with its key oracle (tests/edge_site.py), on
    loopback. Four measured messages are sent, each once: 40 KiB and
    300 KiB, each over STARTTLS (verified TLS 1.3, Python's ssl) and in
    cleartext. Every line of a measured message carries that message's own
    marker (`PLAINTEXT-<32 hex>`), so a fragment of it anywhere in memory
    is found, not only a whole copy. Then other mail keeps flowing for
    `--after` seconds (two clients, STARTTLS and cleartext, messages of
    random text of the same sizes), as on a live MX, and the edge process's
    whole memory is read (tests/process_memory.py: /proc/PID/mem; root
    only) and searched for each marker. Once right after the last 250 as
    well: that is the harder case, before other mail reuses freed memory.

    The reference is the goal, not another program: no fragment at all
    (0). What is counted: marker occurrences (one per line of a measured
    message); `copies` divides them by the lines a message has, so one
    whole copy left anywhere counts 1.0.

What it prints
    `# ...` per message and per scan;
    `value plaintext_marker_hits_after_10s N`  (fragments, all four messages; the goal is 0)
    `value plaintext_copies_after_10s X`       (the same, in whole messages' worth)

Run it
    .venv/bin/python bench/plaintext_memory.py [--after 10]
"""

import argparse
import os
import secrets
import ssl
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZES = {"40KiB": 40 * 1024, "300KiB": 300 * 1024}
LINE = 78   # bytes of text per line, then CRLF
SENDER, RECIPIENT = "a@sender.example.net", "user@example.org"


def marked_message(marker: str, size: int) -> tuple[bytes, int]:
    """A message of about `size` bytes, every body line holding `marker`; and how many lines hold it."""
    head = f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: measured\r\n\r\n".encode()
    lines = []
    while len(head) + sum(len(line) for line in lines) < size:
        text = f"{marker} line {len(lines):06d} "
        lines.append((text + "x" * (LINE - len(text))).encode() + b"\r\n")
    return head + b"".join(lines), len(lines)


def filler_message(size: int) -> bytes:
    head = f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: other mail\r\n\r\n".encode()
    line = (secrets.token_hex(LINE // 2)[:LINE]).encode() + b"\r\n"
    return head + line * (size // len(line))


def send(port: int, message: bytes, context: ssl.SSLContext | None) -> None:
    from tests.edge_smtp import SmtpClient, queued_id

    with SmtpClient.connect(port, timeout=30) as client:
        client.ehlo()
        if context is not None:
            client.starttls(context)
            client.ehlo()
        queued_id(client.deliver(SENDER, [RECIPIENT], message))
        client.expect("QUIT", 221)


def flow_class():
    from tests.background import Background

    class Flow(Background):
        """Other mail, on two clients (STARTTLS, cleartext), until stopped."""

        def __init__(self, port: int, context: ssl.SSLContext):
            super().__init__(threads=2)
            self.port = port
            self.context = context
            self.sent = 0
            self.errors = 0

        def work(self, index: int) -> None:
            sizes = list(SIZES.values())
            try:
                send(self.port, filler_message(sizes[self.sent % len(sizes)]), self.context if index == 0 else None)
                self.sent += 1
            except Exception:  # noqa: BLE001 - counted and printed; the measurement goes on
                self.errors += 1
                time.sleep(0.2)

    return Flow


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--after", type=float, default=10.0, help="seconds of other mail before the scan")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench/plaintext_memory.py reads another process's memory: run it as root")

    from tests.edge_site import make_edge_site, start_edge
    from tests.oracle_home import start_oracle
    from tests.pki import make_pki
    from tests.process_memory import marker_hits

    with tempfile.TemporaryDirectory(prefix="yestls-bench-memory-") as tmp:
        directory = Path(tmp)
        pki = make_pki(directory / "pki", key_types=("ecdsa-p256",))
        site = make_edge_site(directory / "site", pki, smtp_options="max_connections_per_ip = 100\n")
        oracle = start_oracle(site.oracle)
        edge = None
        try:
            edge = start_edge(site, timeout=60)
            context = ssl.create_default_context(cafile=str(pki.ca_pem))
            markers, lines = {}, {}
            for size_name, size in SIZES.items():
                for mode in ("starttls", "plaintext"):
                    name = f"{size_name}-{mode}"
                    marker = f"PLAINTEXT-{secrets.token_hex(16)}"
                    message, lines[name] = marked_message(marker, size)
                    markers[name] = marker.encode()
                    send(site.smtp_port, message, context if mode == "starttls" else None)
            pid = edge.process.pid
            right_after = marker_hits(pid, markers)
            with flow_class()(site.smtp_port, context) as flow:
                time.sleep(args.after)
            later = marker_hits(pid, markers)
            print(f"# edge pid {pid}; other mail during the {args.after:.0f} s: {flow.sent} messages "
                  f"({flow.errors} errors)")
            for name in markers:
                print(f"# {name}: {lines[name]} marked lines; hits right after the 250: {right_after[name]}, "
                      f"after {args.after:.0f} s of other mail: {later[name]}")
            hits = sum(later.values())
            copies = sum(later[name] / lines[name] for name in markers)
            print(f"# right after: {sum(right_after.values())} hits, "
                  f"{sum(right_after[n] / lines[n] for n in markers):.3f} copies")
            print(f"value plaintext_marker_hits_after_{args.after:.0f}s {hits}")
            print(f"value plaintext_copies_after_{args.after:.0f}s {copies:.3f}")
        finally:
            for process in filter(None, [edge.process if edge else None, oracle.process]):
                if process.poll() is None:
                    process.terminate()
                    process.wait(30)


if __name__ == "__main__":
    main()
