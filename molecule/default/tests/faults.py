"""The faults of a whole-path run (tests/chaos.py drives them): each made
on the scenario's containers and ended again, and what recovery looks like.

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
import random
import time

from mailpath import oracle_reachable_from_edge
from scenario import container, wait_for

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


def unit_state(host: str, unit: str) -> dict[str, str]:
    out = container(host).check_output(f"systemctl show -p MainPID -p ActiveState -p NRestarts {unit}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def running_signers() -> set[str]:
    out = container("home").check_output(
        f"systemctl list-units --plain --no-legend --state=running '{SIGNER_UNITS}'")
    return {line.split()[0] for line in out.splitlines() if line.strip()}


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
        owner, mode = c.check_output(f"stat -c '%u:%g %a' {directory}").split()
        # room enough for the contents first (du on the container's filesystem need not be what
        # tmpfs takes), then shrunk to what they take there plus room_kib
        room_for_all = int(c.check_output(f"du -sk {directory}").split()[0]) * 2 + 1024
        stash = f"/root/yestls-chaos-{directory.strip('/').replace('/', '-')}.tar"
        c.check_output(f"systemctl stop {unit} && tar -C {directory} -cpf {stash} . "
                       f"&& find {directory} -mindepth 1 -delete "
                       f"&& mount -t tmpfs -o size={room_for_all}k,mode={mode} yestls-chaos {directory} "
                       f"&& chown {owner} {directory} && tar -C {directory} -xpf {stash} && rm {stash}")
        used_kib = int(c.check_output(f"df -k --output=used {directory} | tail -1").strip())
        size_kib = used_kib + room_kib
        c.check_output(f"mount -o remount,size={size_kib}k {directory} && systemctl start {unit}")
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
