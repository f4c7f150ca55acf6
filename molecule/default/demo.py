"""`make demo`: one message from the Internet to the mailbox at home, and the
user's reply back out, hop by hop.

Runs after `molecule converge` has deployed the scenario (molecule.yml): the
edge and home by playbooks/site.yml, and `internet`, a Postfix that finds the
edge as example.org's MX and insists on verified TLS. Sends one message and
prints what each hop logged about it, tied together by identifiers (see
tests/mailpath.py). The intake is paused while the message waits at the edge,
so the sealed file can be shown; then it is started again. The reply is
submitted from `internet` (the user's phone) to the clients' name, which is
the edge's address: the edge forwards the connection to home, where Postfix
ends TLS, signs with DKIM, and delivers to sender.test's MX from home's
tunnel address, which leaves through the edge's public address.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

from mailpath import (  # noqa: E402 - the tests' helpers, found through the path set above
    SENDER,
    audit_lines,
    edge_session,
    forget_tls_sessions,
    postfix_log,
    queue_ids,
    spool_files,
    submit,
    wait_until_sent,
)
from scenario import (  # noqa: E402
    HOME_LAN,
    address,
    client_name,
    container,
    imap_password,
    mailbox,
    messages_with,
    read_secret,
    site,
    wait_for,
)
from submission import (  # noqa: E402
    HELO,
    authentication_on_internet,
    deliveries,
    home_postfix_log,
    internet_postfix_log,
    lines_of,
    login_of,
    message,
    received_at_correspondent,
)
from submission import queue_ids as home_queue_ids  # noqa: E402
from submission import submit as submit_from_phone  # noqa: E402

INTAKE_UNIT = "yestls-intake.service"


def hop(number: int, where: str, what: str) -> None:
    print(f"\n\033[1m{number}. {where}: {what}\033[0m")


def show(lines, indent: str = "   ") -> None:
    for line in lines if isinstance(lines, list) else str(lines).splitlines():
        print(textwrap.indent(line, indent))


def hexdump(data: bytes, length: int = 128) -> list[str]:
    rows = []
    for offset in range(0, min(length, len(data)), 16):
        chunk = data[offset:offset + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        rows.append(f"{offset:08x}  {chunk.hex(' '):<47}  {text}")
    return rows


def main() -> int:
    marker = f"demo-{uuid.uuid4().hex[:16]}"
    edge, home = container("edge"), container("home")
    print(f"YesTLS demo: a message from {SENDER} (Postfix on `internet`) to {mailbox()}.")
    print("The edge (cloud VM) holds no private key and never stores plaintext; home holds the keys.")

    forget_tls_sessions()  # a full handshake (a returning Postfix would resume: no signature to show)
    home.check_output(f"systemctl stop {INTAKE_UNIT}")  # so the sealed file waits to be shown
    try:
        hop(1, "internet", f"Postfix looks up the MX of {mailbox().split('@')[1]} and delivers over verified TLS")
        submit(marker)
        attempt = wait_until_sent(marker)
        log = postfix_log()
        (queue_id,) = queue_ids(marker, log)
        show([line for line in log if f" {queue_id}: " in line or line == attempt.tls])

        hop(2, "edge", "the TLS session (keyless: the handshake's one signature came from home)")
        session = edge_session(attempt.spool_id)
        journal = edge.check_output("journalctl -u yestls-edge.service -o short-iso --no-pager")
        show([line for line in journal.splitlines()
              if session["client_random"] in line or f"accepted {attempt.spool_id}" in line])

        hop(3, "home", "the key oracle's audit line for that handshake (same client random)")
        signed = audit_lines(session["client_random"])
        if session["resumed"]:
            show("A resumed session (Postfix kept a ticket from an earlier run): no signature was needed.")
        for line in signed:
            show(json.dumps(line, indent=2))

        hop(4, "edge", "what its disk holds: the message sealed to home's key (the intake is paused)")
        path = next(p for p in spool_files() if attempt.spool_id in p)
        sealed = read_secret("edge", path)
        show([f"{path}: {len(sealed)} bytes"] + hexdump(sealed) + ["..."])
        show(f"the marker {marker!r} in this file: {'FOUND' if marker.encode() in sealed else 'no, it is ciphertext'}")
    finally:
        home.check_output(f"systemctl start {INTAKE_UNIT}")

    hop(5, "home", "the intake pulls the sealed file, opens it, delivers it to Dovecot by LMTP")
    assert wait_for(lambda: attempt.spool_id not in " ".join(spool_files()), timeout=120), "the intake did not pull it"
    intake_log = home.check_output("journalctl -u yestls-intake.service -o short-iso --no-pager")
    show([line for line in intake_log.splitlines() if attempt.spool_id in line])

    hop(6, "you", f"read over IMAPS at home ({mailbox()})")
    found = wait_for(lambda: messages_with(marker), timeout=120, interval=2)
    assert found, "the message did not arrive"
    show(found[0].decode(errors="replace").replace("\r\n", "\n").rstrip())

    reply(marker)

    imap = f"imaps://{client_name()}/INBOX"
    resolve = f"--resolve {client_name()}:993:{address('home', HOME_LAN)}"
    print(f"\n\033[1mTry it yourself\033[0m: docker exec -it internet sendmail {mailbox()}  (end with a dot line),")
    print(f"read the mailbox from this machine (it is on home's LAN): curl --cacert {site()['site_test_ca']['cert']}"
          f" {resolve} -u '{mailbox()}:{imap_password()}' '{imap}?ALL' lists the messages, '{imap};UID=1' fetches"
          " the first (the certificate is the clients' name's, signed by the scenario's test CA);")
    print("watch `docker exec edge yestls status`; `make demo-down` removes everything.")
    return 0


def reply(marker: str) -> None:
    """The user answers from a phone on the Internet; the answer leaves through the edge, TLS made at home."""
    user, correspondent = mailbox(), SENDER
    answer = f"{marker}-reply"
    edge = address("edge")
    hop(7, "you, on the Internet", f"reply from your phone: submission to {client_name()}:587 (the edge's address"
        f" {edge}), STARTTLS, login as {user}")
    session = submit_from_phone(587, login_of(user), user, [correspondent],
                                message(answer, user, correspondent))
    show([f"{name}: {code} {text.splitlines()[0] if text else ''}" for name, code, text in session.steps])
    assert session.code("DATA") == 250, session.steps

    hop(8, "home", "Postfix ended that TLS (the edge forwarded the connection: client= is the phone's"
        " own address), signed with DKIM, and delivered to sender.test's MX over TLS it made itself")
    delivered = wait_for(lambda: received_at_correspondent(answer), timeout=90, interval=2)
    assert delivered, f"the reply did not reach {correspondent}"
    log = home_postfix_log()
    (queue_id,) = home_queue_ids(answer, log)
    sent = [d for d in deliveries(answer, log) if d.status == "sent"]
    show(lines_of(queue_id, log) + [d.tls for d in sent if d.tls])

    hop(9, "internet", f"sender.test's Postfix received it from the edge's address ({edge}), HELO {HELO}")
    internet_id = re.search(r"queued as ([0-9A-F]+)", sent[0].reply).group(1)
    show([line for line in internet_postfix_log() if f" {internet_id}: client=" in line])
    checked = authentication_on_internet(delivered, edge, user, HELO)
    show([f"DKIM {sig['a']} d={sig['d']} s={sig['s']}: {'pass' if sig['ok'] else 'FAIL'}" for sig in checked["dkim"]]
         + [f"SPF for {user} from {edge}: {checked['spf']}"])
    journal = container("edge").check_output("journalctl -o cat --no-pager")
    show(f"the reply's marker in the edge's journal: {'FOUND' if answer in journal else 'no: it only forwarded ciphertext'}")


if __name__ == "__main__":
    sys.exit(main())
