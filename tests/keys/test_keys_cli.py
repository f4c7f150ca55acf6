"""`yestls keys ...` as an operator uses it: new key and CSR, import the issued chain, list, a CSR for the same
key, rollover and switch, identity-new."""

import argparse
import hashlib
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.identity import load_identity, parse_public_key_text, public_key_text
from relay.keys import cli as keys_cli
from relay.oracle.keystore import KeyRole, Keystore, key_type_of, tlsa_records

from ..signing_ca import CA


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
    assert capsys.readouterr().out == (f"{key_id}  ecdsa-p256  mail.example.org,mx.example.org  current  "
                                       "awaiting certificate\n")

    leaf = ca.issue(csr_path.read_bytes())
    chain_path = tmp_path / "issued.pem"
    chain_path.write_bytes(ca.chain_pem(leaf))
    assert yestls("keys", "import", "--keystore", str(store), str(chain_path)) == 0
    assert capsys.readouterr().out == f"{key_id}  mail.example.org,mx.example.org\n"

    assert yestls("keys", "list", "--keystore", str(store)) == 0
    expiry = leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert capsys.readouterr().out == (f"{key_id}  ecdsa-p256  mail.example.org,mx.example.org  current  "
                                       f"not-after {expiry}\n")
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
    assert by_id[issued_id][:3] == ["rsa-2048", "mx.example.org", "current"]
    assert by_id[issued_id][3].startswith("not-after ")
    assert by_id[pending_id] == ["ecdsa-p384", "*.example.org", "current", "awaiting certificate"]


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


def issued(tmp_path, ca, names=("mx.example.org",), key_type="ecdsa-p256") -> tuple[Keystore, str]:
    """A keystore with one key of `key_type` for `names` and its chain."""
    keystore = Keystore(tmp_path / "ks")
    key_id, csr_pem = keystore.new_key(key_type, list(names))
    keystore.import_chain(ca.chain_pem(ca.issue(csr_pem)))
    return keystore, key_id


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_csr_for_an_existing_key_reuses_the_key_and_takes_new_names(tmp_path, ca, capsys):
    keystore, key_id = issued(tmp_path, ca)
    csr_path = tmp_path / "renew.csr"
    assert yestls("keys", "csr", "--keystore", str(keystore.directory), "--key-id", key_id,
                  "--name", "mx.example.org", "--name", "mta-sts.example.org", "--csr-out", str(csr_path)) == 0
    assert capsys.readouterr().out == f"{key_id}\n"
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    assert spki(csr.public_key()) == spki(keystore.public_entry(key_id).chain.public_key)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.example.org", "mta-sts.example.org"]
    assert keystore.csr_path(key_id).read_bytes() == csr_path.read_bytes()   # the stored CSR is the latest
    # the renewed chain is for the same key: imported beside it, served, the same TLSA value
    keystore.import_chain(ca.chain_pem(ca.issue(csr_path.read_bytes())))
    assert [e.key_id for e in keystore.public_entries()] == [key_id]


def test_csr_for_an_unknown_key_or_bad_id_fails_with_one_line(tmp_path, ca, capsys):
    keystore, _ = issued(tmp_path, ca)
    for key_id, expected in (("0" * 32, "has no key"), ("../etc", "is not a key id")):
        assert yestls("keys", "csr", "--keystore", str(keystore.directory), "--key-id", key_id,
                      "--name", "mx.example.org") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err


def test_rollover_makes_a_next_key_that_is_not_served_until_switched(tmp_path, ca, capsys):
    keystore, current = issued(tmp_path, ca, names=("mx.example.org", "mta-sts.example.org"), key_type="rsa-2048")
    store = str(keystore.directory)
    csr_path = tmp_path / "next.csr"
    assert yestls("keys", "rollover", "--keystore", store, "--csr-out", str(csr_path)) == 0
    next_id = capsys.readouterr().out.strip()
    assert next_id != current
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert key_type_of(csr.public_key()) == "rsa-2048"
    assert sorted(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                  .get_values_for_type(x509.DNSName)) == ["mta-sts.example.org", "mx.example.org"]
    current_sha = hashlib.sha256(spki(keystore.public_entry(current).chain.public_key)).hexdigest()
    next_sha = hashlib.sha256(spki(csr.public_key())).hexdigest()
    names = ("mta-sts.example.org", "mx.example.org")
    assert tlsa_records(keystore.directory) == [(names, KeyRole.CURRENT, current_sha), (names, KeyRole.NEXT, next_sha)]

    # Asked again, the same next key (a deployment may run it on every pass).
    assert yestls("keys", "rollover", "--keystore", store) == 0
    out, err = capsys.readouterr()
    assert x509.load_pem_x509_csr(out.encode()).public_key().public_numbers() == csr.public_key().public_numbers()
    assert f"key {next_id} is already the next key" in err

    # No switch before the next key has its chain.
    assert yestls("keys", "rollover", "--keystore", store, "--switch") == 2
    assert "has no certificate yet" in capsys.readouterr().err
    keystore.import_chain(ca.chain_pem(ca.issue(csr_path.read_bytes())))
    assert [e.key_id for e in keystore.public_entries()] == [current]   # imported, still not served
    assert yestls("keys", "list", "--keystore", store) == 0
    roles = {line.split("  ")[0]: line.split("  ")[3] for line in capsys.readouterr().out.splitlines()}
    assert roles == {current: "current", next_id: "next"}

    assert yestls("keys", "rollover", "--keystore", store, "--switch") == 0
    assert capsys.readouterr().out == f"current {next_id}\nretired {current}\n"
    assert [e.key_id for e in keystore.public_entries()] == [next_id]
    assert [e.key_id for e in keystore.private_entries()] == [next_id]
    assert tlsa_records(keystore.directory) == [(names, KeyRole.CURRENT, next_sha)]
    assert yestls("keys", "list", "--keystore", store) == 0
    roles = {line.split("  ")[0]: line.split("  ")[3] for line in capsys.readouterr().out.splitlines()}
    assert roles == {current: "retired", next_id: "current"}
    assert keystore.key_path(current).exists()   # retired keys are kept
    assert stat.S_IMODE(os.stat(keystore.state_path()).st_mode) == 0o600


def test_rollover_with_several_current_keys_needs_a_key_id(tmp_path, ca, capsys):
    keystore, ecdsa = issued(tmp_path, ca)
    rsa_id, csr_pem = keystore.new_key("rsa-2048", ["mx.example.org"])
    keystore.import_chain(ca.chain_pem(ca.issue(csr_pem)))
    store = str(keystore.directory)
    assert yestls("keys", "rollover", "--keystore", store) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 2 current keys" in err and "--key-id" in err
    assert yestls("keys", "rollover", "--keystore", store, "--key-id", rsa_id, "--csr-out", str(tmp_path / "c")) == 0
    next_id = capsys.readouterr().out.strip()
    assert keystore.roles() == {ecdsa: KeyRole.CURRENT, rsa_id: KeyRole.CURRENT, next_id: KeyRole.NEXT}
    assert keystore.key_type(next_id) == "rsa-2048"
    assert yestls("keys", "rollover", "--keystore", store, "--switch", "--key-id", ecdsa) == 2
    assert f"{ecdsa} is not a next key" in capsys.readouterr().err


def test_a_damaged_rollover_state_is_refused_with_the_fix(tmp_path, ca, capsys):
    keystore, _ = issued(tmp_path, ca)
    keystore.state_path().write_text('{"version": 1, "next": {"x": "y"}}')
    assert yestls("keys", "list", "--keystore", str(keystore.directory)) == 2
    err = capsys.readouterr().err
    assert str(keystore.state_path()) in err and "remove it to serve every key" in err
