"""The audit log (relay/audit.py): bounded lines, refusals summarized past a rate, a size-capped rotated file.

Whatever a peer puts in a field (a 1 MiB string, a deeply nested object, a
huge integer, characters JSON must escape) the line stays valid JSON within
MAX_LINE bytes and keeps its time, peer, method and outcome. Refusals from one
source past its burst and rate become one summary line per interval, counting
every one by outcome, while successes are always written; a source that
proved nothing (`"authenticated": false`) cannot use up the budget of the
authenticated one. The file never grows past `max_bytes`, keeps `backups`
older files, loses no line at a rotation, and writes each line with one
write(2) (the pin on logging.handlers.RotatingFileHandler's internals). The
settings come from oracle.toml and edge.toml's [spool_service].
"""

import asyncio
import json
import os
from pathlib import Path

import pytest

from relay import audit as audit_module
from relay.audit import MAX_LINE, MAX_SOURCES, MIN_MAX_BYTES, AuditLog, AuditSettings, load_audit_settings
from relay.config import ConfigError, Table
from relay.edge import config as edge_config
from relay.identity import generate_identity

MiB = 1 << 20


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def raw_lines(path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# --- every value bounded ---------------------------------------------------------------------------------------

def nested(depth: int):
    value = "leaf"
    for _ in range(depth):
        value = {"k": value, "list": [value] * 3}
    return value


HOSTILE_FIELDS = {
    "1 MiB key_id": {"key_id": "k" * MiB},
    "1 MiB server_name of escapes": {"server_name": "\x00" * MiB},
    "astral characters": {"server_name": "\U0001F600" * 100_000},
    "1 MiB method": {"method": "m" * MiB},
    "method an object": {"method": {"name": ["x" * 1000] * 1000}},
    "1 MiB field name": {"n" * MiB: 1},
    "10 000 fields": {f"field{i}": "v" * 200 for i in range(10_000)},
    "deep nesting": {"facts": nested(200)},
    "wide object": {"facts": {str(i): "x" * 300 for i in range(100_000)}},
    "long list": {"facts": list(range(1_000_000))},
    "huge integer": {"scheme": 1 << 100_000},
    "not finite": {"scheme": float("nan"), "rate": float("inf")},
    "bytes": {"tail": b"\xff" * MiB},
    "everything at once": {"key_id": "k" * MiB, "server_name": "\\" * MiB, "message": "\"" * MiB,
                           "facts": {"a": ["\U0001F600" * 10_000] * 100}, **{f"x{i}": "y" * 256 for i in range(40)}},
}


@pytest.mark.parametrize("name", list(HOSTILE_FIELDS))
def test_every_value_is_bounded_nested_ones_too(tmp_path, name):
    log = AuditLog(tmp_path / "audit.jsonl")
    fields = {"peer": "edge", "method": "sign", **HOSTILE_FIELDS[name], "outcome": "refused:bad_request"}
    log.record(**fields)
    log.refusal(**fields)
    log.close()
    written = raw_lines(tmp_path / "audit.jsonl")
    assert len(written) == 2
    for raw in written:
        assert len(raw) <= MAX_LINE and raw.endswith(b"\n") and raw.isascii()
        line = json.loads(raw)
        assert line["time"].endswith("Z") and line["peer"] == "edge" and line["outcome"] == "refused:bad_request"
        assert "method" in line


def test_a_cut_value_says_how_much_was_cut(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.record(peer="edge", method="sign", key_id="k" * 1000, facts=list(range(100)), outcome="refused:unknown_key")
    log.close()
    [line] = lines(tmp_path / "audit.jsonl")
    assert line["key_id"] == "k" * 256 + "...(+744 chars)"
    assert line["facts"][:16] == list(range(16)) and line["facts"][16] == "... 84 more items"


def test_ordinary_lines_are_written_whole_in_the_documented_shape(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.record(peer="edge", method="sign", key_id="4b09" * 8, scheme=1027, server_name="mx.example.org",
               client_random="fa" * 32, transcript_hash="e1" * 32, cipher_suite=4865, outcome="signed")
    log.close()
    raw = (tmp_path / "audit.jsonl").read_text()
    assert raw.startswith('{"time":"') and raw.endswith('"outcome":"signed"}\n')
    [line] = lines(tmp_path / "audit.jsonl")
    assert list(line) == ["time", "peer", "method", "key_id", "scheme", "server_name", "client_random",
                          "transcript_hash", "cipher_suite", "outcome"]
    assert line["key_id"] == "4b09" * 8 and line["scheme"] == 1027


# --- refusals past the rate become summaries --------------------------------------------------------------------

def test_refusals_past_the_burst_are_summarized_by_outcome_and_successes_never_are(tmp_path):
    clock = Clock()
    log = AuditLog(tmp_path / "audit.jsonl", refusal_rate=1.0, refusal_burst=5, summary_interval=10, clock=clock)
    written = [log.refusal(peer="edge", method="sign", outcome="refused:policy.sni_mismatch") for _ in range(60)]
    written += [log.refusal(peer="edge", method="sign", outcome="refused:rate_limited") for _ in range(40)]
    for _ in range(30):
        log.record(peer="edge", method="sign", outcome="signed")
    assert written.count(True) == 5
    clock.now += 10  # the interval is over: the next refusal of the source carries the summary
    assert log.refusal(peer="edge", method="sign", outcome="refused:rate_limited")  # a token came back meanwhile
    log.flush_summaries()
    log.close()
    got = lines(tmp_path / "audit.jsonl")
    assert sum(line["outcome"] == "signed" for line in got) == 30
    full = [line for line in got if line["outcome"].startswith("refused:")]
    assert len(full) == 6
    [summary] = [line for line in got if line["outcome"] == "summarized"]
    assert summary["peer"] == "edge" and summary["method"] == "refusals" and "authenticated" not in summary
    assert summary["count"] == 95
    assert summary["outcomes"] == {"refused:policy.sni_mismatch": 55, "refused:rate_limited": 40}
    assert summary["since"].endswith("Z")


def test_a_sustained_flood_writes_the_rate_and_one_summary_per_interval(tmp_path):
    clock = Clock()
    log = AuditLog(tmp_path / "audit.jsonl", refusal_rate=2.0, refusal_burst=10, summary_interval=10, clock=clock)
    sent = 0
    for _ in range(600):  # 60 s at 1000 refusals a second
        for _ in range(100):
            log.refusal(peer="10.77.0.9", method="connect", outcome="refused:peer_not_allowed")
            sent += 1
        clock.now += 0.1
    log.close()
    got = lines(tmp_path / "audit.jsonl")
    full = [line for line in got if line["outcome"] == "refused:peer_not_allowed"]
    summaries = [line for line in got if line["outcome"] == "summarized"]
    assert len(full) <= 10 + 2 * 60 + 1
    assert 5 <= len(summaries) <= 7  # one per 10 s, and the rest at close
    assert len(full) + sum(s["count"] for s in summaries) == sent  # every refusal counted once


def test_unauthenticated_refusals_do_not_use_the_authenticated_peers_budget(tmp_path):
    clock = Clock()
    log = AuditLog(tmp_path / "audit.jsonl", refusal_rate=0.1, refusal_burst=3, summary_interval=10, clock=clock)
    for _ in range(1000):
        log.refusal(peer="edge", authenticated=False, method="sign", outcome="refused:not_authenticated")
    assert [log.refusal(peer="edge", method="sign", outcome="refused:policy.sni_mismatch") for _ in range(3)] == \
        [True] * 3
    log.close()
    summaries = [line for line in lines(tmp_path / "audit.jsonl") if line["outcome"] == "summarized"]
    assert [(s["peer"], s.get("authenticated"), s["count"]) for s in summaries] == [("edge", False, 997)]


def test_sources_are_limited_apart_up_to_a_bound_then_share_one(tmp_path):
    clock = Clock()
    log = AuditLog(tmp_path / "audit.jsonl", refusal_rate=0.1, refusal_burst=1, summary_interval=10, clock=clock)
    for address in range(1000):
        for _ in range(3):
            log.refusal(peer=f"10.0.{address // 256}.{address % 256}", method="connect",
                        outcome="refused:peer_not_allowed")
    log.close()
    got = lines(tmp_path / "audit.jsonl")
    full = [line for line in got if line["outcome"] != "summarized"]
    summaries = [line for line in got if line["outcome"] == "summarized"]
    assert len(full) == MAX_SOURCES + 1  # one line each for the first sources, one for all the others
    assert len(summaries) == MAX_SOURCES + 1 and {"peer": "*"}.items() <= summaries[-1].items()
    assert len(full) + sum(s["count"] for s in summaries) == 3000


def test_the_summary_is_written_by_a_timer_when_the_flood_stops(tmp_path):
    """Within an event loop nobody needs to refuse again for the summary to appear."""
    path = tmp_path / "audit.jsonl"

    async def main():
        log = AuditLog(path, refusal_rate=0.01, refusal_burst=1, summary_interval=0.05)
        for _ in range(20):
            log.refusal(peer="edge", authenticated=False, method="hello", outcome="refused:not_authenticated")
        for _ in range(500):
            if path.read_text().count('"summarized"'):
                break
            await asyncio.sleep(0.01)
        summaries = [line for line in lines(path) if line["outcome"] == "summarized"]
        log.close()
        return summaries

    [summary] = asyncio.run(main())
    assert summary["count"] == 19 and summary["authenticated"] is False


# --- the file: capped, rotated, one write per line ----------------------------------------------------------------

def test_the_file_never_grows_past_its_cap_and_keeps_its_backups(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=MIN_MAX_BYTES, backups=2)
    sizes = []
    for n in range(3000):
        log.record(peer="edge", method="sign", n=n, padding="p" * (n % 7 * 40), big="b" * (MiB if n % 97 == 0 else 0),
                   outcome="signed")
        sizes.append(path.stat().st_size)
    log.close()
    assert max(sizes) <= MIN_MAX_BYTES
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(f.stat().st_size <= MIN_MAX_BYTES for f in files)
    # Oldest to newest, the kept lines are consecutive: nothing lost at a rotation.
    numbers = [line["n"] for f in reversed(files) for line in lines(f)]
    assert numbers == list(range(numbers[0], 3000)) and numbers[0] > 0


def test_a_file_left_over_the_cap_is_rotated_at_the_first_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"old": true}\n' * 20_000)  # from a version without a cap
    log = AuditLog(path, max_bytes=MIN_MAX_BYTES, backups=1)
    log.record(peer="edge", method="auth", outcome="ok")
    log.close()
    assert [line["method"] for line in lines(path)] == ["auth"]
    assert (tmp_path / "audit.jsonl.1").read_text().count("old") == 20_000


def test_each_line_is_one_write_even_across_a_rotation(tmp_path, monkeypatch):
    """Pins how RotatingFileHandler writes through audit._LineFile: one os.write per line, newline included."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=MIN_MAX_BYTES, backups=1)
    writes = []
    real_write = os.write

    def counting_write(fd, data):
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    for n in range(200):
        log.record(peer="edge", method="sign", n=n, padding="p" * 2000, outcome="signed")
    monkeypatch.undo()
    log.close()
    assert (tmp_path / "audit.jsonl.1").exists(), "no rotation happened"
    assert len(writes) == 200
    assert all(w.endswith(b"\n") and w.count(b"\n") == 1 and json.loads(w)["n"] == n for n, w in enumerate(writes))
    assert oct(path.stat().st_mode & 0o777) == oct(0o640 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_line_that_cannot_be_written_raises(tmp_path):
    """The caller must know: the oracle does not hand out a signature whose audit line failed."""
    log = AuditLog(tmp_path / "audit.jsonl")
    log._handler.stream.close()  # the descriptor is gone, as after a disk error
    with pytest.raises(OSError):
        log.record(peer="edge", method="sign", outcome="signed")


# --- settings ------------------------------------------------------------------------------------------------------

def settings_from(tmp_path, text: str, **options) -> AuditSettings:
    path = tmp_path / "service.toml"
    path.write_text(text)
    table = Table.load(path)
    settings = load_audit_settings(table, **options)
    table.done()
    return settings


def test_settings_default_and_read_from_the_config(tmp_path):
    assert settings_from(tmp_path, 'audit_log = "/var/log/a.jsonl"\n') == AuditSettings(Path("/var/log/a.jsonl"))
    assert settings_from(tmp_path, "", default_path="/var/log/b.jsonl").path.name == "b.jsonl"
    got = settings_from(tmp_path, 'audit_log = "a.jsonl"\naudit_max_bytes = 1048576\naudit_backups = 3\n'
                                  'audit_refusal_rate = 0.5\naudit_refusal_burst = 7\n')
    assert (got.max_bytes, got.backups, got.refusal_rate, got.refusal_burst) == (MiB, 3, 0.5, 7)
    opened = AuditLog.open(AuditSettings(tmp_path / "x.jsonl", refusal_rate=0.5, refusal_burst=7))
    assert (opened.refusal_rate, opened.refusal_burst) == (0.5, 7)
    opened.close()


@pytest.mark.parametrize("text", ["audit_max_bytes = 1000", "audit_backups = 0", "audit_refusal_rate = 0",
                                  "audit_refusal_rate = inf", "audit_refusal_burst = 0", 'audit_backups = "3"'])
def test_bad_settings_are_refused_with_the_key_named(tmp_path, text):
    key = text.split(" =")[0]
    with pytest.raises(ConfigError, match=key):
        settings_from(tmp_path, f'audit_log = "a.jsonl"\n{text}\n')


def test_the_audit_log_is_required_where_there_is_no_default(tmp_path):
    with pytest.raises(ConfigError, match="audit_log"):
        settings_from(tmp_path, "")


def test_the_smallest_cap_holds_lines_of_the_largest_size(tmp_path):
    """MIN_MAX_BYTES leaves room for a few MAX_LINE lines, so a line never lands in a file over the cap."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1, backups=1)  # below the minimum: raised to it
    for n in range(10):
        log.record(peer="edge", method="sign", n=n, **{f"f{i}": "\x00" * 256 for i in range(audit_module.MAX_FIELDS)},
                   outcome="signed")
        assert path.stat().st_size <= MIN_MAX_BYTES
    log.close()
    assert all(len(raw) > MAX_LINE // 2 for raw in raw_lines(path))


def test_the_edge_reads_the_same_settings_for_its_spool_service(tmp_path):
    """edge.toml's [spool_service] takes the audit_* keys (and its peer the gate's auth_timeout,
    max_unauthenticated); absent, the defaults apply."""
    identity = generate_identity(tmp_path / "home.key")
    base = ('hostname = "mx.example.org"\ndomains = ["example.org"]\n'
            '[oracle]\nservers = ["127.0.0.1:7443"]\nidentity_key = "/nonexistent"\n'
            '[spool]\npublic_key = "mlkem768-x25519:unused-here"\n')
    peer = f'[[spool_service.peer]]\nname = "home"\naddresses = ["127.0.0.1"]\nidentity = "{identity}"\n'
    path = tmp_path / "edge.toml"
    path.write_text(base + '[spool_service]\nlisten = ["127.0.0.1:7444"]\n' + peer)
    defaults = edge_config.load(path).spool_service
    assert defaults.audit == AuditSettings(Path("/var/log/yestls-edge/spool-audit.jsonl"))
    assert defaults.audit_log == defaults.audit.path
    path.write_text(base + '[spool_service]\nlisten = ["127.0.0.1:7444"]\naudit_log = "/x/audit.jsonl"\n'
                    'audit_max_bytes = 1048576\naudit_backups = 3\naudit_refusal_rate = 0.5\n'
                    'audit_refusal_burst = 7\n' + peer + 'auth_timeout = 2\nmax_unauthenticated = 8\n')
    service = edge_config.load(path).spool_service
    assert service.audit == AuditSettings(Path("/x/audit.jsonl"), MiB, 3, 0.5, 7)
    assert (service.peers[0].auth_timeout, service.peers[0].max_unauthenticated) == (2.0, 8)
    path.write_text(base + '[spool_service]\nlisten = ["127.0.0.1:7444"]\naudit_backups = 0\n' + peer)
    with pytest.raises(ConfigError, match="spool_service.audit_backups"):
        edge_config.load(path)
