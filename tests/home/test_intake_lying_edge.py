"""The intake against an edge that lies about its spool: it logs each lie, keeps running, delivers the rest.

A compromised edge (tests/hostile_edge.py) lists, besides its honest
messages, ids that are paths (`../escape`, an absolute path), ids that are
not hex, a file size no message has, and one message twice, always with
`more: true`; it serves any bytes for any id it is asked about, and answers
one honest message's fetch with a first piece one byte short. The real
`yestls intake serve` delivers the honest messages to a real Dovecot all the
same, never fetches nor writes anything for the bad entries (no file appears
where their ids point), logs each lie once at ERROR, counts it in the status
file (and `yestls status`), keeps the lied-about message on the edge, and
delivers it once the edge answers truthfully again.
"""

import json
import time

import pytest

from relay.rpc import Code, RemoteError
from relay.spool.store import validate_id
from relay.status import intake_rows

from ..dovecot import run_dovecot
from ..fake_rspamd import run_fake_rspamd
from ..home_site import make_intake, run_intake
from ..hostile_edge import EDGE_RECEIVED, hostile_edge
from ..intake_mail import SENDER, USER, by_spool_id, delivered_order, message, split_trace, wait_for


def is_spool_id(value) -> bool:
    try:
        validate_id(value)
        return True
    except ValueError:
        return False


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lying-edge")
    with run_fake_rspamd() as rspamd, hostile_edge(directory / "edge") as edge, run_dovecot((USER,)) as dovecot:
        intake = make_intake(edge, dovecot, rspamd=rspamd.url)
        escape = intake.quarantine / "escape.sealed"   # where "../escape" would land from the edge's directory
        absolute = directory / "absolute.sealed"
        bad_ids = ["../escape", str(directory / "absolute"), "AB" * 16, 42]
        oversized = "f" * 32
        yield edge, dovecot, intake, bad_ids, oversized, (escape, absolute)


def test_lies_are_logged_counted_and_skipped_and_the_honest_mail_flows(world):
    edge, dovecot, intake, bad_ids, oversized, targets = world
    sent = {name: message(name, to=USER) for name in ("honest first", "lied about", "honest last")}
    ids = {name: edge.seal({"mail_from": SENDER, "rcpt_tos": [USER]}, EDGE_RECEIVED + body)
           for name, body in sent.items()}

    async def listing(params, honest):
        meta, tail = await honest()
        entries = meta["messages"]
        lies = [{"id": bad, "size": 1000, "accepted": 1.0} for bad in bad_ids]
        lies.append({"id": oversized, "size": 10 ** 12, "accepted": 1.0})
        again = [e for e in entries if e["id"] == ids["lied about"]]   # listed twice while it is there
        return {"messages": entries + lies + again, "more": True}, tail

    async def fetching(params, honest):
        if not is_spool_id(params.get("id")):
            return {"size": 1000}, b"\0" * 1000          # anything, for an id that names a path
        meta, tail = await honest()
        if params["id"] == ids["lied about"] and params["offset"] == 0:
            return meta, tail[:-1]
        return meta, tail

    edge.lie("list", listing)
    edge.lie("fetch", fetching)
    with run_intake(intake) as process:
        details = lambda: process.log()[-6000:]   # noqa: E731
        inbox = wait_for(lambda: len(m := dovecot.fetch_all(USER)) >= 2 and m, "the honest messages",
                         details=details)
        wait_for(lambda: edge.spooled_ids() == [ids["lied about"]], "the honest messages acknowledged",
                 details=details)
        # The intake delivered them in the edge's order (its log); the mailbox is compared by spool id.
        assert delivered_order(process.log()) == [ids["honest first"], ids["honest last"]]
        by_id = {i: split_trace(m)[1] for i, m in by_spool_id(inbox).items()}
        assert by_id == {ids["honest first"]: sent["honest first"], ids["honest last"]: sent["honest last"]}

        # Nothing was asked or written for the entries that are not spool ids, nor fetched past the cap.
        asked = [params.get("id") for method, params in edge.requests if method in ("fetch", "ack")]
        assert all(is_spool_id(i) for i in asked), asked
        assert oversized not in asked
        assert not any(target.exists() for target in targets)
        assert list(intake.quarantine.iterdir()) == []

        # Each lie once in the log at ERROR, and counted; the intake still runs.
        def status() -> dict:
            return json.loads(intake.status_file.read_text())

        lies = len(bad_ids) + 3   # the bad ids, the oversized entry, the repeated entry, the short piece
        wait_for(lambda: intake.status_file.exists() and status()["protocol_errors"] == lies,
                 f"{lies} protocol errors in the status file", details=details)
        errors = [line for line in process.log().splitlines() if "edge spool protocol error" in line]
        assert all(" ERROR " in line for line in errors)
        assert len(errors) == lies, errors
        for needle in ["'../escape'", repr(bad_ids[1])[:60], "'ABAB", "bad id: 42 ", oversized, "listed twice",
                       f"fetch of {ids['lied about']}: the first piece"]:
            assert any(needle in line for line in errors), (needle, errors)
        assert process.process.poll() is None, "the intake is still running"
        assert "Traceback" not in process.log()

        # The edge tells the truth again: the message it lied about comes in, once.
        edge.honest("fetch")
        inbox = wait_for(lambda: len(m := dovecot.fetch_all(USER)) >= 3 and m, "the lied-about message",
                         details=details)
        wait_for(lambda: edge.spooled_ids() == [], "every message acknowledged", details=details)
        assert delivered_order(process.log()) == [ids["honest first"], ids["honest last"], ids["lied about"]]
        by_id = {i: split_trace(m)[1] for i, m in by_spool_id(inbox).items()}
        assert len(inbox) == 3 and by_id == {ids[name]: body for name, body in sent.items()}
        wait_for(lambda: status()["delivered"] == 3, "the status file to count three deliveries", details=details)
        assert status()["protocol_errors"] == lies, "a lie repeated every round is counted once"
        shown = {row.item: row for row in intake_rows(intake.config, time.time())}
        assert shown["edge protocol errors"].value == lies, "yestls status shows them"


def test_an_error_message_from_the_edge_cannot_forge_a_log_line(world):
    edge, dovecot, intake, *_ = world
    forged = "2026-01-01 00:00:00,000 yestls.intake INFO all is well"

    async def failing(params, honest):
        raise RemoteError(Code.INTERNAL, f"no stats today\n{forged}")

    edge.lie("stats", failing)
    try:
        with run_intake(intake) as process:
            wait_for(lambda: "no stats today" in process.log(), "the edge's error in the intake's log",
                     details=lambda: process.log()[-3000:])
            lines = process.log().splitlines()
    finally:
        edge.honest("stats")
    reported = [line for line in lines if "no stats today" in line]
    assert reported and all(" WARNING " in line and "\\n2026-01-01" in line for line in reported), reported
    assert not any(line.startswith(forged) for line in lines)
