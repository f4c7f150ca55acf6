"""Which edge home's own mail leaves through, and the move to another when it stops answering
(docs/deploy.md, "More than one edge").

Home's Postfix sends from home's tunnel address. WireGuard routes that traffic
to the one peer whose allowed-ips hold 0.0.0.0/0, and that edge masquerades it
to its public address. Each edge's address has its own PTR name: the primary's
is the HELO name, another edge's its MX name. So Postfix must say the name of
the edge its mail leaves through. Home's master.cf has one smtp service per
edge, `out-NAME`, each with that edge's HELO name. `sender_dependent_default_
transport_maps` reads a one-line regexp table, written here, that names the
service in use.

This service keeps the route and the table in step, and moves both when the
edge in use stops answering. Every `interval` seconds it opens a TCP
connection to each edge's spool service over the tunnel. Any answer counts as
up, a refusal too: the edge's kernel answered through the tunnel, so its
forwarding works even while its mail service is stopped. Silence until
`probe_timeout` counts as down: a dead or frozen VM, or a dead tunnel.

The rules (`choose`):
- leave the edge in use after `fail_after` silent rounds in a row, for the
  first edge in preference order that answered the last round;
- go back to a more preferred edge once it has answered `recover_after`
  rounds in a row, so a flapping primary does not move the route every round.

The truth is the peer that holds 0.0.0.0/0, read from `wg show` every round,
not a memory of this process. A restart of this service or of wg-quick, or a
playbook run that gives 0.0.0.0/0 back to the primary, is therefore set right
within a round. After a move, Postfix is reloaded and its deferred mail is
sent again at once (`postqueue -f`), not at its next retry.

Nothing here comes from outside the host except the probes' yes or no; the
commands run are fixed, with arguments from the configuration.
Hand-written because no tool does it: wg-quick has no failover between peers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relay import daemon
from relay.config import ConfigError, Table, is_ipv4
from relay.home.config import Edge, edges_table
from relay.private_files import write_atomically

log = logging.getLogger("yestls.egress")

ANYWHERE = "0.0.0.0/0"
TRANSPORT_PREFIX = "out-"   # master.cf's service per edge: out-NAME (roles/home_postfix/templates/master.cf.j2)
COMMAND_TIMEOUT = 20.0      # seconds for wg, postfix reload, postqueue


@dataclass(frozen=True)
class EgressConfig:
    edges: tuple[Edge, ...]              # preference order: the first is the primary
    interface: str = "wg0"
    transport_map: Path = Path("/etc/postfix/yestls/egress")
    interval: float = 10.0
    probe_timeout: float = 5.0
    fail_after: int = 3
    recover_after: int = 6


def load(path: Path) -> EgressConfig:
    """egress.toml:

        interface = "wg0"                            # home's WireGuard interface
        transport_map = "/etc/postfix/yestls/egress" # the regexp table main.cf's
                                                     # sender_dependent_default_transport_maps reads
        interval = 10                                # seconds between probe rounds
        probe_timeout = 5                            # seconds a probe waits for an answer
        fail_after = 3                               # silent rounds before leaving the edge in use
        recover_after = 6                            # answered rounds before going back to a preferred edge

        [edges]                                      # preference order, as the MX records: NAME = its spool
        edge = "10.77.0.2:7444"                      # service on the tunnel (intake.toml's [edges]): the probe's
        edge2 = "10.77.0.3:7444"                     # target, and its address names the edge's WireGuard peer
    """
    table = Table.load(path)
    edges = edges_table(table.table("edges"))
    for edge in edges:
        if not is_ipv4(edge.spool[0]):
            raise table.error(f"edges.{edge.name}", f"{edge.spool[0]!r} is not an IPv4 address: write the "
                                                    "edge's tunnel address (it names the edge's WireGuard peer)")
    config = EgressConfig(
        edges=edges,
        interface=table.get("interface", str, default="wg0", check=lambda v: v.isalnum() and len(v) <= 15,
                            hint="a network interface's name, e.g. wg0"),
        transport_map=Path(table.get("transport_map", str, default=str(EgressConfig.transport_map),
                                     check=lambda v: v.startswith("/"), hint="an absolute path")),
        interval=float(table.get("interval", (int, float), default=10, check=lambda n: 1 <= n <= 600,
                                 hint="seconds, 1 to 600")),
        probe_timeout=float(table.get("probe_timeout", (int, float), default=5, check=lambda n: 0 < n <= 60,
                                      hint="seconds, at most 60")),
        fail_after=table.get("fail_after", int, default=3, check=lambda n: 1 <= n <= 100, hint="1 to 100"),
        recover_after=table.get("recover_after", int, default=6, check=lambda n: 1 <= n <= 1000,
                                hint="1 to 1000"),
    )
    if config.probe_timeout >= config.interval:
        raise table.error("probe_timeout", "must be shorter than interval (a round's probes end before the next)")
    table.done()
    return config


# --- the decision ---------------------------------------------------------------------------------------------

@dataclass
class Streak:
    """An edge's probe results in a row."""

    answered: int = 0
    silent: int = 0

    def record(self, up: bool) -> None:
        self.answered, self.silent = (self.answered + 1, 0) if up else (0, self.silent + 1)


def choose(order: Sequence[str], current: str | None, streaks: Mapping[str, Streak],
           fail_after: int, recover_after: int) -> str | None:
    """The edge mail should leave through (module docstring's rules); `current` when nothing is better,
    None only when there is no current edge and none answers."""
    preferred = order if current not in order else order[:order.index(current)]
    for name in preferred:
        if streaks[name].answered >= recover_after:
            return name
    if current in order and streaks[current].silent < fail_after:
        return current
    for name in order:
        if name != current and streaks[name].answered > 0:
            return name
    return current if current in order else None


# --- WireGuard and Postfix ------------------------------------------------------------------------------------

class CommandFailed(Exception):
    pass


async def command(*argv: str) -> str:
    """Run a fixed command; its stdout, or CommandFailed with its stderr."""
    process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise CommandFailed(f"{' '.join(argv)}: no answer in {COMMAND_TIMEOUT:.0f} s") from None
    if process.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)}: exit {process.returncode}: {err.decode(errors='replace').strip()}")
    return out.decode()


@dataclass
class Peers:
    """`wg show IF allowed-ips`: each peer's public key and its allowed networks."""

    allowed: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Peers:
        allowed = {}
        for line in text.splitlines():
            key, _, networks = line.partition("\t")
            if key:
                allowed[key] = set(networks.split()) - {"(none)"}
        return cls(allowed)

    def of(self, tunnel_address: str) -> str | None:
        """The peer that holds `tunnel_address`/32: the edge's."""
        return next((key for key, networks in self.allowed.items() if f"{tunnel_address}/32" in networks), None)

    def holder(self) -> str | None:
        """The peer home's outbound traffic goes to."""
        return next((key for key, networks in self.allowed.items() if ANYWHERE in networks), None)


async def read_peers(interface: str) -> Peers:
    return Peers.parse(await command("wg", "show", interface, "allowed-ips"))


async def route_through(interface: str, peers: Peers, to: str, away: str | None) -> None:
    """Give 0.0.0.0/0 to peer `to` (WireGuard moves it off its holder at once), then write the holder's
    remaining networks explicitly."""
    await command("wg", "set", interface, "peer", to, "allowed-ips", _networks(peers.allowed[to] | {ANYWHERE}))
    if away is not None and away != to:
        await command("wg", "set", interface, "peer", away, "allowed-ips", _networks(peers.allowed[away] - {ANYWHERE}))


def _networks(networks: set[str]) -> str:
    return ",".join(sorted(networks))


def transport_map_text(edge: str) -> bytes:
    """The table's whole text; roles/home_postfix/tasks/main.yml writes the same for the primary."""
    return (f"# Home's mail leaves through the edge {edge}: master.cf's {TRANSPORT_PREFIX}{edge} says its HELO name.\n"
            f"# Kept by relay/home/egress.py (`yestls egress serve`) and the home_postfix role: edits are "
            f"overwritten.\n"
            f"/^/ {TRANSPORT_PREFIX}{edge}\n").encode()


def edge_in_use(path: Path) -> str | None:
    """The edge the table names (what `yestls status` shows)."""
    for line in path.read_text().splitlines():
        if line.startswith("/^/ " + TRANSPORT_PREFIX):
            return line.removeprefix("/^/ " + TRANSPORT_PREFIX).strip()
    return None


def point_postfix(path: Path, edge: str) -> bool:
    """Make the table name `edge`'s service; True when it changed (Postfix must reload)."""
    text = transport_map_text(edge)
    try:
        if path.read_bytes() == text:
            return False
    except FileNotFoundError:
        pass
    write_atomically(path, text, mode=0o644)
    return True


# --- the service ----------------------------------------------------------------------------------------------

async def reachable(address: tuple[str, int], timeout: float) -> bool:
    """Did the host answer a TCP connection through the tunnel (accepted or refused) within `timeout`?"""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(*address), timeout)
    except ConnectionRefusedError:
        return True
    except (TimeoutError, OSError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


class Egress:
    def __init__(self, config: EgressConfig):
        self.config = config
        self.order = [edge.name for edge in config.edges]
        self.streaks = {name: Streak() for name in self.order}
        self._unpeered: set[str] = set()   # edges no WireGuard peer holds, as last logged

    async def round(self) -> str | None:
        """Probe every edge, then route and point Postfix where `choose` says; the edge in use."""
        config = self.config
        answers = await asyncio.gather(*(reachable(edge.spool, config.probe_timeout) for edge in config.edges))
        peers = await read_peers(config.interface)
        keys = {edge.name: peers.of(edge.spool[0]) for edge in config.edges}
        self._say_unpeered({edge for edge in config.edges if keys[edge.name] is None})
        for edge, up in zip(config.edges, answers, strict=True):
            self.streaks[edge.name].record(up and keys[edge.name] is not None)
        holder = peers.holder()
        current = next((name for name, key in keys.items() if key is not None and key == holder), None)
        chosen = choose(self.order, current, self.streaks, config.fail_after, config.recover_after)
        if chosen is None:
            log.error("egress: no edge answers; home's mail waits in Postfix's queue")
            return None
        flush = chosen != current
        if flush:
            await route_through(config.interface, peers, keys[chosen], holder)
            log.warning("egress: home's mail now leaves through %s (was %s: %s)", chosen, current or "none",
                        self._why(current))
        if point_postfix(config.transport_map, chosen):
            await command("postfix", "reload")
            log.info("egress: Postfix says the HELO name of %s (service %s%s)", chosen, TRANSPORT_PREFIX, chosen)
            flush = True
        if flush:
            await command("postqueue", "-f")   # the mail deferred on the old path goes now
        return chosen

    def _say_unpeered(self, unpeered: set[Edge]) -> None:
        """An edge no WireGuard peer holds cannot carry mail: said once when it happens, not every round."""
        names = {edge.name for edge in unpeered}
        for edge in sorted(unpeered, key=lambda e: e.name):
            if edge.name not in self._unpeered:
                log.error("egress: no WireGuard peer on %s holds %s/32, the edge %s's tunnel address: "
                          "it cannot carry mail (check the tunnel's configuration)",
                          self.config.interface, edge.spool[0], edge.name)
        for name in sorted(self._unpeered - names):
            log.info("egress: the edge %s has its WireGuard peer again", name)
        self._unpeered = names

    def _why(self, current: str | None) -> str:
        if current is None:
            return "no peer held the default route"
        streak = self.streaks[current]
        if streak.silent:
            return f"silent {streak.silent} rounds in a row"
        return "a more preferred edge answers again"

    async def run(self, stop: asyncio.Event) -> None:
        log.info("egress: probing %s every %.0f s", ", ".join(f"{e.name} ({e.spool[0]})" for e in self.config.edges),
                 self.config.interval)
        while not stop.is_set():
            try:
                await self.round()
            except (CommandFailed, OSError) as error:
                log.error("egress: %s; trying again next round", error)
            try:
                await asyncio.wait_for(stop.wait(), self.config.interval)
            except TimeoutError:
                pass


async def serve(config: EgressConfig) -> None:
    await Egress(config).run(daemon.stop_event())


def run(args) -> int:
    return daemon.run("egress", lambda: load(args.config), serve, (ConfigError, OSError))
