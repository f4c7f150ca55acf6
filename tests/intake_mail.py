"""Mail from a sender, through the real edge and home's intake, into a private Dovecot: the intake's tests.

    with mail_world(tmp_path_factory.mktemp("world"), pki, users=("user@example.org",)) as world:
        spool_id = world.send("alice@sender.example.net", ["user@example.org"], message)   # STARTTLS, 250
        with world.intake_running() as intake:
            (got,) = world.wait_for_mailbox("user@example.org", 1, intake)
        trace, rest = split_trace(got)      # the headers added on the way, and what was sent

The world is a Dovecot, the site's key oracle and `yestls edge serve` (all
subprocesses), and an intake.toml for them (tests/home_site.py). The intake
runs only inside `intake_running()`, so a test can queue mail on the edge
while home is away. Every wait has a deadline and fails with the logs.
"""

import re
import smtplib
import ssl
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from relay.home.ledger import Entry, Ledger

from .dovecot import Dovecot, run_dovecot
from .edge_site import EdgeProcess, EdgeSite, make_edge_site, start_edge
from .fake_rspamd import run_fake_rspamd
from .home_site import EDGE, IntakeProcess, IntakeSite, make_intake, start_intake
from .oracle_home import run_oracle
from .pki import TestPKI

USER = "user@example.org"
SENDER = "alice@sender.example.net"
CLIENT_NAME = "sender.example.net"
MX_NAME = "mx.example.org"
DEADLINE = 60.0   # seconds any one wait may take; loopback delivery takes well under a second

# What is added between the sender and the IMAP reader, top first: Dovecot's LMTP
# trace (Delivered-To only when the LMTP transaction had one recipient), the
# intake's spool id, the spam filter's fields (tests/fake_rspamd.py: Authentication-Results and
# X-Spamd-Result, then our X-Spam), the edge's Received.
TRACE_HEADERS = ("return-path", "delivered-to", "received", "x-yestls-spool-id", "authentication-results",
                 "x-spamd-result", "x-spam", "received")
TRACE_HEADERS_SHARED = tuple(name for name in TRACE_HEADERS if name != "delivered-to")

_QUEUED = re.compile(r"queued as ([0-9a-f]{32})\b")


def wait_for(condition: Callable[[], object], what: str, timeout: float = DEADLINE,
             details: Callable[[], str] = lambda: "") -> object:
    """Poll `condition` until it returns something truthy (returned); AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{details()}")
        time.sleep(0.1)


def header_fields(message: bytes) -> list[tuple[str, bytes]]:
    """The message's header fields in order: (lower-case name, the whole field with its folded lines)."""
    head = message.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    fields: list[tuple[str, bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            name, text = fields[-1]
            fields[-1] = (name, text + line)
        else:
            fields.append((line.split(b":", 1)[0].decode("ascii", "replace").strip().lower(), line))
    return fields


def split_trace(delivered: bytes, *, shared: bool = False) -> tuple[list[bytes], bytes]:
    """The trace header fields added on the way, and the rest of the bytes.

    The fields must be exactly TRACE_HEADERS, or TRACE_HEADERS_SHARED when
    `shared` (one LMTP transaction for several recipients: no Delivered-To).
    """
    expected = TRACE_HEADERS_SHARED if shared else TRACE_HEADERS
    fields = header_fields(delivered)[:len(expected)]
    names = tuple(name for name, _ in fields)
    assert names == expected, f"expected the trace headers {expected} on top, got {names}"
    length = sum(len(text) for _, text in fields)
    return [text for _, text in fields], delivered[length:]


def header_value(message: bytes, name: str) -> str | None:
    """The first `name` header's value, unfolded; None when there is none."""
    for field_name, text in header_fields(message):
        if field_name == name.lower():
            value = text.split(b":", 1)[1].decode("utf-8", "replace")
            return re.sub(r"\r?\n[ \t]", " ", value).strip()
    return None


def spool_id_of(delivered: bytes) -> str | None:
    return header_value(delivered, "X-YesTLS-Spool-Id")


def delivered_order(log: str) -> list[str]:
    """Spool ids in the order the intake delivered them, from its log. IMAP's order is Dovecot's, which
    numbers Maildir files it finds together in no set order: order is checked here, content by spool id."""
    return re.findall(r" INFO (\w+): delivered to ", log)


def by_spool_id(messages: list[bytes]) -> dict[str | None, bytes]:
    """Delivered messages keyed by their X-YesTLS-Spool-Id (each id must appear once)."""
    keyed = {spool_id_of(m): m for m in messages}
    assert len(keyed) == len(messages), f"a spool id twice among {[spool_id_of(m) for m in messages]}"
    return keyed


@dataclass
class World:
    directory: Path
    pki: TestPKI
    site: EdgeSite
    dovecot: Dovecot
    intake: IntakeSite
    edge: EdgeProcess | None = None

    # --- the edge ---------------------------------------------------------------------------------------

    def start_edge(self) -> None:
        self.edge = start_edge(self.site)

    def stop_edge(self) -> None:
        if self.edge is not None:
            self.edge.stop()
        self.edge = None

    def send(self, mail_from: str, recipients: list[str], message: bytes, *, options: tuple[str, ...] = (),
             helo: str = CLIENT_NAME) -> str:
        """One SMTP transaction with the edge over STARTTLS; the spool id its 250 names."""
        context = ssl.create_default_context(cafile=str(self.pki.ca_pem))
        with smtplib.SMTP("127.0.0.1", self.site.smtp_port, local_hostname=helo, timeout=30) as smtp:
            smtp._host = MX_NAME  # the name the certificate is checked against (SNI)
            smtp.ehlo()
            smtp.starttls(context=context)
            smtp.ehlo()
            code, reply = smtp.mail(mail_from, list(options))
            assert code == 250, (code, reply)
            for recipient in recipients:
                code, reply = smtp.rcpt(recipient)
                assert code == 250, (recipient, code, reply)
            code, reply = smtp.data(message)
            assert code == 250, (code, reply)
        match = _QUEUED.search(reply.decode())
        assert match, reply
        return match.group(1)

    def spooled_ids(self) -> list[str]:
        """Spool ids in the edge's queue, in order of acceptance."""
        return [path.name.split("-", 1)[1] for path in self.site.spooled_files()]

    # --- home ---------------------------------------------------------------------------------------------

    @contextmanager
    def intake_running(self):
        """`yestls intake serve` for the block. Killed at the end: a graceful stop waits out the long-poll,
        and every test waits for the intake to be idle (the edge spool empty) before it ends."""
        process = start_intake(self.intake)
        try:
            yield process
        finally:
            process.kill()

    def logs(self, process: IntakeProcess | None = None) -> str:
        edge = self.edge.log()[-3000:] if self.edge else ""
        intake = process.log()[-6000:] if process else ""
        return f"--- intake log\n{intake}\n--- edge log\n{edge}\n--- dovecot log\n{self.dovecot.log()[-3000:]}"

    def mailbox(self, user: str) -> list[bytes]:
        return self.dovecot.fetch_all(user)

    def wait_for_mailbox(self, user: str, count: int, process: IntakeProcess | None = None) -> list[bytes]:
        """`user`'s INBOX once it holds at least `count` messages."""
        found: list[bytes] = []

        def enough() -> bool:
            found[:] = self.mailbox(user)
            return len(found) >= count

        wait_for(enough, f"{count} message(s) for {user}",
                 details=lambda: f"{len(found)} there\n{self.logs(process)}")
        return found

    def wait_for_empty_spool(self, process: IntakeProcess | None = None) -> None:
        wait_for(lambda: not self.site.spooled_files(), "the edge spool to empty",
                 details=lambda: f"left: {self.spooled_ids()}\n{self.logs(process)}")

    def wait_for_acknowledged(self, *spool_ids: str, process: IntakeProcess | None = None) -> None:
        """Until none of `spool_ids` is left in the edge's spool (home acknowledged them)."""
        wait_for(lambda: not set(spool_ids) & set(self.spooled_ids()), f"{', '.join(spool_ids)} acknowledged",
                 details=lambda: f"left: {self.spooled_ids()}\n{self.logs(process)}")

    def ledger_entry(self, spool_id: str) -> Entry | None:
        ledger = Ledger(self.intake.ledger)
        try:
            return ledger.edge(EDGE).get(spool_id)
        finally:
            ledger.close()

    def ledger_order(self) -> list[str]:
        """Spool ids in the order the intake first recorded them."""
        ledger = Ledger(self.intake.ledger)
        try:
            return [row[0] for row in ledger.db.execute("SELECT spool_id FROM messages WHERE edge = ? ORDER BY rowid",
                                                         (EDGE,))]
        finally:
            ledger.close()


@contextmanager
def mail_world(directory: Path, pki: TestPKI, users=(USER,), *, site: EdgeSite | None = None,
               quota: str | None = None, intake_options: str = ""):
    """A Dovecot with `users`, the oracle and the edge running, and intake.toml written (intake not started)."""
    site = site or make_edge_site(directory / "site", pki)
    with run_dovecot(users, quota=quota) as dovecot, run_oracle(site.oracle), run_fake_rspamd() as rspamd:
        world = World(directory, pki, site, dovecot, make_intake(site, dovecot, options=intake_options,
                                                                  rspamd=rspamd.url))
        world.start_edge()
        try:
            yield world
        finally:
            world.stop_edge()


def message(subject: str, body: bytes = b"Hello from the sender.\r\n", *, sender: str = SENDER,
            to: str = USER, extra: bytes = b"") -> bytes:
    """A plain RFC 5322 message with CRLF line ends (what SMTP carries unchanged)."""
    return (f"From: Alice <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Date: Sun, 29 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@{sender.split('@')[1]}>\r\n").encode() + extra + b"\r\n" + body
