"""Drive real TLS peers (openssl s_client, gnutls-cli, `yestls tls-serve`) as subprocesses.

A peer is talked to like a user at a terminal: write to its stdin, wait for a
pattern in what it prints (always with a deadline), close stdin to end it.
Everything here is bounded: every wait has a timeout and a killed process is
reaped. The responder of `yestls tls-serve` answers each request with a body
naming what was negotiated; `response_bodies()` parses those bodies.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

HTTP_REQUEST = b"GET / HTTP/1.0\r\n\r\n"
TIMEOUT = 10.0  # seconds for any one wait; loopback handshakes take milliseconds

BODY = re.compile(
    r"version=(?P<version>\S+) cipher=(?P<cipher>\S+) group=(?P<group>\S+) scheme=(?P<scheme>\S*) "
    r"resumed=(?P<resumed>\S+) sni=(?P<sni>\S*) alpn=(?P<alpn>\S*)\n"
)

# The scheme the engine signs with for each test PKI key type (its own preference order).
SCHEME_OF_KEY = {
    "ecdsa-p256": "ecdsa_secp256r1_sha256",
    "ecdsa-p384": "ecdsa_secp384r1_sha384",
    "rsa-2048": "rsa_pss_rsae_sha256",
    "ed25519": "ed25519",
}
KEY_TYPES = tuple(SCHEME_OF_KEY)

# RFC 8446 4.1.3: the ServerHello.random that marks a HelloRetryRequest.
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


def response_bodies(output: str) -> list[dict[str, str]]:
    """Every responder body in `output`, oldest first, as {field: value}."""
    return [m.groupdict() for m in BODY.finditer(output)]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, release it), and never one this
    process handed out before: two services of one test asking in turn must not both get the same port
    (the kernel may offer a port again once it is released, before the first service has bound it)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free TCP port that was not handed out already")


class PeerProcess:
    """A subprocess whose stdin we write and whose merged stdout/stderr we watch."""

    def __init__(self, argv: list, name: str, timeout: float = TIMEOUT):
        self.argv = [str(a) for a in argv]
        self.name = name
        self.timeout = timeout
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._raw = bytearray()
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._collect_output, daemon=True)
        self._reader.start()

    def _collect_output(self) -> None:
        fd = self._proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)  # returns b"" once the process closed its output
            with self._changed:
                if not chunk:
                    self._eof = True
                    self._changed.notify_all()
                    return
                self._raw += chunk
                self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return self._raw.decode("utf-8", "replace")

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def send(self, data: bytes) -> None:
        try:
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise AssertionError(f"{self.name} exited before reading its input; output:\n{self.output}") from None

    def wait_for(self, pattern: str, count: int = 1, timeout: float | None = None) -> re.Match:
        """The `count`-th match of `pattern` (a multi-line regex) in the output, waiting for it if needed."""
        regex = re.compile(pattern, re.MULTILINE)

        def matches():
            return list(regex.finditer(self._raw.decode("utf-8", "replace")))

        with self._changed:
            self._changed.wait_for(lambda: len(matches()) >= count or self._eof, timeout or self.timeout)
            found = matches()
        if len(found) < count:
            state = "exited" if self._eof else "still running"
            raise AssertionError(
                f"{self.name}: {pattern!r} seen {len(found)} of {count} times ({state}); output:\n{self.output}"
            )
        return found[count - 1]

    def finish(self, timeout: float | None = None) -> str:
        """Close stdin (the user's end of input), wait for the process to exit, return all its output."""
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self._proc.wait(timeout or self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit after end of input; output:\n{self.output}") from None
        self._reader.join(timeout or self.timeout)
        return self.output

    def kill(self) -> None:
        """Stop the process if it still runs (idempotent) and release its pipes."""
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)  # its own session: only this process and its children
        self._proc.wait(self.timeout)
        self._reader.join(self.timeout)
        if not self._reader.is_alive():
            self._proc.stdout.close()

    def __enter__(self) -> "PeerProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        self.kill()


class HttpClient(PeerProcess):
    """A TLS client tool that forwards stdin to the connection and prints what comes back."""

    handshake_done = ""  # a regex the tool prints once the handshake has completed

    def wait_handshake(self) -> re.Match:
        return self.wait_for(self.handshake_done)

    def request(self) -> dict[str, str]:
        """Send one HTTP request and return the parsed body of the answer to it."""
        sent_before = len(response_bodies(self.output))
        self.send(HTTP_REQUEST)
        self.wait_for(BODY.pattern, count=sent_before + 1)
        return response_bodies(self.output)[sent_before]


class SClient(HttpClient):
    """`openssl s_client`, verifying the chain against `ca` and the certificate's name.

    `servername` is the SNI (None: send none); the certificate must name
    `verify_name`, by default the SNI or else mx.example.org.
    """

    handshake_done = r"^(?P<kind>New|Reused), (?P<version>TLSv[\d.]+), Cipher is (?P<cipher>\S+)$"

    def __init__(self, address: str, ca: Path, *options: str, servername: str | None = "mx.example.org",
                 verify_name: str | None = None, timeout: float = TIMEOUT):
        sni = ["-servername", servername] if servername else ["-noservername"]
        verify_name = verify_name or servername or "mx.example.org"
        # stdbuf: s_client prints its summaries through stdio, fully buffered into a pipe.
        super().__init__(
            ["stdbuf", "-oL", "openssl", "s_client", "-connect", address, "-CAfile", ca, "-verify_return_error",
             *sni, "-verify_hostname", verify_name, *options],
            "openssl s_client", timeout,
        )

    def wait_ticket(self, count: int = 1) -> None:
        """Wait for the `count`-th NewSessionTicket (s_client writes -sess_out before printing this)."""
        self.wait_for(r"^Post-Handshake New Session Ticket arrived:$", count)

    def key_update(self, request_peer_update: bool) -> None:
        """s_client's `K` (update, and ask the server to update too) or `k` (update ours only)."""
        done_before = len(re.findall(r"^KEYUPDATE$", self.output, re.MULTILINE))
        self.send(b"K\n" if request_peer_update else b"k\n")
        self.wait_for(r"^KEYUPDATE$", count=done_before + 1)


def full_session(s_client, server, *options, session_out=None):
    """One complete full handshake plus a request, through the `s_client` fixture's factory; returns
    (summary match, body, output). `session_out` waits for a TLS 1.3 NewSessionTicket: under TLS 1.2 pass
    -sess_out in `options` instead (the ticket then comes within the handshake)."""
    extra = ("-sess_out", session_out) if session_out else ()
    client = s_client(server, *options, *extra)
    done = client.wait_handshake()
    body = client.request()
    if session_out:
        client.wait_ticket()
    return done, body, client.finish()


def resumed_session(s_client, server, session_in, *options):
    """Reconnect offering the saved session, one request; returns (summary match, body, output)."""
    client = s_client(server, "-sess_in", session_in, *options)
    done = client.wait_handshake()
    body = client.request()
    if "-sess_out" in options:
        client.wait_ticket()
    return done, body, client.finish()


class GnutlsCli(HttpClient):
    """`gnutls-cli`, verifying the chain against `ca` and the certificate against `servername`."""

    handshake_done = r"^- (?:Resume )?Handshake was completed$"

    def __init__(self, host: str, port: int, ca: Path, *options: str, servername: str = "mx.example.org",
                 timeout: float = TIMEOUT):
        super().__init__(
            ["stdbuf", "-oL", "gnutls-cli", host, "--port", str(port), f"--x509cafile={ca}",
             f"--sni-hostname={servername}", f"--verify-hostname={servername}", *options],
            "gnutls-cli", timeout,
        )

    def description(self) -> str:
        """GnuTLS's one-line summary, e.g. (TLS1.3-X.509)-(ECDHE-X25519)-(ECDSA-SECP256R1-SHA256)-(AES-128-GCM)."""
        return self.wait_for(r"^- Description: (?P<d>\S+)$").group("d")


def yestls_command() -> Path:
    """The `yestls` entry point installed next to this interpreter."""
    return Path(sys.executable).parent / "yestls"


class TlsServe(PeerProcess):
    """`yestls tls-serve` on a free loopback port; ready once it logs that it listens."""

    def __init__(self, *options: str, timeout: float = TIMEOUT):
        self.host, self.port = "127.0.0.1", free_port()
        super().__init__([yestls_command(), "tls-serve", "--listen", self.address, *options],
                         "yestls tls-serve", timeout)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_listening(self) -> None:
        # Logged once create_server() returned, i.e. the socket already listens.
        self.wait_for(rf"tls-serve listening on {re.escape(self.address)}$")
