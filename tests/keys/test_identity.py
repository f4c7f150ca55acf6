"""The edge's identity key: made 0600 and never overwritten, loaded only when its owner alone can read it."""

import base64
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from relay.identity import (
    IdentityError,
    generate_identity,
    load_identity,
    parse_public_key_text,
    public_key_text,
)


def raw(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_generate_then_load_round_trips(tmp_path):
    path = tmp_path / "identity.pem"
    text = generate_identity(path)
    private_key = load_identity(path)
    assert isinstance(private_key, ed25519.Ed25519PrivateKey)
    assert text == public_key_text(private_key.public_key())
    assert raw(parse_public_key_text(text)) == raw(private_key.public_key())
    # The oracle checks the challenge answer with the parsed allowlist key.
    parse_public_key_text(text).verify(private_key.sign(b"challenge"), b"challenge")


def test_public_key_text_is_prefixed_standard_base64_of_the_raw_key():
    public_key = ed25519.Ed25519PrivateKey.generate().public_key()
    text = public_key_text(public_key)
    assert text == "ed25519:" + base64.b64encode(raw(public_key)).decode()
    assert "\n" not in text and len(text) == len("ed25519:") + 44


def test_the_key_is_0600_even_with_umask_0(tmp_path):
    path = tmp_path / "identity.pem"
    old_umask = os.umask(0)
    try:
        generate_identity(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_an_existing_identity_is_never_overwritten(tmp_path):
    path = tmp_path / "identity.pem"
    generate_identity(path)
    before = path.read_bytes()
    with pytest.raises(IdentityError, match="already exists") as refused:
        generate_identity(path)
    assert str(path) in str(refused.value)
    assert path.read_bytes() == before


def test_generate_does_not_write_through_a_symlink(tmp_path):
    target = tmp_path / "target"
    path = tmp_path / "identity.pem"
    path.symlink_to(target)
    with pytest.raises(IdentityError):
        generate_identity(path)
    assert not target.exists()


def test_generate_into_a_missing_directory_says_so(tmp_path):
    with pytest.raises(IdentityError, match="cannot be written"):
        generate_identity(tmp_path / "missing" / "identity.pem")


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660])
def test_a_key_others_can_read_is_refused(tmp_path, mode):
    path = tmp_path / "identity.pem"
    generate_identity(path)
    path.chmod(mode)
    with pytest.raises(IdentityError) as refused:
        load_identity(path)
    assert f"mode {mode:04o}" in str(refused.value) and f"chmod 600 {path}" in str(refused.value)


def test_a_read_only_key_loads(tmp_path):
    path = tmp_path / "identity.pem"
    public = generate_identity(path)
    path.chmod(0o400)
    assert public_key_text(load_identity(path).public_key()) == public


def test_a_key_owned_by_another_user_is_refused(tmp_path):
    path = tmp_path / "identity.pem"
    generate_identity(path)
    other = os.getuid() + 4242
    with pytest.raises(IdentityError, match=f"owned by uid {os.getuid()}, not uid {other}"):
        load_identity(path, owner_uid=other)
    # Root may give the file away: the check looks at the owner, not at whether the read works.
    os.chown(path, other, -1)
    with pytest.raises(IdentityError, match=f"chown {os.getuid()} {path}"):
        load_identity(path)
    load_identity(path, owner_uid=other)


def test_a_key_of_another_type_is_refused(tmp_path):
    path = tmp_path / "identity.pem"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not an unencrypted PEM Ed25519 private key"):
        load_identity(path)


def test_garbage_is_refused(tmp_path):
    path = tmp_path / "identity.pem"
    path.write_bytes(b"ed25519:not a private key")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=str(path)):
        load_identity(path)


def test_a_missing_key_says_how_to_make_one(tmp_path):
    path = tmp_path / "identity.pem"
    with pytest.raises(IdentityError, match=f"yestls keys identity-new --out {path}"):
        load_identity(path)


def test_pasted_text_with_surrounding_whitespace_parses():
    public_key = ed25519.Ed25519PrivateKey.generate().public_key()
    assert raw(parse_public_key_text(f"  {public_key_text(public_key)}\n")) == raw(public_key)


@pytest.mark.parametrize("text, complaint", [
    ("", "must start with 'ed25519:'"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI", "must start with 'ed25519:'"),
    ("ED25519:" + base64.b64encode(bytes(32)).decode(), "must start with 'ed25519:'"),
    ("ed25519:not*base64", "not valid base64"),
    ("ed25519:" + base64.b64encode(bytes(31)).decode(), "holds 31 bytes"),
    ("ed25519:" + base64.b64encode(bytes(33)).decode(), "holds 33 bytes"),
    ("ed25519:" + base64.b64encode(bytes(32)).decode().rstrip("="), "not valid base64"),
    ("ed25519:" + base64.b64encode(bytes(32)).decode()[:-2] + "B=", "canonical"),
])
def test_malformed_public_key_text_is_a_clear_value_error(text, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_public_key_text(text)
