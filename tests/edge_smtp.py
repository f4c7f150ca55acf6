"""Talk SMTP to a running `yestls edge serve` in tests, and look at what it left behind.

    with running_edge(tmp_path_factory.mktemp("edge"), pki, implicit_tls=True) as edge:
        client = SmtpClient.connect(edge.site.smtp_port)
        client.ehlo()
        client.starttls(tls_context(pki))
        reply = client.deliver("a@sender.example.net", ["user@example.org"], message)
        unsealed = edge.unseal(queued_id(reply))

`SmtpClient` is a raw client: it sends exactly the bytes a test gives it
(pipelined, junk, half a line) and keeps every reply it read, so a test can
check a whole session's replies. Every read has a deadline; a closed
connection is `ConnectionClosed`, never a hang.

`running_edge` starts the site's oracle and the edge as subprocesses and at
teardown stops the edge and kills the oracle (front and signing processes,
by PID) without the oracle's graceful shutdown wait.
"""

import os
import re
import secrets
import signal
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from relay.spool.sealed import Unsealed, unseal

from .edge_site import EdgeProcess, EdgeSite, make_edge_site, start_edge
from .oracle_home import OracleProcess, start_oracle
from .pki import TestPKI

TIMEOUT = 10.0           # seconds for any one read; loopback replies take milliseconds
MX_NAME = "mx.example.org"
CLIENT_NAME = "sender.example.net"

_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$", re.DOTALL)
ENHANCED_CODE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})( |$)")
_QUEUED = re.compile(r"queued as ([0-9a-f]{32})\b")


class ConnectionClosed(AssertionError):
    """The server closed the connection; `partial` holds what came before the end."""

    def __init__(self, message: str, partial: bytes = b""):
        super().__init__(f"{message}; unparsed bytes before the end: {partial!r}")
        self.partial = partial


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]   # the text of each line after "NNN-" / "NNN "

    @property
    def text(self) -> str:
        return self.lines[-1]

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 code on the last line, e.g. "5.7.1", or None."""
        found = ENHANCED_CODE.match(self.text)
        return ".".join(found.group(1, 2, 3)) if found else None

    @property
    def keywords(self) -> dict[str, str]:
        """An EHLO reply's extensions, {KEYWORD: parameters} (the first line is the server's name)."""
        pairs = (line.split(" ", 1) for line in self.lines[1:])
        return {pair[0].upper(): pair[1] if len(pair) > 1 else "" for pair in pairs}

    def __str__(self) -> str:
        return "\n".join(f"{self.code}{'-' if i < len(self.lines) - 1 else ' '}{line}"
                         for i, line in enumerate(self.lines))


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload for `message` (CRLF lines): leading dots doubled, ended by CRLF . CRLF."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"


def queued_id(reply: Reply) -> str:
    found = _QUEUED.search(reply.text)
    assert reply.code == 250 and found, f"not a 250 ... queued as <id> reply: {reply}"
    return found.group(1)


def tls_context(pki: TestPKI) -> ssl.SSLContext:
    """A client context that verifies the edge's chain against the test CA (and the name, at wrap time)."""
    return ssl.create_default_context(cafile=str(pki.ca_pem))


class SmtpClient:
    def __init__(self, sock: socket.socket, timeout: float = TIMEOUT):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buffer = b""
        self.replies: list[Reply] = []
        self.greeting: Reply | None = None

    @classmethod
    def connect(cls, port: int, *, tls: ssl.SSLContext | None = None, session: ssl.SSLSession | None = None,
                timeout: float = TIMEOUT, read_greeting: bool = True, source: str | None = None) -> "SmtpClient":
        """A connection to 127.0.0.1:`port` (implicit TLS with `tls`), from `source` (another loopback
        address: another client) if given; the greeting is read and kept."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=MX_NAME, session=session)
            except BaseException:
                sock.close()
                raise
        client = cls(sock, timeout)
        if read_greeting:
            client.greeting = client.read_reply()
        return client

    # --- bytes -----------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise ConnectionClosed("the server closed the connection", self.buffer)
        self.buffer += chunk

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            assert len(self.buffer) < 1 << 20, "a reply line longer than 1 MiB"
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def read_reply(self) -> Reply:
        """One (possibly multi-line) reply; every line must have the same code."""
        code, lines = None, []
        while True:
            raw = self.read_line()
            found = _REPLY_LINE.match(raw)
            assert found, f"not an SMTP reply line: {raw!r} (after {lines})"
            assert code in (None, found.group(1)), f"reply code changed within one reply: {raw!r} after {lines}"
            code = found.group(1)
            lines.append(found.group(3).decode("utf-8", "backslashreplace"))
            if found.group(2) == b" ":
                reply = Reply(int(code), tuple(lines))
                self.replies.append(reply)
                return reply

    def wait_closed(self, timeout: float = 30.0) -> bytes:
        """Read until the server closes the connection (at most `timeout` seconds); what came before it."""
        deadline = time.monotonic() + timeout
        received = self.buffer
        self.buffer = b""
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the server kept the connection open for {timeout} s; it sent {received!r}"
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return received
            except TimeoutError:
                continue
            if not chunk:
                return received
            received += chunk

    def close(self) -> None:
        with suppress(OSError):
            self.sock.close()

    def __enter__(self) -> "SmtpClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- commands --------------------------------------------------------------------------------

    def command(self, line: str | bytes) -> Reply:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.read_reply()

    def expect(self, line: str | bytes, code: int) -> Reply:
        reply = self.command(line)
        assert reply.code == code, f"{line!r}: expected {code}, got\n{reply}"
        return reply

    def ehlo(self, name: str = CLIENT_NAME) -> Reply:
        return self.expect(f"EHLO {name}", 250)

    def starttls(self, context: ssl.SSLContext, session: ssl.SSLSession | None = None,
                 server_hostname: str = MX_NAME) -> Reply:
        """STARTTLS and the handshake (which raises ssl.SSLError or OSError when it fails)."""
        reply = self.expect("STARTTLS", 220)
        assert not self.buffer, f"bytes after the 220 to STARTTLS, before TLS: {self.buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname, session=session)
        return reply

    def data(self, message: bytes) -> Reply:
        self.expect("DATA", 354)
        self.send(dot_stuff(message))
        return self.read_reply()

    def deliver(self, mail_from: str, recipients: list[str], message: bytes, mail_options: str = "") -> Reply:
        """MAIL, RCPT (each must be accepted), DATA; the reply to the message."""
        self.expect(f"MAIL FROM:<{mail_from}>{' ' + mail_options if mail_options else ''}", 250)
        for recipient in recipients:
            self.expect(f"RCPT TO:<{recipient}>", 250)
        return self.data(message)


def enhanced_code_problems(replies: list[Reply]) -> list[str]:
    """Replies (after the greeting and EHLO) without an enhanced code of their own class (RFC 2034 3)."""
    problems = []
    for reply in replies:
        if reply.code // 100 == 3:
            continue  # 354 and 334 are intermediate: RFC 3463 codes have no class 3
        found = ENHANCED_CODE.match(reply.text)
        if not found or int(found.group(1)) != reply.code // 100:
            problems.append(str(reply))
    return problems


def message_with_marker(marker: str, subject: str = "test") -> bytes:
    """A message (CRLF lines) whose body holds `marker`, lines with leading dots and 8-bit UTF-8."""
    return (
        f"From: <a@{CLIENT_NAME}>\r\nTo: <user@example.org>\r\nSubject: {subject}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        f"marker {marker}\r\n"
        ".a line that starts with a dot\r\n"
        "..and one with two\r\n"
        ".\r\n"
        "Grüße aus Köln — 日本語のテキスト\r\n"
        f"{marker} again, at the end\r\n"
    ).encode("utf-8")


def new_marker() -> str:
    return f"MARKER-{secrets.token_hex(16)}"


# --- the edge as a subprocess -------------------------------------------------------------------

@dataclass
class RunningEdge:
    site: EdgeSite
    edge: EdgeProcess
    oracle: OracleProcess | None
    _signers: set[int] = field(default_factory=set)

    def log(self) -> str:
        return self.edge.log()

    def process_alive(self) -> bool:
        return self.edge.process.poll() is None

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample on the metrics page, {(name, sorted label pairs): value}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.site.metrics_port}/metrics", timeout=TIMEOUT) as page:
            text = page.read().decode()
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value; 0 for a labelled counter that has not counted yet."""
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def spool_file(self, spool_id: str) -> Path:
        found = [path for path in self.site.spooled_files() if path.name.endswith(f"-{spool_id}")]
        assert len(found) == 1, f"spool id {spool_id}: files {found} in {self.site.spool_dir / 'queue'}"
        return found[0]

    def unseal(self, spool_id: str) -> Unsealed:
        unsealed = unseal(self.spool_file(spool_id).read_bytes(), self.site.spool_private_key)
        assert unsealed.spool_id.hex() == spool_id
        return unsealed

    def tmp_files(self) -> list[Path]:
        tmp = self.site.spool_dir / "tmp"
        return sorted(tmp.iterdir()) if tmp.exists() else []

    def start_oracle(self) -> None:
        assert self.oracle is None or self.oracle.process.poll() is not None, "the oracle runs already"
        self.oracle = start_oracle(self.site.oracle)
        self._signers.update(_children(self.oracle.process.pid))

    def kill_oracle(self) -> None:
        """SIGKILL the oracle's front; its signing processes end on EOF, or are killed by PID."""
        if self.oracle is not None and self.oracle.process.poll() is None:
            self.oracle.kill()
        for pid in self._signers:
            with suppress(OSError):
                if b"relay.oracle.signer" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        self._signers.clear()

    def wait_oracle_state(self, up: bool, timeout: float = 30.0) -> None:
        """Until the edge's yestls_edge_oracle_up says `up` (the edge polls the pool every second)."""
        wait_until(lambda: self.metric("yestls_edge_oracle_up") == (1.0 if up else 0.0), timeout,
                   f"yestls_edge_oracle_up == {int(up)}", self.log)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until the edge counts no open SMTP connection (closed ones are released asynchronously)."""
        wait_until(lambda: self.metric("yestls_edge_smtp_connections") == 0, timeout,
                   "no open SMTP connection at the edge", self.log)


def _children(parent: int) -> set[int]:
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    children.add(int(entry.name))
    return children


def wait_until(condition: Callable[[], bool], timeout: float, what: str, details: Callable[[], str] = str) -> None:
    """Poll `condition` every 0.1 s for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}\n{details()}")


@contextmanager
def running_edge(directory: Path, pki: TestPKI, *, oracle: bool = True, **site_options):
    """An edge site (make_edge_site options) with its oracle (unless `oracle=False`) and edge running."""
    site = make_edge_site(directory, pki, **site_options)
    running = RunningEdge(site, None, None)  # type: ignore[arg-type]
    try:
        if oracle:
            running.start_oracle()
        running.edge = start_edge(site, timeout=60.0)
        yield running
    finally:
        if running.edge is not None:
            running.edge.stop()
        running.kill_oracle()


def files_containing(directory: Path, needle: bytes) -> list[Path]:
    """Every regular file under `directory` whose bytes contain `needle`."""
    return [path for path in sorted(directory.rglob("*")) if path.is_file() and needle in path.read_bytes()]
