"""Issue 17: one home, several edges (intake.toml's [edges]).

Two edges (the real spool and spool service, tests/hostile_edge.py) and a
third that nobody serves. The intake pulls from all at once: a hung edge and
a dead one hold up none of the others; every message is delivered once; the
ledger keeps each edge's ids apart, so an edge that reuses another's spool id
(a compromised edge that saw it in a forwarded message) neither hides the
other's message nor gets its own taken for it; `yestls status` shows each edge.
"""

import asyncio
import json
import time

import pytest

from relay.home.ledger import DONE, Ledger
from relay.status import intake_rows

from ..dovecot import run_dovecot
from ..home_site import EDGE, make_intake, run_intake
from ..hostile_edge import EDGE_RECEIVED, hostile_edge
from ..intake_mail import SENDER, USER, header_value, message, spool_id_of, wait_for
from ..oracle_home import free_port

SECOND, DEAD = "mx2", "mx3"


@pytest.fixture()
def world(tmp_path):
    with hostile_edge(tmp_path / "edge") as first, hostile_edge(tmp_path / "mx2", home=first) as second, \
            run_dovecot((USER,)) as dovecot:
        # A long request timeout: a hung edge would hold up a loop that served the edges one after another.
        intake = make_intake(first, dovecot, options="timeout = 300",
                             more_edges={SECOND: second.spool_service_port, DEAD: free_port()})
        yield first, second, dovecot, intake


def seal(edge, subject: str, spool_id: str | None = None) -> tuple[str, bytes]:
    body = message(subject, to=USER)
    return edge.seal({"mail_from": SENDER, "rcpt_tos": [USER]}, EDGE_RECEIVED + body, spool_id=spool_id), body


def delivered(inbox: list[bytes], sent: dict) -> list[tuple]:
    """(spool id, the message sent) for each message in the inbox, sorted: each must end with what was sent."""
    by_subject = {header_value(body, "Subject"): body for body in sent.values()}
    found = []
    for m in inbox:
        body = by_subject[header_value(m, "Subject")]
        assert m.endswith(EDGE_RECEIVED + body), m[-600:]
        found.append((spool_id_of(m), body))
    return sorted(found)


def test_every_edge_is_drained_at_once_and_each_message_delivered_once(world):
    first, second, dovecot, intake = world
    sent = {}   # (edge, spool id) -> the message
    for n in range(3):
        spool_id, body = seal(first, f"first edge {n}")
        sent[EDGE, spool_id] = body
    reused = next(spool_id for edge, spool_id in sent if edge == EDGE)
    for n in range(2):
        spool_id, body = seal(second, f"second edge {n}")
        sent[SECOND, spool_id] = body
    spool_id, body = seal(second, "second edge, with the first edge's id", spool_id=reused)
    assert spool_id == reused
    sent[SECOND, reused] = body

    # The first edge (first in [edges]) hangs on every listing: the second edge's mail comes in meanwhile.
    release = asyncio.Event()

    async def hung(params, honest):
        await release.wait()
        return await honest()

    first.lie("list", hung)
    with run_intake(intake) as process:
        def details() -> str:
            return process.log()[-6000:]

        wait_for(lambda: second.spooled_ids() == [], "the second edge drained while the first hangs", details=details)
        assert delivered(dovecot.fetch_all(USER), sent) == sorted(
            (i, b) for (e, i), b in sent.items() if e == SECOND)
        assert first.spooled_ids() != [], "the hung edge's mail is still there"

        first.loop.call_soon_threadsafe(release.set)
        first.honest("list")
        wait_for(lambda: first.spooled_ids() == [], "the first edge drained once it answers", details=details)
        inbox = wait_for(lambda: len(m := dovecot.fetch_all(USER)) >= len(sent) and m, "every message",
                         details=details)

        # Each message once, the two with the same spool id both (one from each edge), nothing else.
        assert len(inbox) == len(sent) == 6
        assert delivered(inbox, sent) == sorted((i, b) for (_, i), b in sent.items())

        # The ledger: each edge's messages under its own name, done and acknowledged.
        def acknowledged() -> bool:
            ledger = Ledger(intake.ledger)
            try:
                return all((e := ledger.edge(edge).get(spool_id)) and e.state == DONE and e.acked
                           for edge, spool_id in sent)
            finally:
                ledger.close()

        wait_for(acknowledged, "every message acknowledged in its edge's part of the ledger", details=details)

        # The status file and `yestls status`: every edge, the dead one never reached.
        def status() -> dict | None:
            current = json.loads(intake.status_file.read_text())
            edges = current["edges"]
            return current if edges[EDGE]["depth"] == 0 and edges[SECOND]["depth"] == 0 else None

        reported = wait_for(status, "both edges reported empty", details=lambda: intake.status_file.read_text())
        assert reported["delivered"] == 6 and reported["edges"][DEAD]["last_contact"] is None
        assert reported["edges"][EDGE]["connected"] and reported["edges"][SECOND]["connected"]
        assert not reported["edges"][DEAD]["connected"]
        rows = {row.item: row for row in intake_rows(intake.config, time.time()) if row.section == "edges"}
        assert list(rows) == [EDGE, SECOND, DEAD]
        for name in (EDGE, SECOND):
            assert rows[name].text.startswith("connected; last contact "), rows[name].text
            assert rows[name].text.endswith("; nothing waiting"), rows[name].text
        assert "has not reached this edge" in rows[DEAD].unknown

        log = process.log()
        assert f"edge {DEAD} spool 127.0.0.1:" in log, "the dead edge is retried, and named"
        assert "Traceback" not in log and " ERROR " not in log
