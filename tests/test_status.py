"""Issue 7 item 4: `yestls status` shows what the running services report, and says why where it cannot.

Against a running site (oracle, edge, Dovecot, intake; tests/intake_mail.py):
mail queued on the edge shows as its spool depth; after the intake has
delivered it, the intake's counts and the empty spool show; the oracle is up
in the edge's view and answers a ping; the certificate's expiry is the test
PKI leaf's. Then the same command with configs that are missing or point at
endpoints nobody serves prints "unknown (why)" for each part and still
exits 0. The tunnel row is read from `wg show all latest-handshakes`; a
stand-in `wg` on PATH gives it known handshakes.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.status import collect, default_config

from .edge_site import make_edge_site
from .home_site import EDGE
from .intake_mail import SENDER, USER, mail_world, message, wait_for
from .oracle_home import free_port

PEER_SEEN = "Z2FtbWFnYW1tYWdhbW1hZ2FtbWFnYW1tYWdhbW1hZ2E="
PEER_NEVER = "ZGVsdGFkZWx0YWRlbHRhZGVsdGFkZWx0YWRlbHRhZGU="


@pytest.fixture(scope="module")
def world(tmp_path_factory, pki):
    """A site whose oracle also serves its Prometheus metrics."""
    directory = tmp_path_factory.mktemp("status")
    site = make_edge_site(directory / "site", pki)
    site.oracle.config.write_text(f'metrics_listen = "127.0.0.1:{free_port()}"\n' + site.oracle.config.read_text())
    with mail_world(directory, pki, site=site) as world:
        yield world


@pytest.fixture
def fake_wg(tmp_path):
    """A directory holding a `wg` that prints two peers' latest handshakes: one 42 s ago, one never."""
    directory = tmp_path / "fake-bin"
    directory.mkdir()
    seen = int(time.time()) - 42
    script = directory / "wg"
    script.write_text("#!/bin/sh\n"
                      '[ "$*" = "show all latest-handshakes" ] || { echo "unexpected: $*" >&2; exit 1; }\n'
                      f"printf 'wg0\\t{PEER_SEEN}\\t{seen}\\nwg0\\t{PEER_NEVER}\\t0\\n'\n")
    script.chmod(0o755)
    return directory, seen


def status(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    result = subprocess.run([sys.executable, "-m", "relay.cli", "status", *args], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    return result


def status_json(*args: str, path: str | None = None) -> dict:
    return json.loads(status(*args, "--json", path=path).stdout)


def table_line(table: str, item: str) -> str:
    """The table's line for `item` (the ITEM column)."""
    lines = [line for line in table.splitlines() if re.match(rf"^\S*\s+{re.escape(item)}\s{{2,}}", line)]
    assert len(lines) == 1, f"expected one line for {item!r} in:\n{table}"
    return lines[0]


def configs(world) -> tuple[str, ...]:
    return ("--edge-config", str(world.site.config), "--oracle-config", str(world.site.oracle.config),
            "--intake-config", str(world.intake.config))


def intake_status(world) -> dict:
    try:
        return json.loads(world.intake.status_file.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def test_status_shows_what_the_running_site_reports(world, pki, fake_wg):
    fake_bin, seen = fake_wg
    path = f"{fake_bin}:{os.environ['PATH']}"
    expiry = pki.leaves["ecdsa-p256"].cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    certificate_item = "ecdsa-p256 localhost, mx.example.org"

    # Two messages wait on the edge; home has not pulled yet.
    started = time.time()
    for number in range(2):
        world.send(SENDER, [USER], message(f"status {number}"))
    before = status_json(*configs(world), path=path)
    assert before["spool"]["depth"] == 2
    assert 0 <= before["spool"]["oldest"] <= time.time() - started   # an age in seconds, not a timestamp
    assert before["oracle"]["reachable"] is True
    (ping,) = [value for item, value in before["oracle"].items() if item.startswith("ping ")]
    assert ping["reachable"] is True and ping["rtt_ms"] > 0
    assert before["policy"]["oracle down"] == {"policy": "tempfail", "source": "edge metrics"}
    assert before["policy"]["in force now"] == "normal"
    assert before["oracle"]["service"]["up"] is True
    assert before["oracle"]["requests"]["sign ok"] >= 2   # one full handshake per message sent
    assert before["oracle"]["requests"]["certificates ok"] >= 1   # the edge fetched its chains
    assert before["oracle"]["sign time"]["signatures"] >= 2
    assert before["certificates"][certificate_item]["not_after"] == expiry
    assert before["certificates"][certificate_item]["days_left"] > 0
    # the edge reports the chain it serves, from what the oracle gave it
    assert before["certificates"]["served localhost"]["not_after"] == expiry
    assert before["certificates"]["served localhost"]["source"] == "edge metrics"
    assert "no status file" in before["intake"]["progress"]["unknown"]
    assert before["tunnel"][f"wg0 peer {PEER_SEEN[:10]}..."]["latest_handshake"] == time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(seen))
    assert before["tunnel"][f"wg0 peer {PEER_NEVER[:10]}..."]["latest_handshake"] is None

    with world.intake_running() as intake:
        world.wait_for_mailbox(USER, 2, intake)
        world.wait_for_empty_spool(intake)
        wait_for(lambda: intake_status(world).get("delivered", 0) >= 2, "the intake's status file to count the deliveries",
                 details=lambda: world.logs(intake))
        after = status_json(*configs(world), path=path)
        table = status(*configs(world), path=path).stdout
        # The intake asks the edge for its depth before a batch, so the depth it recorded then still counts
        # the two; its next contact (after the long-poll, `poll` = 5 s here) brings the new one.
        wait_for(lambda: intake_status(world).get("edges", {}).get(EDGE, {}).get("depth") == 0, "the intake's next contact with the edge",
                 details=lambda: world.logs(intake))
        home_only = status_json("--intake-config", str(world.intake.config), path=path)

    assert after["spool"]["depth"] == 0
    progress = after["intake"]["progress"]
    assert progress["pulled"] == 2 and progress["delivered"] == 2
    assert progress["failed"] == 0 and progress["quarantined"] == 0
    assert after["intake"]["ledger"] == {"done": 2}
    assert "unknown" not in json.dumps(after["intake"])

    assert re.search(r"\b0 message\(s\) waiting for home", table_line(table, "depth"))
    assert "delivered 2" in table_line(table, "progress")
    assert re.search(r"^edges\s+edge\s+connected; last contact \d+ s ago; ", table_line(table, EDGE))
    assert f"expires {expiry}" in table_line(table, certificate_item)
    assert "up:" in table_line(table, "reachable")
    assert "tempfail" in table_line(table, "oracle down")
    assert "last handshake 4" in table_line(table, f"wg0 peer {PEER_SEEN[:10]}...")   # 42-49 s ago
    assert "no handshake yet" in table_line(table, f"wg0 peer {PEER_NEVER[:10]}...")

    # At home without the edge's config: the spool as the edge last told the intake.
    seen = home_only["edges"][EDGE]
    assert seen["depth"] == 0 and seen["connected"] is True and seen["spool"] == after["edges"][EDGE]["spool"]
    assert "`edges` shows each edge's spool" in home_only["spool"]["depth"]["unknown"]
    assert home_only["intake"]["progress"]["delivered"] == 2
    assert "no edge.toml" in home_only["policy"]["oracle down"]["unknown"]

    # An hour on, with the intake stopped: the status file is said to be stale.
    later = collect(None, None, world.intake.config, now=time.time() + 3600)
    (written,) = [row for row in later.rows if row.item == "status written"]
    assert "not rewritten for 60 min" in written.text


def test_missing_configs_and_dead_endpoints_degrade_to_unknown(world, tmp_path):
    # Configs that name endpoints nobody serves and files that are not there.
    dead_metrics, dead_oracle = free_port(), free_port()
    edge = world.site.config.read_text()
    edge = re.sub(r'(?m)^metrics_listen = ".*"$', f'metrics_listen = "127.0.0.1:{dead_metrics}"', edge)
    edge = re.sub(r'(?m)^servers = \[.*\]$', f'servers = ["127.0.0.1:{dead_oracle}"]', edge)
    (tmp_path / "edge.toml").write_text(edge)
    oracle = world.site.oracle.config.read_text()
    oracle = re.sub(r'(?m)^metrics_listen = ".*"\n', "", oracle)
    oracle = re.sub(r'(?m)^keystore = ".*"$', f'keystore = "{tmp_path / "no-keystore"}"', oracle)
    (tmp_path / "oracle.toml").write_text(oracle)
    intake = world.intake.config.read_text()
    intake = re.sub(r'(?m)^status_file = ".*"$', f'status_file = "{tmp_path / "no-status.json"}"', intake)
    (tmp_path / "intake.toml").write_text(intake)
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    args = ("--edge-config", str(tmp_path / "edge.toml"), "--oracle-config", str(tmp_path / "oracle.toml"),
            "--intake-config", str(tmp_path / "intake.toml"))

    got = status_json(*args, path=str(empty_bin))
    assert got["tunnel"]["last handshake"] == {"unknown": "wg is not installed"}
    assert "connection refused" in got["oracle"]["reachable"]["unknown"]
    assert str(dead_metrics) in got["oracle"]["reachable"]["unknown"]
    assert got["oracle"][f"ping 127.0.0.1:{dead_oracle}"]["reachable"] is False
    assert got["policy"]["oracle down"]["source"] == "edge.toml"   # the configured policy, said to be so
    assert "connection refused" in got["spool"]["depth"]["unknown"]
    assert got["oracle"]["service"] == {"unknown": "oracle.toml sets no metrics_listen"}
    assert "no-keystore" in got["certificates"]["expiry"]["unknown"]
    assert "the intake has not run" in got["intake"]["progress"]["unknown"]

    table = status(*args, path=str(empty_bin)).stdout
    for item in ("last handshake", "reachable", "depth", "service", "expiry", "progress"):
        assert "unknown (" in table_line(table, item), table
    assert "UNREACHABLE" in table_line(table, f"ping 127.0.0.1:{dead_oracle}")

    # No configs at all: every part unknown, each saying which file is missing.
    missing = [str(tmp_path / "absent" / f"{name}.toml") for name in ("edge", "oracle", "intake")]
    got = status_json("--edge-config", missing[0], "--oracle-config", missing[1], "--intake-config", missing[2],
                      path=str(empty_bin))
    assert missing[0] in got["policy"]["oracle down"]["unknown"]
    assert missing[1] in got["certificates"]["expiry"]["unknown"]
    assert missing[2] in got["intake"]["progress"]["unknown"]
    for section in ("tunnel", "oracle", "policy", "spool", "intake", "certificates"):
        assert got[section] and all("unknown" in value for value in got[section].values()), (section, got[section])


def test_default_configs_are_the_ones_present(tmp_path):
    (tmp_path / "edge.toml").write_text("")
    assert default_config("edge", tmp_path) == tmp_path / "edge.toml"
    assert default_config("intake", tmp_path) is None


def test_a_second_site_without_metrics_or_status_is_unknown_not_an_error(tmp_path, pki):
    """An edge.toml with no metrics_listen (it is optional): the parts that need it say so."""
    site = make_edge_site(tmp_path / "site", pki)
    edge = re.sub(r'(?m)^metrics_listen = ".*"\n', "", site.config.read_text())
    path = Path(tmp_path / "edge.toml")
    path.write_text(edge)
    got = status_json("--edge-config", str(path), "--oracle-config", str(tmp_path / "none.toml"),
                      "--intake-config", str(tmp_path / "none.toml"))
    assert got["oracle"]["reachable"] == {"unknown": "edge.toml sets no metrics_listen"}
    assert got["spool"]["depth"] == {"unknown": "edge.toml sets no metrics_listen"}
    assert got["oracle"][f"ping 127.0.0.1:{site.oracle.port}"]["reachable"] is False   # no oracle running
