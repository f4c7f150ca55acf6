"""The home keystore: the oracle's private keys and their certificate chains.

One directory, readable by the signing processes' user only, three files per key
and one for the keystore:

    <key_id>.key.pem     PKCS#8 PEM private key (mode 0600, never leaves home)
    <key_id>.csr.pem     the latest request made for it (`yestls keys new`, `csr`, `rollover`)
    <key_id>.chain.pem   the issued chain, leaf first (`yestls keys import`)
    rollover.json        which keys are the next ones and which are retired

A key id is derived from the public key alone, so the network-facing process
can name keys from their certificates without ever opening a key file, and a
chain file cannot silently be paired with the wrong key.

Key roles (KeyRole), for rollover with DANE: a key is `current` (served: its
chain goes to the edge), `next` (made by `yestls keys rollover` to replace a
current key of the same type and names; its TLSA record is published first,
its chain may be imported, it is not served) or `retired` (replaced by
`rollover --switch`; kept, never served). rollover.json records only the
exceptions, `{"version": 1, "next": {NEXT_ID: CURRENT_ID}, "retired": [ID]}`,
so a keystore without it (or a key not named in it) is all current: keys made
before rollover existed, and a second key type for the same names, are served
as they always were. It is replaced whole (relay.private_files.write_atomically),
and rollover writes it before the next key's file, so a crash leaves at worst
a `next` entry without a key, which roles() ignores and rollover replaces.

Renewal reuses the key (`yestls keys csr`: a new CSR for an existing key), so
a published `TLSA 3 1 1` (the SPKI's SHA-256, `tlsa_records`) stays valid
across renewals; only a rollover changes it, and it is published before.
"""

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from relay.private_files import create_private_file, fsync_directory, write_atomically
from relay.tls import CertificateChain

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")
DEFAULT_KEY_TYPE = "ecdsa-p256"
SUPPORTED = "ECDSA P-256/P-384, RSA 2048-4096 or Ed25519"

_KEY_ID = re.compile(r"[0-9a-f]{32}")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_EC_TYPES = {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}


STATE_FILE = "rollover.json"


class KeystoreError(Exception):
    """A keystore problem; the message names the file, what is wrong and the fix."""


class KeyRole(StrEnum):
    """What a key is for now (module docstring): only current keys are served."""

    CURRENT = "current"
    NEXT = "next"
    RETIRED = "retired"


class TlsaRecord(NamedTuple):
    """One `TLSA 3 1 1` value: a key's names, its role (current or next) and its SPKI's SHA-256 in hex."""

    names: tuple[str, ...]
    role: KeyRole
    sha256: str


@dataclass(frozen=True)
class RolloverState:
    next: dict[str, str]      # next key id -> the current key id it replaces
    retired: frozenset[str]


def key_id(public_key) -> str:
    """First 16 bytes of SHA-256 over the SubjectPublicKeyInfo DER, in hex."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()[:16].hex()


def key_type_of(public_key) -> str | None:
    """The KEY_TYPES-style name of a key the oracle signs with, or None if it does not."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _EC_TYPES.get(public_key.curve.name)
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa-{public_key.key_size}" if 2048 <= public_key.key_size <= 4096 else None
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return None


def spki_sha256(public_key) -> str:
    """SHA-256 over the SubjectPublicKeyInfo DER, in hex: the data of a `TLSA 3 1 1` record."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def tlsa_records(keystore_dir: Path) -> list[TlsaRecord]:
    """The TLSA 3 1 1 values to publish for the keystore at `keystore_dir`: each current and each next key's.

    From chain and CSR files only (no private key is opened), sorted by names, current before next.
    Publish the next key's record beside the current one's at least two TTLs before
    `yestls keys rollover --switch`; drop the old one after the switch. Raises KeystoreError.
    """
    keystore = Keystore(keystore_dir)
    roles = keystore.roles()
    records = []
    for key_id_, role in roles.items():
        if role is KeyRole.RETIRED:
            continue
        public_key = keystore.public_key(key_id_)
        records.append(TlsaRecord(keystore.names_of(key_id_), role, spki_sha256(public_key)))
    order = {KeyRole.CURRENT: 0, KeyRole.NEXT: 1}
    return sorted(records, key=lambda r: (r.names, order[r.role], r.sha256))


def _describe(public_key) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"an ECDSA {public_key.curve.name} key"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"an RSA {public_key.key_size}-bit key"
    return f"a {type(public_key).__name__.removeprefix('_')} key"


@dataclass(frozen=True)
class PublicEntry:
    key_id: str
    key_type: str
    chain: CertificateChain

    @property
    def not_after(self):
        """The leaf certificate's expiry (an aware UTC datetime)."""
        return self.chain.not_after()


@dataclass(frozen=True)
class PrivateEntry:
    key_id: str
    key_type: str
    chain: CertificateChain
    private_key: object


class Keystore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def key_path(self, key_id: str) -> Path:
        return self.directory / f"{key_id}.key.pem"

    def csr_path(self, key_id: str) -> Path:
        return self.directory / f"{key_id}.csr.pem"

    def chain_path(self, key_id: str) -> Path:
        return self.directory / f"{key_id}.chain.pem"

    # --- permissions -------------------------------------------------------

    def check_permissions(self, owner_uid: int | None = None) -> None:
        """Refuse a keystore anyone but its owner could read or replace keys in."""
        owner_uid = os.getuid() if owner_uid is None else owner_uid
        self._check_directory(owner_uid)
        for path in sorted(self.directory.glob("*.key.pem")):
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                # A link could point anywhere, and its target's permissions are not ours to vouch for.
                raise KeystoreError(f"keystore {path} is a symbolic link: a private key must be a regular file "
                                    f"in the keystore; replace the link with the file it points to")
            if not stat.S_ISREG(st.st_mode):
                raise KeystoreError(f"keystore {path} is not a regular file; remove it from the keystore")
            mode = stat.S_IMODE(st.st_mode)
            if mode not in (0o600, 0o400):
                raise KeystoreError(f"keystore {path} has mode {mode:04o}: a private key must be readable "
                                    f"by its owner only; run chmod 600 {path}")
            if st.st_uid != owner_uid:
                raise KeystoreError(f"keystore {path} is owned by uid {st.st_uid}, not uid {owner_uid} "
                                    f"that runs the oracle; run chown {owner_uid} {path}")

    def _check_directory(self, owner_uid: int) -> None:
        try:
            st = os.stat(self.directory)
        except FileNotFoundError:
            raise KeystoreError(f"keystore {self.directory} does not exist; make a key with "
                                f"`yestls keys new --keystore {self.directory} --name NAME`") from None
        if not stat.S_ISDIR(st.st_mode):
            raise KeystoreError(f"keystore {self.directory} is not a directory; point --keystore at the "
                                f"keystore directory")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise KeystoreError(f"keystore {self.directory} has mode {mode:04o}: the keystore directory must be "
                                f"accessible by its owner only; run chmod 700 {self.directory}")
        if st.st_uid != owner_uid:
            raise KeystoreError(f"keystore {self.directory} is owned by uid {st.st_uid}, not uid {owner_uid} "
                                f"that runs the oracle; run chown {owner_uid} {self.directory}")

    # --- reading -----------------------------------------------------------

    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def rollover_state(self) -> RolloverState:
        """rollover.json read and checked (empty when there is none)."""
        path = self.state_path()
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return RolloverState({}, frozenset())
        except (OSError, ValueError) as error:
            raise KeystoreError(f"keystore {path} cannot be read ({error}); restore it, or remove it to serve "
                                f"every key that has a chain") from None
        nexts, retired = data.get("next") if isinstance(data, dict) else None, data.get("retired", [])
        if (data.get("version") != 1 or not isinstance(nexts, dict) or not isinstance(retired, list)
                or not all(_KEY_ID.fullmatch(str(i)) for i in [*nexts, *nexts.values(), *retired])):
            raise KeystoreError(f'keystore {path} is not {{"version": 1, "next": {{ID: ID}}, "retired": [ID]}} '
                                f"with key ids; restore it, or remove it to serve every key that has a chain")
        return RolloverState(dict(nexts), frozenset(retired))

    def roles(self) -> dict[str, KeyRole]:
        """Every key in the keystore (a key file or a chain), by id, with its role."""
        state = self.rollover_state()
        ids = set(self._chain_ids()) | {p.name.removesuffix(".key.pem") for p in self.directory.glob("*.key.pem")}
        roles = {}
        for key_id_ in sorted(i for i in ids if _KEY_ID.fullmatch(i)):
            if key_id_ in state.retired:
                roles[key_id_] = KeyRole.RETIRED
            elif key_id_ in state.next:
                roles[key_id_] = KeyRole.NEXT
            else:
                roles[key_id_] = KeyRole.CURRENT
        return roles

    def public_entries(self, roles=(KeyRole.CURRENT,)) -> list[PublicEntry]:
        """Keys that have a chain, of the given roles (default: those served), from the chain files alone:
        no private key file is opened."""
        role_of = self.roles()
        return [self.public_entry(key_id) for key_id in self._chain_ids() if role_of[key_id] in roles]

    def public_entry(self, entry_id: str) -> PublicEntry:
        path = self.chain_path(entry_id)
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
            chain = CertificateChain.from_certificates(certs)
        except OSError as error:
            raise KeystoreError(f"keystore {path} cannot be read ({error.strerror}); "
                                f"import the chain again with `yestls keys import`") from None
        except (ValueError, UnsupportedAlgorithm) as error:
            raise KeystoreError(f"keystore {path} is not a usable certificate chain ({error}); "
                                f"import a valid chain with `yestls keys import`") from None
        leaf_id = key_id(chain.public_key)
        if leaf_id != entry_id:
            raise KeystoreError(f"keystore {path} holds the certificate of key {leaf_id}, not of key {entry_id}; "
                                f"remove it and import the chain with `yestls keys import`")
        key_type = key_type_of(chain.public_key)
        if key_type is None:
            raise KeystoreError(f"keystore {path} is for {_describe(chain.public_key)}, which the oracle does not "
                                f"sign with ({SUPPORTED}); remove it and make a new key with `yestls keys new`")
        return PublicEntry(entry_id, key_type, chain)

    def private_entries(self, loaded: dict | None = None) -> list[PrivateEntry]:
        """Every served key (current, with a chain), loaded for signing, each checked to be its chain's key.

        `loaded` (key id -> PrivateEntry) are keys read before: their key files are not read again, only
        their chains (a signing process re-reads the keystore each time the front asks for the chains)."""
        entries = []
        role_of = self.roles()
        for key_id in (i for i in self._chain_ids() if role_of[i] is KeyRole.CURRENT):
            path = self.key_path(key_id)
            previous = (loaded or {}).get(key_id)
            private_key = previous.private_key if previous is not None else self._load_private_key(path)
            public = self.public_entry(key_id)
            if not public.chain.is_key_of(private_key):
                raise KeystoreError(f"keystore {path} is not the key of the certificate in "
                                    f"{self.chain_path(key_id)}; restore the key made for it, or remove both "
                                    f"files and make a new key with `yestls keys new`")
            entries.append(PrivateEntry(key_id, public.key_type, public.chain, private_key))
        return entries

    def pending(self) -> list[str]:
        """Ids of keys that have no certificate chain yet (by file name; nothing is opened)."""
        chained = set(self._chain_ids())
        ids = (p.name.removesuffix(".key.pem") for p in self.directory.glob("*.key.pem"))
        return sorted(i for i in ids if _KEY_ID.fullmatch(i) and i not in chained)

    def public_key(self, key_id: str):
        """A key's public key, from its chain if it has one, else from its CSR (no private key is opened)."""
        if self.chain_path(key_id).exists():
            return self.public_entry(key_id).chain.public_key
        return self.request(key_id).public_key()

    def names_of(self, key_id: str) -> tuple[str, ...]:
        """A key's DNS names, sorted: its certificate's if it has one, else its CSR's."""
        if self.chain_path(key_id).exists():
            return tuple(sorted(self.public_entry(key_id).chain.names))
        try:
            san = self.request(key_id).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise KeystoreError(f"keystore {self.csr_path(key_id)} names no DNS name; make a new one with "
                                f"`yestls keys csr --key-id {key_id} --name NAME`") from None
        return tuple(sorted(san.get_values_for_type(x509.DNSName)))

    def key_type(self, key_id: str) -> str:
        """A key's type (KEY_TYPES), from its chain or its CSR."""
        public_key = self.public_key(key_id)
        found = key_type_of(public_key)
        if found is None:
            raise KeystoreError(f"keystore: key {key_id} is {_describe(public_key)}, which the oracle does not "
                                f"sign with ({SUPPORTED})")
        return found

    def request(self, key_id: str) -> x509.CertificateSigningRequest:
        """The CSR `new_key` wrote for `key_id`."""
        path = self.csr_path(key_id)
        try:
            return x509.load_pem_x509_csr(path.read_bytes())
        except (OSError, ValueError) as error:
            raise KeystoreError(f"keystore {path} is not a readable CSR ({error}); sign a new one with "
                                f"openssl req -new -key {self.key_path(key_id)}") from None

    def _chain_ids(self) -> list[str]:
        ids = []
        for path in sorted(self.directory.glob("*.chain.pem")):
            key_id = path.name.removesuffix(".chain.pem")
            if not _KEY_ID.fullmatch(key_id):
                raise KeystoreError(f"keystore {path} is not named <key id>.chain.pem; remove it and import "
                                    f"the chain with `yestls keys import`")
            ids.append(key_id)
        return ids

    def _load_private_key(self, path: Path):
        try:
            # O_NOFOLLOW: check_permissions refused links; do not follow one planted since.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise KeystoreError(f"keystore {path} is missing but its chain is there; restore the key, or remove "
                                f"{path.name.replace('.key.pem', '.chain.pem')} and make a new key") from None
        except OSError as error:
            raise KeystoreError(f"keystore {path} cannot be opened ({error.strerror}); it must be a regular "
                                f"file readable by the oracle's user") from None
        with os.fdopen(fd, "rb") as file:
            data = file.read()
        try:
            private_key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeystoreError(f"keystore {path} is not an unencrypted PEM private key; restore the key "
                                f"`yestls keys new` wrote, or make a new key") from None
        if key_type_of(private_key.public_key()) is None:
            raise KeystoreError(f"keystore {path} holds {_describe(private_key.public_key())}, which the oracle "
                                f"does not sign with ({SUPPORTED}); remove it and its chain and make a new key "
                                f"with `yestls keys new`")
        return private_key

    # --- writing -----------------------------------------------------------

    def new_key(self, key_type: str, names: list[str]) -> tuple[str, bytes]:
        """Make a private key in the keystore and a CSR for `names`; returns (key id, CSR PEM)."""
        if key_type not in KEY_TYPES:
            raise KeystoreError(f"keystore {self.directory}: unknown key type {key_type!r}; "
                                f"choose one of {', '.join(KEY_TYPES)}")
        names = self._check_names(names)
        self._make_directory()
        private_key = _generate(key_type)
        return self._store(private_key, names)

    def _store(self, private_key, names: list[str]) -> tuple[str, bytes]:
        """Write a new key and its CSR; returns (key id, CSR PEM)."""
        # Build the CSR before writing anything, so a failure leaves no stray key behind.
        csr_pem = _csr(private_key, names).public_bytes(serialization.Encoding.PEM)
        new_id = self._store_key(private_key)
        write_atomically(self.csr_path(new_id), csr_pem)
        return new_id, csr_pem

    def _store_key(self, private_key) -> str:
        key_pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        new_id = key_id(private_key.public_key())
        # Created 0600 with O_EXCL: never readable by others, never replacing a key.
        create_private_file(self.key_path(new_id), key_pem)
        return new_id

    def _store_csr(self, private_key, names: list[str]) -> bytes:
        csr_pem = _csr(private_key, names).public_bytes(serialization.Encoding.PEM)
        write_atomically(self.csr_path(key_id(private_key.public_key())), csr_pem)
        return csr_pem

    def csr(self, key_id_: str, names: list[str]) -> bytes:
        """A new CSR for the existing key `key_id_` and `names` (renewal with the same key, so TLSA 3 1 1 records
        stay valid); it also replaces the key's stored CSR. Opens the private key: run as the signer's user."""
        names = self._check_names(names)
        if not _KEY_ID.fullmatch(key_id_):
            raise KeystoreError(f"keystore {self.directory}: {key_id_!r} is not a key id (32 hex digits, as "
                                f"`yestls keys list` shows)")
        self._check_directory(os.getuid())
        if not self.key_path(key_id_).exists():
            raise KeystoreError(f"keystore {self.directory} has no key {key_id_}; `yestls keys list` shows the "
                                f"keys there")
        return self._store_csr(self._load_private_key(self.key_path(key_id_)), names)

    def rollover(self, current: str | None = None) -> tuple[str, bytes, bool]:
        """Make the next key for a current one (the only current key if `current` is None): same type and names,
        not served. Returns (next key id, its CSR, whether it was made now: an existing next key is returned)."""
        self._check_directory(os.getuid())
        current = self._only(KeyRole.CURRENT, current, "current", "--key-id")
        state = self.rollover_state()
        for next_id, replaces in state.next.items():
            if replaces == current and self.key_path(next_id).exists():
                return next_id, self.request(next_id).public_bytes(serialization.Encoding.PEM), False
        names, key_type = list(self.names_of(current)), self.key_type(current)
        private_key = _generate(key_type)
        next_id = key_id(private_key.public_key())
        nexts = {k: v for k, v in state.next.items() if v != current}  # a next whose key never got written
        self._write_state(RolloverState({**nexts, next_id: current}, state.retired))
        return *self._store(private_key, names), True

    def switch(self, next_id: str | None = None) -> tuple[str, str]:
        """Serve the next key instead of the key it replaces, which is retired (kept, not served).

        `next_id` may be None when there is one next key. Returns (retired id, now current id)."""
        self._check_directory(os.getuid())
        next_id = self._only(KeyRole.NEXT, next_id, "next", "--key-id")
        if not self.chain_path(next_id).exists():
            raise KeystoreError(f"keystore {self.directory}: the next key {next_id} has no certificate yet; "
                                f"have its CSR ({self.csr_path(next_id)}) signed and `yestls keys import` the "
                                f"chain before switching")
        self.public_entry(next_id)  # a readable chain of that key
        state = self.rollover_state()
        old = state.next[next_id]
        nexts = {k: v for k, v in state.next.items() if k != next_id}
        self._write_state(RolloverState(nexts, state.retired | {old}))
        return old, next_id

    def _only(self, role: KeyRole, chosen: str | None, what: str, option: str) -> str:
        ids = [i for i, r in self.roles().items() if r is role and self.key_path(i).exists()]
        if chosen is not None:
            if chosen not in ids:
                raise KeystoreError(f"keystore {self.directory}: {chosen} is not a {what} key here; {what} keys: "
                                    f"{', '.join(ids) or 'none'} (`yestls keys list`)")
            return chosen
        if len(ids) != 1:
            raise KeystoreError(f"keystore {self.directory} has {len(ids)} {what} keys "
                                f"({', '.join(ids) or 'none'}); name one with {option}")
        return ids[0]

    def _write_state(self, state: RolloverState) -> None:
        data = {"version": 1, "next": dict(sorted(state.next.items())), "retired": sorted(state.retired)}
        write_atomically(self.state_path(), json.dumps(data, indent=2).encode() + b"\n")

    def import_chain(self, chain_pem: bytes, source: str = "the imported chain") -> str:
        """Store an issued chain (leaf first) next to its key; returns the key id."""
        try:
            certs = x509.load_pem_x509_certificates(chain_pem)
        except ValueError:
            raise KeystoreError(f"{source} holds no PEM certificates; pass the chain the CA issued, "
                                f"leaf first") from None
        try:
            leaf_id = key_id(certs[0].public_key())
        except (ValueError, UnsupportedAlgorithm):
            raise KeystoreError(f"{source}: the leaf certificate's key is of a type the oracle does not sign with "
                                f"({SUPPORTED}); pass the chain issued for a `yestls keys new` key") from None
        if not self.key_path(leaf_id).exists():
            raise KeystoreError(f"{source}: keystore {self.directory} has no key {leaf_id} for its leaf "
                                f"certificate ({certs[0].subject.rfc4514_string()}); the key must have been made "
                                f"with `yestls keys new` in this keystore")
        _check_order(certs, source)
        try:
            CertificateChain.from_certificates(certs)
        except ValueError as error:
            raise KeystoreError(f"{source}: {error}") from None
        # Re-serialise only the certificates: a bundle may carry other PEM blocks (even a key).
        pem = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
        write_atomically(self.chain_path(leaf_id), pem)
        return leaf_id

    def _check_names(self, names: list[str]) -> list[str]:
        if not names:
            raise KeystoreError(f"keystore {self.directory}: a key needs at least one name; "
                                f"pass --name mx.example.org")
        for name in names:
            problem = _name_problem(name)
            if problem:
                raise KeystoreError(f"keystore {self.directory}: name {name!r} {problem}")
        return list(dict.fromkeys(names))

    def _make_directory(self) -> None:
        if self.directory.exists():
            self._check_directory(os.getuid())
            return
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self.directory.mkdir(mode=0o700)
        os.chmod(self.directory, 0o700)  # mkdir's mode is filtered by the umask
        fsync_directory(self.directory.parent)


def _name_problem(name: str) -> str | None:
    """Why `name` is not a lowercase DNS name (optionally "*."-prefixed), or None."""
    if not name.isascii():
        return "is not ASCII; use its A-label form (xn--...)"
    if name != name.lower():
        return f"must be lower case; use {name.lower()!r}"
    host = name.removeprefix("*.")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        return ("is not a DNS name: letters, digits and hyphens in dot-separated labels of 1-63 characters, "
                "optionally starting with '*.'")
    return None


def _generate(key_type: str):
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(65537, int(key_type.removeprefix("rsa-")))


def _csr(private_key, names: list[str]) -> x509.CertificateSigningRequest:
    # X.509 caps a CN at 64 characters; a longer first name goes in the SAN only, as CAs allow.
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, names[0])] if len(names[0]) <= 64 else []
    algorithm = None if isinstance(private_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(subject))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(private_key, algorithm)
    )


def _check_order(certs: list[x509.Certificate], source: str) -> None:
    """Each certificate must be issued, name and signature, by the next one."""
    for position, (cert, issuer) in enumerate(zip(certs, certs[1:]), start=1):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise KeystoreError(
                f"{source}: certificate {position} ({cert.subject.rfc4514_string()}) is not issued by "
                f"certificate {position + 1} ({issuer.subject.rfc4514_string()}); put the chain in order, "
                f"leaf first, each certificate followed by its issuer"
            ) from None
