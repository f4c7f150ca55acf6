"""Code points from the TLS registries that the engine speaks or recognises."""

from enum import IntEnum

TLS12 = 0x0303
TLS13 = 0x0304

# RFC 8446 4.1.3: ServerHello.random of a HelloRetryRequest.
# RFC 8446 4.1.3: the last 8 bytes of a TLS 1.3 server's random when it negotiates TLS 1.2.
DOWNGRADE_TLS12 = b"DOWNGRD\x01"

# Cipher suite values that are signals, not suites.
EMPTY_RENEGOTIATION_INFO_SCSV = 0x00FF   # RFC 5746 3.3
FALLBACK_SCSV = 0x5600                   # RFC 7507

HELLO_RETRY_REQUEST_RANDOM = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)

MAX_PLAINTEXT = 2**14            # TLSPlaintext.fragment
MAX_INNER_PLAINTEXT = 2**14 + 1  # content plus the content-type byte
MAX_CIPHERTEXT = 2**14 + 256     # TLSCiphertext.encrypted_record


class ContentType(IntEnum):
    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class HandshakeType(IntEnum):
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    NEW_SESSION_TICKET = 4
    END_OF_EARLY_DATA = 5
    ENCRYPTED_EXTENSIONS = 8
    CERTIFICATE = 11
    SERVER_KEY_EXCHANGE = 12       # TLS 1.2
    CERTIFICATE_REQUEST = 13
    SERVER_HELLO_DONE = 14         # TLS 1.2
    CERTIFICATE_VERIFY = 15
    CLIENT_KEY_EXCHANGE = 16       # TLS 1.2
    FINISHED = 20
    KEY_UPDATE = 24
    MESSAGE_HASH = 254


class ExtensionType(IntEnum):
    SERVER_NAME = 0
    MAX_FRAGMENT_LENGTH = 1
    STATUS_REQUEST = 5
    SUPPORTED_GROUPS = 10
    EC_POINT_FORMATS = 11           # TLS 1.2 (RFC 8422)
    SIGNATURE_ALGORITHMS = 13
    ALPN = 16
    PADDING = 21
    EXTENDED_MASTER_SECRET = 23     # TLS 1.2 (RFC 7627)
    RECORD_SIZE_LIMIT = 28
    SESSION_TICKET = 35             # TLS 1.2 (RFC 5077)
    PRE_SHARED_KEY = 41
    EARLY_DATA = 42
    SUPPORTED_VERSIONS = 43
    COOKIE = 44
    PSK_KEY_EXCHANGE_MODES = 45
    SIGNATURE_ALGORITHMS_CERT = 50
    KEY_SHARE = 51
    RENEGOTIATION_INFO = 0xFF01     # TLS 1.2 (RFC 5746)


class AlertLevel(IntEnum):
    WARNING = 1
    FATAL = 2


class AlertDescription(IntEnum):
    close_notify = 0
    unexpected_message = 10
    bad_record_mac = 20
    record_overflow = 22
    handshake_failure = 40
    bad_certificate = 42
    unsupported_certificate = 43
    certificate_revoked = 44
    certificate_expired = 45
    certificate_unknown = 46
    illegal_parameter = 47
    unknown_ca = 48
    access_denied = 49
    decode_error = 50
    decrypt_error = 51
    protocol_version = 70
    insufficient_security = 71
    internal_error = 80
    inappropriate_fallback = 86
    user_canceled = 90
    no_renegotiation = 100
    missing_extension = 109
    unsupported_extension = 110
    unrecognized_name = 112
    bad_certificate_status_response = 113
    unknown_psk_identity = 115
    certificate_required = 116
    no_application_protocol = 120


class CipherSuite(IntEnum):
    AES_128_GCM_SHA256 = 0x1301
    AES_256_GCM_SHA384 = 0x1302
    CHACHA20_POLY1305_SHA256 = 0x1303


class CipherSuite12(IntEnum):
    """The TLS 1.2 suites served: ECDHE with an AEAD, nothing else (RFC 5289, RFC 7905)."""

    ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 = 0xC02B
    ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 = 0xC02C
    ECDHE_RSA_WITH_AES_128_GCM_SHA256 = 0xC02F
    ECDHE_RSA_WITH_AES_256_GCM_SHA384 = 0xC030
    ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 = 0xCCA8
    ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 = 0xCCA9


class Group(IntEnum):
    SECP256R1 = 0x0017
    SECP384R1 = 0x0018
    X25519 = 0x001D
    X25519MLKEM768 = 0x11EC


class SignatureScheme(IntEnum):
    ECDSA_SECP256R1_SHA256 = 0x0403
    ECDSA_SECP384R1_SHA384 = 0x0503
    ECDSA_SECP521R1_SHA512 = 0x0603
    RSA_PSS_RSAE_SHA256 = 0x0804
    RSA_PSS_RSAE_SHA384 = 0x0805
    RSA_PSS_RSAE_SHA512 = 0x0806
    ED25519 = 0x0807
    RSA_PKCS1_SHA256 = 0x0401       # TLS 1.2 only, for RSA keys
    RSA_PKCS1_SHA384 = 0x0501
    RSA_PKCS1_SHA512 = 0x0601


class PskMode(IntEnum):
    PSK_KE = 0
    PSK_DHE_KE = 1


class KeyUpdateRequest(IntEnum):
    NOT_REQUESTED = 0
    REQUESTED = 1
