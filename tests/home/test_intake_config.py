"""intake.toml's max_message_size: the largest sealed file the intake fetches follows it, and a bad value is a
ConfigError that names the key and what to set.

The full config is exercised by every test that starts the intake (tests/home_site.py writes it).
"""

import pytest

from relay.home.config import ConfigError, load
from relay.spool.client import DEFAULT_MAX_MESSAGE_SIZE, max_file_size

MINIMAL = ('edge = "10.77.0.1:7444"\nidentity_key = "/k/identity.key"\nspool_key = "/k/spool.key"\n'
           'authserv_id = "mx.example.org"\n')


def intake_toml(tmp_path, extra: str = ""):
    path = tmp_path / "intake.toml"
    path.write_text(MINIMAL + extra)
    return path


def test_the_default_is_the_edges_default(tmp_path):
    config = load(intake_toml(tmp_path))
    assert config.max_message_size == DEFAULT_MAX_MESSAGE_SIZE == 26214400
    assert config.max_sealed_size == max_file_size(DEFAULT_MAX_MESSAGE_SIZE)


def test_a_larger_edge_limit_raises_the_cap(tmp_path):
    config = load(intake_toml(tmp_path, "max_message_size = 52428800\n"))
    assert config.max_sealed_size == max_file_size(52428800) > max_file_size(DEFAULT_MAX_MESSAGE_SIZE) + 26214400


@pytest.mark.parametrize("value", ['"25M"', "0", "1023", str(2 ** 31), "true", "2.5e7"])
def test_a_bad_max_message_size_names_the_key_and_the_fix(tmp_path, value):
    with pytest.raises(ConfigError) as refused:
        load(intake_toml(tmp_path, f"max_message_size = {value}\n"))
    message = str(refused.value)
    assert "max_message_size" in message and "at least the edge's [smtp] max_message_size" in message
