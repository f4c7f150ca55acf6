"""Message keys made ahead by a child process (relay/spool/keymaker.py).

Keys made by the child seal messages home unseals, in both suites; ids are
never repeated; a child killed with SIGKILL, or one never ready, costs
speed, not mail (keys are made inline), and a dead child is started again;
the child exits when the edge's end
of the pipe closes; a key of the wrong shape is refused before it seals
anything; a spool refuses a key source for another key or chunk size.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from relay.spool import keymaker
from relay.spool.keymaker import KeyMaker, decode_record, encode_record, record_length
from relay.spool.keys import generate_spool_key, load_spool_private_key, parse_spool_public_key
from relay.spool.sealed import DEFAULT_CHUNK_SIZE, MessageKey, Sealer, new_message_key, unseal
from relay.spool.store import Spool

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["mlkem768-x25519", "x25519"])
def keys(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "spool.key"
    return parse_spool_public_key(generate_spool_key(path, request.param)), load_spool_private_key(path)


@pytest.fixture
def maker(keys):
    made = KeyMaker(keys[0], DEFAULT_CHUNK_SIZE, ready=8)
    yield made
    made.close()


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_keys_made_ahead_seal_messages_home_unseals(keys, maker, tmp_path):
    public, private = keys
    wait_for(lambda: maker.ready() == 8, "the key maker to fill its deque")
    spool = Spool(tmp_path / "spool", public, 1 << 30, 1000, message_keys=maker)
    try:
        sent = {}
        for number in range(20):   # more than the deque holds: some are made inline, or after a refill
            message = f"Subject: {number}\r\n\r\nbody {number}\r\n".encode() * (number + 1)
            sent[spool.accept({"n": number}, [message])] = (number, message)
        assert maker.made_ahead >= 8 and maker.made_ahead + maker.made_inline == 20
        for entry in spool.list():
            unsealed = unseal(spool.queue_dir.joinpath(entry.name).read_bytes(), private)
            number, message = sent[entry.id]
            assert unsealed.spool_id.hex() == entry.id and unsealed.metadata == {"n": number}
            assert unsealed.message == message
        assert len(spool.list()) == 20
    finally:
        spool.close()


def test_ids_are_never_repeated(maker):
    ids = set()
    for _ in range(300):
        wait_for(lambda: maker.ready() > 0, "a key made ahead")
        ids.add(maker.take().spool_id)
    assert len(ids) == 300 and maker.made_ahead == 300


def test_a_killed_key_maker_costs_speed_not_mail_and_is_started_again(keys, maker, tmp_path, caplog,
                                                                       monkeypatch):
    monkeypatch.setattr(keymaker, "RESTART_PAUSE", (3.0, 60.0))   # room to see keys made inline meanwhile
    public, private = keys
    wait_for(lambda: maker.ready() == 8, "the key maker to fill its deque")
    spool = Spool(tmp_path / "spool", public, 1 << 30, 1000, message_keys=maker)
    try:
        with caplog.at_level(logging.WARNING, logger="yestls.spool"):
            os.kill(maker.pid, signal.SIGKILL)
            ids = []   # the keys it made before it died are still used, then keys are made inline
            while not any("stopped" in record.getMessage() for record in caplog.records):
                assert len(ids) < 500, "the key maker's death was never noticed"
                ids.append(spool.accept({}, [b"Subject: after\r\n\r\nstill sealed\r\n"]))
                time.sleep(0.002)
        assert "exit code -9" in caplog.text and "inline" in caplog.text
        ids += [spool.accept({}, [b"Subject: after\r\n\r\nstill sealed\r\n"]) for _ in range(8)]  # queued
        inline = maker.made_inline
        ids += [spool.accept({}, [b"Subject: after\r\n\r\nstill sealed\r\n"]) for _ in range(3)]
        assert maker.made_inline == inline + 3 and maker.ready() == 0
        assert "until it is started again in 3 s" in caplog.text
        dead = maker.pid
        with caplog.at_level(logging.INFO, logger="yestls.spool"):
            wait_for(lambda: maker.pid != dead and maker.ready() == 8, "a new key maker with its deque full")
        assert f"the key maker runs again (pid {maker.pid})" in caplog.text
        ahead = maker.made_ahead
        ids.append(spool.accept({}, [b"Subject: after\r\n\r\nstill sealed\r\n"]))
        assert maker.made_ahead == ahead + 1
        names = {entry.id: entry.name for entry in spool.list()}
        assert len(names) == len(ids)
        for spool_id in ids:
            unsealed = unseal(spool.queue_dir.joinpath(names[spool_id]).read_bytes(), private)
            assert unsealed.message.endswith(b"still sealed\r\n")
    finally:
        spool.close()


def test_with_no_key_ready_a_key_is_made_inline(keys, maker):
    wait_for(lambda: maker.ready() == 8, "the key maker to fill its deque")
    time.sleep(0.2)                      # its reader now waits for the deque to run low
    os.kill(maker.pid, signal.SIGSTOP)   # a child that cannot keep up
    maker._ready.clear()
    try:
        inline = maker.made_inline
        key = maker.take()
        assert maker.made_inline == inline + 1 and len(key.key_block) == record_length(keys[0]) - 48
    finally:
        os.kill(maker.pid, signal.SIGCONT)


def test_a_key_maker_that_cannot_start_is_logged_keys_are_made_inline_and_it_is_tried_again(keys, monkeypatch,
                                                                                             caplog):
    def refuse(*args, **kwargs):
        raise PermissionError("exec refused")

    popen = subprocess.Popen
    monkeypatch.setattr(keymaker, "RESTART_PAUSE", (0.2, 0.2))
    monkeypatch.setattr(subprocess, "Popen", refuse)
    with caplog.at_level(logging.WARNING, logger="yestls.spool"):
        made = KeyMaker(keys[0], DEFAULT_CHUNK_SIZE)
    try:
        assert "did not start (exec refused)" in caplog.text and made.pid is None
        key = made.take()
        assert made.made_inline == 1 and len(key.spool_id) == 16
        monkeypatch.setattr(subprocess, "Popen", popen)   # it can start now: it is tried again
        wait_for(lambda: made.pid is not None and made.ready() > 0, "the key maker started on a later try")
    finally:
        made.close()


def test_a_key_maker_of_one_is_refilled_after_each_take(keys):
    made = KeyMaker(keys[0], DEFAULT_CHUNK_SIZE, ready=1)
    try:
        for _ in range(3):
            wait_for(lambda: made.ready() == 1, "the key maker to refill its deque")
            made.take()
        assert made.made_ahead == 3 and made.made_inline == 0
    finally:
        made.close()
    with pytest.raises(ValueError, match="at least one"):
        KeyMaker(keys[0], DEFAULT_CHUNK_SIZE, ready=0)


def test_close_ends_the_child_even_with_its_deque_full(keys):
    made = KeyMaker(keys[0], DEFAULT_CHUNK_SIZE, ready=2)
    wait_for(lambda: made.ready() == 2, "the key maker to fill its deque")
    made.close()
    assert made._process.poll() is not None and not made._thread.is_alive()


def test_the_child_exits_when_the_edge_end_of_the_pipe_closes(keys):
    child = subprocess.Popen([sys.executable, "-m", "relay.spool.keymaker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    child.stdin.write(json.dumps({"public_key": keys[0].text, "chunk_size": 4096}).encode())
    child.stdin.close()
    record = child.stdout.read(record_length(keys[0]))
    key = decode_record(record, 4096)
    assert encode_record(key) == record
    child.stdout.close()
    assert child.wait(30) == 0


@pytest.mark.parametrize("change", ["spool id", "data key", "key block", "chunk size"])
def test_a_key_of_the_wrong_shape_is_refused_before_sealing(keys, change):
    key = new_message_key(keys[0], 4096)
    with pytest.raises(ValueError):
        if change == "spool id":
            MessageKey(key.spool_id[:-1], key.data_key, key.chunk_size, key.key_block)
        elif change == "data key":
            MessageKey(key.spool_id, key.data_key + b"x", key.chunk_size, key.key_block)
        elif change == "chunk size":
            MessageKey(key.spool_id, key.data_key, 0, key.key_block)
        else:
            Sealer(open(os.devnull, "wb"), keys[0], MessageKey(key.spool_id, key.data_key, key.chunk_size,
                                                                key.key_block[:-1]), b"{}")


def test_a_spool_refuses_keys_for_another_key_or_chunk_size(keys, tmp_path):
    other = parse_spool_public_key(generate_spool_key(tmp_path / "other.key", "x25519"))
    made = KeyMaker(other, DEFAULT_CHUNK_SIZE, ready=2)
    try:
        with pytest.raises(ValueError, match="another public key or chunk size"):
            Spool(tmp_path / "spool", keys[0], 1 << 30, 1000, message_keys=made)
        with pytest.raises(ValueError, match="another public key or chunk size"):
            Spool(tmp_path / "spool2", other, 1 << 30, 1000, chunk_size=4096, message_keys=made)
    finally:
        made.close()
