"""Whole-path faults (test_chaos.py, `make chaos`, `make soak`): mail from
Postfix on `internet` through the edge to the mailboxes at home while faults
hit the services, the tunnel, the disks and the clocks; then the checks that
nothing was lost, repeated or left behind.

A run is replayable from its seed: `random.Random(seed)` chooses every
message (size, recipients), every fault, their order and how long each
lasts. What the services do meanwhile still races with the clock: the seed
fixes what was done to them, not how they answered.

Postfix on `internet` retries deferred mail only after minutes
(minimal_backoff_time); the driver flushes its queue after each fault ends,
as an impatient operator would: that shortens the run, it changes no answer.

The faults themselves, and how each is made: faults.py.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field

from faults import EDGE_SPOOL, INTAKE_UNIT, INTAKE_USER, LEDGER, QUARANTINE, Fault, Faults, log, wait_for_recovery
from mailpath import POSTFIX_LOG, SENDER
from scenario import (
    EDGES,
    IMAPSAtHome,
    ca_context,
    client_name,
    container,
    full_address,
    imap_password,
    site,
    wait_for,
)

# --- the messages ---------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    run: str
    number: int
    recipients: tuple[str, ...]   # the envelope
    mailboxes: frozenset[str]     # where it must land, each exactly once
    size: int                     # bytes of body, about

    @property
    def marker(self) -> str:
        return f"chaos-{self.run}-{self.number}"

    @property
    def message_id(self) -> str:
        return f"{self.marker}@sender.test"

    def render(self) -> bytes:
        head = (f"From: <{SENDER}>\nTo: {', '.join(f'<{r}>' for r in self.recipients)}\n"
                f"Subject: YesTLS chaos {self.run} {self.number}\nMessage-ID: <{self.message_id}>\n"
                f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\n\n")
        line = f"Message {self.number} of chaos run {self.run}: a line of its body, numbered "
        lines, total = [], 0
        for index in itertools.count():
            text = f"{line}{index:07d}.\n"
            if total + len(text) > self.size:
                break
            lines.append(text)
            total += len(text)
        return (head + "".join(lines) + "-- \nthe end\n").encode()


def recipient_choices() -> list[tuple[tuple[str, ...], frozenset[str]]]:
    """Envelopes the scenario's address book takes, each with the mailboxes it
    reaches: each mailbox alone, pairs of mailboxes, each alias (expanded at home)."""
    boxes = [full_address(m) for m in site()["site_mailboxes"]]
    choices = [((box,), frozenset({box})) for box in boxes]
    choices += [((a, b), frozenset({a, b})) for a, b in itertools.combinations(boxes, 2)]
    choices += [((alias,), frozenset(targets)) for alias, targets in site().get("site_aliases", {}).items()]
    return choices


def make_messages(rng: random.Random, run: str, count: int, max_size: int, first: int = 0) -> list[Message]:
    choices = recipient_choices()
    singles = [c for c in choices if len(c[0]) == 1 and len(c[1]) == 1]
    multis = [c for c in choices if c not in singles]
    messages = []
    for number in range(first, first + count):
        recipients, mailboxes = rng.choice(multis if rng.random() < 0.3 else singles)
        roll = rng.random()
        size = (rng.randint(200, 20_000) if roll < 0.7 else rng.randint(20_000, 500_000) if roll < 0.9
                else rng.randint(500_000, max_size))
        messages.append(Message(run, number, recipients, mailboxes, min(size, max_size)))
    return messages


def submit(message: Message) -> None:
    """Hand a message to Postfix on `internet`, as a local user there would."""
    subprocess.run(["docker", "exec", "-i", "internet", "/usr/sbin/sendmail", "-f", SENDER, "--",
                    *message.recipients], input=message.render(), check=True, timeout=60)


# --- looking at the scenario ----------------------------------------------------------

_HANDSHAKE = """
import smtplib, ssl, sys
context = ssl.create_default_context(cafile="/etc/postfix/yestls-pebble-root.pem")
try:
    with smtplib.SMTP(sys.argv[1], 25, timeout=20) as smtp:
        smtp.starttls(context=context)
        smtp.noop()
    print("ok")
except Exception as error:
    print(f"{type(error).__name__}: {error}")
"""


def full_handshake() -> str:
    """From `internet`, a STARTTLS session to the MX with a full handshake (no
    session to resume, so the oracle must sign): "ok" or what went wrong."""
    return container("internet").check_output("python3 -c %s %s", _HANDSHAKE, site()["site_mx_name"])

def intake_lines(spool_id: str) -> list[str]:
    """What the intake's journal says about one spool id: nothing yet when
    the intake has not pulled it (journalctl --grep then exits 1, which is an
    answer, not an error)."""
    result = container("home").run(f"journalctl -u {INTAKE_UNIT} -o cat --no-pager --grep {spool_id}")
    assert result.rc in (0, 1), f"journalctl failed ({result.rc}): {result.stderr}"
    return result.stdout.splitlines()


def postfix_queue() -> list[dict]:
    out = container("internet").check_output("postqueue -j")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def flush_postfix() -> None:
    container("internet").check_output("postqueue -f")

# --- a run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leftovers:
    """What is set aside at home: tests before a run leave some on purpose
    (the lying-edge and bounce tests), so a run's checks look at what is new."""

    quarantined_rows: frozenset[str]
    failed_rows: frozenset[str]
    quarantine_files: frozenset[str]


def home_leftovers() -> Leftovers:
    rows = _ledger_rows()
    files = container("home").check_output(f"find {QUARANTINE} -type f").split()
    return Leftovers(frozenset(i for i, state, _, _ in rows if state == "quarantined"),
                     frozenset(ledger_failed_recipients(rows)), frozenset(files))


@dataclass
class Report:
    seed: int
    run: str
    sent: list[Message] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)
    deferrals: Counter = field(default_factory=Counter)   # Postfix's deferral replies, by code
    delivered: int = 0          # (message, mailbox) pairs found exactly once
    junked: int = 0             # of those, in Junk
    unacked: list[str] = field(default_factory=list)   # ledger rows done, not marked acknowledged
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    before: Leftovers = field(default_factory=home_leftovers)   # taken when the run begins

    def summary(self) -> str:
        lines = [f"chaos run {self.run}, seed {self.seed} (replay: YESTLS_CHAOS_SEED={self.seed} or SEED={self.seed})",
                 f"  sent {len(self.sent)} messages ({sum(len(m.mailboxes) for m in self.sent)} mailbox copies, "
                 f"{sum(len(m.mailboxes) > 1 for m in self.sent)} to several mailboxes, "
                 f"largest {max((m.size for m in self.sent), default=0)} bytes)",
                 f"  delivered {self.delivered} mailbox copies exactly once ({self.junked} of them in Junk)",
                 f"  faults injected: {sum(self.faults.values())}: "
                 + ", ".join(f"{f.name} {n}" for f, n in sorted(self.faults.items(), key=lambda i: i[0].name)),
                 "  deferrals seen by Postfix: " + (", ".join(f"{k} {n}" for k, n in self.deferrals.most_common())
                                                   or "none"),
                 f"  ledger rows done but not marked acknowledged (their ack's answer lost): {len(self.unacked)}",
                 f"  time {self.seconds:.0f}s",
                 f"  problems: {len(self.problems)}"]
        lines += [f"    {p}" for p in self.problems]
        return "\n".join(lines)


def fault_schedule(rng: random.Random, count: int) -> list[Fault]:
    """Every fault once (in a random order), then random ones up to count."""
    schedule = list(Fault)
    rng.shuffle(schedule)
    return schedule + [rng.choice(list(Fault)) for _ in range(max(0, count - len(schedule)))]


def run(seed: int, messages: int, faults: int, max_size: int = 3_000_000, settle_timeout: float = 420) -> Report:
    """Send `messages` messages while `faults` faults come and go, then check
    everything arrived once and nothing is left behind."""
    rng = random.Random(seed)
    start = time.monotonic()
    report = Report(seed, f"{seed:x}-{int(time.time())}")
    log(start, f"seed {seed}: {messages} messages, {faults} faults, run id {report.run}")
    plan = make_messages(rng, report.run, messages, max_size)
    schedule = fault_schedule(rng, faults)
    injector = Faults(rng, start)
    batches = _split(rng, plan, len(schedule))
    try:
        for fault, (before, during) in zip(schedule, batches):
            _send(start, report, before)
            injector.inject(fault)
            report.faults[fault] += 1
            _send(start, report, during)
            hold = rng.uniform(3, 12)
            if fault in injector.active:
                log(start, f"  holding {fault.name} for {hold:.1f}s")
                time.sleep(hold)   # how long the fault lasts: part of the seed's plan, not a wait for anything
            injector.heal(fault)
            wait_for_recovery(start, fault.name)
            flush_postfix()
        _send(start, report, plan[len(report.sent):])
    finally:
        injector.restore()
    wait_for_recovery(start, "the faults were all ended")
    settle(start, report, settle_timeout)
    check(start, report)
    return report


def _split(rng: random.Random, plan: list[Message], parts: int) -> list[tuple[list, list]]:
    """The messages, in order, cut into `parts` pairs (sent before the fault,
    sent while it lasts); while there are enough, at least one while each lasts."""
    slots = [2 * i + 1 for i in range(min(parts, len(plan)))]
    slots += [rng.randrange(2 * parts) for _ in range(len(plan) - len(slots))]
    counts = Counter(slots)
    pieces, taken = [], 0
    for slot in range(2 * parts):
        pieces.append(plan[taken:taken + counts[slot]])
        taken += counts[slot]
    return [(pieces[2 * i], pieces[2 * i + 1]) for i in range(parts)]


def _send(start: float, report: Report, messages: list[Message]) -> None:
    for message in messages:
        submit(message)
        report.sent.append(message)
    if messages:
        log(start, f"  submitted {len(messages)} message(s) to Postfix (#{messages[0].number}..#{messages[-1].number},"
                   f" {sum(m.size for m in messages)} bytes)")


def send_steadily(start: float, report: Report, messages: list[Message]) -> None:
    """Submit messages (without faults): `make soak`'s steady mail."""
    _send(start, report, messages)


# --- the checks ---------------------------------------------------------------------------


def settle(start: float, report: Report, timeout: float) -> None:
    """Wait (bounded) until Postfix's queue is empty, every copy is in its
    mailbox, the edge's spool is empty and no ledger row is in progress."""
    deadline = time.monotonic() + timeout
    log(start, f"settling: waiting up to {timeout:.0f}s for Postfix's queue, the mailboxes, the spool, the ledger")

    def queue_empty() -> bool:
        flush_postfix()
        return not postfix_queue()

    for what, predicate, interval in (("Postfix's queue empty", queue_empty, 10),
                                      ("every copy in its mailbox", lambda: _missing(report) == 0, 5),
                                      ("the edge's spool empty", lambda: not spool_contents(), 2),
                                      ("no ledger row delivering", lambda: not ledger_states().get("delivering"), 2)):
        if wait_for(predicate, timeout=max(1.0, deadline - time.monotonic()), interval=interval):
            log(start, f"  {what}")
        else:
            report.problems.append(f"not {what} within {timeout:.0f}s")
            log(start, f"  NOT {what} within {timeout:.0f}s")


def check(start: float, report: Report) -> None:
    found = mailbox_counts(report.run)
    report.delivered = report.junked = 0
    for message in report.sent:
        for box in sorted(message.mailboxes):
            copies = found.get((box, message.message_id), [])
            if len(copies) == 1:
                report.delivered += 1
                report.junked += copies[0] != "INBOX"
            else:
                report.problems.append(f"{message.message_id} is in {box} {len(copies)} times ({copies})")
    expected = {(box, m.message_id) for m in report.sent for box in m.mailboxes}
    for box, message_id in sorted(set(found) - expected):
        report.problems.append(f"{message_id} is in {box}, not one of its recipients' mailboxes")
    queue = postfix_queue()
    if queue:
        report.problems.append(f"Postfix's queue on internet holds {len(queue)}: {[q.get('queue_id') for q in queue]}")
    left = spool_contents()
    if left:
        report.problems.append(f"the edge's spool still holds {left}")
    states = ledger_states()
    if states.get("delivering"):
        report.problems.append(f"{states['delivering']} ledger row(s) delivering")
    now = home_leftovers()
    before = report.before
    for what, ids in (("ledger rows quarantined", now.quarantined_rows - before.quarantined_rows),
                      ("ledger rows with failed (bounced) recipients", now.failed_rows - before.failed_rows),
                      ("files quarantined at home", now.quarantine_files - before.quarantine_files)):
        if ids:
            report.problems.append(f"{what} since the run began: {sorted(ids)}")
    report.unacked = ledger_done_unacked()
    outcomes = postfix_outcomes(report.run)
    report.deferrals = outcomes["deferred"]
    if outcomes["bounced"]:
        report.problems.append(f"Postfix bounced: {dict(outcomes['bounced'])}")
    report.seconds = time.monotonic() - start
    log(start, f"checked: ledger {states}, Postfix outcomes "
               f"{ {k: sum(v.values()) for k, v in outcomes.items()} }")


def _missing(report: Report) -> int:
    found = mailbox_counts(report.run)
    return sum((box, m.message_id) not in found for m in report.sent for box in m.mailboxes)


def mailbox_counts(run: str) -> dict[tuple[str, str], list[str]]:
    """{(mailbox, Message-ID): [the folder of each copy]} of this run's
    messages, every folder of every mailbox, read over IMAPS from home's LAN."""
    found: dict[tuple[str, str], list[str]] = {}
    for setting in site()["site_mailboxes"]:
        box = full_address(setting)
        with IMAPSAtHome(client_name(), 993, ssl_context=ca_context(), timeout=30) as imap:
            imap.login(box, imap_password(box))
            _, folders = imap.list()
            for entry in folders:
                folder = entry.decode().rsplit(' "', 1)[-1].rstrip('"') if entry.decode().endswith('"') \
                    else entry.decode().rsplit(" ", 1)[-1]
                if imap.select(f'"{folder}"', readonly=True)[0] != "OK":
                    continue
                _, numbers = imap.search(None, "HEADER", "Message-ID", f"chaos-{run}-")
                if not numbers[0]:
                    continue
                _, parts = imap.fetch(b",".join(numbers[0].split()), "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
                for part in parts:
                    if isinstance(part, tuple):
                        match = re.search(rb"<(chaos-[^>]+)>", part[1])
                        if match:
                            found.setdefault((box, match.group(1).decode()), []).append(folder)
    return found


def spool_contents() -> list[str]:
    """Every file in each edge's spool directories (queue and tmp), the lock aside, as EDGE:PATH."""
    return [f"{edge}:{path}" for edge in EDGES
            for path in container(edge).check_output(f"find {EDGE_SPOOL} -mindepth 2 -type f").split()]


_LEDGER = """
import json, sqlite3, sys
db = sqlite3.connect("file:%s?mode=ro" % sys.argv[1], uri=True)
rows = db.execute("SELECT spool_id, state, recipients, acked FROM messages").fetchall()
print(json.dumps(rows))
"""


def _ledger_rows() -> list[tuple[str, str, str, int]]:
    # as the intake's user: a file root made beside the ledger (its -shm) would lock the intake out
    out = container("home").check_output(f"runuser -u {INTAKE_USER} -- python3 -c %s %s", _LEDGER, LEDGER)
    return json.loads(out)


def ledger_states() -> dict[str, int]:
    return dict(Counter(state for _, state, _, _ in _ledger_rows()))


def ledger_done_unacked() -> list[str]:
    """Rows done but never marked acknowledged (the ack's answer was lost): an observation, not a loss."""
    return [spool_id for spool_id, state, _, acked in _ledger_rows() if state == "done" and not acked]


def ledger_failed_recipients(rows: list | None = None) -> dict[str, list[str]]:
    failed = {}
    for spool_id, _, recipients, _ in _ledger_rows() if rows is None else rows:
        bad = [r for r, info in json.loads(recipients).items() if info.get("status") == "failed"]
        if bad:
            failed[spool_id] = bad
    return failed


def postfix_outcomes(run: str) -> dict[str, Counter]:
    """Postfix's delivery attempts of this run's messages: {status: Counter(reply code or reason)}."""
    lines = container("internet").file(POSTFIX_LOG).content_string.splitlines()
    ids = {m.group(1) for line in lines if (m := re.search(rf" ([0-9A-F]+): message-id=<chaos-{run}-", line))}
    outcomes: dict[str, Counter] = {"sent": Counter(), "deferred": Counter(), "bounced": Counter()}
    for line in lines:
        match = re.search(r"postfix/smtp\[\d+\]: ([0-9A-F]+): to=<.*, status=(\w+) \((.*)\)$", line)
        if not match or match.group(1) not in ids or match.group(2) not in outcomes:
            continue
        reply = match.group(3)
        code = re.search(r"(?:said|talk to me): (\d{3}(?: \d\.\d\.\d+)?)", reply)
        reason = code.group(1) if code else _reason(reply)
        outcomes[match.group(2)][reason] += 1
    return outcomes


_REASONS = (("handshake failure", "TLS handshake failure"), ("initial server greeting", "lost at the greeting"),
            ("lost connection", "lost connection"), ("Connection refused", "connection refused"),
            ("timed out", "timed out"))


def _reason(reply: str) -> str:
    return next((name for needle, name in _REASONS if needle.lower() in reply.lower()), reply[:40])
