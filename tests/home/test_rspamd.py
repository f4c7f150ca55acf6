"""relay/home/spam.py and our rspamd rule against a real rspamd (Debian's 3.4), on loopback.

The rule (roles/home_spam/files/rspamd.local.lua) gives rspamd the edge's SPF
result in place of its spf module, so DMARC reads the result of the moment
the sender was connected. A local zone (tests/dns_zone.py) publishes SPF and
DMARC for sender.example.net that allow 198.51.100.1 only: rspamd's answer
shows whose SPF it used. rspamd starts with the packaged configuration and a
LOCAL_CONFDIR of our own (ports, DNS, the rule), the role's choices that
matter here.
"""

import asyncio
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from relay.home.headers import header_fields
from relay.home.spam import MessageFacts, SpamAction, SpamFilter

from ..dns_zone import serve_zone
from ..fake_rspamd import GTUBE
from ..interop_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
RULE = ROOT / "roles/home_spam/files/rspamd.local.lua"
MX = "mx.example.org"
ALLOWED = "198.51.100.1"
MESSAGE = (b"From: Alice <alice@sender.example.net>\r\nTo: <user@example.org>\r\nSubject: lunch on friday\r\n"
           b"Date: Sat, 05 Dec 2026 09:00:00 +0000\r\nMessage-ID: <lunch.1@sender.example.net>\r\n\r\n"
           b"Shall we meet at noon at the usual place? Bring the notes from Tuesday.\r\n")
STARTUP = 120.0   # seconds rspamd may take to load its rules


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rspamd")
    records = {"sender.example.net": [f"v=spf1 ip4:{ALLOWED} -all"],
               "_dmarc.sender.example.net": ["v=DMARC1; p=reject"]}
    normal, controller = free_port(), free_port()
    local = directory / "local"
    (local / "local.d").mkdir(parents=True)
    (local / "override.d").mkdir()
    shutil.copy(RULE, local / "rspamd.local.lua")
    for name in ("run", "db", "log"):
        (directory / name).mkdir()
        shutil.chown(directory / name, "_rspamd", "_rspamd")
    (local / "override.d/worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{normal}";\n')
    (local / "override.d/worker-controller.inc").write_text(f'bind_socket = "127.0.0.1:{controller}";\n')
    (local / "override.d/worker-proxy.inc").write_text("enabled = false;\n")
    (local / "local.d/spf.conf").write_text("enabled = false;\n")   # the rule gives SPF (as the role does)
    (local / "local.d/fuzzy_check.conf").write_text("enabled = false;\n")   # rspamd.com is not reachable
    (local / "local.d/milter_headers.conf").write_text('use = ["authentication-results", "x-spamd-result"];\n')
    with serve_zone(records) as zone:
        (local / "local.d/options.inc").write_text(
            f'dns {{ nameserver = ["127.0.0.1:{zone.port}"]; timeout = 1s; retransmits = 1; }}\n')
        process = subprocess.Popen(
            ["rspamd", "-f", "-u", "_rspamd", "-g", "_rspamd", "--var", f"LOCAL_CONFDIR={local}",
             "--var", f"RUNDIR={directory / 'run'}", "--var", f"DBDIR={directory / 'db'}",
             "--var", f"LOGDIR={directory / 'log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{normal}"
            deadline = time.monotonic() + STARTUP
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/ping", timeout=2).read().strip() == b"pong":
                        break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    log = (directory / "log/rspamd.log").read_text(errors="replace")[-3000:]
                    raise AssertionError(f"rspamd did not start (exit {process.poll()}):\n{log}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def judge(url: str, message: bytes = MESSAGE, ip: str = "192.0.2.7", spf: dict | None = None):
    metadata = {"mail_from": "alice@sender.example.net", "rcpt_tos": ["user@example.org"],
                "client_address": f"{ip}:41000", "helo": "mail.sender.example.net", "spf": spf}
    return asyncio.run(SpamFilter(url, 20.0, MX).judge(message, MessageFacts.from_metadata(metadata)))


def authentication_results(verdict) -> str:
    (value,) = [value for name, value in verdict.headers if name == "Authentication-Results"]
    return value


def test_the_edges_spf_pass_is_what_rspamd_and_its_dmarc_use(rspamd):
    # Home's own check would fail this address; the edge's result (at the time) wins, and DMARC aligns on it.
    verdict = judge(rspamd, spf={"result": "pass", "domain": "sender.example.net"})
    results = authentication_results(verdict)
    assert results.startswith(f"{MX};") and "spf=pass" in results and "dmarc=pass" in results
    assert "R_SPF_ALLOW" in verdict.symbols and "DMARC_POLICY_ALLOW" in verdict.symbols
    assert "R_SPF_FAIL" not in verdict.symbols


def test_the_edges_spf_fail_is_a_fail_and_dmarc_rejects(rspamd):
    verdict = judge(rspamd, ip=ALLOWED, spf={"result": "fail", "domain": "sender.example.net"})
    assert "spf=fail" in authentication_results(verdict)
    assert "R_SPF_FAIL" in verdict.symbols and "DMARC_POLICY_REJECT" in verdict.symbols


@pytest.mark.parametrize("ip, result, symbol", [(ALLOWED, "pass", "R_SPF_ALLOW"), ("192.0.2.7", "fail", "R_SPF_FAIL")])
def test_without_the_edges_result_the_rule_checks_spf_at_home(rspamd, ip, result, symbol):
    verdict = judge(rspamd, ip=ip)
    assert f"spf={result}" in authentication_results(verdict) and symbol in verdict.symbols
    assert ("DMARC_POLICY_ALLOW" if result == "pass" else "DMARC_POLICY_REJECT") in verdict.symbols


def test_gtube_is_a_reject(rspamd):
    verdict = judge(rspamd, MESSAGE + b"\r\n" + GTUBE + b"\r\n", ip=ALLOWED)
    assert verdict.action is SpamAction.REJECT and verdict.refusal().startswith("550 5.7.1")
    # rspamd adds no fields to what it rejects; after a 250 it is only marked (and goes to Junk)
    assert verdict.header_block() == b"X-Spam: Yes\r\n"


def test_every_header_rspamd_gives_is_one_field(rspamd):
    verdict = judge(rspamd, ip=ALLOWED)
    fields = header_fields(verdict.header_block() + b"\r\n")
    assert [f.name for f in fields] == [b"authentication-results", b"x-spamd-result", b"x-spam"]
    assert all(f.readings() == [f] for f in fields)
    assert b"\r\n\t" in fields[0].raw   # rspamd folds its lines; they arrive as CRLF continuations
