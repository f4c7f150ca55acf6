"""The edge keeps no plaintext of a message once it is done with it: its memory is read right after.

Each message carries a marker on every line. Right after the edge's answer
(250, or a refusal, or the client gone mid-DATA), the edge process's memory
(tests/process_memory.py) holds no fragment of it: the receive buffer, the
TLS record plaintext, input held behind DATA and the chunk being sealed are
all wiped as soon as their bytes have moved on. bench/plaintext_memory.py
measures the same with other mail flowing.
"""

import os
import secrets

import pytest

from ..edge_smtp import CLIENT_NAME, SmtpClient, dot_stuff, queued_id, running_edge, tls_context
from ..process_memory import marker_hits

pytestmark = pytest.mark.timeout(300)

SENDER = f"a@{CLIENT_NAME}"
RECIPIENT = "user@example.org"


@pytest.fixture(scope="module")
def edge(pki, tmp_path_factory):
    assert os.geteuid() == 0, "reading another process's memory needs root: run the tests as root (make test)"
    with running_edge(tmp_path_factory.mktemp("edge-memory"), pki, smtp_options="max_message_size = 400000\n"
                      "data_timeout = 2\n") as running:
        yield running


def marked(size: int) -> tuple[bytes, bytes]:
    marker = f"PLAINTEXT-{secrets.token_hex(16)}".encode()
    line = marker + b" " + b"x" * 60 + b"\r\n"
    return marker, b"Subject: marked\r\n\r\n" + line * (size // len(line))


def connect(edge, pki, tls: bool) -> SmtpClient:
    client = SmtpClient.connect(edge.site.smtp_port)
    client.ehlo()
    if tls:
        client.starttls(tls_context(pki))
        client.ehlo()
    return client


def assert_no_fragment(edge, markers: dict[str, bytes]) -> None:
    hits = marker_hits(edge.edge.process.pid, markers)
    assert not any(hits.values()), f"plaintext left in the edge's memory: {hits}"


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "starttls"])
@pytest.mark.parametrize("size", [40 * 1024, 300 * 1024], ids=["40KiB", "300KiB"])
def test_an_accepted_message_leaves_nothing(edge, pki, tls, size):
    marker, message = marked(size)
    with connect(edge, pki, tls) as client:
        queued_id(client.deliver(SENDER, [RECIPIENT], message))
        assert_no_fragment(edge, {"accepted": marker})


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "starttls"])
def test_refused_and_abandoned_messages_leave_nothing(edge, pki, tls):
    markers = {}
    # Too big: read to its end, refused.
    markers["too big"], message = marked(450 * 1024)
    with connect(edge, pki, tls) as client:
        client.expect(f"MAIL FROM:<{SENDER}>", 250)
        client.expect(f"RCPT TO:<{RECIPIENT}>", 250)
        assert client.data(message).code == 552
        # A bare LF halfway: the session ends at once.
        markers["bare LF"], message = marked(100 * 1024)
        client.expect(f"MAIL FROM:<{SENDER}>", 250)
        client.expect(f"RCPT TO:<{RECIPIENT}>", 250)
        client.expect("DATA", 354)
        client.send(message[:50_000] + b"\n" + message[50_000:])
        assert client.read_reply().code == 521
    # Pipelined before the 354, then the client goes silent mid-message: the data timeout ends it.
    markers["gone"], message = marked(100 * 1024)
    with connect(edge, pki, tls) as client:
        client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode() + message[:70_000])
        client.wait_closed(timeout=30)
    edge.wait_idle()
    assert_no_fragment(edge, markers)


def test_content_held_behind_data_is_the_message_and_leaves_nothing(edge, pki):
    marker, message = marked(200 * 1024)
    with connect(edge, pki, True) as client:
        client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode() + dot_stuff(message))
        replies = [client.read_reply() for _ in range(4)]
        assert [r.code for r in replies] == [250, 250, 354, 250]
        assert_no_fragment(edge, {"held": marker})
        assert edge.unseal(queued_id(replies[3])).message.endswith(message)
