"""The nftables firewall (roles/firewall, playbooks/firewall.yml), seen from
the other hosts and from the controller: what each can reach, not what the
rules file says.

A port is "filtered" when the firewall drops the connection (no answer),
"closed" when the host answers with a reset (reachable, nothing listening),
"open" when a service answers. The firewall is judged by filtered versus not
filtered; whether a service listens is test_services.py's business.
"""

from __future__ import annotations

import ipaddress

import pytest
from scenario import (
    FILTERED,
    HOME_LAN,
    REACHABLE,
    REJECTED,
    address,
    container,
    local_address_towards,
    site,
    tcp_probe,
    wait_for,
)

HOSTS = ("edge", "home")
WG_PORT = int(site()["site_edge_endpoint"].rsplit(":", 1)[1])
EDGE_TUNNEL = site()["site_tunnel_edge_address"]
HOME_TUNNEL = site()["site_tunnel_home_address"]
UNUSED = 4444  # a port nothing opens


@pytest.mark.parametrize("name", HOSTS)
def test_ruleset_loaded_now_and_at_boot(name):
    host = container(name)
    nftables = host.service("nftables")
    assert nftables.is_enabled
    assert nftables.is_running
    table = host.check_output("nft list table inet yestls")
    assert "hook input priority filter; policy drop;" in table
    assert "hook forward priority filter; policy drop;" in table
    assert host.run("nft -c -f /etc/nftables.conf").rc == 0


@pytest.mark.parametrize("name", HOSTS)
def test_reload_leaves_other_tables_and_docker_dns_alone(name):
    """Loading the ruleset replaces only its own table (no `flush ruleset`):
    another table survives a reload, and Docker's DNS server (127.0.0.11,
    NATed by Docker's own table inside the container) still answers."""
    host = container(name)
    host.check_output("nft add table inet yestls_test_canary")
    try:
        host.check_output("systemctl reload nftables")
        assert "table inet yestls_test_canary" in host.check_output("nft list tables")
    finally:
        host.run("nft delete table inet yestls_test_canary")
    other = {"edge": "home", "home": "edge"}[name]
    assert host.run(f"getent hosts {other}").rc == 0


@pytest.mark.parametrize("source", ["home", "internet"])
def test_edge_from_the_internet(source):
    """From home's Internet side and from a stranger (the sending MTA): SMTP,
    SSH, HTTP (ACME HTTP-01) and HTTPS (the MTA-STS policy) reachable; the
    spool service, metrics and anything else dropped."""
    edge = address("edge")
    seen = tcp_probe(source, [(edge, 25), (edge, 22), (edge, 80), (edge, 443), (edge, 7444), (edge, 9465),
                              (edge, UNUSED)])
    assert seen[(edge, 25)] in REACHABLE
    assert seen[(edge, 22)] in REACHABLE
    assert seen[(edge, 80)] in REACHABLE
    assert seen[(edge, 443)] in REACHABLE
    assert seen[(edge, 7444)] == FILTERED
    assert seen[(edge, 9465)] == FILTERED
    assert seen[(edge, UNUSED)] == FILTERED


def test_edge_from_the_controller():
    """The same from a host that is neither home nor the edge."""
    edge = address("edge")
    seen = tcp_probe(None, [(edge, 25), (edge, 7444), (edge, 9465)])
    assert seen[(edge, 25)] in REACHABLE
    assert seen[(edge, 7444)] == FILTERED
    assert seen[(edge, 9465)] == FILTERED


def test_edge_through_the_tunnel_from_home():
    seen = tcp_probe("home", [(EDGE_TUNNEL, 7444), (EDGE_TUNNEL, 9465), (EDGE_TUNNEL, UNUSED)])
    assert seen[(EDGE_TUNNEL, 7444)] in REACHABLE
    assert seen[(EDGE_TUNNEL, 9465)] in REACHABLE
    assert seen[(EDGE_TUNNEL, UNUSED)] == FILTERED


def test_on_the_edge_only_the_edge_service_reaches_homes_oracle():
    """Another user on the edge is refused by the edge's own firewall (the
    oracle would also want its identity key, which only yestls-edge can read);
    the edge service's user and root (`yestls status` pings the oracle) are not."""
    oracle = (HOME_TUNNEL, 7443)
    assert tcp_probe("edge", [oracle], user="nobody")[oracle] == REJECTED
    assert tcp_probe("edge", [oracle], user="yestls-edge")[oracle] in REACHABLE
    assert tcp_probe("edge", [oracle])[oracle] in REACHABLE


@pytest.mark.parametrize("user", ["nobody", "yestls-oracle", "yestls-signer"])
def test_at_home_only_the_intake_reaches_the_edges_spool_service(user):
    """Not even the oracle's own users: only yestls-intake (and root) may pull mail."""
    spool = (EDGE_TUNNEL, 7444)
    assert tcp_probe("home", [spool], user=user)[spool] == REJECTED
    assert tcp_probe("home", [spool], user="yestls-intake")[spool] in REACHABLE


def test_home_forwards_nothing_from_the_tunnel():
    """A compromised edge (root) routes a network behind home into the tunnel:
    `internet`, standing in for home's LAN, with a route back through home.
    Home's kernel would forward (ip_forward is on in its container, as on many
    home servers); its forward chain drops. The control: with an accept rule
    put in front, the same probe goes through."""
    edge, home, internet = container("edge"), container("home"), container("internet")
    assert home.check_output("sysctl -n net.ipv4.ip_forward") == "1"
    behind_home = address("internet")
    home_key = home.check_output("wg show wg0 public-key")
    target = (behind_home, UNUSED)
    edge.check_output(f"wg set wg0 peer {home_key} allowed-ips {HOME_TUNNEL}/32,{behind_home}/32")
    try:
        edge.check_output(f"ip route add {behind_home}/32 dev wg0")
        internet.check_output(f"ip route add {EDGE_TUNNEL}/32 via {address('home')}")
        assert tcp_probe("edge", [target])[target] == FILTERED
        home.check_output("nft insert rule inet yestls forward accept")
        try:
            assert tcp_probe("edge", [target])[target] in REACHABLE
        finally:
            home.check_output("systemctl reload nftables")
        assert tcp_probe("edge", [target])[target] == FILTERED
    finally:
        internet.run(f"ip route del {EDGE_TUNNEL}/32")
        edge.run(f"ip route del {behind_home}/32")
        edge.check_output(f"wg set wg0 peer {home_key} allowed-ips {HOME_TUNNEL}/32")


def test_home_from_the_internet():
    """From the edge's Internet side, from a stranger and from the controller:
    nothing at home."""
    home = address("home")
    ports = [993, 22, 7443, 9464, UNUSED]
    for source in ("edge", "internet", None):
        seen = tcp_probe(source, [(home, port) for port in ports])
        assert set(seen.values()) == {FILTERED}, f"from {source or 'the controller'}: {seen}"


def test_home_through_the_tunnel_from_the_edge():
    """The oracle and metrics through the tunnel; the ports the edge forwards
    clients to (open on the tunnel to any source, test_forwarding.py); not
    SSH, nothing else."""
    ports = (7443, 9464, 465, 587, 993, 22, UNUSED)
    seen = tcp_probe("edge", [(HOME_TUNNEL, p) for p in ports])
    assert {port for port in ports if seen[(HOME_TUNNEL, port)] in REACHABLE} == {7443, 9464, 465, 587, 993}
    assert seen[(HOME_TUNNEL, 22)] == FILTERED
    assert seen[(HOME_TUNNEL, UNUSED)] == FILTERED


def test_home_from_its_lan():
    """The controller sits on home's LAN (it is the bridge's gateway there):
    IMAPS and SSH reachable, the oracle and metrics not."""
    home = address("home", HOME_LAN)
    lan_client = local_address_towards(home)
    assert any(_in_network(lan_client, net) for net in site()["site_home_lan_networks"])
    seen = tcp_probe(None, [(home, 993), (home, 22), (home, 7443), (home, 9464), (home, UNUSED)])
    assert seen[(home, 993)] in REACHABLE
    assert seen[(home, 22)] in REACHABLE
    assert seen[(home, 7443)] == FILTERED
    assert seen[(home, 9464)] == FILTERED
    assert seen[(home, UNUSED)] == FILTERED


def test_ping_only_through_the_tunnel():
    home = container("home")
    assert home.run(f"ping -c 1 -W 2 {EDGE_TUNNEL}").rc == 0
    assert home.run(f"ping -c 1 -W 2 {address('edge')}").rc != 0
    assert container("edge").run(f"ping -c 1 -W 2 {address('home')}").rc != 0


def test_tunnel_comes_up_through_the_firewall():
    """Home's tunnel restarted under the firewall (a new source port, so a new
    flow the edge's firewall has not seen): it reaches the edge's WireGuard
    port again and traffic flows both ways."""
    home, edge = container("home"), container("edge")
    home.check_output("systemctl restart wg-quick@wg0")
    assert home.check_output("wg show wg0 endpoints").endswith(f":{WG_PORT}")
    assert wait_for(lambda: home.run(f"ping -c 1 -W 1 {EDGE_TUNNEL}").rc == 0, timeout=20)
    assert edge.run(f"ping -c 1 -W 2 {HOME_TUNNEL}").rc == 0


def _in_network(ip: str, network: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(network)
