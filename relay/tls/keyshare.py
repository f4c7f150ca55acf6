"""The server's half of each key exchange group.

`respond(group, client_share, random)` validates the client's share, makes the
server's ephemeral key from injected randomness, and returns the server share
and the shared secret. A malformed or invalid share is illegal_parameter
(RFC 8446 4.2.8, draft-ietf-tls-ecdhe-mlkem 3.1.2).

ML-KEM encapsulation draws its randomness inside OpenSSL: `cryptography`
offers no derandomised encapsulate. Everything else here is deterministic in
`random`, which is what lets the RFC 8448 traces be replayed.
"""

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .constants import Group
from .errors import IllegalParameter

Random = Callable[[int], bytes]

_CURVES = {
    Group.SECP256R1: (ec.SECP256R1(), 32),
    Group.SECP384R1: (ec.SECP384R1(), 48),
}
MLKEM768_ENCAPSULATION_KEY_LEN = 1184
X25519_LEN = 32


def group_name(group: int) -> str:
    """The name logs, SessionInfo and the audit use for a group."""
    return "X25519MLKEM768" if group == Group.X25519MLKEM768 else Group(group).name.lower()


def respond(group: int, client_share: bytes, random: Random) -> tuple[bytes, bytes]:
    if group == Group.X25519:
        return _x25519(client_share, random)
    if group in _CURVES:
        return _nist_curve(group, client_share, random)
    if group == Group.X25519MLKEM768:
        return _x25519_mlkem768(client_share, random)
    raise IllegalParameter(f"unsupported group 0x{group:04x}")


def _x25519(client_share: bytes, random: Random) -> tuple[bytes, bytes]:
    if len(client_share) != X25519_LEN:
        raise IllegalParameter("x25519 share is not 32 bytes")
    private = x25519.X25519PrivateKey.from_private_bytes(random(32))
    try:
        shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(client_share))
    except ValueError:  # all-zero shared secret: a small-order point
        raise IllegalParameter("x25519 share gives an all-zero secret") from None
    return private.public_key().public_bytes_raw(), shared


def _nist_curve(group: int, client_share: bytes, random: Random) -> tuple[bytes, bytes]:
    curve, size = _CURVES[group]
    peer = check_point(group, client_share)   # only the uncompressed form, as in TLS 1.3
    private = _ec_private_key(curve, size, random)
    shared = private.exchange(ec.ECDH(), peer)
    public = private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return public, shared


def _ec_private_key(curve: ec.EllipticCurve, size: int, random: Random) -> ec.EllipticCurvePrivateKey:
    # Rejection sampling keeps the scalar uniform in [1, n-1].
    while True:
        scalar = int.from_bytes(random(size), "big")
        try:
            return ec.derive_private_key(scalar, curve)
        except ValueError:
            continue


def _x25519_mlkem768(client_share: bytes, random: Random) -> tuple[bytes, bytes]:
    if len(client_share) != MLKEM768_ENCAPSULATION_KEY_LEN + X25519_LEN:
        raise IllegalParameter("X25519MLKEM768 share is not 1216 bytes")
    try:
        # from_public_bytes performs FIPS 203's encapsulation key check.
        encapsulation_key = mlkem.MLKEM768PublicKey.from_public_bytes(
            client_share[:MLKEM768_ENCAPSULATION_KEY_LEN]
        )
    except ValueError:
        raise IllegalParameter("ML-KEM-768 encapsulation key fails its check") from None
    mlkem_secret, ciphertext = encapsulation_key.encapsulate()
    x25519_share, x25519_secret = _x25519(client_share[MLKEM768_ENCAPSULATION_KEY_LEN:], random)
    # The ML-KEM part comes first, in the share and in the secret.
    return ciphertext + x25519_share, mlkem_secret + x25519_secret


# --- TLS 1.2: the server speaks first ------------------------------------------

GROUPS12 = (Group.X25519, Group.SECP256R1, Group.SECP384R1)   # no hybrid groups in TLS 1.2


def generate(group: int, random: Random):
    """A TLS 1.2 ServerKeyExchange's ephemeral key: (private key, public point)."""
    if group == Group.X25519:
        private = x25519.X25519PrivateKey.from_private_bytes(random(32))
        return private, private.public_key().public_bytes_raw()
    if group in _CURVES:
        curve, size = _CURVES[group]
        private = _ec_private_key(curve, size, random)
        return private, private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    raise IllegalParameter(f"group 0x{group:04x} is not served in TLS 1.2")


def check_point(group: int, point: bytes):
    """The peer public key for `point`, checked: length, uncompressed form, on the curve, not low order.

    IllegalParameter says what is wrong. Used by the engine for the client's
    ClientKeyExchange and by the oracle for the edge's ServerKeyExchange point.
    """
    if group == Group.X25519:
        if len(point) != X25519_LEN:
            raise IllegalParameter("x25519 point is not 32 bytes")
        public = x25519.X25519PublicKey.from_public_bytes(point)
        try:   # a low-order point gives the all-zero secret with any key: cryptography refuses it
            x25519.X25519PrivateKey.from_private_bytes(b"\x01" * 32).exchange(public)
        except ValueError:
            raise IllegalParameter("x25519 point has low order") from None
        return public
    if group in _CURVES:
        curve, size = _CURVES[group]
        if len(point) != 1 + 2 * size or point[0] != 4:
            raise IllegalParameter(f"{curve.name} point is not uncompressed")
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        except ValueError:
            raise IllegalParameter(f"{curve.name} point is not on the curve") from None
    raise IllegalParameter(f"group 0x{group:04x} is not served in TLS 1.2")


def complete(group: int, private, client_point: bytes) -> bytes:
    """The premaster secret from our ephemeral key and the client's checked point."""
    if group == Group.X25519:   # the exchange itself refuses a low-order point: no second multiplication
        if len(client_point) != X25519_LEN:
            raise IllegalParameter("x25519 point is not 32 bytes")
        try:
            return private.exchange(x25519.X25519PublicKey.from_public_bytes(client_point))
        except ValueError:
            raise IllegalParameter("x25519 point has low order") from None
    return private.exchange(ec.ECDH(), check_point(group, client_point))
