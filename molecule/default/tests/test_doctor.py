"""`yestls doctor` at home against the scenario's public DNS (`internet`'s
dnsmasq, serving what `yestls dns` printed and the provider's PTR), the edge's
STARTTLS and its MTA-STS policy: every check passes or at most warns (the
scenario's DNS has no DNSSEC, DMARC is p=none); then one thing at a time is
broken as a user could get it wrong (a record in the zone, the policy the
edge serves) and exactly the check that looks at it fails, with a fix; then
it is put back.
"""

from __future__ import annotations

import json
import re

import pytest
from scenario import EDGES, acme_root, address, container, site, wait_for

ZONES = "/etc/yestls-dns"  # on `internet` (internet/publish-zone.yml)
CONVERTER = "/usr/local/sbin/yestls-zone-to-dnsmasq"
ROOT_AT_HOME = "/tmp/yestls-acme-root.pem"
EDGE_TOML = "/etc/yestls/edge.toml"
MX = site()["site_mx_name"]
DOMAIN = site()["site_domains"][0]
SELECTOR = f"{site()['site_dkim_selector']}-ed25519"
RECORD = re.compile(r"^(?P<name>\S+)\s+(?:\d+\s+)?(?:IN\s+)?(?P<type>[A-Z][A-Z0-9]*)\s+(?P<data>.+)$")
# every check that compares a published value with the site's; the others may warn here
MUST_PASS = {"MX", "A", "PTR", "SPF", "SPF (HELO)", "DKIM", "MTA-STS", "MTA-STS policy", "TLS-RPT", "TLSA",
             "certificate"}


def doctor() -> tuple[int, list[dict]]:
    result = container("home").run(
        f"/usr/local/bin/yestls doctor --json --nameserver {address('internet')} --ca-file {ROOT_AT_HOME}")
    assert result.rc in (0, 1), result.stderr
    return result.rc, json.loads(result.stdout)


def failures(results: list[dict]) -> set[tuple[str, str]]:
    return {(r["check"], r["subject"]) for r in results if r["verdict"] == "fail"}


def publish(zones: dict[str, str]) -> None:
    internet = container("internet")
    for name, text in zones.items():
        internet.check_output(f"printf %s {quote(text)} > {ZONES}/{name}")
    internet.check_output(f"{CONVERTER} {ZONES}/provider.zone {ZONES}/site.zone > /etc/dnsmasq.d/yestls-site.conf")
    # each test restarts it twice: past systemd's start rate limit
    internet.check_output("systemctl reset-failed dnsmasq; systemctl restart dnsmasq")


def quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def edit(text: str, name: str, rdtype: str, change) -> str:
    """The zone with each record of that name and type passed through change(data) (None drops it)."""
    lines, hits = [], 0
    for line in text.splitlines():
        match = RECORD.match(line)
        if match and match["name"] == name and match["type"] == rdtype:
            data = change(match["data"])
            hits += data != match["data"]
            if data is not None:
                lines.append(f"{name} IN {rdtype} {data}")
            continue
        lines.append(line)
    assert hits, f"no {rdtype} record of {name} to change"
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def published():
    """The zones as converge.yml published them; put back after each test that changes them."""
    internet = container("internet")
    zones = {name: internet.file(f"{ZONES}/{name}").content_string for name in ("provider.zone", "site.zone")}
    container("home").check_output(f"printf %s {quote(open(acme_root()).read())} > {ROOT_AT_HOME}")
    yield zones
    publish(zones)


def test_every_check_passes_as_deployed(published):
    rc, results = doctor()
    assert failures(results) == set(), [r for r in results if r["verdict"] == "fail"]   # with the doctor's why
    assert rc == 0
    for check in MUST_PASS:
        verdicts = {r["verdict"] for r in results if r["check"] == check}
        assert verdicts == {"pass"}, [r for r in results if r["check"] == check]


def edge_ptr(zone: str) -> str:
    """The name of the PTR record in the provider's zone (the edge's reverse name)."""
    return next(m["name"] for m in map(RECORD.match, zone.splitlines()) if m and m["type"] == "PTR")


BREAKS = {
    "a PTR that is not the HELO name": (
        "provider.zone", lambda zone: edit(zone, edge_ptr(zone), "PTR", lambda data: "elsewhere.example.net."),
        lambda: {("PTR", address("edge"))}),
    "SPF without the edge's address": (
        "site.zone", lambda zone: edit(zone, f"{DOMAIN}.", "TXT",
                                       lambda data: '"v=spf1 ip4:192.0.2.1 -all"' if "v=spf1" in data else data),
        lambda: {("SPF", DOMAIN)}),
    "a DKIM record missing": (
        "site.zone", lambda zone: edit(zone, f"{SELECTOR}._domainkey.{DOMAIN}.", "TXT", lambda data: None),
        lambda: {("DKIM", f"{SELECTOR} ({DOMAIN})")}),
    "TLSA for another key": (
        "site.zone", lambda zone: edit(zone, f"_25._tcp.{MX}.", "TLSA", lambda data: "3 1 1 " + "00" * 32),
        lambda: {("TLSA", MX)}),
}


@pytest.mark.parametrize("broken", BREAKS)
def test_a_broken_record_fails_exactly_its_check_with_a_fix(published, broken):
    zone, change, expected = BREAKS[broken]
    publish({zone: change(published[zone])})
    try:
        rc, results = doctor()
        assert rc == 1
        assert failures(results) == expected()
        assert all(r["fix"] for r in results if r["verdict"] == "fail")
    finally:
        publish(published)


def test_a_policy_whose_mx_is_not_the_dns_mx_fails_the_policy_check_only(published):
    """The edges made to serve a policy naming another MX (edges deployed
    with other settings than home's): the policy check of each domain fails;
    the _mta-sts id (from site.toml) and the MX records still pass. Done at
    every edge (mta-sts.<domain> points at each): in DNS the MX check would
    fail with it."""
    originals = {edge: container(edge).file(EDGE_TOML).content_string for edge in EDGES}
    policy_mx = "mx.elsewhere.example"
    for edge, original in originals.items():
        assert re.search(r"^mx = ", original, re.M), f"{edge}: edge.toml's [mta_sts] names no mx"  # the role's
        container(edge).check_output(f"sed -i 's/^mx = .*$/mx = [\"{policy_mx}\"]/' {EDGE_TOML}")
        container(edge).check_output("systemctl restart yestls-edge")
    try:
        assert wait_for(lambda: policy_mx in container("internet").run(
            f"mta-sts-query {DOMAIN}").stdout, timeout=60, interval=2)
        rc, results = doctor()
        assert rc == 1
        assert failures(results) == {("MTA-STS policy", f"mta-sts.{d}") for d in site()["site_domains"]}
    finally:
        for edge, original in originals.items():
            container(edge).check_output(f"printf %s {quote(original)} > {EDGE_TOML}")
            container(edge).check_output("systemctl restart yestls-edge")
        assert wait_for(lambda: f"'{MX}'" in container("internet").run(f"mta-sts-query {DOMAIN}").stdout,
                        timeout=60, interval=2)
