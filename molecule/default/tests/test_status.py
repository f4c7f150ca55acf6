"""`yestls status` on each host of the deployment: every part the operator
needs, read from the running services (relay/status.py)."""

from __future__ import annotations

import json

import pytest
from scenario import EDGES, container, mx_name_of, site, tunnel_address_of, wait_for


def status(name: str) -> dict:
    return json.loads(container(name).check_output("yestls status --json"))


def rows_of(section: dict, prefix: str) -> list:
    return [value for item, value in section.items() if item.startswith(prefix)]


@pytest.mark.parametrize("name", [*EDGES, "home"])
def test_status_shows_a_recent_tunnel_handshake(name):
    peers = rows_of(status(name)["tunnel"], "wg0 peer ")
    assert len(peers) == (len(EDGES) if name == "home" else 1), peers   # home: one per edge
    for peer in peers:
        assert peer["age_seconds"] is not None and peer["age_seconds"] < 180, peer


def test_status_on_the_edge_shows_oracle_policy_spool_and_certificate():
    edge = status("edge")
    assert edge["oracle"]["reachable"] is True
    (ping,) = rows_of(edge["oracle"], "ping ")
    assert ping["reachable"] is True and ping["rtt_ms"] > 0
    assert edge["policy"]["oracle down"]["policy"] == site()["site_oracle_down"]
    assert edge["policy"]["in force now"] == "normal"
    assert isinstance(edge["spool"]["depth"], int)
    # every module leaves the deployment as converge made it: the intake has drained the edge's spool
    assert wait_for(lambda: status("edge")["spool"]["depth"] == 0, timeout=60), status("edge")["spool"]
    assert isinstance(edge["spool"]["oldest"], (int, float))
    # one chain, for the MX name and mta-sts.<domain>; the edge names its row by one of its names
    names = [mx_name_of(e) for e in EDGES] + [f"mta-sts.{domain}" for domain in site()["site_domains"]]
    (served,) = [edge["certificates"][f"served {name}"] for name in names if f"served {name}" in edge["certificates"]]
    assert served["days_left"] > 0


def test_status_at_home_shows_oracle_intake_and_certificate_expiry():
    home = status("home")
    assert home["oracle"]["service"]["up"] is True
    assert isinstance(home["intake"]["progress"]["delivered"], int)
    assert list(home["edges"]) == list(EDGES)   # every edge, by its inventory name, the primary first
    for name, edge in home["edges"].items():
        assert edge["connected"] is True and edge["last_contact"] is not None, edge
        assert edge["spool"] == f"{tunnel_address_of(name)}:7444"
    (certificate,) = [v for v in home["certificates"].values() if isinstance(v, dict) and "names" in v]
    assert site()["site_mx_name"] in certificate["names"]
    assert certificate["days_left"] > 0


@pytest.mark.parametrize("name", ["edge", "home"])
def test_status_table_is_readable_text(name):
    table = container(name).check_output("yestls status")
    assert table.startswith("YesTLS status of ")
    for section in ("tunnel", "oracle", "policy", "spool", "intake", "certificates"):
        assert f"\n{section}" in table, table
