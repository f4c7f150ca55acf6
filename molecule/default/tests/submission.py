"""The site's users as mail clients, and what home's Postfix and `internet`
logged about their mail: the helpers of test_outbound.py and test_addresses.py.

A client runs on `internet` (a phone somewhere on the Internet): it resolves
the clients' name in the scenario's DNS (the edge's address), and speaks SMTP
submission (465 implicit TLS, 587 STARTTLS) or IMAPS to it, the certificate
verified against the test CA. The edge forwards those ports to home, where
Postfix and Dovecot end TLS.

Every hop is tied to the next by an identifier, as in mailpath.py: the
message's Message-ID (it holds a marker) -> home's queue id -> home's smtp
line "queued as <internet's queue id>" -> internet's queue id -> its
"client=" line.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass

from scenario import client_name, container, imap_password, site

CLIENT_CA = "/etc/postfix/yestls-test-ca.pem"  # the test CA on `internet` (internet.yml)
CORRESPONDENT = "someone@sender.test"  # receives on `internet` (its own MX)
CORRESPONDENT_MAILDIR = "/home/someone/Maildir"
INTERNET_POSTFIX_LOG = "/var/log/postfix.log"
HOME_POSTFIX_UNIT = "postfix@-.service"

_SMTP_CLIENT = r"""
import json, smtplib, ssl, sys
spec = json.loads(sys.argv[1])
context = ssl.create_default_context(cafile=spec["ca"])
out = {"steps": [], "features": [], "peer": None}
def reply(name, code, text):
    out["steps"].append([name, code, text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)])
    return code
try:
    if spec["port"] == 465:
        smtp = smtplib.SMTP_SSL(spec["host"], 465, context=context, timeout=30)
    else:
        smtp = smtplib.SMTP(spec["host"], spec["port"], timeout=30)
    out["peer"] = smtp.sock.getpeername()[0]
    smtp.ehlo("phone.sender.test")
    if spec["port"] == 587 and spec["starttls"]:
        reply("STARTTLS", *smtp.starttls(context=context))
        smtp.ehlo("phone.sender.test")
    out["features"] = sorted(smtp.esmtp_features)
    if spec["login"]:
        try:
            reply("AUTH", *smtp.login(*spec["login"]))
        except smtplib.SMTPAuthenticationError as error:
            reply("AUTH", error.smtp_code, error.smtp_error)
            raise SystemExit
    if reply("MAIL", *smtp.mail(spec["mail_from"])) >= 400:
        raise SystemExit
    accepted = [r for r in spec["rcpts"] if reply("RCPT", *smtp.rcpt(r)) < 400]
    if accepted and spec["message"] is not None:
        try:
            reply("DATA", *smtp.data(spec["message"].encode()))
        except smtplib.SMTPDataError as error:
            reply("DATA", error.smtp_code, error.smtp_error)
    else:
        smtp.rset()
    smtp.quit()
except SystemExit:
    pass
print(json.dumps(out))
"""


@dataclass
class Session:
    """What a submission client saw: the address it reached, the server's
    ESMTP features, and each command's reply code and text."""

    peer: str
    features: list[str]
    steps: list[tuple[str, int, str]]

    def code(self, command: str) -> int | None:
        """The reply code of the first such command (None: never sent)."""
        return next((code for name, code, _ in self.steps if name == command), None)

    def codes(self, command: str) -> list[int]:
        return [code for name, code, _ in self.steps if name == command]

    def text(self, command: str) -> str:
        return next((text for name, _, text in self.steps if name == command), "")


def message(marker: str, sender: str, recipient: str) -> str:
    return (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: YesTLS outbound {marker}\r\n"
        f"Message-ID: <{marker}@yestls.test>\r\nDate: Fri, 04 Dec 2026 12:00:00 +0000\r\n\r\n"
        f"The marker of this message is {marker}.\r\n"
    )


def submit(port: int, login: tuple[str, str] | None, mail_from: str, rcpts: list[str],
           body: str | None = None, starttls: bool = True) -> Session:
    """One SMTP submission session from `internet` to the clients' name (the
    edge's address), port 465 or 587, TLS verified against the test CA."""
    spec = {"ca": CLIENT_CA, "host": client_name(), "port": port, "starttls": starttls,
            "login": list(login) if login else None, "mail_from": mail_from, "rcpts": rcpts, "message": body}
    out = json.loads(container("internet").check_output("python3 -c %s %s", _SMTP_CLIENT, json.dumps(spec)))
    return Session(out["peer"], out["features"], [tuple(step) for step in out["steps"]])


def login_of(address: str) -> tuple[str, str]:
    return address, imap_password(address)


def home_postfix_log() -> list[str]:
    """Home's Postfix log (journald: Postfix logs through syslog)."""
    return container("home").check_output(f"journalctl --no-pager -o short -u {HOME_POSTFIX_UNIT}").splitlines()


def internet_postfix_log() -> list[str]:
    return container("internet").file(INTERNET_POSTFIX_LOG).content_string.splitlines()


def queue_ids(marker: str, lines: list[str]) -> set[str]:
    """Postfix's queue id(s) of the message whose Message-ID holds the marker."""
    return {m.group(1) for line in lines if (m := re.search(rf" ([0-9A-F]+): message-id=<{marker}@", line))}


def lines_of(queue_id: str, lines: list[str]) -> list[str]:
    return [line for line in lines if f" {queue_id}: " in line]


@dataclass
class Delivery:
    """One delivery of a message by a Postfix client process (smtp or lmtp)."""

    process: str  # postfix/smtp[123]
    recipient: str
    relay: str
    status: str
    reply: str
    tls: str | None  # the process's TLS line for this connection, if TLS was made


def deliveries(marker: str, lines: list[str]) -> list[Delivery]:
    """Every delivery attempt of the message with this marker, from a Postfix log."""
    ids = queue_ids(marker, lines)
    found = []
    for index, line in enumerate(lines):
        match = re.search(r" (postfix/\w+)\[(\d+)\]: ([0-9A-F]+): to=<([^>]*)>.*, relay=(\S+), .*status=(\w+) \((.*)\)$",
                          line)
        if not match or match.group(3) not in ids:
            continue
        process = f"{match.group(1)}[{match.group(2)}]"
        tls = None
        for earlier in reversed(lines[:index]):  # back to this process's previous delivery
            if process + ":" not in earlier:
                continue
            if " status=" in earlier:
                break
            if "TLS connection established" in earlier:
                tls = earlier
                break
        found.append(Delivery(process, match.group(4), match.group(5).rstrip(","), match.group(6),
                              match.group(7), tls))
    return found


def received_at_correspondent(marker: str) -> bytes | None:
    """The message with this marker in someone@sender.test's Maildir on `internet`, if it arrived."""
    internet = container("internet")
    found = internet.run("grep -rlF %s %s/new", marker, CORRESPONDENT_MAILDIR).stdout.split()
    if not found:
        return None
    assert len(found) == 1, found
    return internet.file(found[0]).content


_CHECK_AUTHENTICATION = r"""
import email, json, sys, dkim, spf
message = sys.stdin.buffer.read()
client_ip, mail_from, helo = sys.argv[1:4]
signatures = len(email.message_from_bytes(message).get_all("DKIM-Signature") or [])
results = []
for index in range(signatures):
    verifier = dkim.DKIM(message)
    ok = verifier.verify(idx=index)
    results.append({"ok": bool(ok), "d": verifier.domain.decode() if verifier.domain else None,
                    "s": verifier.selector.decode() if verifier.selector else None,
                    "a": verifier.signature_fields.get(b"a", b"").decode()})
print(json.dumps({"dkim": results, "spf": spf.check2(i=client_ip, s=mail_from, h=helo)[0]}))
"""


def authentication_on_internet(message_bytes: bytes, client_ip: str, mail_from: str, helo: str) -> dict:
    """DKIM (each signature, dkimpy, keys from the scenario's DNS) and SPF
    (pyspf, for the connecting address and envelope sender) checked on
    `internet`, as a receiving MTA would."""
    out = subprocess.run(
        ["docker", "exec", "-i", "internet", "python3", "-c", _CHECK_AUTHENTICATION, client_ip, mail_from, helo],
        input=message_bytes, check=True, capture_output=True, timeout=60,
    ).stdout
    return json.loads(out)


MX = site()["site_mx_name"]
HELO = site().get("site_edge_ptr_name", MX)
