"""The home spool key pair: made 0600 and never overwritten, loaded only when its owner alone can read it,
and a public key line the edge's config can hold, refused with a clear message when it is mangled."""

import base64
import os
import stat

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from relay.spool.keys import (
    DEFAULT_SUITE,
    SpoolKeyError,
    generate_spool_key,
    load_spool_private_key,
    parse_spool_public_key,
)

SUITES = ["mlkem768-x25519", "x25519"]


@pytest.mark.parametrize("suite", SUITES)
def test_generate_then_load_round_trips_and_the_pair_works(tmp_path, suite):
    path = tmp_path / "spool.key"
    text = generate_spool_key(path, suite)
    private_key = load_spool_private_key(path)
    public_key = parse_spool_public_key(text)
    assert private_key.suite.name == public_key.suite.name == suite
    assert private_key.public_key == public_key and public_key.text == text
    # What the edge seals with the parsed line, the loaded private key opens.
    sealed = public_key.suite.hpke.encrypt(b"data key", public_key.key, info=b"header")
    assert private_key.suite.hpke.decrypt(sealed, private_key.key, info=b"header") == b"data key"


def test_the_default_suite_is_the_post_quantum_hybrid(tmp_path):
    assert DEFAULT_SUITE == "mlkem768-x25519"
    text = generate_spool_key(tmp_path / "spool.key")
    assert text.startswith("mlkem768-x25519:")
    raw = base64.b64decode(text.split(":", 1)[1])
    assert len(raw) == 1184 + 32  # the ML-KEM-768 public key, then the X25519 one
    assert load_spool_private_key(tmp_path / "spool.key").suite.kem == hpke.KEM.MLKEM768_X25519


def test_the_x25519_public_key_text_is_the_raw_key(tmp_path):
    text = generate_spool_key(tmp_path / "spool.key", "x25519")
    private_key = load_spool_private_key(tmp_path / "spool.key")
    assert text == "x25519:" + base64.b64encode(private_key.key.public_key().public_bytes_raw()).decode()


def test_the_private_key_file_is_documented_text_naming_the_suite(tmp_path):
    generate_spool_key(tmp_path / "spool.key")
    lines = [line for line in (tmp_path / "spool.key").read_text().splitlines() if not line.startswith("#")]
    assert lines[0] == "yestls-spool-private-key: 1"
    assert lines[1] == "suite: mlkem768-x25519"
    assert [line.split(":")[0] for line in lines[2:]] == ["mlkem768-seed", "x25519"]


def test_two_keys_differ(tmp_path):
    assert generate_spool_key(tmp_path / "a") != generate_spool_key(tmp_path / "b")


def test_the_key_is_0600_even_with_umask_0(tmp_path):
    path = tmp_path / "spool.key"
    old_umask = os.umask(0)
    try:
        generate_spool_key(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_an_existing_key_is_never_overwritten(tmp_path):
    path = tmp_path / "spool.key"
    generate_spool_key(path)
    before = path.read_bytes()
    with pytest.raises(SpoolKeyError, match="already exists") as refused:
        generate_spool_key(path, "x25519")
    assert str(path) in str(refused.value)
    assert path.read_bytes() == before


def test_generate_does_not_write_through_a_symlink(tmp_path):
    target = tmp_path / "target"
    (tmp_path / "spool.key").symlink_to(target)
    with pytest.raises(SpoolKeyError):
        generate_spool_key(tmp_path / "spool.key")
    assert not target.exists()


def test_generate_into_a_missing_directory_says_so(tmp_path):
    with pytest.raises(SpoolKeyError, match="cannot be written"):
        generate_spool_key(tmp_path / "missing" / "spool.key")


def test_an_unknown_suite_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="mlkem768-x25519, x25519"):
        generate_spool_key(tmp_path / "spool.key", "rsa")
    assert not (tmp_path / "spool.key").exists()


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660])
def test_a_key_others_can_read_is_refused(tmp_path, mode):
    path = tmp_path / "spool.key"
    generate_spool_key(path)
    path.chmod(mode)
    with pytest.raises(SpoolKeyError, match=f"mode {mode:04o}.*chmod 600"):
        load_spool_private_key(path)


def test_a_key_owned_by_another_user_is_refused(tmp_path):
    path = tmp_path / "spool.key"
    generate_spool_key(path)
    with pytest.raises(SpoolKeyError, match=f"owned by uid {os.getuid()}.*chown"):
        load_spool_private_key(path, owner_uid=os.getuid() + 1)


def test_a_missing_key_says_how_to_make_one(tmp_path):
    with pytest.raises(SpoolKeyError, match="spool-new"):
        load_spool_private_key(tmp_path / "missing.key")


def test_a_symlinked_or_non_regular_key_is_refused(tmp_path):
    path = tmp_path / "spool.key"
    generate_spool_key(path)
    (tmp_path / "link").symlink_to(path)
    with pytest.raises(SpoolKeyError):
        load_spool_private_key(tmp_path / "link")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(SpoolKeyError, match="not a regular file"):
        load_spool_private_key(tmp_path / "dir")


def _write(path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("text, complaint", [
    ("", "not a spool key file"),
    ("-----BEGIN PRIVATE KEY-----\n", "not 'name: value'"),
    ("yestls-spool-private-key: 2\nsuite: x25519\nx25519: {x}\n", "not a spool key file"),
    ("yestls-spool-private-key: 1\nsuite: rsa\nx25519: {x}\n", "unknown spool key suite"),
    ("yestls-spool-private-key: 1\nsuite: x25519\n", "missing \\['x25519'\\]"),
    ("yestls-spool-private-key: 1\nsuite: mlkem768-x25519\nx25519: {x}\n", "missing \\['mlkem768-seed'\\]"),
    ("yestls-spool-private-key: 1\nsuite: x25519\nx25519: {x}\nx25519: {x}\n", "appears twice"),
    ("yestls-spool-private-key: 1\nsuite: x25519\nx25519: {x}\nextra: 1\n", "unexpected \\['extra'\\]"),
    ("yestls-spool-private-key: 1\nsuite: x25519\nx25519: not*base64\n", "x25519 is not valid base64"),
    ("yestls-spool-private-key: 1\nsuite: x25519\nx25519: {short}\n", "x25519 holds 31 bytes, not 32"),
    ("yestls-spool-private-key: 1\nsuite: mlkem768-x25519\nmlkem768-seed: {x}\nx25519: {x}\n",
     "mlkem768-seed holds 32 bytes, not 64"),
])
def test_a_malformed_key_file_is_refused_with_the_reason(tmp_path, text, complaint):
    path = tmp_path / "spool.key"
    _write(path, text.format(x=_b64(bytes(32)), short=_b64(bytes(31))))
    with pytest.raises(SpoolKeyError, match=complaint) as refused:
        load_spool_private_key(path)
    assert str(path) in str(refused.value)


def test_comments_and_blank_lines_are_ignored(tmp_path):
    x25519 = X25519PrivateKey.generate()
    _write(tmp_path / "spool.key", "\n# a note\nyestls-spool-private-key: 1\n\n  suite: x25519  \n"
                                   f"# another\nx25519: {_b64(x25519.private_bytes_raw())}\n")
    loaded = load_spool_private_key(tmp_path / "spool.key")
    assert loaded.public_key.raw == x25519.public_key().public_bytes_raw()


# --- the public key line ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def public_texts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    return {suite: generate_spool_key(directory / suite, suite) for suite in SUITES}


@pytest.mark.parametrize("suite", SUITES)
def test_surrounding_whitespace_is_tolerated(public_texts, suite):
    assert parse_spool_public_key(f"  {public_texts[suite]}\n").text == public_texts[suite]


@pytest.mark.parametrize("suite", SUITES)
def test_a_cut_public_key_says_so(public_texts, suite):
    text = public_texts[suite]
    cut = text[:len(text) - 8]
    with pytest.raises(ValueError, match="cut or wrapped|not valid base64"):
        parse_spool_public_key(cut)


def test_a_wrapped_public_key_is_refused(public_texts):
    text = public_texts["mlkem768-x25519"]
    with pytest.raises(ValueError, match="not valid base64"):
        parse_spool_public_key(text[:80] + "\n" + text[80:])


@pytest.mark.parametrize("text, complaint", [
    ("", "must start with the suite"),
    ("AAAA", "must start with the suite"),
    ("ed25519:" + _b64(bytes(32)), "unknown suite 'ed25519'"),
    ("X25519:" + _b64(bytes(32)), "unknown suite 'X25519'"),
    ("x25519:" + _b64(bytes(33)), "holds 33 bytes; a x25519 public key has 32"),
    ("mlkem768-x25519:" + _b64(bytes(32)), "holds 32 bytes; a mlkem768-x25519 public key has 1216"),
    ("x25519:" + _b64(bytes(32))[:-2] + "B=", "not in canonical base64"),  # nonzero padding bits
    ("mlkem768-x25519:" + _b64(b"\xff" * 1216), "not a valid mlkem768-x25519 key"),
])
def test_a_malformed_public_key_is_refused_with_the_reason(text, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_spool_public_key(text)


def test_a_public_key_compares_by_its_text(public_texts):
    text = public_texts["x25519"]
    assert parse_spool_public_key(text) == parse_spool_public_key(text)
    assert parse_spool_public_key(text) != parse_spool_public_key(public_texts["mlkem768-x25519"])
    assert len({parse_spool_public_key(text), parse_spool_public_key(text)}) == 1
