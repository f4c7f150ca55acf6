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

and, for home's spool key (relay/spool/keys.py): spool-new makes it, export-spool --paper prints it as text
to copy by hand (relay/spool/paper.py), import-spool writes it back from that text. Those two take the key's
path from /etc/yestls/intake.toml's spool_key unless --key / --out name it.
"""

import argparse
import sys
from pathlib import Path

from cryptography import x509

from relay.config import ConfigError
from relay.home import config as intake_config
from relay.identity import IdentityError, generate_identity
from relay.oracle.keystore import DEFAULT_KEY_TYPE, KEY_TYPES, KeyRole, Keystore, KeystoreError, key_type_of
from relay.spool.keys import (
    DEFAULT_SUITE,
    SUITES,
    SpoolKeyError,
    generate_spool_key,
    load_spool_private_key,
    write_spool_key,
)
from relay.spool.paper import PaperError, fingerprint, paper_text, read_paper
from relay.status import CONFIG_DIRECTORY, default_config

INTAKE_CONFIG_DIRECTORY = CONFIG_DIRECTORY   # where intake.toml names the spool key
PAPER_INPUT_LIMIT = 64 * 1024   # characters of a typed paper copy; a real one has under 600


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

    export = commands.add_parser(
        "export-spool", help="print home's spool private key as a paper copy (run as the intake's user)",
        description="Print the spool private key as numbered lines of base32 with a check on each line and a "
                    "checksum, to print or copy by hand and keep safe; `yestls keys import-spool` types it "
                    "back. Whoever holds the paper can open home's mail.")
    export.add_argument("--paper", action="store_true", required=True,
                        help="the paper copy (the only form so far)")
    export.add_argument("--key", type=Path, metavar="FILE",
                        help=f"the spool key (default: spool_key in {INTAKE_CONFIG_DIRECTORY / 'intake.toml'})")

    restore = commands.add_parser(
        "import-spool", help="write home's spool key back from its paper copy, read on stdin",
        description="Read a paper copy made by `yestls keys export-spool --paper` on stdin (blank lines, "
                    "header lines, spaces and case do not matter), check every line and the checksum, write "
                    "the key file (mode 0600, never overwriting) and print its public key line to compare "
                    "with the edge's [spool] public_key.")
    restore.add_argument("--out", type=Path, metavar="FILE",
                         help=f"where to write the key (default: spool_key in "
                              f"{INTAKE_CONFIG_DIRECTORY / 'intake.toml'})")


def run(args: argparse.Namespace) -> int:
    commands = {"new": _new, "csr": _csr, "rollover": _rollover, "import": _import, "list": _list,
                "identity-new": _identity_new, "spool-new": _spool_new, "export-spool": _export_spool,
                "import-spool": _import_spool}
    try:
        commands[args.keys_command](args)
    except (KeystoreError, IdentityError, SpoolKeyError, PaperError, ConfigError) as error:
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


def _export_spool(args) -> None:
    key = load_spool_private_key(_spool_key_path(args.key, "--key"))
    print("yestls keys export-spool: this is home's spool PRIVATE key: whoever has it can open the mail sealed "
          "to home. Print it or copy it by hand, keep it safe, and clear this terminal.", file=sys.stderr)
    sys.stdout.write(paper_text(key))


def _import_spool(args) -> None:
    out = _spool_key_path(args.out, "--out")
    if sys.stdin.isatty():
        print("Type the paper's lines (the numbered ones and the checksum), then Ctrl-D:", file=sys.stderr)
    try:
        text = sys.stdin.read(PAPER_INPUT_LIMIT + 1)
    except UnicodeDecodeError:
        raise PaperError("stdin is not text: type the paper's lines, or pipe a text file") from None
    if len(text) > PAPER_INPUT_LIMIT:
        raise PaperError(f"more than {PAPER_INPUT_LIMIT} characters on stdin: not a paper copy")
    key = read_paper(text)
    write_spool_key(out, key)
    print(f"wrote {key.suite.name} spool key {out}, public key fingerprint {fingerprint(key.public_key)}; "
          f"its public key line, to compare with the edge's [spool] public_key:", file=sys.stderr)
    print(key.public_key.text)


def _spool_key_path(given: Path | None, option: str) -> Path:
    """`given`, or else the spool_key of this host's intake.toml; ConfigError naming the option when neither."""
    if given is not None:
        return given
    path = default_config("intake", INTAKE_CONFIG_DIRECTORY)
    if path is None:
        raise ConfigError(f"no {option} FILE given and no {INTAKE_CONFIG_DIRECTORY / 'intake.toml'} to take "
                          f"spool_key from: pass {option} FILE")
    try:
        return intake_config.load(path).spool_key
    except OSError as error:
        raise ConfigError(f"{path} cannot be read ({error.strerror}) for its spool_key: run as the intake's "
                          f"user, or pass {option} FILE") from None
    except ConfigError as error:
        raise ConfigError(f"{error} (read for its spool_key); fix it, or pass {option} FILE") from None
