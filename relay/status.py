"""`yestls status`: how this host's part of YesTLS is doing, from what its services publish.

One table (or `--json`) on either host, read-only, each part optional:

    tunnel        `wg show all latest-handshakes`: each WireGuard peer's last handshake
    oracle        on the edge: is an oracle up (the edge's metrics) and a `ping` round trip to each
                  oracle in edge.toml (the tunnel gate answers ping before authentication, so no key
                  is read and nothing is audited); at home: the oracle's metrics (requests, sign time)
    policy        the oracle-down policy the edge runs with, and what is in force now
    door          on the edge: clients rejected at the door, by reason
    verdict       on the edge: messages rejected, deferred, accepted by home's before-queue verdict,
                  and those that had none (home absent, too slow, too large)
    spool         on the edge: its sealed spool's depth and oldest age (the edge's metrics)
    edges         at home: each edge the intake pulls from (intake.toml's [edges]): connected or not,
                  last contact, and its spool's depth and oldest age as the edge last told the intake
    egress        at home with several edges (egress.toml): the edge home's mail leaves through
    intake        the intake's status file: pulled, delivered, retried,
                  failed, bounced, quarantined, the ledger's counts, DSNs waiting, the edge's protocol
                  errors if any; senders' TLS reports (sessions failed, by result type) when read
    certificates  the oracle keystore's chains and when each leaf expires (chain files only: no
                  private key is opened); on the edge, the chains it serves (its metrics); at home
                  with site.toml's [acme], each ACME certificate's expiry, next renewal and last
                  error (its state.json, relay/certs/store.py)

Configs default to /etc/yestls/{edge,oracle,intake,site,backup,egress}.toml where present. A part
that cannot be read shows "unknown (why)"; `yestls status` itself does not fail.
"""

import asyncio
import datetime
import enum
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIRECTORY = Path("/etc/yestls")
CONFIGS = ("edge", "oracle", "intake", "site", "backup", "egress")   # each NAME.toml, --NAME-config
SECTIONS = ("tunnel", "oracle", "policy", "door", "verdict", "spool", "edges", "egress", "intake", "certificates", "backup")
TIMEOUT = 2.0   # seconds for each endpoint asked
POLICY_MEANING = {
    "tempfail": "new connections get 421 until an oracle answers; senders retry",
    "resume-only": "only resumed TLS sessions proceed (no signature needed); others are deferred",
    "plaintext": "mail is accepted WITHOUT TLS until an oracle answers",
}


@dataclass
class Row:
    section: str
    item: str
    value: object = None         # JSON-ready; None when unknown
    text: str = ""               # what the table shows
    unknown: str | None = None   # why the value is not known

    def shown(self) -> str:
        return f"unknown ({self.unknown})" if self.unknown is not None else self.text


def unknown(section: str, item: str, why: str) -> Row:
    return Row(section, item, unknown=why)


@dataclass
class Status:
    host: str
    time: float
    configs: dict[str, str | None]
    rows: list[Row] = field(default_factory=list)

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)

    def as_json(self) -> dict:
        sections: dict[str, dict] = {name: {} for name in SECTIONS}
        for row in self.rows:
            sections[row.section][row.item] = {"unknown": row.unknown} if row.unknown is not None else row.value
        return {"host": self.host, "time": _iso(self.time), "configs": self.configs, **sections}

    def as_table(self) -> str:
        order = {name: i for i, name in enumerate(SECTIONS)}
        rows = sorted(self.rows, key=lambda row: order[row.section])  # stable: items keep their order
        header = ("SECTION", "ITEM", "STATUS")
        cells = [(row.section, row.item, row.shown()) for row in rows]
        width = [max(len(line[i]) for line in [header, *cells]) for i in range(2)]
        lines = [f"YesTLS status of {self.host} at {_iso(self.time)}",
                 "  ".join(h.ljust(w) for h, w in zip(header, width + [0])).rstrip()]
        previous = None
        for section, item, text in cells:
            shown_section = section if section != previous else ""
            previous = section
            lines.append(f"{shown_section.ljust(width[0])}  {item.ljust(width[1])}  {text}")
        return "\n".join(lines) + "\n"


# --- small helpers ------------------------------------------------------------------------------------

def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(seconds: float) -> str:
    """A duration for people: 42 s, 5 min, 3 h 10 min, 12 days."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{seconds / 86400:.0f} days"


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower() if not error.filename else f"{error.filename}: {error.strerror.lower()}"
    return str(error) or type(error).__name__


def _connect_host(host: str) -> str:
    """Where to reach a service listening on `host` from this host (a wildcard address means loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_config(kind: str, path: Path):
    """The parsed config, or raises with a message naming the file."""
    if kind == "edge":
        from relay.edge import config
    elif kind == "oracle":
        from relay.oracle import config
    else:
        from relay.home import config
    return config.load(path)


# --- Prometheus metrics -----------------------------------------------------------------------------------

class Metrics:
    """One scrape of a /metrics endpoint: samples by name, each a list of (labels, value)."""

    def __init__(self, samples: dict[str, list[tuple[dict, float]]]):
        self.samples = samples

    @classmethod
    def scrape(cls, host: str, port: int, timeout: float = TIMEOUT) -> "Metrics":
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://{_endpoint(_connect_host(host), port)}/metrics"
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy
        with direct.open(url, timeout=timeout) as response:
            text = response.read(4 * 1024 * 1024).decode("utf-8", "replace")
        samples: dict[str, list[tuple[dict, float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return cls(samples)

    def value(self, name: str, **labels) -> float | None:
        for sample_labels, value in self.samples.get(name, []):
            if all(sample_labels.get(k) == v for k, v in labels.items()):
                return value
        return None

    def labelled(self, name: str) -> list[tuple[dict, float]]:
        return self.samples.get(name, [])


def scrape_or_why(kind: str, config) -> tuple["Metrics | None", str | None, str]:
    """(metrics, None, endpoint) or (None, why, endpoint) for a service's metrics_listen."""
    if config.metrics_listen is None:
        return None, f"{kind}.toml sets no metrics_listen", ""
    host, port = config.metrics_listen
    endpoint = _endpoint(_connect_host(host), port)
    try:
        return Metrics.scrape(host, port), None, endpoint
    except (OSError, ValueError) as error:
        return None, f"the {kind}'s metrics at {endpoint}: {_reason(error)}", endpoint


# --- the parts ----------------------------------------------------------------------------------------------

def tunnel_rows(now: float, run: Callable = subprocess.run) -> list[Row]:
    """Each WireGuard peer's latest handshake (`wg show all latest-handshakes`)."""
    if shutil.which("wg") is None:
        return [unknown("tunnel", "last handshake", "wg is not installed")]
    try:
        result = run(["wg", "show", "all", "latest-handshakes"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as error:
        return [unknown("tunnel", "last handshake", f"wg show: {_reason(error)}")]
    if result.returncode != 0:
        first = (result.stderr or result.stdout).strip().splitlines()
        return [unknown("tunnel", "last handshake", f"wg show: {first[0] if first else f'exit {result.returncode}'}")]
    rows = []
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[2].isdigit():
            continue
        interface, peer, stamp = parts[0], parts[1], int(parts[2])
        item = f"{interface} peer {peer[:10]}..."
        value = {"interface": interface, "peer": peer, "latest_handshake": _iso(stamp) if stamp else None,
                 "age_seconds": round(now - stamp, 1) if stamp else None}
        if stamp == 0:
            rows.append(Row("tunnel", item, value, "no handshake yet (peer unreachable or idle since start)"))
        else:
            stale = "; older than 3 min: the tunnel is idle or down" if now - stamp > 180 else ""
            rows.append(Row("tunnel", item, value, f"last handshake {ago(now - stamp)} ago ({_iso(stamp)}){stale}"))
    return rows or [unknown("tunnel", "last handshake", "no WireGuard interface is up on this host")]


async def _ping(host: str, port: int, timeout: float) -> float:
    """Seconds for one `ping` round trip to a tunnel service (connection set up first, not counted)."""
    from relay.rpc import RpcConnection

    loop = asyncio.get_running_loop()
    _, connection = await asyncio.wait_for(loop.create_connection(RpcConnection, host, port), timeout)
    try:
        started = time.perf_counter()
        await connection.call("ping", {}, timeout=timeout)
        return time.perf_counter() - started
    finally:
        connection.close()


def ping_rows(servers) -> list[Row]:
    async def all_pings():
        return await asyncio.gather(*(_ping(host, port, TIMEOUT) for host, port in servers), return_exceptions=True)

    rows = []
    for (host, port), result in zip(servers, asyncio.run(all_pings())):
        item = f"ping {_endpoint(host, port)}"
        if isinstance(result, BaseException):
            why = "timed out" if isinstance(result, asyncio.TimeoutError) else _reason(result)
            rows.append(Row("oracle", item, {"reachable": False, "error": why}, f"UNREACHABLE ({why})"))
        else:
            rows.append(Row("oracle", item, {"reachable": True, "rtt_ms": round(result * 1e3, 2)},
                            f"reachable, round trip {result * 1e3:.1f} ms"))
    return rows


def edge_rows(path: Path | None, now: float) -> list[Row]:
    """The edge's view: oracle up (and a ping to each), the policy, the spool, the chains it serves."""
    if path is None:
        return []
    try:
        config = load_config("edge", path)
    except Exception as error:  # noqa: BLE001 - any unreadable config is shown, not raised
        why = f"{path}: {error}"
        return [unknown("oracle", "reachable", why), unknown("policy", "oracle down", why),
                unknown("spool", "depth", why)]
    rows: list[Row] = []
    metrics, why, endpoint = scrape_or_why("edge", config)
    configured = config.smtp.oracle_down
    if metrics is None:
        rows.append(unknown("oracle", "reachable", why))
        rows.append(Row("policy", "oracle down", {"policy": configured, "source": "edge.toml"},
                        f"{configured} (from {path}; the running edge's metrics: {why}): {POLICY_MEANING[configured]}"))
        rows.append(unknown("spool", "depth", why))
        rows.append(unknown("spool", "oldest", why))
    else:
        up = metrics.value("yestls_edge_oracle_up")
        policy = next((labels.get("policy") for labels, value in metrics.labelled("yestls_edge_oracle_down_policy")
                       if value == 1), None)
        if up is None:
            rows.append(unknown("oracle", "reachable", f"{endpoint} has no yestls_edge_oracle_up"))
        else:
            rows.append(Row("oracle", "reachable", bool(up),
                            "up: the edge has a working oracle connection" if up else
                            "DOWN: no oracle answers the edge"))
        if policy is None:
            rows.append(unknown("policy", "oracle down", f"{endpoint} has no yestls_edge_oracle_down_policy"))
        else:
            rows.append(Row("policy", "oracle down", {"policy": policy, "source": "edge metrics"},
                            f"{policy}: {POLICY_MEANING.get(policy, '')}"))
            if up is not None:
                now_text = "normal: TLS with the oracle's signatures" if up else f"{policy} (the oracle is down)"
                rows.append(Row("policy", "in force now", "normal" if up else policy, now_text))
        rows.append(door_row(metrics))
        rows.append(verdict_row(metrics))
        depth = metrics.value("yestls_spool_depth")
        oldest = metrics.value("yestls_spool_oldest_age_seconds")
        size = metrics.value("yestls_spool_bytes")
        if depth is None:
            rows.append(unknown("spool", "depth", f"{endpoint} has no yestls_spool_depth"))
        else:
            extra = f", {size / 1024:.0f} KiB sealed" if size is not None else ""
            rows.append(Row("spool", "depth", int(depth), f"{int(depth)} message(s) waiting for home{extra}"))
        if oldest is None:
            rows.append(unknown("spool", "oldest", f"{endpoint} has no yestls_spool_oldest_age_seconds"))
        else:
            rows.append(Row("spool", "oldest", round(oldest, 1),
                            f"{ago(oldest)} waiting" if depth else "none waiting"))
        for labels, expires in metrics.labelled("yestls_edge_certificate_not_after_seconds"):
            name = labels.get("name", "?")
            rows.append(expiry_row(f"served {name}", expires, now, name=name, source="edge metrics"))
    rows.extend(ping_rows(config.oracle.servers))
    return rows


def _counts_by_label(metrics: "Metrics", metric: str, label: str, values: type[enum.Enum]) -> dict | None:
    """A counter's samples as {value: count} for every member of `values` (0 when absent),
    or None when the edge exports no such counter (the feature is off)."""
    samples = metrics.labelled(metric)
    if not samples:
        return None
    counts = {member.value: 0 for member in values}
    for labels, value in samples:
        if labels.get(label) in counts:
            counts[labels[label]] = int(value)
    return counts


def door_row(metrics: "Metrics") -> Row:
    """Clients rejected at the edge's door since it started, by reason (relay/edge/door.py)."""
    from relay.edge.door import DOOR_REFUSED_METRIC, DoorReason

    counts = _counts_by_label(metrics, DOOR_REFUSED_METRIC + "_total", "reason", DoorReason)
    if counts is None:
        return Row("door", "rejected at the door", None, "no door checks configured ([door] in edge.toml)")
    total = sum(counts.values())
    text = ", ".join(f"{reason} {n}" for reason, n in counts.items() if n) or "none"
    return Row("door", "rejected at the door", counts, f"{total} since the edge started: {text}" if total else
               "none since the edge started")


def verdict_row(metrics: "Metrics") -> Row:
    """Messages under home's before-queue verdict since the edge started, by outcome (relay/edge/verdict.py)."""
    from relay.edge.verdict import VERDICT_METRIC, VerdictOutcome

    counts = _counts_by_label(metrics, VERDICT_METRIC + "_total", "outcome", VerdictOutcome)
    if counts is None:
        return Row("verdict", "rejected by verdict", None, "no before-queue verdict ([verdict] in edge.toml)")
    text = ", ".join(f"{outcome} {n}" for outcome, n in counts.items() if n) or "no message yet"
    return Row("verdict", "rejected by verdict", counts,
               f"{counts['rejected']} rejected, {counts['deferred']} deferred since the edge started ({text})")


def oracle_rows(path: Path | None, now: float) -> list[Row]:
    """Home's oracle: its metrics and its keystore's certificates."""
    if path is None:
        return []
    try:
        config = load_config("oracle", path)
    except Exception as error:  # noqa: BLE001
        why = f"{path}: {error}"
        return [unknown("oracle", "service", why), unknown("certificates", "expiry", why)]
    rows: list[Row] = []
    metrics, why, endpoint = scrape_or_why("oracle", config)
    if metrics is None:
        rows.append(unknown("oracle", "service", why))
    else:
        requests = {}
        for labels, value in metrics.labelled("yestls_oracle_requests_total"):
            requests[f"{labels.get('method')} {labels.get('outcome')}"] = int(value)
        rows.append(Row("oracle", "service", {"metrics": endpoint, "up": True}, f"running (metrics at {endpoint})"))
        text = ", ".join(f"{k} {v}" for k, v in sorted(requests.items())) or "none since start"
        rows.append(Row("oracle", "requests", requests, text))
        count = metrics.value("yestls_oracle_sign_seconds_count")
        total = metrics.value("yestls_oracle_sign_seconds_sum")
        if count:
            mean = total / count
            rows.append(Row("oracle", "sign time", {"mean_ms": round(mean * 1e3, 2), "signatures": int(count)},
                            f"mean {mean * 1e3:.1f} ms over {int(count)} signature(s)"))
        refusals = {labels.get("reason"): int(value)
                    for labels, value in metrics.labelled("yestls_oracle_refusals_total") if value}
        rows.append(Row("oracle", "refusals", refusals,
                        ", ".join(f"{k} {v}" for k, v in sorted(refusals.items())) or "none since start"))
    rows.extend(certificate_rows(config.keystore, now))
    return rows


def expiry_row(item: str, expires: float, now: float, **value) -> Row:
    """A certificate's row: when its leaf expires, loudly when soon or past."""
    left = expires - now
    if left <= 0:
        text = f"EXPIRED {_iso(expires)} ({ago(-left)} ago)"
    else:
        warn = ": RENEW SOON" if left < 21 * 86400 else ""
        text = f"expires {_iso(expires)} (in {ago(left)}){warn}"
    return Row("certificates", item, {**value, "not_after": _iso(expires), "days_left": round(left / 86400, 1)}, text)


def certificate_rows(keystore_dir: Path, now: float) -> list[Row]:
    from relay.oracle.keystore import Keystore, KeystoreError

    try:
        keystore = Keystore(keystore_dir)
        entries = keystore.public_entries()
        pending = keystore.pending()
    except (KeystoreError, OSError) as error:
        return [unknown("certificates", "expiry", f"keystore {keystore_dir}: {_reason(error)}")]
    rows = []
    for entry in entries:
        names = sorted(entry.chain.names)
        rows.append(expiry_row(f"{entry.key_type} {', '.join(names)}", entry.not_after.timestamp(), now,
                               key_id=entry.key_id, key_type=entry.key_type, names=names))
    for key_id in pending:
        rows.append(Row("certificates", f"key {key_id}", {"key_id": key_id, "chain": None},
                        "no certificate yet (`yestls keys import`)"))
    return rows or [unknown("certificates", "expiry", f"keystore {keystore_dir} holds no certificate chain")]


def acme_rows(path: Path | None, now: float) -> list[Row]:
    """Each ACME certificate's state.json under site.toml's [acme] state_dir (`yestls cert renew` writes them)."""
    if path is None:
        return []
    from relay import site as site_toml
    from relay.certs.store import CertificateError, certificate_dirs, parse_iso

    try:
        acme = site_toml.load(path).acme
    except Exception as error:  # noqa: BLE001
        return [unknown("certificates", "acme", f"{path}: {error}")]
    if acme is None:
        return []
    try:
        directories = certificate_dirs(acme.state_dir)
    except OSError as error:
        return [unknown("certificates", "acme", f"{acme.state_dir}: {_reason(error)}")]
    rows = []
    for directory in directories:
        item = f"acme {directory.label}"
        try:
            state = directory.state()
        except CertificateError as error:
            rows.append(unknown("certificates", item, str(error)))
            continue
        expires, next_attempt = parse_iso(state.not_after), parse_iso(state.next_attempt)
        value = {"not_after": state.not_after, "next_attempt": state.next_attempt, "last_error": state.last_error,
                 "failures": state.failures, "last_success": state.last_success}
        parts = [expiry_row(item, expires.timestamp(), now).text if expires else "no certificate yet"]
        parts.append(f"next renewal {state.next_attempt}" if next_attempt else "renewal at the next run")
        if state.failures:
            parts.append(f"FAILING ({state.failures} in a row): {state.last_error}")
        rows.append(Row("certificates", item, value, "; ".join(parts)))
    return rows or [unknown("certificates", "acme", f"no certificate under {acme.state_dir / 'certificates'}")]


def backup_rows(path: Path | None, now: float, home: bool) -> list[Row]:
    """The last backup and check as `yestls backup` recorded them (relay/backup/take.py), old ones flagged;
    at home (an intake runs here) without backup.toml, a warning."""
    if path is None:
        return [unknown("backup", "last success", "NOT BACKED UP: no backup.toml on this home "
                                                  "(roles/home_backup, docs/backup.md)")] if home else []
    from relay.backup import config as backup_config
    from relay.backup.take import BackupStatus

    try:
        config = backup_config.load(path)
        state = BackupStatus.read(config.status_file)
    except Exception as error:  # noqa: BLE001 - any failure to read is shown, not raised
        return [unknown("backup", "last success", f"{path}: {error}")]
    value = {"repository": config.repository, **vars(state)}
    if state.last_success is None:
        text = "NEVER: no backup has succeeded yet (`yestls backup run`)"
    else:
        age = now - state.last_success
        text = (f"{_iso(state.last_success)} ({ago(age)} ago), snapshot {state.snapshot}, {state.files} files, "
                f"{state.bytes_added} bytes new")
        if age > config.max_age_hours * 3600:
            text = f"OLD (over {config.max_age_hours:g} h): {text}"
    if state.last_error and (state.last_attempt or 0) >= (state.last_success or 0):
        text += f"; the last try FAILED: {state.last_error}"
    rows = [Row("backup", "last success", value, text)]
    if state.last_check is not None:
        check = f"{_iso(state.last_check)} ({ago(now - state.last_check)} ago)"
        check += f": FAILED: {state.last_check_error}" if state.last_check_error else ": sound"
        rows.append(Row("backup", "last check", {"time": state.last_check, "error": state.last_check_error}, check))
    return rows


def intake_rows(path: Path | None, now: float) -> list[Row]:
    """The intake's status file (relay/home/intake.py writes it after each pull)."""
    if path is None:
        return [unknown("intake", "progress", "no intake.toml on this host")]
    try:
        config = load_config("intake", path)
    except Exception as error:  # noqa: BLE001
        return [unknown("intake", "progress", f"{path}: {error}")]
    try:
        status = json.loads(config.status_file.read_text())
        if not isinstance(status, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return [unknown("intake", "progress", f"no status file at {config.status_file}: the intake has not run")]
    except (OSError, ValueError) as error:
        return [unknown("intake", "progress", f"status file {config.status_file}: {_reason(error)}")]
    rows = []
    updated = status.get("updated")
    if isinstance(updated, (int, float)):
        # Written after every pull, and at least every `poll` seconds while the intake waits for mail.
        stale = (f"; not rewritten for {ago(now - updated)}: the intake is stopped, or busy with a long backlog"
                 if now - updated > 2 * config.poll + 30 else "")
        rows.append(Row("intake", "status written", _iso(updated),
                        f"{ago(now - updated)} ago ({config.status_file}){stale}"))
    edges = status.get("edges") if isinstance(status.get("edges"), dict) else {}
    rows.extend(edge_row(edge.name, edges.get(edge.name), now) for edge in config.edges)
    counters = {k: status.get(k) for k in ("pulled", "delivered", "retried", "failed", "bounced", "quarantined")}
    rows.append(Row("intake", "progress", counters,
                    ", ".join(f"{k} {v}" for k, v in counters.items()) + " (since the intake started)"))
    ledger = status.get("ledger") if isinstance(status.get("ledger"), dict) else {}
    rows.append(Row("intake", "ledger", ledger,
                    ", ".join(f"{k} {v}" for k, v in sorted(ledger.items())) or "empty"))
    if status.get("retrying"):
        rows.append(Row("intake", "retrying", status["retrying"],
                        f"{status['retrying']} message(s) waiting for a retry"))
    if status.get("outbox"):
        rows.append(Row("intake", "outbox", status["outbox"],
                        f"{status['outbox']} DSN(s) waiting for home's MTA (bounce_relay) to take them"))
    if status.get("protocol_errors"):
        rows.append(Row("intake", "edge protocol errors", status["protocol_errors"],
                        f"{status['protocol_errors']} answer(s) from the edge broke the spool protocol since the "
                        "intake started: a broken or compromised edge; the intake's ERROR lines name each"))
    if config.spam is not None:
        rows.append(spam_row(status))
    rows.extend(tls_report_rows(status.get("tls_reports"), now))
    return rows


def edge_row(name: str, seen, now: float) -> Row:
    """One edge as the intake last saw it (its status file's `edges`); a stale file is said so on its own row."""
    if not isinstance(seen, dict) or not isinstance(seen.get("last_contact"), (int, float)):
        return unknown("edges", name, "the intake has not reached this edge since it started")
    contact = seen["last_contact"]
    depth = seen.get("depth") if isinstance(seen.get("depth"), int) else None
    oldest = seen.get("oldest_age") if isinstance(seen.get("oldest_age"), (int, float)) else None
    value = {"spool": seen.get("spool"), "connected": seen.get("connected") is True, "last_contact": _iso(contact),
             "depth": depth, "oldest_age": oldest}
    link = "connected" if value["connected"] else "NOT CONNECTED (the intake is retrying)"
    waiting = (f"{depth} message(s) waiting, the oldest for {ago(oldest or 0)}" if depth else "nothing waiting"
               if depth == 0 else "its spool's depth not reported")
    return Row("edges", name, value, f"{link}; last contact {ago(now - contact)} ago; {waiting}")


def egress_rows(path: Path | None) -> list[Row]:
    """Which edge home's mail leaves through (relay/home/egress.py): the one Postfix's egress table names."""
    if path is None:
        return []
    from relay.home import egress

    try:
        config = egress.load(path)
        in_use = egress.edge_in_use(config.transport_map)
    except Exception as error:  # noqa: BLE001 - any unreadable config is shown, not raised
        return [unknown("egress", "edge", f"{path}: {error}")]
    primary = config.edges[0].name
    if in_use is None:
        return [unknown("egress", "edge", f"{config.transport_map} names no edge (`yestls egress serve` writes it)")]
    text = (f"home's mail leaves through {in_use}, the primary" if in_use == primary else
            f"home's mail leaves through {in_use}: the primary {primary} did not answer "
            f"(journalctl -u yestls-egress)")
    return [Row("egress", "edge", {"edge": in_use, "primary": primary}, text)]


def spam_row(status: dict) -> Row:
    """What the spam filter did at home: messages judged, verdicts from before the 250 kept, junked, unjudged."""
    counts = {key: status.get(key) if isinstance(status.get(key), int) else 0
              for key in ("judged", "verdicts_kept", "junked", "unfiltered")}
    text = (f"junked {counts['junked']} (to Junk), judged at delivery {counts['judged']}, verdicts from before "
            f"the 250 kept {counts['verdicts_kept']} (since the intake started)")
    if counts["unfiltered"]:
        text += (f"; {counts['unfiltered']} delivered WITHOUT a verdict: rspamd failed for over an hour "
                 "(systemctl status rspamd)")
    return Row("intake", "spam filter", counts, text)


def tls_report_rows(totals, now: float) -> list[Row]:
    """The senders' TLS reports (RFC 8460) the intake read: sessions, failures by result type, malformed."""
    if not isinstance(totals, dict):
        return []
    from relay.home.tlsrpt import ReportTotals

    kept = ReportTotals.from_json(totals)
    last = f", last {ago(now - kept.last_report)} ago" if kept.last_report is not None else ""
    malformed = f"; {kept.malformed} malformed (delivered, not counted)" if kept.malformed else ""
    rows = [Row("intake", "TLS reports", kept.to_json(),
                f"{kept.reports} report(s){last}: {kept.successful} session(s) successful, {kept.failed} failed"
                f"{malformed}")]
    if kept.failed:
        by_type = ", ".join(f"{k} {v}" for k, v in sorted(kept.result_types.items(), key=lambda kv: -kv[1]))
        by_org = ", ".join(f"{org} {v['failed']}" for org, v in sorted(kept.organizations.items()) if v["failed"])
        rows.append(Row("intake", "TLS failures", {"result_types": kept.result_types},
                        f"FAILED SESSIONS by result: {by_type or 'none detailed'} (reported by {by_org}); "
                        "`yestls doctor` checks the certificate, MTA-STS and TLSA"))
    return rows


# --- putting it together ------------------------------------------------------------------------------------

def default_config(name: str, directory: Path = CONFIG_DIRECTORY) -> Path | None:
    path = directory / f"{name}.toml"
    return path if path.exists() else None


def collect(edge: Path | None, oracle: Path | None, intake: Path | None, *, site: Path | None = None,
            backup: Path | None = None, egress: Path | None = None, now: float | None = None,
            run: Callable = subprocess.run) -> Status:
    now = time.time() if now is None else now
    status = Status(socket.gethostname(), now,
                    {"edge": str(edge) if edge else None, "oracle": str(oracle) if oracle else None,
                     "intake": str(intake) if intake else None, "site": str(site) if site else None,
                     "backup": str(backup) if backup else None, "egress": str(egress) if egress else None})
    status.add(*tunnel_rows(now, run))
    status.add(*edge_rows(edge, now))
    status.add(*oracle_rows(oracle, now))
    status.add(*intake_rows(intake, now))
    status.add(*egress_rows(egress))
    status.add(*acme_rows(site, now))
    status.add(*backup_rows(backup, now, home=intake is not None))
    present = {row.section for row in status.rows}
    for section, (item, why) in MISSING.items():
        if section not in present:
            status.add(unknown(section, item, why))
    return status


MISSING = {   # a section nothing on this host reports: its main item, and why
    "oracle": ("reachable", "no edge.toml or oracle.toml on this host"),
    "policy": ("oracle down", "no edge.toml on this host; the edge runs the policy"),
    "spool": ("depth", "no edge.toml on this host (at home, `edges` shows each edge's spool)"),
    "intake": ("progress", "no intake.toml on this host"),
    "certificates": ("expiry", "no oracle.toml on this host, and no edge metrics report the chains served"),
}


def run(args) -> int:
    """`yestls status`: args has edge_config, oracle_config, intake_config, site_config (None: the default if
    present), json."""
    configs = {}
    for name in CONFIGS:
        given = getattr(args, f"{name}_config")
        configs[name] = given if given is not None else default_config(name)
    status = collect(configs["edge"], configs["oracle"], configs["intake"], site=configs["site"],
                     backup=configs["backup"], egress=configs["egress"])
    if args.json:
        json.dump(status.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(status.as_table())
    return 0


