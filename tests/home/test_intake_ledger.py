"""The intake's ledger (relay/home/ledger.py) on its own: pruning, and what a restart reads back."""

import sqlite3
import time

from relay.home.ledger import DELIVERED, DELIVERING, DONE, PENDING, Entry, Ledger, Recipient


def entry(spool_id: str, state: str = DONE, **fields) -> Entry:
    status = DELIVERED if state == DONE else PENDING
    return Entry(spool_id, state, {"user@example.org": Recipient(status, attempts=1)}, **fields)


def age(ledger: Ledger, spool_id: str, seconds: float) -> None:
    """Make a row look `seconds` old (its last update)."""
    ledger.db.execute("UPDATE messages SET updated = ? WHERE spool_id = ?", (time.time() - seconds, spool_id))


def test_pruning_forgets_only_acknowledged_rows_older_than_the_horizon(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for spool_id in ("old-acked", "new-acked", "old-unacked", "old-delivering"):
        ledger.save(entry(spool_id, DELIVERING if spool_id == "old-delivering" else DONE))
    ledger.mark_acked(["old-acked", "new-acked"])
    for spool_id in ("old-acked", "old-unacked", "old-delivering"):
        age(ledger, spool_id, 8 * 86400)
    ledger.forget_acked_before(7 * 86400)
    kept = {row[0] for row in ledger.db.execute("SELECT spool_id FROM messages")}
    # acknowledged and a week old: gone; acknowledged lately, or never acknowledged (the edge still has it): kept
    assert kept == {"new-acked", "old-unacked", "old-delivering"}
    assert ledger.get("old-acked") is None and ledger.get("old-unacked").state == DONE
    ledger.close()


def test_waiting_retries_are_the_unfinished_unacknowledged_ones_with_a_time(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.save(Entry("waits", DELIVERING, {"a@example.org": Recipient(PENDING, attempts=2),
                                            "b@example.org": Recipient(PENDING, attempts=4)}, next_attempt=123.5))
    ledger.save(entry("fresh", DELIVERING))
    ledger.save(entry("done", DONE, next_attempt=99.0))
    assert ledger.waiting_retries() == {"waits": (123.5, 4)}
    ledger.close()


def test_the_ledger_commits_each_step(tmp_path):
    """What one connection saved, another (a restarted intake) reads at once: no transaction left open."""
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    ledger.save(entry("one", DELIVERING, next_attempt=5.0))
    other = sqlite3.connect(path)
    assert other.execute("SELECT state, next_attempt FROM messages WHERE spool_id = 'one'").fetchone() == (
        DELIVERING, 5.0)
    other.close()
    ledger.close()
