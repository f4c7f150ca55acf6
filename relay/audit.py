"""The audit log of a tunnel service (the key oracle, the spool): one JSON line per decision, bounded and rotated.

It owns three things:

- **The line.** A JSON object on one line, `time` first, then `peer`,
  `method`, `outcome` and the rest. Every value is bounded here, nested ones
  too (`bounded()`: strings cut to MAX_STRING characters, lists and objects
  to MAX_ITEMS entries and MAX_DEPTH levels), and a line never exceeds
  MAX_LINE bytes: fields that would overflow it are dropped (time, peer,
  method and outcome are kept first) and counted in `"dropped"`. Nothing a peer sends (a 200 KiB key id, SNI or method name)
  can make a line big. Lines are ASCII (JSON escapes the rest).
- **Refusals, rate-limited per source.** `record()` always writes its line
  (a signature, an authentication, a spool fetch). `refusal()` writes one
  only while the source (the line's `peer`, and whether the connection had
  proved its identity: `"authenticated": false`) is within `refusal_burst`
  lines at once and `refusal_rate` lines a second; past that its refusals are
  counted, and one summary line per SUMMARY_INTERVAL seconds says how many,
  by outcome:
  `{"time", "peer", ["authenticated": false,] "method": "refusals", "outcome": "summarized",
  "count": N, "outcomes": {"refused:<code>": n, ...}, "since": TIME}`.
  Metrics are the callers' and count every refusal.
- **The file.** Size-capped and rotated by logging.handlers.RotatingFileHandler:
  it never grows past `max_bytes`, then becomes `PATH.1` (`PATH.1` becomes
  `PATH.2`, ... up to `backups`; the oldest is deleted). Each line still goes
  out in a single write(2) on an O_APPEND descriptor (`_LineFile` and
  `_RotatingLines`, the one place that depends on the handler's internals), so a crash loses at most
  the line being written (and a summary's counts not yet written: at most
  SUMMARY_INTERVAL of refusals past the rate) and lines never interleave. A
  rotation only renames files: a crash during it loses no line. A line that cannot be written
  raises: the caller must not hand out a signature it could not audit.
"""

import asyncio
import itertools
import json
import logging
import logging.handlers
import math
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from relay.config import Table
from relay.ratelimit import TokenBucket

MAX_STRING = 256           # characters of one string value
MAX_KEY = 64               # characters of one object key
MAX_ITEMS = 16             # entries of one list or object below the top level
MAX_FIELDS = 32            # fields of one line
MAX_DEPTH = 3              # nesting below a field
MAX_LINE = 16 * 1024       # bytes of one line, newline included
SUMMARY_INTERVAL = 10.0    # seconds between two summary lines of one source
MAX_SOURCES = 16           # sources limited apart; the rest share one ("*")
_BIG = 1 << 64             # integers beyond this are described, not written

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_BACKUPS = 5
DEFAULT_REFUSAL_RATE = 2.0
DEFAULT_REFUSAL_BURST = 50
MIN_MAX_BYTES = 4 * MAX_LINE  # room for a few lines of any size before each rotation

_FIRST = ("time", "peer", "authenticated", "method", "outcome")  # kept first when a line is too long


@dataclass(frozen=True)
class AuditSettings:
    path: Path
    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS
    refusal_rate: float = DEFAULT_REFUSAL_RATE
    refusal_burst: int = DEFAULT_REFUSAL_BURST


def load_audit_settings(table: Table, default_path: str | None = None) -> AuditSettings:
    """`audit_log` and its limits, from a service's config table (oracle.toml; edge.toml's [spool_service])."""
    hint = "a JSON-lines file the service appends to"
    path = table.get("audit_log", str, hint=hint) if default_path is None else \
        table.get("audit_log", str, default=default_path, hint=hint)
    return AuditSettings(
        path=Path(path),
        max_bytes=table.get("audit_max_bytes", int, default=DEFAULT_MAX_BYTES, check=lambda n: n >= MIN_MAX_BYTES,
                            hint=f"bytes before the audit log rotates, at least {MIN_MAX_BYTES}"),
        backups=table.get("audit_backups", int, default=DEFAULT_BACKUPS, check=lambda n: 1 <= n <= 1000,
                          hint="rotated files kept, 1..1000"),
        refusal_rate=float(table.get("audit_refusal_rate", (int, float), default=DEFAULT_REFUSAL_RATE,
                                     check=lambda r: 0 < r < math.inf,
                                     hint="refusal lines per second per source before they are summarized")),
        refusal_burst=table.get("audit_refusal_burst", int, default=DEFAULT_REFUSAL_BURST, check=lambda n: n >= 1,
                                hint="refusal lines per source at once before they are summarized"),
    )


# --- bounding values -------------------------------------------------------------------------------------------

def bounded(value, depth: int = 0):
    """`value` as JSON that cannot be big: cut strings, lists and objects; anything else as a short string."""
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else _cut(value, MAX_STRING)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_BIG < value < _BIG else f"<{value.bit_length()}-bit integer>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value[:MAX_STRING // 2])
        return data.hex() + (f"...(+{len(value) - len(data)} bytes)" if len(value) > len(data) else "")
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            return f"<object of {len(value)} entries>"
        out = {_cut(str(key), MAX_KEY): bounded(item, depth + 1)
               for key, item in itertools.islice(value.items(), MAX_ITEMS)}
        if len(value) > MAX_ITEMS:
            out["..."] = f"{len(value) - MAX_ITEMS} more entries"
        return out
    if isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            return f"<list of {len(value)} items>"
        out = [bounded(item, depth + 1) for item in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            out.append(f"... {len(value) - MAX_ITEMS} more items")
        return out
    return _cut(repr(value), MAX_STRING)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} chars)"


_encode = json.JSONEncoder(separators=(",", ":")).encode


def _line(fields: dict) -> str:
    """One JSON line (no newline), fields in their order, at most MAX_LINE - 1 bytes whatever `fields` hold.

    When the bounded fields still do not fit, `time`, `peer`, `authenticated`, `method` and `outcome` are kept
    first, then the others in order while they fit; the number left out is `"dropped"`.
    """
    if len(fields) <= MAX_FIELDS:  # the common case: short strings and small integers, one encoding
        line = {}
        for name, value in fields.items():
            kind = type(value)
            if not (kind is str and len(value) <= MAX_STRING or kind is int and -_BIG < value < _BIG):
                value = bounded(value)
            line[name if type(name) is str and len(name) <= MAX_KEY else _key(name)] = value
        text = _encode(line)
        if len(text) < MAX_LINE:
            return text
    first = [name for name in _FIRST if name in fields]
    chosen = set(first + [name for name in fields if name not in _FIRST][:MAX_FIELDS - len(first)])
    names = [name for name in fields if name in chosen]
    parts = {name: _encode({_key(name): bounded(fields[name])})[1:-1] for name in names}
    dropped = len(fields) - len(names)
    room = MAX_LINE - 40  # for the braces, "dropped" and the newline
    kept, size = set(), 0
    for name in first + [name for name in names if name not in _FIRST]:
        if size + len(parts[name]) + 1 <= room:
            kept.add(name)
            size += len(parts[name]) + 1
    dropped += len(names) - len(kept)
    body = [parts[name] for name in names if name in kept] + ([f'"dropped":{dropped}'] if dropped else [])
    return "{" + ",".join(body) + "}"


def _key(name) -> str:
    return name if isinstance(name, str) and len(name) <= MAX_KEY else _cut(str(name), MAX_KEY)


def _timestamp(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp * 1000) % 1000:03d}Z"


# --- the file --------------------------------------------------------------------------------------------------

class _LineFile:
    """The stream the rotating handler writes to: each write() is one write(2) on an O_APPEND descriptor.

    It keeps the file's size itself (we are its only writer), so deciding to rotate costs no system call.
    """

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        status = os.fstat(self._fd)
        self.regular = stat.S_ISREG(status.st_mode)  # never rotate /dev/null or a pipe (as the library: bpo-45401)
        self.size = status.st_size

    def write(self, text: str) -> None:
        data = text.encode("ascii")
        written = os.write(self._fd, data)
        self.size += written
        if written != len(data):
            raise OSError(f"short write of an audit line ({written} of {len(data)} bytes)")

    def flush(self) -> None:
        pass  # nothing is buffered

    def close(self) -> None:
        os.close(self._fd)


class _RotatingLines(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler over `_LineFile`, given the finished line as its record, raising write errors.

    Its emit() and doRollover() (close, rename PATH.N-1 to PATH.N ... PATH to PATH.1, open) are the library's;
    deciding to rotate is its test (rotate before a line would take the file to `maxBytes`) on the size
    `_LineFile` keeps.
    """

    def _open(self):
        return _LineFile(self.baseFilename)

    def format(self, record) -> str:
        return record  # the line, made by _line(): no LogRecord, no formatter

    def shouldRollover(self, record) -> bool:  # the library's name
        if self.stream is None:
            self.stream = self._open()
        return self.stream.regular and 0 < self.maxBytes <= self.stream.size + len(record) + 1

    def handleError(self, record) -> None:  # called inside emit()'s except block
        raise  # what emit() caught: a line that could not be written is the caller's error

    def write_line(self, line: str) -> None:
        with self.lock:
            self.emit(line)


# --- refusals per source ---------------------------------------------------------------------------------------

@dataclass
class _Source:
    fields: dict                 # what identifies it in a summary: peer (and authenticated: false)
    bucket: TokenBucket
    suppressed: Counter = field(default_factory=Counter)  # outcome -> refusals not written since `since`
    since: float | None = None   # monotonic time of the first of them
    since_wall: float = 0.0


class AuditLog:
    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS,
                 refusal_rate: float = DEFAULT_REFUSAL_RATE, refusal_burst: int = DEFAULT_REFUSAL_BURST,
                 summary_interval: float = SUMMARY_INTERVAL, clock=time.monotonic):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.refusal_rate = refusal_rate
        self.refusal_burst = refusal_burst
        self.summary_interval = summary_interval
        self._clock = clock
        self._handler = _RotatingLines(path, maxBytes=max(max_bytes, MIN_MAX_BYTES), backupCount=backups)
        self._sources: dict[tuple, _Source] = {}
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def open(cls, settings: AuditSettings) -> "AuditLog":
        return cls(settings.path, max_bytes=settings.max_bytes, backups=settings.backups,
                   refusal_rate=settings.refusal_rate, refusal_burst=settings.refusal_burst)

    def record(self, **fields) -> None:
        """Write one line, always: successes (a signature, an authentication, a fetch)."""
        self._write(fields)

    def refusal(self, **fields) -> bool:
        """Write one refusal line if its source is within its rate; else count it for the summary. True if written."""
        now = self._clock()
        source = self._source(fields, now)
        if source.bucket.take(now):
            self._write(fields)
            return True
        source.suppressed[bounded(str(fields.get("outcome")))] += 1
        if source.since is None:
            source.since, source.since_wall = now, time.time()
            self._schedule(self.summary_interval)
        elif now - source.since >= self.summary_interval:
            self._summarize(source)
        return False

    def flush_summaries(self, everything: bool = False) -> None:
        """Write the summary lines that are due (all of them with `everything`)."""
        now = self._clock()
        waiting = []
        for source in self._sources.values():
            if source.since is None:
                continue
            if everything or now - source.since >= self.summary_interval:
                self._summarize(source)
            else:
                waiting.append(source.since + self.summary_interval - now)
        if waiting:
            self._schedule(min(waiting))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush_summaries(everything=True)
        self._handler.close()

    # --- inside ---------------------------------------------------------------------------------------------

    def _write(self, fields: dict) -> None:
        self._handler.write_line(_line({"time": _timestamp(time.time()), **fields}))

    def _source(self, fields: dict, now: float) -> _Source:
        identity = {"peer": bounded(str(fields.get("peer")))}
        if fields.get("authenticated") is False:
            identity["authenticated"] = False
        key = tuple(identity.items())
        source = self._sources.get(key)
        if source is None:
            if len(self._sources) >= MAX_SOURCES:
                key, identity = (("peer", "*"),), {"peer": "*"}
                source = self._sources.get(key)
            if source is None:
                source = self._sources[key] = _Source(identity, TokenBucket(self.refusal_rate, self.refusal_burst, now))
        return source

    def _summarize(self, source: _Source) -> None:
        count = sum(source.suppressed.values())
        outcomes = dict(source.suppressed.most_common(MAX_ITEMS))
        source.suppressed.clear()
        source.since = None
        self._write({**source.fields, "method": "refusals", "outcome": "summarized", "count": count,
                     "outcomes": outcomes, "since": _timestamp(source.since_wall)})

    def _schedule(self, delay: float) -> None:
        """Write due summaries `delay` seconds from now, if an event loop runs (else at the next refusal or close)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is None:  # a pending timer reschedules itself for what is left
            self._timer = loop.call_later(max(delay, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush_summaries()
