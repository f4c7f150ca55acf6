"""Home's spam filter as the Molecule tests see it: rspamd's counters and log
(roles/home_spam), its /checkv2 answers, and mail put straight into Dovecot
at home (LMTP as the intake does, or doveadm save), read back over IMAPS.
"""

from __future__ import annotations

import json
import re
import subprocess
from contextlib import contextmanager

from scenario import IMAPSAtHome, ca_context, client_name, container, imap_password

RSPAMD_LOG = "/var/log/rspamd/rspamd.log"
RSPAMD_WORKER = "http://127.0.0.1:11333"
INTAKE_USER = "yestls-intake"  # the only user home's LMTP socket lets in
LMTP_SOCKET = "/run/dovecot/lmtp"
JUNK = "Junk"


def message(marker: str, sender: str, recipient: str, extra_headers: str = "") -> str:
    """A plain message with enough words for rspamd's Bayes to learn it (it
    refuses fewer than 11 tokens); its text and Message-ID hold the marker."""
    return (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: YesTLS spam filter {marker}\r\n"
        f"Message-ID: <{marker}@sender.test>\r\nDate: Sat, 05 Dec 2026 09:00:00 +0000\r\n{extra_headers}"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Dear members, the garden club meets again on Thursday evening in the library hall.\r\n"
        "We will talk about pruning fruit trees in winter, which roses survive frost best,\r\n"
        "and the seed exchange planned for early spring. Please bring cuttings and seeds.\r\n"
        f"The marker of this message is {marker}.\r\n"
    )


def doveadm_save(address: str, text: str, mailbox: str = "INBOX") -> None:
    """Put a message into a mailbox at home without Sieve (no delivery rules run)."""
    subprocess.run(["docker", "exec", "-i", "home", "doveadm", "save", "-u", address, "-m", mailbox],
                   input=text.encode(), check=True, timeout=30)


_LMTP = r"""
import smtplib, sys
sender, recipient, socket_path = sys.argv[1:4]
with smtplib.LMTP(socket_path) as lmtp:
    refused = lmtp.sendmail(sender, [recipient], sys.stdin.buffer.read())
assert not refused, refused
"""


def lmtp_deliver(sender: str, recipient: str, text: str) -> None:
    """Deliver a message by LMTP at home, as the intake does (its user, its socket): Sieve runs."""
    subprocess.run(["docker", "exec", "-i", "home", "runuser", "-u", INTAKE_USER, "--",
                    "python3", "-c", _LMTP, sender, recipient, LMTP_SOCKET],
                   input=text.encode(), check=True, timeout=30)


@contextmanager
def imap_session(address: str):
    """An IMAPS session of a mailbox, from home's LAN, the certificate verified."""
    with IMAPSAtHome(client_name(), 993, ssl_context=ca_context(), timeout=10) as imap:
        imap.login(address, imap_password(address))
        yield imap


def uids_with(imap, mailbox: str, marker: str) -> list[bytes]:
    """The UIDs of the messages of a mailbox whose Subject holds marker."""
    typ, _ = imap.select(mailbox)
    assert typ == "OK", f"cannot select {mailbox}"
    typ, data = imap.uid("SEARCH", None, "SUBJECT", marker)
    assert typ == "OK"
    return data[0].split()


def move(imap, source: str, marker: str, target: str) -> None:
    """Move the message with marker from source to target over IMAP (MOVE, RFC 6851)."""
    uids = uids_with(imap, source, marker)
    assert len(uids) == 1, f"{marker}: {len(uids)} messages in {source}"
    typ, data = imap.uid("MOVE", uids[0].decode(), target)
    assert typ == "OK", data


def bayes_learned() -> dict[str, int]:
    """`rspamc stat` at home: how many messages each Bayes class has learnt
    (its Statfile lines; the controller refreshes them from redis every few seconds)."""
    out = container("home").check_output("rspamc stat")
    counts = dict(re.findall(r"Statfile: (BAYES_\w+) .*?; learned: (\d+);", out))
    assert set(counts) == {"BAYES_SPAM", "BAYES_HAM"}, out
    return {symbol: int(count) for symbol, count in counts.items()}


def learnt_as(message_id: str) -> list[str]:
    """The classes rspamd's controller logged learning this Message-ID as, oldest first."""
    log = container("home").file(RSPAMD_LOG).content_string
    return re.findall(rf"learned message as (\w+): {re.escape(message_id)}$", log, flags=re.MULTILINE)


_CHECKV2 = r"""
import json, sys, urllib.request
url, headers = sys.argv[1], json.loads(sys.argv[2])
request = urllib.request.Request(url + "/checkv2", data=sys.stdin.buffer.read(), headers=headers)
with urllib.request.urlopen(request, timeout=60) as answer:
    sys.stdout.write(answer.read().decode())
"""


def checkv2(text: str, headers: dict[str, str]) -> dict:
    """rspamd's verdict on a message, asked at home as the intake asks it (HTTP /checkv2)."""
    out = subprocess.run(["docker", "exec", "-i", "home", "python3", "-c", _CHECKV2, RSPAMD_WORKER,
                          json.dumps(headers)],
                         input=text.encode(), check=True, capture_output=True, timeout=90).stdout
    return json.loads(out)
