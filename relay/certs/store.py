"""Certificate directories under the ACME state directory, their state.json, and when each is due.

    state_dir/
        account.key.pem                 the ACME account key (P-256, 0600, made once, never overwritten)
        certificates/<label>/
            csr.pem                     put there by the deployment (`yestls keys csr`); the names come from it
            chain.pem                   written here, atomically, leaf first, only after a successful order
            state.json                  written here after every attempt (below)

state.json (`CertificateState`): not_after and serial of chain.pem's leaf, last_success,
last_attempt, last_error, failures (consecutive), next_attempt (when `renew` acts next:
the renewal time, or the end of the backoff after a failure), renew_after (the renewal
time: the CA's ARI window when it has one, else two thirds into the leaf's lifetime).

When a certificate is due (`due`): no usable chain.pem, a chain for another key or other
names than the CSR's (a rollover, a name added), past renew_after, or --force. After a
failure, nothing is tried before next_attempt (1 h, doubling to 1 day) unless --force; a
failure never touches chain.pem. Nothing here talks to the network: `yestls status` reads it.
"""

import datetime
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.private_files import write_atomically

CERTIFICATES = "certificates"
CSR_FILE, CHAIN_FILE, STATE_FILE = "csr.pem", "chain.pem", "state.json"
RENEW_FRACTION = 2 / 3
BACKOFF_FIRST = datetime.timedelta(hours=1)
BACKOFF_MAX = datetime.timedelta(days=1)
_LABEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class CertificateError(Exception):
    """What went wrong with one certificate, worded as what to fix."""


def iso(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text) -> datetime.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None


def backoff(failures: int) -> datetime.timedelta:
    """How long to wait after `failures` consecutive failures: 1 h, 2 h, 4 h ... at most 1 day."""
    return min(BACKOFF_FIRST * 2 ** max(failures - 1, 0), BACKOFF_MAX)


def renewal_time(leaf: x509.Certificate) -> datetime.datetime:
    """Two thirds into the leaf's lifetime (what Let's Encrypt advises without ARI)."""
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    return start + (end - start) * RENEW_FRACTION


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def dns_names(extensions: x509.Extensions) -> list[str]:
    try:
        return extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        return []


@dataclass
class CertificateState:
    not_after: str | None = None
    serial: str | None = None
    last_success: str | None = None
    last_attempt: str | None = None
    last_error: str | None = None
    failures: int = 0
    next_attempt: str | None = None
    renew_after: str | None = None

    @classmethod
    def from_json(cls, data) -> "CertificateState":
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        state = cls(**{f.name: data.get(f.name) for f in fields(cls) if f.name in data})
        if not isinstance(state.failures, int) or isinstance(state.failures, bool) or state.failures < 0:
            raise ValueError("failures is not a count")
        return state


class CertificateDir:
    """One certificate: state_dir/certificates/<label>/."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.label = self.directory.name

    @property
    def csr_path(self) -> Path:
        return self.directory / CSR_FILE

    @property
    def chain_path(self) -> Path:
        return self.directory / CHAIN_FILE

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def csr(self) -> tuple[bytes, x509.CertificateSigningRequest]:
        """The CSR (PEM and parsed), checked: signed, naming at least one DNS name."""
        try:
            pem = self.csr_path.read_bytes()
        except FileNotFoundError:
            raise CertificateError(f"CSR missing: put the CSR for {self.label} at {self.csr_path} (at home, as the "
                                   f"keystore's user: yestls keys csr --keystore DIR --key-id ID --name NAME "
                                   f"--csr-out FILE)") from None
        except OSError as error:
            raise CertificateError(f"cannot read {self.csr_path} ({error.strerror}); it must be readable by the "
                                   f"ACME user") from None
        try:
            csr = x509.load_pem_x509_csr(pem)
        except ValueError:
            raise CertificateError(f"{self.csr_path} is not a PEM CSR; write it again with `yestls keys csr`") from None
        if not csr.is_signature_valid:
            raise CertificateError(f"{self.csr_path} has a bad signature; write it again with `yestls keys csr`")
        if not dns_names(csr.extensions):
            raise CertificateError(f"{self.csr_path} names no DNS name (subjectAltName); write it again with "
                                   f"`yestls keys csr ... --name NAME`")
        return pem, csr

    def leaf(self) -> x509.Certificate | None:
        """chain.pem's leaf, or None when there is no usable chain.pem."""
        try:
            return x509.load_pem_x509_certificates(self.chain_path.read_bytes())[0]
        except (OSError, ValueError):
            return None

    def state(self) -> CertificateState:
        try:
            return CertificateState.from_json(json.loads(self.state_path.read_bytes()))
        except FileNotFoundError:
            return CertificateState()
        except (OSError, ValueError) as error:
            raise CertificateError(f"{self.state_path} cannot be read ({error}); remove it (renew starts afresh)") \
                from None

    def save_state(self, state: CertificateState) -> None:
        write_atomically(self.state_path, json.dumps(asdict(state), indent=2).encode() + b"\n")

    def save_chain(self, chain_pem: bytes) -> None:
        write_atomically(self.chain_path, chain_pem)

    def why_due(self, csr: x509.CertificateSigningRequest, leaf: x509.Certificate | None,
                renew_after: datetime.datetime | None, now: datetime.datetime) -> str | None:
        """Why the certificate must be ordered now, or None if it need not be."""
        if leaf is None:
            return f"no chain at {self.chain_path}"
        if spki(leaf.public_key()) != spki(csr.public_key()):
            return "chain.pem is for another key than the CSR (a rollover?)"
        if sorted(dns_names(leaf.extensions)) != sorted(dns_names(csr.extensions)):
            return "chain.pem names other names than the CSR"
        if leaf.not_valid_after_utc <= now:
            return f"chain.pem expired {iso(leaf.not_valid_after_utc)}"
        if renew_after is not None and renew_after <= now:
            return f"past its renewal time {iso(renew_after)}"
        return None


def certificate_dirs(state_dir: Path, label: str | None = None) -> list[CertificateDir]:
    """The certificates under state_dir, sorted by label (only `label` if given)."""
    root = Path(state_dir) / CERTIFICATES
    if label is not None:
        if not _LABEL.fullmatch(label):
            raise CertificateError(f"{label!r} is not a certificate label (lower-case letters, digits, '.', '-', "
                                   f"'_'; a directory under {root})")
        if not (root / label).is_dir():
            raise CertificateError(f"no certificate {label!r}: make {root / label} and put its csr.pem there")
        return [CertificateDir(root / label)]
    try:
        return [CertificateDir(p) for p in sorted(root.iterdir()) if p.is_dir() and _LABEL.fullmatch(p.name)]
    except FileNotFoundError:
        return []
