"""Public certificate chains, and choosing one for a ClientHello.

The engine holds only public material: the chain to send, the leaf's public
key to check signatures against, the names it may be chosen for.
"""

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtensionOID, NameOID

from .constants import SignatureScheme
from .signing import schemes_for_key


@dataclass(frozen=True, eq=False)
class CertificateChain:
    der_chain: tuple[bytes, ...]   # leaf first
    public_key: object             # the leaf's key
    names: frozenset[str]          # DNS names, lower case; "*.example.org" for wildcards
    schemes: tuple[SignatureScheme, ...]
    issuer_schemes: frozenset[int]  # schemes the chain's own signatures use

    @classmethod
    def from_certificates(cls, certs: list[x509.Certificate], min_rsa_bits: int = 2048) -> "CertificateChain":
        """A chain from parsed certificates, leaf first.

        RSA keys below `min_rsa_bits` are refused; only replaying the RFC 8448
        traces, whose key is 1024 bits, lowers it.
        """
        if not certs:
            raise ValueError("a certificate chain needs at least the leaf certificate")
        leaf = certs[0]
        public_key = leaf.public_key()
        schemes = schemes_for_key(public_key)
        too_small = isinstance(public_key, rsa.RSAPublicKey) and not min_rsa_bits <= public_key.key_size <= 8192
        if not schemes or too_small:
            raise ValueError(
                f"certificate {leaf.subject.rfc4514_string()} has a key TLS 1.3 cannot sign with "
                f"(use ECDSA P-256/P-384/P-521, RSA {min_rsa_bits}-8192 or Ed25519)"
            )
        return cls(
            der_chain=tuple(c.public_bytes(Encoding.DER) for c in certs),
            public_key=public_key,
            names=frozenset(_dns_names(leaf)),
            schemes=schemes,
            issuer_schemes=frozenset(filter(None, (_signature_scheme_of(c) for c in certs))),
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> "CertificateChain":
        return cls.from_certificates(x509.load_pem_x509_certificates(pem))

    def not_after(self):
        """The leaf certificate's expiry (an aware UTC datetime)."""
        return x509.load_der_x509_certificate(self.der_chain[0]).not_valid_after_utc

    def is_key_of(self, private_key) -> bool:
        """True when `private_key` is the leaf certificate's key."""
        spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return private_key.public_key().public_bytes(*spki) == self.public_key.public_bytes(*spki)

    def matches(self, server_name: str) -> bool:
        if server_name in self.names:
            return True
        head, _, rest = server_name.partition(".")
        return bool(rest) and f"*.{rest}" in self.names

    @property
    def key_type(self) -> str:
        key = self.public_key
        if isinstance(key, ec.EllipticCurvePublicKey):
            return f"ECDSA {key.curve.name}"
        if isinstance(key, rsa.RSAPublicKey):
            return f"RSA {key.key_size}"
        return "Ed25519"


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        return [name.lower() for name in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [a.value.lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _signature_scheme_of(cert: x509.Certificate) -> int | None:
    """The TLS signature scheme matching how `cert` itself was signed."""
    algorithm = cert.signature_hash_algorithm
    params = cert.signature_algorithm_parameters
    names = {hashes.SHA256: "256", hashes.SHA384: "384", hashes.SHA512: "512"}
    if isinstance(params, ec.ECDSA):
        return {"256": 0x0403, "384": 0x0503, "512": 0x0603}.get(names.get(type(algorithm)))
    if isinstance(params, padding.PSS):
        return {"256": 0x0804, "384": 0x0805, "512": 0x0806}.get(names.get(type(algorithm)))
    if isinstance(params, padding.PKCS1v15):
        return {"256": 0x0401, "384": 0x0501, "512": 0x0601}.get(names.get(type(algorithm)))
    if algorithm is None and cert.signature_algorithm_oid.dotted_string == "1.3.101.112":
        return SignatureScheme.ED25519
    return None


def select_certificate(
    chains: list[CertificateChain],
    server_name: str | None,
    signature_algorithms: list[int],
    signature_algorithms_cert: list[int] | None,
) -> tuple[CertificateChain, SignatureScheme] | None:
    """The first configured chain for `server_name` whose key can make a signature the client accepts.

    Chains whose names match the SNI come first; without a match every chain
    is a candidate, in configured order (the first is the default). A chain
    whose own signatures the client also lists is preferred, but, as RFC 8446
    4.4.2.2 allows, one that only fits `signature_algorithms` is still used.
    """
    named = [c for c in chains if server_name and c.matches(server_name)]
    candidates = named or chains
    accepted_cert_schemes = set(signature_algorithms_cert or signature_algorithms)
    fallback = None
    for chain in candidates:
        scheme = next((s for s in chain.schemes if s in signature_algorithms), None)
        if scheme is None:
            continue
        if chain.issuer_schemes <= accepted_cert_schemes:
            return chain, scheme
        fallback = fallback or (chain, scheme)
    return fallback

