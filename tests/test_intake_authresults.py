"""Issue 5: SPF, DKIM and DMARC are evaluated at home, against DNS the test controls.

A local zone (tests/dns_zone.py) publishes SPF, a DKIM key and DMARC for
sender.example.net (allowed to send from 127.0.0.1) and SPF plus DMARC for
forged.example.com (not allowed). Mail goes through the real edge, which
records the client address, HELO and envelope in the sealed metadata; the
intake, pointed at the zone by `dns_nameservers`/`dns_port`, writes the
verdicts into the Authentication-Results header it adds for mx.example.org.
"""

import base64

import authres
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .dns_zone import serve_zone
from .intake_mail import MX_NAME, USER, header_fields, header_value, mail_world, message, split_trace, spool_id_of

GOOD = "sender.example.net"
FORGED = "forged.example.com"
SELECTOR = b"sel2026"


@pytest.fixture(scope="module")
def dkim_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    public_der = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, base64.b64encode(public_der).decode()


def signed(body_message: bytes, private_pem: bytes) -> bytes:
    signature = dkim.sign(body_message, SELECTOR, GOOD.encode(), private_pem,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return signature + body_message


@pytest.fixture(scope="module")
def delivered(tmp_path_factory, pki, dkim_key):
    """Four messages through edge and intake; subject -> (spool id, what was sent, what Dovecot holds)."""
    private_pem, public_b64 = dkim_key
    records = {
        GOOD: ["v=spf1 ip4:127.0.0.1 -all"],
        f"{SELECTOR.decode()}._domainkey.{GOOD}": [f"v=DKIM1; k=rsa; p={public_b64}"],
        f"_dmarc.{GOOD}": ["v=DMARC1; p=reject"],
        FORGED: ["v=spf1 ip4:192.0.2.1 -all"],
        f"_dmarc.{FORGED}": ["v=DMARC1; p=reject"],
    }
    with serve_zone(records) as zone:
        options = f'dns_nameservers = ["127.0.0.1"]\ndns_port = {zone.port}\n'
        with mail_world(tmp_path_factory.mktemp("authresults"), pki, intake_options=options) as world:
            tampered = signed(message("signed then altered"), private_pem).replace(
                b"Hello from the sender.", b"Hello from somebody else")
            cases = {
                "signed": (f"alice@{GOOD}", signed(message("signed"), private_pem)),
                "unsigned": (f"alice@{GOOD}", message("unsigned")),
                "forged": (f"mallory@{FORGED}", message("forged", sender=f"mallory@{FORGED}")),
                "signed then altered": (f"alice@{GOOD}", tampered),
            }
            ids = {subject: world.send(sender, [USER], sent, helo=sender.split("@")[1])
                   for subject, (sender, sent) in cases.items()}
            with world.intake_running() as intake:
                inbox = world.wait_for_mailbox(USER, len(cases), intake)
                world.wait_for_empty_spool(intake)
            asked = {name for name, _ in zone.queries}
    assert {GOOD, f"{SELECTOR.decode()}._domainkey.{GOOD}", f"_dmarc.{GOOD}", FORGED} <= asked, \
        "the intake asked the local zone"
    by_id = {spool_id_of(m): m for m in inbox}
    return {subject: (ids[subject], cases[subject][1], by_id[ids[subject]]) for subject in cases}


def results(got: bytes) -> dict[str, authres.core.AuthenticationResult]:
    """The Authentication-Results the intake added (checked to be for our MX), by method."""
    header = authres.AuthenticationResultsHeader.parse(
        "Authentication-Results: " + header_value(got, "Authentication-Results"))
    assert header.authserv_id == MX_NAME
    return {result.method: result for result in header.results}


def verdicts(got: bytes) -> dict[str, str]:
    return {method: result.result for method, result in results(got).items()}


def test_everything_arrives_unchanged_with_one_authentication_results(delivered):
    for subject, (_, sent, got) in delivered.items():
        assert split_trace(got)[1] == sent, subject
        assert [name for name, _ in header_fields(got)].count("authentication-results") == 1, subject


def test_signed_mail_from_an_authorised_host_passes_spf_dkim_and_dmarc(delivered):
    _, _, got = delivered["signed"]
    assert verdicts(got) == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    found = results(got)
    assert any(p.type == "header" and p.name == "d" and p.value == GOOD for p in found["dkim"].properties)
    assert any(p.type == "header" and p.name == "from" and p.value == GOOD for p in found["dmarc"].properties)


def test_unsigned_mail_gets_dkim_none(delivered):
    _, _, got = delivered["unsigned"]
    assert verdicts(got) == {"spf": "pass", "dkim": "none", "dmarc": "pass"}


def test_mail_from_a_host_spf_excludes_fails_spf_and_dmarc(delivered):
    _, _, got = delivered["forged"]
    assert verdicts(got) == {"spf": "fail", "dkim": "none", "dmarc": "fail"}
    assert any(p.name == "mailfrom" and p.value == f"mallory@{FORGED}" for p in results(got)["spf"].properties)


def test_a_signature_over_altered_content_fails_dkim(delivered):
    _, _, got = delivered["signed then altered"]
    assert verdicts(got)["dkim"] == "fail"
    assert verdicts(got)["spf"] == "pass"
