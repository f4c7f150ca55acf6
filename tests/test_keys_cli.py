"""`yestls keys ...` as an operator uses it: new key and CSR, import the issued chain, list, identity-new."""

import argparse
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.identity import load_identity, parse_public_key_text, public_key_text
from relay.keys import cli as keys_cli
from relay.oracle.keystore import Keystore

from .signing_ca import CA


def yestls(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="yestls")
    keys_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    return keys_cli.run(parser.parse_args(list(argv)))


@pytest.fixture(scope="module")
def ca():
    return CA()


def test_new_import_list(tmp_path, ca, capsys):
    store = tmp_path / "keystore"
    csr_path = tmp_path / "mx.csr"
    assert yestls("keys", "new", "--keystore", str(store), "--name", "mx.example.org",
                  "--name", "mail.example.org", "--csr-out", str(csr_path)) == 0
    key_id = capsys.readouterr().out.strip()
    assert Keystore(store).pending() == [key_id]
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid and isinstance(csr.public_key(), ec.EllipticCurvePublicKey)  # default P-256
    assert stat.S_IMODE(os.stat(store / f"{key_id}.key.pem").st_mode) == 0o600

    assert yestls("keys", "list", "--keystore", str(store)) == 0
    assert capsys.readouterr().out == f"{key_id}  ecdsa-p256  mail.example.org,mx.example.org  awaiting certificate\n"

    leaf = ca.issue(csr_path.read_bytes())
    chain_path = tmp_path / "issued.pem"
    chain_path.write_bytes(ca.chain_pem(leaf))
    assert yestls("keys", "import", "--keystore", str(store), str(chain_path)) == 0
    assert capsys.readouterr().out == f"{key_id}  mail.example.org,mx.example.org\n"

    assert yestls("keys", "list", "--keystore", str(store)) == 0
    expiry = leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert capsys.readouterr().out == f"{key_id}  ecdsa-p256  mail.example.org,mx.example.org  not-after {expiry}\n"
    (entry,) = Keystore(store).private_entries()
    assert entry.key_id == key_id


def test_new_without_csr_out_prints_a_clean_csr(tmp_path, capsys):
    assert yestls("keys", "new", "--keystore", str(tmp_path / "ks"), "--name", "mx.example.org",
                  "--type", "ed25519") == 0
    out, err = capsys.readouterr()
    csr = x509.load_pem_x509_csr(out.encode())
    assert out.startswith("-----BEGIN CERTIFICATE REQUEST-----")
    (key_id,) = Keystore(tmp_path / "ks").pending()
    assert err == f"key {key_id}\n"
    assert csr.public_bytes(serialization.Encoding.PEM) == (tmp_path / "ks" / f"{key_id}.csr.pem").read_bytes()


def test_list_shows_every_key(tmp_path, ca, capsys):
    keystore = Keystore(tmp_path / "ks")
    issued_id, csr_pem = keystore.new_key("rsa-2048", ["mx.example.org"])
    keystore.import_chain(ca.chain_pem(ca.issue(csr_pem)))
    pending_id, _ = keystore.new_key("ecdsa-p384", ["*.example.org"])
    assert yestls("keys", "list", "--keystore", str(keystore.directory)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    by_id = {line.split()[0]: line.split("  ")[1:] for line in lines}
    assert by_id[issued_id][:2] == ["rsa-2048", "mx.example.org"] and by_id[issued_id][2].startswith("not-after ")
    assert by_id[pending_id] == ["ecdsa-p384", "*.example.org", "awaiting certificate"]


def test_importing_a_chain_for_a_foreign_key_fails_with_one_line(tmp_path, ca, capsys):
    store = tmp_path / "ks"
    Keystore(store).new_key("ecdsa-p256", ["mx.example.org"])
    chain_path = tmp_path / "foreign.pem"
    chain_path.write_bytes(ca.chain_pem(ca.issue_for_key(ec.generate_private_key(ec.SECP256R1()).public_key())))
    assert yestls("keys", "import", "--keystore", str(store), str(chain_path)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert str(chain_path) in err and "yestls keys new" in err


def test_importing_a_missing_file_fails_with_one_line(tmp_path, capsys):
    assert yestls("keys", "import", "--keystore", str(tmp_path), str(tmp_path / "nope.pem")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot read {tmp_path / 'nope.pem'}" in err


def test_bad_names_fail_with_one_line(tmp_path, capsys):
    assert yestls("keys", "new", "--keystore", str(tmp_path / "ks"), "--name", "MX.example.org") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lower case" in err


def test_an_unsafe_keystore_fails_with_one_line(tmp_path, capsys):
    store = tmp_path / "ks"
    store.mkdir(mode=0o755)
    store.chmod(0o755)
    assert yestls("keys", "new", "--keystore", str(store), "--name", "mx.example.org") == 2
    assert f"run chmod 700 {store}" in capsys.readouterr().err


def test_list_of_a_missing_keystore_fails_with_one_line(tmp_path, capsys):
    assert yestls("keys", "list", "--keystore", str(tmp_path / "missing")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_unknown_type_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit) as exited:
        yestls("keys", "new", "--keystore", str(tmp_path), "--name", "mx.example.org", "--type", "rsa-1024")
    assert exited.value.code == 2


def test_identity_new_prints_the_allowlist_line(tmp_path, capsys):
    path = tmp_path / "edge-identity.pem"
    assert yestls("keys", "identity-new", "--out", str(path)) == 0
    line = capsys.readouterr().out
    assert line.endswith("\n") and line.count("\n") == 1
    assert public_key_text(parse_public_key_text(line)) == line.strip()
    assert public_key_text(load_identity(path).public_key()) == line.strip()

    assert yestls("keys", "identity-new", "--out", str(path)) == 2
    out, err = capsys.readouterr()
    assert out == "" and "already exists" in err and err.count("\n") == 1
