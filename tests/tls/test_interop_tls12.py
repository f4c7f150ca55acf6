"""TLS 1.2 clients against the engine over loopback: OpenSSL 3.0, GnuTLS 3.7, tlslite-ng 0.8.2, Python's ssl.

The engine serves TLS 1.2 (ServerConfig.tls12, on by default) to clients whose
best version it is. Every connection here sends a request and reads the
responder's answer, whose body names what the engine negotiated; the client's
own report says what it saw. Covered:

- Every suite, ECDHE_ECDSA and ECDHE_RSA with AES-128-GCM, AES-256-GCM and
  ChaCha20-Poly1305: the ECDSA suites with ECDSA P-256, P-384 and Ed25519
  certificates (RFC 8422), the RSA suites with RSA-2048; from s_client,
  gnutls-cli, tlslite-ng and Python's ssl, each verifying the chain.
- The groups x25519, P-256, P-384 (s_client, gnutls-cli). In TLS 1.2 the
  client's groups also bound an ECDSA certificate's curve (RFC 8422 5.1): an
  ECDSA chain on a curve it lacks is not chosen (an RSA chain is, if there is one).
- Extended master secret (RFC 7627): used when offered; a client that does
  not offer it still connects, and gets no ticket. OpenSSL 3.0's s_client has
  no -no_ems: an OPENSSL_CONF file clears its ExtendedMasterSecret option.
- Ticket resumption (RFC 5077): s_client -sess_out/-sess_in and -reconnect,
  gnutls-cli --resume, tlslite's session object, Python's SSLSession. An EMS
  session's ticket offered without EMS is a fatal handshake_failure.
- The downgrade sentinel DOWNGRD\\x01 ending every TLS 1.2 ServerHello.random
  (full and resumed handshakes), and not a TLS 1.3 one.
- A client offering TLS 1.3 gets TLS 1.3; with tls12=False a TLS 1.2-only
  client gets a protocol_version alert; TLS_FALLBACK_SCSV is refused.
- Renegotiation refused with a no_renegotiation warning: s_client then gives
  up with a fatal handshake_failure; gnutls-cli retries, and the engine cuts
  it off (unexpected_message) after the fifth ClientHello.
- Keyless: s_client -tls1_2 -> `yestls tls-serve --oracle` -> `yestls oracle
  serve`: the oracle's audit line (method sign_tls12) names the client and
  server randoms s_client saw; resuming the ticket asks the oracle for nothing.
"""

import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.tls import SignatureScheme
from relay.tls.constants import AlertDescription, CipherSuite12

from ..interop_helpers import (
    HTTP_REQUEST,
    KEY_TYPES,
    SCHEME_OF_KEY,
    TIMEOUT,
    full_session,
    response_bodies,
    resumed_session,
)
from ..oracle import test_oracle_e2e
from . import test_interop_tlslite
from .test_interop_gnutls import GROUPS as GNUTLS_GROUPS
from .test_interop_gnutls import one_request as gnutls_one_request
from .test_interop_openssl import GROUPS as OPENSSL_GROUPS
from .test_interop_tlslite import HandshakeSettings, TLSRemoteAlert, assert_chain_is, request

pytestmark = pytest.mark.interop

# The fixtures of the other interop modules, reused (an assignment: ruff takes an imported fixture
# used as a parameter for a redefinition).
connect = test_interop_tlslite.connect   # tlslite-ng: connect(server, settings, session=) -> (TLSConnection, _)
edge = test_oracle_e2e.edge              # the oracle with every test key, `tls-serve --oracle` in front

DOWNGRADE_SENTINEL = b"DOWNGRD\x01"      # RFC 8446 4.1.3, the last 8 bytes of a TLS 1.2 server_random

# The AEAD part of a suite -> how GnuTLS and tlslite-ng name it
AEADS = {
    "AES_128_GCM_SHA256": ("AES-128-GCM", "aes128gcm"),
    "AES_256_GCM_SHA384": ("AES-256-GCM", "aes256gcm"),
    "CHACHA20_POLY1305_SHA256": ("CHACHA20-POLY1305", "chacha20-poly1305"),
}
# The engine's (and IANA's) suite name -> OpenSSL's
OPENSSL_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
}
# The signature part of GnuTLS's TLS 1.2 session description, per test key type
GNUTLS_SIGNATURE = {
    "ecdsa-p256": "ECDSA-SHA256",
    "ecdsa-p384": "ECDSA-SHA384",
    "rsa-2048": "RSA-PSS-RSAE-SHA256",
    "ed25519": "EdDSA-Ed25519",
}
TLS12_ONLY = "NORMAL:-VERS-ALL:+VERS-TLS1.2"

# OpenSSL 3.0's s_client has no -no_ems; its ssl_conf "Options = -ExtendedMasterSecret" is the same switch.
NO_EMS_CONFIG = """\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_section
[ssl_section]
system_default = no_ems
[no_ems]
Options = -ExtendedMasterSecret
"""


def suite_for(key_type: str, aead: str) -> str:
    """The one suite with this AEAD that a certificate of `key_type` serves."""
    return f"TLS_ECDHE_{'RSA' if key_type.startswith('rsa') else 'ECDSA'}_WITH_{aead}"


# Every suite with every key type that serves it: the ECDSA suites thrice, the RSA suites once.
SUITE_CASES = [pytest.param(key_type, aead, id=f"{key_type}-{aead}") for key_type in KEY_TYPES for aead in AEADS]


def hello_randoms(trace: str) -> list[tuple[str, bytes]]:
    """Each ClientHello's and ServerHello's (message, random) in `s_client -trace` output, in order."""
    found = re.finditer(
        r"^ +(?P<message>ClientHello|ServerHello), Length=\d+\n.*\n +Random:\n"
        r" +gmt_unix_time=0x(?P<time>[0-9A-F]{8})\n +random_bytes \(len=28\): (?P<rest>[0-9A-F]{56})$",
        trace, re.MULTILINE)
    return [(m["message"], bytes.fromhex(m["time"] + m["rest"])) for m in found]


def server_random(trace: str) -> bytes:
    randoms = [random for message, random in hello_randoms(trace) if message == "ServerHello"]
    assert len(randoms) == 1, f"expected one ServerHello in the trace, found {len(randoms)}"
    return randoms[0]


def client_random(trace: str) -> bytes:
    randoms = [random for message, random in hello_randoms(trace) if message == "ClientHello"]
    assert len(randoms) == 1, f"expected one ClientHello in the trace, found {len(randoms)}"
    return randoms[0]


@pytest.fixture
def no_ems_config(tmp_path) -> Path:
    """An OPENSSL_CONF that makes s_client offer no extended master secret."""
    path = tmp_path / "no-ems.cnf"
    path.write_text(NO_EMS_CONFIG)
    return path


# --- openssl s_client ------------------------------------------------------------------------------

@pytest.mark.parametrize("key_type, aead", SUITE_CASES)
def test_s_client_cipher_suite(tls_server, s_client, key_type, aead):
    suite = suite_for(key_type, aead)
    server = tls_server((key_type,))
    client = s_client(server, "-tls1_2", "-cipher", OPENSSL_SUITES[suite])
    done = client.wait_handshake()
    first = client.request()
    second = client.request()   # a second request and answer on the same connection
    output = client.finish()
    assert (done["kind"], done["version"], done["cipher"]) == ("New", "TLSv1.2", OPENSSL_SUITES[suite])
    assert "Verify return code: 0 (ok)" in output
    assert re.search(r"^ +Protocol +: TLSv1\.2$", output, re.MULTILINE)
    assert first == second
    assert first["version"] == "TLSv1.2"
    assert first["cipher"] == suite
    assert first["scheme"] == SCHEME_OF_KEY[key_type]
    assert first["group"] == "x25519"
    assert first["resumed"] == "no"
    assert first["sni"] == "mx.example.org"
    assert len(response_bodies(output)) == 2


# In TLS 1.2 the client's supported_groups also bounds the curve of an ECDSA certificate (RFC 8422 5.1;
# OpenSSL checks it, "wrong curve"): RSA and Ed25519 certificates go with every group, an ECDSA one needs
# its own curve offered too.
GROUP_CASES = [
    *[(key_type, group, group) for key_type in ("rsa-2048", "ed25519") for group in OPENSSL_GROUPS],
    ("ecdsa-p256", "P-256", "P-256"),
    ("ecdsa-p256", "X25519:P-256", "X25519"),   # the engine's preference, x25519, first
    ("ecdsa-p384", "P-384", "P-384"),
    ("ecdsa-p384", "P-256:P-384", "P-256"),
]


@pytest.mark.parametrize("key_type, offered, group", GROUP_CASES)
def test_s_client_group(tls_server, s_client, key_type, offered, group):
    engine_name, temp_key = OPENSSL_GROUPS[group]
    server = tls_server((key_type,))
    done, body, output = full_session(s_client, server, "-tls1_2", "-groups", offered)
    assert done["version"] == "TLSv1.2"
    assert f"Server Temp Key: {temp_key}" in output
    assert body["version"] == "TLSv1.2"
    assert body["group"] == engine_name
    assert body["scheme"] == SCHEME_OF_KEY[key_type]


@pytest.mark.parametrize("key_types", [("ecdsa-p256",), ("ecdsa-p256", "rsa-2048")], ids=["ecdsa", "ecdsa+rsa"])
def test_s_client_ecdsa_certificate_needs_its_curve_offered(tls_server, s_client, key_types):
    # The client offers only X25519: the P-256 certificate is not for it. With an RSA chain too, the
    # engine should take ECDHE_RSA; with the ECDSA chain alone it can only refuse.
    server = tls_server(key_types)
    client = s_client(server, "-tls1_2", "-groups", "X25519")
    if "rsa-2048" in key_types:
        done = client.wait_handshake()
        body = client.request()
        client.finish()
        assert done["cipher"] == "ECDHE-RSA-AES128-GCM-SHA256"
        assert body["scheme"] == SCHEME_OF_KEY["rsa-2048"]
    else:
        output = client.finish()
        assert "alert handshake failure" in output and "SSL alert number 40" in output
        assert "wrong curve" not in output


def test_s_client_extended_master_secret_when_offered(tls_server, s_client):
    server = tls_server()
    done, body, output = full_session(s_client, server, "-tls1_2", "-trace")
    assert "Extended master secret: yes" in output
    server_hello = output[output.index("ServerHello, Length="):output.index("Certificate, Length=")]
    assert "extension_type=extended_master_secret(23), length=0" in server_hello
    assert body["version"] == "TLSv1.2"


def test_s_client_without_extended_master_secret(tls_server, s_client, monkeypatch, no_ems_config, tmp_path):
    server = tls_server()
    session = tmp_path / "session.pem"
    monkeypatch.setenv("OPENSSL_CONF", str(no_ems_config))
    done, body, output = full_session(s_client, server, "-tls1_2", "-trace", "-sess_out", session)
    assert "Extended master secret: no" in output
    client_hello = output[output.index("ClientHello, Length="):output.index("ServerHello, Length=")]
    assert "extended_master_secret" not in client_hello   # the config did reach s_client
    assert done["kind"] == "New" and done["version"] == "TLSv1.2"
    assert body["version"] == "TLSv1.2" and body["resumed"] == "no"
    # No ticket for a session without EMS, and no session ID either (no ID cache): nothing to resume,
    # so s_client writes no session file at all.
    assert "TLS session ticket:" not in output
    assert "NewSessionTicket" not in output
    assert re.search(r"^ +Session-ID: $", output, re.MULTILINE)
    assert not session.exists()


def test_s_client_ticket_resumption(tls_server, s_client, tmp_path):
    server = tls_server()
    session = tmp_path / "session.pem"
    first, first_body, first_output = full_session(s_client, server, "-tls1_2", "-sess_out", session)
    assert first["kind"] == "New" and first_body["resumed"] == "no"
    assert "TLS session ticket lifetime hint: 86400 (seconds)" in first_output
    assert session.exists()

    done, body, output = resumed_session(s_client, server, session, "-tls1_2")
    assert done["kind"] == "Reused"
    assert done["cipher"] == first["cipher"]
    assert "Verify return code: 0 (ok)" in output
    assert "Extended master secret: yes" in output
    assert body["version"] == "TLSv1.2"
    assert body["resumed"] == "yes"
    assert body["scheme"] == ""   # resumption made no signature
    assert body["cipher"] == first_body["cipher"]
    assert body["sni"] == "mx.example.org"


def test_s_client_ems_ticket_offered_without_ems_is_a_handshake_failure(tls_server, s_client, tmp_path,
                                                                        monkeypatch, no_ems_config):
    # RFC 7627 5.3: a session with the extended master secret resumed without it must be aborted.
    server = tls_server()
    session = tmp_path / "session.pem"
    _, _, first_output = full_session(s_client, server, "-tls1_2", "-sess_out", session)
    assert "Extended master secret: yes" in first_output and session.exists()

    monkeypatch.setenv("OPENSSL_CONF", str(no_ems_config))
    client = s_client(server, "-tls1_2", "-sess_in", session, "-msg")
    output = client.finish()
    assert "<<< TLS 1.2, Alert [length 0002], fatal handshake_failure" in output
    assert "sslv3 alert handshake failure" in output and "SSL alert number 40" in output
    assert client.returncode == 1
    assert "Reused," not in output
    assert not response_bodies(output)


@pytest.mark.parametrize("offer_ems", [True, False], ids=["ems", "no-ems"])
def test_s_client_reconnect(tls_server, s_client, monkeypatch, no_ems_config, offer_ems):
    # -reconnect: the first handshake, then five more offering its session. Only an EMS session has a ticket.
    server = tls_server()
    if not offer_ems:
        monkeypatch.setenv("OPENSSL_CONF", str(no_ems_config))
    client = s_client(server, "-tls1_2", "-reconnect")
    client.wait_for(client.handshake_done, count=6)
    body = client.request()   # on the sixth connection
    output = client.finish()
    kinds = re.findall(r"^(New|Reused), TLSv1\.2, ", output, re.MULTILINE)
    assert kinds == (["New"] + ["Reused"] * 5 if offer_ems else ["New"] * 6)
    assert body["resumed"] == ("yes" if offer_ems else "no")
    assert f"Extended master secret: {'yes' if offer_ems else 'no'}" in output


@pytest.mark.parametrize("resumed", [False, True], ids=["full", "resumed"])
@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
def test_s_client_downgrade_sentinel(tls_server, s_client, tmp_path, key_type, resumed):
    server = tls_server((key_type,))
    session = tmp_path / "session.pem"
    done, body, output = full_session(s_client, server, "-tls1_2", "-trace", "-sess_out", session)
    if resumed:
        done, body, output = resumed_session(s_client, server, session, "-tls1_2", "-trace")
    assert done["kind"] == ("Reused" if resumed else "New")
    assert body["resumed"] == ("yes" if resumed else "no")
    assert server_random(output).hex().endswith("444f574e47524401")   # DOWNGRD\x01


def test_s_client_offering_tls13_gets_tls13(tls_server, s_client):
    server = tls_server()
    assert server.config.tls12
    done, body, output = full_session(s_client, server, "-trace")
    assert done["version"] == "TLSv1.3"
    assert body["version"] == "TLSv1.3"
    assert body["cipher"] == "TLS_AES_128_GCM_SHA256"
    # A TLS 1.3 server_random carries no downgrade sentinel (neither TLS 1.2's nor TLS 1.1's).
    assert server_random(output)[-8:-1] != DOWNGRADE_SENTINEL[:-1]


def test_s_client_tls12_refused_when_disabled(tls_server, s_client):
    server = tls_server(tls12=False)
    client = s_client(server, "-tls1_2")
    output = client.finish()
    assert "tlsv1 alert protocol version" in output and "SSL alert number 70" in output
    assert client.returncode == 1
    assert not response_bodies(output)
    # The same server still serves TLS 1.3.
    done, body, _ = full_session(s_client, server)
    assert done["version"] == body["version"] == "TLSv1.3"


def test_s_client_fallback_scsv_is_refused(tls_server, s_client):
    # RFC 7507: a client that retries with TLS 1.2 and says so, to a server that speaks TLS 1.3.
    server = tls_server()
    client = s_client(server, "-tls1_2", "-fallback_scsv")
    output = client.finish()
    assert "alert inappropriate fallback" in output and "SSL alert number 86" in output
    assert client.returncode == 1
    assert not response_bodies(output)


def test_s_client_renegotiation_is_refused(tls_server, s_client):
    server = tls_server()
    client = s_client(server, "-tls1_2", "-msg")
    client.wait_handshake()
    assert client.request()["version"] == "TLSv1.2"
    client.send(b"R\n")   # s_client's command: renegotiate
    client.wait_for(r"^RENEGOTIATING$")
    # The engine answers the second ClientHello with a no_renegotiation warning; OpenSSL, which
    # asked for a new handshake and did not get one, gives up with a fatal handshake_failure.
    client.wait_for(r"ssl3_read_bytes:no renegotiation")
    output = client.finish()
    after = output[output.index("RENEGOTIATING"):]
    assert ">>> TLS 1.2, Handshake [length" in after and "ClientHello" in after
    assert "<<< TLS 1.2, Alert [length 0002], warning no_renegotiation" in after
    assert ">>> TLS 1.2, Alert [length 0002], fatal handshake_failure" in after
    assert "<<< TLS 1.2, Handshake" not in after   # no ServerHello: the engine never renegotiated
    assert client.returncode == 1
    assert len(response_bodies(output)) == 1


# --- gnutls-cli --------------------------------------------------------------------------------------

@pytest.mark.parametrize("key_type, aead", SUITE_CASES)
def test_gnutls_cipher_suite(tls_server, gnutls_cli, key_type, aead):
    cipher = AEADS[aead][0]
    server = tls_server((key_type,))
    description, body, output = gnutls_one_request(
        gnutls_cli, server, f"--priority={TLS12_ONLY}:-CIPHER-ALL:+{cipher}")
    assert "- Status: The certificate is trusted." in output
    assert description == f"(TLS1.2-X.509)-(ECDHE-X25519)-({GNUTLS_SIGNATURE[key_type]})-({cipher})"
    assert "- Options: extended master secret, safe renegotiation," in output
    assert body["version"] == "TLSv1.2"
    assert body["cipher"] == suite_for(key_type, aead)
    assert body["scheme"] == SCHEME_OF_KEY[key_type]
    assert body["sni"] == "mx.example.org"


@pytest.mark.parametrize("group", GNUTLS_GROUPS)
@pytest.mark.parametrize("key_type", ["rsa-2048", "ed25519"])   # certificates for every group (RFC 8422 5.1)
def test_gnutls_group(tls_server, gnutls_cli, key_type, group):
    server = tls_server((key_type,))
    description, body, _ = gnutls_one_request(gnutls_cli, server, f"--priority={TLS12_ONLY}:-GROUP-ALL:+GROUP-{group}")
    assert description.startswith(f"(TLS1.2-X.509)-(ECDHE-{group})-")
    assert body["group"] == GNUTLS_GROUPS[group]


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
def test_gnutls_resumption(tls_server, gnutls_cli, key_type):
    server = tls_server((key_type,))
    client = gnutls_cli(server, "--resume", f"--priority={TLS12_ONLY}")
    client.wait_for(r"^- Resume Handshake was completed$")
    body = client.request()
    output = client.finish()
    # The first, full handshake signed; the resumed one did not.
    assert f"(TLS1.2-X.509)-(ECDHE-X25519)-({GNUTLS_SIGNATURE[key_type]})-(AES-128-GCM)" in output
    assert "- Description: (TLS1.2-X.509)-(ECDHE-X25519)-(AES-128-GCM)" in output
    assert "*** This is a resumed session" in output
    assert body["version"] == "TLSv1.2"
    assert body["resumed"] == "yes"
    assert body["scheme"] == ""
    assert body["sni"] == "mx.example.org"


def test_gnutls_renegotiation_is_refused(tls_server, gnutls_cli):
    # gnutls-cli retries a refused renegotiation at once; the engine refuses four ClientHellos with a
    # no_renegotiation warning and ends the connection at the fifth (unexpected_message).
    server = tls_server()
    client = gnutls_cli(server, f"--priority={TLS12_ONLY}", "--inline-commands", "-d", "4")
    client.wait_handshake()
    assert client.request()["version"] == "TLSv1.2"
    client.send(b"^renegotiate^\n")
    client.wait_for(r"^\*\*\* ReHandshake has failed$")
    output = client.finish()
    after = output[output.index("- Simple Client Mode:"):]
    assert after.count("CLIENT HELLO was queued") == 5
    assert after.count("*** Received alert [100]: No renegotiation is allowed") == 4
    assert "*** Received alert [10]: Unexpected message" in after
    assert "SERVER HELLO" not in after
    assert client.returncode == 1
    assert len(response_bodies(output)) == 1


# --- tlslite-ng ------------------------------------------------------------------------------------

def tls12_settings(**fields) -> HandshakeSettings:
    settings = HandshakeSettings()
    settings.maxVersion = (3, 3)
    for name, value in fields.items():
        setattr(settings, name, value)
    return settings


@pytest.mark.parametrize("key_type, aead", SUITE_CASES)
def test_tlslite_cipher_suite(pki, tls_server, connect, key_type, aead):
    cipher = AEADS[aead][1]
    server = tls_server((key_type,))
    connection, _ = connect(server, tls12_settings(cipherNames=[cipher]))
    body = request(connection)
    assert connection.getVersionName() == "TLS 1.2"
    assert connection.getCipherName() == cipher
    connection.close()
    assert connection.session.extendedMasterSecret
    assert_chain_is(connection, pki, key_type)
    assert body["version"] == "TLSv1.2"
    assert body["cipher"] == suite_for(key_type, aead)
    assert body["scheme"] == SCHEME_OF_KEY[key_type]


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
def test_tlslite_resumption_with_session_object(tls_server, connect, key_type):
    server = tls_server((key_type,))
    first, _ = connect(server, tls12_settings())
    first_body = request(first)
    first.close()
    assert not first.resumed and first_body["resumed"] == "no"
    assert first.session.tls_1_0_tickets, "no TLS 1.2 ticket: the test proves nothing"

    again, _ = connect(server, tls12_settings(), session=first.session)
    body = request(again)
    assert again.getVersionName() == "TLS 1.2"
    again.close()
    assert again.resumed
    assert body["resumed"] == "yes"
    assert body["cipher"] == first_body["cipher"]
    assert body["scheme"] == ""


def test_tlslite_tls12_refused_when_disabled(tls_server, connect):
    server = tls_server(tls12=False)
    with pytest.raises(TLSRemoteAlert) as refused:
        connect(server, tls12_settings())
    assert refused.value.description == AlertDescription.protocol_version


# --- Python's ssl ------------------------------------------------------------------------------------

def python_client(pki, cipher: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    if cipher:
        context.set_ciphers(cipher)
    return context


@dataclass
class PythonConnection:
    """What Python's ssl saw of one connection, read before it closed, and the answer's body."""

    version: str
    cipher: str
    session: ssl.SSLSession
    reused: bool
    body: dict[str, str]


def python_connection(context: ssl.SSLContext, server, session=None) -> PythonConnection:
    """A verified connection over a real socket, one request, read until its answer is complete."""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="mx.example.org", session=session) as tls:
            tls.sendall(HTTP_REQUEST)
            received = b""
            while not response_bodies(received.decode()):
                chunk = tls.recv(4096)
                assert chunk, f"server closed before answering; got {received!r}"
                received += chunk
            assert received.startswith(b"HTTP/1.0 200 OK\r\n")
            return PythonConnection(tls.version(), tls.cipher()[0], tls.session, tls.session_reused,
                                    response_bodies(received.decode())[0])


@pytest.mark.parametrize("key_type, aead", SUITE_CASES)
def test_python_ssl(pki, tls_server, key_type, aead):
    suite = suite_for(key_type, aead)
    server = tls_server((key_type,))
    connection = python_connection(python_client(pki, OPENSSL_SUITES[suite]), server)
    assert connection.version == "TLSv1.2"
    assert connection.cipher == OPENSSL_SUITES[suite]
    assert connection.body["version"] == "TLSv1.2"
    assert connection.body["cipher"] == suite
    assert connection.body["scheme"] == SCHEME_OF_KEY[key_type]


def test_python_ssl_resumption(pki, tls_server):
    server = tls_server()
    context = python_client(pki)
    first = python_connection(context, server)
    assert not first.reused and first.body["resumed"] == "no"
    assert first.session.has_ticket
    again = python_connection(context, server, session=first.session)
    assert again.reused
    assert again.version == "TLSv1.2"
    assert again.body["resumed"] == "yes"
    assert again.body["version"] == "TLSv1.2"


# --- through the key oracle ---------------------------------------------------------------------------

def sign_tls12_lines(edge) -> list[dict]:
    return [line for line in edge.home.audit_lines() if line["method"] == "sign_tls12"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_s_client_through_the_oracle(edge, s_client, key_type, tmp_path):
    before = len(sign_tls12_lines(edge))
    session = tmp_path / "session.pem"
    client = s_client(edge.serve, "-tls1_2", "-sigalgs", SCHEME_OF_KEY[key_type], "-trace", "-sess_out", session)
    done = client.wait_handshake()
    body = client.request()
    output = client.finish()
    assert done["kind"] == "New" and done["version"] == "TLSv1.2"
    assert "Verify return code: 0 (ok)" in output
    assert body["version"] == "TLSv1.2"
    assert body["scheme"] == SCHEME_OF_KEY[key_type]
    assert body["cipher"] == suite_for(key_type, "AES_128_GCM_SHA256")

    # The oracle signed this one ServerKeyExchange, and its audit line says for which handshake.
    new = sign_tls12_lines(edge)[before:]
    assert len(new) == 1, new
    line = new[0]
    assert line["outcome"] == "signed"
    assert line["version"] == "TLSv1.2"
    assert line["peer"] == "edge"
    assert line["key_id"] == edge.home.key_ids[key_type]
    assert line["scheme"] == SignatureScheme[SCHEME_OF_KEY[key_type].upper()]
    assert line["server_name"] == "mx.example.org"
    assert line["group"] == body["group"] == "x25519"
    assert "TLS_" + CipherSuite12(line["cipher_suite"]).name == body["cipher"]
    assert line["client_random"] == client_random(output).hex()
    assert line["server_random"] == server_random(output).hex()
    assert bytes.fromhex(line["server_random"])[-8:] == DOWNGRADE_SENTINEL

    # Resuming the ticket through the edge asks the oracle for nothing.
    done, body, _ = resumed_session(s_client, edge.serve, session, "-tls1_2")
    assert done["kind"] == "Reused" and body["resumed"] == "yes"
    assert len(sign_tls12_lines(edge)) == before + 1
