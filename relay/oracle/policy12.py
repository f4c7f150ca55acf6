"""The key oracle's TLS 1.2 policy: it signs a ServerKeyExchange it built itself, for a TLS 1.2-only client.

A TLS 1.2 ServerKeyExchange signature covers client_random || server_random
|| params. A signer that signs whatever the edge sends would sign bytes of
the edge's choosing (a chosen server_random, a "params" blob that is really
something else): the classic keyless weakness (Bhargavan et al., 2017), which
the IETF LURK design closes and which this module closes the same way. The
edge sends (method `sign_tls12`) the ClientHello as received, then the
ServerECDHParams it wants to send; with the cipher suite, the scheme and a
nonce. `check_server_key_exchange`:

- parses the ClientHello strictly; its best version must be TLS 1.2 (a client
  that offers TLS 1.3 gets TLS 1.3, never a TLS 1.2 signature: `not_tls12`),
  without TLS_FALLBACK_SCSV;
- checks the suite is one of the engine's ECDHE-AEAD suites for this key's
  type that the client offered (`suite_mismatch`: RSA key transport, CBC,
  another key type), the scheme is one the key signs with and the client
  offered (`scheme_mismatch`), the SNI is a name of the certificate;
- parses the params itself: named_curve, a curve the client offered
  (x25519, P-256, P-384), a point of the right length, on the curve, not of
  low order (`bad_params`); nothing may follow;
- derives server_random from the nonce (relay.tls.signing.tls12_server_random,
  the downgrade sentinel in its last bytes) and refuses a nonce whose time is
  more than NONCE_WINDOW from its clock (`stale_nonce`);
- builds the signed bytes itself, with relay.tls.signing, which the engine
  verifies the answer with.

ALPN: in TLS 1.2 the server's choice is in the ServerHello, which the signer
does not see; so a ClientHello that offers ALPN is signed for only when its
SNI is an mta-sts. name and it offers http/1.1 (`alpn_selected`), the one
case the TLS 1.3 policy signs too (relay/oracle/policy.py).

Replays: each nonce is signed for once. The front, one process that sees
every request, keeps the ledger (`NonceLedger`, `replayed_nonce`); each
signing process checks the window. A replayed nonce would only get the same
server_random again, with another ClientHello or params, which a fresh
nonce gets as well; refusing it keeps each signature to one handshake.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass

from relay.tls import keyshare
from relay.tls.certs import CertificateChain
from relay.tls.constants import FALLBACK_SCSV, TLS12, TLS13, Group, HandshakeType, SignatureScheme
from relay.tls.errors import DecodeError, IllegalParameter, TLSAlert
from relay.tls.messages import ClientHello, best_version, parse_client_hello
from relay.tls.server12 import auth_of, key_fits_groups
from relay.tls.signing import (
    NAMED_CURVE,
    TLS12_NONCE_LEN,
    schemes_for_key_tls12,
    server_key_exchange_content,
    tls12_nonce_time,
    tls12_server_random,
)
from relay.tls.tls12 import SUITES12, Suite12
from relay.tls.wire import Reader

from .policy import (
    ALPN_SELECTED,
    BAD_PARAMS,
    INTERNAL_ERROR,
    MALFORMED,
    MTA_STS_ALPN,
    MTA_STS_PREFIX,
    NOT_A_TRANSCRIPT,
    NOT_TLS12,
    REPLAYED_NONCE,
    SCHEME_MISMATCH,
    SNI_MISMATCH,
    STALE_NONCE,
    SUITE_MISMATCH,
    Refusal,
)

NONCE_WINDOW = 120.0        # seconds between the edge making a nonce and the signer seeing it, clock skew included
MAX_NONCES = 100_000        # the front's ledger: far above what its per-peer rate limits let through in the window


@dataclass(frozen=True, slots=True)
class Approved12:
    """A ServerKeyExchange the policy accepts: sign `content` with `scheme`; the rest is for the audit log."""

    content: bytes
    scheme: SignatureScheme
    cipher_suite: int
    server_name: str | None
    client_random: bytes
    server_random: bytes
    group: Group


def check_server_key_exchange(data: bytes, scheme: int, chain: CertificateChain, cipher_suite,
                              nonce: bytes, now: float) -> Approved12:
    """What to sign for this request, or `Refusal`: nothing else escapes, whatever the input."""
    seen: dict = {}
    try:
        return _check(data, scheme, chain, cipher_suite, nonce, now, seen)
    except Refusal as refusal:
        refusal.facts = seen
        raise
    except TLSAlert as error:
        raise Refusal(MALFORMED, error.message) from error
    except Exception as bug:
        raise Refusal(INTERNAL_ERROR, f"the policy check failed: {type(bug).__name__}: {bug}") from bug


def _check(data, scheme, chain, cipher_suite, nonce, now, seen) -> Approved12:
    hello, params = _split(data)
    seen.update(server_name=hello.server_name, client_random=hello.random.hex())
    _check_client_hello(hello)
    suite = _check_suite(hello, chain, cipher_suite)
    signature_scheme = next((s for s in schemes_for_key_tls12(chain.public_key) if s == scheme
                             and isinstance(scheme, int) and not isinstance(scheme, bool)), None)
    if signature_scheme is None:
        raise Refusal(SCHEME_MISMATCH, f"this key does not sign TLS 1.2 with scheme {_show(scheme)}")
    if hello.signature_algorithms is None or scheme not in hello.signature_algorithms:
        raise Refusal(SCHEME_MISMATCH, f"the client did not offer scheme {_show(scheme)}")
    if hello.server_name is not None and not chain.matches(hello.server_name):
        raise Refusal(SNI_MISMATCH, f"server_name {hello.server_name!r} is not a name of this certificate")
    _check_alpn(hello)
    group = _check_params(hello, params)
    server_random = _server_random(nonce, now)
    seen.update(server_random=server_random.hex())
    return Approved12(
        content=server_key_exchange_content(hello.random, server_random, params),
        scheme=signature_scheme, cipher_suite=suite.code, server_name=hello.server_name,
        client_random=hello.random, server_random=server_random, group=group,
    )


def _split(data) -> tuple[ClientHello, bytes]:
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes) or len(data) < 4 or data[0] != HandshakeType.CLIENT_HELLO:
        raise Refusal(NOT_A_TRANSCRIPT, "the request does not start with a ClientHello")
    end = 4 + int.from_bytes(data[1:4], "big")
    if end > len(data):
        raise Refusal(NOT_A_TRANSCRIPT, "the ClientHello is cut short")
    try:
        return parse_client_hello(data[:end]), data[end:]
    except TLSAlert as error:
        raise Refusal(MALFORMED, f"ClientHello: {error.message}") from error


def _check_client_hello(hello: ClientHello) -> None:
    """The rules the engine applies before it asks (relay/tls/server.py _negotiate_version, server12.py)."""
    version = best_version(hello)
    if version == TLS13:
        raise Refusal(NOT_TLS12, "the ClientHello offers TLS 1.3: it gets TLS 1.3, never a TLS 1.2 signature")
    if version != TLS12:
        raise Refusal(NOT_TLS12, "the ClientHello does not offer TLS 1.2")
    if FALLBACK_SCSV in hello.cipher_suites:
        raise Refusal(NOT_TLS12, "the ClientHello carries TLS_FALLBACK_SCSV: it can do better than TLS 1.2")
    if 0 not in hello.compression_methods:
        raise Refusal(MALFORMED, "the ClientHello does not offer null compression")
    if hello.renegotiation_info not in (None, b""):
        raise Refusal(MALFORMED, "the ClientHello's renegotiation_info is not empty: a renegotiation")
    if hello.point_formats is not None and 0 not in hello.point_formats:
        raise Refusal(MALFORMED, "the ClientHello's ec_point_formats lacks the uncompressed form")


def _check_suite(hello: ClientHello, chain: CertificateChain, cipher_suite) -> Suite12:
    suite = SUITES12.get(cipher_suite) if isinstance(cipher_suite, int) and not isinstance(cipher_suite, bool) else None
    if suite is None:
        raise Refusal(SUITE_MISMATCH, f"cipher suite {_show(cipher_suite)} is not an ECDHE suite with an AEAD "
                                      "(RSA key transport, CBC and static DH are never signed for)")
    if cipher_suite not in hello.cipher_suites:
        raise Refusal(SUITE_MISMATCH, f"the client did not offer cipher suite {_show(cipher_suite)}")
    if suite.auth != auth_of(chain.public_key):
        raise Refusal(SUITE_MISMATCH, f"cipher suite {suite.name} needs an {suite.auth} key, not this one")
    if not key_fits_groups(chain.public_key, hello.groups):
        raise Refusal(SUITE_MISMATCH, "the client's supported_groups lacks this ECDSA key's curve (RFC 8422 5.1)")
    return suite


def _check_alpn(hello: ClientHello) -> None:
    if hello.alpn is None:
        return
    name = hello.server_name
    if name is None or not name.startswith(MTA_STS_PREFIX) or MTA_STS_ALPN not in hello.alpn:
        raise Refusal(ALPN_SELECTED, f"the ClientHello offers ALPN for server_name {name!r}: in TLS 1.2 the "
                                     "signer cannot see the server's choice, so it signs only for an mta-sts. "
                                     "name with http/1.1 offered")


def _check_params(hello: ClientHello, params: bytes) -> Group:
    try:
        r = Reader(params)
        curve_type, group = r.u8(), r.u16()
        point = r.vector(1, 1)
        r.expect_end()
    except DecodeError:
        raise Refusal(BAD_PARAMS, "the params are not one ServerECDHParams (named curve and point)") from None
    if curve_type != NAMED_CURVE:
        raise Refusal(BAD_PARAMS, f"curve type {curve_type} is not named_curve")
    if group not in keyshare.GROUPS12:
        raise Refusal(BAD_PARAMS, f"group 0x{group:04x} is not served in TLS 1.2 (x25519, P-256, P-384)")
    offered = hello.groups if hello.groups is not None else [Group.SECP256R1]
    if group not in offered:
        raise Refusal(BAD_PARAMS, f"the client did not offer group 0x{group:04x}")
    try:
        keyshare.check_point(group, point)
    except IllegalParameter as error:
        raise Refusal(BAD_PARAMS, error.message) from None
    return Group(group)


def _server_random(nonce, now: float) -> bytes:
    if not isinstance(nonce, bytes) or len(nonce) != TLS12_NONCE_LEN:
        raise Refusal(MALFORMED, f"the nonce is not {TLS12_NONCE_LEN} bytes")
    made = tls12_nonce_time(nonce)
    if abs(now - made) > NONCE_WINDOW:
        raise Refusal(STALE_NONCE, f"the nonce was made {now - made:.0f} s from this signer's clock "
                                   f"(more than {NONCE_WINDOW:.0f} s: a stored request, or a clock to fix)")
    return tls12_server_random(nonce)


class NonceLedger:
    """The nonces signed for within the window: one signature per nonce."""

    def __init__(self, window: float = NONCE_WINDOW, limit: int = MAX_NONCES, clock=time.time):
        self.window = window
        self.limit = limit
        self.clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def admit(self, nonce: bytes) -> None:
        """Record `nonce`; Refusal when it was seen in the window or the ledger is full."""
        now = self.clock()
        while self._seen and next(iter(self._seen.values())) < now - 2 * self.window:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            raise Refusal(REPLAYED_NONCE, "this nonce was signed for already")
        if len(self._seen) >= self.limit:
            raise Refusal(STALE_NONCE, f"more than {self.limit} nonces in {2 * self.window:.0f} s")
        self._seen[nonce] = now


def _show(value) -> str:
    return f"0x{value:04x}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)
