"""`make demo`: one message from the Internet to the mailbox at home, hop by hop.

Runs after `molecule converge` has deployed the scenario (molecule.yml): the
edge and home by playbooks/site.yml, and `internet`, a Postfix that finds the
edge as example.org's MX and insists on verified TLS. Sends one message and
prints what each hop logged about it, tied together by identifiers (see
tests/mailpath.py). The intake is paused while the message waits at the edge,
so the sealed file can be shown; then it is started again.
"""

from __future__ import annotations

import json
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
    container,
    imap_password,
    mailbox,
    messages_with,
    read_secret,
    wait_for,
)

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

    imap = f"imaps://{address('home', HOME_LAN)}/INBOX"
    print(f"\n\033[1mTry it yourself\033[0m: docker exec -it internet sendmail {mailbox()}  (end with a dot line),")
    print(f"read the mailbox from this machine (it is on home's LAN): curl -k -u '{mailbox()}:{imap_password()}'"
          f" '{imap}?ALL' lists the messages, '{imap};UID=1' fetches the first (-k: home's IMAPS certificate is"
          " self-signed);")
    print("watch `docker exec edge yestls status`; `make demo-down` removes everything.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
