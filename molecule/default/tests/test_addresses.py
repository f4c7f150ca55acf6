"""The addresses people use (one source of truth, the inventory: molecule.yml's
site_mailboxes, site_aliases, site_catch_all, site_plus_separator), from the
Internet: `internet`'s Postfix delivers through the edge, the intake expands
them at home, each message lands in the right mailboxes.
"""

from __future__ import annotations

import uuid

import pytest
from mailpath import submit, wait_until_sent
from scenario import mailbox, messages_with, wait_for

DELIVERY_TIMEOUT = 120  # seconds: the intake long-polls, Dovecot delivers at once
USER = mailbox()  # user@example.org
ANN = "ann@example.net"


@pytest.mark.parametrize(
    ("recipient", "mailboxes"),
    [
        (f"{USER.split('@')[0]}+tag@{USER.split('@')[1]}", [USER]),  # plus-addressing
        (ANN, [ANN]),  # a mailbox in the second domain
        ("info@example.net", [USER, ANN]),  # an alias with two mailboxes
        (f"postmaster@{USER.split('@')[1]}", [USER]),  # an alias in the first domain
        ("anything-else@example.net", [ANN]),  # the second domain's catch-all
    ],
    ids=["plus", "second-domain", "alias-two-mailboxes", "postmaster", "catch-all"],
)
def test_mail_from_the_internet_reaches_the_right_mailboxes(recipient, mailboxes):
    marker = f"yestls-addr-{uuid.uuid4().hex}"
    submit(marker, recipient)
    wait_until_sent(marker)
    for address in mailboxes:
        found = wait_for(lambda a=address: messages_with(marker, a), timeout=DELIVERY_TIMEOUT, interval=2)
        assert len(found) == 1, f"{marker} (to {recipient}) did not reach {address}"
    others = {USER, ANN, f"other@{USER.split('@')[1]}"} - set(mailboxes)
    assert [a for a in others if messages_with(marker, a)] == []
