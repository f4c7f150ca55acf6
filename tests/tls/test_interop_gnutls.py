"""`gnutls-cli` (GnuTLS 3.7) against the engine over loopback.

gnutls-cli verifies the chain against the test CA (--x509cafile) and the
certificate against --verify-hostname; a test that got a body passed both.
Suites and groups are chosen with --priority strings. GnuTLS 3.7 has no ML-KEM.
"""

import re

import pytest

from relay.tls.constants import Group

from ..interop_helpers import KEY_TYPES, SCHEME_OF_KEY, response_bodies

pytestmark = pytest.mark.interop

TLS13_ONLY = "NORMAL:-VERS-ALL:+VERS-TLS1.3"
# GnuTLS cipher name -> the engine's suite name
SUITES = {
    "AES-128-GCM": "TLS_AES_128_GCM_SHA256",
    "AES-256-GCM": "TLS_AES_256_GCM_SHA384",
    "CHACHA20-POLY1305": "TLS_CHACHA20_POLY1305_SHA256",
}
# GnuTLS group name -> the engine's group name
GROUPS = {"X25519": "x25519", "SECP256R1": "secp256r1", "SECP384R1": "secp384r1"}
# The signature part of GnuTLS's session description, per test key type
SIGNATURE_OF_KEY = {
    "ecdsa-p256": "ECDSA-SECP256R1-SHA256",
    "ecdsa-p384": "ECDSA-SECP384R1-SHA384",
    "rsa-2048": "RSA-PSS-RSAE-SHA256",
    "ed25519": "EdDSA-Ed25519",
}
HRR_RECEIVED = "HELLO RETRY REQUEST (1025) was received"


def one_request(gnutls_cli, server, *options):
    """Handshake, one request; returns (description, body, output)."""
    client = gnutls_cli(server, *options)
    client.wait_handshake()
    description = client.description()
    body = client.request()
    return description, body, client.finish()


@pytest.mark.parametrize("cipher", SUITES)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_cipher_suite(tls_server, gnutls_cli, key_type, cipher):
    server = tls_server((key_type,))
    description, body, output = one_request(
        gnutls_cli, server, f"--priority={TLS13_ONLY}:-CIPHER-ALL:+{cipher}")
    assert "- Status: The certificate is trusted." in output
    assert description.startswith("(TLS1.3-X.509)-")
    assert description.endswith(f"-({SIGNATURE_OF_KEY[key_type]})-({cipher})")
    assert body["version"] == "TLSv1.3"
    assert body["cipher"] == SUITES[cipher]
    assert body["scheme"] == SCHEME_OF_KEY[key_type]
    assert body["sni"] == "mx.example.org"


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_group(tls_server, gnutls_cli, key_type, group):
    server = tls_server((key_type,))
    description, body, output = one_request(
        gnutls_cli, server, f"--priority={TLS13_ONLY}:-GROUP-ALL:+GROUP-{group}", "-d", "4")
    assert f"-(ECDHE-{group})-" in description
    assert HRR_RECEIVED not in output
    assert body["group"] == GROUPS[group]
    assert body["scheme"] == SCHEME_OF_KEY[key_type]


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_hello_retry_for_a_share_the_server_lacks(tls_server, gnutls_cli, key_type):
    server = tls_server((key_type,))
    description, body, output = one_request(
        gnutls_cli, server, f"--priority={TLS13_ONLY}:-GROUP-ALL:+GROUP-X448:+GROUP-SECP256R1",
        "--single-key-share", "-d", "4")
    assert HRR_RECEIVED in output
    assert "HRR key share with SECP256R1" in output
    assert "-(ECDHE-SECP256R1)-" in description
    assert body["group"] == "secp256r1"


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_hello_retry_when_server_insists_on_its_preferred_group(tls_server, gnutls_cli, key_type):
    # GnuTLS sends shares for X25519 and SECP256R1 and also supports SECP384R1.
    server = tls_server((key_type,), groups=(Group.SECP384R1, Group.X25519), insist_on_preferred_group=True)
    description, body, output = one_request(
        gnutls_cli, server, f"--priority={TLS13_ONLY}:-GROUP-ALL:+GROUP-X25519:+GROUP-SECP256R1:+GROUP-SECP384R1",
        "-d", "4")
    assert HRR_RECEIVED in output
    assert "HRR key share with SECP384R1" in output
    assert "-(ECDHE-SECP384R1)-" in description
    assert body["group"] == "secp384r1"


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_resumption(tls_server, gnutls_cli, key_type):
    server = tls_server((key_type,))
    # -r: a full handshake, wait for the ticket, reconnect offering it.
    client = gnutls_cli(server, "--resume", "--waitresumption", f"--priority={TLS13_ONLY}")
    client.wait_for(r"^- Resume Handshake was completed$")
    body = client.request()
    output = client.finish()
    assert f"-({SIGNATURE_OF_KEY[key_type]})-" in output  # the first, full handshake signed
    assert "*** This is a resumed session" in output
    assert body["resumed"] == "yes"
    assert body["sni"] == "mx.example.org"


# Not after a HelloRetryRequest: GnuTLS 3.7.9 then sends its second ClientHello
# under the 0-RTT key (epoch 1), which a server must skip as early data (RFC 8446
# 4.2.10), so the handshake stalls. OpenSSL's test covers 0-RTT before an HRR.
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_early_data_is_refused_and_connection_works(tls_server, gnutls_cli, key_type, tmp_path):
    server = tls_server((key_type,), ticket_early_data_size=1024)
    early = tmp_path / "early.txt"
    early.write_bytes(b"GET /early-1 HTTP/1.0\r\n\r\nGET /early-2 HTTP/1.0\r\n\r\n")
    client = gnutls_cli(server, "--resume", "--waitresumption", f"--earlydata={early}", "-d", "5")
    client.wait_for(r"^- Resume Handshake was completed$")
    first = client.request()
    second = client.request()
    output = client.finish()
    # 0-RTT went out under the early traffic key (epoch 1) before the server's reply.
    assert re.search(r"Sent Packet\[\d+\] Application Data\(23\) in epoch 1 ", output)
    assert "*** This is a resumed session" in output
    assert first["resumed"] == second["resumed"] == "yes"
    # Only the two requests sent after the handshake were answered, not the early ones.
    assert len(response_bodies(output)) == 2


@pytest.mark.parametrize("command, requests_update", [("^rekey^", True), ("^rekey1^", False)])
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_key_update_then_requests_still_work(tls_server, gnutls_cli, key_type, command, requests_update):
    server = tls_server((key_type,))
    client = gnutls_cli(server, "--inline-commands", "-d", "4")
    client.wait_handshake()
    client.request()
    for round_number in (1, 2):
        client.send(command.encode() + b"\n")
        client.wait_for(r"^- Rekey was completed$", count=round_number)
        assert client.request()["version"] == "TLSv1.3"
    output = client.finish()
    assert output.count(f"sending key update ({int(requests_update)})") == 2
    # Asked to (update_requested), the server updates its own sending key in reply.
    assert output.count("received TLS 1.3 key update (0)") == (2 if requests_update else 0)
    assert len(response_bodies(output)) == 3


@pytest.mark.parametrize("sign", ["RSA-PSS-RSAE-SHA384", "RSA-PSS-RSAE-SHA512"])
def test_rsa_signature_scheme_follows_the_client(tls_server, gnutls_cli, sign):
    server = tls_server(("rsa-2048",))
    description, body, _ = one_request(
        gnutls_cli, server, f"--priority={TLS13_ONLY}:-SIGN-ALL:+SIGN-{sign}:+SIGN-ECDSA-SECP256R1-SHA256")
    assert f"-({sign})-" in description
    assert body["scheme"] == sign.lower().replace("-", "_")


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_alpn(tls_server, gnutls_cli, key_type):
    server = tls_server((key_type,), alpn_protocols=(b"smtp", b"h2"))
    _, body, output = one_request(gnutls_cli, server, "--alpn=h2", "--alpn=http/1.1")
    assert "- Application protocol: h2" in output
    assert body["alpn"] == "h2"


@pytest.mark.parametrize("key_type", ["rsa-2048", "ecdsa-p256"])
def test_client_record_size_limit(tls_server, gnutls_cli, key_type):
    # --recordsize=512: record_size_limit 513, so the engine must cut its
    # handshake flight (the certificate alone is larger) into 512-byte pieces.
    server = tls_server((key_type,))
    _, body, output = one_request(gnutls_cli, server, "--recordsize=512", "-d", "5")
    lengths = [int(n) for n in re.findall(r"Received Packet Application Data\(23\) with length: (\d+)", output)]
    assert max(lengths) == 512 + 1 + 16  # content, content type, AEAD tag
    assert body["scheme"] == SCHEME_OF_KEY[key_type]


def test_no_common_cipher_suite_is_a_handshake_failure(tls_server, gnutls_cli):
    server = tls_server()
    client = gnutls_cli(server, f"--priority={TLS13_ONLY}:-CIPHER-ALL:+AES-128-CCM")
    output = client.finish()
    assert "Received alert [40]: Handshake failed" in output
    assert client.returncode != 0


def test_no_common_group_is_a_handshake_failure(tls_server, gnutls_cli):
    server = tls_server()
    client = gnutls_cli(server, f"--priority={TLS13_ONLY}:-GROUP-ALL:+GROUP-X448")
    output = client.finish()
    assert "Received alert [40]: Handshake failed" in output
    assert client.returncode != 0


def test_certificate_for_another_name_is_not_trusted(tls_server, gnutls_cli):
    # The hostname check the other tests rely on is real: a name the chain lacks fails.
    server = tls_server()
    client = gnutls_cli(server, servername="other.example.org")
    output = client.finish()
    assert "The name in the certificate does not match the expected" in output
    assert client.returncode != 0
    assert not response_bodies(output)
