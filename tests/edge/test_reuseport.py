"""The edge's listening group (relay/edge/reuseport.py): the real kernel sends each client network to one socket.

Clients connect over loopback from chosen source addresses (all of 127/8 is
local on Linux); each test finds which group socket accepted the connection
and checks it is the one `worker_for` names. Every wait is bounded.
"""

import contextlib
import os
import select
import socket

import pytest

from relay.edge.reuseport import listen_group, worker_for

WAIT = 2.0  # seconds; loopback connections land well within this


@contextlib.contextmanager
def group_on(host: str, count: int):
    group = listen_group(host, 0, count, backlog=64)
    try:
        yield group
    finally:
        for sock in group:
            sock.close()


def landing(group: list[socket.socket], source: str, server: str) -> int:
    """Connect from `source` to the group at `server`; the index of the socket that accepted it."""
    port = group[0].getsockname()[1]
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(WAIT)
        client.bind((source, 0))
        client.connect((server, port))
        ready, _, _ = select.select(group, [], [], WAIT)
        assert len(ready) == 1, f"{len(ready)} group sockets had the connection from {source}"
        accepted, peer = ready[0].accept()
        accepted.close()
        assert peer[0] in (source, f"::ffff:{source}")
        assert peer[1] == client.getsockname()[1]
    return group.index(ready[0])


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("count", [2, 3, 4])
def test_each_ipv4_network_lands_where_worker_for_says(count):
    sources = [f"127.0.{network}.1" for network in range(40)]
    with group_on("127.0.0.1", count) as group:
        landed = {source: landing(group, source, "127.0.0.1") for source in sources}
    assert landed == {source: worker_for(source, count) for source in sources}
    assert len(set(landed.values())) >= 2


def test_hosts_of_one_network_land_together():
    with group_on("127.0.0.1", 4) as group:
        first = [landing(group, "127.0.5.1", "127.0.0.1") for _ in range(4)]
        second = [landing(group, "127.0.5.77", "127.0.0.1") for _ in range(4)]
    assert set(first) == set(second) == {worker_for("127.0.5.1", 4)}


def test_dual_stack_group_steers_ipv4_and_ipv6_clients():
    if not ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1 cannot be bound)")
    sources = [f"127.0.{network}.1" for network in range(20)]
    with group_on("::", 4) as group:
        assert group[0].family == socket.AF_INET6
        landed = {source: landing(group, source, "127.0.0.1") for source in sources}
        # ::1 is the only IPv6 source loopback has; several source ports rule out the kernel's 4-tuple hash
        from_ipv6 = {landing(group, "::1", "::1") for _ in range(8)}
    assert landed == {source: worker_for(source, 4) for source in sources}
    assert from_ipv6 == {worker_for("::1", 4)}


def test_one_socket_group_needs_no_program():
    with group_on("127.0.0.1", 1) as group:
        assert len(group) == 1
        assert not group[0].getblocking()
        assert not group[0].get_inheritable()
        assert landing(group, "127.0.9.1", "127.0.0.1") == 0


def test_group_sockets_share_one_port_and_are_not_inherited():
    with group_on("127.0.0.1", 3) as group:
        assert len({sock.getsockname() for sock in group}) == 1
        assert group[0].getsockname()[1] != 0
        assert not any(sock.getblocking() or sock.get_inheritable() for sock in group)


def test_group_needs_a_socket():
    with pytest.raises(ValueError):
        listen_group("127.0.0.1", 0, 0, backlog=8)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_failure_names_the_step_and_closes_what_was_made():
    with socket.socket() as plain:  # holds the port without SO_REUSEPORT, so the group cannot bind it
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        before = open_descriptors()
        with pytest.raises(OSError, match="making listening socket 0 of 2 on '127.0.0.1' port .*in use"):
            listen_group("127.0.0.1", plain.getsockname()[1], 2, backlog=8)
        assert open_descriptors() == before


def test_worker_for_keys_on_the_network():
    assert worker_for("10.1.2.3", 7) == worker_for("10.1.2.200", 7)
    assert worker_for("2001:db8:1:2::1", 7) == worker_for("2001:db8:1:2:ffff::9", 7)
    spread = {worker_for(f"10.{a}.{b}.1", 4) for a in range(4) for b in range(16)}
    assert spread == {0, 1, 2, 3}


def test_worker_for_counts_a_mapped_address_as_ipv4():
    for count in (2, 3, 5, 16):
        assert worker_for("::ffff:10.1.2.3", count) == worker_for("10.1.2.3", count)


def test_worker_for_one_worker_is_always_zero():
    assert {worker_for(address, 1) for address in ("10.1.2.3", "192.0.2.9", "2001:db8::1", "::1")} == {0}


def test_worker_for_rejects_a_bad_count_or_address():
    with pytest.raises(ValueError):
        worker_for("10.1.2.3", 0)
    with pytest.raises(ValueError):
        worker_for("mail.example", 2)
