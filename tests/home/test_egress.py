"""Home's outbound path across edges (relay/home/egress.py).

The decision (`choose`) case by case; the probe against real sockets; and
whole rounds against stand-ins for `wg`, `postfix` and `postqueue` on PATH.
The `wg` stand-in keeps WireGuard's rule that one network belongs to one peer
(giving 0.0.0.0/0 to a peer takes it off the other). The real WireGuard and
Postfix are driven in molecule/default/tests/test_two_edges.py.
"""

import asyncio
import json
import logging
import os
import socket
import stat
import sys
import textwrap
import time

import pytest

from relay.config import ConfigError
from relay.home import egress
from relay.home.egress import ANYWHERE, Peers, Streak, choose

ORDER = ["edge", "edge2", "edge3"]
KEYS = {"edge": "Aprimary=", "edge2": "Bsecond=", "edge3": "Cthird="}
TUNNEL = {"edge": "10.77.0.2", "edge2": "10.77.0.3", "edge3": "10.77.0.4"}


def streaks(**runs: tuple[int, int]) -> dict[str, Streak]:
    """name=(answered, silent) in a row; every other edge unknown (0, 0)."""
    return {name: Streak(*runs.get(name, (0, 0))) for name in ORDER}


@pytest.mark.parametrize("current, runs, expected", [
    # the edge in use answers: stay
    ("edge", {"edge": (9, 0), "edge2": (9, 0)}, "edge"),
    # silent, but fewer rounds than fail_after (3): stay (one lost probe is not an outage)
    ("edge", {"edge": (0, 2), "edge2": (9, 0)}, "edge"),
    # silent fail_after rounds: the first edge in order that answered last round
    ("edge", {"edge": (0, 3), "edge2": (1, 0), "edge3": (5, 0)}, "edge2"),
    ("edge", {"edge": (0, 3), "edge2": (0, 4), "edge3": (1, 0)}, "edge3"),
    # nobody else answers: stay where we are (moving would help nothing)
    ("edge", {"edge": (0, 9), "edge2": (0, 9), "edge3": (0, 9)}, "edge"),
    # on the second edge, the primary back for fewer than recover_after (6) rounds: stay
    ("edge2", {"edge": (5, 0), "edge2": (9, 0)}, "edge2"),
    # ... for recover_after rounds: back to the primary
    ("edge2", {"edge": (6, 0), "edge2": (9, 0)}, "edge"),
    # on the third, the second recovered, the primary not yet: the second
    ("edge3", {"edge": (2, 0), "edge2": (6, 0), "edge3": (9, 0)}, "edge2"),
    # a less preferred edge answering for long never pulls mail away from a working one
    ("edge", {"edge": (1, 0), "edge2": (99, 0)}, "edge"),
    # the second one silent, the primary answering but not yet long enough: the primary (it answers)
    ("edge2", {"edge": (1, 0), "edge2": (0, 3)}, "edge"),
    # no peer holds the default route: the first that answers long enough, else any that answers
    (None, {"edge": (0, 1), "edge2": (1, 0)}, "edge2"),
    (None, {"edge": (6, 0), "edge2": (9, 0)}, "edge"),
    (None, {}, None),
])
def test_choose(current, runs, expected):
    assert choose(ORDER, current, streaks(**runs), fail_after=3, recover_after=6) == expected


def test_a_flapping_primary_never_takes_the_mail_back():
    """Answering every other round, the primary never makes recover_after in a row."""
    runs = streaks(edge2=(1, 0))
    for round_ in range(40):
        runs["edge"].record(round_ % 2 == 0)
        runs["edge2"].record(True)
        assert choose(ORDER, "edge2", runs, fail_after=3, recover_after=6) == "edge2"


def test_peers_parse_what_wg_prints():
    text = (f"{KEYS['edge']}\t10.77.0.2/32 0.0.0.0/0\n"
            f"{KEYS['edge2']}\t10.77.0.3/32\n"
            f"{KEYS['edge3']}\t(none)\n")
    peers = Peers.parse(text)
    assert peers.holder() == KEYS["edge"]
    assert peers.of("10.77.0.3") == KEYS["edge2"]
    assert peers.of("10.77.0.30") is None   # a /32 is matched whole, not as a prefix of text
    assert peers.allowed[KEYS["edge3"]] == set()


# --- the probe --------------------------------------------------------------------------------------------------

def test_the_probe_counts_an_answer_even_a_refusal_and_silence_as_down():
    with socket.socket() as listening, socket.socket() as closed, socket.socket() as full:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))   # bound, not listening: the kernel refuses (RST)
        assert asyncio.run(egress.reachable(listening.getsockname(), 2)) is True
        assert asyncio.run(egress.reachable(closed.getsockname(), 2)) is True
        # a listener whose accept queue is full: Linux drops the SYN, nothing answers (a frozen edge)
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        waiting = [socket.socket() for _ in range(3)]
        try:
            for client in waiting:
                client.setblocking(False)
                client.connect_ex(full.getsockname())
            time.sleep(0.2)
            assert asyncio.run(egress.reachable(full.getsockname(), 0.5)) is False
        finally:
            for client in waiting:
                client.close()


# --- whole rounds, with wg, postfix and postqueue stood in for ------------------------------------------------

FAKE_WG = textwrap.dedent("""\
    #!{python}
    import json, sys
    state_file = {state!r}
    state = json.load(open(state_file))
    args = sys.argv[1:]
    if args[:1] == ["show"] and args[2:] == ["allowed-ips"]:
        if args[1] != state["interface"]:
            sys.exit("Unable to access interface: No such device")
        for key, networks in state["peers"].items():
            print(key + "\\t" + (" ".join(networks) or "(none)"))
    elif args[:1] == ["set"] and args[2] == "peer" and args[4] == "allowed-ips":
        key, networks = args[3], [n for n in args[5].split(",") if n]
        for other in state["peers"].values():          # a network belongs to one peer
            other[:] = [n for n in other if n not in networks]
        state["peers"][key] = networks
        json.dump(state, open(state_file, "w"))
    else:
        sys.exit("fake wg: unexpected " + repr(args))
    with open(state_file + ".log", "a") as log:
        log.write(" ".join(["wg"] + args) + "\\n")
""")
FAKE_LOGGER = textwrap.dedent("""\
    #!/bin/sh
    echo "$(basename "$0") $*" >> {log}
""")


class Host:
    """A home with three edge peers, the primary holding the default route; `up` says which answer."""

    def __init__(self, tmp_path, monkeypatch):
        self.state = tmp_path / "wg.json"
        self.calls = tmp_path / "calls.log"
        self.map = tmp_path / "egress"
        self.up = {name: True for name in ORDER}
        peers = {KEYS[name]: [f"{TUNNEL[name]}/32"] + ([ANYWHERE] if name == "edge" else []) for name in ORDER}
        self.state.write_text(json.dumps({"interface": "wg0", "peers": peers}))
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name, text in [("wg", FAKE_WG.format(python=sys.executable, state=str(self.state))),
                           ("postfix", FAKE_LOGGER.format(log=self.calls)),
                           ("postqueue", FAKE_LOGGER.format(log=self.calls))]:
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

        async def reachable(address, timeout):
            return self.up[next(name for name, tunnel in TUNNEL.items() if tunnel == address[0])]

        monkeypatch.setattr(egress, "reachable", reachable)
        config = egress.EgressConfig(edges=tuple(egress.Edge(name, (TUNNEL[name], 7444)) for name in ORDER),
                                     transport_map=self.map, fail_after=3, recover_after=6)
        self.service = egress.Egress(config)

    def rounds(self, n: int) -> str | None:
        chosen = None
        for _ in range(n):
            chosen = asyncio.run(self.service.round())
        return chosen

    def holder(self) -> str:
        peers = json.loads(self.state.read_text())["peers"]
        (holder,) = [name for name in ORDER if ANYWHERE in peers[KEYS[name]]]
        return holder

    def calls_made(self) -> list[str]:
        lines = self.calls.read_text().splitlines() if self.calls.exists() else []
        self.calls.unlink(missing_ok=True)
        return lines


def test_the_first_round_points_postfix_at_the_edge_in_use_and_moves_nothing(tmp_path, monkeypatch):
    host = Host(tmp_path, monkeypatch)
    assert host.rounds(1) == "edge"
    assert host.holder() == "edge"
    assert host.map.read_text().splitlines()[-1] == "/^/ out-edge"
    assert stat.S_IMODE(host.map.stat().st_mode) == 0o644   # Postfix's processes read it
    assert host.calls_made() == ["postfix reload", "postqueue -f"]
    assert host.rounds(3) == "edge"
    assert host.calls_made() == []   # nothing changed: no reload


def test_a_silent_primary_moves_route_helo_and_queue_to_the_second_edge_and_back(tmp_path, monkeypatch):
    host = Host(tmp_path, monkeypatch)
    host.rounds(1)
    host.calls_made()
    host.up["edge"] = False
    assert host.rounds(2) == "edge" and host.holder() == "edge"   # two silent rounds: not yet
    assert host.rounds(1) == "edge2"
    assert host.holder() == "edge2"
    peers = json.loads(host.state.read_text())["peers"]
    assert sorted(peers[KEYS["edge"]]) == ["10.77.0.2/32"]            # the primary keeps its own address
    assert sorted(peers[KEYS["edge2"]]) == [ANYWHERE, "10.77.0.3/32"]
    assert host.map.read_text().splitlines()[-1] == "/^/ out-edge2"
    assert host.calls_made() == ["postfix reload", "postqueue -f"]

    host.up["edge"] = True
    assert host.rounds(5) == "edge2"   # back for 5 rounds: not yet
    assert host.rounds(1) == "edge"    # the 6th
    assert host.holder() == "edge"
    assert host.map.read_text().splitlines()[-1] == "/^/ out-edge"


def test_a_restarted_tunnel_that_gave_the_route_back_to_a_dead_primary_is_set_right(tmp_path, monkeypatch):
    """The truth is wg's: after wg-quick's restart (or a playbook run) hands 0.0.0.0/0 to the primary again,
    the next round moves it back to the edge that answers."""
    host = Host(tmp_path, monkeypatch)
    host.up["edge"] = False
    host.rounds(3)
    assert host.holder() == "edge2"
    state = json.loads(host.state.read_text())
    state["peers"][KEYS["edge"]].append(ANYWHERE)
    state["peers"][KEYS["edge2"]].remove(ANYWHERE)
    host.state.write_text(json.dumps(state))
    assert host.rounds(1) == "edge2"
    assert host.holder() == "edge2"


def test_an_edge_without_a_peer_is_never_chosen_and_said(tmp_path, monkeypatch, caplog):
    host = Host(tmp_path, monkeypatch)
    state = json.loads(host.state.read_text())
    del state["peers"][KEYS["edge2"]]
    host.state.write_text(json.dumps(state))
    host.up["edge"] = False
    assert host.rounds(3) == "edge3"
    said = "no WireGuard peer on wg0 holds 10.77.0.3/32, the edge edge2's tunnel address"
    assert caplog.text.count(said) == 1, caplog.text   # said once, not every round
    state = json.loads(host.state.read_text())
    state["peers"][KEYS["edge2"]] = ["10.77.0.3/32"]
    host.state.write_text(json.dumps(state))
    caplog.clear()
    caplog.set_level(logging.INFO, logger="yestls.egress")
    host.rounds(2)
    assert caplog.text.count("the edge edge2 has its WireGuard peer again") == 1, caplog.text


def test_a_failing_command_is_logged_and_the_service_goes_on(tmp_path, monkeypatch, caplog):
    host = Host(tmp_path, monkeypatch)
    host.service.config = egress.EgressConfig(edges=host.service.config.edges, interface="wg9",
                                              transport_map=host.map, interval=1, probe_timeout=0.5)
    stop = asyncio.Event()

    async def two_rounds():
        asyncio.get_running_loop().call_later(1.5, stop.set)
        await host.service.run(stop)

    asyncio.run(two_rounds())
    assert caplog.text.count("wg show wg9 allowed-ips: exit 1: Unable to access interface") == 2
    assert not host.map.exists()


# --- egress.toml ------------------------------------------------------------------------------------------------

def write(tmp_path, text: str):
    path = tmp_path / "egress.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_configuration_keeps_the_edges_order_and_defaults(tmp_path):
    config = egress.load(write(tmp_path, """\
        [edges]
        edge2 = "10.77.0.3:7444"
        edge = "10.77.0.2:7444"
        """))
    assert [edge.name for edge in config.edges] == ["edge2", "edge"]
    assert (config.interface, config.interval, config.fail_after, config.recover_after) == ("wg0", 10, 3, 6)


@pytest.mark.parametrize("text, says", [
    ("[edges]\nedge = \"mx.example.org:7444\"\n", "edges.edge: 'mx.example.org' is not an IPv4 address"),
    ("[edges]\n", "edges: missing; name every edge"),
    ("interval = 5\nprobe_timeout = 5\n[edges]\nedge = \"10.77.0.2:7444\"\n", "probe_timeout: must be shorter"),
    ("interface = \"wg0; reboot\"\n[edges]\nedge = \"10.77.0.2:7444\"\n", "interface: 'wg0; reboot' is not valid"),
    ("fail_after = 0\n[edges]\nedge = \"10.77.0.2:7444\"\n", "fail_after: 0 is not valid"),
    ("failafter = 3\n[edges]\nedge = \"10.77.0.2:7444\"\n", "failafter: unknown setting"),
])
def test_a_bad_configuration_says_what_to_fix(tmp_path, text, says):
    with pytest.raises(ConfigError, match=None) as raised:
        egress.load(write(tmp_path, text))
    assert says in str(raised.value)


# --- yestls status ----------------------------------------------------------------------------------------------

def test_status_says_which_edge_homes_mail_leaves_through(tmp_path):
    from relay.status import egress_rows

    table = tmp_path / "egress"
    config = write(tmp_path, f"""\
        transport_map = "{table}"
        [edges]
        edge = "10.77.0.2:7444"
        edge2 = "10.77.0.3:7444"
        """)
    assert egress_rows(None) == []
    (row,) = egress_rows(config)
    assert row.value is None and "No such file" in row.unknown   # unknown, with why
    egress.point_postfix(table, "edge")
    (row,) = egress_rows(config)
    assert row.value == {"edge": "edge", "primary": "edge"} and row.text.endswith("through edge, the primary")
    egress.point_postfix(table, "edge2")
    (row,) = egress_rows(config)
    assert row.value == {"edge": "edge2", "primary": "edge"}
    assert "the primary edge did not answer" in row.text
