"""Two edges (docs/deploy.md, "More than one edge"): `edge` is MX 10, `edge2`
MX 20, found by Postfix on `internet` through DNS alone. With the primary's
service stopped, and separately with its container paused (no answer at
all), mail comes in through the second edge over verified TLS, signed at
home for the second edge; home's intake drains both spools; every message is
in the mailbox exactly once. Home's status shows both edges. The second edge
keeps the role's default `workers = "auto"`: one worker per core, and the
oracle admits the connections they open. With the
primary paused, home's own mail leaves through the second edge (its route,
its address, its HELO name: relay/home/egress.py), and the route comes back
to the primary once it answers again.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
import uuid
from contextlib import contextmanager

from mailpath import (
    DOMAIN,
    audit_lines,
    edge_session,
    forget_tls_sessions,
    signature_verified,
    spool_files,
    submit,
    wait_until_sent,
)
from scenario import (
    EDGES,
    OPEN,
    address,
    container,
    mailbox,
    messages_with,
    mx_name_of,
    tcp_probe,
    tunnel_address_of,
    wait_for,
)
from submission import CORRESPONDENT, authentication_on_internet, internet_postfix_log, received_at_correspondent

EDGE_UNIT = "yestls-edge.service"


def new_marker() -> str:
    return f"yestls-2e-{uuid.uuid4().hex}"


def delivered_once(marker: str) -> bytes:
    found = wait_for(lambda: messages_with(marker), timeout=120, interval=2)
    assert found, f"{marker} did not arrive in the mailbox at home"
    assert wait_for(lambda: len(messages_with(marker)) > 1, timeout=5) is False, f"{marker} arrived twice"
    return found[0]


def through_the_second_edge(marker: str, timeout: float) -> None:
    """Postfix sent `marker` to mx2 over verified TLS with a full handshake; home signed it for edge2, the
    edge2 spool took it, and it arrived once."""
    attempt = wait_until_sent(marker, timeout=timeout)
    assert re.search(rf"Verified TLS connection established to {re.escape(mx_name_of('edge2'))}\[", attempt.tls), \
        attempt.tls
    assert signature_verified(attempt.tls), attempt.tls
    session = edge_session(attempt.spool_id, "edge2")
    (signed,) = audit_lines(session["client_random"])
    assert signed["peer"] == "edge2" and signed["outcome"] == "signed", signed
    message = delivered_once(marker)
    assert f"by {mx_name_of('edge2')} (YesTLS)".encode() in message


@contextmanager
def primary(state: str):
    """The primary edge `stopped` (its service: connections refused) or `paused` (the container frozen:
    nothing answers) for the block."""
    internet = container("internet")
    if state == "stopped":
        container("edge").check_output(f"systemctl stop {EDGE_UNIT}")
    else:
        # A frozen container's kernel still completes the TCP handshake; only the greeting never comes, and
        # Postfix waits smtp_helo_timeout (300 s by default) before it tries MX 20: 30 s here.
        internet.check_output("postconf -e smtp_helo_timeout=30s && postfix reload")
        subprocess.run(["docker", "pause", "edge"], check=True, timeout=30)
    try:
        yield
    finally:
        if state == "stopped":
            container("edge").check_output(f"systemctl start {EDGE_UNIT}")
        else:
            subprocess.run(["docker", "unpause", "edge"], check=True, timeout=30)
            internet.check_output("postconf -X smtp_helo_timeout && postfix reload")
        # back in service: its port answers again
        target = (address("edge"), 25)
        assert wait_for(lambda: tcp_probe("internet", [target])[target] == OPEN, timeout=60)


def test_the_second_edge_runs_a_worker_per_core_and_the_oracle_admits_their_connections():
    """edge_relay's default workers = "auto" (docs/edge.md, "Several processes"): as many worker processes as
    the edge has cores (one process, no workers, on one core); home's oracle lets that edge hold the
    workers + 1 connections they open, one more for a reconnect, and never fewer than its default 4."""
    second = container("edge2")
    cores = int(second.check_output("getconf _NPROCESSORS_ONLN"))
    expected = min(cores, 64) if cores > 1 else 0

    def workers() -> int:
        return int(second.run("pgrep -c -f '^[^ ]*python[^ ]* -m relay[.]edge[.]worker'").stdout.strip() or 0)

    # a worker killed by an earlier test is started again after a pause (docs/edge.md)
    assert wait_for(lambda: workers() == expected, timeout=60), (cores, second.check_output("ps -eo args"))
    oracle = tomllib.loads(container("home").file("/etc/yestls/oracle.toml").content_string)
    limits = {peer["name"]: peer.get("max_connections") for peer in oracle["peer"]}
    opened = expected + 1 if expected else 1
    assert limits == {"edge": 4, "edge2": max(4, opened + 1)}, limits


def test_postfix_finds_both_edges_by_mx_in_preference_order():
    """What Postfix on `internet` resolves (its resolver is the scenario's DNS)."""
    out = container("internet").check_output(
        "python3 -c %s %s", "import sys, dns.resolver; print('\\n'.join(f'{r.preference} {r.exchange}' for r in "
        "dns.resolver.resolve(sys.argv[1], 'MX')))", DOMAIN)
    records = sorted((int(p), name.rstrip(".")) for p, name in (line.split() for line in out.splitlines()))
    assert records == [(10, mx_name_of("edge")), (20, mx_name_of("edge2"))]


def test_with_the_primarys_service_stopped_mail_comes_in_through_the_second_edge():
    forget_tls_sessions()   # a full handshake with mx2: a signature made at home for edge2
    marker = new_marker()
    with primary("stopped"):
        submit(marker)
        through_the_second_edge(marker, timeout=90)
    assert wait_for(lambda: spool_files("edge2") == [], timeout=60), "the second edge's spool was not drained"


def test_with_the_primary_paused_mail_comes_in_through_the_second_edge():
    """Postfix waits out the greeting on the frozen primary (30 s here), then tries MX 20."""
    forget_tls_sessions()
    marker = new_marker()
    with primary("paused"):
        submit(marker)
        through_the_second_edge(marker, timeout=150)
    assert wait_for(lambda: spool_files("edge2") == [] and spool_files("edge") == [], timeout=60)


def test_home_sees_both_edges_and_both_spools_empty():
    def edges() -> dict:
        return json.loads(container("home").check_output("yestls status --json"))["edges"]

    def settled() -> bool:
        seen = edges()
        return list(seen) == list(EDGES) and all(e["connected"] and e["depth"] == 0 for e in seen.values())

    assert wait_for(settled, timeout=90), edges()


# --- home's mail out through the second edge -----------------------------------------------------------------

EGRESS_UNIT = "yestls-egress.service"
_SEND_FROM_HOME = r"""
import smtplib, sys
with smtplib.SMTP("127.0.0.1", 25, timeout=30) as smtp:
    smtp.sendmail(sys.argv[1], [sys.argv[2]], sys.argv[3].encode())
"""


def egress_edge() -> str | None:
    """The edge whose WireGuard peer at home holds 0.0.0.0/0: where home's mail leaves."""
    lines = container("home").check_output("wg show wg0 allowed-ips").splitlines()
    holders = [line.split()[1:] for line in lines if "0.0.0.0/0" in line.split()[1:]]
    return next((edge for edge in EDGES for networks in holders if f"{tunnel_address_of(edge)}/32" in networks),
                None)


def egress_journal() -> str:
    return container("home").check_output(f"journalctl --no-pager -o cat -u {EGRESS_UNIT}")


def test_with_the_primary_paused_homes_mail_leaves_through_the_second_edge_and_comes_back():
    """Home's loopback listener (its own processes: DKIM-signed like submission) sends to the correspondent on
    `internet`. The egress service moves the route after 3 silent rounds of 10 s; the correspondent's Postfix
    sees edge2's address saying HELO mx2.example.org, and SPF (that address) and DKIM pass."""
    # the paused primary of the test before may have moved the route for a while: back after 6 answered rounds
    assert wait_for(lambda: egress_edge() == "edge", timeout=150, interval=3), egress_journal()
    sender, second = mailbox(), mx_name_of("edge2")
    marker = f"yestls-egress-{uuid.uuid4().hex}"
    body = (f"From: <{sender}>\r\nTo: <{CORRESPONDENT}>\r\nSubject: YesTLS egress {marker}\r\n"
            f"Message-ID: <{marker}@yestls.test>\r\nDate: Sun, 06 Dec 2026 12:00:00 +0000\r\n\r\n{marker}\r\n")
    with primary("paused"):
        assert wait_for(lambda: egress_edge() == "edge2", timeout=120, interval=3), egress_journal()
        shown = json.loads(container("home").check_output("yestls status --json"))["egress"]
        assert shown == {"edge": {"edge": "edge2", "primary": "edge"}}, shown
        container("home").check_output("python3 -c %s %s %s %s", _SEND_FROM_HOME, sender, CORRESPONDENT, body)
        received = wait_for(lambda: received_at_correspondent(marker), timeout=120, interval=2)
        assert received, f"{marker} did not reach {CORRESPONDENT}"
    edge2 = address("edge2")
    internet_id = re.search(rb"by mta\.sender\.test \(Postfix\) with ESMTPS id ([0-9A-F]+)", received).group(1)
    assert re.search(rf" {internet_id.decode()}: client=\S*\[{re.escape(edge2)}\]$",
                     "\n".join(internet_postfix_log()), re.M), f"no client=[{edge2}] for {internet_id}"
    assert re.search(rb"^Received: from " + re.escape(second).encode() + rb" \(\S+ \[" + re.escape(edge2).encode()
                     + rb"\]\)", received, re.M), received[:600]
    checked = authentication_on_internet(received, edge2, sender, second)
    assert checked["spf"] == "pass" and checked["dkim"] and all(sig["ok"] for sig in checked["dkim"]), checked
    # the primary answers again: after 6 answered rounds the route is back (and Postfix's HELO with it)
    assert wait_for(lambda: egress_edge() == "edge", timeout=150, interval=3), egress_journal()
    journal = egress_journal()
    assert "home's mail now leaves through edge2 (was edge: silent 3 rounds in a row)" in journal, journal
    assert "home's mail now leaves through edge (was edge2: a more preferred edge answers again)" in journal, journal
    table = container("home").file("/etc/postfix/yestls/egress").content_string
    assert table.splitlines()[-1] == "/^/ out-edge", table
