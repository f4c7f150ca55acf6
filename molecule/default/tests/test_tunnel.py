"""The WireGuard tunnels between each edge and home (roles/wireguard,
playbooks/tunnel.yml): up, carrying traffic both ways, and each host's
private key only on that host."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest
from scenario import (
    EDGES,
    container,
    find_in_directory,
    find_in_filesystem,
    host_settings,
    read_secret,
    site,
    tunnel_address_of,
    wait_for,
)

INTERFACE = "wg0"
KEY = f"/etc/wireguard/{INTERFACE}.key"
HOSTS = (*EDGES, "home")
PEERS = {"home": EDGES, **{edge: ("home",) for edge in EDGES}}
tunnel_address = tunnel_address_of


def public_key(name: str) -> str:
    return container(name).check_output(f"wg show {INTERFACE} public-key")


def per_peer(name: str, what: str) -> dict[str, list[str]]:
    """`wg show wg0 WHAT` on `name`, by peer public key."""
    lines = container(name).check_output(f"wg show {INTERFACE} {what}").splitlines()
    return {line.split()[0]: line.split()[1:] for line in lines}


def transfer(name: str, peer: str) -> tuple[int, int]:
    """Bytes received from and sent to `peer` (a host), as wg counts them."""
    rx, tx = per_peer(name, "transfer")[public_key(peer)]
    return int(rx), int(tx)


@pytest.mark.parametrize("name", HOSTS)
def test_interface_is_up_with_the_site_address(name):
    host = container(name)
    assert host.service(f"wg-quick@{INTERFACE}").is_running
    assert host.service(f"wg-quick@{INTERFACE}").is_enabled
    addresses = host.check_output(f"ip -o -4 address show dev {INTERFACE}")
    assert f" {tunnel_address(name)}/{site()['site_tunnel_prefix']} " in addresses


@pytest.mark.parametrize("name", HOSTS)
def test_each_host_has_its_peers_public_keys_and_no_other(name):
    mine = public_key(name)
    assert sorted(container(name).check_output(f"wg show {INTERFACE} peers").split()) == sorted(
        public_key(peer) for peer in PEERS[name])
    for peer in PEERS[name]:
        assert mine in container(peer).check_output(f"wg show {INTERFACE} peers").split()
    # and the key in use is the one in the key file made on this host
    assert container(name).check_output(f"wg pubkey < {KEY}") == mine


@pytest.mark.parametrize("name", HOSTS)
def test_handshake_completed(name):
    def every_peer_handshook() -> bool:
        stamps = per_peer(name, "latest-handshakes")
        return all(int(stamps.get(public_key(peer), ["0"])[0]) for peer in PEERS[name])

    # home keeps the paths open with keepalives, so a handshake comes without traffic
    assert wait_for(every_peer_handshook, timeout=30), f"{name}: no WireGuard handshake with {PEERS[name]}"


@pytest.mark.parametrize(("source", "target"), [("home", "edge"), ("edge", "home"), ("home", "edge2"),
                                                ("edge2", "home")])
def test_ping_through_the_tunnel(source, target):
    before = transfer(source, target)
    assert container(source).run(f"ping -c 3 -W 2 {tunnel_address(target)}").rc == 0
    route = container(source).check_output(f"ip route get {tunnel_address(target)}")
    assert f" dev {INTERFACE} " in route
    after = transfer(source, target)
    # the replies came back through WireGuard, not some other path
    assert after[0] > before[0] and after[1] > before[1]


@pytest.mark.parametrize("edge", EDGES)
def test_home_dials_each_edge_with_keepalive(edge):
    endpoint = site()["site_edge_endpoint"] if edge == "edge" else host_settings(edge)["edge_endpoint"]
    key = public_key(edge)
    assert per_peer("home", "persistent-keepalive")[key] == ["25"]
    port = endpoint.rsplit(":", 1)[1]
    assert per_peer("home", "endpoints")[key][0].endswith(f":{port}")
    assert container(edge).check_output(f"wg show {INTERFACE} listen-port") == port


def test_only_the_primary_edge_carries_homes_routes():
    """Home's tunnel address routes through the primary (its outbound mail, the clients it forwards): its
    peer holds 0.0.0.0/0 besides its own tunnel address (by which the egress service finds it); the second
    edge's only its own tunnel address (one peer may hold a route)."""
    allowed = per_peer("home", "allowed-ips")
    assert sorted(allowed[public_key("edge")]) == sorted(["0.0.0.0/0", f"{tunnel_address('edge')}/32"])
    assert allowed[public_key("edge2")] == [f"{tunnel_address('edge2')}/32"]


@pytest.mark.parametrize("name", HOSTS)
def test_private_key_is_root_only_and_not_in_the_configuration(name):
    host = container(name)
    key = host.file(KEY)
    assert key.user == "root" and key.group == "root" and key.mode == 0o600
    assert host.file("/etc/wireguard").mode == 0o700
    config = host.file(f"/etc/wireguard/{INTERFACE}.conf")
    assert config.mode == 0o600
    assert "PrivateKey" not in config.content_string
    assert f"PostUp = wg set %i private-key {KEY}" in config.content_string
    assert read_secret(name, KEY).strip() not in config.content


@pytest.mark.parametrize("name", HOSTS)
def test_userspace_only_where_the_kernel_has_no_wireguard(name):
    host = container(name)
    dropin = host.file(f"/etc/systemd/system/wg-quick@{INTERFACE}.service.d/yestls.conf")
    userspace = "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go" in dropin.content_string
    kernel = host.file("/sys/module/wireguard").exists
    assert userspace != kernel
    assert (len(host.process.filter(comm="wireguard-go")) > 0) == userspace


@pytest.mark.parametrize("name", HOSTS)
def test_reload_applies_by_syncconf_and_keeps_the_key(name):
    """The role's handler is `systemctl reload wg-quick@wg0` (wg syncconf): it
    must keep the private key, which the configuration does not name."""
    host = container(name)
    public = host.check_output(f"wg show {INTERFACE} public-key")
    started = f"systemctl show -p ExecMainStartTimestampMonotonic --value wg-quick@{INTERFACE}"
    before = host.check_output(started)
    host.check_output(f"systemctl reload wg-quick@{INTERFACE}")
    assert host.check_output(f"wg show {INTERFACE} public-key") == public
    assert host.check_output(started) == before  # not restarted
    for peer in PEERS[name]:
        assert host.run(f"ping -c 1 -W 2 {tunnel_address(peer)}").rc == 0


def private_keys() -> dict[str, bytes]:
    """Each host's WireGuard private key, as in its key file and as raw bytes."""
    keys = {}
    for name in HOSTS:
        text = read_secret(name, KEY).strip()
        assert re.fullmatch(rb"[A-Za-z0-9+/]{43}=", text)
        keys[f"{name} key (base64)"] = text
        keys[f"{name} key (raw)"] = base64.b64decode(text)
    return keys


@pytest.mark.parametrize("name", HOSTS)
def test_private_key_is_not_on_the_other_host(name):
    found = find_in_filesystem(name, private_keys())
    # the search finds what is there: this host's own key, in its key file
    assert (KEY, f"{name} key (base64)") in found
    assert [hit for hit in found if not hit[1].startswith(f"{name} key")] == []


def test_no_private_key_in_any_task_result_or_on_the_controller():
    """Every result of every task of converge and idempotence (registered
    variables, facts) is logged per host by community.general.log_plays; no
    private key is in them, nor anywhere in Molecule's working directory."""
    ephemeral = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
    results = ephemeral / "task-results"
    logs = "".join(p.read_text(errors="replace") for p in results.iterdir())
    # the logs hold the published public keys: a private key registered or
    # set as a fact would be there too
    for name in HOSTS:
        assert container(name).check_output(f"wg show {INTERFACE} public-key") in logs
    assert find_in_directory(ephemeral, private_keys()) == []
