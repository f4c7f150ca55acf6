"""A paper copy of home's spool key: printed, typed back by a person, it gives the same key file, and every
typo a person makes is refused naming the line it is on (or the checksum), before anything is written."""

import base64
import hashlib
import io
import os
import random
import stat
import sys

import pytest

from relay.cli import main
from relay.keys import cli as keys_cli
from relay.spool.keys import generate_spool_key, load_spool_private_key, parse_spool_public_key, write_spool_key
from relay.spool.paper import PaperError, fingerprint, paper_text, read_paper
from relay.spool.sealed import seal, unseal

SUITES = ["mlkem768-x25519", "x25519"]
LINES = {"mlkem768-x25519": 7, "x25519": 3}
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


class Key:
    """A spool key made by `spool-new`, its file, public line and paper copy."""

    def __init__(self, directory, suite):
        self.path = directory / "spool.key"
        self.public_text = generate_spool_key(self.path, suite)
        self.private = load_spool_private_key(self.path)
        self.paper = paper_text(self.private)


@pytest.fixture(scope="module", params=SUITES)
def key(request, tmp_path_factory):
    return Key(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def other_key(tmp_path_factory):
    """Another home's key, of each suite."""
    return {suite: Key(tmp_path_factory.mktemp("other-" + suite), suite) for suite in SUITES}


def body_lines(paper: str) -> list[str]:
    """The lines a person types: the numbered ones and the checksum."""
    return [line for line in paper.splitlines() if not line.startswith("#")]


def refusal(text: str) -> str:
    with pytest.raises(PaperError) as refused:
        read_paper(text)
    return str(refused.value)


def documented_paper(payload: bytes) -> list[str]:
    """The numbered lines and the checksum line for `payload`, made from the format in relay/spool/paper.py."""
    def b32(data: bytes) -> str:
        return base64.b32encode(data).decode().rstrip("=")

    def line(label: str, chars: str) -> str:
        check = b32(hashlib.sha256(f"{label}:{chars}".encode()).digest()[:2])[:2]
        return f"{label}: {' '.join(chars[i:i + 4] for i in range(0, len(chars), 4))}  {check}".lower()

    chars = b32(payload)
    lines = [line(str(n), chars[i:i + 24]) for n, i in enumerate(range(0, len(chars), 24), 1)]
    return lines + [line("checksum", b32(hashlib.sha256(payload).digest()[:5]))]


# --- round trips ------------------------------------------------------------------------------------------------

def test_typed_back_it_is_the_same_key_file_and_opens_what_was_sealed_to_the_original(key, tmp_path):
    restored = read_paper(key.paper)
    assert restored.suite is key.private.suite and restored.raw == key.private.raw
    assert restored.public_key == parse_spool_public_key(key.public_text)
    write_spool_key(tmp_path / "restored.key", restored)
    assert (tmp_path / "restored.key").read_bytes() == key.path.read_bytes()

    sealed = io.BytesIO()
    seal(sealed, parse_spool_public_key(key.public_text), os.urandom(16), {"note": "sealed before the disk died"},
         [b"Subject: still here\r\n\r\nhello\r\n"])
    opened = unseal(sealed.getvalue(), load_spool_private_key(tmp_path / "restored.key"))
    assert opened.message == b"Subject: still here\r\n\r\nhello\r\n"


def test_the_paper_is_the_documented_format(key):
    header = [line for line in key.paper.splitlines() if line.startswith("#")]
    assert "PRIVATE" in header[0]
    assert f"suite {key.private.suite.name}, public key fingerprint {fingerprint(key.private.public_key)}" in header[1]
    payload = bytes([1, key.private.suite.code]) + key.private.raw
    assert body_lines(key.paper) == documented_paper(payload)
    assert len(body_lines(key.paper)) == LINES[key.private.suite.name] + 1


def test_the_fingerprint_is_what_sha256sum_shows_for_the_public_line(key):
    assert fingerprint(key.private.public_key) == hashlib.sha256(key.public_text.encode()).hexdigest()[:16]


def test_case_spacing_layout_order_and_a_missing_header_do_not_matter(key):
    lines = body_lines(key.paper)
    squeezed = ["".join(line.split(":", 1)[1].split()) for line in lines]
    labels = [line.split(":", 1)[0] for line in lines]
    variants = [
        key.paper.upper(),
        "\r\n".join(lines) + "\r\n",
        "\n\n".join(f"  \t{label} :  {body.upper()}   " for label, body in zip(labels, squeezed)),
        "\n".join(f"{label}:{' '.join(body)}" for label, body in zip(labels, squeezed)),
        "\n".join(reversed(lines)),
        "my own note about where this paper was kept\n" + "\n".join(lines),
    ]
    for text in variants:
        assert read_paper(text).raw == key.private.raw, text


# --- every typo a person makes ----------------------------------------------------------------------------------

def typed(key: Key) -> list[tuple[str, str]]:
    """Each typed line as (label, its characters without spaces)."""
    return [(line.split(":", 1)[0], "".join(line.split(":", 1)[1].split())) for line in body_lines(key.paper)]


def with_line(key: Key, index: int, body: str) -> str:
    lines = typed(key)
    lines[index] = (lines[index][0], body)
    return "\n".join(f"{label}: {chars}" for label, chars in lines)


def names_the_line_or_checksum(message: str, label: str) -> bool:
    where = "checksum line" if label == "checksum" else f"line {label}:"
    return message.startswith(where) or message.startswith("checksum does not match")


def test_every_substituted_character_is_found(key):
    for index, (label, body) in enumerate(typed(key)):
        for position, char in enumerate(body):
            for other in ALPHABET:
                if other != char:
                    text = with_line(key, index, body[:position] + other + body[position + 1:])
                    assert names_the_line_or_checksum(refusal(text), label), (label, position, other)


def test_every_swap_of_adjacent_characters_is_found(key):
    for index, (label, body) in enumerate(typed(key)):
        for position in range(len(body) - 1):
            a, b = body[position], body[position + 1]
            if a != b:
                text = with_line(key, index, body[:position] + b + a + body[position + 2:])
                assert names_the_line_or_checksum(refusal(text), label), (label, position)


def test_every_dropped_character_is_found(key):
    for index, (label, body) in enumerate(typed(key)):
        for position in range(len(body)):
            text = with_line(key, index, body[:position] + body[position + 1:])
            assert names_the_line_or_checksum(refusal(text), label), (label, position)


def test_every_extra_character_is_found(key):
    chooser = random.Random(7)
    for index, (label, body) in enumerate(typed(key)):
        for position in range(len(body) + 1):
            for extra in chooser.sample(ALPHABET, 4):
                text = with_line(key, index, body[:position] + extra + body[position:])
                assert names_the_line_or_checksum(refusal(text), label), (label, position, extra)


def test_a_digit_that_looks_like_a_letter_is_named_with_its_likely_letter(key):
    label, body = typed(key)[1]
    message = refusal(with_line(key, 1, "0" + body[1:]))
    assert message.startswith(f"line {label}: '0' not in base32") and "0 is probably o" in message


def test_a_dropped_line_is_named(key):
    lines = body_lines(key.paper)
    for index in range(len(lines)):
        message = refusal("\n".join(lines[:index] + lines[index + 1:]))
        if index == 0:
            assert message == "line 1 is missing (it names the key's suite)"
        elif index == len(lines) - 1:
            assert message.startswith("the checksum line is missing")
        else:
            assert message == f"line {index + 1} is missing"


def test_a_line_typed_under_another_number_is_found_on_both_lines(key):
    lines = typed(key)
    lines[1], lines[2] = (lines[1][0], lines[2][1]), (lines[2][0], lines[1][1])
    message = refusal("\n".join(f"{label}: {chars}" for label, chars in lines))
    assert message.startswith("line 2: check does not match") and "line 3: check does not match" in message


def test_a_line_typed_twice_is_named(key):
    lines = body_lines(key.paper)
    assert refusal("\n".join(lines + [lines[1]])) == "line 2 is given twice"


def test_a_line_without_its_colon_is_named(key):
    lines = body_lines(key.paper)
    lines[1] = lines[1].replace(":", "", 1)
    assert "a key line starts with its number and a colon" in refusal("\n".join(lines))


def test_a_line_from_another_keys_paper_fails_the_checksum(key, other_key):
    other = body_lines(other_key[key.private.suite.name].paper)
    for index in range(LINES[key.private.suite.name]):
        lines = body_lines(key.paper)
        lines[index] = other[index]
        assert refusal("\n".join(lines)).startswith("checksum does not match"), index


def test_a_line_from_a_paper_of_the_other_suite_is_named(key, other_key):
    other_suite = next(s for s in SUITES if s != key.private.suite.name)
    last = LINES["x25519"]   # the x25519 paper's short last line, or a full one in its place
    lines = body_lines(key.paper)
    lines[last - 1] = body_lines(other_key[other_suite].paper)[last - 1]
    assert refusal("\n".join(lines)).startswith(f"line {last}: ")


@pytest.mark.parametrize("version, code, complaint", [
    (2, 1, "line 1: paper copy format 2 is unknown; this yestls reads format 1"),
    (0, 2, "line 1: paper copy format 0 is unknown"),
    (1, 3, "line 1: suite code 3 is unknown (known: 1 mlkem768-x25519, 2 x25519)"),
    (1, 0, "line 1: suite code 0 is unknown"),
])
def test_an_unknown_format_or_suite_byte_is_refused(key, version, code, complaint):
    text = "\n".join(documented_paper(bytes([version, code]) + key.private.raw))
    assert refusal(text).startswith(complaint)


def test_text_that_is_no_paper_is_refused():
    assert refusal("").startswith("no key lines found")
    assert refusal("dear diary\n").startswith("no key lines found")


# --- the commands ----------------------------------------------------------------------------------------------

@pytest.fixture
def no_intake_config(tmp_path, monkeypatch):
    monkeypatch.setattr(keys_cli, "INTAKE_CONFIG_DIRECTORY", tmp_path / "etc")


def typing(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


@pytest.mark.parametrize("suite", SUITES)
def test_export_then_import_through_the_command(tmp_path, capsys, monkeypatch, no_intake_config, suite):
    assert main(["keys", "spool-new", "--suite", suite, "--out", str(tmp_path / "spool.key")]) == 0
    public_line = capsys.readouterr().out
    assert main(["keys", "export-spool", "--paper", "--key", str(tmp_path / "spool.key")]) == 0
    paper, warning = capsys.readouterr()
    assert "PRIVATE key" in warning and paper.startswith("# YesTLS home spool PRIVATE key")

    typing(monkeypatch, paper)
    assert main(["keys", "import-spool", "--out", str(tmp_path / "restored.key")]) == 0
    out, err = capsys.readouterr()
    assert out == public_line   # as spool-new printed it, for the edge's [spool] public_key
    assert str(tmp_path / "restored.key") in err and fingerprint(parse_spool_public_key(out)) in err
    assert (tmp_path / "restored.key").read_bytes() == (tmp_path / "spool.key").read_bytes()
    assert stat.S_IMODE(os.stat(tmp_path / "restored.key").st_mode) == 0o600


def test_import_never_overwrites_a_key(tmp_path, capsys, monkeypatch, key, no_intake_config):
    existing = tmp_path / "spool.key"
    generate_spool_key(existing)
    before = existing.read_bytes()
    typing(monkeypatch, key.paper)
    assert main(["keys", "import-spool", "--out", str(existing)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"yestls keys import-spool: spool key {existing} already exists: refusing to replace it")
    assert existing.read_bytes() == before


def test_import_of_a_typo_names_the_line_and_writes_nothing(tmp_path, capsys, monkeypatch, key, no_intake_config):
    lines = key.paper.splitlines()
    line3 = next(i for i, line in enumerate(lines) if line.startswith("3: "))
    lines[line3] = lines[line3][:5] + ("a" if lines[line3][5] != "a" else "b") + lines[line3][6:]
    typing(monkeypatch, "\n".join(lines))
    assert main(["keys", "import-spool", "--out", str(tmp_path / "spool.key")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("yestls keys import-spool: line 3: ") and err.count("\n") == 1
    assert not (tmp_path / "spool.key").exists()


def test_without_the_option_or_an_intake_config_the_commands_say_what_to_pass(tmp_path, capsys, monkeypatch,
                                                                             no_intake_config):
    assert main(["keys", "export-spool", "--paper"]) == 2
    assert "no --key FILE given" in capsys.readouterr().err
    typing(monkeypatch, "")
    assert main(["keys", "import-spool"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yestls keys import-spool: no --out FILE given and no ") and "pass --out FILE" in err


def test_the_key_path_defaults_to_the_intake_configs_spool_key(tmp_path, capsys, monkeypatch):
    etc = tmp_path / "etc"
    etc.mkdir()
    monkeypatch.setattr(keys_cli, "INTAKE_CONFIG_DIRECTORY", etc)
    spool_key = tmp_path / "spool.key"
    (etc / "intake.toml").write_text(f'identity_key = "{tmp_path / "identity.key"}"\n'
                                     f'spool_key = "{spool_key}"\nauthserv_id = "mx.example.org"\n'
                                     '[edges]\nedge = "10.77.0.1:7444"\n')
    public_line = generate_spool_key(tmp_path / "original.key", "x25519")
    typing(monkeypatch, paper_text(load_spool_private_key(tmp_path / "original.key")))
    assert main(["keys", "import-spool"]) == 0
    assert capsys.readouterr().out == public_line + "\n"
    assert spool_key.read_bytes() == (tmp_path / "original.key").read_bytes()
    assert main(["keys", "export-spool", "--paper"]) == 0
    assert capsys.readouterr().out == paper_text(load_spool_private_key(spool_key))


def test_a_broken_intake_config_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(keys_cli, "INTAKE_CONFIG_DIRECTORY", tmp_path)
    (tmp_path / "intake.toml").write_text('[edges]\nedge = "10.77.0.1:7444"\n')
    assert main(["keys", "export-spool", "--paper"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "intake.toml") in err and "fix it, or pass --key FILE" in err


def test_export_needs_paper_and_an_existing_key(tmp_path, capsys, no_intake_config):
    with pytest.raises(SystemExit) as exited:
        main(["keys", "export-spool", "--key", str(tmp_path / "spool.key")])
    assert exited.value.code == 2 and "--paper" in capsys.readouterr().err
    assert main(["keys", "export-spool", "--paper", "--key", str(tmp_path / "spool.key")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "does not exist" in err
