"""What both ends of an oracle connection agree on, beyond relay.rpc's frames.

Methods: `ping`, `hello`, `auth` (relay.tunnel's identity proof), then
`certificates` -> the chains, key ids and schemes; `sign` {"key_id",
"scheme"} + the handshake messages as the frame tail -> the signature as the
tail. docs/rpc.md has the details. The front asks its signing processes the
same `certificates` and `sign` (relay/oracle/signer.py), over a socketpair or
the signer socket, with no hello or auth: only the front can connect there.
"""

import base64
import binascii

from cryptography import x509

from relay import tunnel
from relay.oracle.keystore import PublicEntry, key_id, key_type_of
from relay.tls import CertificateChain

SERVICE = "oracle"
# A key dropped from the listing (retired by `yestls keys rollover --switch`) is still signed with for this
# long, by the front and by each signing process that held it: an edge presents the chains of its last
# listing until its next refresh (every 60 s), and its handshakes must not fail meanwhile. Restart the
# oracle to stop using a dropped key at once (a compromised key).
DROPPED_KEY_GRACE = 600.0
# A handshake up to Certificate is a few KiB; chains stay well below this.
MAX_FRAME = 256 * 1024


def auth_message(challenge: bytes, server_address: tuple, client_address: tuple) -> bytes:
    """The identity proof's signed bytes for the oracle service."""
    return tunnel.auth_message(SERVICE, challenge, server_address, client_address)


def certificate_listing(entries) -> list[dict]:
    """`certificates`' answer: for each key (a PublicEntry or PrivateEntry), public material only."""
    return [{"key_id": e.key_id, "key_type": e.key_type, "schemes": [int(s) for s in e.chain.schemes],
             "chain": [base64.b64encode(der).decode() for der in e.chain.der_chain]}
            for e in entries]


def parse_certificate_listing(listing) -> list[PublicEntry]:
    """A `certificates` answer read back, each chain parsed and its key id checked against its leaf.

    ValueError says what is wrong."""
    if not isinstance(listing, list):
        raise ValueError("certificates is not a list")
    entries = []
    for item in listing:
        if not isinstance(item, dict) or not isinstance(item.get("chain"), list) or not item["chain"]:
            raise ValueError("a certificates entry has no chain")
        try:
            certs = [x509.load_der_x509_certificate(base64.b64decode(der, validate=True)) for der in item["chain"]]
        except (TypeError, binascii.Error) as error:
            raise ValueError(f"a chain is not base64 DER ({error})") from None
        chain = CertificateChain.from_certificates(certs)
        leaf_id = key_id(chain.public_key)
        if item.get("key_id") != leaf_id:
            raise ValueError(f"key id {item.get('key_id')!r} is not that of its leaf certificate ({leaf_id})")
        key_type = key_type_of(chain.public_key)
        if key_type is None or item.get("key_type") != key_type:
            raise ValueError(f"key {leaf_id}: key type {item.get('key_type')!r} is not its leaf's")
        entries.append(PublicEntry(leaf_id, key_type, chain))
    return entries
