"""Home's spam filter without the intake (roles/home_spam, roles/home_mail;
docs/spam.md): Sieve files what is marked spam in Junk; moving mail into or
out of Junk over IMAP teaches rspamd; the site's allow and deny lists; rspamd
and redis reachable from home itself only.
"""

from __future__ import annotations

import json
import uuid

from scenario import HOME_LAN, INTERNET, address, container, mailbox, site, tcp_probe, wait_for
from spamfilter import (
    JUNK,
    bayes_learned,
    checkv2,
    doveadm_save,
    imap_session,
    learnt_as,
    lmtp_deliver,
    message,
    move,
    uids_with,
)

USER = mailbox()
SENDER = "someone@sender.test"
LEARN_TIMEOUT = 120  # seconds: rspamc stat shows redis's counts as the controller last read them
RSPAMD_PORTS = (11332, 11333, 11334, 11335)  # proxy (off), normal, controller, fuzzy (off)
REDIS_PORT = 6379


def test_moving_a_message_into_junk_learns_spam_and_out_of_it_learns_ham():
    marker = f"yestls-learn-{uuid.uuid4().hex}"
    message_id = f"{marker}@sender.test"
    doveadm_save(USER, message(marker, SENDER, USER))
    before = bayes_learned()

    with imap_session(USER) as imap:
        move(imap, "INBOX", marker, JUNK)
    assert wait_for(lambda: learnt_as(message_id), timeout=30) == ["spam"]
    spam = wait_for(lambda: (now := bayes_learned())["BAYES_SPAM"] > before["BAYES_SPAM"] and now,
                    timeout=LEARN_TIMEOUT, interval=3)
    assert spam, f"rspamc stat: BAYES_SPAM learned stayed at {bayes_learned()['BAYES_SPAM']}"

    with imap_session(USER) as imap:
        move(imap, JUNK, marker, "INBOX")
        assert len(uids_with(imap, "INBOX", marker)) == 1
    assert wait_for(lambda: learnt_as(message_id) == ["spam", "ham"], timeout=30), learnt_as(message_id)
    ham = wait_for(lambda: (now := bayes_learned())["BAYES_HAM"] > spam["BAYES_HAM"] and now,
                   timeout=LEARN_TIMEOUT, interval=3)
    assert ham, f"rspamc stat: BAYES_HAM learned stayed at {bayes_learned()['BAYES_HAM']}"


def test_moving_a_message_from_junk_to_trash_learns_nothing():
    marker = f"yestls-trash-{uuid.uuid4().hex}"
    doveadm_save(USER, message(marker, SENDER, USER), JUNK)
    with imap_session(USER) as imap:
        imap.create("Trash")  # as a client does; Dovecot gives it the special-use \Trash
        move(imap, JUNK, marker, "Trash")
        assert len(uids_with(imap, "Trash", marker)) == 1
        # a move that does learn, after it: the controller's log is in order
        move(imap, "Trash", marker, JUNK)
    message_id = f"{marker}@sender.test"
    assert wait_for(lambda: learnt_as(message_id), timeout=30) == ["spam"]


def test_a_message_marked_spam_is_filed_in_junk_and_one_not_marked_in_the_inbox():
    spam, ham = (f"yestls-junk-{kind}-{uuid.uuid4().hex}" for kind in ("spam", "ham"))
    lmtp_deliver(SENDER, USER, message(spam, SENDER, USER, "X-Spam: Yes\r\n"))
    lmtp_deliver(SENDER, USER, message(ham, SENDER, USER))
    with imap_session(USER) as imap:
        assert len(uids_with(imap, JUNK, spam)) == 1
        assert uids_with(imap, "INBOX", spam) == []
        assert len(uids_with(imap, "INBOX", ham)) == 1
        assert uids_with(imap, JUNK, ham) == []
        _, listing = imap.list('""', JUNK)
        assert b"\\Junk" in listing[0], listing
        _, subscribed = imap.lsub('""', JUNK)
        assert subscribed[0] and JUNK.encode() in subscribed[0], subscribed


def _verdict(sender: str, from_header: str) -> dict:
    text = message(f"yestls-lists-{uuid.uuid4().hex}", SENDER, USER).replace(f"From: <{SENDER}>",
                                                                            f"From: <{from_header}>")
    return checkv2(text, {"MTA-Name": site()["site_mx_name"], "IP": "192.0.2.1", "Helo": "mail.sender.test",
                          "Hostname": "mail.sender.test", "From": sender, "Rcpt": USER})


def test_the_answer_carries_the_headers_the_intake_adds_named_by_the_mx():
    answer = _verdict(SENDER, SENDER)
    headers = answer["milter"]["add_headers"]
    assert {"Authentication-Results", "X-Spamd-Result", "X-Spam-Status"} <= set(headers), json.dumps(answer)
    assert headers["Authentication-Results"]["value"].startswith(site()["site_mx_name"] + ";")
    assert answer["action"] in ("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject")


def test_the_deny_list_rejects_by_address_and_by_domain_in_envelope_or_header():
    by_header_address = _verdict(SENDER, "spammer@deny.example")
    by_envelope_domain = _verdict("anyone@denied.example", SENDER)
    for answer in (by_header_address, by_envelope_domain):
        assert "YESTLS_DENY" in answer["symbols"], sorted(answer["symbols"])
        assert answer["action"] == "reject"
    assert "YESTLS_DENY" not in _verdict(SENDER, SENDER)["symbols"]


def test_the_allow_list_gives_nothing_to_a_from_header_its_domain_did_not_authenticate():
    # friend@allowed.example is listed; nothing in DNS authenticates allowed.example (no DMARC pass)
    answer = _verdict("friend@allowed.example", "friend@allowed.example")
    assert "YESTLS_ALLOW_HEADER_ADDRESS" in answer["symbols"], sorted(answer["symbols"])
    assert "YESTLS_ALLOW" not in answer["symbols"]


def test_rspamd_and_redis_listen_on_loopback_only():
    # (ss cannot name the processes here: the container's root may not read their file descriptors)
    listening = container("home").check_output("ss -Hltn").splitlines()
    sockets = {line.split()[3] for line in listening}
    ours = {s for s in sockets if int(s.rsplit(":", 1)[1]) in (*RSPAMD_PORTS, REDIS_PORT)}
    assert ours == {"127.0.0.1:11333", "127.0.0.1:11334"}, sorted(sockets)
    # redis answers on its UNIX socket, to rspamd's user
    pong = container("home").check_output("runuser -u _rspamd -- redis-cli -s /run/redis/redis-server.sock ping")
    assert pong == "PONG"
    targets = [(address("home", network), port) for network in (INTERNET, HOME_LAN)
               for port in (*RSPAMD_PORTS, REDIS_PORT)]
    targets += [(site()["site_tunnel_home_address"], port) for port in (*RSPAMD_PORTS, REDIS_PORT)]
    from_edge = tcp_probe("edge", targets)
    assert [t for t, state in from_edge.items() if state == "open"] == [], from_edge
