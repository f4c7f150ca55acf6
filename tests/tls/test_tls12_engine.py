"""The engine's TLS 1.2 (RFC 5246, 5746, 5077, 7627, 7507, 8422), rule by rule, with a raw client.

Each wrong input must get its one alert and close the connection; each
right one must work. tests/tls/test_interop_tls12.py shows the same engine with
OpenSSL, GnuTLS, tlslite-ng and Python's ssl.
"""

import os

import pytest

from relay.tls import (
    AlertDescription,
    CloseNotifyReceived,
    ConnectionClosed,
    DataReceived,
    HandshakeComplete,
    PeerAlert,
    ServerConfig,
    State,
    TicketKeyring,
    TLSAlert,
)
from relay.tls.constants import (
    DOWNGRADE_TLS12,
    FALLBACK_SCSV,
    MAX_PLAINTEXT,
    TLS13,
    AlertLevel,
    CipherSuite,
    CipherSuite12,
    ContentType,
    ExtensionType,
    Group,
    HandshakeType,
)
from relay.tls.errors import InternalError
from relay.tls.messages import handshake_message
from relay.tls.signing import server_key_exchange_content, tls12_server_random, verify
from relay.tls.wire import Reader, vec8

from ..rawclient import RawClient, key_share_data, versions_data
from ..rawclient12 import Raw12, alert

AD = AlertDescription
EXT = ExtensionType
ECDSA_AES128 = CipherSuite12.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256


@pytest.fixture
def leaf(pki):
    return pki.leaves["ecdsa-p256"]


@pytest.fixture
def new_client(leaf):
    def make(**overrides) -> Raw12:
        overrides.setdefault("tickets", TicketKeyring(os.urandom))
        return Raw12(ServerConfig([leaf.chain], **overrides), leaf.key)

    return make


@pytest.fixture
def client(new_client) -> Raw12:
    return new_client()


def expect_alert(client: Raw12, description: AlertDescription, action) -> TLSAlert:
    """`action()` must raise this alert, queue it as the last thing sent, and close the connection."""
    with pytest.raises(TLSAlert) as raised:
        action()
    error = raised.value
    assert not (isinstance(error, InternalError) and error.__cause__), f"engine bug: {error.__cause__!r}"
    assert error.description == description, f"raised {error}"
    assert client.alerts[-1] == (AlertLevel.FATAL, description)
    assert client.server.state is State.CLOSED
    return error


def connected(client: Raw12) -> Raw12:
    client.handshake()
    return client


# --- a whole handshake ---------------------------------------------------------------------------

@pytest.mark.parametrize("suite", list(CipherSuite12))
def test_every_suite_carries_data_both_ways(pki, suite):
    key_type = "rsa-2048" if "_RSA_" in suite.name else "ecdsa-p256"
    leaf = pki.leaves[key_type]
    client = Raw12(ServerConfig([leaf.chain]), leaf.key)
    events = client.handshake(client.hello(suites=(suite,)))
    [done] = [e for e in events if isinstance(e, HandshakeComplete)]
    assert (done.session.version, done.session.cipher_suite) == ("TLSv1.2", "TLS_" + suite.name)
    events = client.send_application_data(b"EHLO client.example\r\n")
    assert [e.data for e in events if isinstance(e, DataReceived)] == [bytearray(b"EHLO client.example\r\n")]
    client.server.send_data(b"250 ok\r\n")
    client._absorb(client.server.data_to_send())
    assert client.application_data == b"250 ok\r\n"


def test_server_key_exchange_is_signed_over_the_derived_server_random(client, leaf):
    """The signature covers client_random || server_random || params, server_random made from the nonce."""
    connected(client)
    [request] = client.requests
    server_random = client.server_hello.random
    assert server_random == tls12_server_random(request.nonce)
    assert server_random.endswith(DOWNGRADE_TLS12)
    ske = Reader(client.message(HandshakeType.SERVER_KEY_EXCHANGE), 4)
    params = ske.take(4 + 32)
    scheme, signature = ske.u16(), ske.vector(2)
    assert params == request.params and scheme == request.scheme
    content = server_key_exchange_content(client.hello_sent.random, server_random, params)
    assert content == request.content
    assert verify(leaf.chain.public_key, scheme, content, signature)


def test_every_tls12_session_has_the_downgrade_sentinel_resumed_too(client, new_client):
    first = connected(client)
    again = Raw12(first.server.config, first.key)
    again.resume_with(first.master)
    again.handshake(again.hello(ticket=first.ticket(), session_id=os.urandom(32)))
    assert again.resumed and not again.requests
    assert first.server_hello.random.endswith(DOWNGRADE_TLS12)
    assert again.server_hello.random.endswith(DOWNGRADE_TLS12)


def test_a_client_that_offers_tls13_gets_tls13(client):
    hello = client.hello()
    hello.set(EXT.SUPPORTED_VERSIONS, versions_data(TLS13, 0x0303))
    hello.cipher_suites.insert(0, CipherSuite.AES_128_GCM_SHA256)
    hello.set(EXT.KEY_SHARE, key_share_data())   # no share: a HelloRetryRequest, which only TLS 1.3 has
    client.send_hello(hello)
    assert client.server.version == TLS13
    assert client.server.state is State.WAIT_SECOND_HELLO


@pytest.mark.parametrize("group, key_type", [(Group.SECP256R1, "ecdsa-p256"), (Group.SECP384R1, "ecdsa-p384")])
def test_groups_other_than_x25519(pki, group, key_type):
    """(An ECDSA certificate's own curve must be offered too, RFC 8422 5.1: each group with its key.)"""
    leaf = pki.leaves[key_type]
    client = Raw12(ServerConfig([leaf.chain]), leaf.key)
    client.send_hello(client.hello(groups=(group,), suites=(ECDSA_AES128,)))
    ske = Reader(client.message(HandshakeType.SERVER_KEY_EXCHANGE), 4)
    assert ske.u8() == 3 and ske.u16() == group
    assert client.requests[0].params[1:3] == group.to_bytes(2, "big")


def test_without_supported_groups_p256_is_chosen(client):
    """RFC 8422 4: the extension absent, the server picks; P-256 is what such clients have."""
    client.send_hello(client.hello().remove(EXT.SUPPORTED_GROUPS))
    assert client.requests[0].params[1:3] == Group.SECP256R1.to_bytes(2, "big")


def test_rsa_key_signs_with_pkcs1_when_that_is_all_the_client_offers(pki):
    leaf = pki.leaves["rsa-2048"]
    client = Raw12(ServerConfig([leaf.chain]), leaf.key)
    client.handshake(client.hello(suites=(CipherSuite12.ECDHE_RSA_WITH_AES_128_GCM_SHA256,), schemes=(0x0401,)))
    assert client.server.session.signature_scheme == "rsa_pkcs1_sha256"


# --- extended master secret and tickets ----------------------------------------------------------

def test_extended_master_secret_is_used_when_offered(client):
    connected(client)
    assert EXT.EXTENDED_MASTER_SECRET in client.server_hello.extensions
    assert EXT.RENEGOTIATION_INFO in client.server_hello.extensions
    assert client.ticket() is not None and EXT.SESSION_TICKET in client.server_hello.extensions


def test_without_extended_master_secret_the_session_gets_no_ticket(client):
    client.handshake(client.hello(ems=False))
    assert EXT.EXTENDED_MASTER_SECRET not in client.server_hello.extensions
    assert EXT.SESSION_TICKET not in client.server_hello.extensions
    assert client.ticket() is None and client.message(HandshakeType.NEW_SESSION_TICKET) is None


def test_a_ticket_of_an_ems_session_offered_without_ems_is_handshake_failure(client):
    """RFC 7627 5.3: the server MUST abort the abbreviated handshake."""
    first = connected(client)
    again = Raw12(first.server.config, first.key)
    expect_alert(again, AD.handshake_failure,
                 lambda: again.send_hello(again.hello(ems=False, ticket=first.ticket(), session_id=os.urandom(32))))


@pytest.mark.parametrize("change", ["server_name", "suite", "tampered"])
def test_a_ticket_that_does_not_fit_gets_a_full_handshake(client, change):
    first = connected(client)
    again = Raw12(first.server.config, first.key)
    ticket = first.ticket()
    hello = again.hello(ticket=ticket, session_id=os.urandom(32))
    if change == "server_name":
        hello = again.hello(ticket=ticket, session_id=os.urandom(32), server_name="other.example.org")
    elif change == "suite":
        hello = again.hello(ticket=ticket, session_id=os.urandom(32),
                            suites=(CipherSuite12.ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,))
    else:
        hello = again.hello(ticket=ticket[:-1] + bytes([ticket[-1] ^ 1]), session_id=os.urandom(32))
    again.handshake(hello)
    assert not again.resumed and len(again.requests) == 1 and not again.server.session.resumed


def test_a_tls13_ticket_is_not_resumed_in_tls12(client, leaf):
    tls13 = RawClient(client.server.config, leaf.key)
    tls13.handshake()
    [ticket] = tls13.tickets
    again = Raw12(client.server.config, leaf.key)
    again.handshake(again.hello(ticket=ticket.identity, session_id=os.urandom(32)))
    assert not again.resumed and len(again.requests) == 1


# --- the ClientHello ----------------------------------------------------------------------------

def test_fallback_scsv_is_inappropriate_fallback(client):
    """RFC 7507: a client that fell back from a version we speak (TLS 1.3)."""
    hello = client.hello()
    hello.cipher_suites.append(FALLBACK_SCSV)
    expect_alert(client, AD.inappropriate_fallback, lambda: client.send_hello(hello))


def test_renegotiation_info_not_empty_is_handshake_failure(client):
    """RFC 5746 3.6: an initial handshake's renegotiated_connection must be empty."""
    hello = client.hello(secure_renegotiation=False).set(EXT.RENEGOTIATION_INFO, vec8(b"\x01" * 12))
    expect_alert(client, AD.handshake_failure, lambda: client.send_hello(hello))


def test_renegotiation_info_extension_alone_is_secure_renegotiation(client):
    client.handshake(client.hello(secure_renegotiation=False).set(EXT.RENEGOTIATION_INFO, vec8(b"")))
    assert client.server_hello.extensions[EXT.RENEGOTIATION_INFO] == b"\x00"


def test_no_renegotiation_signal_gets_no_renegotiation_info(client):
    client.handshake(client.hello(secure_renegotiation=False))
    assert EXT.RENEGOTIATION_INFO not in client.server_hello.extensions


def test_no_null_compression_is_illegal_parameter(client):
    hello = client.hello()
    hello.compression_methods = b"\x01"
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(hello))


def test_point_formats_without_uncompressed_is_illegal_parameter(client):
    hello = client.hello().set(EXT.EC_POINT_FORMATS, vec8(b"\x01\x02"))
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(hello))


@pytest.mark.parametrize("suites", [
    pytest.param((0x009C,), id="rsa-key-transport-aes128-gcm"),
    pytest.param((0x002F, 0x0035), id="rsa-key-transport-cbc"),
    pytest.param((0xC013, 0xC009), id="ecdhe-cbc"),
    pytest.param((0x009E,), id="dhe-rsa"),
    pytest.param((CipherSuite12.ECDHE_RSA_WITH_AES_128_GCM_SHA256,), id="rsa-suite-for-an-ecdsa-key"),
])
def test_no_served_suite_is_handshake_failure(client, suites):
    expect_alert(client, AD.handshake_failure, lambda: client.send_hello(client.hello(suites=suites)))


def test_no_signature_algorithms_is_handshake_failure(client):
    """Absent, TLS 1.2 means SHA-1, which is not served."""
    expect_alert(client, AD.handshake_failure,
                 lambda: client.send_hello(client.hello().remove(EXT.SIGNATURE_ALGORITHMS)))


def test_no_common_group_is_handshake_failure(client):
    expect_alert(client, AD.handshake_failure, lambda: client.send_hello(client.hello(groups=(0x0019, 0x0100))))


def test_hybrid_group_alone_is_handshake_failure(client):
    """X25519MLKEM768 is TLS 1.3's only."""
    expect_alert(client, AD.handshake_failure,
                 lambda: client.send_hello(client.hello(groups=(Group.X25519MLKEM768,))))


@pytest.mark.parametrize("data", [b"\x00", b"\x00\x00"], ids=["one-byte", "two-zero-bytes"])
def test_extended_master_secret_with_data_is_decode_error(client, data):
    hello = client.hello().set(EXT.EXTENDED_MASTER_SECRET, data)
    expect_alert(client, AD.decode_error, lambda: client.send_hello(hello))


# --- the client's flight ------------------------------------------------------------------------

@pytest.mark.parametrize("point", [
    pytest.param(bytes(32), id="x25519-zero"),
    pytest.param((1).to_bytes(32, "little"), id="x25519-order-1"),
    pytest.param(bytes(31), id="x25519-short"),
    pytest.param(bytes(33), id="x25519-long"),
])
def test_bad_client_point_is_illegal_parameter(client, point):
    client.send_hello()
    expect_alert(client, AD.illegal_parameter,
                 lambda: client.send_client_key_exchange(client.client_key_exchange(point)))


def test_bad_p256_point_is_illegal_parameter(client):
    client.send_hello(client.hello(groups=(Group.SECP256R1,)))
    off_curve = b"\x04" + (1).to_bytes(32, "big") + (1).to_bytes(32, "big")
    expect_alert(client, AD.illegal_parameter,
                 lambda: client.send_client_key_exchange(client.client_key_exchange(off_curve)))


def test_client_key_exchange_with_trailing_bytes_is_decode_error(client):
    client.send_hello()
    good = client.client_key_exchange()
    bad = handshake_message(HandshakeType.CLIENT_KEY_EXCHANGE, good[4:] + b"\x00")
    expect_alert(client, AD.decode_error, lambda: client.send_client_key_exchange(bad))


def test_client_key_exchange_split_over_records_works(client):
    client.send_hello()
    message = client.client_key_exchange()
    client.transcript.append(message)
    client.send_record(ContentType.HANDSHAKE, message[:3])
    client.send_record(ContentType.HANDSHAKE, message[3:])
    client._make_keys(message)
    client.send_change_cipher_spec()
    client.send_finished()
    assert client.server.handshake_complete


def test_change_cipher_spec_before_client_key_exchange_is_unexpected_message(client):
    client.send_hello()
    expect_alert(client, AD.unexpected_message, lambda: client.send_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01"))


def test_finished_before_change_cipher_spec_is_unexpected_message(client):
    client.send_hello()
    client.send_client_key_exchange()
    expect_alert(client, AD.unexpected_message, lambda: client.send_handshake(client.finished()))


@pytest.mark.parametrize("payload", [b"\x02", b"\x01\x01", b""])
def test_malformed_change_cipher_spec_is_decode_error(client, payload):
    client.send_hello()
    client.send_client_key_exchange()
    expect_alert(client, AD.decode_error, lambda: client.send_record(ContentType.CHANGE_CIPHER_SPEC, payload))


def test_change_cipher_spec_inside_a_fragmented_handshake_message_is_unexpected_message(client):
    client.send_hello()
    message = client.client_key_exchange()
    client.send_record(ContentType.HANDSHAKE, message[:10])
    expect_alert(client, AD.unexpected_message, lambda: client.send_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01"))


def test_second_change_cipher_spec_is_refused(client):
    client.send_hello()
    client.send_client_key_exchange()
    client.send_change_cipher_spec()
    with pytest.raises(TLSAlert):
        client.send_change_cipher_spec()
    assert client.server.state is State.CLOSED


@pytest.mark.parametrize("length", [0, 11, 13, 32])
def test_finished_of_the_wrong_length_is_decode_error(client, length):
    client.send_hello()
    client.send_client_key_exchange()
    client.send_change_cipher_spec()
    bad = handshake_message(HandshakeType.FINISHED, bytes(length))
    expect_alert(client, AD.decode_error, lambda: client.send_finished(bad))


def test_wrong_finished_is_decrypt_error(client):
    client.send_hello()
    client.send_client_key_exchange()
    client.send_change_cipher_spec()
    expect_alert(client, AD.decrypt_error, lambda: client.send_finished(client.finished(b"server finished")))


def test_application_data_before_finished_is_unexpected_message(client):
    client.send_hello()
    client.send_client_key_exchange()
    client.send_change_cipher_spec()
    expect_alert(client, AD.unexpected_message, lambda: client.send_application_data(b"MAIL FROM:<a@b>\r\n"))


def test_plaintext_application_data_in_the_handshake_is_unexpected_message(client):
    client.send_hello()
    expect_alert(client, AD.unexpected_message, lambda: client.send_record(ContentType.APPLICATION_DATA, b"x"))


def test_tampered_record_is_bad_record_mac(client):
    connected(client)
    sealed = bytearray(client.write.seal(ContentType.APPLICATION_DATA, b"hello"))
    sealed[-1] ^= 1
    expect_alert(client, AD.bad_record_mac, lambda: client.send(bytes(sealed)))


def test_oversized_plaintext_is_record_overflow(client):
    connected(client)
    expect_alert(client, AD.record_overflow, lambda: client.send_application_data(bytes(MAX_PLAINTEXT + 1)))


def test_signature_that_does_not_verify_is_internal_error(client):
    client.auto_sign = False
    client.send_hello()
    expect_alert(client, AD.internal_error, lambda: client.provide(bytes(72)))


# --- after the handshake ------------------------------------------------------------------------

def test_renegotiation_is_refused_with_a_warning_and_the_connection_goes_on(client):
    connected(client)
    client.send_handshake(client.hello().encode())
    assert client.alerts[-1] == (AlertLevel.WARNING, AD.no_renegotiation)
    events = client.send_application_data(b"still here")
    assert [e.data for e in events if isinstance(e, DataReceived)] == [bytearray(b"still here")]


def test_renegotiation_asked_again_and_again_ends_the_connection(client):
    connected(client)
    for _ in range(4):
        client.send_handshake(client.hello().encode())
    expect_alert(client, AD.unexpected_message, lambda: client.send_handshake(client.hello().encode()))


def test_warning_alerts_are_ignored_a_few_times_then_the_connection_ends(client):
    connected(client)
    for _ in range(4):
        assert client.send_record(ContentType.ALERT, alert(AlertLevel.WARNING, AD.user_canceled)) == []
    expect_alert(client, AD.unexpected_message,
                 lambda: client.send_record(ContentType.ALERT, alert(AlertLevel.WARNING, AD.user_canceled)))


def test_fatal_alert_from_the_client_closes(client):
    connected(client)
    with pytest.raises(PeerAlert):
        client.send_record(ContentType.ALERT, alert(AlertLevel.FATAL, AD.handshake_failure))
    assert client.server.state is State.CLOSED


@pytest.mark.parametrize("payload", [b"\x01", b"\x01\x00\x00"], ids=["short", "long"])
def test_malformed_alert_is_decode_error(client, payload):
    connected(client)
    expect_alert(client, AD.decode_error, lambda: client.send_record(ContentType.ALERT, payload))


def test_close_notify_then_close(client):
    connected(client)
    events = client.send_record(ContentType.ALERT, alert(AlertLevel.WARNING, AD.close_notify))
    assert any(isinstance(e, CloseNotifyReceived) for e in events)
    client.server.close()
    client._absorb(client.server.data_to_send())
    assert client.alerts[-1] == (AlertLevel.WARNING, AD.close_notify)


def test_no_key_update_in_tls12(client):
    connected(client)
    with pytest.raises(ConnectionClosed):
        client.server.update_keys()


def test_large_data_is_cut_into_records(client):
    connected(client)
    client.server.send_data(os.urandom(3 * MAX_PLAINTEXT + 5))
    client._absorb(client.server.data_to_send())
    assert len(client.application_data) == 3 * MAX_PLAINTEXT + 5


def test_long_signature_algorithms_with_unknown_values_are_accepted(client):
    """Unknown schemes are ignored, whatever the list's length."""
    client.handshake(client.hello(schemes=(*range(0x1000, 0x1000 + 5000), 0x0403)))
    assert client.server.session.signature_scheme == "ecdsa_secp256r1_sha256"


def test_a_client_hello_over_several_records_works(client):
    hello = client.hello(schemes=(*range(0x1000, 0x1000 + 9000), 0x0403))
    raw = hello.encode()
    client.hello_sent = hello
    client.transcript.append(raw)
    for start in range(0, len(raw), MAX_PLAINTEXT):
        client.send_record(ContentType.HANDSHAKE, raw[start:start + MAX_PLAINTEXT])
    client.send_client_key_exchange()
    client.send_change_cipher_spec()
    client.send_finished()
    assert client.server.handshake_complete


def test_an_ecdsa_certificate_needs_its_curve_in_supported_groups(pki):
    """RFC 8422 5.1: only x25519 offered, the P-256 chain is not for this client; an RSA chain is."""
    ecdsa, rsa = pki.leaves["ecdsa-p256"], pki.leaves["rsa-2048"]
    suites = (ECDSA_AES128, CipherSuite12.ECDHE_RSA_WITH_AES_128_GCM_SHA256)
    alone = Raw12(ServerConfig([ecdsa.chain]), ecdsa.key)
    expect_alert(alone, AD.handshake_failure,
                 lambda: alone.send_hello(alone.hello(suites=suites, groups=(Group.X25519,))))
    both = Raw12(ServerConfig([ecdsa.chain, rsa.chain]), rsa.key)
    both.handshake(both.hello(suites=suites, groups=(Group.X25519,)))
    assert both.server.session.cipher_suite == "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
