"""`openssl s_client` (OpenSSL 3.0) against the engine over loopback.

Every test sends a request and reads the responder's answer, whose body names
what the engine negotiated; s_client's own summary says what the client saw.
s_client verifies the chain against the test CA and the name in the certificate.
OpenSSL 3.0 has no ML-KEM, so X25519MLKEM768 is left to the tlslite-ng tests.
"""

import os
import re

import pytest

from relay.aio.tls import LocalKeySigner
from relay.tls import ServerConfig, TicketKeyring
from relay.tls.constants import Group

from ..conftest import ServerThread
from ..interop_helpers import (
    HRR_RANDOM,
    KEY_TYPES,
    SCHEME_OF_KEY,
    SClient,
    TlsServe,
    full_session,
    response_bodies,
    resumed_session,
)
from ..pki import make_pki

pytestmark = pytest.mark.interop

SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
# OpenSSL group name -> (the engine's name in the body, s_client's "Server Temp Key" line)
GROUPS = {
    "X25519": ("x25519", "X25519, 253 bits"),
    "P-256": ("secp256r1", "ECDH, prime256v1, 256 bits"),
    "P-384": ("secp384r1", "ECDH, secp384r1, 384 bits"),
}


def saw_hello_retry(trace: str) -> bool:
    """From `s_client -trace`: a ServerHello carrying the HelloRetryRequest random, then a second ClientHello."""
    hrr = (f"gmt_unix_time=0x{HRR_RANDOM[:4].hex().upper()}\n"
           f"        random_bytes (len=28): {HRR_RANDOM[4:].hex().upper()}")
    return hrr in trace and trace.count("    ClientHello, Length=") == 2


def retry_group(trace: str) -> str:
    """The group the HelloRetryRequest asked for (the key_share right after the HRR random)."""
    tail = trace[trace.index(HRR_RANDOM[4:].hex().upper()):]
    return re.search(r"NamedGroup: (\S+)", tail).group(1)


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_cipher_suite(tls_server, s_client, key_type, suite):
    server = tls_server((key_type,))
    done, body, output = full_session(s_client, server, "-ciphersuites", suite)
    assert (done["kind"], done["version"], done["cipher"]) == ("New", "TLSv1.3", suite)
    assert "Verify return code: 0 (ok)" in output
    assert body["version"] == "TLSv1.3"
    assert body["cipher"] == suite
    assert body["scheme"] == SCHEME_OF_KEY[key_type]
    assert body["resumed"] == "no"
    assert body["sni"] == "mx.example.org"


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_group(tls_server, s_client, key_type, group):
    engine_name, temp_key = GROUPS[group]
    server = tls_server((key_type,))
    done, body, output = full_session(s_client, server, "-groups", group, "-trace")
    assert done["kind"] == "New"
    assert f"Server Temp Key: {temp_key}" in output
    assert not saw_hello_retry(output)  # the client's one share was usable
    assert body["group"] == engine_name
    assert body["scheme"] == SCHEME_OF_KEY[key_type]


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_hello_retry_for_a_share_the_server_lacks(tls_server, s_client, key_type):
    # s_client sends one key share, for its first group; the engine has no X448.
    server = tls_server((key_type,))
    done, body, output = full_session(s_client, server, "-groups", "X448:P-256", "-trace")
    assert saw_hello_retry(output)
    assert retry_group(output) == "secp256r1"
    assert done["kind"] == "New"
    assert "Server Temp Key: ECDH, prime256v1, 256 bits" in output
    assert body["group"] == "secp256r1"
    assert body["scheme"] == SCHEME_OF_KEY[key_type]


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_hello_retry_when_server_insists_on_its_preferred_group(tls_server, s_client, key_type):
    # s_client offers P-384 but sends its only share for X25519.
    server = tls_server((key_type,), groups=(Group.SECP384R1, Group.X25519), insist_on_preferred_group=True)
    done, body, output = full_session(s_client, server, "-groups", "X25519:P-384", "-trace")
    assert saw_hello_retry(output)
    assert retry_group(output) == "secp384r1"
    assert "Server Temp Key: ECDH, secp384r1, 384 bits" in output
    assert body["group"] == "secp384r1"


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_no_hello_retry_when_server_takes_the_offered_share(tls_server, s_client, key_type):
    # Same offer, engine preferring P-384 but not insisting: the X25519 share is used as sent.
    server = tls_server((key_type,), groups=(Group.SECP384R1, Group.X25519))
    done, body, output = full_session(s_client, server, "-groups", "X25519:P-384", "-trace")
    assert not saw_hello_retry(output)
    assert body["group"] == "x25519"


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_resumption_with_saved_session(tls_server, s_client, key_type, tmp_path):
    server = tls_server((key_type,), tickets_per_handshake=2)
    first_session, second_session = tmp_path / "first.pem", tmp_path / "second.pem"
    client = s_client(server, "-sess_out", first_session)
    first = client.wait_handshake()
    first_body = client.request()
    client.wait_ticket(count=2)  # -sess_out keeps the last one
    client.finish()
    assert first["kind"] == "New" and first_body["resumed"] == "no"

    # Resume, saving the ticket the resumed connection gets; then resume from that one.
    for session_in, session_out in ((first_session, second_session), (second_session, None)):
        options = ("-sess_out", session_out) if session_out else ()
        done, body, output = resumed_session(s_client, server, session_in, *options)
        assert done["kind"] == "Reused"
        assert done["cipher"] == first["cipher"]
        assert body["resumed"] == "yes"
        assert body["scheme"] == ""  # resumption made no signature
        assert body["cipher"] == first_body["cipher"]
        assert body["sni"] == "mx.example.org"
        assert "Verify return code: 0 (ok)" in output


@pytest.mark.parametrize("options, cipher", [
    (("-allow_no_dhe_kex",), "TLS_AES_128_GCM_SHA256"),  # offers psk_ke too; the engine keeps (EC)DHE
    (("-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"), "TLS_CHACHA20_POLY1305_SHA256"),  # same hash
], ids=["allow-no-dhe-kex", "other-suite-same-hash"])
def test_resumption_variants(tls_server, s_client, tmp_path, options, cipher):
    server = tls_server()
    session = tmp_path / "session.pem"
    full_session(s_client, server, "-ciphersuites", "TLS_AES_128_GCM_SHA256", session_out=session)
    done, body, output = resumed_session(s_client, server, session, *options)
    assert done["kind"] == "Reused"
    assert body["resumed"] == "yes"
    assert body["cipher"] == cipher
    assert body["group"] == "x25519"  # psk_dhe_ke: still a fresh key exchange


def test_ticket_from_another_server_gets_a_full_handshake(tls_server, s_client, tmp_path):
    # Like a server restart: the new ticket keys cannot open the old ticket.
    session = tmp_path / "session.pem"
    full_session(s_client, tls_server(), session_out=session)
    restarted = tls_server()
    done, body, output = resumed_session(s_client, restarted, session)
    assert done["kind"] == "New"
    assert body["resumed"] == "no"
    assert body["scheme"] == SCHEME_OF_KEY["ecdsa-p256"]


@pytest.mark.parametrize("request_peer_update", [False, True], ids=["k", "K"])
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_key_update_then_requests_still_work(tls_server, s_client, key_type, request_peer_update):
    server = tls_server((key_type,))
    client = s_client(server, "-msg")
    client.wait_handshake()
    assert client.request()["resumed"] == "no"
    for round_number in (1, 2):
        client.key_update(request_peer_update)
        body = client.request()  # client->server under the new key, answer read back
        assert body["version"] == "TLSv1.3"
        assert len(response_bodies(client.output)) == round_number + 1
    output = client.finish()
    sent = output.count(">>> TLS 1.3, Handshake [length 0005], KeyUpdate")
    received = output.count("<<< TLS 1.3, Handshake [length 0005], KeyUpdate")
    assert sent == 2
    # `K` asks the server to update its sending key too; `k` does not.
    assert received == (2 if request_peer_update else 0)
    assert len(response_bodies(output)) == 3


EARLY_REQUESTS = b"GET /early-1 HTTP/1.0\r\n\r\nGET /early-2 HTTP/1.0\r\n\r\n"


@pytest.mark.parametrize("hello_retry", [False, True], ids=["same-group", "after-hrr"])
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_early_data_is_refused_and_connection_works(tls_server, s_client, key_type, hello_retry, tmp_path):
    server = tls_server((key_type,), ticket_early_data_size=1024)
    session, early = tmp_path / "session.pem", tmp_path / "early.txt"
    early.write_bytes(EARLY_REQUESTS)
    _, _, first_output = full_session(s_client, server, session_out=session)
    assert "Max Early Data: 1024" in first_output  # the ticket allows 0-RTT

    # With X448 first the client's only share is unusable: its 0-RTT records
    # arrive before a HelloRetryRequest and must be skipped in plaintext.
    groups = ("-groups", "X448:X25519") if hello_retry else ()
    again = s_client(server, "-sess_in", session, "-early_data", early, "-trace", *groups)
    done = again.wait_handshake()
    assert done["kind"] == "Reused"
    first = again.request()
    second = again.request()
    output = again.finish()
    assert "Early data was rejected" in output
    assert saw_hello_retry(output) == hello_retry
    assert first["resumed"] == second["resumed"] == "yes"
    # Only the two requests sent after the handshake were answered, not the early ones.
    assert len(response_bodies(output)) == 2


def test_large_request_spans_many_records(tls_server, s_client):
    # 100 KB would overflow the responder's 64 KB request limit; 48 KB is three full records and more.
    server = tls_server()
    client = s_client(server, "-nocommands")  # no command letters: the data is only data
    client.wait_handshake()
    client.send(b"GET / HTTP/1.0\r\nX-Padding: " + b"p" * 48 * 1024 + b"\r\n\r\n")
    client.wait_for(r"resumed=no")
    body = client.request()
    output = client.finish()
    assert body["version"] == "TLSv1.3"
    assert len(response_bodies(output)) == 2


@pytest.mark.parametrize("block", [64, 4096])
def test_padded_client_records(tls_server, s_client, block):
    # -record_padding: every record the client protects (Finished, KeyUpdate,
    # data) carries zero padding up to a multiple of `block`, which the engine strips.
    server = tls_server()
    client = s_client(server, "-record_padding", str(block))
    client.wait_handshake()
    client.request()
    client.key_update(request_peer_update=True)
    body = client.request()
    output = client.finish()
    assert body["version"] == "TLSv1.3"
    assert len(response_bodies(output)) == 2


@pytest.mark.parametrize("scheme", ["rsa_pss_rsae_sha256", "rsa_pss_rsae_sha384", "rsa_pss_rsae_sha512"])
def test_rsa_signature_scheme_follows_the_client(tls_server, s_client, scheme):
    server = tls_server(("rsa-2048",))
    done, body, output = full_session(s_client, server, "-sigalgs", scheme)
    assert f"Peer signing digest: SHA{scheme[-3:]}" in output
    assert "Peer signature type: RSA-PSS" in output
    assert body["scheme"] == scheme


def test_no_certificate_fits_the_client_signature_algorithms(tls_server, s_client):
    # TLS 1.3 ties ECDSA hashes to curves: a P-384 key cannot make ecdsa_secp256r1_sha256.
    server = tls_server(("ecdsa-p384",))
    client = s_client(server, "-sigalgs", "ecdsa_secp256r1_sha256")
    output = client.finish()
    assert "alert handshake failure" in output
    assert client.returncode != 0
    assert not response_bodies(output)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_alpn(tls_server, s_client, key_type):
    server = tls_server((key_type,), alpn_protocols=(b"h2", b"http/1.1"))
    client = s_client(server, "-alpn", "http/1.1,h2")
    client.wait_handshake()
    body = client.request()
    output = client.finish()
    assert "ALPN protocol: h2" in output  # the server's preference wins
    assert body["alpn"] == "h2"


def test_alpn_without_common_protocol_fails_with_alert(tls_server, s_client):
    server = tls_server(alpn_protocols=(b"h2",))
    client = s_client(server, "-alpn", "smtp")
    output = client.finish()
    assert "alert no application protocol" in output
    assert client.returncode != 0
    assert not response_bodies(output)


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    """A second CA with leaves named only mail.example.net."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), names=("mail.example.net",))


@pytest.fixture
def two_name_server(pki, other_pki):
    """two_name_server(key_type) -> server holding mx.example.org's chain (first, default) and mail.example.net's."""
    runner = ServerThread()

    def start(key_type):
        leaves = [pki.leaves[key_type], other_pki.leaves[key_type]]
        config = ServerConfig([leaf.chain for leaf in leaves], tickets=TicketKeyring(os.urandom))
        signer = LocalKeySigner([(chain, leaf.key) for chain, leaf in zip(config.certificates, leaves)])
        return runner.start(config, signer)

    yield start
    runner.stop()


# SNI sent -> the certificate name expected (the first chain, mx.example.org, is the default)
SNI_CASES = {
    "mail.example.net": "mail.example.net",
    "mx.example.org": "mx.example.org",
    "unknown.example.com": "mx.example.org",
    None: "mx.example.org",
}


@pytest.mark.parametrize("servername", SNI_CASES, ids=lambda name: name or "no-sni")
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_sni_chooses_the_chain(pki, other_pki, two_name_server, s_client, key_type, servername):
    server = two_name_server(key_type)
    expected = SNI_CASES[servername]
    # Each name's chain verifies only against its own CA.
    ca = other_pki.ca_pem if expected == "mail.example.net" else pki.ca_pem
    client = s_client(server, ca=ca, servername=servername, verify_name=expected)
    client.wait_handshake()
    body = client.request()
    output = client.finish()
    assert f"subject=CN = {expected}" in output
    assert "Verify return code: 0 (ok)" in output
    if servername:
        assert body["sni"] == servername
    assert body["scheme"] == SCHEME_OF_KEY[key_type]


def test_yestls_tls_serve_command(pki, tmp_path):
    ecdsa, rsa = pki.leaves["ecdsa-p256"], pki.leaves["rsa-2048"]
    with TlsServe("--cert", ecdsa.chain_pem, "--key", ecdsa.key_pem, "--cert", rsa.chain_pem, "--key", rsa.key_pem,
                  "--groups", "secp384r1", "x25519", "--insist-on-preferred-group",
                  "--alpn", "smtp", "--ticket-early-data", "512") as serve:
        serve.wait_listening()
        session = tmp_path / "session.pem"
        # Allowing only RSA-PSS signatures makes the engine pick the second chain.
        with SClient(serve.address, pki.ca_pem, "-sigalgs", "rsa_pss_rsae_sha256", "-alpn", "smtp",
                     "-sess_out", session) as client:
            done = client.wait_handshake()
            body = client.request()
            client.wait_ticket()
            output = client.finish()
        assert done["kind"] == "New"
        assert "Max Early Data: 512" in output
        assert body == {
            "version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "group": "secp384r1",
            "scheme": "rsa_pss_rsae_sha256", "resumed": "no", "sni": "mx.example.org", "alpn": "smtp",
        }
        with SClient(serve.address, pki.ca_pem, "-sess_in", session, "-alpn", "smtp") as client:
            assert client.wait_handshake()["kind"] == "Reused"
            assert client.request()["resumed"] == "yes"
            client.finish()
        serve.wait_for(r"TLSv1\.3 TLS_AES_128_GCM_SHA256 secp384r1 rsa_pss_rsae_sha256$")
        serve.wait_for(r"TLSv1\.3 TLS_AES_128_GCM_SHA256 secp384r1 resumed$")
