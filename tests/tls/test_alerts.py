"""Every way a client can break the rules, and the one alert each must get (RFC 9846 = TLS 1.3).

Each test sends the bad input with `RawClient` and checks three things: the
exception's alert, the alert record the server really queued (decrypted when
the server was already encrypting), and that the connection is closed and
stays silent. Section numbers in the docstrings are RFC 9846's.
"""

import dataclasses
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

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
    MAX_CIPHERTEXT,
    MAX_INNER_PLAINTEXT,
    MAX_PLAINTEXT,
    AlertLevel,
    CipherSuite,
    ContentType,
    ExtensionType,
    Group,
    HandshakeType,
    KeyUpdateRequest,
)
from relay.tls.errors import InternalError
from relay.tls.messages import handshake_message
from relay.tls.signing import sign
from relay.tls.wire import u8, u16

from ..rawclient import (
    Hello,
    RawClient,
    cookie_data,
    groups_data,
    key_share_data,
    pre_shared_key_data,
    record,
    record_size_limit_data,
    sslv2_client_hello,
    versions_data,
)

AD = AlertDescription
EXT = ExtensionType
FATAL = AlertLevel.FATAL


@pytest.fixture
def leaf(pki):
    return pki.leaves["ecdsa-p256"]


@pytest.fixture
def new_client(leaf):
    """new_client(**ServerConfig overrides) -> a RawClient with its own fresh server."""

    def make(**overrides) -> RawClient:
        return RawClient(ServerConfig([leaf.chain], **overrides), leaf.key)

    return make


@pytest.fixture
def client(new_client) -> RawClient:
    return new_client()


def expect_alert(client: RawClient, description: AlertDescription, action) -> TLSAlert:
    """`action()` must end the connection with exactly this fatal alert, raised and on the wire."""
    with pytest.raises(TLSAlert) as raised:
        action()
    error = raised.value
    assert not (isinstance(error, InternalError) and error.__cause__), f"engine bug: {error.__cause__!r}"
    assert error.description == description, f"raised {error}"
    sent = client.records[-1]
    assert sent.content_type == ContentType.ALERT, f"last record is not a readable alert: {sent}"
    assert sent.content == bytes((FATAL, description))
    assert client.alerts == [bytes((FATAL, description))]
    # Once the server has sent its ServerHello, everything it sends is encrypted.
    assert sent.protected == (client.read is not None)
    assert_closed(client)
    return error


def assert_closed(client: RawClient) -> None:
    assert client.server.state is State.CLOSED
    assert client.send(record(ContentType.HANDSHAKE, handshake_message(HandshakeType.CLIENT_HELLO, b""))) == []
    assert client.last_output == b""


def reframed(message: bytes, body: bytes) -> bytes:
    """`message`'s handshake header around a new body."""
    return handshake_message(message[0], body)


# --- versions (4.2.2, 4.3.1, E) ---------------------------------------------------

def tls10_hello(client: RawClient) -> Hello:
    return Hello(random=os.urandom(32), legacy_version=0x0301, cipher_suites=[0x002F, 0x0035], extensions=None)


TLS12_HELLOS = [
    pytest.param(lambda c: c.hello().remove(EXT.SUPPORTED_VERSIONS), id="tls12-no-supported_versions"),
    pytest.param(lambda c: c.hello().set(EXT.SUPPORTED_VERSIONS, versions_data(0x0303, 0x0302)), id="tls12-in-list"),
]


@pytest.mark.parametrize("make_hello", TLS12_HELLOS)
def test_tls12_hello_gets_protocol_version_with_tls12_off(new_client, make_hello):
    """4.3.1 and E.2: supported_versions absent or without 0x0304, and TLS 1.2 not served."""
    client = new_client(tls12=False)
    expect_alert(client, AD.protocol_version, lambda: client.send_hello(make_hello(client)))


@pytest.mark.parametrize("make_hello", TLS12_HELLOS)
def test_tls12_hello_with_only_tls13_suites_gets_handshake_failure(client, make_hello):
    """A client whose best is TLS 1.2 is answered in TLS 1.2: with no TLS 1.2 suite offered, nothing fits."""
    expect_alert(client, AD.handshake_failure, lambda: client.send_hello(make_hello(client)))


@pytest.mark.parametrize("versions", [(0x0302, 0x0301), (0x7F1C,), (0x0A0A, 0x0302)],
                         ids=["tls11-tls10", "unknown", "grease-tls11"])
def test_hello_without_tls12_or_tls13_in_supported_versions_gets_protocol_version(client, versions):
    hello = client.hello().set(EXT.SUPPORTED_VERSIONS, versions_data(*versions))
    expect_alert(client, AD.protocol_version, lambda: client.send_hello(hello))


def test_tls10_hello_gets_protocol_version(client):
    """E.2: nothing older than TLS 1.2 is served."""
    expect_alert(client, AD.protocol_version, lambda: client.send_hello(tls10_hello(client)))


@pytest.mark.parametrize("legacy_version", [0x0300, 0x0301, 0x0302, 0x0304, 0x7F1C])
def test_legacy_version_not_tls12_gets_protocol_version(client, legacy_version):
    """4.2.2: a legacy_version other than 0x0303 is protocol_version, even with supported_versions."""
    hello = client.hello()
    hello.legacy_version = legacy_version
    expect_alert(client, AD.protocol_version, lambda: client.send_hello(hello))


def test_sslv2_format_hello_gets_protocol_version(client):
    """E.5: TLS 1.3 is never negotiated from an SSL 2.0 CLIENT-HELLO."""
    expect_alert(client, AD.protocol_version, lambda: client.send(sslv2_client_hello()))


# --- ClientHello structure (4.2.2, 4.3, 6) --------------------------------------

def test_extensions_in_any_order_are_accepted(client):
    """4.3: only pre_shared_key has a place (last); the rest may come in any order."""
    hello = client.hello().move(EXT.SUPPORTED_VERSIONS, 0)
    hello.extensions.reverse()
    assert any(isinstance(e, HandshakeComplete) for e in client.handshake(hello))



@pytest.mark.parametrize("ext_type, data", [
    (EXT.SUPPORTED_GROUPS, groups_data(Group.X25519)),
    (EXT.SUPPORTED_VERSIONS, versions_data(0x0304)),
    (0x7A7A, b"unknown"),  # duplicates are refused even for extensions we ignore
])
def test_duplicate_extension_gets_illegal_parameter(client, ext_type, data):
    """4.3: no more than one extension of a type in a block."""
    hello = client.hello().add(ext_type, data).add(ext_type, data)
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(hello))


def test_pre_shared_key_not_last_gets_illegal_parameter(client):
    """4.3.11: pre_shared_key must be the last extension."""
    hello = client.hello().add(EXT.PRE_SHARED_KEY, pre_shared_key_data([(b"t" * 40, 0)], [bytes(32)]))
    hello.add(EXT.PADDING, bytes(8))
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(hello))


def _truncated(at):
    def edit(raw):
        return reframed(raw, raw[4:4 + at])
    return edit


def _patch(offset, value):
    def edit(raw):
        return raw[:offset] + value + raw[offset + len(value):]
    return edit


# Offsets in a hello with an empty session id and one cipher suite: header,
# version, random, session id, suites, compression, then the extensions block.
SESSION_ID_AT = 4 + 2 + 32
SUITES_AT = SESSION_ID_AT + 1
EXTENSIONS_AT = SUITES_AT + 4 + 2


@pytest.mark.parametrize("edit", [
    pytest.param(_truncated(0), id="empty-body"),
    pytest.param(_truncated(1), id="cut-in-version"),
    pytest.param(_truncated(20), id="cut-in-random"),
    pytest.param(_truncated(34), id="cut-before-session-id"),
    pytest.param(_truncated(36), id="cut-in-cipher-suites-length"),
    pytest.param(_truncated(38), id="cut-in-cipher-suites"),
    pytest.param(_truncated(39), id="cut-before-compression"),
    pytest.param(_truncated(40), id="cut-in-compression"),
    pytest.param(_truncated(42), id="cut-in-extensions-length"),
    pytest.param(_truncated(60), id="cut-in-extensions"),
    pytest.param(lambda raw: reframed(raw, raw[4:-1]), id="cut-last-byte"),
    pytest.param(_patch(SESSION_ID_AT, b"\x21"), id="session-id-33-bytes"),
    pytest.param(_patch(SUITES_AT, b"\x00\x03"), id="cipher-suites-odd-length"),
    pytest.param(_patch(SUITES_AT, b"\xff\xff"), id="cipher-suites-past-end"),
    pytest.param(_patch(EXTENSIONS_AT, b"\xff\xff"), id="extensions-past-end"),
    pytest.param(_patch(EXTENSIONS_AT + 2 + 2, b"\xff\xff"), id="extension-past-end"),
])
def test_garbled_hello_gets_decode_error(client, edit):
    """4.2.2 and 6: a ClientHello that does not parse is decode_error."""
    raw = edit(client.encode_hello(client.hello(server_name=None)))
    expect_alert(client, AD.decode_error, lambda: client.send_record(ContentType.HANDSHAKE, raw))


def test_hello_with_empty_cipher_suites_or_compression_gets_decode_error(new_client):
    """4.2.2: cipher_suites<2..2^16-2>, legacy_compression_methods<1..2^8-1>."""
    for field_name, value in (("cipher_suites", []), ("compression_methods", b"")):
        client = new_client()
        hello = client.hello()
        setattr(hello, field_name, value)
        expect_alert(client, AD.decode_error, lambda c=client, h=hello: c.send_hello(h))


@pytest.mark.parametrize("make_hello", [
    pytest.param(lambda c: dataclasses.replace(c.hello(), trailing=b"\x00"), id="after-extensions"),
    pytest.param(lambda c: c.hello().set(EXT.SUPPORTED_VERSIONS, versions_data(0x0304) + b"\x00"),
                 id="in-supported_versions"),
    pytest.param(lambda c: c.hello().set(EXT.SUPPORTED_GROUPS, groups_data(Group.X25519) + b"\x00"),
                 id="in-supported_groups"),
    pytest.param(lambda c: c.hello().set(EXT.RECORD_SIZE_LIMIT, u16(1024) + b"\x00"), id="in-record_size_limit"),
    pytest.param(lambda c: c.hello().set(
        EXT.KEY_SHARE, key_share_data((Group.X25519, c.key_share(Group.X25519))) + b"\x00"), id="in-key_share"),
])
def test_trailing_bytes_in_hello_get_decode_error(client, make_hello):
    """4.2.2 and 4.3: no data may follow a structure, in the hello or in an extension."""
    expect_alert(client, AD.decode_error, lambda: client.send_hello(make_hello(client)))


@pytest.mark.parametrize("compression", [b"\x01", b"\x00\x01", b"\x01\x00", b"\x40"])
def test_compression_other_than_null_gets_illegal_parameter(client, compression):
    """4.2.2: legacy_compression_methods must be exactly one zero byte."""
    hello = client.hello()
    hello.compression_methods = compression
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(hello))


@pytest.mark.parametrize("limit", [0, 1, 63])
def test_record_size_limit_below_64_gets_illegal_parameter(client, limit):
    """RFC 8449 4: a record_size_limit below 64 is illegal_parameter."""
    hello = client.hello().set(EXT.RECORD_SIZE_LIMIT, record_size_limit_data(limit))
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(hello))


# --- negotiation (4.2.1, 9.2) ----------------------------------------------------

def test_no_common_cipher_suite_gets_handshake_failure(client):
    """4.2.1: no overlap in parameters."""
    hello = client.hello(suites=(0x1304, 0x1305, 0xC02F))
    expect_alert(client, AD.handshake_failure, lambda: client.send_hello(hello))


@pytest.mark.parametrize("groups, shares", [
    pytest.param((0x0019,), (), id="p521-no-share"),
    pytest.param((0x0100, 0x001E), ((0x0100, bytes(256)),), id="ffdhe-and-x448"),
])
def test_no_common_group_gets_handshake_failure(client, groups, shares):
    """4.2.1: no overlap between supported_groups and the server's groups."""
    hello = client.hello(groups=groups, shares=())
    hello.set(EXT.KEY_SHARE, key_share_data(*shares))
    expect_alert(client, AD.handshake_failure, lambda: client.send_hello(hello))


@pytest.mark.parametrize("missing", [
    pytest.param((EXT.SUPPORTED_GROUPS,), id="key_share-without-supported_groups"),
    pytest.param((EXT.KEY_SHARE,), id="supported_groups-without-key_share"),
    pytest.param((EXT.SUPPORTED_GROUPS, EXT.KEY_SHARE), id="neither-and-no-psk"),
    pytest.param((EXT.SIGNATURE_ALGORITHMS,), id="no-signature_algorithms"),
])
def test_missing_mandatory_extension_gets_missing_extension(client, missing):
    """9.2 and 4.3.3: the extensions a certificate-authenticated (EC)DHE hello must carry."""
    hello = client.hello()
    for ext_type in missing:
        hello.remove(ext_type)
    expect_alert(client, AD.missing_extension, lambda: client.send_hello(hello))


def test_pre_shared_key_without_psk_modes_gets_missing_extension(client):
    """4.3.9: a client offering pre_shared_key must send psk_key_exchange_modes."""
    hello = client.hello().remove(EXT.PSK_KEY_EXCHANGE_MODES)
    hello.add(EXT.PRE_SHARED_KEY, pre_shared_key_data([(b"t" * 40, 0)], [bytes(32)]))
    expect_alert(client, AD.missing_extension, lambda: client.send_hello(hello))


def _off_curve_point(curve, size) -> bytes:
    point = ec.generate_private_key(curve).public_key().public_numbers()
    return b"\x04" + point.x.to_bytes(size, "big") + (point.y ^ 1).to_bytes(size, "big")


@pytest.mark.parametrize("group, share", [
    pytest.param(Group.X25519, bytes(31), id="x25519-31-bytes"),
    pytest.param(Group.X25519, bytes(33), id="x25519-33-bytes"),
    pytest.param(Group.X25519, b"\x09", id="x25519-1-byte"),
    pytest.param(Group.X25519, bytes(32), id="x25519-zero-point"),
    pytest.param(Group.X25519, b"\x01" + bytes(31), id="x25519-order-1-point"),
    pytest.param(Group.SECP256R1, _off_curve_point(ec.SECP256R1(), 32), id="p256-off-curve"),
    pytest.param(Group.SECP256R1, b"\x02" + bytes(31) + b"\x01", id="p256-compressed"),
    pytest.param(Group.SECP256R1, b"\x04" + bytes(64), id="p256-zero-coordinates"),
    pytest.param(Group.SECP256R1, b"\x00", id="p256-infinity"),
    pytest.param(Group.SECP384R1, _off_curve_point(ec.SECP384R1(), 48), id="p384-off-curve"),
    pytest.param(Group.X25519MLKEM768, bytes(1215), id="mlkem-short"),
    pytest.param(Group.X25519MLKEM768, b"\xff" * 1184 + b"\x09" + bytes(31), id="mlkem-key-check"),
])
def test_invalid_key_share_gets_illegal_parameter(client, group, share):
    """4.3.8.2, 7.4.2 and draft-ietf-tls-ecdhe-mlkem: a share that is no valid public value."""
    hello = client.hello(groups=(group,), shares=())
    hello.set(EXT.KEY_SHARE, key_share_data((group, share)))
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(hello))


def test_two_shares_for_one_group_get_illegal_parameter(client):
    """4.3.8: clients must not offer two KeyShareEntry values for one group."""
    share = client.key_share(Group.X25519)
    hello = client.hello().set(EXT.KEY_SHARE, key_share_data((Group.X25519, share), (Group.X25519, share)))
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(hello))


def test_share_for_group_not_offered_gets_illegal_parameter(client):
    """4.3.8: a key share for a group missing from supported_groups."""
    hello = client.hello(groups=(Group.SECP256R1,), shares=())
    hello.set(EXT.KEY_SHARE, key_share_data((Group.X25519, client.key_share(Group.X25519))))
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(hello))


# --- HelloRetryRequest (4.2.4, 4.2.2) ----------------------------------------------

@pytest.fixture
def retried(client):
    """A client that got a HelloRetryRequest for x25519, and its first hello."""
    first = client.hello(suites=(CipherSuite.AES_128_GCM_SHA256, CipherSuite.AES_256_GCM_SHA384),
                         groups=(Group.X25519, Group.SECP256R1), shares=(), session_id=os.urandom(32))
    client.send_hello(first)
    assert client.hello_retry_group == Group.X25519
    return client, first


@pytest.mark.parametrize("shares", [
    pytest.param((), id="no-share"),
    pytest.param((Group.SECP256R1,), id="other-group"),
    pytest.param((Group.X25519, Group.SECP256R1), id="extra-share"),
])
def test_second_hello_without_requested_share_gets_illegal_parameter(retried, shares):
    client, first = retried
    second = client.retry_hello(first)
    second.set(EXT.KEY_SHARE, key_share_data(*((g, client.key_share(g)) for g in shares)))
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(second))


def test_second_hello_changing_cipher_suite_gets_illegal_parameter(retried):
    """4.2.4: the server must negotiate the same suite; a hello that changes it is refused."""
    client, first = retried
    second = client.retry_hello(first)
    second.cipher_suites = [CipherSuite.AES_256_GCM_SHA384]
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(second))


def test_early_data_in_second_hello_gets_illegal_parameter(retried):
    """4.3.10: a client must not include early_data in its followup ClientHello."""
    client, first = retried
    second = client.retry_hello(first).add(EXT.EARLY_DATA, b"")
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(second))


def test_second_hello_changing_session_id_gets_illegal_parameter(retried):
    """4.2.2: the second ClientHello is the first one except for the listed changes."""
    client, first = retried
    second = client.retry_hello(first)
    second.session_id = os.urandom(32)
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(second))


def test_second_hello_without_cookie_gets_illegal_parameter(new_client):
    """4.2.2: the second ClientHello must carry the HelloRetryRequest's cookie."""
    client = new_client(hello_retry_cookie=lambda transcript_hash: b"cookie:" + transcript_hash)
    first = client.hello(shares=())
    client.send_hello(first)
    assert client.hello_retry_cookie
    second = client.retry_hello(first).set(EXT.COOKIE, cookie_data(b"forged"))
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(second))


def test_hello_retry_then_second_hello_completes(new_client):
    """The positive case the tests above break: with the cookie and the asked-for share it works."""
    client = new_client(hello_retry_cookie=lambda transcript_hash: b"cookie:" + transcript_hash)
    first = client.hello(shares=())
    events = client.handshake(first)
    assert client.hello_retry_cookie
    assert any(isinstance(e, HandshakeComplete) for e in events)


# --- record layer (5) ----------------------------------------------------------------

@pytest.mark.parametrize("state", [State.START, State.WAIT_FINISHED, State.CONNECTED])
@pytest.mark.parametrize("content_type", [0, 19, 24, 99, 255])
def test_unknown_record_type_gets_unexpected_message(client, state, content_type):
    """5: an unexpected record type is unexpected_message."""
    client.drive_to(state)
    expect_alert(client, AD.unexpected_message, lambda: client.send_record(content_type, b"\x01\x02"))


@pytest.mark.parametrize("state", [State.WAIT_FINISHED, State.CONNECTED])
@pytest.mark.parametrize("content_type", [19, 24, 99, 255])
def test_unknown_protected_inner_type_gets_unexpected_message(client, state, content_type):
    client.drive_to(state)
    expect_alert(client, AD.unexpected_message, lambda: client.send_protected(content_type, b"\x01\x02"))


@pytest.mark.parametrize("state, content_type", [
    (State.START, ContentType.HANDSHAKE),
    (State.START, ContentType.ALERT),
    (State.START, ContentType.APPLICATION_DATA),
    (State.WAIT_FINISHED, ContentType.CHANGE_CIPHER_SPEC),
    (State.CONNECTED, ContentType.HANDSHAKE),
])
def test_plaintext_record_over_2_14_gets_record_overflow(client, state, content_type):
    """5.1: a TLSPlaintext longer than 2^14 is record_overflow."""
    client.drive_to(state)
    oversized = record(content_type, bytes(MAX_PLAINTEXT + 1))
    expect_alert(client, AD.record_overflow, lambda: client.send(oversized))


@pytest.mark.parametrize("state", [State.WAIT_FINISHED, State.CONNECTED])
def test_protected_record_over_2_14_plus_256_gets_record_overflow(client, state):
    """5.2: a TLSCiphertext longer than 2^14 + 256 is record_overflow."""
    client.drive_to(state)
    oversized = record(ContentType.APPLICATION_DATA, os.urandom(MAX_CIPHERTEXT + 1))
    expect_alert(client, AD.record_overflow, lambda: client.send(oversized))


@pytest.mark.parametrize("content, padding", [
    pytest.param(bytes(MAX_PLAINTEXT + 1), 0, id="content"),
    pytest.param(bytes(MAX_PLAINTEXT), 1, id="padding"),
])
def test_inner_plaintext_over_2_14_plus_1_gets_record_overflow(client, content, padding):
    """5.4: the whole TLSInnerPlaintext, padding included, is at most 2^14 + 1 bytes."""
    client.drive_to(State.CONNECTED)
    expect_alert(client, AD.record_overflow,
                 lambda: client.send_protected(ContentType.APPLICATION_DATA, content, padding))


def test_record_size_limit_enforced_when_negotiated(new_client):
    """RFC 8449 4: a record over the limit the server advertised is record_overflow."""
    client = new_client(record_size_limit=1024)
    client.handshake(client.hello().set(EXT.RECORD_SIZE_LIMIT, record_size_limit_data(2**14 + 1)))
    assert client.send_application_data(bytes(1023)) == [DataReceived(bytes(1023))]
    expect_alert(client, AD.record_overflow, lambda: client.send_application_data(bytes(1024)))


def test_record_size_limit_not_enforced_on_a_client_that_never_saw_it(new_client):
    """RFC 8449 4: the limit applies to records sent toward the endpoint that advertised it.

    The server tells its limit only in EncryptedExtensions and only to a
    client that sent record_size_limit; a client that did not knows no limit
    but 2^14 and may send full records.
    """
    client = new_client(record_size_limit=1024)
    client.handshake()
    assert client.send_application_data(bytes(4096)) == [DataReceived(bytes(4096))]


# change_cipher_spec (5)

@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x02", b"\x01\x01"])
def test_change_cipher_spec_not_0x01_gets_unexpected_message(client, payload):
    client.drive_to(State.WAIT_FINISHED)
    expect_alert(client, AD.unexpected_message, lambda: client.send_record(ContentType.CHANGE_CIPHER_SPEC, payload))


@pytest.mark.parametrize("state", [State.START, State.CONNECTED])
def test_change_cipher_spec_outside_handshake_gets_unexpected_message(client, state):
    """5: before the first ClientHello or after the peer's Finished it is an unexpected record."""
    client.drive_to(state)
    expect_alert(client, AD.unexpected_message, lambda: client.send_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01"))


def test_second_change_cipher_spec_gets_unexpected_message(client):
    client.drive_to(State.WAIT_FINISHED)
    assert client.send_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01") == []
    expect_alert(client, AD.unexpected_message, lambda: client.send_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01"))


def test_protected_change_cipher_spec_gets_unexpected_message(client):
    """5: a protected change_cipher_spec record is unexpected_message."""
    client.drive_to(State.WAIT_FINISHED)
    expect_alert(client, AD.unexpected_message,
                 lambda: client.send_protected(ContentType.CHANGE_CIPHER_SPEC, b"\x01"))


@pytest.mark.parametrize("state", [State.WAIT_SECOND_HELLO, State.WAIT_SIGNATURE, State.WAIT_FINISHED])
def test_one_change_cipher_spec_is_dropped(client, state):
    """5: one unprotected 0x01 between the first ClientHello and the client's Finished is dropped."""
    first = client.hello(shares=()) if state is State.WAIT_SECOND_HELLO else client.hello()
    client.auto_sign = state is not State.WAIT_SIGNATURE
    client.send_hello(first)
    assert client.send_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01") == []
    assert client.last_output == b""
    if state is State.WAIT_SECOND_HELLO:
        client.send_hello(client.retry_hello(first))
    if state is State.WAIT_SIGNATURE:
        request = client.signature_requests[0]
        client.call(client.server.provide_signature, sign(client.key, request.scheme, request.content))
    events = client.send_finished()
    assert any(isinstance(e, HandshakeComplete) for e in events)


# handshake records (5.1)

@pytest.mark.parametrize("state, padding", [
    (State.START, None),
    (State.WAIT_FINISHED, 0), (State.WAIT_FINISHED, 20),
    (State.CONNECTED, 0), (State.CONNECTED, 20),
])
def test_zero_length_handshake_record_gets_unexpected_message(client, state, padding):
    """5.1 and 5.4: no zero-length handshake fragments, even padded."""
    client.drive_to(state)
    if padding is None:
        send = lambda: client.send_record(ContentType.HANDSHAKE, b"")
    else:
        send = lambda: client.send_protected(ContentType.HANDSHAKE, b"", padding)
    expect_alert(client, AD.unexpected_message, send)


@pytest.mark.parametrize("extra", [
    pytest.param(b"\x14", id="one-byte"),
    pytest.param(handshake_message(HandshakeType.FINISHED, bytes(32)), id="whole-message"),
])
def test_client_hello_sharing_its_record_gets_unexpected_message(client, extra):
    """5.1: ClientHello precedes a key change, so it must end its record."""
    expect_alert(client, AD.unexpected_message, lambda: client.send_hello(extra=extra))


def test_first_client_hello_sharing_its_record_before_retry_gets_unexpected_message(client):
    expect_alert(client, AD.unexpected_message, lambda: client.send_hello(client.hello(shares=()), extra=b"\x01"))


def test_client_finished_sharing_its_record_gets_unexpected_message(client):
    client.drive_to(State.WAIT_FINISHED)
    tail = handshake_message(HandshakeType.KEY_UPDATE, u8(0))
    expect_alert(client, AD.unexpected_message,
                 lambda: client.send_protected(ContentType.HANDSHAKE, client.finished() + tail))


def test_key_update_sharing_its_record_gets_unexpected_message(client):
    client.drive_to(State.CONNECTED)
    key_update = handshake_message(HandshakeType.KEY_UPDATE, u8(0))
    expect_alert(client, AD.unexpected_message,
                 lambda: client.send_protected(ContentType.HANDSHAKE, key_update + key_update[:2]))


def test_plaintext_handshake_record_after_server_hello_gets_unexpected_message(client):
    """5.1: the client's second flight is protected; a plaintext handshake record is out of place."""
    client.drive_to(State.WAIT_FINISHED)
    expect_alert(client, AD.unexpected_message, lambda: client.send_record(ContentType.HANDSHAKE, client.finished()))


@pytest.mark.parametrize("state", [State.START, State.CONNECTED])
def test_oversized_handshake_message_gets_illegal_parameter(new_client, state):
    """A handshake message longer than config.max_handshake_message is refused before it is buffered."""
    client = new_client(max_handshake_message=4096)
    client.drive_to(state)
    header = handshake_message(HandshakeType.CLIENT_HELLO, b"")[:1] + (4097).to_bytes(3, "big")
    expect_alert(client, AD.illegal_parameter, lambda: client.send_handshake(header + bytes(100)))


def test_hello_over_max_handshake_message_gets_illegal_parameter(new_client):
    client = new_client(max_handshake_message=1024)
    hello = client.hello().add(EXT.PADDING, bytes(1200))
    expect_alert(client, AD.illegal_parameter, lambda: client.send_hello(hello))


# alerts (5.1, 5.4, 6)

@pytest.mark.parametrize("state", [State.START, State.CONNECTED])
@pytest.mark.parametrize("payload", [b"\x02", b"\x02\x28\x00", b"\x01\x00\x01\x00"])
def test_alert_record_not_two_bytes_gets_decode_error(client, state, payload):
    """5.1: an alert record holds exactly one alert."""
    client.drive_to(state)
    if state is State.START:
        send = lambda: client.send_record(ContentType.ALERT, payload)
    else:
        send = lambda: client.send_protected(ContentType.ALERT, payload)
    expect_alert(client, AD.decode_error, send)


def test_empty_plaintext_alert_record_gets_decode_error(client):
    expect_alert(client, AD.decode_error, lambda: client.send_record(ContentType.ALERT, b""))


def test_zero_length_protected_alert_gets_unexpected_message(client):
    """5.4: a protected Alert with zero-length content MUST get unexpected_message."""
    client.drive_to(State.CONNECTED)
    expect_alert(client, AD.unexpected_message, lambda: client.send_protected(ContentType.ALERT, b""))


@pytest.mark.parametrize("state", [State.START, State.WAIT_FINISHED, State.CONNECTED])
@pytest.mark.parametrize("level", [AlertLevel.FATAL, AlertLevel.WARNING])
def test_peer_alert_raises_and_sends_nothing_back(client, state, level):
    """6: every alert but close_notify and user_canceled ends the connection, whatever its level."""
    client.drive_to(state)
    with pytest.raises(PeerAlert) as raised:
        client.send_alert(AD.handshake_failure, level)
    assert raised.value.description == AD.handshake_failure
    assert client.last_output == b""
    assert_closed(client)


def test_plaintext_alert_from_client_that_could_not_read_server_hello(client):
    """A client that fails on our ServerHello has no keys: its alert comes in plaintext."""
    client.drive_to(State.WAIT_FINISHED)
    with pytest.raises(PeerAlert) as raised:
        client.send_record(ContentType.ALERT, bytes((FATAL, AD.illegal_parameter)))
    assert raised.value.description == AD.illegal_parameter
    assert client.last_output == b""
    assert_closed(client)


def test_unknown_peer_alert_is_fatal(client):
    """6: unknown alert types are error alerts."""
    client.drive_to(State.CONNECTED)
    with pytest.raises(PeerAlert) as raised:
        client.send_alert(201)
    assert raised.value.description == 201
    assert client.last_output == b""


def test_close_notify_then_everything_after_is_ignored(client):
    """6.1: data after close_notify is ignored."""
    client.drive_to(State.CONNECTED)
    close = client.protect(ContentType.ALERT, bytes((AlertLevel.WARNING, AD.close_notify)))
    after = client.protect(ContentType.APPLICATION_DATA, b"too late") + record(ContentType.HANDSHAKE, b"garbage")
    assert client.send(close + after) == [CloseNotifyReceived()]
    assert client.send(client.protect(ContentType.APPLICATION_DATA, b"later still") + os.urandom(100)) == []
    assert client.last_output == b""
    client.call(client.server.close)
    assert client.alerts == [bytes((AlertLevel.WARNING, AD.close_notify))]
    assert client.server.state is State.CLOSED


# protection (5.2, 5.4)

def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes((data[index] ^ 0x01,)) + data[index + 1:]


@pytest.mark.parametrize("state", [State.WAIT_FINISHED, State.CONNECTED])
@pytest.mark.parametrize("index", [pytest.param(2, id="header"), pytest.param(5, id="ciphertext"),
                                   pytest.param(-1, id="tag")])
def test_record_that_does_not_authenticate_gets_bad_record_mac(client, state, index):
    """5.2: AEAD decryption failure is bad_record_mac (the header is the associated data)."""
    client.drive_to(state)
    sealed = client.protect(ContentType.HANDSHAKE if state is State.WAIT_FINISHED else ContentType.APPLICATION_DATA,
                            client.finished())
    expect_alert(client, AD.bad_record_mac, lambda: client.send(_flip(sealed, index)))


def test_finished_and_application_data_in_one_write(client):
    """Clients send their Finished and first data together: each record under its own key."""
    client.drive_to(State.WAIT_FINISHED)
    finished = client.protect(ContentType.HANDSHAKE, client.finished())
    client.switch_to_application_keys(client.finished())
    events = client.send(finished + client.protect(ContentType.APPLICATION_DATA, b"EHLO client.example\r\n"))
    assert isinstance(events[0], HandshakeComplete)
    assert events[1:] == [DataReceived(b"EHLO client.example\r\n")]


def test_record_under_the_key_before_key_update_gets_bad_record_mac(client):
    """4.7.3: after its KeyUpdate the client must use the next key."""
    client.drive_to(State.CONNECTED)
    old_key = client.write
    client.send_key_update()
    client.write = old_key
    expect_alert(client, AD.bad_record_mac, lambda: client.send_application_data(b"stale"))


def test_record_with_no_content_type_gets_unexpected_message(client):
    """5.4: a TLSInnerPlaintext of only zeros has no content type."""
    client.drive_to(State.CONNECTED)
    expect_alert(client, AD.unexpected_message, lambda: client.send(client.write.seal_inner(bytes(10))))


def test_record_with_empty_inner_plaintext_gets_unexpected_message(client):
    """5.4: an authenticated record whose plaintext is empty has no non-zero octet either."""
    client.drive_to(State.CONNECTED)
    expect_alert(client, AD.unexpected_message, lambda: client.send(client.write.seal_inner(b"")))


def test_zero_length_application_data_is_accepted(client):
    """5.1: zero-length application data fragments may be sent."""
    client.drive_to(State.CONNECTED)
    events = client.send_application_data(b"")
    assert all(e == DataReceived(b"") for e in events)
    assert client.send_application_data(b"next") == [DataReceived(b"next")]
    assert client.last_output == b""


def test_padding_is_stripped(client):
    """5.4: zero padding after the content type, up to the whole 2^14 + 1 bytes, is removed."""
    client.drive_to(State.WAIT_FINISHED)
    assert any(isinstance(e, HandshakeComplete) for e in client.send_finished(padding=300))
    assert client.send_application_data(b"padded", padding=1000) == [DataReceived(b"padded")]
    content = b"full"
    padding = MAX_INNER_PLAINTEXT - len(content) - 1
    assert client.send_application_data(content, padding) == [DataReceived(content)]


# --- handshake messages (4) ------------------------------------------------------------

def test_wrong_client_finished_gets_decrypt_error(client):
    """4.5.3: a Finished that does not verify is decrypt_error."""
    client.drive_to(State.WAIT_FINISHED)
    bad = handshake_message(HandshakeType.FINISHED, _flip(client.finished_verify_data, 0))
    expect_alert(client, AD.decrypt_error, lambda: client.send_finished(bad))


@pytest.mark.parametrize("state, msg_type", [
    (State.START, HandshakeType.SERVER_HELLO),
    (State.START, HandshakeType.FINISHED),
    (State.START, HandshakeType.KEY_UPDATE),
    (State.WAIT_SECOND_HELLO, HandshakeType.FINISHED),
    (State.WAIT_SIGNATURE, HandshakeType.FINISHED),
    (State.WAIT_FINISHED, HandshakeType.CERTIFICATE),
    (State.WAIT_FINISHED, HandshakeType.CERTIFICATE_VERIFY),
    (State.WAIT_FINISHED, HandshakeType.END_OF_EARLY_DATA),
    (State.WAIT_FINISHED, HandshakeType.KEY_UPDATE),
    (State.WAIT_FINISHED, HandshakeType.CLIENT_HELLO),
    (State.CONNECTED, HandshakeType.CLIENT_HELLO),
    (State.CONNECTED, HandshakeType.FINISHED),
    (State.CONNECTED, HandshakeType.NEW_SESSION_TICKET),
    (State.CONNECTED, HandshakeType.CERTIFICATE),
    (State.CONNECTED, 99),
])
def test_handshake_message_out_of_order_gets_unexpected_message(client, state, msg_type):
    """4: a handshake message in an unexpected order; 4.2.2: no ClientHello after the handshake;
    4.7.3: no KeyUpdate before Finished; 4.6: EndOfEarlyData only when early data was accepted."""
    client.drive_to(state)
    body = client.encode_hello(client.hello())[4:] if msg_type == HandshakeType.CLIENT_HELLO else bytes(32)
    expect_alert(client, AD.unexpected_message, lambda: client.send_handshake(handshake_message(msg_type, body)))


@pytest.mark.parametrize("state", [State.START, State.WAIT_SECOND_HELLO, State.WAIT_FINISHED])
def test_application_data_before_handshake_complete_gets_unexpected_message(client, state):
    client.drive_to(state)
    if state is State.WAIT_FINISHED:
        send = lambda: client.send_application_data(b"too early")  # under the handshake key
    else:
        send = lambda: client.send_record(ContentType.APPLICATION_DATA, b"too early")
    expect_alert(client, AD.unexpected_message, send)


@pytest.mark.parametrize("request_update", [2, 3, 255])
def test_key_update_with_unknown_request_gets_illegal_parameter(client, request_update):
    """4.7.3: any request_update but 0 and 1 is illegal_parameter."""
    client.drive_to(State.CONNECTED)
    expect_alert(client, AD.illegal_parameter,
                 lambda: client.send_handshake(handshake_message(HandshakeType.KEY_UPDATE, u8(request_update))))


@pytest.mark.parametrize("body", [b"", b"\x00\x00", b"\x01" * 5])
def test_key_update_with_bad_length_gets_decode_error(client, body):
    client.drive_to(State.CONNECTED)
    expect_alert(client, AD.decode_error,
                 lambda: client.send_handshake(handshake_message(HandshakeType.KEY_UPDATE, body)))


def test_key_update_is_followed(client):
    """4.7.3: the positive case: new key for the client, a KeyUpdate back when asked."""
    client.drive_to(State.CONNECTED)
    client.send_key_update(KeyUpdateRequest.REQUESTED)
    assert client.server_messages[-1] == handshake_message(HandshakeType.KEY_UPDATE, u8(0))
    assert client.send_application_data(b"new key") == [DataReceived(b"new key")]
    client.call(client.server.send_data, b"server's new key")
    assert client.application_data == b"server's new key"


# --- the signer (keyless) ---------------------------------------------------------------

def test_signer_failure_sends_internal_error(client):
    client.drive_to(State.WAIT_SIGNATURE)
    client.call(client.server.signature_failed)
    assert client.records[-1].content_type == ContentType.ALERT
    assert client.records[-1].protected
    assert client.alerts == [bytes((FATAL, AD.internal_error))]
    sent_types = {m[0] for m in client.server_messages}
    # The flight held for the signature is dropped whole: no half-authenticated Certificate.
    held = {HandshakeType.ENCRYPTED_EXTENSIONS, HandshakeType.CERTIFICATE}
    assert not sent_types & (held | {HandshakeType.CERTIFICATE_VERIFY, HandshakeType.FINISHED})
    assert_closed(client)


@pytest.mark.parametrize("forge", [
    pytest.param(lambda request, key: sign(key, request.scheme, request.content + b"x"), id="other-content"),
    pytest.param(lambda request, key: sign(ec.generate_private_key(ec.SECP256R1()), request.scheme, request.content),
                 id="other-key"),
    pytest.param(lambda request, key: b"", id="empty"),
    pytest.param(lambda request, key: os.urandom(72), id="garbage"),
])
def test_signature_that_does_not_verify_sends_internal_error_and_nothing_signed(client, forge):
    """The edge checks the oracle's signature before it goes out (DESIGN.md)."""
    client.drive_to(State.WAIT_SIGNATURE)
    request = client.signature_requests[0]
    error = expect_alert(client, AD.internal_error,
                         lambda: client.call(client.server.provide_signature, forge(request, client.key)))
    assert error.__cause__ is None
    assert [m[0] for m in client.server_messages] == [HandshakeType.SERVER_HELLO]


def test_signature_after_the_connection_failed_is_refused(client):
    """A late answer from the oracle after the client broke the handshake signs nothing into the void."""
    client.drive_to(State.WAIT_SIGNATURE)
    request = client.signature_requests[0]
    expect_alert(client, AD.unexpected_message, lambda: client.send_record(ContentType.HANDSHAKE, b"\x01"))
    with pytest.raises(ConnectionClosed):
        client.call(client.server.provide_signature, sign(client.key, request.scheme, request.content))
    assert client.last_output == b""


# --- resumption and early data (4.3.10, 4.3.11) -------------------------------------------

@pytest.fixture
def ticket_client(leaf):
    """new(early_data_size) -> (config, a ticket from a completed full handshake)."""

    def new(early_data_size: int = 0):
        config = ServerConfig([leaf.chain], tickets=TicketKeyring(os.urandom), ticket_early_data_size=early_data_size)
        first = RawClient(config, leaf.key)
        first.handshake()
        assert first.tickets, "no NewSessionTicket after the handshake"
        return config, first.tickets[0]

    return new


def test_resumption_with_a_ticket_completes(ticket_client, leaf):
    config, ticket = ticket_client()
    client = RawClient(config, leaf.key)
    client.handshake(client.hello(ticket=ticket))
    assert client.selected_psk == 0
    assert client.server.session.resumed
    assert client.signature_requests == []


@pytest.mark.parametrize("binder", [
    pytest.param(lambda good: _flip(good, 0), id="flipped"),
    pytest.param(lambda good: bytes(32), id="zeros"),
])
def test_bad_psk_binder_gets_decrypt_error(ticket_client, leaf, binder):
    """4.3.11: a binder that does not validate aborts the handshake."""
    config, ticket = ticket_client()
    client = RawClient(config, leaf.key)
    hello = client.hello(ticket=ticket)
    good = client.encode_hello(hello)[-32:]
    hello.psks[0].binder = binder(good)
    expect_alert(client, AD.decrypt_error, lambda: client.send_hello(hello))


def test_rejected_early_data_is_skipped_within_budget(ticket_client, leaf):
    """4.3.10: the server skips 0-RTT records it cannot read, up to max_early_data_size."""
    config, ticket = ticket_client(early_data_size=1000)
    assert ticket.max_early_data == 1000
    client = RawClient(config, leaf.key)
    client.send_hello(client.hello(ticket=ticket, early_data=True))
    assert client.send(client.early_record(bytes(500)) + client.early_record(bytes(500))) == []
    events = client.send_finished()
    assert any(isinstance(e, HandshakeComplete) for e in events)
    assert client.send_application_data(b"1-RTT") == [DataReceived(b"1-RTT")]


def test_rejected_early_data_over_budget_gets_unexpected_message(ticket_client, leaf):
    """4.7.1: more than max_early_data_size of 0-RTT data SHOULD get unexpected_message."""
    config, ticket = ticket_client(early_data_size=1000)
    client = RawClient(config, leaf.key)
    client.send_hello(client.hello(ticket=ticket, early_data=True))
    client.send(client.early_record(bytes(600)))
    expect_alert(client, AD.unexpected_message, lambda: client.send(client.early_record(bytes(600))))


def test_early_data_before_hello_retry_is_skipped(ticket_client, leaf):
    """4.3.10: after a HelloRetryRequest, application_data records are skipped up to the budget."""
    config, ticket = ticket_client(early_data_size=2**15)
    client = RawClient(config, leaf.key)
    first = client.hello(ticket=ticket, early_data=True, shares=())
    client.send_hello(first)
    assert client.server.state is State.WAIT_SECOND_HELLO
    assert client.send(client.early_record(bytes(100))) == []
    client.send_hello(client.retry_hello(first))
    assert any(isinstance(e, HandshakeComplete) for e in client.send_finished())


def test_bad_record_after_second_hello_gets_bad_record_mac(ticket_client, leaf):
    """4.3.10 and 5.2: early data is skipped only before the second ClientHello (the client
    sends none after it); a record that then fails deprotection is bad_record_mac."""
    config, ticket = ticket_client(early_data_size=4096)
    client = RawClient(config, leaf.key)
    first = client.hello(ticket=ticket, early_data=True, shares=())
    client.send_hello(first)
    client.send_hello(client.retry_hello(first))
    assert client.server.state is State.WAIT_FINISHED
    corrupted = _flip(client.protect(ContentType.HANDSHAKE, client.finished()), -1)
    expect_alert(client, AD.bad_record_mac, lambda: client.send(corrupted))


def test_full_size_early_data_record_before_hello_retry_is_skipped(ticket_client, leaf):
    """5.2 and 4.3.10: a 0-RTT record is a TLSCiphertext, up to 2^14 + 256 bytes, even while
    the server reads plaintext records after its HelloRetryRequest."""
    config, ticket = ticket_client(early_data_size=2**15)
    client = RawClient(config, leaf.key)
    first = client.hello(ticket=ticket, early_data=True, shares=())
    client.send_hello(first)
    full = client.early_record(bytes(MAX_INNER_PLAINTEXT - 1))
    assert len(full) == 5 + MAX_INNER_PLAINTEXT + 16
    assert client.send(full) == []
    client.send_hello(client.retry_hello(first))
    assert any(isinstance(e, HandshakeComplete) for e in client.send_finished())


# --- the conformance review's cases (issue 16) -------------------------------------------------------------

def test_early_data_is_skipped_after_hello_retry_with_change_cipher_spec_interleaved(ticket_client, leaf):
    """4.3.10 and D.4: 0-RTT records around the client's compatibility change_cipher_spec, after a
    HelloRetryRequest, are skipped within the budget; the handshake then completes."""
    config, ticket = ticket_client(early_data_size=4096)
    client = RawClient(config, leaf.key)
    first = client.hello(ticket=ticket, early_data=True, shares=(), session_id=os.urandom(32))
    client.send_hello(first)
    assert client.server.state is State.WAIT_SECOND_HELLO
    assert client.send(client.early_record(bytes(1000))) == []
    assert client.send_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01") == []
    assert client.send(client.early_record(bytes(1000))) == []
    client.send_hello(client.retry_hello(first))
    assert any(isinstance(e, HandshakeComplete) for e in client.send_finished())


def test_early_data_is_skipped_with_change_cipher_spec_interleaved(ticket_client, leaf):
    config, ticket = ticket_client(early_data_size=4096)
    client = RawClient(config, leaf.key)
    client.send_hello(client.hello(ticket=ticket, early_data=True, session_id=os.urandom(32)))
    assert client.send(client.early_record(bytes(700))) == []
    assert client.send_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01") == []
    assert client.send(client.early_record(bytes(700))) == []
    assert any(isinstance(e, HandshakeComplete) for e in client.send_finished())


def test_early_data_over_budget_after_hello_retry_gets_unexpected_message(ticket_client, leaf):
    config, ticket = ticket_client(early_data_size=1000)
    client = RawClient(config, leaf.key)
    client.send_hello(client.hello(ticket=ticket, early_data=True, shares=()))
    client.send(client.early_record(bytes(600)))
    expect_alert(client, AD.unexpected_message, lambda: client.send(client.early_record(bytes(600))))


@pytest.mark.parametrize("count", [1, 2, 100, 32000])
def test_signature_algorithms_of_any_legal_length_with_unknown_values_is_accepted(client, count):
    """4.2.3: unknown schemes are ignored, whatever the list's length (32000: as long as fits in
    a ClientHello's extensions with the others; the hello then spans four records)."""
    unknown = [v for v in range(0x0101, 0xFFFF) if v not in (0x0403, 0x0503, 0x0603)][:count - 1]
    hello = client.hello(schemes=(*unknown, 0x0403))
    assert len(hello.get(EXT.SIGNATURE_ALGORITHMS)) == 2 + 2 * count
    raw = client.prepare_hello(hello)
    for start in range(0, len(raw), MAX_PLAINTEXT):
        client.send_record(ContentType.HANDSHAKE, raw[start:start + MAX_PLAINTEXT])
    client.send_finished()
    assert client.server.session.signature_scheme == "ecdsa_secp256r1_sha256"


@pytest.mark.parametrize("length", [0, 31, 33, 48])
def test_finished_of_the_wrong_length_gets_decode_error(client, length):
    """4.4.4: verify_data is Hash.length bytes; another length does not decode."""
    client.drive_to(State.WAIT_FINISHED)
    bad = handshake_message(HandshakeType.FINISHED, bytes(length))
    expect_alert(client, AD.decode_error, lambda: client.send_finished(bad))


def test_many_key_updates_in_a_row_are_all_followed(client):
    """4.6.3: each KeyUpdate moves the client's key on; 500 in a row, then data under the 501st key."""
    client.drive_to(State.CONNECTED)
    for _ in range(500):
        assert [type(e).__name__ for e in client.send_key_update()] == ["KeyUpdateReceived"]
    assert client.send_application_data(b"after 500") == [DataReceived(b"after 500")]
    client.call(client.server.send_data, b"still the first server key")
    assert client.application_data == b"still the first server key"
