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

Packet loss is made with nftables (`numgen random`), not `tc netem`: the
kernel these containers share has no sch_netem (CONFIG_NET_SCH_NETEM is not
set, "Specified qdisc kind is unknown"). A clock jump is made with libfaketime
(Debian's libfaketime) preloaded into one service by a runtime drop-in that
reads its offset from a file, so the offset changes under the running process
as a stepped clock would: the containers share the host's clock and have no
CAP_SYS_TIME, so `date -s` cannot be used.
"""

from __future__ import annotations

import enum
import itertools
import json
import random
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field

from mailpath import POSTFIX_LOG, SENDER, oracle_reachable_from_edge
from scenario import IMAPSAtHome, ca_context, client_name, container, full_address, imap_password, site, wait_for

EDGE_UNIT = "yestls-edge.service"
ORACLE_UNIT = "yestls-oracle.service"
SIGNER_UNITS = "yestls-signer@*.service"
INTAKE_UNIT = "yestls-intake.service"
TUNNEL_UNIT = "wg-quick@wg0.service"
DOVECOT_UNIT = "dovecot.service"
EDGE_SPOOL = "/var/spool/yestls"          # roles/edge_relay: edge_relay__spool_dir
MAIL_STORE = "/var/vmail"                 # roles/home_mail: home_mail__mail_root
LEDGER = "/var/lib/yestls-intake/ledger.sqlite"
QUARANTINE = "/var/lib/yestls-intake/quarantine"
INTAKE_USER = "yestls-intake"
TUNNEL_PORT = 51820                       # the edge's WireGuard port (site_edge_endpoint)
CHAOS_TABLE = "yestls_chaos"              # the nftables table packet loss lives in, apart from the firewall's
FAKETIME_DIR = "/run/yestls-chaos"        # the offset files libfaketime reads
DROPIN = "/run/systemd/system/{unit}.d/50-yestls-chaos-faketime.conf"
CLOCK_UNITS = (("edge", EDGE_UNIT), ("home", INTAKE_UNIT), ("home", ORACLE_UNIT))
RESTART_TIMEOUT = 60     # seconds for systemd to bring a killed service back (RestartSec=5s)
RECOVERY_TIMEOUT = 120   # seconds for the edge to have its oracle again after a fault ends


class Fault(enum.Enum):
    KILL_EDGE = "kill -9 the edge service"
    KILL_ORACLE = "kill -9 the oracle's front"
    KILL_SIGNER = "kill -9 one of the oracle's signing processes"
    KILL_INTAKE = "kill -9 the intake"
    TUNNEL_DOWN = "home's WireGuard down, then up"
    PACKET_LOSS = "random loss of the tunnel's packets at home (nftables)"
    EDGE_DISK_FULL = "the edge's spool on a full filesystem"
    HOME_DISK_FULL = "Dovecot's mail store on a full filesystem"
    CLOCK_JUMP = "one service's clock stepped (libfaketime)"


class ChaosError(AssertionError):
    """The scenario did not do what a fault's recovery needs (a finding, with what was seen)."""


def log(start: float, text: str) -> None:
    print(f"[chaos {time.monotonic() - start:7.1f}s] {text}", flush=True)


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


def unit_state(host: str, unit: str) -> dict[str, str]:
    out = container(host).check_output(f"systemctl show -p MainPID -p ActiveState -p NRestarts {unit}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def running_signers() -> set[str]:
    out = container("home").check_output(
        f"systemctl list-units --plain --no-legend --state=running '{SIGNER_UNITS}'")
    return {line.split()[0] for line in out.splitlines() if line.strip()}


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


def _oracle_seen_by_edge() -> str:
    try:
        return "reachable" if oracle_reachable_from_edge() else "unreachable"
    except AssertionError as error:   # `yestls status` failed: the edge is not answering yet
        return f"no status ({str(error).splitlines()[0][:80]})"


def wait_for_recovery(start: float, after: str) -> None:
    """Bounded wait until the edge runs with a working oracle connection (`yestls status`).

    Not a TLS probe from `internet`: a client whose TLS the edge could not
    finish (the oracle went away mid-handshake) is asked to come back a
    minute later (relay/edge/tls_budget.py, retry_after), so probing during
    recovery would shut `internet` out for that minute. Postfix's deliveries
    show the handshakes work; settle() waits for them."""
    seen: list[str] = []
    ok = wait_for(lambda: seen.append(_oracle_seen_by_edge()) or seen[-1] == "reachable",
                  timeout=RECOVERY_TIMEOUT, interval=1)
    if not ok:
        raise ChaosError(f"the edge had no oracle {RECOVERY_TIMEOUT}s after {after}: last {seen[-3:]}")
    log(start, f"  the edge has its oracle after {after} ({len(seen)} look(s), first {seen[0]})")


def wait_for_smtp() -> None:
    """Bounded wait until the edge listens on port 25 again (after a start)."""
    if not wait_for(lambda: container("edge").check_output("ss -Hltn 'sport = :25'").strip(), timeout=60):
        raise ChaosError("the edge does not listen on port 25 60s after it was started")


def intake_lines(spool_id: str) -> list[str]:
    """What the intake's journal says about one spool id."""
    out = container("home").check_output(f"journalctl -u {INTAKE_UNIT} -o cat --no-pager --grep {spool_id}")
    return out.splitlines()


def postfix_queue() -> list[dict]:
    out = container("internet").check_output("postqueue -j")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def flush_postfix() -> None:
    container("internet").check_output("postqueue -f")


# --- the faults -----------------------------------------------------------------------


class Faults:
    """Injects each fault and ends it; `restore()` ends whatever is still on
    (a failed run must leave the scenario as converge made it)."""

    def __init__(self, rng: random.Random, start: float):
        self.rng = rng
        self.start = start
        self.active: dict[Fault, object] = {}
        self.clock_ready: set[tuple[str, str]] = set()

    def inject(self, fault: Fault) -> str:
        detail = getattr(self, f"_inject_{fault.name.lower()}")()
        log(self.start, f"fault {fault.name}: {fault.value}: {detail}")
        return detail

    def heal(self, fault: Fault) -> None:
        """End a fault that lasts (kills end by themselves: systemd restarts the service)."""
        undo = self.active.pop(fault, None)
        if undo is not None:
            undo()
            log(self.start, f"  {fault.name} ended")

    def restore(self) -> None:
        for fault in list(self.active):
            self.heal(fault)
        for host, unit in sorted(self.clock_ready):
            container(host).check_output(f"rm -f {DROPIN.format(unit=unit)} && systemctl daemon-reload "
                                         f"&& systemctl restart {unit}")
            log(self.start, f"  libfaketime removed from {unit} on {host} (restarted)")
        self.clock_ready.clear()

    # kills: the process dies at once; systemd must start it again (Restart=on-failure)

    def _kill_main(self, host: str, unit: str) -> str:
        before = unit_state(host, unit)
        pid = before.get("MainPID", "0")
        if before.get("ActiveState") != "active" or pid == "0":
            raise ChaosError(f"{unit} on {host} is not running before the kill: {before}")
        container(host).check_output(f"kill -9 {pid}")
        after = wait_for(lambda: (s := unit_state(host, unit)).get("ActiveState") == "active"
                         and s.get("MainPID") not in ("0", pid) and s, timeout=RESTART_TIMEOUT)
        if not after:
            raise ChaosError(f"{unit} on {host} did not come back {RESTART_TIMEOUT}s after kill -9 of {pid}: "
                             f"{unit_state(host, unit)}")
        return f"pid {pid} killed; systemd started pid {after['MainPID']} (NRestarts {after.get('NRestarts')})"

    def _inject_kill_edge(self) -> str:
        return self._kill_main("edge", EDGE_UNIT)

    def _inject_kill_oracle(self) -> str:
        return self._kill_main("home", ORACLE_UNIT)

    def _inject_kill_intake(self) -> str:
        return self._kill_main("home", INTAKE_UNIT)

    def _inject_kill_signer(self) -> str:
        signers = sorted(running_signers())
        if not signers:
            raise ChaosError("no signing process is running at home")
        unit = self.rng.choice(signers)
        pid = unit_state("home", unit).get("MainPID", "0")
        container("home").check_output(f"kill -9 {pid}")
        # the front must notice and connect again: the socket starts a new signing process
        if not wait_for(lambda: len(running_signers() - {unit}) >= len(signers), timeout=RESTART_TIMEOUT):
            raise ChaosError(f"{RESTART_TIMEOUT}s after kill -9 of {unit}, only {sorted(running_signers())} run "
                             f"(before: {signers})")
        return f"{unit} (pid {pid}) killed, one of {len(signers)}; as many running again"

    # faults that last until healed

    def _inject_tunnel_down(self) -> str:
        home = container("home")
        home.check_output(f"systemctl stop {TUNNEL_UNIT}")
        self.active[Fault.TUNNEL_DOWN] = lambda: home.check_output(f"systemctl start {TUNNEL_UNIT}")
        return f"systemctl stop {TUNNEL_UNIT} at home"

    def _inject_packet_loss(self) -> str:
        percent = self.rng.choice((10, 25, 50))
        rules = (f"add table inet {CHAOS_TABLE}\n"
                 f"add chain inet {CHAOS_TABLE} in {{ type filter hook input priority -10; }}\n"
                 f"add chain inet {CHAOS_TABLE} out {{ type filter hook output priority -10; }}\n"
                 f"add rule inet {CHAOS_TABLE} in udp sport {TUNNEL_PORT} numgen random mod 100 < {percent} drop\n"
                 f"add rule inet {CHAOS_TABLE} out udp dport {TUNNEL_PORT} numgen random mod 100 < {percent} drop\n")
        home = container("home")
        home.check_output("printf %s %s | nft -f -", "%s", rules)
        self.active[Fault.PACKET_LOSS] = lambda: home.check_output(f"nft delete table inet {CHAOS_TABLE}")
        return f"{percent}% of the tunnel's UDP packets dropped each way"

    def _small_filesystem(self, host: str, directory: str, unit: str, room_kib: int):
        """Put `directory` on a tmpfs with `room_kib` KiB free beyond what it holds,
        its contents, owner and mode kept; `unit` stopped meanwhile, and back
        (the edge: answering STARTTLS) when this returns."""
        c = container(host)
        owner_mode = c.check_output(f"stat -c '%u:%g %a' {directory}")
        owner, mode = owner_mode.split()
        used_kib = int(c.check_output(f"du -sk {directory}").split()[0])
        size_kib = used_kib + room_kib
        stash = f"/root/yestls-chaos-{directory.strip('/').replace('/', '-')}.tar"
        c.check_output(f"systemctl stop {unit} && tar -C {directory} -cpf {stash} . "
                       f"&& find {directory} -mindepth 1 -delete "
                       f"&& mount -t tmpfs -o size={size_kib}k,mode={mode} yestls-chaos {directory} "
                       f"&& chown {owner} {directory} && tar -C {directory} -xpf {stash} && rm {stash} "
                       f"&& systemctl start {unit}")
        if unit == EDGE_UNIT:
            wait_for_smtp()
            wait_for_recovery(self.start, f"{unit} started on the small filesystem")

        def undo() -> None:
            c.check_output(f"systemctl stop {unit} && tar -C {directory} -cpf {stash} . && umount {directory} "
                           f"&& tar -C {directory} -xpf {stash} && rm {stash} && chown {owner} {directory} "
                           f"&& chmod {mode} {directory} && systemctl start {unit}")
        return size_kib, undo

    def _inject_edge_disk_full(self) -> str:
        return self.fill_edge_spool(self.rng.choice((16, 64, 256)))

    def _inject_home_disk_full(self) -> str:
        return self.fill_mail_store(self.rng.choice((16, 64, 256)))

    def fill_edge_spool(self, room_kib: int) -> str:
        size, undo = self._small_filesystem("edge", EDGE_SPOOL, EDGE_UNIT, room_kib)
        self.active[Fault.EDGE_DISK_FULL] = undo
        return f"{EDGE_SPOOL} on a {size} KiB tmpfs ({room_kib} KiB free), the edge restarted on it"

    def fill_mail_store(self, room_kib: int) -> str:
        size, undo = self._small_filesystem("home", MAIL_STORE, DOVECOT_UNIT, room_kib)
        self.active[Fault.HOME_DISK_FULL] = undo
        return f"{MAIL_STORE} on a {size} KiB tmpfs ({room_kib} KiB free), Dovecot restarted on it"

    def _inject_clock_jump(self) -> str:
        host, unit = self.rng.choice(CLOCK_UNITS)
        offset = self.rng.choice(("-1h", "+1h", "+1d", "-10m"))
        self._prepare_clock(host, unit)
        c = container(host)
        offset_file = f"{FAKETIME_DIR}/{unit}"
        c.check_output(f"echo {offset} > {offset_file}")
        # libfaketime reads the file again after FAKETIME_CACHE_DURATION (1 s)
        self.active[Fault.CLOCK_JUMP] = lambda: c.check_output(f"echo +0 > {offset_file}")
        return f"{unit} on {host}: its clock stepped {offset}"

    def _prepare_clock(self, host: str, unit: str) -> None:
        """libfaketime into the unit (installed with apt if missing), offset +0; restarts it once."""
        if (host, unit) in self.clock_ready:
            return
        c = container(host)
        if c.run("dpkg -s libfaketime").rc != 0:
            c.check_output("DEBIAN_FRONTEND=noninteractive apt-get install -y -q libfaketime"
                           " || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libfaketime)")
        library = c.check_output("dpkg -L libfaketime | grep '/libfaketime.so.1$'").strip()
        offset_file = f"{FAKETIME_DIR}/{unit}"
        dropin = DROPIN.format(unit=unit)
        c.check_output(f"mkdir -p {FAKETIME_DIR} {dropin.rsplit('/', 1)[0]} && chmod 755 {FAKETIME_DIR} "
                       f"&& echo +0 > {offset_file} && chmod 644 {offset_file}")
        c.check_output("printf '%%s\\n' %s %s > %s", "[Service]",
                       f"Environment=LD_PRELOAD={library} FAKETIME_TIMESTAMP_FILE={offset_file} "
                       "FAKETIME_CACHE_DURATION=1 FAKETIME_DONT_FAKE_MONOTONIC=1", dropin)
        self.clock_ready.add((host, unit))
        c.check_output(f"systemctl daemon-reload && systemctl restart {unit}")
        if not wait_for(lambda: unit_state(host, unit).get("ActiveState") == "active", timeout=RESTART_TIMEOUT):
            raise ChaosError(f"{unit} on {host} did not start with libfaketime: {unit_state(host, unit)}")
        log(self.start, f"  libfaketime preloaded into {unit} on {host} ({library}), offset +0")


# --- a run ------------------------------------------------------------------------------


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
    for state in ("delivering", "quarantined"):
        if states.get(state):
            report.problems.append(f"{states[state]} ledger row(s) {state}")
    report.unacked = ledger_done_unacked()
    failed = ledger_failed_recipients()
    if failed:
        report.problems.append(f"ledger recipients failed (bounced): {failed}")
    quarantined = container("home").check_output(f"find {QUARANTINE} -type f")
    if quarantined.strip():
        report.problems.append(f"quarantined at home: {quarantined.split()}")
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
    """Every file in the edge's spool directories (queue and tmp), the lock aside."""
    out = container("edge").check_output(f"find {EDGE_SPOOL} -mindepth 2 -type f")
    return out.split()


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


def ledger_failed_recipients() -> dict[str, list[str]]:
    failed = {}
    for spool_id, _, recipients, _ in _ledger_rows():
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
