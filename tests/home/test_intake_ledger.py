"""The intake's ledger (relay/home/ledger.py) on its own: rows keyed by (edge, spool id), pruning, what a restart
reads back, and a ledger from before edges had names."""

import sqlite3
import time

import pytest

from relay.home.ledger import DELIVERED, DELIVERING, DONE, PENDING, QUARANTINED, Entry, Ledger, Recipient


def entry(spool_id: str, state: str = DONE, **fields) -> Entry:
    status = DELIVERED if state == DONE else PENDING
    return Entry(spool_id, state, {"user@example.org": Recipient(status, attempts=1)}, **fields)


def age(ledger: Ledger, spool_id: str, seconds: float) -> None:
    """Make a row look `seconds` old (its last update)."""
    ledger.db.execute("UPDATE messages SET updated = ? WHERE spool_id = ?", (time.time() - seconds, spool_id))


def test_one_edges_ids_never_touch_anothers_rows(tmp_path):
    """A compromised edge that reuses an id the honest one used (it saw it in a forwarded message) gets a row
    of its own: the honest edge's message is not taken for done, acknowledged or retried by it."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    honest, liar = ledger.edge("mx1"), ledger.edge("mx2")
    same = "ab" * 16
    honest.save(entry(same, DELIVERING, next_attempt=50.0))
    liar.save(entry(same, DONE))
    liar.mark_acked([same])
    assert honest.get(same).state == DELIVERING and not honest.get(same).acked
    assert liar.get(same).state == DONE and liar.get(same).acked
    assert honest.waiting_retries() == {same: (50.0, 1)} and liar.waiting_retries() == {}
    assert ledger.edge("mx3").get(same) is None
    assert ledger.counts() == {DELIVERING: 1, DONE: 1}
    ledger.close()


def test_pruning_forgets_only_acknowledged_rows_older_than_the_horizon(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    edge, other = ledger.edge("edge"), ledger.edge("other")
    for spool_id in ("old-acked", "new-acked", "old-unacked", "old-delivering"):
        edge.save(entry(spool_id, DELIVERING if spool_id == "old-delivering" else DONE))
    edge.mark_acked(["old-acked", "new-acked"])
    other.save(entry("other-old-acked"))
    other.mark_acked(["other-old-acked"])
    for spool_id in ("old-acked", "old-unacked", "old-delivering", "other-old-acked"):
        age(ledger, spool_id, 8 * 86400)
    ledger.forget_acked_before(7 * 86400)
    kept = {row[0] for row in ledger.db.execute("SELECT spool_id FROM messages")}
    # acknowledged and a week old: gone (every edge's); acknowledged lately, or never acknowledged (the edge still
    # has it): kept
    assert kept == {"new-acked", "old-unacked", "old-delivering"}
    assert edge.get("old-acked") is None and edge.get("old-unacked").state == DONE
    ledger.close()


def test_waiting_retries_are_the_unfinished_unacknowledged_ones_with_a_time(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    edge = ledger.edge("edge")
    edge.save(Entry("waits", DELIVERING, {"a@example.org": Recipient(PENDING, attempts=2),
                                          "b@example.org": Recipient(PENDING, attempts=4)}, next_attempt=123.5))
    edge.save(entry("fresh", DELIVERING))
    edge.save(entry("done", DONE, next_attempt=99.0))
    assert edge.waiting_retries() == {"waits": (123.5, 4)}
    ledger.close()


def test_the_ledger_commits_each_step(tmp_path):
    """What one connection saved, another (a restarted intake) reads at once: no transaction left open."""
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    ledger.edge("edge").save(entry("one", DELIVERING, next_attempt=5.0))
    other = sqlite3.connect(path)
    assert other.execute("SELECT edge, state, next_attempt FROM messages WHERE spool_id = 'one'").fetchone() == (
        "edge", DELIVERING, 5.0)
    other.close()
    ledger.close()


def unnamed_ledger(path) -> None:
    """A ledger as the intake kept it before edges had names: one row per spool id."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE messages (spool_id TEXT PRIMARY KEY, state TEXT NOT NULL, recipients TEXT NOT NULL, "
               "next_attempt REAL NOT NULL, acked INTEGER NOT NULL, updated REAL NOT NULL)")
    rows = [("c" * 32, DONE, '{"u@example.org": {"status": "delivered", "attempts": 1, "reply": "250 ok"}}', 0, 1, 7),
            ("a" * 32, DELIVERING, '{"u@example.org": {"status": "pending", "attempts": 2, "reply": ""}}', 99, 0, 8),
            ("b" * 32, QUARANTINED, "{}", 0, 0, 9)]
    db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()


def test_a_ledger_from_before_edges_had_names_becomes_the_first_edges(tmp_path):
    path = tmp_path / "ledger.sqlite"
    unnamed_ledger(path)
    ledger = Ledger(path, first_edge="mx1")
    edge = ledger.edge("mx1")
    assert edge.get("c" * 32).state == DONE and edge.get("c" * 32).acked
    assert edge.get("c" * 32).recipients["u@example.org"] == Recipient(DELIVERED, 1, "250 ok")
    assert edge.get("b" * 32).state == QUARANTINED
    assert edge.waiting_retries() == {"a" * 32: (99.0, 2)}
    assert ledger.edge("mx2").get("c" * 32) is None
    # every row, in its first order (the intake's order of recording), and the old table gone
    assert [r[0] for r in ledger.db.execute("SELECT spool_id FROM messages ORDER BY rowid")] == [
        "c" * 32, "a" * 32, "b" * 32]
    assert [r[0] for r in ledger.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["messages"]
    ledger.close()
    reopened = Ledger(path, first_edge="other")   # done once: a later first edge does not take the rows
    assert reopened.edge("mx1").get("a" * 32).state == DELIVERING and reopened.edge("other").get("a" * 32) is None
    reopened.close()


def test_an_unnamed_ledger_is_not_opened_without_its_edge(tmp_path):
    path = tmp_path / "ledger.sqlite"
    unnamed_ledger(path)
    with pytest.raises(ValueError, match="before edges had names"):
        Ledger(path)
    check = sqlite3.connect(path)
    assert check.execute("SELECT COUNT(*) FROM messages").fetchone() == (3,), "left as it was"
    check.close()


def test_finished_unacked_are_the_done_and_quarantined_ones_of_that_edge_not_acknowledged(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    edge, other = ledger.edge("edge"), ledger.edge("other")
    edge.save(entry("done"))
    edge.save(Entry("quarantined", QUARANTINED))
    edge.save(entry("delivering", DELIVERING))
    edge.save(entry("acked"))
    edge.mark_acked(["acked"])
    other.save(entry("others"))
    assert sorted(edge.finished_unacked()) == ["done", "quarantined"]
    assert other.finished_unacked() == ["others"]
    ledger.close()
