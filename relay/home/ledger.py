"""The intake's ledger: what happened to each sealed message, so a crash loses or repeats nothing.

One row per (edge, spool id): each edge names its own messages, and an edge
may be compromised, so one edge's ids never touch another's rows — an edge
that reuses an id it saw (in a forwarded message's X-YesTLS-Spool-Id) cannot
make the intake take another edge's message for one already done. A message is `delivering` until every recipient has a
final answer, then `done` (or `quarantined`); only then is it acknowledged to
the edge, which deletes it. Before the message goes to Dovecot the recipients
about to be tried are marked `in_doubt`: if the intake dies before recording
Dovecot's answer, the next run asks Dovecot whether the message (found by its
X-YesTLS-Spool-Id header) is already there instead of delivering it twice.

SQLite in WAL mode with synchronous=FULL: a committed step survives a crash.
"""

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PENDING, IN_DOUBT, DELIVERED, FAILED = "pending", "in_doubt", "delivered", "failed"
DELIVERING, DONE, QUARANTINED = "delivering", "done", "quarantined"


@dataclass
class Recipient:
    status: str = PENDING
    attempts: int = 0
    reply: str = ""


@dataclass
class Entry:
    spool_id: str
    state: str
    recipients: dict[str, Recipient] = field(default_factory=dict)
    next_attempt: float = 0.0
    acked: bool = False

    def pending(self) -> list[str]:
        return [r for r, info in self.recipients.items() if info.status in (PENDING, IN_DOUBT)]

    def final(self) -> bool:
        return not self.pending()


_COLUMNS = ("state TEXT NOT NULL, recipients TEXT NOT NULL, next_attempt REAL NOT NULL, acked INTEGER NOT NULL, "
            "updated REAL NOT NULL")


class Ledger:
    """The ledger file; `edge(name)` is one edge's part of it."""

    def __init__(self, path: Path, *, first_edge: str | None = None):
        """`first_edge`: the edge a ledger from before edges had names belongs to (the one edge it served):
        its rows are moved to that name, once, in one transaction."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        columns = [row[1] for row in self.db.execute("PRAGMA table_info(messages)")]
        if columns and "edge" not in columns:
            self._name_the_edge(first_edge)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS messages (edge TEXT NOT NULL, spool_id TEXT NOT NULL, "
                        f"{_COLUMNS}, PRIMARY KEY (edge, spool_id))")

    def _name_the_edge(self, first_edge: str | None) -> None:
        if first_edge is None:
            raise ValueError("this ledger is from before edges had names: open it with the edge it served "
                             "(the intake does: the first of [edges] in intake.toml)")
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("ALTER TABLE messages RENAME TO messages_unnamed")
            self.db.execute(f"CREATE TABLE messages (edge TEXT NOT NULL, spool_id TEXT NOT NULL, {_COLUMNS}, "
                            "PRIMARY KEY (edge, spool_id))")
            self.db.execute("INSERT INTO messages SELECT ?, spool_id, state, recipients, next_attempt, acked, updated "
                            "FROM messages_unnamed ORDER BY rowid", (first_edge,))
            self.db.execute("DROP TABLE messages_unnamed")

    def edge(self, name: str) -> "EdgeLedger":
        return EdgeLedger(self.db, name)

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())

    def forget_acked_before(self, seconds: float) -> None:
        """Rows of acknowledged messages are kept a while (a late duplicate is recognised), then pruned."""
        self.db.execute("DELETE FROM messages WHERE acked = 1 AND updated < ?", (time.time() - seconds,))

    def close(self) -> None:
        self.db.close()


class EdgeLedger:
    """One edge's messages in the ledger, by their spool ids."""

    def __init__(self, db: sqlite3.Connection, name: str):
        self.db = db
        self.name = name

    def get(self, spool_id: str) -> Entry | None:
        row = self.db.execute("SELECT state, recipients, next_attempt, acked FROM messages "
                              "WHERE edge = ? AND spool_id = ?", (self.name, spool_id)).fetchone()
        if row is None:
            return None
        recipients = {r: Recipient(**info) for r, info in json.loads(row[1]).items()}
        return Entry(spool_id, row[0], recipients, row[2], bool(row[3]))

    @contextmanager
    def commit(self) -> Iterator[None]:
        """Every save inside in one transaction: one fsync for a run of messages. Nothing inside may await:
        the edges' loops share the connection."""
        with self.db:
            self.db.execute("BEGIN")
            yield

    def save(self, entry: Entry) -> None:
        recipients = json.dumps({r: vars(info) for r, info in entry.recipients.items()})
        self.db.execute(
            "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(edge, spool_id) DO UPDATE SET "
            "state = excluded.state, recipients = excluded.recipients, next_attempt = excluded.next_attempt, "
            "acked = excluded.acked, updated = excluded.updated",
            (self.name, entry.spool_id, entry.state, recipients, entry.next_attempt, int(entry.acked), time.time()))

    def start(self, spool_id: str, recipients: list[str]) -> Entry:
        """The message's entry; a new one is first written with its in-doubt marks (one commit, not two)."""
        entry = self.get(spool_id)
        if entry is None:
            entry = Entry(spool_id, DELIVERING, {r: Recipient() for r in dict.fromkeys(recipients)})
        return entry

    def waiting_retries(self) -> dict[str, tuple[float, int]]:
        """Messages still being delivered that wait for a retry: spool id -> (when, tries so far).

        Read once at start, so a restarted intake keeps its backoff instead of trying them all at once."""
        rows = self.db.execute("SELECT spool_id, recipients, next_attempt FROM messages "
                               "WHERE edge = ? AND state = ? AND acked = 0 AND next_attempt > 0",
                               (self.name, DELIVERING)).fetchall()
        return {spool_id: (next_attempt, max((r["attempts"] for r in json.loads(recipients).values()), default=1))
                for spool_id, recipients, next_attempt in rows}

    def finished_unacked(self) -> list[str]:
        """Messages done or quarantined whose acknowledgement the edge has not confirmed (yet)."""
        return [row[0] for row in self.db.execute(
            "SELECT spool_id FROM messages WHERE edge = ? AND acked = 0 AND state IN (?, ?)",
            (self.name, DONE, QUARANTINED))]

    def mark_acked(self, spool_ids: list[str]) -> None:
        """The edge deleted these: one commit for a whole batch."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("UPDATE messages SET acked = 1, updated = ? WHERE edge = ? AND spool_id = ?",
                                [(time.time(), self.name, spool_id) for spool_id in spool_ids])
