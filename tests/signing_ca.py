"""A throwaway CA that signs CSRs (optionally through an intermediate), for the keystore and keys tests."""

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)


class CA:
    """A throwaway CA that signs CSRs, optionally through an intermediate."""

    def __init__(self, name="YesTLS keystore test CA", issuer=None):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.issuer = issuer
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        if issuer is None:  # a root signs itself
            self.cert = self._build(subject, self.key.public_key(), subject, self.key, ca=True)
        else:
            self.cert = issuer._build(subject, self.key.public_key(), issuer.cert.subject, issuer.key, ca=True)

    @staticmethod
    def _build(subject, public_key, issuer_name, signing_key, ca, san=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    def issue(self, csr_pem: bytes) -> x509.Certificate:
        csr = x509.load_pem_x509_csr(csr_pem)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return self._build(csr.subject, csr.public_key(), self.cert.subject, self.key, ca=False, san=san)

    def issue_for_key(self, public_key, names=("mx.example.org",)) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        return self._build(subject, public_key, self.cert.subject, self.key, ca=False,
                           san=x509.SubjectAlternativeName([x509.DNSName(n) for n in names]))

    def chain_pem(self, leaf: x509.Certificate) -> bytes:
        certs = [leaf, self.cert] + ([self.issuer.cert] if self.issuer else [])
        return pem(*certs)


def pem(*certs) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
