"""The network path through the edge (roles firewall and wireguard,
playbooks/firewall.yml and tunnel.yml; docs/deploy.md, "Sending and reading
through the edge"): clients on the Internet reach home's 465, 587 and 993 on
the edge's address, and home sees their own addresses; what home sends from
its tunnel address to port 25 leaves from the edge's address; nothing else
crosses the edge, from any side; with home offline the forwarded ports refuse
at once, and work again when it is back.

What crossed is judged by what arrived on the other side (netpath: the SYNs an
interface saw, with their source address and MSS), and by what the client
got: an answer (open, or a reset from the far end), no answer (filtered), or
a reset from the edge.
"""

from __future__ import annotations

import re

import pytest
from mailpath import oracle_reachable_from_edge
from netpath import syns_arriving
from scenario import (
    CLOSED,
    FILTERED,
    HOME_LAN,
    OPEN,
    REACHABLE,
    address,
    container,
    imap_password,
    mailbox,
    site,
    tcp_probe,
    wait_for,
)

EDGE_TUNNEL = site()["site_tunnel_edge_address"]
HOME_TUNNEL = site()["site_tunnel_home_address"]
CLIENT_PORTS = [465, 587, 993]  # site_submission and site_remote_imap: on by default
TUNNEL = "wg0"
INTERNET_IF = "eth0"  # the containers' interface on the scenario's Internet
TUNNEL_UNIT = "wg-quick@wg0.service"
GUARD_UNIT = "yestls-forward-guard.service"
SPARE_TABLE = 51899  # a routing table nothing else uses


def test_clients_reach_homes_ports_on_the_edges_address_with_their_own_address():
    """From `internet`, 465, 587 and 993 on the edge's address: each SYN arrives
    at home through the tunnel, DNATed to home's tunnel address with the
    client's own address as its source, and home's Postfix and Dovecot answer
    back the same way (test_outbound.py speaks TLS and SASL over this)."""
    edge, client = address("edge"), address("internet")
    with syns_arriving("home", TUNNEL, CLIENT_PORTS) as seen:
        result = tcp_probe("internet", [(edge, port) for port in CLIENT_PORTS])
    assert result == {(edge, port): OPEN for port in CLIENT_PORTS}
    assert {(syn.source, syn.destination, syn.port) for syn in seen} == {
        (client, HOME_TUNNEL, port) for port in CLIENT_PORTS
    }


def test_a_forwarded_syn_carries_an_mss_that_fits_the_tunnel():
    """The client offers the MSS of its own link; the edge lowers it to what
    the tunnel carries (MSS clamping), so no segment is too big for it."""
    edge, client = address("edge"), address("internet")
    tunnel_mtu = int(container("edge").check_output(f"cat /sys/class/net/{TUNNEL}/mtu"))
    client_mtu = int(container("internet").check_output(f"cat /sys/class/net/{INTERNET_IF}/mtu"))
    assert client_mtu > tunnel_mtu  # else the clamp would have nothing to do here
    with syns_arriving("home", TUNNEL, [993]) as seen:
        assert tcp_probe("internet", [(edge, 993)])[(edge, 993)] == OPEN
    assert seen
    assert {(syn.source, syn.mss) for syn in seen} == {(client, tunnel_mtu - 40)}


def test_imaps_through_the_edge_shows_home_the_clients_real_address():
    """A login over IMAPS to the edge's address, from `internet`: Dovecot at
    home logs it with rip = `internet`'s address (not the edge's) and lip =
    its tunnel address. The certificate is not checked here: what is tested is
    the path, not the name."""
    home, client = container("home"), address("internet")
    cursor = re.search(r"cursor: (\S+)", home.check_output("journalctl -u dovecot.service -n 1 --show-cursor -o cat")).group(1)
    login = (
        "import imaplib, ssl, sys\n"
        "context = ssl.create_default_context(); context.check_hostname = False; context.verify_mode = ssl.CERT_NONE\n"
        "with imaplib.IMAP4_SSL(sys.argv[1], 993, ssl_context=context, timeout=10) as imap:\n"
        "    imap.login(sys.argv[2], sys.argv[3])\n"
    )
    container("internet").check_output(
        "python3 -c %s %s %s %s", login, address("edge"), mailbox(), imap_password()
    )

    def logins() -> list[tuple[str, str]]:
        journal = home.check_output(f"journalctl -u dovecot.service -o cat --no-pager --after-cursor='{cursor}'")
        return re.findall(rf"imap-login: Login: user=<{re.escape(mailbox())}>.*? rip=([\d.]+), lip=([\d.]+),", journal)

    assert wait_for(logins, timeout=10), "no IMAP login in Dovecot's log"
    assert logins() == [(client, HOME_TUNNEL)]


def test_homes_smtp_from_its_tunnel_address_leaves_from_the_edges_address():
    """Home connects to port 25 on the Internet from its tunnel address (as its
    Postfix does): the SYN arrives at `internet` from the edge's address, and
    the answer comes back to home (an open port, or a reset where nothing
    listens: either way it crossed the edge's NAT both ways)."""
    internet = address("internet")
    with syns_arriving("internet", INTERNET_IF, [25]) as seen:
        result = tcp_probe("home", [(internet, 25)], bind=HOME_TUNNEL)
    assert result[(internet, 25)] in REACHABLE
    assert {syn.source for syn in seen} == {address("edge")}


def test_homes_other_traffic_does_not_go_through_the_edge():
    """Only what leaves from home's tunnel address is routed through the edge:
    a connection home makes from its own address goes out directly."""
    internet = address("internet")
    with syns_arriving("internet", INTERNET_IF, [25]) as seen:
        result = tcp_probe("home", [(internet, 25)])
    assert result[(internet, 25)] in REACHABLE
    assert {syn.source for syn in seen} == {address("home")}


def test_other_ports_from_homes_tunnel_address_are_not_forwarded():
    """The edge is no general proxy for home: from home's tunnel address, any
    port of the Internet but 25 (web, submission, SMTPS) is dropped at the
    edge; nothing arrives at `internet`."""
    internet, ports = address("internet"), [80, 443, 465, 587]
    with syns_arriving("internet", INTERNET_IF, ports) as seen:
        result = tcp_probe("home", [(internet, port) for port in ports], bind=HOME_TUNNEL)
    assert set(result.values()) == {FILTERED}, result
    assert seen == []


@pytest.mark.parametrize("edge_wireguard_lets_it_in", [False, True], ids=["as-deployed", "firewall-alone"])
def test_port_25_from_another_source_in_the_tunnel_is_not_forwarded(edge_wireguard_lets_it_in):
    """Home sends into the tunnel from its LAN address (a compromised home, or
    a LAN host it routes): nothing arrives at `internet`. As deployed the
    edge's WireGuard already refuses the source; with it let in (and even a
    route back through the tunnel), the edge's firewall alone refuses it."""
    home, edge = container("home"), container("edge")
    internet, home_lan = address("internet"), address("home", HOME_LAN)
    home_key = home.check_output(f"wg show {TUNNEL} public-key")
    home.check_output(f"ip route add {internet}/32 dev {TUNNEL} table {SPARE_TABLE}")
    home.check_output(f"ip rule add from {home_lan} to {internet} lookup {SPARE_TABLE} priority 100")
    try:
        if edge_wireguard_lets_it_in:
            edge.check_output(f"wg set {TUNNEL} peer {home_key} allowed-ips {HOME_TUNNEL}/32,{home_lan}/32")
            edge.check_output(f"ip route add {home_lan}/32 dev {TUNNEL}")
        with syns_arriving("internet", INTERNET_IF, [25]) as seen:
            result = tcp_probe("home", [(internet, 25)], bind=home_lan)
        assert result[(internet, 25)] == FILTERED
        assert seen == []
    finally:
        if edge_wireguard_lets_it_in:
            edge.run(f"ip route del {home_lan}/32 dev {TUNNEL}")
            edge.check_output(f"wg set {TUNNEL} peer {home_key} allowed-ips {HOME_TUNNEL}/32")
        home.run(f"ip rule del from {home_lan} to {internet} lookup {SPARE_TABLE} priority 100")
        home.run(f"ip route flush table {SPARE_TABLE}")
    # and the path itself works: the same probe from home's tunnel address arrives
    with syns_arriving("internet", INTERNET_IF, [25]) as seen:
        assert tcp_probe("home", [(internet, 25)], bind=HOME_TUNNEL)[(internet, 25)] in REACHABLE
    assert {syn.source for syn in seen} == {address("edge")}


def test_the_edge_masquerades_no_address_of_its_own():
    """The NAT is for home's tunnel address only: a connection the edge makes
    from its own tunnel address leaves with that address (and gets no answer:
    `internet` drops its reply to it here, where the Docker host would route
    it onwards)."""
    internet = container("internet")
    target = (address("internet"), 25)
    internet.check_output(f"ip route add blackhole {EDGE_TUNNEL}/32")
    try:
        with syns_arriving("internet", INTERNET_IF, [25]) as seen:
            result = tcp_probe("edge", [target], bind=EDGE_TUNNEL)
    finally:
        internet.run(f"ip route del blackhole {EDGE_TUNNEL}/32")
    assert result[target] == FILTERED
    assert seen and {syn.source for syn in seen} == {EDGE_TUNNEL}


def test_the_internet_reaches_nothing_behind_the_tunnel_but_the_forwarded_ports():
    """`internet` routes home's tunnel address through the edge (a neighbour on
    the edge's network can): the edge forwards into the tunnel only what it
    DNATed itself, so nothing arrives at home, not even on 993 addressed to
    home directly. The control: 993 on the edge's own address arrives."""
    internet, edge = container("internet"), address("edge")
    ports = [993, 465, 7443, 9464, 22]
    internet.check_output(f"ip route add {HOME_TUNNEL}/32 via {edge}")
    try:
        with syns_arriving("home", TUNNEL, ports) as seen:
            result = tcp_probe("internet", [(HOME_TUNNEL, port) for port in ports])
    finally:
        internet.run(f"ip route del {HOME_TUNNEL}/32 via {edge}")
    assert set(result.values()) == {FILTERED}, result
    assert seen == []
    with syns_arriving("home", TUNNEL, [993]) as seen:
        assert tcp_probe("internet", [(edge, 993)])[(edge, 993)] == OPEN
    assert {syn.source for syn in seen} == {address("internet")}


def test_the_guard_runs_now_and_at_boot_sandboxed():
    """Root (nftables, ping), but with those two capabilities only and
    systemd's sandboxing: `systemd-analyze security` 2.1, as its unit says."""
    edge = container("edge")
    guard = edge.service(GUARD_UNIT)
    assert guard.is_running
    assert guard.is_enabled
    out = edge.check_output(f"systemd-analyze security --no-pager {GUARD_UNIT}")
    assert float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1)) <= 2.1, out


def test_home_offline_the_forwarded_ports_refuse_and_work_again_when_it_is_back():
    """Home's WireGuard stopped (home offline): a SYN forwarded into the tunnel
    would go unanswered, so the guard marks home down and the edge refuses
    993, 465 and 587 with a reset (ConnectionRefusedError, not a timeout: home
    cannot send one while it is offline). Back online, they reach home again
    and so does its outbound SMTP (the policy route came back with the tunnel)."""
    home, edge, internet = container("home"), address("edge"), address("internet")
    targets = [(edge, port) for port in CLIENT_PORTS]
    assert tcp_probe("internet", targets) == {target: OPEN for target in targets}
    home.check_output(f"systemctl stop {TUNNEL_UNIT}")
    try:
        assert wait_for(lambda: tcp_probe("internet", [(edge, 993)])[(edge, 993)] == CLOSED, timeout=30), (
            "the edge did not refuse 993 with home offline"
        )
        assert tcp_probe("internet", targets) == {target: CLOSED for target in targets}
        marked = container("edge").check_output("nft list set inet yestls home_unreachable")
        assert HOME_TUNNEL in marked
    finally:
        home.check_output(f"systemctl start {TUNNEL_UNIT}")
    assert wait_for(lambda: tcp_probe("internet", targets) == {target: OPEN for target in targets}, timeout=60), (
        "465, 587 and 993 did not reach home again"
    )
    assert HOME_TUNNEL not in container("edge").check_output("nft list set inet yestls home_unreachable")
    with syns_arriving("internet", INTERNET_IF, [25]) as seen:
        assert tcp_probe("home", [(internet, 25)], bind=HOME_TUNNEL)[(internet, 25)] in REACHABLE
    assert {syn.source for syn in seen} == {edge}
    assert wait_for(oracle_reachable_from_edge, timeout=90), "the edge did not get its oracle back"

