"""Sending from anywhere (roles/home_postfix): a user's phone on `internet`
submits to the clients' name, which is the edge's address; the edge forwards
the connection to home, where Postfix ends TLS, checks the login, signs with
DKIM and delivers: to the recipient's MX on the Internet from home's tunnel
address (so from the edge's public address, HELO the edge's name, TLS made
at home), or to Dovecot when the recipient is at home. The edge only ever
carries ciphertext.

Each hop is tied to the next by identifiers (submission.py), not by timing.
"""

from __future__ import annotations

import re
import socket
import uuid

import pytest
from scenario import (
    HOME_LAN,
    address,
    ca_context,
    client_name,
    container,
    find_in_filesystem,
    find_in_process_memory,
    imap_password,
    mailbox,
    messages_with,
    site,
    wait_for,
)
from submission import (
    CLIENT_CA,
    CORRESPONDENT,
    HELO,
    authentication_on_internet,
    deliveries,
    home_postfix_log,
    internet_postfix_log,
    lines_of,
    login_of,
    message,
    queue_ids,
    received_at_correspondent,
    submit,
)

DELIVERY_TIMEOUT = 90  # seconds: Postfix delivers at once; DNS and TLS on the way
USER = mailbox()  # user@example.org
OTHER = "other@" + site()["site_domains"][0]
ANN = "ann@example.net"
ALIAS = "info@example.net"  # -> user@example.org, ann@example.net (molecule.yml)

# Every marker this module sends; none may ever be found on the edge.
MARKERS: list[str] = []


def new_marker() -> str:
    marker = f"yestls-out-{uuid.uuid4().hex}"
    MARKERS.append(marker)
    return marker


def wait_until_at_correspondent(marker: str) -> bytes:
    received = wait_for(lambda: received_at_correspondent(marker), timeout=DELIVERY_TIMEOUT, interval=2)
    assert received, (f"{marker} did not reach {CORRESPONDENT}: home's deliveries "
                      f"{deliveries(marker, home_postfix_log())}")
    return received


@pytest.mark.parametrize("port", [465, 587])
def test_mail_submitted_through_the_edge_leaves_from_the_edge_signed_and_over_tls_made_at_home(port):
    marker = new_marker()
    session = submit(port, login_of(USER), USER, [CORRESPONDENT], message(marker, USER, CORRESPONDENT))
    edge = address("edge")
    # the phone reached the clients' name at the edge's address, certificate verified (test CA)
    assert session.peer == edge
    assert session.code("AUTH") == 235, session.steps
    assert session.code("DATA") == 250, session.steps
    received = wait_until_at_correspondent(marker)

    # home: the submission came from the phone's own address (the edge forwards, it does not proxy)
    home_lines = home_postfix_log()
    (home_id,) = queue_ids(marker, home_lines)
    submitted = "\n".join(lines_of(home_id, home_lines))
    assert re.search(rf"client=\S*\[{re.escape(address('internet'))}\], sasl_method=\w+, "
                     rf"sasl_username={re.escape(USER)}", submitted), submitted
    # home's SMTP client made the TLS session to sender.test's MX and verified it (test CA, policy secure)
    sent = [d for d in deliveries(marker, home_lines) if d.status == "sent"]
    assert [d.process.split("[")[0] for d in sent] == ["postfix/smtp"], sent
    internet = re.escape(address("internet"))
    assert sent[0].relay == f"mta.sender.test[{address('internet')}]:25", sent[0]
    assert sent[0].tls and re.search(rf"Verified TLS connection established to mta\.sender\.test\[{internet}\]:25: "
                                     r"TLSv1\.3 ", sent[0].tls), sent[0]
    internet_id = re.search(r"queued as ([0-9A-F]+)", sent[0].reply).group(1)

    # internet: that very queue id came from the edge's address, and the edge's name said HELO
    assert re.search(rf" {internet_id}: client=\S*\[{re.escape(edge)}\]$",
                     "\n".join(internet_postfix_log()), re.M), f"no client=[{edge}] for {internet_id}"
    top = received.split(b"\nReceived: ", 1)[0] if not received.startswith(b"Received: ") else received
    assert re.search(rb"^Received: from " + re.escape(HELO).encode() + rb" \(\S+ \[" + re.escape(edge).encode()
                     + rb"\]\)\s+by mta\.sender\.test \(Postfix\) with ESMTPS id " + internet_id.encode(),
                     received, re.M), top[:600]

    # DKIM (both keys) verifies against the records published in DNS; SPF passes for the edge's address
    checked = authentication_on_internet(received, edge, USER, HELO)
    assert sorted((sig["a"], sig["d"], sig["ok"]) for sig in checked["dkim"]) == [
        ("ed25519-sha256", "example.org", True), ("rsa-sha256", "example.org", True)], checked
    assert checked["spf"] == "pass", checked


def test_dkim_records_home_printed_are_the_ones_published():
    """The role's TXT records file at home and the scenario's DNS agree (a user copies one into the other)."""
    records = container("home").file("/etc/dkimkeys/yestls-dns-records.txt").content_string
    for domain in site()["site_domains"]:
        for kind in ("rsa", "ed25519"):
            name = f"{site()['site_dkim_selector']}-{kind}._domainkey.{domain}"
            published = container("internet").check_output("python3 -c %s %s", _TXT, name)
            assert published.startswith(f"v=DKIM1; k={kind}; "), published
            strings = re.search(rf"^{re.escape(name)}\. IN TXT \( (.*) \)$", records, re.M).group(1)
            assert "".join(re.findall(r'"([^"]*)"', strings)) == published


_TXT = "import sys, dns.resolver; print(b''.join(dns.resolver.resolve(sys.argv[1], 'TXT')[0].strings).decode())"


@pytest.mark.parametrize(
    ("port", "starttls", "mail_from", "recipient"),
    [
        (587, False, CORRESPONDENT, "victim@elsewhere.test"),  # cleartext: no TLS, no AUTH, nothing
        (587, True, CORRESPONDENT, "victim@elsewhere.test"),  # TLS without a login: relay
        (587, True, USER, "victim@elsewhere.test"),  # a local sender claimed without a login
        (587, True, CORRESPONDENT, USER),  # not even to a local mailbox without a login
        (465, True, CORRESPONDENT, "victim@elsewhere.test"),
        (465, True, USER, "victim@elsewhere.test"),
        (465, True, CORRESPONDENT, USER),
    ],
)
def test_submission_refuses_everything_without_a_login(port, starttls, mail_from, recipient):
    session = submit(port, None, mail_from, [recipient], message("never-sent", mail_from, recipient),
                     starttls=starttls)
    assert session.code("DATA") is None, session.steps
    if not starttls:
        assert "auth" not in session.features  # no AUTH offered in cleartext
        assert session.code("MAIL") == 530, session.steps  # 5.7.0 Must issue a STARTTLS command first
    else:
        assert "auth" in session.features
        assert session.codes("RCPT") and all(code >= 500 for code in session.codes("RCPT")), session.steps


def test_a_wrong_password_is_refused_and_failures_are_slowed():
    session = submit(587, (USER, "not-the-password"), USER, [CORRESPONDENT])
    assert session.code("AUTH") == 535, session.steps
    assert session.code("MAIL") is None
    # each failed login is answered late (Dovecot), a client that keeps failing later still (Postfix)
    assert container("home").check_output("doveconf -h auth_failure_delay") == "2 secs"
    assert container("home").check_output("postconf -h smtpd_error_sleep_time smtpd_soft_error_limit").split() == [
        "2s", "3"]


@pytest.mark.parametrize(
    ("sender", "allowed"),
    [
        (USER, True),  # its own address
        (USER.replace("@", "+lists@"), True),  # its own address with a tag
        (ALIAS, True),  # an alias that delivers to it (docs/deploy.md)
        (OTHER, False),  # another user of the site
        (ANN, False),  # another user, in the other domain
        ("stranger@example.net", False),  # an address the catch-all would take: no one's to send as
        ("someone@elsewhere.test", False),  # not the site's at all
    ],
)
def test_a_logged_in_user_sends_only_as_its_own_addresses(sender, allowed):
    session = submit(587, login_of(USER), sender, [CORRESPONDENT])
    assert session.code("AUTH") == 235, session.steps
    if allowed:
        assert session.code("MAIL") == 250 and session.code("RCPT") == 250, session.steps
    else:
        assert session.code("MAIL") == 250, session.steps  # Postfix decides at RCPT (smtpd_delay_reject)
        assert session.code("RCPT") == 553, session.steps
        assert "not owned by user " + USER in session.text("RCPT"), session.steps


def test_mail_between_users_at_home_stays_at_home():
    marker = new_marker()
    session = submit(587, login_of(USER), USER, [OTHER], message(marker, USER, OTHER))
    assert session.code("DATA") == 250, session.steps
    found = wait_for(lambda: messages_with(marker, OTHER), timeout=DELIVERY_TIMEOUT, interval=2)
    assert len(found) == 1, f"{marker} did not reach {OTHER}"
    # delivered to Dovecot by LMTP, never handed to an SMTP client (the Internet, the edge)
    done = deliveries(marker, home_postfix_log())
    assert [(d.process.split("[")[0], d.recipient, d.status) for d in done] == [("postfix/lmtp", OTHER, "sent")], done
    assert "private/dovecot-lmtp" in done[0].relay
    assert b"DKIM-Signature:" in found[0]  # signed like any mail from the site's users


def test_imaps_through_the_edge_reads_the_mailbox_with_the_clients_certificate():
    """IMAPS to the clients' name from `internet` reaches home's Dovecot
    through the edge; the certificate is the clients' (test CA, that name)."""
    script = (
        "import imaplib, ssl, sys; c = ssl.create_default_context(cafile=sys.argv[1]);"
        "i = imaplib.IMAP4_SSL(sys.argv[2], 993, ssl_context=c, timeout=20); print(i.sock.getpeername()[0]);"
        "print(i.login(sys.argv[3], sys.argv[4])[0]); print(i.select('INBOX', readonly=True)[0]); i.logout()"
    )
    out = container("internet").check_output("python3 -c %s %s %s %s %s", script, CLIENT_CA, client_name(),
                                             USER, imap_password(USER)).split()
    assert out == [address("edge"), "OK", "OK"]


def test_imaps_on_the_home_lan_serves_the_clients_certificate_too():
    """On home's LAN the same name and certificate (the controller is on it)."""
    with socket.create_connection((address("home", HOME_LAN), 993), timeout=10) as sock:
        with ca_context().wrap_socket(sock, server_hostname=client_name()) as tls:
            names = [value for kind, value in tls.getpeercert()["subjectAltName"] if kind == "DNS"]
    assert names == [client_name()]


def test_no_marker_of_outbound_mail_was_ever_on_the_edge():
    """Runs last: the edge's files, journal and process memory hold none of
    this module's markers (submitted through it, sent out through it)."""
    assert len(MARKERS) >= 3, "run with the tests above: they send the mail"
    needles = {marker: marker.encode() for marker in MARKERS}
    assert find_in_filesystem("edge", needles) == []
    journal = container("edge").check_output("journalctl -o cat --no-pager")
    assert [m for m in MARKERS if m in journal] == []
    assert find_in_process_memory("edge", needles) == {}
    # the search works: each marker is where it should be, at home's correspondent or mailbox
    assert all(received_at_correspondent(m) or messages_with(m, OTHER) for m in MARKERS)
