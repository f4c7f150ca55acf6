"""The site's certificates (docs/deploy.md, "Certificates"), as the Internet sees them.

The edge's certificate, for the MX name and mta-sts.<domain>, comes from the
scenario's ACME server (Pebble on `internet`): home's client (yestls-acme)
asked for it, the edge answered the HTTP-01 requests Pebble sent to the names'
address, and a renewal reaches the edge without restarting it. The clients'
name's certificate is the hand path, kept for users who bring their own CA:
its CSR went to the controller, where the test CA signed it. The TLS keys
never leave home (test_services.py searches the edge and the controller);
`internet`'s Postfix, which trusts Pebble's root alone for the site's
domains, delivers over verified TLS (test_mail_path.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography import x509
from scenario import EDGES, acme_root, address, client_name, container, mx_name_of, site, wait_for

MX = site()["site_mx_name"]
MX_NAMES = {mx_name_of(edge) for edge in EDGES}   # every edge's: one certificate for all
EDGE_NAMES = MX_NAMES | {f"mta-sts.{domain}" for domain in site()["site_domains"]}
PEBBLE_ROOT = "/etc/postfix/yestls-pebble-root.pem"  # on `internet` (internet.yml)
RENEW_UNIT = "yestls-acme-renew.service"
RENEW_TIMER = "yestls-acme-renew.timer"
EDGE_UNIT = "yestls-edge.service"
SITE_TOML = "/etc/yestls/site.toml"
PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def handshake(name: str = MX, port: int = 25, edge: str = "edge"):
    """STARTTLS (port 25) or TLS (443) to an edge from `internet`, for
    `name`, the chain verified against Pebble's root alone."""
    starttls = "-starttls smtp " if port == 25 else ""
    return container("internet").run(
        f"openssl s_client -connect {address(edge)}:{port} {starttls}-servername {name} "
        f"-verify_hostname {name} -verify_return_error -CAfile {PEBBLE_ROOT} -no-CApath -no-CAstore "
        "-showcerts </dev/null")


def served_chain(name: str = MX, port: int = 25, edge: str = "edge") -> list[x509.Certificate]:
    """The chain an edge serves for `name`, as `internet` sees it."""
    result = handshake(name, port, edge)
    assert result.rc == 0, result.stderr
    return [x509.load_pem_x509_certificate(block.encode()) for block in PEM.findall(result.stdout)]


def names_of(certificate: x509.Certificate) -> set[str]:
    return set(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
               .get_values_for_type(x509.DNSName))


def edge_main_pid() -> str:
    return container("edge").check_output(f"systemctl show -p MainPID --value {EDGE_UNIT}")


def test_the_edge_serves_the_acme_servers_certificate_for_every_name():
    """Each name (the MX name, mta-sts.<domain>) gets the same chain, leaf
    first, issued by Pebble's intermediate under the root Pebble made, on
    SMTP and, for the policy names, on HTTPS."""
    root = x509.load_pem_x509_certificate(Path(acme_root()).read_bytes())
    chain = served_chain()
    assert names_of(chain[0]) == EDGE_NAMES
    assert chain[-1].issuer == root.subject
    assert chain[0].issuer == chain[1].subject
    for name in EDGE_NAMES - {MX}:
        assert served_chain(name)[0] == chain[0]
        assert served_chain(name, 443 if name not in MX_NAMES else 25)[0] == chain[0]
    for name in EDGE_NAMES:   # the second edge serves the same chain, its own MX name included
        assert served_chain(name, 25, "edge2")[0] == chain[0]


def test_the_acme_server_checked_each_name_at_the_edge_by_http01():
    """Pebble's log: HTTP-01 requests to port 80 of every name (whose A record
    is an edge's address), each for a token the edges' logs say home's ACME
    client placed over the tunnel (on both: the CA may ask either) and an
    edge answered for that name; and the certificate served is one Pebble
    issued."""
    pebble = container("internet").check_output("journalctl --no-pager -o cat -u pebble")
    logs = {e: container(e).check_output(f"journalctl --no-pager -o cat -u {EDGE_UNIT}") for e in EDGES}
    edge = "".join(logs.values())
    placed = set(re.findall(r"ACME challenge placed by home-acme for token ([\w-]+)", logs["edge"]))
    assert placed == set(re.findall(r"ACME challenge placed by home-acme for token ([\w-]+)", logs["edge2"]))
    for name in EDGE_NAMES:
        tokens = set(re.findall(rf"Attempting to validate w/ HTTP: http://{re.escape(name)}:80"
                                r"/\.well-known/acme-challenge/([\w-]+)", pebble))
        answered = set(re.findall(r"GET /\.well-known/acme-challenge/([\w-]+) Host "
                                  rf"{re.escape(name)}: 200", edge))
        assert tokens, f"Pebble never checked {name} by HTTP-01"
        assert tokens <= placed & answered, f"the edge did not answer {name}'s tokens from home's client"
    issued = {int(serial, 16) for serial in re.findall(r"Issued certificate serial ([0-9a-f]+) ", pebble)}
    assert served_chain()[0].serial_number in issued


def test_a_forced_renewal_is_served_by_the_edge_without_restarting_it():
    """`yestls cert renew --force` as yestls-acme at home: a new certificate
    for the same key (TLSA records pin the key), imported into the keystore
    by the path unit, listed to the edge, which serves it at its next refresh
    of the oracle's chains, on SMTP (25) and on the MTA-STS policy's HTTPS
    (443); the edge's process is the same one."""
    policy_host = f"mta-sts.{site()['site_domains'][0]}"
    before = served_chain()[0]
    pid = edge_main_pid()
    renewal = container("home").run(
        f"runuser -u yestls-acme -- /opt/yestls/bin/yestls cert renew --site {SITE_TOML} --force")
    assert renewal.rc == 0, renewal.stdout + renewal.stderr

    def renewed() -> bool:
        smtp, https = handshake(MX, 25), handshake(policy_host, 443)
        serials = {x509.load_pem_x509_certificate(PEM.search(r.stdout).group().encode()).serial_number
                   for r in (smtp, https) if r.rc == 0}
        return smtp.rc == https.rc == 0 and len(serials) == 1 and before.serial_number not in serials

    assert wait_for(renewed, timeout=150, interval=5), "the edge does not serve the new certificate on 25 and 443"
    after = served_chain()[0]
    assert after.public_key() == before.public_key()
    assert names_of(after) == EDGE_NAMES
    assert served_chain(policy_host, 443)[0] == after
    assert edge_main_pid() == pid


def test_renewals_run_twice_a_day_from_a_hardened_unit():
    home = container("home")
    timer = home.service(RENEW_TIMER)
    assert timer.is_enabled and timer.is_running
    assert home.check_output(f"systemctl show -p User --value {RENEW_UNIT}") == "yestls-acme"
    out = home.check_output(f"systemd-analyze security --no-pager {RENEW_UNIT}")
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
    assert score <= 2.0, out


def test_the_clients_name_certificate_is_the_one_the_test_ca_signed_on_the_controller():
    """The hand path: the clients' name's CSR fetched to the controller,
    signed there by site_test_ca, the chain copied back; home serves that
    very chain on IMAPS (993), and it verifies against the test CA."""
    signed = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory" / "certificates" \
        / f"{client_name()}.clients.chain.pem"
    test_ca = x509.load_pem_x509_certificate(Path(site()["site_test_ca"]["cert"]).read_bytes())
    leaf = x509.load_pem_x509_certificate(signed.read_bytes())
    assert leaf.issuer == test_ca.subject
    served = container("internet").run(
        f"openssl s_client -connect {address('edge')}:993 -servername {client_name()} "
        f"-verify_hostname {client_name()} -verify_return_error -CAfile /etc/postfix/yestls-test-ca.pem "
        "-no-CApath -no-CAstore </dev/null")
    assert served.rc == 0, served.stderr
    assert x509.load_pem_x509_certificate(PEM.search(served.stdout).group().encode()) == leaf

