"""Mail delivered through `yestls edge serve` by real clients is sealed, and only sealed.

One edge (with its oracle, both subprocesses, plus an implicit-TLS listener)
serves the whole module. Each delivery carries a random marker in its body,
lines that start with a dot and 8-bit UTF-8; after it:
- the marker is in no file under the site's directory: not in the spool
  (queue/ or tmp/), not in the edge's log, not in the oracle's log or audit
  log, not in the spool service's audit log;
- the spool file, unsealed with home's private key, is exactly the bytes the
  client meant to send (dot-unstuffed), after one `Received:` header that
  names the TLS version, cipher and group; the sealed metadata holds the
  envelope and the TLS parameters the client saw.

Clients: Python smtplib verifying the chain and name against the test CA,
`swaks --tls --tls-verify` (and swaks refusing the edge when verified
against another CA), `openssl s_client -starttls smtp` driven line by line,
a plaintext session (the oracle is up: cleartext is accepted, the policy
for an absent oracle does not apply), and the implicit-TLS listener.

Protocol surface: EHLO offers SIZE, PIPELINING, 8BITMIME, SMTPUTF8,
ENHANCEDSTATUSCODES and STARTTLS and no AUTH; after TLS, STARTTLS is neither
offered nor accepted again; every reply after EHLO (errors included) carries
an RFC 3463 code of its own class; SMTPUTF8 mail to a UTF-8 local part; the
metrics page counts accepted mail and refusals and shows the spool depth.
"""

import re
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from ..edge_smtp import (
    CLIENT_NAME,
    MX_NAME,
    RunningEdge,
    SmtpClient,
    dot_stuff,
    enhanced_code_problems,
    files_containing,
    message_with_marker,
    new_marker,
    queued_id,
    running_edge,
    tls_context,
)
from ..interop_helpers import SClient

pytestmark = pytest.mark.timeout(120)

MAX_MESSAGE_SIZE = 26214400  # the default `smtp.max_message_size`
SENDER = f"alice@{CLIENT_NAME}"
RECIPIENT = "user@example.org"


@pytest.fixture(scope="module")
def edge(pki, tmp_path_factory):
    # More errors per session than the default 10: one test walks through a dozen error replies.
    with running_edge(tmp_path_factory.mktemp("edge-delivery"), pki, implicit_tls=True,
                      smtp_options="max_errors = 50\n") as running:
        yield running


def check_delivery(edge: RunningEdge, spool_id: str, sent: bytes, marker: str, *, tls: dict | None,
                   mail_from: str = SENDER, recipients=(RECIPIENT,), helo: str = CLIENT_NAME) -> dict:
    """The checks every delivery gets (see the module docstring); returns the sealed metadata."""
    leaked = files_containing(edge.site.directory, marker.encode())
    assert not leaked, f"the marker {marker} is in plaintext on the edge's disk: {leaked}"
    # The search above covered the logs and the spool (guard against searching an empty place).
    searched = {p for p in edge.site.directory.rglob("*") if p.is_file()}
    assert edge.edge.log_path in searched and edge.oracle.log_path in searched
    assert edge.spool_file(spool_id) in searched

    unsealed = edge.unseal(spool_id)
    assert unsealed.message.endswith(sent), "the unsealed message does not end with the bytes sent"
    trace = unsealed.message[: len(unsealed.message) - len(sent)]
    trace_lines = trace.split(b"\r\n")
    assert trace.startswith(b"Received: from ") and trace.endswith(b"\r\n"), trace
    # Exactly one header field: every line after the first is a continuation line.
    assert all(line[:1] in (b" ", b"\t") for line in trace_lines[1:-1]), trace
    received = trace.decode()
    assert f"by {MX_NAME} " in received and f"from {helo} " in received, received
    if len(recipients) == 1:
        assert f"for <{recipients[0]}>" in received, received

    metadata = unsealed.metadata
    assert metadata["mail_from"] == mail_from
    assert metadata["rcpt_tos"] == list(recipients)
    assert metadata["helo"] == helo
    assert metadata["client_address"].startswith("127.0.0.1:")
    assert abs(metadata["received_at"] - time.time()) < 600
    if tls is None:
        assert metadata["tls"] is None
        assert "version=" not in received and re.search(r" with ESMTP\r\n", received), received
    else:
        sealed_tls = metadata["tls"]
        assert sealed_tls is not None, metadata
        for key, value in tls.items():
            assert sealed_tls[key] == value, f"sealed TLS {key} {sealed_tls[key]!r}, the client saw {value!r}"
        assert sealed_tls["server_name"] == MX_NAME and sealed_tls["resumed"] is False
        assert (f"(version={sealed_tls['version']} cipher={sealed_tls['cipher']} group={sealed_tls['group']})"
                in received), received
        assert re.search(r" with (ESMTPS|UTF8SMTPS)\r\n", received), received  # RFC 3848 / RFC 6531
    return metadata


def python_tls(sock) -> dict:
    return {"version": sock.version(), "cipher": sock.cipher()[0]}


# --- three clients ------------------------------------------------------------------------------

def test_smtplib_with_verified_starttls(edge, pki):
    marker = new_marker()
    message = message_with_marker(marker, "smtplib")
    with smtplib.SMTP("127.0.0.1", edge.site.smtp_port, timeout=10) as smtp:
        smtp.ehlo(CLIENT_NAME)
        smtp._host = MX_NAME  # smtplib checks the certificate against this name
        smtp.starttls(context=tls_context(pki))
        smtp.ehlo(CLIENT_NAME)
        assert smtp.mail(SENDER, ["BODY=8BITMIME"])[0] == 250
        assert smtp.rcpt(RECIPIENT)[0] == 250
        code, text = smtp.data(message)  # smtplib dot-stuffs
        seen = python_tls(smtp.sock)
    assert code == 250, text
    spool_id = re.search(r"queued as ([0-9a-f]{32})", text.decode()).group(1)
    metadata = check_delivery(edge, spool_id, message, marker, tls=seen)
    assert metadata["mail_options"] == ["BODY=8BITMIME"]


def test_swaks_with_verified_starttls(edge, pki, tmp_path):
    marker = new_marker()
    message = message_with_marker(marker, "swaks")
    data_file = tmp_path / "message.eml"  # outside the site's directory, which is searched for the marker
    # swaks dot-stuffs and ends DATA with CRLF . CRLF after the file's content: the last CRLF is its own.
    data_file.write_bytes(message[:-2])
    swaks = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(edge.site.smtp_port), "--ehlo", CLIENT_NAME,
         "--from", SENDER, "--to", RECIPIENT, "--tls", "--tls-verify", "--tls-ca-path", str(pki.ca_pem),
         "--tls-sni", MX_NAME, "--data", f"@{data_file}"],
        capture_output=True, timeout=60,
    )
    output = swaks.stdout.decode(errors="replace") + swaks.stderr.decode(errors="replace")
    assert swaks.returncode == 0, output
    started = re.search(r"^=== TLS started with cipher (TLSv[\d.]+):(\S+):\d+$", output, re.MULTILINE)
    assert started, output
    spool_id = re.search(r"^<~  250 2\.0\.0 OK queued as ([0-9a-f]{32})$", output, re.MULTILINE).group(1)
    check_delivery(edge, spool_id, message, marker, tls={"version": started[1], "cipher": started[2]})


def test_swaks_refuses_the_edge_under_another_ca(edge, tmp_path):
    """The control for the test above: --tls-verify does verify (the system CAs never signed the test chain)."""
    before = edge.site.spooled_files()
    swaks = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(edge.site.smtp_port), "--from", SENDER,
         "--to", RECIPIENT, "--tls", "--tls-verify", "--tls-ca-path", "/etc/ssl/certs/ca-certificates.crt",
         "--tls-sni", MX_NAME],
        capture_output=True, timeout=60,
    )
    output = swaks.stdout.decode(errors="replace") + swaks.stderr.decode(errors="replace")
    assert swaks.returncode != 0 and "certificate verify failed" in output, output
    assert edge.site.spooled_files() == before


def test_openssl_s_client_starttls(edge, pki):
    marker = new_marker()
    message = message_with_marker(marker, "openssl s_client")
    with SClient(f"127.0.0.1:{edge.site.smtp_port}", pki.ca_pem, "-starttls", "smtp", "-name", CLIENT_NAME,
                 "-nocommands") as client:
        summary = client.wait_handshake()  # "New, TLSv1.3, Cipher is ...", after the chain and name verified
        group = client.wait_for(r"^Server Temp Key: (?P<group>[^,]+),").group("group")

        def say(line: bytes, reply: str) -> re.Match:
            client.send(line)
            return client.wait_for(reply)

        ehlo = say(f"EHLO {CLIENT_NAME}\r\n".encode(), r"^250-ENHANCEDSTATUSCODES\r?$")
        assert "STARTTLS" not in client.output[ehlo.start():]
        say(f"MAIL FROM:<{SENDER}> BODY=8BITMIME\r\n".encode(), r"^250 2\.1\.0 ")
        say(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), r"^250 2\.1\.5 ")
        say(b"DATA\r\n", r"^354 ")
        stuffed = re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"
        spool_id = say(stuffed, r"^250 2\.0\.0 OK queued as (?P<id>[0-9a-f]{32})\r?$").group("id")
        say(b"QUIT\r\n", r"^221 2\.0\.0 ")
        client.finish()
    metadata = check_delivery(edge, spool_id, message, marker,
                              tls={"version": summary["version"], "cipher": summary["cipher"]})
    assert metadata["tls"]["group"].lower() == group.lower(), (metadata["tls"], group)


# --- without STARTTLS ---------------------------------------------------------------------------

def test_plaintext_delivery_is_accepted_while_the_oracle_is_up(edge):
    marker = new_marker()
    message = message_with_marker(marker, "cleartext")
    with SmtpClient.connect(edge.site.smtp_port) as client:
        assert "STARTTLS" in client.ehlo().keywords
        reply = client.deliver(SENDER, [RECIPIENT], message)
        client.expect("QUIT", 221)
    check_delivery(edge, queued_id(reply), message, marker, tls=None)


def test_sessions_fed_in_small_pieces_in_turn_keep_their_own_input(edge):
    """The receive buffer is the event loop's, shared by every connection: commands and content cut
    mid-line and interleaved with another session's arrive whole and each in its own session."""
    clients, sent, markers, wanted = [], [], [], []
    for who in ("first", "second"):
        marker = new_marker()
        message = message_with_marker(marker, who)
        client = SmtpClient.connect(edge.site.smtp_port)
        client.ehlo()
        clients.append(client)
        markers.append(marker)
        sent.append(message)
        wanted.append(f"{who}@{CLIENT_NAME}")
    streams = [f"MAIL FROM:<{sender}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode() for sender in wanted]
    _send_in_turn(clients, streams)
    for client in clients:
        assert [client.read_reply().code for _ in range(3)] == [250, 250, 354]
    _send_in_turn(clients, [dot_stuff(message) for message in sent])
    replies = [client.read_reply() for client in clients]
    for client, reply, message, marker, sender in zip(clients, replies, sent, markers, wanted):
        client.expect("QUIT", 221)
        client.close()
        check_delivery(edge, queued_id(reply), message, marker, tls=None, mail_from=sender)


def _send_in_turn(clients: list[SmtpClient], streams: list[bytes], piece: int = 7) -> None:
    """Each stream in `piece`-byte slices, one client's slice then the other's, each read on its own."""
    for start in range(0, max(map(len, streams)), piece):
        for client, stream in zip(clients, streams):
            if stream[start:start + piece]:
                client.send(stream[start:start + piece])
        time.sleep(0.002)


def test_implicit_tls_listener(edge, pki):
    marker = new_marker()
    message = message_with_marker(marker, "implicit TLS")
    with SmtpClient.connect(edge.site.implicit_tls_port, tls=tls_context(pki)) as client:
        assert client.greeting.code == 220 and client.greeting.text.startswith(MX_NAME)
        keywords = client.ehlo().keywords
        assert "STARTTLS" not in keywords and "ENHANCEDSTATUSCODES" in keywords
        reply = client.deliver(SENDER, [RECIPIENT], message)
        seen = python_tls(client.sock)
        client.expect("QUIT", 221)
    check_delivery(edge, queued_id(reply), message, marker, tls=seen)


# --- the protocol surface -----------------------------------------------------------------------

def test_ehlo_extensions_and_starttls_only_once(edge, pki):
    with SmtpClient.connect(edge.site.smtp_port) as client:
        assert client.greeting.code == 220
        before = client.ehlo()
        assert before.lines[0].split()[0] == MX_NAME
        keywords = before.keywords
        for keyword in ("SIZE", "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS"):
            assert keyword in keywords, f"EHLO does not offer {keyword}:\n{before}"
        assert keywords["SIZE"] == str(MAX_MESSAGE_SIZE)
        assert not any(k.startswith("AUTH") for k in keywords), f"an MX offers no AUTH:\n{before}"

        client.starttls(tls_context(pki))
        after = client.ehlo()
        assert "STARTTLS" not in after.keywords, f"STARTTLS offered again inside TLS:\n{after}"
        assert {"SIZE", "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"} <= set(after.keywords)
        assert not any(k.startswith("AUTH") for k in after.keywords), f"AUTH offered after TLS:\n{after}"

        again = client.command("STARTTLS")
        assert again.code // 100 in (4, 5) and again.enhanced, f"a second STARTTLS was not refused: {again}"
        assert client.command("NOOP").code == 250  # still in the same TLS session
        assert client.command("AUTH PLAIN AHVzZXIAcGFzcw==").code // 100 == 5


def test_every_reply_after_ehlo_has_an_enhanced_code(edge, pki):
    """A whole session, errors included; replies to EHLO itself (and 3xx) are exempt (RFC 2034 3)."""
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        checked_from = len(client.replies)
        client.starttls(tls_context(pki))
        client.ehlo()
        after_ehlo = len(client.replies)
        commands = [
            "NOOP", "HELP", "VRFY user@example.org", "EXPN staff", "AUTH LOGIN", "FOO", "",
            "RCPT TO:<user@example.org>", "DATA", "STARTTLS extra", "RSET",
            f"MAIL FROM:<{SENDER}> SIZE={MAX_MESSAGE_SIZE + 1}", f"MAIL FROM:<{SENDER}> FOO=BAR",
            f"MAIL FROM:<{SENDER}> BODY=9BIT", f"MAIL FROM:<{SENDER}>", f"MAIL FROM:<{SENDER}>",
            "RCPT TO:<user@foreign.example>", "RCPT TO:<user@example.org.>", "RCPT TO:<user@example.org> FOO=1",
            "RCPT TO:<user@example.org>", "NOOP",
        ]
        for line in commands:
            client.command(line)
        message_reply = client.data(b"Subject: codes\r\n\r\nbody\r\n")
        assert message_reply.code == 250
        client.expect("QUIT", 221)
    replies = client.replies[checked_from:after_ehlo - 1] + client.replies[after_ehlo:]
    assert len(replies) == 1 + len(commands) + 3  # 220 to STARTTLS, the commands, 354, 250, 221
    assert not enhanced_code_problems(replies), "\n".join(enhanced_code_problems(replies))
    assert sum(r.code >= 500 for r in replies) == 15  # the errors above were errors


def test_smtputf8_to_a_utf8_local_part(edge, pki):
    marker = new_marker()
    recipient = "jörg.müller@example.org"
    sender = "zoë@sender.example.net"
    message = (f"From: Zoë <{sender}>\r\nTo: Jörg <{recipient}>\r\nSubject: Grüße, {marker}\r\n"
               "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
               f"Hallo Jörg, {marker}\r\n.Punkt am Anfang\r\n").encode()
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.starttls(tls_context(pki))
        assert "SMTPUTF8" in client.ehlo().keywords
        reply = client.deliver(sender, [recipient], message, mail_options="SMTPUTF8 BODY=8BITMIME")
        seen = python_tls(client.sock)
    metadata = check_delivery(edge, queued_id(reply), message, marker, tls=seen, mail_from=sender,
                              recipients=(recipient,))
    assert metadata["smtputf8"] is True
    received = edge.unseal(queued_id(reply)).message.split(b"\r\n\r\n")[0].decode()
    assert " with UTF8SMTPS" in received, received


def test_metrics_count_accepted_mail_refusals_and_spool_depth(edge):
    before = edge.metrics()

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return edge.metrics().get(key, 0.0) - before.get(key, 0.0)

    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        client.expect(f"MAIL FROM:<{SENDER}>", 250)
        client.expect("RCPT TO:<someone@foreign.example>", 550)
        client.expect("RSET", 250)
        client.deliver(SENDER, [RECIPIENT], b"Subject: counted\r\n\r\nbody\r\n")
        client.expect("QUIT", 221)
    assert delta("yestls_edge_messages_accepted_total") == 1
    assert delta("yestls_edge_refused_total", reason="relay_denied") == 1
    files = edge.site.spooled_files()
    assert edge.metric("yestls_spool_depth") == len(files) > 0
    assert edge.metric("yestls_spool_bytes") == sum(path.stat().st_size for path in files)
    assert edge.metric("yestls_edge_oracle_up") == 1
    assert edge.metric("yestls_edge_oracle_down_policy", policy="tempfail") == 1


def test_metrics_count_a_refusal_for_size(edge):
    """A message refused as too large (552 at MAIL SIZE=) is a refusal like any other."""
    def refusals() -> float:
        return sum(value for (name, _), value in edge.metrics().items() if name == "yestls_edge_refused_total")

    before = refusals()
    with SmtpClient.connect(edge.site.smtp_port) as client:
        client.ehlo()
        reply = client.expect(f"MAIL FROM:<{SENDER}> SIZE={MAX_MESSAGE_SIZE + 1}", 552)
        assert reply.enhanced == "5.3.4"
        client.expect("QUIT", 221)
    assert refusals() == before + 1, "the 552 for SIZE= is not counted in yestls_edge_refused_total"


def test_nothing_but_sealed_files_in_the_spool(edge):
    """After the whole module: every file in queue/ is sealed (unseals), tmp/ is empty."""
    files = edge.site.spooled_files()
    assert len(files) >= 6
    for path in files:
        assert path.read_bytes()[:8] == b"YTLSPOOL"
        edge.unseal(path.name.rsplit("-", 1)[1])
    assert edge.tmp_files() == []



def test_the_smtp_listeners_queue_a_burst_of_connections(edge):
    """A listening socket's Send-Q in `ss` is its accept backlog: SMTP_BACKLOG on both SMTP ports (asyncio's
    default of 100 dropped a burst's SYNs unanswered)."""
    from relay.edge.connections import SMTP_BACKLOG

    ports = {edge.site.smtp_port, edge.site.implicit_tls_port}
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.splitlines()
    backlogs = {int(fields[3].rsplit(":", 1)[1]): int(fields[2]) for fields in map(str.split, listening)
                if int(fields[3].rsplit(":", 1)[1]) in ports}
    assert backlogs == dict.fromkeys(ports, min(SMTP_BACKLOG, int(Path("/proc/sys/net/core/somaxconn").read_text())))
