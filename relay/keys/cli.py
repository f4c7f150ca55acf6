"""`yestls keys ...`: make keys and CSRs in the home keystore, import issued chains, list them, roll a key
over; make the identity keys and home's spool key.

Run these as the user the keystore belongs to (yestls-signer: the signing
processes'), or, for identity-new and spool-new, the service that uses the
key: the files they write are readable by that user only.

    keys new        a new key and its CSR (the first key for some names)
    keys csr        a new CSR for an existing key: renewals reuse the key, so TLSA 3 1 1 stays valid
    keys rollover   the next key (same type and names), not served; --switch serves it, retiring the old
    keys import     a chain issued for any key in the keystore
    keys list       every key: id, type, names, role, expiry
"""

import argparse
import sys
from pathlib import Path

from cryptography import x509

from relay.identity import IdentityError, generate_identity
from relay.oracle.keystore import DEFAULT_KEY_TYPE, KEY_TYPES, KeyRole, Keystore, KeystoreError, key_type_of
from relay.spool.keys import DEFAULT_SUITE, SUITES, SpoolKeyError, generate_spool_key


def add_parsers(subparsers) -> None:
    keys = subparsers.add_parser(
        "keys", help="manage the oracle's keystore and the edge's identity key",
        description="Make TLS keys and CSRs in the home keystore, import issued chains, list them; "
                    "make the edge's identity key.",
    )
    commands = keys.add_subparsers(dest="keys_command", required=True)

    new = commands.add_parser("new", help="make a private key in the keystore and a CSR for it",
                              description="Make a private key in the keystore and print its id; write a CSR "
                                          "for the names (to --csr-out, or stdout with the id on stderr).")
    new.add_argument("--keystore", type=Path, required=True, help="keystore directory (made 0700 if missing)")
    new.add_argument("--name", action="append", required=True, dest="names", metavar="NAME",
                     help="DNS name for the certificate, lower case, '*.' allowed (repeatable; the first is the CN)")
    new.add_argument("--type", default=DEFAULT_KEY_TYPE, choices=KEY_TYPES, dest="key_type",
                     help="key type (default %(default)s)")
    new.add_argument("--csr-out", type=Path, metavar="FILE", help="write the CSR here instead of stdout")

    csr = commands.add_parser("csr", help="a new CSR for an existing key (renewal with the same key)",
                              description="Write a CSR for a key already in the keystore, for the names given: "
                                          "renewing with the same key keeps DANE TLSA 3 1 1 records valid. Opens "
                                          "the private key: run as the keystore's user.")
    csr.add_argument("--keystore", type=Path, required=True, help="keystore directory")
    csr.add_argument("--key-id", required=True, help="the key's id (`yestls keys list`)")
    csr.add_argument("--name", action="append", required=True, dest="names", metavar="NAME",
                     help="DNS name for the certificate (repeatable; the first is the CN)")
    csr.add_argument("--csr-out", type=Path, metavar="FILE", help="write the CSR here instead of stdout")

    rollover = commands.add_parser(
        "rollover", help="make the next key for a current one, or --switch to it",
        description="Without --switch: make the next key (same type and names as the current one), not served; "
                    "print its id and write its CSR (an existing next key is reused). Publish its TLSA record, "
                    "get its chain imported, wait two TTLs, then --switch: the next key is served, the old one "
                    "retired (kept, never served).")
    rollover.add_argument("--keystore", type=Path, required=True, help="keystore directory")
    rollover.add_argument("--key-id", help="the current key to replace (with --switch: the next key to serve); "
                                           "needed only when there are several")
    rollover.add_argument("--switch", action="store_true", help="serve the next key, retire the one it replaces")
    rollover.add_argument("--csr-out", type=Path, metavar="FILE",
                          help="write the next key's CSR here instead of stdout")

    imp = commands.add_parser("import", help="add an issued certificate chain to its key",
                              description="Store a chain (PEM, leaf first) next to the keystore key it was "
                                          "issued for.")
    imp.add_argument("--keystore", type=Path, required=True, help="keystore directory")
    imp.add_argument("chain", type=Path, metavar="CHAIN.pem", help="the issued chain, leaf first")

    listing = commands.add_parser("list", help="list the keystore's keys",
                                  description="One line per key: id, type, names, role (current: served; next: "
                                              "made by rollover, not served yet; retired), and expiry or "
                                              "'awaiting certificate'. Opens no private key.")
    listing.add_argument("--keystore", type=Path, required=True, help="keystore directory")

    identity = commands.add_parser("identity-new", help="make the edge's identity key",
                                   description="Make the edge's Ed25519 identity key (mode 0600, never "
                                               "overwritten) and print the public key line for the oracle's "
                                               "allowlist.")
    identity.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the key")

    spool = commands.add_parser("spool-new", help="make home's spool key pair (run at home, as the intake's user)",
                                description="Make the home spool key (the edge seals every message to it; mode "
                                            "0600, never overwritten) and print the public key line for the "
                                            "edge's [spool] public_key.")
    spool.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the private key")
    spool.add_argument("--suite", default=DEFAULT_SUITE, choices=SUITES,
                       help="HPKE KEM: the hybrid post-quantum default, or x25519 (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    commands = {"new": _new, "csr": _csr, "rollover": _rollover, "import": _import, "list": _list,
                "identity-new": _identity_new, "spool-new": _spool_new}
    try:
        commands[args.keys_command](args)
    except (KeystoreError, IdentityError, SpoolKeyError) as error:
        print(f"yestls keys {args.keys_command}: {error}", file=sys.stderr)
        return 2
    return 0


def _new(args) -> None:
    keystore = Keystore(args.keystore)
    key_id, csr_pem = keystore.new_key(args.key_type, args.names)
    _put_csr(args.csr_out, keystore, key_id, csr_pem)


def _csr(args) -> None:
    keystore = Keystore(args.keystore)
    _put_csr(args.csr_out, keystore, args.key_id, keystore.csr(args.key_id, args.names))


def _rollover(args) -> None:
    keystore = Keystore(args.keystore)
    if args.switch:
        if args.csr_out is not None:
            raise KeystoreError("--csr-out goes with making the next key, not with --switch")
        retired, current = keystore.switch(args.key_id)
        print(f"current {current}\nretired {retired}")
        return
    next_id, csr_pem, made = keystore.rollover(args.key_id)
    if not made:
        print(f"key {next_id} is already the next key; its CSR again", file=sys.stderr)
    _put_csr(args.csr_out, keystore, next_id, csr_pem)


def _put_csr(csr_out: Path | None, keystore: Keystore, key_id: str, csr_pem: bytes) -> None:
    """The CSR to `csr_out` and the key id to stdout; or, without it, the CSR alone to stdout, the id to stderr."""
    if csr_out is None:
        # stdout is the CSR alone, so `> mx.csr` gives a clean file; the id goes beside it.
        print(f"key {key_id}", file=sys.stderr)
        sys.stdout.write(csr_pem.decode("ascii"))
        return
    try:
        csr_out.write_bytes(csr_pem)
    except OSError as error:
        raise KeystoreError(f"cannot write {csr_out} ({error.strerror}); the CSR for key {key_id} is also "
                            f"in {keystore.csr_path(key_id)}") from None
    print(key_id)


def _import(args) -> None:
    try:
        chain_pem = args.chain.read_bytes()
    except OSError as error:
        raise KeystoreError(f"cannot read {args.chain} ({error.strerror}); pass the chain file the CA "
                            f"issued") from None
    keystore = Keystore(args.keystore)
    key_id = keystore.import_chain(chain_pem, source=str(args.chain))
    print(f"{key_id}  {','.join(sorted(keystore.public_entry(key_id).chain.names))}")


def _list(args) -> None:
    keystore = Keystore(args.keystore)
    if not keystore.directory.is_dir():
        raise KeystoreError(f"keystore {keystore.directory} does not exist; make a key with "
                            f"`yestls keys new --keystore {keystore.directory} --name NAME`")
    roles = keystore.roles()
    lines = []
    for entry in keystore.public_entries(roles=tuple(KeyRole)):
        expiry = entry.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        lines.append((entry.key_id, entry.key_type, ",".join(sorted(entry.chain.names)), roles[entry.key_id],
                      f"not-after {expiry}"))
    for key_id in keystore.pending():
        key_type, names = _requested(keystore, key_id)
        lines.append((key_id, key_type, names, roles[key_id], "awaiting certificate"))
    for line in sorted(lines):
        print("  ".join(line))


def _requested(keystore: Keystore, key_id: str) -> tuple[str, str]:
    """Type and names of a key still without a chain, from its CSR (so no private key is opened)."""
    try:
        csr = keystore.request(key_id)
    except KeystoreError:
        return "?", "(no CSR)"
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = ",".join(sorted(san.get_values_for_type(x509.DNSName)))
    except x509.ExtensionNotFound:
        names = "?"
    return key_type_of(csr.public_key()) or "?", names


def _identity_new(args) -> None:
    print(generate_identity(args.out))


def _spool_new(args) -> None:
    print(generate_spool_key(args.out, args.suite))
