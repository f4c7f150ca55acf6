"""Handshake messages: ClientHello parsed strictly, server messages built.

Parsing follows RFC 8446's rules: lengths checked before use (decode_error),
duplicate extensions and a pre_shared_key that is not last are
illegal_parameter, unknown extensions are ignored.
"""

from dataclasses import dataclass, field

from .constants import TLS12, TLS13, ExtensionType, HandshakeType
from .errors import IllegalParameter
from .wire import Reader, u8, u16, u24, u32, vec8, vec16, vec24


def handshake_message(msg_type: int, body: bytes) -> bytes:
    return u8(msg_type) + u24(len(body)) + body


def extension(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + vec16(data)


@dataclass
class OfferedPsks:
    identities: list[tuple[bytes, int]]  # (identity, obfuscated_ticket_age)
    binders: list[bytes]
    # Length of the ClientHello prefix the binders cover (RFC 8446 4.2.11.2).
    truncated_length: int


@dataclass
class ClientHello:
    raw: bytes  # the whole handshake message, header included
    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suites: list[int]
    compression_methods: bytes
    extension_types: list[int] = field(default_factory=list)
    supported_versions: list[int] | None = None
    server_name: str | None = None
    groups: list[int] | None = None
    key_shares: list[tuple[int, bytes]] | None = None
    signature_algorithms: list[int] | None = None
    signature_algorithms_cert: list[int] | None = None
    alpn: list[bytes] | None = None
    psk_modes: list[int] | None = None
    psks: OfferedPsks | None = None
    early_data: bool = False
    cookie: bytes | None = None
    record_size_limit: int | None = None
    # TLS 1.2's
    point_formats: bytes | None = None
    extended_master_secret: bool = False
    session_ticket: bytes | None = None       # b"": supports tickets, has none
    renegotiation_info: bytes | None = None


def best_version(hello: ClientHello) -> int | None:
    """TLS13 or TLS12, the best of the two the client offers (RFC 8446 4.2.1: supported_versions
    when present, else legacy_version); None when it offers neither. The engine answers with it, and
    the oracle's policies check a request against it."""
    versions = hello.supported_versions
    if versions is not None:
        return TLS13 if TLS13 in versions else TLS12 if TLS12 in versions else None
    return TLS12 if hello.legacy_version >= TLS12 else None


def parse_client_hello(raw: bytes) -> ClientHello:
    r = Reader(raw, 4)  # the caller has checked the 4-byte header
    legacy_version = r.u16()
    random = r.take(32)
    session_id = r.vector(1, 0, 32)
    suites = r.uint_list(2, 2, minimum=2)
    compression = r.vector(1, 1)
    ch = ClientHello(raw, legacy_version, random, session_id, suites, compression)
    if r.remaining() == 0:
        return ch  # a pre-TLS-1.3 hello without extensions
    extensions = r.sub(2)
    r.expect_end()
    seen: set[int] = set()
    while extensions.remaining():
        if ExtensionType.PRE_SHARED_KEY in seen:
            raise IllegalParameter("pre_shared_key is not the last extension")
        ext_type = extensions.u16()
        ext_start = extensions.pos
        data = extensions.sub(2)
        if ext_type in seen:
            raise IllegalParameter(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        ch.extension_types.append(ext_type)
        parser = _EXTENSION_PARSERS.get(ext_type)
        if parser is not None:
            parser(ch, data, ext_start)
            data.expect_end()
    return ch


def _supported_versions(ch: ClientHello, r: Reader, _: int) -> None:
    ch.supported_versions = r.uint_list(1, 2, minimum=2)


def _server_name(ch: ClientHello, r: Reader, _: int) -> None:
    names = r.sub(2, minimum=1)
    while names.remaining():
        name_type = names.u8()
        name = names.vector(2, 1)
        if name_type != 0:
            continue  # unknown name types are skipped (RFC 6066 section 3)
        if ch.server_name is not None:
            raise IllegalParameter("more than one host_name in server_name")
        ch.server_name = _host_name(name)


def _host_name(name: bytes) -> str:
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        raise IllegalParameter("server_name is not an ASCII host name") from None
    text = text.lower()
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-.")
    if text.endswith(".") or not set(text) <= allowed or len(text) > 253:
        raise IllegalParameter("server_name is not a valid host name")
    return text


def _supported_groups(ch: ClientHello, r: Reader, _: int) -> None:
    ch.groups = r.uint_list(2, 2, minimum=2)


def _key_share(ch: ClientHello, r: Reader, _: int) -> None:
    shares = r.sub(2)
    ch.key_shares = []
    while shares.remaining():
        group = shares.u16()
        ch.key_shares.append((group, shares.vector(2, 1)))


def _signature_algorithms(ch: ClientHello, r: Reader, _: int) -> None:
    ch.signature_algorithms = r.uint_list(2, 2, minimum=2)


def _signature_algorithms_cert(ch: ClientHello, r: Reader, _: int) -> None:
    ch.signature_algorithms_cert = r.uint_list(2, 2, minimum=2)


def _alpn(ch: ClientHello, r: Reader, _: int) -> None:
    names = r.sub(2, minimum=2)
    ch.alpn = []
    while names.remaining():
        ch.alpn.append(names.vector(1, 1))


def _psk_modes(ch: ClientHello, r: Reader, _: int) -> None:
    ch.psk_modes = list(r.vector(1, 1))


def _pre_shared_key(ch: ClientHello, r: Reader, ext_start: int) -> None:
    identities = r.sub(2, minimum=7)
    offered = []
    while identities.remaining():
        identity = identities.vector(2, 1)
        offered.append((identity, identities.u32()))
    truncated_length = r.pos
    binder_list = r.sub(2, minimum=33)
    binders = []
    while binder_list.remaining():
        binders.append(binder_list.vector(1, 32))
    if len(binders) != len(offered):
        raise IllegalParameter("pre_shared_key has different numbers of identities and binders")
    ch.psks = OfferedPsks(offered, binders, truncated_length)


def _early_data(ch: ClientHello, r: Reader, _: int) -> None:
    ch.early_data = True


def _cookie(ch: ClientHello, r: Reader, _: int) -> None:
    ch.cookie = r.vector(2, 1)


def _record_size_limit(ch: ClientHello, r: Reader, _: int) -> None:
    limit = r.u16()
    if limit < 64:
        raise IllegalParameter(f"record_size_limit {limit} is below 64")
    ch.record_size_limit = limit


def _point_formats(ch: ClientHello, r: Reader, _: int) -> None:
    ch.point_formats = r.vector(1, 1)


def _extended_master_secret(ch: ClientHello, r: Reader, _: int) -> None:
    ch.extended_master_secret = True   # empty: the caller's expect_end() checks it


def _session_ticket(ch: ClientHello, r: Reader, _: int) -> None:
    ch.session_ticket = r.take(r.remaining())


def _renegotiation_info(ch: ClientHello, r: Reader, _: int) -> None:
    ch.renegotiation_info = r.vector(1)


_EXTENSION_PARSERS = {
    ExtensionType.SUPPORTED_VERSIONS: _supported_versions,
    ExtensionType.SERVER_NAME: _server_name,
    ExtensionType.SUPPORTED_GROUPS: _supported_groups,
    ExtensionType.KEY_SHARE: _key_share,
    ExtensionType.SIGNATURE_ALGORITHMS: _signature_algorithms,
    ExtensionType.SIGNATURE_ALGORITHMS_CERT: _signature_algorithms_cert,
    ExtensionType.ALPN: _alpn,
    ExtensionType.PSK_KEY_EXCHANGE_MODES: _psk_modes,
    ExtensionType.PRE_SHARED_KEY: _pre_shared_key,
    ExtensionType.EARLY_DATA: _early_data,
    ExtensionType.COOKIE: _cookie,
    ExtensionType.RECORD_SIZE_LIMIT: _record_size_limit,
    ExtensionType.EC_POINT_FORMATS: _point_formats,
    ExtensionType.EXTENDED_MASTER_SECRET: _extended_master_secret,
    ExtensionType.SESSION_TICKET: _session_ticket,
    ExtensionType.RENEGOTIATION_INFO: _renegotiation_info,
}


# --- server messages -------------------------------------------------------

def server_hello(random: bytes, session_id: bytes, suite: int, extensions: list[bytes]) -> bytes:
    body = u16(0x0303) + random + vec8(session_id) + u16(suite) + b"\x00" + vec16(b"".join(extensions))
    return handshake_message(HandshakeType.SERVER_HELLO, body)


def encrypted_extensions(extensions: list[bytes]) -> bytes:
    return handshake_message(HandshakeType.ENCRYPTED_EXTENSIONS, vec16(b"".join(extensions)))


def certificate(der_chain: tuple[bytes, ...]) -> bytes:
    entries = b"".join(vec24(der) + vec16(b"") for der in der_chain)
    return handshake_message(HandshakeType.CERTIFICATE, vec8(b"") + vec24(entries))


def certificate_verify(scheme: int, signature: bytes) -> bytes:
    return handshake_message(HandshakeType.CERTIFICATE_VERIFY, u16(scheme) + vec16(signature))


def finished(verify_data: bytes) -> bytes:
    return handshake_message(HandshakeType.FINISHED, verify_data)


def new_session_ticket(lifetime: int, age_add: int, nonce: bytes, ticket: bytes, extensions: list[bytes]) -> bytes:
    body = u32(lifetime) + u32(age_add) + vec8(nonce) + vec16(ticket) + vec16(b"".join(extensions))
    return handshake_message(HandshakeType.NEW_SESSION_TICKET, body)


def key_update(request_update: int) -> bytes:
    return handshake_message(HandshakeType.KEY_UPDATE, u8(request_update))


# --- TLS 1.2 server messages (RFC 5246 7.4, RFC 8422 5.4, RFC 5077 3.3) -------------

def certificate12(der_chain: tuple[bytes, ...]) -> bytes:
    """TLS 1.2's Certificate: a bare list of certificates."""
    return handshake_message(HandshakeType.CERTIFICATE, vec24(b"".join(vec24(der) for der in der_chain)))


def server_key_exchange(params: bytes, scheme: int, signature: bytes) -> bytes:
    return handshake_message(HandshakeType.SERVER_KEY_EXCHANGE, params + u16(scheme) + vec16(signature))


def server_hello_done() -> bytes:
    return handshake_message(HandshakeType.SERVER_HELLO_DONE, b"")


def new_session_ticket12(lifetime_hint: int, ticket: bytes) -> bytes:
    return handshake_message(HandshakeType.NEW_SESSION_TICKET, u32(lifetime_hint) + vec16(ticket))
