"""ACME at home (`yestls cert renew|status`, relay/certs/) against the real Pebble, with the key kept at home.

The keystore makes the key and the CSR (`yestls keys csr`, as the signer's
user would); the ACME client orders for that CSR, answering HTTP-01 through a
stand-in of the edge's tunnel methods (tests/acme_lab.py) or DNS-01 by RFC
2136 updates to a real Knot; the chain it writes is for the keystore's key
and imports into the keystore. Renewal happens only when due (2/3 of the
lifetime: Pebble 2.4 offers no ARI), or with --force, always with the same
key. Failures are recorded, back off, and never touch chain.pem.
"""

import datetime
import json
import logging

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay import site as site_toml
from relay import status
from relay.certs import cli as cert_cli
from relay.certs.store import CertificateDir, renewal_time
from relay.cli import main as yestls
from relay.oracle.keystore import Keystore

from ..acme_lab import StandInEdge, acme_lab
from ..oracle_home import free_port
from ..signing_ca import CA

NAMES = ("mx.example.org", "mta-sts.example.org")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with acme_lab(tmp_path_factory.mktemp("acme-lab"), NAMES) as lab:
        yield lab


@pytest.fixture
def edge(tmp_path, lab):
    with StandInEdge(tmp_path, lab.http_port) as edge:
        yield edge


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def home(tmp_path, label="mx") -> tuple[Keystore, str, CertificateDir]:
    """A keystore key, and its CSR where the deployment puts it: state/certificates/<label>/csr.pem."""
    keystore = Keystore(tmp_path / "keystore")
    key_id, _ = keystore.new_key("ecdsa-p256", list(NAMES))
    certificate = CertificateDir(tmp_path / "state" / "certificates" / label)
    certificate.directory.mkdir(parents=True)
    assert yestls(["keys", "csr", "--keystore", str(keystore.directory), "--key-id", key_id,
                   *(f"--name={n}" for n in NAMES), "--csr-out", str(certificate.csr_path)]) == 0
    return keystore, key_id, certificate


def leaf_of(certificate: CertificateDir) -> x509.Certificate:
    return x509.load_pem_x509_certificates(certificate.chain_path.read_bytes())[0]


def renew(site, *extra: str) -> int:
    return yestls(["cert", "renew", "--site", str(site), *extra])


def test_http01_issues_for_the_keystore_key_and_renews_only_when_due_or_forced(tmp_path, lab, edge, capsys):
    keystore, key_id, certificate = home(tmp_path)
    site = lab.site_toml(tmp_path / "site.toml", tmp_path / "state", edge=edge)

    assert renew(site) == 0
    leaf = leaf_of(certificate)
    assert spki(leaf.public_key()) == spki(keystore.public_key(key_id))        # the key stayed at home
    assert sorted(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                  .get_values_for_type(x509.DNSName)) == sorted(NAMES)
    assert keystore.import_chain(certificate.chain_path.read_bytes()) == key_id   # what the import hook does
    assert len(set(edge.fetched)) == len(NAMES)                                # a token per name, fetched by the CA
    assert edge.held() == 0                                                    # deleted after the order
    state = json.loads(certificate.state_path.read_text())
    assert state["failures"] == 0 and state["last_error"] is None and state["serial"] == format(leaf.serial_number, "x")
    assert state["next_attempt"] == state["renew_after"] == renewal_time(leaf).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (tmp_path / "state" / "account.key.pem").stat().st_mode & 0o777 == 0o600

    # Not due: no order (the CA is not asked to validate anything), the chain untouched.
    account_key = (tmp_path / "state" / "account.key.pem").read_bytes()
    chain, fetched = certificate.chain_path.read_bytes(), list(edge.fetched)
    assert renew(site) == 0
    assert certificate.chain_path.read_bytes() == chain and edge.fetched == fetched

    # Past two thirds of the lifetime: renewed, same key.
    acme = site_toml.load(site).acme
    assert cert_cli.renew(acme, now=renewal_time(leaf) + datetime.timedelta(seconds=1)) == 0
    renewed = leaf_of(certificate)
    assert renewed.serial_number != leaf.serial_number
    assert spki(renewed.public_key()) == spki(leaf.public_key())

    # --force: renewed again, same key, same account.
    assert renew(site, "--force", "--label", "mx") == 0
    forced = leaf_of(certificate)
    assert forced.serial_number not in (leaf.serial_number, renewed.serial_number)
    assert spki(forced.public_key()) == spki(leaf.public_key())
    assert (tmp_path / "state" / "account.key.pem").read_bytes() == account_key
    assert keystore.import_chain(certificate.chain_path.read_bytes()) == key_id

    capsys.readouterr()
    assert yestls(["cert", "status", "--site", str(site), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["mx"]["serial"] == format(forced.serial_number, "x") and status["mx"]["failures"] == 0


def test_a_failed_challenge_is_recorded_with_the_cas_problem_and_chain_kept(tmp_path, lab, edge, caplog):
    keystore, key_id, certificate = home(tmp_path)
    site = lab.site_toml(tmp_path / "site.toml", tmp_path / "state", edge=edge)
    edge.broken = True
    with caplog.at_level(logging.ERROR, logger="yestls.certs"):
        assert renew(site) == 1
    assert not certificate.chain_path.exists()
    state = json.loads(certificate.state_path.read_text())
    assert state["failures"] == 1
    assert state["last_error"].startswith("challenge failed: ") and "unauthorized" in state["last_error"]
    assert "404" in state["last_error"]   # Pebble's own detail, passed on
    assert state["last_error"] in caplog.text
    assert edge.held() == 0                # deleted after a failed order too


def test_with_two_edges_every_token_is_placed_on_both_and_deleted_from_both(tmp_path, lab, edge):
    """The CA asks one of them (here the first: Pebble's port 80); the other, which the CA could as well have
    asked for a name with both addresses, had every token too."""
    keystore, key_id, certificate = home(tmp_path)
    with StandInEdge(tmp_path / "second", free_port(), home=edge) as second:
        site = lab.site_toml(tmp_path / "site.toml", tmp_path / "state", edge=edge, more_edges=(second.port,))
        assert renew(site) == 0
        assert spki(leaf_of(certificate).public_key()) == spki(keystore.public_key(key_id))
        placed = [token for method, token in edge.calls if method == "acme_challenge_put"]
        assert len(placed) == len(NAMES) and set(edge.fetched) == set(placed)
        for stand_in in (edge, second):
            assert sorted(stand_in.calls) == sorted([("acme_challenge_put", t) for t in placed]
                                                    + [("acme_challenge_delete", t) for t in placed])
            assert stand_in.held() == 0
        assert second.fetched == []


def test_an_edge_that_cannot_take_the_tokens_fails_the_order_naming_it(tmp_path, lab, edge):
    _, _, certificate = home(tmp_path)
    dead = free_port()
    site = lab.site_toml(tmp_path / "site.toml", tmp_path / "state", edge=edge, more_edges=(dead,))
    assert renew(site) == 1
    assert not certificate.chain_path.exists()
    error = json.loads(certificate.state_path.read_text())["last_error"]
    assert f"cannot reach the edge's tunnel service 127.0.0.1:{dead}" in error and "[acme] edges" in error
    assert edge.held() == 0, "the token the first edge took is deleted"
    assert [method for method, _ in edge.calls] == ["acme_challenge_put", "acme_challenge_delete"]
    assert edge.fetched == [], "the CA was never asked to validate"


def test_home_identity_not_allowlisted_by_the_edge_says_so(tmp_path, lab, edge):
    _, _, certificate = home(tmp_path)
    stranger = tmp_path / "stranger.key"
    yestls(["keys", "identity-new", "--out", str(stranger)])
    site = lab.site_toml(tmp_path / "site.toml", tmp_path / "state", edge=edge, identity_key=stranger)
    assert renew(site) == 1
    error = json.loads(certificate.state_path.read_text())["last_error"]
    assert "did not accept home's ACME identity key" in error and "[[spool_service.peer]]" in error


def test_dns01_by_rfc2136_update_to_a_real_server(tmp_path, lab):
    keystore, key_id, certificate = home(tmp_path)
    site = lab.site_toml(tmp_path / "site.toml", tmp_path / "state")
    assert renew(site) == 0
    leaf = leaf_of(certificate)
    assert spki(leaf.public_key()) == spki(keystore.public_key(key_id))
    for name in NAMES:   # the records it added are gone again
        assert lab.txt(f"_acme-challenge.{name}") == []


def test_unreachable_ca_is_recorded_backs_off_and_never_touches_the_chain(tmp_path, lab, caplog):
    keystore, key_id, certificate = home(tmp_path)
    ca = CA("YesTLS earlier CA")
    chain = ca.chain_pem(ca.issue_for_key(keystore.public_key(key_id), NAMES))
    certificate.chain_path.write_bytes(chain)
    with StandInEdge(tmp_path, free_port()) as edge:
        site = lab.site_toml(tmp_path / "site.toml", tmp_path / "state", edge=edge,
                             directory_url=f"https://localhost:{free_port()}/dir")
        acme = site_toml.load(site).acme
        leaf = leaf_of(certificate)
        start = datetime.datetime.now(datetime.timezone.utc)

        # Not due: nothing to order, so an unreachable CA is no failure (its ARI is not there to ask).
        assert cert_cli.renew(acme, now=start) == 0
        assert json.loads(certificate.state_path.read_text())["failures"] == 0

        due = renewal_time(leaf) + datetime.timedelta(minutes=1)
        assert cert_cli.renew(acme, now=due) == 1
        state = json.loads(certificate.state_path.read_text())
        assert state["failures"] == 1 and state["last_error"].startswith("CA unreachable: cannot connect to ")
        assert state["next_attempt"] == (due + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

        later = due + datetime.timedelta(minutes=30)   # backing off: not tried, no new failure
        assert cert_cli.renew(acme, now=later) == 0
        assert json.loads(certificate.state_path.read_text())["failures"] == 1

        after = due + datetime.timedelta(hours=1, minutes=1)
        assert cert_cli.renew(acme, now=after) == 1
        state = json.loads(certificate.state_path.read_text())
        assert state["failures"] == 2
        assert state["next_attempt"] == (after + datetime.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")

        assert cert_cli.renew(acme, force=True, now=after) == 1   # --force ignores the backoff
        assert json.loads(certificate.state_path.read_text())["failures"] == 3
        assert certificate.chain_path.read_bytes() == chain
        assert edge.fetched == []

    # `yestls status` at home: expiry, next renewal, the failure and what it was.
    (row,) = status.acme_rows(site, after.timestamp())
    assert row.section == "certificates" and row.item == "acme mx"
    assert row.value["not_after"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert row.value["failures"] == 3 and row.value["last_error"].startswith("CA unreachable")
    assert "expires " in row.text and "next renewal " in row.text and "FAILING (3 in a row): CA unreachable" in row.text


def test_a_missing_csr_is_a_failure_that_names_the_file(tmp_path, lab, caplog):
    directory = tmp_path / "state" / "certificates" / "clients"
    directory.mkdir(parents=True)
    site = lab.site_toml(tmp_path / "site.toml", tmp_path / "state")
    with caplog.at_level(logging.ERROR, logger="yestls.certs"):
        assert renew(site) == 1
    assert f"CSR missing: put the CSR for clients at {directory / 'csr.pem'}" in caplog.text
    assert json.loads((directory / "state.json").read_text())["failures"] == 1


def test_bad_labels_and_sites_are_refused_with_the_fix(tmp_path, lab, capsys):
    site = lab.site_toml(tmp_path / "site.toml", tmp_path / "state")
    assert renew(site, "--label", "../etc") == 1
    assert renew(site) == 1   # no certificate directory at all
    no_acme = tmp_path / "plain.toml"
    no_acme.write_text('domains = ["example.org"]\nmx_names = ["mx.example.org"]\nedge_addresses = ["192.0.2.1"]\n')
    assert yestls(["cert", "renew", "--site", str(no_acme)]) == 2
    assert "has no [acme] table" in capsys.readouterr().err


@pytest.mark.parametrize(("acme", "expected"), [
    ('challenge = "http-01"\nidentity_key = "/k"\n', "http-01 needs edges and identity_key"),
    ('challenge = "http-01"\nedges = []\nidentity_key = "/k"\n', "http-01 needs edges and identity_key"),
    ('edge = "10.77.0.1:7444"\nidentity_key = "/k"\n', "acme.edge: every edge takes the HTTP-01 tokens now, in a "
                                                        "list: edges = ['10.77.0.1:7444']"),
    ('edges = ["10.77.0.1"]\nidentity_key = "/k"\n', "acme.edges: '10.77.0.1' is not HOST:PORT"),
    ('edges = "10.77.0.1:7444"\nidentity_key = "/k"\n', "acme.edges: '10.77.0.1:7444' is not valid"),
])
def test_acme_edges_are_checked_with_the_fix(tmp_path, acme, expected):
    path = tmp_path / "site.toml"
    path.write_text('domains = ["example.org"]\nmx_names = ["mx.example.org"]\nedge_addresses = ["192.0.2.1"]\n'
                    f"[acme]\n{acme}")
    with pytest.raises(site_toml.ConfigError) as refused:
        site_toml.load(path)
    assert expected in str(refused.value)
