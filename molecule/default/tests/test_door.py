"""The edge's door as roles/edge_relay deploys it (relay/edge/door.py; docs/edge.md,
"The door"): a client a blocklist lists is refused at RCPT with the list named,
and counted in `yestls status`; an unlisted client's message is accepted; a
client that talks before the banner is dropped.

The blocklist is dnsbl.test, served by `internet`'s DNS (internet/dnsmasq.conf.j2),
which the edge's own unbound forwards to (molecule.yml). It lists one address,
internet_listed_address: a second address of `internet` (internet.yml) that
only this module sends from.
"""

from __future__ import annotations

import re
import uuid

from mailpath import MX, SENDER, edge_status
from scenario import address, container, mailbox, site, wait_for

LISTED = site()["internet_listed_address"]
PEBBLE_ROOT = "/etc/postfix/yestls-pebble-root.pem"  # on `internet` (internet.yml)
SWAKS = ("swaks --server %s --port 25 --ehlo mta.sender.test --from %s --to %s "
         "--tls --tls-verify --tls-ca-path " + PEBBLE_ROOT)

# On `internet`: connect to the edge's port 25 and talk at once, before the
# banner; print everything the edge sends until it closes (bounded by a timeout).
PREGREET = """
import socket, sys
with socket.create_connection((sys.argv[1], 25), timeout=30) as s:
    s.sendall(b"EHLO mta.sender.test\\r\\n")
    got = b""
    while chunk := s.recv(4096):
        got += chunk
    sys.stdout.write(got.decode("ascii", "replace"))
"""


def refused_at_the_door(reason: str) -> int:
    """The edge's count of clients refused at the door for `reason`, as `yestls status` shows it."""
    return edge_status()["door"]["rejected at the door"][reason]


def test_the_door_asks_its_own_resolver_and_the_host_resolves_as_before():
    """unbound answers on the edge's loopback only; the host's resolv.conf does not name it."""
    edge = container("edge")
    assert edge.service("unbound.service").is_running
    assert edge.service("unbound.service").is_enabled
    nameservers = re.findall(r"^nameserver\s+(\S+)", edge.file("/etc/resolv.conf").content_string, re.M)
    assert nameservers and "127.0.0.1" not in nameservers
    assert 'resolver = "127.0.0.1:53"' in edge.file("/etc/yestls/edge.toml").content_string


def test_a_listed_client_is_refused_at_rcpt_naming_the_list_and_counted():
    before = refused_at_the_door("dnsbl")
    result = container("internet").run(SWAKS + " --local-interface %s --quit-after RCPT",
                                       MX, SENDER, mailbox(), LISTED)
    assert "<~  250 2.1.0 OK" in result.stdout, result.stdout  # MAIL FROM, over TLS
    assert re.search(rf"<~\* 550 5\.7\.1 .*client \[{re.escape(LISTED)}\] blocked using dnsbl\.test",
                     result.stdout), result.stdout
    assert wait_for(lambda: refused_at_the_door("dnsbl") > before, timeout=30)
    assert refused_at_the_door("dnsbl") == before + 1


def test_an_unlisted_clients_message_is_accepted():
    """From `internet`'s own address, which dnsbl.test does not list: the whole message, a 250."""
    before = refused_at_the_door("dnsbl")
    marker = f"yestls-door-{uuid.uuid4().hex}"
    result = container("internet").run(SWAKS + " --header %s --body %s",
                                       MX, SENDER, mailbox(), f"Subject: {marker}", f"The marker is {marker}.")
    assert result.rc == 0, result.stdout + result.stderr
    assert re.search(r"<~  250 2\.1\.5 ", result.stdout), result.stdout  # RCPT
    assert re.search(r"<~  250 2\.0\.0 OK queued as [0-9a-f]{32}", result.stdout), result.stdout  # DATA
    assert refused_at_the_door("dnsbl") == before


def test_a_client_that_talks_before_the_banner_is_dropped():
    before = refused_at_the_door("pregreet")
    result = container("internet").run("python3 -c %s %s", PREGREET, address("edge"))
    assert result.rc == 0, result.stderr
    # the refusal, then the end: no banner, the EHLO never answered
    assert result.stdout == "554 5.5.1 Protocol error: talking before the greeting\r\n", result.stdout
    assert wait_for(lambda: refused_at_the_door("pregreet") > before, timeout=30)
