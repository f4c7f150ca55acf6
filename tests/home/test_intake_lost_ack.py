"""An acknowledgement whose answer is lost: the edge deleted the message, the intake never heard so. The
ledger row must not stay "done, not acknowledged" forever (it would never be pruned): once a complete,
honest listing no longer names the message, it is taken as acknowledged. Delivered once either way."""

from relay.home.ledger import DONE, Ledger
from relay.rpc import Code, RemoteError

from ..dovecot import run_dovecot
from ..home_site import EDGE, make_intake, run_intake
from ..hostile_edge import EDGE_RECEIVED, hostile_edge
from ..intake_mail import SENDER, USER, message, spool_id_of, wait_for


def test_a_finished_message_the_edge_no_longer_lists_is_taken_as_acknowledged(tmp_path):
    with hostile_edge(tmp_path / "edge") as edge, run_dovecot((USER,)) as dovecot:
        intake = make_intake(edge, dovecot)
        spool_id = edge.seal({"mail_from": SENDER, "rcpt_tos": [USER]}, EDGE_RECEIVED + message("lost ack"))

        async def lost(params, honest):
            await honest()   # the edge deletes the file...
            raise RemoteError(Code.INTERNAL, "connection reset")   # ...and the answer never reaches home

        edge.lie("ack", lost)

        def entry():
            ledger = Ledger(intake.ledger)
            try:
                return ledger.edge(EDGE).get(spool_id)
            finally:
                ledger.close()

        with run_intake(intake) as process:
            wait_for(lambda: edge.spooled_ids() == [], "the edge to delete the message",
                     details=lambda: process.log()[-4000:])
            wait_for(lambda: (e := entry()) is not None and e.state == DONE and e.acked,
                     "the next listing to settle the row", details=lambda: process.log()[-4000:])
            log = process.log()
        assert f"edge {EDGE}: 1 finished message(s) no longer listed: taken as acknowledged" in log
        assert sum(1 for method, params in edge.requests if method == "ack") == 1, "acknowledged once"
        assert [spool_id_of(m) for m in dovecot.fetch_all(USER)] == [spool_id], "delivered once"
