"""`yestls dns` and `yestls doctor` against a real DNS server on loopback, a STARTTLS MX and an MTA-STS host.

The zone served is what `yestls dns` prints for the site (plus the PTR the provider would set), so a
correct zone passes every check; then each test breaks one record, or the served policy, and exactly
that line fails or warns, with its fix.
"""

import base64
import datetime
import http.server
import ipaddress
import json
import socketserver
import ssl
import subprocess
from contextlib import contextmanager
from pathlib import Path

import dns.zone
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from relay import dnsrecords, mtasts
from relay import site as site_module
from relay.cli import main
from relay.doctor import Check, Dns, Doctor, Verdict
from relay.oracle.keystore import Keystore, key_id, spki_sha256
from relay.private_files import create_private_file

from ..background import serving_in_thread
from ..dns_zone import serve_zone_text
from ..pki import make_pki

DOMAINS = ("example.org", "example.net")
MX = "mx.example.org"
EDGE = "127.0.0.1"
PTR = "1.0.0.127.in-addr.arpa. IN PTR mx.example.org.\n"
JOURNAL_SENT = ("2026-01-05T10:00:00+0000 home postfix/smtp[42]: 4Q: to=<a@example.com>, "
                "relay=mx.example.com[192.0.2.7]:25, delay=1, dsn=2.0.0, status=sent (250 2.0.0 Ok)\n")


def _b64(public_key) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def _dkim_file(path: Path) -> None:
    rsa_key = _b64(rsa.generate_private_key(65537, 2048).public_key())
    ed_key = base64.b64encode(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    lines = ["; Ansible managed", "; DKIM keys made at home (docs/deploy.md): publish these TXT records."]
    for domain in DOMAINS:
        for selector, value in (("yestls-rsa", f"v=DKIM1; k=rsa; p={rsa_key}"),
                                ("yestls-ed25519", f"v=DKIM1; k=ed25519; p={ed_key}")):
            pieces = '" "'.join(value[i:i + 255] for i in range(0, len(value), 255))
            lines.append(f'{selector}._domainkey.{domain}. IN TXT ( "{pieces}" )')
    path.write_text("\n".join(lines) + "\n")


class Setup:
    """The site, its keystore (served key + next key), the test PKI, and its zone's text."""

    def __init__(self, directory: Path):
        names = (MX, *(f"mta-sts.{d}" for d in DOMAINS))
        self.pki = make_pki(directory / "pki", names=names, key_types=("ecdsa-p256",))
        self.leaf = self.pki.leaves["ecdsa-p256"]
        keystore = Keystore(directory / "keystore")
        keystore.directory.mkdir(mode=0o700)
        served_id = key_id(self.leaf.key.public_key())
        create_private_file(keystore.key_path(served_id), self.leaf.key_pem.read_bytes())
        keystore.chain_path(served_id).write_bytes(self.leaf.chain_pem.read_bytes())
        self.next_id, _, _ = keystore.rollover()          # the next key: a CSR, no chain yet, not served
        self.next_digest = spki_sha256(keystore.request(self.next_id).public_key())
        self.served_digest = spki_sha256(self.leaf.key.public_key())
        _dkim_file(directory / "dkim.txt")
        (directory / "site.toml").write_text(f'''
domains = {list(DOMAINS)!r}
mx_names = ["{MX}"]
edge_addresses = ["{EDGE}"]
helo_name = "{MX}"
client_name = "mail.example.org"
keystore = "{directory / 'keystore'}"
dkim_records = "{directory / 'dkim.txt'}"
dmarc = "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org"
[mta_sts]
mode = "enforce"
max_age = 86400
[tls_rpt]
rua = "mailto:tls-reports@example.org"
'''.replace("'", '"'))
        self.site_path = directory / "site.toml"
        self.site = site_module.load(self.site_path)
        self.zone = "$TTL 300\n" + dnsrecords.zone_text(self.site) + PTR
        self.policy = mtasts.policy_text("enforce", [MX], 86400)


# --- the MX and the MTA-STS host: TLS with the test PKI -----------------------------------------------

def _server_context(setup: Setup) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(setup.leaf.chain_pem, setup.leaf.key_pem)
    return context


@contextmanager
def starttls_mx(setup: Setup):
    """An SMTP server that offers STARTTLS and shows the test PKI's certificate."""
    context = _server_context(setup)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"220 mx.example.org ESMTP\r\n")
            for line in self.rfile:
                verb = line.strip().upper()
                if verb.startswith(b"EHLO"):
                    self.wfile.write(b"250-mx.example.org\r\n250 STARTTLS\r\n")
                elif verb == b"STARTTLS":
                    self.wfile.write(b"220 2.0.0 go ahead\r\n")
                    self.wfile.flush()
                    try:
                        with context.wrap_socket(self.connection, server_side=True) as tls:
                            tls.recv(1024)            # QUIT, or the client closing
                            tls.sendall(b"221 2.0.0 bye\r\n")
                    except (OSError, ssl.SSLError):
                        pass
                    return
                else:
                    self.wfile.write(b"221 bye\r\n")
                    return

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with serving_in_thread(server):
        yield server.server_address[1]


@contextmanager
def policy_host(setup: Setup):
    """HTTPS on loopback serving the site's policy at /.well-known/mta-sts.txt, or `policies[Host]`."""
    context = _server_context(setup)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            policy = server.policies.get(self.headers.get("Host", ""), setup.policy)
            body = policy if self.path == mtasts.POLICY_PATH else b"not found"
            self.send_response(200 if self.path == mtasts.POLICY_PATH else 404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.policies = {}
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with serving_in_thread(server):
        yield server


def journal(stdout: str, returncode: int = 0):
    def run(command, **_):
        assert command[0] == "journalctl"
        return subprocess.CompletedProcess(command, returncode, stdout, "")
    return run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("doctor"))


@pytest.fixture(scope="module")
def servers(setup):
    with starttls_mx(setup) as smtp_port, policy_host(setup) as https:
        yield smtp_port, https


def diagnose(setup, servers, zone: str, *, authenticated=True, servfail=(), silent=(), ca_file=None):
    smtp_port, https = servers
    with serve_zone_text(zone, authenticated=authenticated) as served:
        served.servfail.update(servfail)
        served.silent.update(silent)
        doctor = Doctor(setup.site, Dns(("127.0.0.1", served.port), lifetime=1.0),
                        ca_file=ca_file or setup.pki.ca_pem, smtp_port=smtp_port,
                        https_port=https.server_address[1], run=journal(JOURNAL_SENT))
        return doctor.results()


def not_passed(results):
    return [r for r in results if r.verdict is not Verdict.PASS]


def only_problem(results, check: Check, verdict: Verdict, subject: str):
    problems = not_passed(results)
    assert [(r.check, r.verdict, r.subject) for r in problems] == [(check, verdict, subject)], problems
    assert problems[0].fix
    return problems[0]


# --- yestls dns ------------------------------------------------------------------------------------------------

def test_dns_prints_a_valid_zone_with_every_record(setup):
    zone = dns.zone.from_text(setup.zone, origin=dns.name.root, relativize=False, check_origin=False)

    def texts(name):
        rdataset = zone.get_rdataset(name + ".", "TXT")
        return [b"".join(r.strings).decode() for r in rdataset] if rdataset else []

    for domain in DOMAINS:
        assert [r.exchange.to_text() for r in zone.get_rdataset(domain + ".", "MX")] == [MX + "."]
        assert texts(domain) == [f"v=spf1 ip4:{EDGE} -all"]
        assert texts(f"_dmarc.{domain}") == [setup.site.dmarc]
        assert texts(f"_mta-sts.{domain}") == [mtasts.txt_record(setup.policy)]
        assert texts(f"_smtp._tls.{domain}") == ["v=TLSRPTv1; rua=mailto:tls-reports@example.org"]
        assert [r.address for r in zone.get_rdataset(f"mta-sts.{domain}.", "A")] == [EDGE]
        for selector in ("yestls-rsa", "yestls-ed25519"):
            assert texts(f"{selector}._domainkey.{domain}")[0].startswith("v=DKIM1;")
    assert [r.address for r in zone.get_rdataset(MX + ".", "A")] == [EDGE]
    assert [r.address for r in zone.get_rdataset("mail.example.org.", "A")] == [EDGE]
    assert zone.get_rdataset(MX + ".", "AAAA") is None
    assert texts(MX) == ["v=spf1 a -all"]
    tlsa = {r.cert.hex() for r in zone.get_rdataset(f"_25._tcp.{MX}.", "TLSA")}
    assert tlsa == {setup.served_digest, setup.next_digest}
    assert "1.0.0.127.in-addr.arpa. IN PTR mx.example.org." in setup.zone   # the advice, a comment


def test_dns_with_two_edges_pairs_names_and_addresses_and_sends_clients_to_the_primary(setup, tmp_path):
    second = "192.0.2.20"
    text = (setup.site_path.read_text().replace(f'mx_names = ["{MX}"]', f'mx_names = ["{MX}", "mx2.example.org"]')
            .replace(f'edge_addresses = ["{EDGE}"]', f'edge_addresses = ["{EDGE}", "{second}"]'))
    (tmp_path / "site.toml").write_text(text)
    out = dnsrecords.zone_text(site_module.load(tmp_path / "site.toml"))
    zone = dns.zone.from_text("$TTL 300\n" + out, origin=dns.name.root, relativize=False, check_origin=False)

    def addresses(name):
        return sorted(r.address for r in zone.get_rdataset(name + ".", "A"))

    for domain in DOMAINS:
        assert sorted((r.preference, r.exchange.to_text()) for r in zone.get_rdataset(domain + ".", "MX")) == [
            (10, MX + "."), (20, "mx2.example.org.")]
        spf = [b"".join(r.strings).decode() for r in zone.get_rdataset(domain + ".", "TXT")]
        assert f"v=spf1 ip4:{EDGE} ip4:{second} -all" in spf
        assert addresses(f"mta-sts.{domain}") == sorted([EDGE, second])   # every edge serves the policy
    assert addresses(MX) == [EDGE] and addresses("mx2.example.org") == [second]
    assert addresses("mail.example.org") == [EDGE], "only the primary forwards the clients' ports"
    # the primary's PTR names the HELO name (home's mail leaves from it), the other's its own MX name
    assert f"{ipaddress.ip_address(EDGE).reverse_pointer}. IN PTR {MX}." in out
    assert f"{ipaddress.ip_address(second).reverse_pointer}. IN PTR mx2.example.org." in out
    assert addresses(MX) == [EDGE], "the HELO name (here the MX name) points at the primary only"
    # each edge's HELO name has its SPF: home's mail leaves through the second when the primary is down
    for helo in (MX, "mx2.example.org"):
        assert [b"".join(r.strings).decode() for r in zone.get_rdataset(helo + ".", "TXT")] == ["v=spf1 a -all"]


def test_dns_says_where_dkim_records_will_appear_and_ca_unknown(setup, tmp_path, capsys):
    text = setup.site_path.read_text().replace(str(setup.site.dkim_records), str(tmp_path / "none.txt"))
    (tmp_path / "site.toml").write_text(text + '[acme]\ndirectory = "https://ca.example/dir"\n'
                                        'challenge = "http-01"\nedges = ["10.77.0.1:7444"]\nidentity_key = "/k"\n')
    assert main(["dns", "--site", str(tmp_path / "site.toml")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'none.txt'} is not there yet" in out
    assert "_domainkey" not in out
    assert "IN CAA" not in out and "https://ca.example/dir" in out
    dns.zone.from_text("$TTL 60\n" + out, origin=dns.name.root, relativize=False, check_origin=False)


def test_dns_caa_for_lets_encrypt(setup, tmp_path, capsys):
    (tmp_path / "site.toml").write_text(setup.site_path.read_text() + '[acme]\nedges = ["10.77.0.1:7444"]\n'
                                        'identity_key = "/k"\n')
    assert main(["dns", "--site", str(tmp_path / "site.toml")]) == 0
    assert 'example.org.' in capsys.readouterr().out.split('CAA   0 issue "letsencrypt.org"')[0].splitlines()[-1]


# --- yestls doctor: all good, then one thing broken at a time ----------------------------------------------

def test_a_correct_zone_passes_every_check(setup, servers):
    results = diagnose(setup, servers, setup.zone)
    assert not_passed(results) == []
    checks = {r.check for r in results}
    assert checks == set(Check)


def test_wrong_ptr(setup, servers):
    result = only_problem(diagnose(setup, servers, setup.zone.replace(PTR, PTR.replace(MX, "host.provider.example"))),
                          Check.PTR, Verdict.FAIL, EDGE)
    assert "host.provider.example" in result.message and "reverse DNS" in result.fix


def test_spf_without_the_edge(setup, servers):
    zone = setup.zone.replace(f'example.net.{" " * 29}IN TXT   "v=spf1 ip4:{EDGE} -all"',
                              'example.net. IN TXT "v=spf1 ip4:192.0.2.1 -all"')
    result = only_problem(diagnose(setup, servers, zone), Check.SPF, Verdict.FAIL, "example.net")
    assert "fail" in result.message and f"ip4:{EDGE}" in result.fix


def test_missing_dkim_record(setup, servers):
    zone = "\n".join(line for line in setup.zone.splitlines()
                     if not line.startswith("yestls-ed25519._domainkey.example.org."))
    result = only_problem(diagnose(setup, servers, zone), Check.DKIM, Verdict.FAIL, "yestls-ed25519 (example.org)")
    assert "k=ed25519" in result.fix


def test_dkim_record_with_another_key(setup, servers):
    other = _b64(ec.generate_private_key(ec.SECP256R1()).public_key())
    zone = "\n".join(line if not line.startswith("yestls-rsa._domainkey.example.net.") else
                     f'yestls-rsa._domainkey.example.net. IN TXT "v=DKIM1; k=rsa; p={other}"'
                     for line in setup.zone.splitlines())
    result = only_problem(diagnose(setup, servers, zone), Check.DKIM, Verdict.FAIL, "yestls-rsa (example.net)")
    assert "another key" in result.message


@contextmanager
def serving(https, host: str, policy: bytes):
    https.policies[host] = policy
    try:
        yield
    finally:
        del https.policies[host]


def test_policy_mx_mismatch(setup, servers):
    with serving(servers[1], "mta-sts.example.org", mtasts.policy_text("enforce", ["mx.elsewhere.example"], 86400)):
        result = only_problem(diagnose(setup, servers, setup.zone), Check.MTA_STS_POLICY, Verdict.FAIL,
                              "mta-sts.example.org")
    assert "mx.elsewhere.example" in result.message and MX in result.message


def test_policy_mode_differs(setup, servers):
    with serving(servers[1], "mta-sts.example.net", mtasts.policy_text("testing", [MX], 86400)):
        result = only_problem(diagnose(setup, servers, setup.zone), Check.MTA_STS_POLICY, Verdict.FAIL,
                              "mta-sts.example.net")
    assert "mode testing" in result.message


def test_mta_sts_record_with_an_old_id(setup, servers):
    zone = setup.zone.replace(mtasts.txt_record(setup.policy), "v=STSv1; id=20240101", 1)
    result = only_problem(diagnose(setup, servers, zone), Check.MTA_STS, Verdict.FAIL, "example.org")
    assert mtasts.policy_id(setup.policy) in result.fix


def test_tlsa_for_another_key(setup, servers):
    zone = setup.zone.replace(setup.served_digest, "ab" * 32)
    result = only_problem(diagnose(setup, servers, zone), Check.TLSA, Verdict.FAIL, MX)
    assert "served key" in result.message and "TLSA 3 1 1" in result.fix


def test_next_key_not_published(setup, servers):
    zone = "\n".join(line for line in setup.zone.splitlines() if setup.next_digest not in line)
    result = only_problem(diagnose(setup, servers, zone), Check.TLSA_NEXT, Verdict.WARN, MX)
    assert setup.next_digest[:16] in result.message


def test_no_tlsa_at_all_is_a_warning(setup, servers):
    zone = "\n".join(line for line in setup.zone.splitlines() if not line.startswith("_25._tcp."))
    results = diagnose(setup, servers, zone)
    assert [(r.check, r.verdict) for r in not_passed(results)] == [(Check.TLSA, Verdict.WARN),
                                                                   (Check.TLSA_NEXT, Verdict.WARN)]


def test_missing_dmarc(setup, servers):
    zone = "\n".join(line for line in setup.zone.splitlines() if not line.startswith("_dmarc.example.net."))
    result = only_problem(diagnose(setup, servers, zone), Check.DMARC, Verdict.FAIL, "example.net")
    assert "_dmarc.example.net" in result.fix


def test_dmarc_p_none_is_a_warning(setup, servers):
    zone = setup.zone.replace("v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org",
                              "v=DMARC1; p=none; rua=mailto:postmaster@example.org", 1)
    only_problem(diagnose(setup, servers, zone), Check.DMARC, Verdict.WARN, "example.org")


def test_missing_tls_rpt(setup, servers):
    zone = "\n".join(line for line in setup.zone.splitlines() if not line.startswith("_smtp._tls.example.org."))
    only_problem(diagnose(setup, servers, zone), Check.TLS_RPT, Verdict.FAIL, "example.org")


def test_helo_name_without_spf(setup, servers):
    zone = setup.zone.replace('"v=spf1 a -all"', '"v=spf1 -all"')
    only_problem(diagnose(setup, servers, zone), Check.HELO_SPF, Verdict.FAIL, MX)


def test_an_aaaa_for_the_mx_is_a_warning(setup, servers):
    result = only_problem(diagnose(setup, servers, setup.zone + f"{MX}. IN AAAA 2001:db8::25\n"),
                          Check.A, Verdict.WARN, MX)
    assert "IPv4 only" in result.message


def test_not_authenticated_is_a_dnssec_warning(setup, servers):
    only_problem(diagnose(setup, servers, setup.zone, authenticated=False), Check.DNSSEC, Verdict.WARN, MX)


def test_servfail_and_timeout_are_results(setup, servers):
    results = diagnose(setup, servers, setup.zone, servfail={"example.net"}, silent={"_dmarc.example.org"})
    by_subject = {(r.check, r.subject): r for r in not_passed(results)}
    mx = by_subject[(Check.MX, "example.net")]
    assert mx.verdict is Verdict.FAIL and "SERVFAIL" in mx.message and "DNSSEC" in mx.fix
    dmarc = by_subject[(Check.DMARC, "example.org")]
    assert dmarc.verdict is Verdict.FAIL and "no answer in time" in dmarc.message


def test_an_untrusted_certificate_fails_starttls_and_the_policy_fetch(setup, servers, tmp_path):
    other = make_pki(tmp_path / "other", key_types=("ecdsa-p256",))
    problems = not_passed(diagnose(setup, servers, setup.zone, ca_file=other.ca_pem))
    assert {(r.check, r.verdict) for r in problems} == {(Check.CERTIFICATE, Verdict.FAIL),
                                                        (Check.MTA_STS_POLICY, Verdict.FAIL)}
    assert all("verif" in r.message for r in problems)


def test_an_mx_that_refuses_connections_fails(setup, servers):
    with socketserver.TCPServer(("127.0.0.1", 0), socketserver.BaseRequestHandler) as closed:
        port = closed.server_address[1]
    with serve_zone_text(setup.zone, authenticated=True) as served:
        doctor = Doctor(setup.site, Dns(("127.0.0.1", served.port), lifetime=1.0), ca_file=setup.pki.ca_pem,
                        smtp_port=port, https_port=servers[1].server_address[1], run=journal(JOURNAL_SENT))
        result = doctor.check_certificate(MX, EDGE, datetime.datetime.now(datetime.timezone.utc))
    assert result.verdict is Verdict.FAIL and "refused" in result.message


@pytest.mark.parametrize(("stdout", "returncode", "verdict", "words"), [
    (JOURNAL_SENT, 0, Verdict.PASS, "last delivery out"),
    ("2026-01-05T10:00:00+0000 home postfix/smtp[42]: connect to mx.example.com[192.0.2.7]:25: "
     "Connection timed out\n", 0, Verdict.FAIL, "time out"),
    ("", 1, Verdict.WARN, "no delivery out"),
    ("", 4, Verdict.WARN, "cannot read"),
])
def test_outbound_25_from_postfix_journal(setup, stdout, returncode, verdict, words):
    doctor = Doctor(setup.site, Dns(("127.0.0.1", 9)), run=journal(stdout, returncode))
    result = doctor.check_outbound_25()
    assert result.verdict is verdict and words in result.message


def test_outbound_25_without_journalctl(setup):
    def missing(command, **_):
        raise FileNotFoundError(2, "No such file or directory", "journalctl")
    result = Doctor(setup.site, Dns(("127.0.0.1", 9)), run=missing).check_outbound_25()
    assert result.verdict is Verdict.WARN and "cannot read" in result.message and result.fix


def test_cli_exit_status_and_json(setup, servers, capsys):
    zone = "\n".join(line for line in setup.zone.splitlines() if not line.startswith("_dmarc.example.net."))
    smtp_port, https = servers
    with serve_zone_text(zone, authenticated=True) as served:
        status = main(["doctor", "--site", str(setup.site_path), "--nameserver", f"127.0.0.1:{served.port}",
                       "--ca-file", str(setup.pki.ca_pem), "--smtp-port", str(smtp_port),
                       "--https-port", str(https.server_address[1]), "--json"])
    assert status == 1
    failures = [r for r in json.loads(capsys.readouterr().out) if r["verdict"] == "fail"]
    assert [(r["check"], r["subject"]) for r in failures] == [("DMARC", "example.net")]
