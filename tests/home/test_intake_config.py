"""intake.toml's max_message_size: the largest sealed file the intake fetches follows it, and a bad value is a
ConfigError that names the key and what to set. Its [edges]: every edge by name, each checked.

The full config is exercised by every test that starts the intake (tests/home_site.py writes it).
"""

import pytest

from relay.home.config import ConfigError, Edge, load
from relay.spool.client import DEFAULT_MAX_MESSAGE_SIZE, max_file_size

MINIMAL = 'identity_key = "/k/identity.key"\nspool_key = "/k/spool.key"\nauthserv_id = "mx.example.org"\n'
ONE_EDGE = '[edges]\nedge = "10.77.0.1:7444"\n'


def intake_toml(tmp_path, extra: str = "", edges: str = ONE_EDGE):
    path = tmp_path / "intake.toml"
    path.write_text(MINIMAL + extra + edges)
    return path


def test_edges_are_kept_in_the_order_written(tmp_path):
    config = load(intake_toml(tmp_path, edges='[edges]\nmx2 = "10.77.0.3:7444"\nedge = "10.77.0.1:7444"\n'))
    assert config.edges == (Edge("mx2", ("10.77.0.3", 7444)), Edge("edge", ("10.77.0.1", 7444)))


@pytest.mark.parametrize(("edges", "expected"), [
    ("", "edges: missing; name every edge"),
    ("[edges]\n", "edges: missing; name every edge"),
    ('[edges]\nEdge = "10.77.0.1:7444"\n', "edges.Edge: an edge's name is a host name label"),
    ('[edges]\n"../x" = "10.77.0.1:7444"\n', "edges.../x: an edge's name is a host name label"),
    ('[edges]\n"" = "10.77.0.1:7444"\n', "an edge's name is a host name label"),
    ('[edges]\n-x = "10.77.0.1:7444"\n', "an edge's name is a host name label"),
    ('[edges]\nedge = "10.77.0.1"\n', "edges.edge: '10.77.0.1' is not HOST:PORT"),
    ('[edges]\nedge = 7444\n', "edges.edge: 7444 is not valid"),
    ('[edges]\na = "10.77.0.1:7444"\nb = "10.77.0.1:7444"\n', "edges: two edges with the same spool service"),
    ("[edges]\n" + "".join(f'e{n} = "10.77.0.{n}:7444"\n' for n in range(17)), "edges: 17 edges; at most 16"),
    ('edges = "10.77.0.1:7444"\n', "edges: must be a table"),
])
def test_bad_edges_name_the_key_and_the_fix(tmp_path, edges, expected):
    with pytest.raises(ConfigError) as refused:
        load(intake_toml(tmp_path, edges=edges))
    assert expected in str(refused.value)


def test_the_old_single_edge_key_says_how_to_write_it_now(tmp_path):
    with pytest.raises(ConfigError) as refused:
        load(intake_toml(tmp_path, 'edge = "10.77.0.1:7444"\n'))
    assert "[edges] edge = '10.77.0.1:7444'" in str(refused.value)


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
