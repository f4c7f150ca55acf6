"""The pieces of a multi-process edge that need no process: the `workers` setting, a worker's share of the
connection cap, the metrics sums (relay/edge/worker_metrics.py), the address book a worker follows."""

import json
import os

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as MetricCounter

from relay.config import ConfigError
from relay.daemon import restart_pause
from relay.edge import config as edge_config
from relay.edge.addresses import RECHECK, PublishedAddresses
from relay.edge.worker import worker_config
from relay.edge.worker_metrics import PREFIX, Sums, report
from relay.edge.workers import Handoff

from ..edge_site import make_edge_site


@pytest.mark.parametrize("value", ["0", "65", '"many"', "1.5", "true"])
def test_a_bad_workers_setting_names_the_key(pki, tmp_path, value):
    site = make_edge_site(tmp_path, pki, smtp_options=f"workers = {value}\n")
    with pytest.raises(ConfigError, match=r"smtp\.workers"):
        edge_config.load(site.config)


def test_workers_default_to_one_and_auto_is_the_core_count(pki, tmp_path):
    assert edge_config.load(make_edge_site(tmp_path / "a", pki).config).smtp.workers == 1
    auto = edge_config.load(make_edge_site(tmp_path / "b", pki, smtp_options='workers = "auto"\n').config)
    assert auto.smtp.workers == min(os.cpu_count(), edge_config.MAX_WORKERS)


def test_each_worker_gets_its_share_of_the_connection_cap(pki, tmp_path):
    config = edge_config.load(make_edge_site(tmp_path, pki, smtp_options="max_connections = 7\n").config)
    assert worker_config(config, 2).smtp.max_connections == 3
    assert worker_config(config, 8).smtp.max_connections == 1
    assert worker_config(config, 2).smtp.max_connections_per_ip == config.smtp.max_connections_per_ip


def test_a_handoff_survives_its_encoding():
    handoff = Handoff("/etc/yestls/edge.toml", 1, 2, 5, (6, 7), (8,), "ab" * 49)
    assert Handoff.decode(handoff.encode()) == handoff


def families(registry):
    return (MetricCounter("yestls_edge_messages_accepted", "", registry=registry),
            MetricCounter("yestls_edge_refused", "", ["reason"], registry=registry),
            Gauge("yestls_edge_smtp_connections", "", registry=registry))


def metrics_pair():
    """A worker's registry and families, and the supervisor's families with their Sums."""
    worker_registry = CollectorRegistry()
    worker, supervisor = families(worker_registry), families(CollectorRegistry())
    return worker_registry, worker, supervisor, Sums([supervisor[0], supervisor[1]], supervisor[2])


def value(counter, **labels) -> float:
    return (counter.labels(**labels) if labels else counter)._value.get()


def test_sums_add_growth_and_never_go_back_when_a_worker_restarts():
    registry, (accepted, refused, connections), (s_accepted, s_refused, s_connections), sums = metrics_pair()
    sums.started(0)
    accepted.inc(3)
    refused.labels("spool_full").inc()
    connections.set(2)
    sums.take(0, report(registry).rstrip(b"\n"))
    sums.take(0, report(registry).rstrip(b"\n"))   # the same values again: no growth
    assert value(s_accepted) == 3 and value(s_refused, reason="spool_full") == 1
    assert s_connections._value.get() == 2
    sums.stopped(0)
    assert s_connections._value.get() == 0
    # The worker's next process counts from zero: the sum goes on from 3.
    registry = CollectorRegistry()
    accepted = families(registry)[0]
    sums.started(0)
    accepted.inc(2)
    sums.take(0, report(registry).rstrip(b"\n"))
    assert value(s_accepted) == 5


@pytest.mark.parametrize("line", [b"metrics ", b"metrics {", b'metrics {"counters": 3}',
                                  b'metrics {"counters": [["x"]], "connections": 1}',
                                  b'metrics {"counters": [], "connections": "many"}'])
def test_sums_ignore_a_malformed_report(line, caplog):
    _, _, (s_accepted, _, s_connections), sums = metrics_pair()
    sums.started(0)
    sums.take(0, line)
    assert value(s_accepted) == 0 and s_connections._value.get() == 0
    assert "unreadable metrics report" in caplog.text


def test_a_report_is_one_prefixed_json_line():
    registry, (accepted, *_), _, _ = metrics_pair()
    accepted.inc()
    line = report(registry)
    assert line.startswith(PREFIX) and line.endswith(b"\n") and line.count(b"\n") == 1
    assert ["yestls_edge_messages_accepted", {}, 1.0] in json.loads(line[len(PREFIX):])["counters"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_worker_follows_the_book_its_supervisor_received(tmp_path):
    path = tmp_path / "addresses.json"
    clock = Clock()
    follower = PublishedAddresses(path, clock)
    assert follower.current() is None
    book = {"domains": ["example.org"], "mailboxes": ["a@example.org"]}
    path.write_text(json.dumps(book))
    assert follower.current() is None              # not looked at again yet
    clock.now += RECHECK
    assert follower.current().mailboxes == frozenset({"a@example.org"})
    path.write_text("not json")
    clock.now += RECHECK
    assert follower.current().mailboxes == frozenset({"a@example.org"})   # a broken file keeps the last book


def test_the_restart_pause_doubles_while_a_child_dies_young_and_resets_after_a_long_life():
    pauses, pause = [], 0.0
    for lived in (1, 1, 1, 1, 1, 1, 1, 100, 1):
        pause = restart_pause(pause, lived, (1.0, 30.0), 10.0)
        pauses.append(pause)
    assert pauses == [1, 2, 4, 8, 16, 30, 30, 1, 2]


def test_a_worker_that_never_says_ready_is_killed_and_named(pki, tmp_path, monkeypatch):
    """A worker that hangs before serving (its READY never comes) does not hang the supervisor: after
    START_TIMEOUT it is killed, start() fails naming it, and the spool desk's link to it ends."""
    import asyncio
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    from relay.edge import workers as workers_module
    from relay.spool.desk import SpoolDesk
    from relay.spool.keys import parse_spool_public_key
    from relay.spool.store import Spool
    from relay.tls import TicketKeyring

    site = make_edge_site(tmp_path, pki, smtp_options="workers = 2\n")
    config = edge_config.load(site.config)
    spool = Spool(config.spool.directory, parse_spool_public_key(config.spool.public_key), 1 << 30, 1000)
    desk = SpoolDesk(spool, ThreadPoolExecutor(1))
    attached = []
    attach = desk.attach
    monkeypatch.setattr(desk, "attach", lambda sock, name: attached.append(attach(sock, name)) or attached[-1])
    monkeypatch.setattr(workers_module, "START_TIMEOUT", 0.5)
    started = []
    real_exec = asyncio.create_subprocess_exec

    async def hanging_worker(program, *args, **options):   # reads its hand-off, then never says READY
        process = await real_exec(sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(60)",
                                  **options)
        started.append(process)
        return process

    monkeypatch.setattr(asyncio, "create_subprocess_exec", hanging_worker)
    supervisor = workers_module.Workers(config, site.config, desk, TicketKeyring.shared(os.urandom, os.urandom(32),
                                                                                        time.time()),
                                        Sums([], Gauge("connections", "", registry=CollectorRegistry())), None)

    async def start() -> float:
        began = time.monotonic()
        with pytest.raises(workers_module.WorkerFailed, match="edge worker 0 did not start"):
            await supervisor.start()
        await supervisor.stop()
        return time.monotonic() - began

    assert asyncio.run(start()) < 10
    assert len(started) == 1 and started[0].returncode == -9   # killed; the second was never started
    attached[0].join(5)
    assert not attached[0].is_alive()   # the desk saw the worker's end close
    spool.close()
