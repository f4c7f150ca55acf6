"""The edge's door ([door] in edge.toml, relay/edge/door.py): what a client is refused before any content.

A real edge process asks a local DNS zone (tests/dns_zone.py) holding
127.0.0.x-style DNSBL and DNSWL entries; test clients connect from other
loopback addresses (127.0.0.2, ...) to be other clients. Every read has a
deadline; nothing asserts how long anything took.
"""

import asyncio
import subprocess
import time

import pytest
from prometheus_client import CollectorRegistry

from relay.config import ConfigError
from relay.edge import config as edge_config
from relay.edge.door import MAX_SITES, Door, DoorSettings, parse_site, query_name
from relay.status import edge_rows

from ..dns_zone import serve_zone_text
from ..edge_site import make_edge_site
from ..edge_smtp import CLIENT_NAME, SmtpClient, queued_id, running_edge, wait_until

MESSAGE = b"From: <a@sender.example.net>\r\nTo: <user@example.org>\r\nSubject: door\r\n\r\nhello\r\n"

# Client addresses (each a loopback address the tests connect from) and what the zone says of them.
LISTED = "127.0.0.2"            # bl.test (weight 3): refused
SUMMED = "127.0.0.3"            # two.test (2) + one.test (1) = 3: refused, two.test named
OFFSET = "127.0.0.4"            # bl.test (3) + wl.test (-2) = 1: passes
WRONG_CODE = "127.0.0.5"        # bl.test answers 127.255.255.254 (Spamhaus' "public resolver" code): passes
FAILING = "127.0.0.7"           # slow.test (3) silent, fail.test (3) SERVFAIL: fails open
HUGE_TXT = "127.0.0.8"          # a huge TXT and no A at bl.test: passes
UNLISTED = "127.0.0.1"

ZONE = """$TTL 60
2.0.0.127.bl.test. IN A 127.0.0.2
2.0.0.127.bl.test. IN TXT "listed"
3.0.0.127.two.test. IN A 127.0.0.2
3.0.0.127.one.test. IN A 127.0.0.9
4.0.0.127.bl.test. IN A 127.0.0.4
4.0.0.127.wl.test. IN A 127.0.10.2
5.0.0.127.bl.test. IN A 127.255.255.254
7.0.0.127.slow.test. IN A 127.0.0.2
7.0.0.127.fail.test. IN A 127.0.0.2
8.0.0.127.bl.test. IN TXT "{huge}"
spf-fail.test. IN TXT "v=spf1 -all"
spf-pass.test. IN TXT "v=spf1 ip4:127.0.0.0/8 -all"
""".replace("{huge}", "x" * 200)   # one string; many of them below

SITES = ('"bl.test=127.0.0.[2..11]*3", "two.test*2", "one.test=127.0.0.[2;9]*1", '
         '"wl.test=127.0.[0..255].[1..3]*-2", "slow.test*3", "fail.test*3"')


def door_section(port: int, extra: str = "") -> str:
    return (f"[door]\ndnsbl_sites = [{SITES}]\ndnsbl_threshold = 3\ndnsbl_timeout = 1\n"
            f'resolver = "127.0.0.1:{port}"\nspf = true\npipelining = true\n{extra}\n')


def zone_with_huge_txt():
    text = ZONE.replace('8.0.0.127.bl.test. IN TXT "' + "x" * 200 + '"',
                        "8.0.0.127.bl.test. IN TXT " + " ".join(['"' + "x" * 250 + '"'] * 200))
    return serve_zone_text(text)


@pytest.fixture(scope="module")
def dns():
    with zone_with_huge_txt() as served:
        served.silent.add("7.0.0.127.slow.test")
        served.servfail.add("7.0.0.127.fail.test")
        yield served


@pytest.fixture(scope="module")
def edge(dns, pki, tmp_path_factory):
    with running_edge(tmp_path_factory.mktemp("door"), pki, top_options=door_section(dns.port)) as running:
        yield running


def session(edge, source: str) -> SmtpClient:
    client = SmtpClient.connect(edge.site.smtp_port, source=source)
    client.ehlo()
    return client


def rcpt_reply(edge, source: str):
    with session(edge, source) as client:
        client.expect("MAIL FROM:<a@sender.example.net>", 250)
        return client.command("RCPT TO:<user@example.org>")


def door_count(edge, reason: str) -> float:
    return edge.metric("yestls_edge_door_refused_total", reason=reason)


# --- DNSBL and DNSWL scores ---------------------------------------------------------------------

def test_a_listed_client_is_refused_at_rcpt_with_the_list_named(edge):
    before = door_count(edge, "dnsbl")
    reply = rcpt_reply(edge, LISTED)
    assert reply.code == 550 and reply.enhanced == "5.7.1", reply
    assert f"client [{LISTED}] blocked using bl.test" in reply.text
    assert door_count(edge, "dnsbl") == before + 1


def test_an_unlisted_client_delivers_and_its_spf_result_is_sealed(edge):
    with session(edge, UNLISTED) as client:
        spool_id = queued_id(client.deliver("a@spf-pass.test", ["user@example.org"], MESSAGE))
    assert edge.unseal(spool_id).metadata["spf"] == {"result": "pass", "domain": "spf-pass.test"}


def test_swaks_over_verified_starttls_sees_the_refusal_at_rcpt(edge, pki):
    swaks = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(edge.site.smtp_port), "--local-interface", LISTED,
         "--ehlo", CLIENT_NAME, "--from", "a@spf-pass.test", "--to", "user@example.org", "--tls", "--tls-verify",
         "--tls-ca-path", str(pki.ca_pem), "--tls-sni", "mx.example.org"],
        capture_output=True, timeout=60,
    )
    output = swaks.stdout.decode(errors="replace") + swaks.stderr.decode(errors="replace")
    assert swaks.returncode != 0, output
    assert f"<~* 550 5.7.1 Service unavailable; client [{LISTED}] blocked using bl.test" in output, output


def test_weights_sum_across_lists_and_the_heaviest_is_named(edge):
    reply = rcpt_reply(edge, SUMMED)
    assert reply.code == 550 and "blocked using two.test" in reply.text, reply


def test_an_allowlist_weight_offsets_a_listing(edge):
    assert rcpt_reply(edge, OFFSET).code == 250


def test_an_answer_outside_the_pattern_counts_nothing(edge):
    assert rcpt_reply(edge, WRONG_CODE).code == 250


def test_only_a_records_are_asked_so_a_huge_txt_record_changes_nothing(edge, dns):
    assert rcpt_reply(edge, HUGE_TXT).code == 250
    asked = {kind for name, kind in dns.queries if name == "8.0.0.127.bl.test"}
    assert asked == {"A"}


def test_a_silent_or_failing_list_fails_open_and_its_slow_answer_is_not_cached(edge, dns):
    before = edge.metric("yestls_edge_dnsbl_failures_total", site="slow.test")
    assert rcpt_reply(edge, FAILING).code == 250
    assert edge.metric("yestls_edge_dnsbl_failures_total", site="slow.test") == before + 1
    assert edge.metric("yestls_edge_dnsbl_failures_total", site="fail.test") >= 1
    assert "not counted (fail open)" in edge.log()
    # The lists answer now: the failed lookup was not remembered as "not listed".
    dns.silent.discard("7.0.0.127.slow.test")
    dns.servfail.discard("7.0.0.127.fail.test")
    reply = rcpt_reply(edge, FAILING)
    assert reply.code == 550 and "blocked using" in reply.text, reply


# --- SPF -----------------------------------------------------------------------------------------

def test_an_spf_fail_is_recorded_not_refused_by_default(edge):
    with session(edge, UNLISTED) as client:
        spool_id = queued_id(client.deliver("a@spf-fail.test", ["user@example.org"], MESSAGE))
    assert edge.unseal(spool_id).metadata["spf"] == {"result": "fail", "domain": "spf-fail.test"}


def test_the_null_sender_is_checked_by_its_helo_name(edge):
    with session(edge, UNLISTED) as client:   # EHLO sender.example.net: no SPF record there
        spool_id = queued_id(client.deliver("", ["user@example.org"], MESSAGE))
    assert edge.unseal(spool_id).metadata["spf"] == {"result": "none", "domain": CLIENT_NAME}


# --- protocol checks -----------------------------------------------------------------------------

def test_commands_pipelined_before_the_ehlo_reply_are_refused(edge):
    before = door_count(edge, "pipelining")
    with SmtpClient.connect(edge.site.smtp_port, source=UNLISTED) as client:
        client.send(b"EHLO sender.example.net\r\nMAIL FROM:<a@spf-pass.test>\r\n")
        reply = client.read_reply()
        assert reply.code == 554 and reply.enhanced == "5.5.1", reply
        assert client.wait_closed() == b""
    assert door_count(edge, "pipelining") == before + 1


def test_pipelining_after_the_ehlo_reply_is_allowed(edge):
    with session(edge, UNLISTED) as client:
        client.send(b"MAIL FROM:<a@spf-pass.test>\r\nRCPT TO:<user@example.org>\r\nDATA\r\n")
        assert [client.read_reply().code for _ in range(3)] == [250, 250, 354]


def test_a_bare_newline_is_counted_as_a_door_refusal(edge):
    before = door_count(edge, "bare_newline")
    with SmtpClient.connect(edge.site.smtp_port, source=UNLISTED) as client:
        client.send(b"EHLO sender.example.net\n")
        assert client.read_reply().code == 521
    wait_until(lambda: door_count(edge, "bare_newline") == before + 1, 10, "bare_newline counted")


def test_status_shows_the_door_counts(edge):
    rcpt_reply(edge, LISTED)
    rows = [row for row in edge_rows(edge.site.config, time.time()) if row.section == "door"]
    assert len(rows) == 1 and rows[0].value["dnsbl"] >= 1, rows
    assert "dnsbl" in rows[0].text


# --- a second edge: pregreet, SPF fail refused, rates -------------------------------------------

@pytest.fixture(scope="module")
def strict_edge(dns, pki, tmp_path_factory):
    extra = ("greet_wait = 1\nspf_reject_fail = true\nconnections_per_minute = 0.001\nconnection_burst = 3\n"
             "messages_per_minute = 0.001\nmessage_burst = 2\n")
    with running_edge(tmp_path_factory.mktemp("strict-door"), pki,
                      top_options=door_section(dns.port, extra)) as running:
        yield running


def test_a_client_talking_before_the_banner_is_refused(strict_edge):
    before = door_count(strict_edge, "pregreet")
    with SmtpClient.connect(strict_edge.site.smtp_port, source="127.0.0.30", read_greeting=False) as client:
        client.send(b"EHLO sender.example.net\r\n")
        reply = client.read_reply()
        assert reply.code == 554 and reply.enhanced == "5.5.1", reply
        assert client.wait_closed() == b""
    assert door_count(strict_edge, "pregreet") == before + 1
    with SmtpClient.connect(strict_edge.site.smtp_port, source="127.0.0.31") as patient:
        assert patient.greeting.code == 220
        patient.ehlo()


def test_an_spf_fail_is_refused_when_configured(strict_edge):
    with SmtpClient.connect(strict_edge.site.smtp_port, source="127.0.0.32") as client:
        client.ehlo()
        reply = client.command("MAIL FROM:<a@spf-fail.test>")
        assert reply.code == 550 and reply.enhanced == "5.7.23", reply
        assert "spf-fail.test" in reply.text
        client.expect("MAIL FROM:<a@spf-pass.test>", 250)
    assert door_count(strict_edge, "spf_fail") >= 1


def test_connections_per_address_are_limited(strict_edge):
    for _ in range(3):
        with SmtpClient.connect(strict_edge.site.smtp_port, source="127.0.0.33") as client:
            assert client.greeting.code == 220
    with SmtpClient.connect(strict_edge.site.smtp_port, source="127.0.0.33") as client:
        assert client.greeting.code == 421 and client.greeting.enhanced == "4.7.0", client.greeting
    with SmtpClient.connect(strict_edge.site.smtp_port, source="127.0.0.34") as other:
        assert other.greeting.code == 220   # per address: another client is not held back
    assert door_count(strict_edge, "rate") >= 1


def test_messages_per_address_are_limited(strict_edge):
    with SmtpClient.connect(strict_edge.site.smtp_port, source="127.0.0.35") as client:
        client.ehlo()
        for _ in range(2):
            client.expect("MAIL FROM:<a@spf-pass.test>", 250)
            client.expect("RSET", 250)
        reply = client.command("MAIL FROM:<a@spf-pass.test>")
        assert reply.code == 451 and reply.enhanced == "4.7.1", reply


# --- the lookups and the config, without an edge ------------------------------------------------

def test_query_names_ipv4_ipv6_and_mapped():
    assert query_name("192.0.2.1", "bl.test") == "1.2.0.192.bl.test"
    assert query_name("::ffff:192.0.2.1", "bl.test") == "1.2.0.192.bl.test"
    assert query_name("2001:db8::1", "bl.test") == ".".join("1" + "0" * 23 + "8bd01002") + ".bl.test"
    assert query_name("unknown", "bl.test") is None


def test_an_ipv6_client_is_looked_up_by_nibbles():
    name = query_name("2001:db8::1", "bl.test")
    with serve_zone_text(f"$TTL 60\n{name}. IN A 127.0.0.2\n") as served:
        settings = DoorSettings(dnsbl_sites=(parse_site("bl.test*3"),), dnsbl_threshold=3, dnsbl_timeout=2,
                                resolver=("127.0.0.1", served.port))

        async def look():
            door = Door(settings, CollectorRegistry())
            return [door.blocked(a, await door.listing(a)) for a in ("2001:db8::1", "2001:db8::2")]

        listed, unlisted = asyncio.run(look())
    assert listed == "550 5.7.1 Service unavailable; client [2001:db8::1] blocked using bl.test"
    assert unlisted is None


def test_many_lists_are_asked_in_parallel_within_the_timeout():
    zones = [f"l{i}.test" for i in range(MAX_SITES)]
    text = "$TTL 60\n" + "".join(f"2.0.0.127.{zone}. IN A 127.0.0.2\n" for zone in zones)
    with serve_zone_text(text) as served:
        for zone in zones[1:]:
            served.silent.add(f"2.0.0.127.{zone}")
        settings = DoorSettings(dnsbl_sites=tuple(parse_site(f"{z}*1") for z in zones), dnsbl_threshold=1,
                                dnsbl_timeout=1, resolver=("127.0.0.1", served.port))

        async def look():
            return await Door(settings, CollectorRegistry()).listing("127.0.0.2")

        listing = asyncio.run(asyncio.wait_for(look(), 10))   # one timeout for all, not one each
    assert listing.score == 1 and not listing.complete


@pytest.mark.parametrize("text", ["bl.test=127.0.0.[2..300]", "bl.test=127.0.0", "=127.0.0.2", "bl.test*x",
                                  "bl test", "bl.test=127.0.0.[5..2]"])
def test_a_bad_site_is_refused(text):
    with pytest.raises(ValueError):
        parse_site(text)


def test_a_site_pattern_matches_as_postscreen_does():
    site = parse_site("zen.spamhaus.org=127.0.0.[2..11]*3")
    assert site.weight == 3 and site.matches("127.0.0.2") and site.matches("127.0.0.11")
    assert not site.matches("127.0.0.1") and not site.matches("127.255.255.254") and not site.matches("10.0.0.2")
    assert parse_site("list.dnswl.org=127.0.[0..255].[1;3]*-2").matches("127.0.7.3")
    assert parse_site("any.test").matches("127.1.2.3") and parse_site("any.test").weight == 1


@pytest.mark.parametrize("door, key", [
    ('dnsbl_sites = ["bl.test=127.0.0.[2..300]"]', "door.dnsbl_sites"),
    (f"dnsbl_sites = {[f'l{i}.test' for i in range(MAX_SITES + 1)]!r}".replace("'", '"'), "door.dnsbl_sites"),
    ('dnsbl_sites = ["bl.test", "bl.test*2"]', "door.dnsbl_sites"),
    ("spf_reject_fail = true", "door.spf_reject_fail"),
    ('resolver = "nowhere"', "door.resolver"),
    ("greet_wait = 100", "door.greet_wait"),
    ("dnsbl_typo = 1", "dnsbl_typo"),
])
def test_config_errors_name_the_key(pki, tmp_path, door, key):
    site = make_edge_site(tmp_path, pki, top_options=f"[door]\n{door}\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        edge_config.load(site.config)


def test_no_door_section_changes_nothing(pki, tmp_path):
    assert not edge_config.load(make_edge_site(tmp_path, pki).config).door.enabled
