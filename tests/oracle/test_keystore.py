"""The home keystore: key ids, permissions, new keys and CSRs, chain import, what each process may open."""

import builtins
import datetime
import hashlib
import io
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from relay.oracle.keystore import KEY_TYPES, Keystore, KeystoreError, PrivateEntry, PublicEntry, key_id
from relay.tls.signing import schemes_for_key

from ..signing_ca import CA, pem

NOW = datetime.datetime.now(datetime.timezone.utc)


def key_pem(private_key) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def ca():
    return CA()


@pytest.fixture
def keystore(tmp_path):
    return Keystore(tmp_path / "keystore")


@pytest.fixture
def issued(keystore, ca):
    """A keystore with one P-256 key whose chain has been imported: (keystore, key id)."""
    new_id, csr_pem = keystore.new_key("ecdsa-p256", ["mx.example.org", "*.example.org"])
    keystore.import_chain(ca.chain_pem(ca.issue(csr_pem)))
    return keystore, new_id


def plant(keystore: Keystore, private_key, chain_pem: bytes | None) -> str:
    """Put a key (and chain) in the keystore by hand, as an operator copying files would."""
    keystore.directory.mkdir(mode=0o700, exist_ok=True)
    new_id = key_id(private_key.public_key())
    keystore.key_path(new_id).write_bytes(key_pem(private_key))
    keystore.key_path(new_id).chmod(0o600)
    if chain_pem is not None:
        keystore.chain_path(new_id).write_bytes(chain_pem)
    return new_id


# --- key ids --------------------------------------------------------------------


def test_key_id_is_truncated_sha256_of_the_spki():
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key_id(key.public_key()) == hashlib.sha256(spki).hexdigest()[:32]


def test_key_ids_are_stable_and_distinct(ca):
    key = ed25519.Ed25519PrivateKey.generate()
    reloaded = serialization.load_pem_private_key(key_pem(key), None)
    cert = ca.issue_for_key(key.public_key())
    ids = {key_id(key.public_key()), key_id(reloaded.public_key()), key_id(cert.public_key())}
    assert len(ids) == 1
    (the_id,) = ids
    assert len(the_id) == 32 and the_id == the_id.lower() and int(the_id, 16) >= 0
    assert key_id(ed25519.Ed25519PrivateKey.generate().public_key()) != the_id


# --- permissions ------------------------------------------------------------------


def test_a_fresh_keystore_passes_the_permission_check(issued):
    keystore, _ = issued
    keystore.check_permissions()


def test_a_world_readable_key_is_refused(issued):
    keystore, new_id = issued
    path = keystore.key_path(new_id)
    path.chmod(0o644)
    with pytest.raises(KeystoreError) as refused:
        keystore.check_permissions()
    assert str(path) in str(refused.value)
    assert "mode 0644" in str(refused.value) and f"chmod 600 {path}" in str(refused.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o700, 0o660])
def test_any_mode_but_owner_read_write_or_read_is_refused(issued, mode):
    keystore, new_id = issued
    keystore.key_path(new_id).chmod(mode)
    with pytest.raises(KeystoreError, match=f"mode {mode:04o}"):
        keystore.check_permissions()


def test_a_read_only_key_is_accepted(issued):
    keystore, new_id = issued
    keystore.key_path(new_id).chmod(0o400)
    keystore.check_permissions()


def test_a_group_readable_directory_is_refused(issued):
    keystore, _ = issued
    keystore.directory.chmod(0o750)
    with pytest.raises(KeystoreError) as refused:
        keystore.check_permissions()
    assert f"chmod 700 {keystore.directory}" in str(refused.value)


def test_a_symlinked_key_is_refused(issued, tmp_path):
    keystore, new_id = issued
    path = keystore.key_path(new_id)
    elsewhere = tmp_path / "elsewhere.pem"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    with pytest.raises(KeystoreError, match="symbolic link") as refused:
        keystore.check_permissions()
    assert str(path) in str(refused.value)


def test_a_directory_owned_by_someone_else_is_refused(issued):
    keystore, _ = issued
    other = os.getuid() + 4242
    with pytest.raises(KeystoreError, match=f"owned by uid {os.getuid()}, not uid {other}"):
        keystore.check_permissions(owner_uid=other)


def test_a_key_owned_by_someone_else_is_refused(issued):
    keystore, new_id = issued
    path = keystore.key_path(new_id)
    # The tests run as root, which may give the file away; the check must look at the owner, not at reads.
    os.chown(path, os.getuid() + 4242, -1)
    with pytest.raises(KeystoreError) as refused:
        keystore.check_permissions()
    assert str(path) in str(refused.value) and f"chown {os.getuid()} {path}" in str(refused.value)


def test_a_missing_keystore_is_refused_with_how_to_make_one(keystore):
    with pytest.raises(KeystoreError, match="yestls keys new"):
        keystore.check_permissions()


# --- new keys and CSRs --------------------------------------------------------------


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_new_key_writes_a_0600_key_and_a_csr_for_it(keystore, key_type):
    old_umask = os.umask(0)
    try:
        new_id, csr_pem = keystore.new_key(key_type, ["mx.example.org", "mail.example.org"])
    finally:
        os.umask(old_umask)
    key_stat = os.lstat(keystore.key_path(new_id))
    assert stat.S_ISREG(key_stat.st_mode) and stat.S_IMODE(key_stat.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keystore.directory).st_mode) == 0o700

    private_key = serialization.load_pem_private_key(keystore.key_path(new_id).read_bytes(), None)
    assert key_id(private_key.public_key()) == new_id
    csr = x509.load_pem_x509_csr(csr_pem)
    assert keystore.csr_path(new_id).read_bytes() == csr_pem
    assert csr.is_signature_valid
    assert key_id(csr.public_key()) == new_id
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mx.example.org"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.example.org", "mail.example.org"]
    assert keystore.pending() == [new_id]
    keystore.check_permissions()


def test_new_key_csr_uses_sha256_or_none_for_ed25519(keystore):
    _, ecdsa_csr = keystore.new_key("ecdsa-p384", ["mx.example.org"])
    _, ed_csr = keystore.new_key("ed25519", ["mx.example.org"])
    assert isinstance(x509.load_pem_x509_csr(ecdsa_csr).signature_hash_algorithm, hashes.SHA256)
    assert x509.load_pem_x509_csr(ed_csr).signature_hash_algorithm is None


@pytest.mark.parametrize("names, complaint", [
    ([], "at least one name"),
    (["MX.example.org"], "lower case"),
    (["mx_1.example.org"], "not a DNS name"),
    (["mx.example.org."], "not a DNS name"),
    (["*."], "not a DNS name"),
    (["a.*.example.org"], "not a DNS name"),
    (["-mx.example.org"], "not a DNS name"),
    (["bücher.example"], "A-label"),
])
def test_new_key_refuses_bad_names_before_writing_anything(keystore, names, complaint):
    with pytest.raises(KeystoreError, match=complaint):
        keystore.new_key("ecdsa-p256", names)
    assert not keystore.directory.exists() or not list(keystore.directory.iterdir())


def test_new_key_accepts_wildcards_and_long_names(keystore):
    long_name = ".".join(["a" * 60, "b" * 60, "example", "org"])
    _, csr_pem = keystore.new_key("ecdsa-p256", [long_name, "*.example.org", "localhost"])
    csr = x509.load_pem_x509_csr(csr_pem)
    # A CN holds at most 64 characters; the name is still requested in the SAN.
    assert not csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [long_name, "*.example.org", "localhost"]


def test_new_key_refuses_an_unknown_type(keystore):
    with pytest.raises(KeystoreError, match="ecdsa-p256, ecdsa-p384"):
        keystore.new_key("dsa-1024", ["mx.example.org"])


def test_new_key_refuses_to_write_into_a_group_readable_keystore(keystore):
    keystore.directory.mkdir(mode=0o700)
    keystore.directory.chmod(0o755)
    with pytest.raises(KeystoreError, match="chmod 700"):
        keystore.new_key("ecdsa-p256", ["mx.example.org"])
    assert not list(keystore.directory.iterdir())


# --- importing chains and reading entries ---------------------------------------------------


def test_an_imported_chain_makes_public_and_private_entries(keystore, ca):
    new_id, csr_pem = keystore.new_key("ecdsa-p256", ["mx.example.org", "*.example.org"])
    leaf = ca.issue(csr_pem)
    assert keystore.public_entries() == [] and keystore.private_entries() == []

    assert keystore.import_chain(ca.chain_pem(leaf)) == new_id

    assert keystore.pending() == []
    (public,) = keystore.public_entries()
    assert isinstance(public, PublicEntry)
    assert (public.key_id, public.key_type) == (new_id, "ecdsa-p256")
    assert public.chain.der_chain == (leaf.public_bytes(serialization.Encoding.DER),
                                      ca.cert.public_bytes(serialization.Encoding.DER))
    assert public.chain.names == {"mx.example.org", "*.example.org"}
    assert public.chain.schemes == schemes_for_key(leaf.public_key())
    assert public.not_after == leaf.not_valid_after_utc
    (private,) = keystore.private_entries()
    assert isinstance(private, PrivateEntry)
    assert (private.key_id, private.key_type) == (new_id, "ecdsa-p256")
    assert private.chain.is_key_of(private.private_key)
    with pytest.raises(AttributeError):
        private.key_id = "x"  # frozen
    assert sorted(p.name for p in keystore.directory.iterdir()) == sorted(
        f"{new_id}.{kind}.pem" for kind in ("key", "csr", "chain"))  # no temp file left behind


def test_a_chain_through_an_intermediate_imports(keystore):
    intermediate = CA("YesTLS intermediate", issuer=CA("YesTLS root"))
    new_id, csr_pem = keystore.new_key("rsa-2048", ["mx.example.org"])
    assert keystore.import_chain(intermediate.chain_pem(intermediate.issue(csr_pem))) == new_id
    (entry,) = keystore.private_entries()
    assert entry.key_type == "rsa-2048" and len(entry.chain.der_chain) == 3


def test_reimporting_replaces_the_chain(issued, ca):
    keystore, new_id = issued
    renewed = ca.issue(keystore.request(new_id).public_bytes(serialization.Encoding.PEM))
    keystore.import_chain(ca.chain_pem(renewed))
    (entry,) = keystore.public_entries()
    assert entry.chain.der_chain[0] == renewed.public_bytes(serialization.Encoding.DER)


def test_import_keeps_only_the_certificates_of_a_bundle(keystore, ca):
    new_id, csr_pem = keystore.new_key("ed25519", ["mx.example.org"])
    stray_key = key_pem(ec.generate_private_key(ec.SECP256R1()))
    keystore.import_chain(ca.chain_pem(ca.issue(csr_pem)) + stray_key)
    assert b"PRIVATE KEY" not in keystore.chain_path(new_id).read_bytes()


def test_a_chain_for_a_foreign_key_is_refused(keystore, ca):
    keystore.new_key("ecdsa-p256", ["mx.example.org"])
    foreign = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(KeystoreError) as refused:
        keystore.import_chain(ca.chain_pem(ca.issue_for_key(foreign.public_key())), source="chain.pem")
    message = str(refused.value)
    assert key_id(foreign.public_key()) in message and "yestls keys new" in message and "chain.pem" in message
    assert not list(keystore.directory.glob("*.chain.pem"))


def test_an_out_of_order_chain_is_refused(keystore):
    root = CA("YesTLS root")
    intermediate = CA("YesTLS intermediate", issuer=root)
    _, csr_pem = keystore.new_key("ecdsa-p256", ["mx.example.org"])
    leaf = intermediate.issue(csr_pem)
    with pytest.raises(KeystoreError, match=r"certificate 1 \(CN=mx.example.org\) is not issued by certificate 2 "
                                            r"\(CN=YesTLS root\); put the chain in order"):
        keystore.import_chain(pem(leaf, root.cert, intermediate.cert))
    with pytest.raises(KeystoreError, match="certificate 2 .* is not issued by certificate 3"):
        keystore.import_chain(pem(leaf, intermediate.cert, CA("YesTLS unrelated").cert))
    assert not list(keystore.directory.glob("*.chain.pem"))


def test_an_issuer_with_the_right_name_but_another_key_is_refused(keystore, ca):
    _, csr_pem = keystore.new_key("ecdsa-p256", ["mx.example.org"])
    impostor = CA("YesTLS keystore test CA")  # same subject, different key
    with pytest.raises(KeystoreError, match="is not issued by"):
        keystore.import_chain(pem(ca.issue(csr_pem), impostor.cert))


def test_import_refuses_text_without_certificates(keystore):
    keystore.new_key("ecdsa-p256", ["mx.example.org"])
    with pytest.raises(KeystoreError, match="no PEM certificates"):
        keystore.import_chain(b"not a chain", source="chain.pem")


def test_a_key_without_a_chain_is_pending_not_signing(issued):
    keystore, issued_id = issued
    pending_id, _ = keystore.new_key("ed25519", ["other.example.org"])
    assert keystore.pending() == [pending_id]
    assert [e.key_id for e in keystore.private_entries()] == [issued_id]
    assert [e.key_id for e in keystore.public_entries()] == [issued_id]


@pytest.mark.parametrize("make_key, described", [
    (lambda: rsa.generate_private_key(65537, 1024), "RSA"),
    (lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
    (lambda: ed448.Ed448PrivateKey.generate(), "Ed448"),
])
def test_unsupported_key_types_are_refused_naming_the_file(keystore, ca, make_key, described):
    private_key = make_key()
    new_id = plant(keystore, private_key, ca.chain_pem(ca.issue_for_key(private_key.public_key())))
    with pytest.raises(KeystoreError, match=described) as refused:
        keystore.private_entries()
    assert str(keystore.key_path(new_id)) in str(refused.value)
    with pytest.raises(KeystoreError) as refused:
        keystore.public_entries()
    assert str(keystore.chain_path(new_id)) in str(refused.value)


def test_a_chain_filed_under_the_wrong_key_id_is_refused(issued, ca):
    keystore, new_id = issued
    other = ec.generate_private_key(ec.SECP256R1())
    keystore.chain_path(new_id).write_bytes(ca.chain_pem(ca.issue_for_key(other.public_key())))
    with pytest.raises(KeystoreError, match=f"certificate of key {key_id(other.public_key())}, not of key {new_id}"):
        keystore.public_entries()


def test_a_key_file_swapped_for_another_key_is_refused(issued):
    keystore, new_id = issued
    path = keystore.key_path(new_id)
    path.write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(KeystoreError, match="is not the key of the certificate") as refused:
        keystore.private_entries()
    assert str(path) in str(refused.value)


def test_a_chain_without_its_key_is_refused_for_signing(issued):
    keystore, new_id = issued
    keystore.key_path(new_id).unlink()
    with pytest.raises(KeystoreError, match="missing"):
        keystore.private_entries()


def test_public_entries_never_open_a_private_key_file(issued, monkeypatch):
    keystore, new_id = issued
    # Not PEM at all: reading it would fail loudly ...
    keystore.key_path(new_id).write_bytes(b"\x00 garbage, not a key")
    # ... and every way to open a file is watched, in case a reader swallowed the failure.
    opened = []

    def watch(real):
        def opener(path, *args, **kwargs):
            opened.append(os.fspath(path) if isinstance(path, (str, bytes, os.PathLike)) else path)
            return real(path, *args, **kwargs)
        return opener

    monkeypatch.setattr(builtins, "open", watch(builtins.open))
    monkeypatch.setattr(io, "open", watch(io.open))
    monkeypatch.setattr(os, "open", watch(os.open))
    (entry,) = keystore.public_entries()
    assert keystore.pending() == []
    monkeypatch.undo()

    assert entry.key_id == new_id
    assert any(str(p).endswith(".chain.pem") for p in opened)  # the watch does see reads
    assert not [p for p in opened if str(p).endswith(".key.pem")]
    with pytest.raises(KeystoreError, match=f"{keystore.key_path(new_id)} is not an unencrypted PEM private key"):
        keystore.private_entries()
