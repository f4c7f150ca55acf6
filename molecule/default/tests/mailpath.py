"""The mail path as the Molecule tests and `make demo` watch it: a message
handed to Postfix on `internet`, and what each hop logged about it.

Every hop is tied to the next by an identifier, not by timing: Postfix's
queue id -> the edge's spool id ("queued as") -> the edge's TLS session
(its log line names the connection and the client random) -> the oracle's
audit line at home (the same client random).
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass

from scenario import container, mailbox, site, wait_for

MX = site()["site_mx_name"]
DOMAIN = site()["site_domains"][0]
SENDER = "someone@sender.test"
POSTFIX_LOG = "/var/log/postfix.log"
AUDIT_LOG = "/var/log/yestls-oracle/audit.jsonl"
SPOOL_QUEUE = "/var/spool/yestls/queue"


def submit(marker: str, recipient: str | None = None) -> None:
    """Hand a message to Postfix on `internet`, as a local user there would."""
    message = (
        f"From: <{SENDER}>\nTo: <{recipient or mailbox()}>\nSubject: YesTLS end to end {marker}\n"
        f"Message-ID: <{marker}@sender.test>\n\nThe marker of this message is {marker}.\n"
    )
    subprocess.run(
        ["docker", "exec", "-i", "internet", "/usr/sbin/sendmail", "-f", SENDER, "--", recipient or mailbox()],
        input=message.encode(),
        check=True,
        timeout=30,
    )


@dataclass
class Attempt:
    """One delivery attempt of a message by Postfix's smtp client."""

    status: str  # sent, deferred, bounced
    reply: str  # the text in parentheses: the edge's reply
    tls: str | None  # the smtp process's TLS line for this connection, if TLS was made

    @property
    def spool_id(self) -> str | None:
        match = re.search(r"queued as ([0-9a-f]{32})", self.reply)
        return match.group(1) if match else None


def postfix_log() -> list[str]:
    return container("internet").file(POSTFIX_LOG).content_string.splitlines()


def queue_ids(marker: str, lines: list[str]) -> set[str]:
    """Postfix's queue id(s) of the message with this marker (its Message-ID holds the marker)."""
    return {m.group(1) for line in lines if (m := re.search(rf" ([0-9A-F]+): message-id=<{marker}@", line))}


def attempts(marker: str) -> list[Attempt]:
    """Postfix's delivery attempts for the message with this marker, oldest first."""
    lines = postfix_log()
    ids = queue_ids(marker, lines)
    found = []
    for index, line in enumerate(lines):
        match = re.search(r"postfix/smtp\[(\d+)\]: ([0-9A-F]+): to=<.*, status=(\w+) \((.*)\)$", line)
        if not match or match.group(2) not in ids:
            continue
        process = f"postfix/smtp[{match.group(1)}]:"
        tls = None
        for earlier in reversed(lines[:index]):  # back to this process's previous delivery
            if process not in earlier:
                continue
            if " status=" in earlier:
                break
            if "TLS connection" in earlier:
                tls = earlier
                break
        found.append(Attempt(match.group(3), match.group(4), tls))
    return found


def sent(marker: str) -> Attempt | None:
    return next((a for a in attempts(marker) if a.status == "sent"), None)


def wait_until_sent(marker: str, timeout: float = 60) -> Attempt:
    attempt = wait_for(lambda: sent(marker), timeout=timeout)
    assert attempt, f"Postfix did not deliver {marker} to the edge: {attempts(marker)}"
    return attempt


def forget_tls_sessions() -> None:
    """Empty Postfix's TLS session cache, so its next connection to the edge
    makes a full handshake (one signature) instead of resuming."""
    container("internet").check_output(
        "systemctl stop postfix && rm -f /var/lib/postfix/smtp_scache.db && systemctl start postfix"
    )


def signature_verified(tls_line: str) -> bool:
    """Whether Postfix's TLS line reports a server signature it verified: a
    full handshake. Postfix 3.7 logs resumed TLS 1.3 sessions as
    "established" too, but without "server-digest" (nothing was signed)."""
    return " server-digest " in tls_line + " "


def flush_postfix_queue() -> None:
    container("internet").check_output("postqueue -f")


def edge_session(spool_id: str, edge: str = "edge") -> dict:
    """The edge's TLS session that delivered spool_id, from its journal: the
    connection's "accepted <spool id>" line and its "TLS established" line."""
    journal = container(edge).check_output("journalctl -u yestls-edge.service -o cat --no-pager")
    accepted = re.search(rf"(\S+): accepted {spool_id} ", journal)
    assert accepted, f"the edge's journal has no 'accepted {spool_id}'"
    connection = re.escape(accepted.group(1))
    sessions = re.findall(rf"{connection}: TLS established: (\S+) (\S+) (\S+) sni=(\S+) (\S+) client_random=(\w+)",
                          journal[: accepted.start()])
    assert sessions, f"no TLS session on connection {accepted.group(1)} before it accepted {spool_id}"
    version, cipher, group, sni, how, client_random = sessions[-1]
    return {"version": version, "cipher": cipher, "resumed": how == "resumed", "client_random": client_random}


def audit_lines(client_random: str) -> list[dict]:
    text = container("home").file(AUDIT_LOG).content_string
    return [line for line in map(json.loads, filter(str.strip, text.splitlines()))
            if line.get("client_random") == client_random]


def edge_status() -> dict:
    """`yestls status --json` on the edge."""
    return json.loads(container("edge").check_output("yestls status --json"))


def oracle_reachable_from_edge() -> bool | None:
    value = edge_status()["oracle"].get("reachable")
    return value if isinstance(value, bool) else None


def spool_files(edge: str = "edge") -> list[str]:
    return container(edge).check_output(f"find {SPOOL_QUEUE} -type f").split()
