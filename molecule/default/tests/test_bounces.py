"""Bounces (relay/home/dsn.py): a message the edge accepted that home's
Dovecot then refuses for good comes back to its sender as a DSN, sent by
home's Postfix out through the edge, signed with the site's DKIM keys.

To make Dovecot refuse a recipient the address book still lists (the edge
accepts it), the test takes that mailbox out of Dovecot's users file for the
length of one message, then puts it back.
"""

from __future__ import annotations

import email
import uuid
from email import policy

from mailpath import SENDER, submit, wait_until_sent
from scenario import address, container, messages_with, site, wait_for
from submission import HELO, authentication_on_internet, received_at_correspondent

DOVECOT_USERS = "/etc/dovecot/users"
GONE = "other@" + site()["site_domains"][0]  # in the address book; out of Dovecot's users for this test
BOUNCE_TIMEOUT = 150  # seconds: the intake long-polls, then the DSN crosses home's Postfix and the edge


def dovecot_knows(address: str) -> bool:
    return container("home").run("doveadm user %s", address).rc == 0


def test_a_recipient_dovecot_refuses_is_bounced_to_the_sender_through_the_edge():
    home = container("home")
    marker = f"yestls-bounce-{uuid.uuid4().hex}"
    users = home.file(DOVECOT_USERS).content_string
    assert any(line.startswith(GONE + ":") for line in users.splitlines()), users
    home.check_output("cp -p %s %s.yestls-test && sed -i %s %s", DOVECOT_USERS, DOVECOT_USERS,
                      "/^" + GONE.replace(".", "\\.") + ":/d", DOVECOT_USERS)
    try:
        # Dovecot notices a changed users file on a later lookup (it looks at most once a second)
        assert wait_for(lambda: not dovecot_knows(GONE), timeout=10), f"Dovecot still knows {GONE}"
        submit(marker, GONE)
        attempt = wait_until_sent(marker)  # the edge took it: the address book names it
        dsn = wait_for(lambda: received_at_correspondent(marker), timeout=BOUNCE_TIMEOUT, interval=2)
    finally:
        home.check_output("mv %s.yestls-test %s && touch %s", DOVECOT_USERS, DOVECOT_USERS, DOVECOT_USERS)
        assert wait_for(lambda: dovecot_knows(GONE), timeout=10), f"Dovecot did not take {GONE} back"
    assert dsn, f"no DSN for {marker} (spool id {attempt.spool_id}) reached {SENDER}"

    report = email.message_from_bytes(dsn, policy=policy.default)
    assert report["Return-Path"] == "<>"  # a bounce is sent from the null sender
    assert report["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{GONE.split('@')[1]}"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    human, status, headers = report.get_payload()
    blocks = status.get_payload()
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks[1:]] == [
        (f"rfc822; {GONE}", "failed", "5.1.1")]
    assert f"<{GONE}>: 550 5.1.1" in human.get_content()
    assert marker in str(headers)  # the original's header (its Message-ID), not its body
    assert f"The marker of this message is {marker}" not in dsn.decode(errors="replace")

    # it left home through the edge like any outbound mail: the edge's address, its name, DKIM signed
    checked = authentication_on_internet(dsn, address("edge"), "", HELO)
    assert sorted((sig["d"], sig["ok"]) for sig in checked["dkim"]) == [
        (GONE.split("@")[1], True), (GONE.split("@")[1], True)], checked
    assert checked["spf"] == "pass", checked  # the null sender: SPF checks the HELO name

    # and the mailbox, back in Dovecot, never got it
    assert messages_with(marker, GONE) == []
