"""The promise to a user, end to end with a real sending MTA: Postfix on
`internet` finds the edge as the domain's MX in DNS, insists on TLS verified
against the test CA (policy `secure`), and the mail lands in the mailbox at
home, read over IMAPS. Then the bad days: home offline (with each oracle-down
policy that keeps TLS), the intake stopped, a relay attempt.

Each hop is tied to the next by identifiers (mailpath.py), not by timing.
Each test leaves the deployment as converge made it (tunnel up, intake
running, policy tempfail), so the other modules see it unchanged.
"""

from __future__ import annotations

import re
import uuid
from contextlib import contextmanager

import pytest
from mailpath import (
    DOMAIN,
    MX,
    SENDER,
    attempts,
    audit_lines,
    edge_session,
    edge_status,
    flush_postfix_queue,
    forget_tls_sessions,
    oracle_reachable_from_edge,
    sent,
    signature_verified,
    spool_files,
    submit,
    wait_until_sent,
)
from scenario import (
    container,
    find_in_filesystem,
    messages_with,
    read_secret,
    run_playbook,
    site,
    wait_for,
)

TUNNEL_UNIT = "wg-quick@wg0.service"
INTAKE_UNIT = "yestls-intake.service"
DELIVERY_TIMEOUT = 120  # seconds: the intake long-polls, Dovecot delivers at once

# Every marker this module sends; none may ever be found on the edge.
MARKERS: list[str] = []


def new_marker() -> str:
    marker = f"yestls-{uuid.uuid4().hex}"
    MARKERS.append(marker)
    return marker


def wait_for_mail(marker: str) -> list[bytes]:
    found = wait_for(lambda: messages_with(marker), timeout=DELIVERY_TIMEOUT, interval=2)
    assert found, f"{marker} did not arrive in the mailbox at home"
    return found


def assert_delivered_once(marker: str) -> bytes:
    found = wait_for_mail(marker)
    # a duplicate would come from a second pull of the same spool file: give it time to show
    assert wait_for(lambda: len(messages_with(marker)) > 1, timeout=5) is False
    assert len(found) == 1
    assert f"The marker of this message is {marker}.".encode() in found[0]
    return found[0]


@contextmanager
def home_offline():
    """Home drops off the Internet: its WireGuard stops (home dials the edge,
    so the edge cannot reach the oracle or be reached by the intake). Comes
    back when the block ends, and waits until the edge has its oracle again."""
    home = container("home")
    home.check_output(f"systemctl stop {TUNNEL_UNIT}")
    try:
        assert wait_for(lambda: oracle_reachable_from_edge() is False, timeout=60), "the edge still sees the oracle"
        yield
    finally:
        home.check_output(f"systemctl start {TUNNEL_UNIT}")
        assert wait_for(oracle_reachable_from_edge, timeout=90), "the edge did not get its oracle back"


@contextmanager
def edge_policy(policy: str):
    """Run the edge with another oracle-down policy, the way a user changes it:
    playbooks/edge.yml with site_oracle_down set. Back to the scenario's own
    policy when the block ends."""
    _run_edge_playbook(policy)
    try:
        yield
    finally:
        _run_edge_playbook(site()["site_oracle_down"])


def _run_edge_playbook(policy: str) -> None:
    run_playbook("edge.yml", f"site_oracle_down={policy}")
    assert wait_for(lambda: edge_status()["policy"].get("oracle down", {}).get("policy") == policy, timeout=60)
    assert wait_for(oracle_reachable_from_edge, timeout=60), "the restarted edge has no oracle"


# --- the tests -------------------------------------------------------------------------


def test_mail_from_the_internet_arrives_over_verified_tls13_signed_at_home():
    forget_tls_sessions()  # a full handshake, whatever ran before
    marker = new_marker()
    submit(marker)
    attempt = wait_until_sent(marker)

    # Postfix verified the chain (test CA) for the MX name it found in DNS, over TLS 1.3
    assert attempt.tls is not None, "Postfix delivered without TLS"
    assert re.search(rf"Verified TLS connection established to {re.escape(MX)}\[[\d.]+\]:25: TLSv1\.3 ",
                     attempt.tls), attempt.tls
    assert signature_verified(attempt.tls), attempt.tls
    # the edge's session that accepted it, and the oracle's signature for that very handshake
    session = edge_session(attempt.spool_id)
    assert session["version"] == "TLSv1.3"
    assert not session["resumed"], "the scenario's first mail from Postfix should need a signature"
    signed = audit_lines(session["client_random"])
    assert [(line["outcome"], line["peer"]) for line in signed] == [("signed", "edge")]

    message = assert_delivered_once(marker)
    assert re.search(rb"from mta\.sender\.test \(\[[\d.]+\]\)\r?\n\tby " + re.escape(MX).encode()
                     + rb" \(YesTLS\) with ESMTPS\r?\n\t\(version=TLSv1\.3 ", message), message[:600]
    # home acknowledged it: the edge keeps nothing
    assert wait_for(lambda: spool_files() == [], timeout=30)


TLS12_ONLY = "!SSLv2, !SSLv3, !TLSv1, !TLSv1.1, !TLSv1.3"


@contextmanager
def sender_held_to_tls12():
    """Postfix on `internet` as an older MTA: TLS 1.2 at most (its policy stays `secure`, so the
    mandatory protocols are the ones that count), with an empty session cache."""
    internet = container("internet")
    saved = internet.check_output("postconf -h smtp_tls_protocols smtp_tls_mandatory_protocols").splitlines()
    internet.check_output(f"postconf -e 'smtp_tls_protocols = {TLS12_ONLY}' "
                          f"'smtp_tls_mandatory_protocols = {TLS12_ONLY}'")
    forget_tls_sessions()
    try:
        yield
    finally:
        internet.check_output(f"postconf -e 'smtp_tls_protocols = {saved[0]}' "
                              f"'smtp_tls_mandatory_protocols = {saved[1]}'")
        forget_tls_sessions()


def test_a_tls12_only_sender_delivers_over_verified_tls12_signed_at_home_by_sign_tls12():
    with sender_held_to_tls12():
        marker = new_marker()
        submit(marker)
        attempt = wait_until_sent(marker)
    assert attempt.tls is not None, "Postfix delivered without TLS"
    assert re.search(rf"Verified TLS connection established to {re.escape(MX)}\[[\d.]+\]:25: TLSv1\.2 with cipher "
                     r"ECDHE-(ECDSA|RSA)-", attempt.tls), attempt.tls
    session = edge_session(attempt.spool_id)
    assert session["version"] == "TLSv1.2" and not session["resumed"]
    signed = audit_lines(session["client_random"])
    assert [(line["method"], line["version"], line["outcome"]) for line in signed] == [
        ("sign_tls12", "TLSv1.2", "signed")]
    assert signed[0]["server_random"].endswith("444f574e47524401")   # the downgrade sentinel
    message = assert_delivered_once(marker)
    assert re.search(rb"with ESMTPS\r?\n\t\(version=TLSv1\.2 ", message), message[:600]


def test_home_offline_the_edge_defers_and_every_message_arrives_once_when_home_is_back():
    """Policy tempfail (the default): 421 at greeting while no oracle answers;
    Postfix keeps the mail and retries; nothing waits on the edge."""
    markers = [new_marker() for _ in range(3)]
    with home_offline():
        for marker in markers:
            submit(marker)
        for marker in markers:
            deferred = wait_for(lambda m=marker: [a for a in attempts(m) if a.status == "deferred"], timeout=60)
            assert deferred, f"Postfix did not try {marker}"
            assert "421 4.3.0" in deferred[0].reply, deferred[0].reply
            assert sent(marker) is None
        assert spool_files() == []
    flush_postfix_queue()
    for marker in markers:
        attempt = wait_until_sent(marker)
        assert "Verified TLS connection" in attempt.tls, attempt.tls
        assert_delivered_once(marker)


def test_home_offline_with_resume_only_a_returning_sender_resumes_tls_and_its_mail_waits_sealed():
    with edge_policy("resume-only"):
        # a first message, home online: a full handshake; Postfix keeps the session ticket
        first = new_marker()
        submit(first)
        attempt = wait_until_sent(first)
        assert "Verified TLS connection established" in attempt.tls, attempt.tls
        assert signature_verified(attempt.tls), attempt.tls
        assert_delivered_once(first)

        second = new_marker()
        with home_offline():
            submit(second)
            attempt = wait_until_sent(second)
            assert re.search(r"Verified TLS connection established to .*: TLSv1\.3 ", attempt.tls), attempt.tls
            assert not signature_verified(attempt.tls), attempt.tls  # Postfix saw no signature...
            session = edge_session(attempt.spool_id)
            assert session["resumed"]  # ...because the edge resumed its session
            # no signature was needed (and none could have been made)
            assert audit_lines(session["client_random"]) == []
            # the message waits at the edge, sealed
            waiting = [path for path in spool_files() if attempt.spool_id in path]
            assert len(waiting) == 1
            sealed = read_secret("edge", waiting[0])
            assert sealed.startswith(b"YTLSPOOL")
            assert second.encode() not in sealed
            assert messages_with(second) == []
        assert_delivered_once(second)


def test_intake_down_mail_is_accepted_sealed_and_delivered_when_it_restarts():
    """Home's mail side under maintenance, the oracle up: the edge accepts
    over TLS and keeps the mail sealed until the intake pulls it."""
    home = container("home")
    marker = new_marker()
    home.check_output(f"systemctl stop {INTAKE_UNIT}")
    try:
        submit(marker)
        attempt = wait_until_sent(marker)
        assert "Verified TLS connection" in attempt.tls
        waiting = [path for path in spool_files() if attempt.spool_id in path]
        assert len(waiting) == 1
        sealed = read_secret("edge", waiting[0])
        assert sealed.startswith(b"YTLSPOOL") and marker.encode() not in sealed
        assert messages_with(marker) == []
    finally:
        home.check_output(f"systemctl start {INTAKE_UNIT}")
    assert_delivered_once(marker)
    assert wait_for(lambda: spool_files() == [], timeout=30)


@pytest.mark.parametrize(
    "recipient",
    [
        "victim@elsewhere.test",  # another domain
        f"victim%elsewhere.test@{DOMAIN}",  # the percent hack
        f"elsewhere.test!victim@{DOMAIN}",  # a bang path
        "victim@[192.0.2.1]",  # an address literal
        f"victim@sub.{DOMAIN}",  # a subdomain is not ours
    ],
)
def test_a_relay_attempt_from_the_internet_is_refused(recipient):
    """swaks on `internet` speaks to the MX directly, as a spammer would."""
    result = container("internet").run(
        "swaks --server %s --port 25 --ehlo mta.sender.test --from %s --to %s --quit-after RCPT "
        "--tls --tls-verify --tls-ca-path /etc/postfix/yestls-pebble-root.pem",
        MX, SENDER, recipient,
    )
    assert "<~  250 2.1.0 OK" in result.stdout, result.stdout  # MAIL FROM, over TLS
    assert re.search(r"<~\* 550 5\.7\.1 ", result.stdout), result.stdout  # RCPT TO refused


def test_no_marker_of_any_message_was_ever_on_the_edge():
    """Runs last: the edge's files (spool, journal, everything) and its journal
    as journalctl reads it hold none of the markers of this module's mail,
    sent while home was online, offline, and with the intake stopped."""
    assert len(MARKERS) >= 6, "run with the tests above: they send the mail"
    needles = {marker: marker.encode() for marker in MARKERS}
    assert find_in_filesystem("edge", needles) == []
    journal = container("edge").check_output("journalctl -o cat --no-pager")
    assert [m for m in MARKERS if m in journal] == []
    # the search works: each marker is where it should be, at home
    assert all(messages_with(marker) for marker in MARKERS)
