"""Message keys made ahead, in a process of their own: the HPKE part of sealing, off the edge's busy core.

Sealing a message starts with an HPKE encapsulation to home's key (ML-KEM-768
+ X25519 by default): 140 us or more of CPU holding the GIL, the largest
single cost of accepting a small message on the edge, whose SMTP sessions all
run on one event loop. None of it depends on the message
(relay.spool.sealed.MessageKey), so a child process makes keys ahead on
another core and the edge takes one per message:

- the child, `python -m relay.spool.keymaker`, is told the public key and the
  chunk size on stdin and writes fixed-size records (spool id, data key, key
  block) to stdout until the pipe is full (it then waits) or closed (the edge
  is gone: it exits);
- in the edge a thread reads the records into a deque of up to READY keys
  and, when it is full, waits until `take` has brought it under half;
- `take` takes no lock (a queue.Queue's per-item locking and wake-ups cost
  the event loop 4% of its time) and never waits: with none ready (the
  child starting, slow, or dead) the key is made inline, as without a
  KeyMaker. A child that dies (or cannot start) is logged and started again
  after RESTART_PAUSE (doubling while it keeps dying within YOUNG seconds);
  meanwhile keys are made inline (slower, never wrong).

What changes for secrets: a data key exists a little before its message (in
the child, the pipe and the deque). A key not yet used protects nothing, and
one used is forgotten as before (the sealer's AESGCM is dropped with its
message), so a compromised edge learns nothing it would not see in the next
message anyway. Spool ids stay 16 random bytes, and the spool still creates
each file with O_EXCL.
"""

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections import deque

from relay.daemon import restart_pause
from relay.spool.keys import SpoolPublicKey, parse_spool_public_key
from relay.spool.sealed import DATA_KEY_LENGTH, SPOOL_ID_LENGTH, MessageKey, key_block_length, new_message_key

log = logging.getLogger("yestls.spool")

READY = 64   # keys waiting in the edge (about 1.2 KiB each); the pipe holds some 50 more
RESTART_PAUSE = (1.0, 60.0)   # seconds before a stopped child is started again: first, and at most
YOUNG = 10.0                  # a child that stopped within this many seconds of its start doubles the pause


def record_length(public_key: SpoolPublicKey) -> int:
    return SPOOL_ID_LENGTH + DATA_KEY_LENGTH + key_block_length(public_key.suite)


def encode_record(key: MessageKey) -> bytes:
    return key.spool_id + key.data_key + key.key_block


def decode_record(record: bytes, chunk_size: int) -> MessageKey:
    data_key_end = SPOOL_ID_LENGTH + DATA_KEY_LENGTH
    return MessageKey(record[:SPOOL_ID_LENGTH], record[SPOOL_ID_LENGTH:data_key_end], chunk_size,
                      record[data_key_end:])


class KeyMaker:
    """The edge's side: the child process, the thread reading its records (and starting the child again when
    it stops), and `take`."""

    def __init__(self, public_key: SpoolPublicKey, chunk_size: int, ready: int = READY):
        self.public_key = public_key
        self.chunk_size = chunk_size
        self.made_ahead = 0
        self.made_inline = 0
        self._record = record_length(public_key)
        if ready < 1:
            raise ValueError("a key maker keeps at least one key ready")
        self._capacity = ready
        self._low = max(1, ready // 2)     # under this many, `take` wakes the reader
        self._ready: deque[MessageKey] = deque()
        self._wanted = threading.Event()   # set by `take` once the deque is under half full
        self._closed = threading.Event()
        self._lock = threading.Lock()      # the child being replaced, or ended by `close`
        self._process = self._start(public_key, chunk_size)
        self._thread = threading.Thread(target=self._run, name="keymaker", daemon=True)
        self._thread.start()

    @staticmethod
    def _start(public_key: SpoolPublicKey, chunk_size: int) -> subprocess.Popen | None:
        try:
            process = subprocess.Popen([sys.executable, "-m", "relay.spool.keymaker"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE)
        except OSError as error:
            log.warning("the key maker did not start (%s): message keys are made inline, on the event loop's "
                        "core", error)
            return None
        with process.stdin:
            process.stdin.write(json.dumps({"public_key": public_key.text, "chunk_size": chunk_size}).encode())
        return process

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    def take(self) -> MessageKey:
        """A key made ahead if one is ready, else one made now (never waits for the child)."""
        try:
            key = self._ready.popleft()
        except IndexError:
            key = None
        if len(self._ready) < self._low and not self._wanted.is_set():
            self._wanted.set()
        if key is None:
            self.made_inline += 1
            return new_message_key(self.public_key, self.chunk_size)
        self.made_ahead += 1
        return key

    def ready(self) -> int:
        """Keys made ahead, waiting."""
        return len(self._ready)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            process = self._process
        if process is not None:
            _end(process)
        self._wanted.set()   # a reader waiting on a full deque wakes up and stops
        self._thread.join(5)
        log.info("message keys: %d made ahead by the key maker, %d inline", self.made_ahead, self.made_inline)

    def _run(self) -> None:
        """Read the child while it runs; when it stops, start it again after a pause (RESTART_PAUSE, doubling
        while it keeps dying young); keys are made inline meanwhile."""
        pause = 0.0
        while not self._closed.is_set():
            process, started = self._process, time.monotonic()
            if process is not None:
                self._read(process)
                if self._closed.is_set():
                    return
                _end(process)
            pause = restart_pause(pause, time.monotonic() - started, RESTART_PAUSE, YOUNG)
            if process is not None:
                log.warning("the key maker (pid %d) stopped (exit code %s): message keys are made inline, on the "
                            "event loop's core, until it is started again in %.0f s", process.pid,
                            process.returncode, pause)
            if self._closed.wait(pause):
                return
            with self._lock:
                if self._closed.is_set():
                    return
                self._process = self._start(self.public_key, self.chunk_size)
            if self._process is not None:
                log.info("the key maker runs again (pid %d)", self._process.pid)

    def _read(self, process: subprocess.Popen) -> None:
        try:
            while not self._closed.is_set():
                self._wanted.clear()
                if len(self._ready) >= self._capacity:
                    self._wanted.wait()
                    continue
                record = process.stdout.read(self._record)
                if len(record) != self._record:
                    return
                self._ready.append(decode_record(record, self.chunk_size))
        except (OSError, ValueError) as error:
            log.warning("reading the key maker failed: %s", error)


def _end(process: subprocess.Popen) -> None:
    """The child ended (SIGTERM, then SIGKILL), reaped, its pipe closed."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    process.stdout.close()


def main() -> int:
    """The child: keys for the public key and chunk size read from stdin, written to stdout until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the edge's to handle: it ends this with SIGTERM
    request = json.loads(sys.stdin.read())
    public_key = parse_spool_public_key(request["public_key"])
    chunk_size = int(request["chunk_size"])
    out = sys.stdout.buffer
    try:
        while True:
            out.write(encode_record(new_message_key(public_key, chunk_size)))
            out.flush()
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
