"""The signing process: the only process that holds the private keys.

The oracle's front process (network, peers, authentication, rate limits,
audit) never loads a private key, nor reads the keystore: it learns the
chains from this process (`certificates`) and hands it each sign request as
received; the process checks it against the signing policy with its own copy
of the certificate chain, and only then signs. A compromised front can ask
for nothing the policy would refuse, like Postfix's small processes, each
with the least it needs.

Deployed, systemd starts one per connection to the signer socket
(yestls-signer.socket, Accept=yes), as the signer's own user, with the
connection as its standard input; in tests and development the front spawns
it over a socketpair, as the front's own user (relay/oracle/signers.py).

It speaks the same frames as the tunnel (relay.rpc), blocking: read what is
there, answer every whole request, write the answers in one go. Methods:
`ping` -> the key ids, `certificates` -> the chains (public material only),
`sign` (TLS 1.3, relay/oracle/policy.py), `sign_tls12` (relay/oracle/policy12.py);
nothing else.

`certificates` re-reads the keystore first (SignerKeys.reload): chains
imported since, keys switched to by a rollover, keys that appeared. Keys
already held are not read again; a new key is read and checked against its
chain like at start. If the keystore cannot be read then (a chain file being
fixed by hand, permissions changed), the process says why on stderr and goes
on with the keys it holds: a broken import must not take signatures down.
A key that leaves the listing (retired by a rollover) is still signed with
for DROPPED_KEY_GRACE seconds, while the edges still present its chain.
So a new chain reaches the edge without a restart: the edge asks the front,
the front asks its signing processes (relay/oracle/signers.py). They read
the keystore one after the other, so a renewal can land between two reads:
a process whose chain is not the one a transcript presents re-reads the
keystore and checks again (MISMATCH_RELOAD_SPACING), instead of failing the
edge's handshakes until the next listing. And the other way round: after a
renewal, the chain it replaced is still signed for (the same key) for
DROPPED_KEY_GRACE seconds, since an edge that has not refreshed yet (another
edge's listing made this process read the renewal) still presents it.

    python -m relay.oracle.signer --keystore DIR --fd N     (N = 0 under systemd)
"""

import argparse
import socket
import sys
import time
from pathlib import Path

from relay.oracle import policy, policy12
from relay.oracle.keystore import Keystore, KeystoreError, PrivateEntry
from relay.oracle.protocol import DROPPED_KEY_GRACE, certificate_listing
from relay.rpc import Code, Frame, FrameDecoder, FrameError, Kind, encode_frame
from relay.tls import signing

MAX_FRAME = 1 << 20  # the front already capped what the peer sent
# The front lists a key's chain once every signing process holds the key, and they re-read the keystore one
# after the other: a renewal imported between two of those reads leaves this process with the old chain for
# a key whose new chain an edge now presents. Such a Certificate is refused as a mismatch unless a re-read
# finds it: this process re-reads the keystore then, at most this often (seconds).
MISMATCH_RELOAD_SPACING = 1.0


class SignerKeys:
    """The served keys of one keystore, re-read on demand, and those dropped from it lately."""

    def __init__(self, keystore: Keystore):
        self.keystore = keystore
        self.by_id: dict[str, PrivateEntry] = {}
        self.dropped: dict[str, tuple[PrivateEntry, float]] = {}   # key id -> (entry, signed with until)
        self.replaced: dict[str, tuple[PrivateEntry, float]] = {}  # key id -> (its entry with the chain it had)
        self.mismatch_reload_at = -MISMATCH_RELOAD_SPACING   # monotonic time of the last reload_for_mismatch

    def reload(self) -> None:
        """Read the keystore again; KeystoreError (the keys held are kept) if it is not usable."""
        self.keystore.check_permissions()
        entries = self.keystore.private_entries(loaded=self.by_id)
        now = time.monotonic()
        served = {entry.key_id: entry for entry in entries}
        for key_id, entry in self.by_id.items():
            if key_id not in served:
                self.dropped[key_id] = (entry, now + DROPPED_KEY_GRACE)
            elif served[key_id].chain.der_chain != entry.chain.der_chain:   # renewed: edges still present it
                self.replaced[key_id] = (entry, now + DROPPED_KEY_GRACE)
        self.dropped = {k: v for k, v in self.dropped.items() if k not in served and v[1] > now}
        self.replaced = {k: v for k, v in self.replaced.items() if v[1] > now}
        self.by_id = served

    def reload_for_mismatch(self, now: float) -> bool:
        """Re-read the keystore because a transcript's Certificate was not the chain held for its key; at
        most once per MISMATCH_RELOAD_SPACING seconds (a peer cannot make every request read the disk).
        True if it was read."""
        if now - self.mismatch_reload_at < MISMATCH_RELOAD_SPACING:
            return False
        self.mismatch_reload_at = now
        return self.reload_or_keep()

    def reload_or_keep(self) -> bool:
        """reload(); if the keystore cannot be read, say why on stderr and keep the keys held (False)."""
        try:
            self.reload()
        except KeystoreError as error:
            print(f"yestls signer: keeping the {len(self.by_id)} key(s) held: {error}", file=sys.stderr)
            return False
        return True

    def for_signing(self, key_id) -> PrivateEntry | None:
        """A served key, or one dropped less than DROPPED_KEY_GRACE ago."""
        if key_id in self.by_id:
            return self.by_id[key_id]
        entry, until = self.dropped.get(key_id, (None, 0.0))
        return entry if until > time.monotonic() else None

    def chains_for_signing(self, key_id) -> list[PrivateEntry]:
        """for_signing's entry, then the same key with the chain a renewal replaced less than DROPPED_KEY_GRACE
        ago: an edge presents the chain of its last listing until its next refresh (every 60 s), and another
        edge's listing is what made this process read the renewal."""
        entry = self.for_signing(key_id)
        if entry is None:
            return []
        before, until = self.replaced.get(key_id, (None, 0.0))
        return [entry] + ([before] if before is not None and until > time.monotonic() else [])


def answer(frame: Frame, keys: SignerKeys) -> bytes:
    method = frame.meta.get("method")
    if method == "ping":
        return encode_frame(Kind.RESPONSE, frame.id, {"keys": sorted(keys.by_id)})
    if method == "certificates":
        keys.reload_or_keep()
        return encode_frame(Kind.RESPONSE, frame.id, {"certificates": certificate_listing(keys.by_id.values())})
    if method not in ("sign", "sign_tls12"):
        return _error(frame.id, Code.UNKNOWN_METHOD, f"no method {method!r}")
    entries = keys.chains_for_signing(frame.meta.get("key_id"))
    scheme = frame.meta.get("scheme")
    if not entries:
        return _error(frame.id, "unknown_key", "no key with that id in the keystore")
    if not isinstance(scheme, int):
        return _error(frame.id, Code.BAD_REQUEST, "scheme must be an integer")
    try:
        try:
            approved, facts, entry = _approve_any(method, frame, scheme, entries)
        except policy.Refusal as refusal:
            # A renewed chain another signing process listed first (MISMATCH_RELOAD_SPACING): read it and
            # check again, once.
            if refusal.code != policy.CERTIFICATE_MISMATCH or not keys.reload_for_mismatch(time.monotonic()):
                raise
            approved, facts, entry = _approve_any(method, frame, scheme,
                                                  keys.chains_for_signing(frame.meta.get("key_id")) or entries)
    except policy.Refusal as refusal:
        return _error(frame.id, refusal.code, str(refusal), refusal.facts)
    signature = signing.sign(entry.private_key, approved.scheme, approved.content)
    facts.update(server_name=approved.server_name, client_random=approved.client_random.hex(),
                 cipher_suite=approved.cipher_suite)
    return encode_frame(Kind.RESPONSE, frame.id, facts, signature)


def _approve_any(method: str, frame: Frame, scheme: int, entries: list[PrivateEntry]) -> tuple:
    """_approve for the first of a key's entries (its chains) that is the chain the transcript presents, and
    that entry; the first refusal if none is."""
    refusal = None
    for entry in entries:
        try:
            return (*_approve(method, frame, scheme, entry), entry)
        except policy.Refusal as error:
            if error.code != policy.CERTIFICATE_MISMATCH:
                raise
            refusal = refusal or error
    raise refusal


def _approve(method: str, frame: Frame, scheme: int, entry: PrivateEntry) -> tuple:
    """The policy's approval of a sign request for `entry`'s chain, and the facts the answer reports."""
    if method == "sign":
        approved = policy.check_certificate_verify(frame.tail, scheme, entry.chain)
        return approved, {"version": "TLSv1.3", "transcript_hash": approved.transcript_hash.hex()}
    approved = policy12.check_server_key_exchange(
        frame.tail, scheme, entry.chain, frame.meta.get("cipher_suite"), _nonce(frame.meta), time.time())
    return approved, {"version": "TLSv1.2", "server_random": approved.server_random.hex(),
                      "group": approved.group.name.lower()}


def _nonce(meta: dict) -> bytes | None:
    """`sign_tls12`'s nonce, sent as hex; None (refused by the policy) when it is not hex."""
    try:
        return bytes.fromhex(meta.get("nonce"))
    except (TypeError, ValueError):
        return None


def _error(frame_id: int, code: str, message: str, facts: dict | None = None) -> bytes:
    return encode_frame(Kind.ERROR, frame_id, {"code": code, "message": message, **(facts or {})})


def serve(sock: socket.socket, keys: SignerKeys) -> None:
    decoder = FrameDecoder(MAX_FRAME)
    while True:
        data = sock.recv(1 << 18)
        if not data:
            return  # the front closed: it is shutting down
        try:
            frames = decoder.feed(data)
        except FrameError as error:
            print(f"yestls signer: front broke framing ({error}); exiting", file=sys.stderr)
            return
        answers = [answer(frame, keys) for frame in frames if frame.kind == Kind.REQUEST]
        if answers:
            sock.sendall(b"".join(answers))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay.oracle.signer")
    parser.add_argument("--keystore", required=True)
    parser.add_argument("--fd", type=int, required=True,
                        help="the connection to the front: a socketpair end it passed, or 0 (systemd's socket)")
    args = parser.parse_args(argv)
    keys = SignerKeys(Keystore(Path(args.keystore)))
    try:
        keys.reload()
    except KeystoreError as error:
        print(f"yestls signer: {error}", file=sys.stderr)
        return 2
    with socket.socket(fileno=args.fd) as sock:
        serve(sock, keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
