"""New chains reach the edge without restarting the oracle or the edge.

The oracle and the edge run as processes; the test plays the operator at home,
changing the keystore under them: a renewed chain for the same key (what
`yestls cert renew` plus the import hook do), then a rollover to a new key.
A real TLS client (Python's ssl over STARTTLS) sees each change once the
edge's next refresh has asked the oracle; a next key's chain, imported but
not switched to, is never listed. Every wait is bounded by a deadline, and
no assertion is about how long anything took. A signing process keeps the
keys it holds when the keystore cannot be read, and signs with a retired key
for a while after it left the listing.
"""

import asyncio
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay import rpc, tunnel
from relay.oracle import signer
from relay.oracle.keystore import Keystore, key_id
from relay.oracle.protocol import MAX_FRAME, SERVICE, parse_certificate_listing
from relay.rpc import Frame, FrameDecoder, Kind, encode_frame
from relay.tls import ServerConfig

from ..edge_smtp import SmtpClient, running_edge, tls_context, wait_until
from ..rawclient import RawClient
from ..signing_ca import CA

NAMES = ("mx.example.org", "localhost")
DEADLINE = 30.0


@pytest.fixture(scope="module")
def ca():
    return CA("YesTLS renewal CA")


def served_leaf(edge, context) -> x509.Certificate:
    """The leaf certificate the edge presents to a STARTTLS client that verifies it."""
    client = SmtpClient.connect(edge.site.smtp_port)
    try:
        client.ehlo()
        client.starttls(context)
        return x509.load_der_x509_certificate(client.sock.getpeercert(binary_form=True))
    finally:
        client.close()


def listed_key_ids(edge) -> set[str]:
    """What the oracle lists to the edge right now (asked with the edge's identity)."""
    async def ask():
        connection = await rpc.connect("127.0.0.1", edge.site.oracle.port, max_frame=MAX_FRAME)
        try:
            await tunnel.authenticate(connection, SERVICE, edge.site.oracle.identity, 5)
            reply = await connection.call("certificates", timeout=10)
        finally:
            connection.close()
        return {entry.key_id for entry in parse_certificate_listing(reply.meta["certificates"])}

    return asyncio.run(ask())


def test_renewed_chain_and_rollover_are_served_without_restarts(tmp_path, pki, ca):
    context = tls_context(pki)
    context.load_verify_locations(cadata=ca.cert.public_bytes(serialization.Encoding.PEM).decode())
    with running_edge(tmp_path, pki, oracle_options="refresh_certificates = 0.5") as edge:
        keystore = Keystore(edge.site.oracle.keystore)
        leaf = pki.leaves["ecdsa-p256"]
        first = served_leaf(edge, context)
        assert first.serial_number == leaf.cert.serial_number

        # A renewal: a new chain for the same key.
        renewed = ca.issue_for_key(leaf.key.public_key(), NAMES)
        keystore.import_chain(ca.chain_pem(renewed))
        wait_until(lambda: served_leaf(edge, context).serial_number == renewed.serial_number, DEADLINE,
                   "the edge serves the renewed chain", edge.log)
        oracle_pid, edge_pid = edge.oracle.process.pid, edge.edge.process.pid

        # A rollover: the next key gets its chain but is not listed before the switch.
        next_id, csr_pem, made = keystore.rollover()
        assert made
        keystore.import_chain(ca.chain_pem(ca.issue(csr_pem)))
        again = ca.issue_for_key(leaf.key.public_key(), NAMES)   # and the current key renewed once more
        keystore.import_chain(ca.chain_pem(again))
        wait_until(lambda: served_leaf(edge, context).serial_number == again.serial_number, DEADLINE,
                   "the edge serves the current key's newest chain", edge.log)
        assert listed_key_ids(edge) == {key_id(leaf.key.public_key())}

        keystore.switch()
        wait_until(lambda: key_id(served_leaf(edge, context).public_key()) == next_id, DEADLINE,
                   "the edge serves the key switched to", edge.log)
        assert listed_key_ids(edge) == {next_id}
        # The same two processes all along.
        assert edge.oracle.process.poll() is None and edge.oracle.process.pid == oracle_pid
        assert edge.process_alive() and edge.edge.process.pid == edge_pid


def certificates_request() -> Frame:
    return FrameDecoder(signer.MAX_FRAME).feed(encode_frame(Kind.REQUEST, 1, {"method": "certificates"}))[0]


def listed(keys: signer.SignerKeys) -> list[str]:
    (answer,) = FrameDecoder(signer.MAX_FRAME).feed(signer.answer(certificates_request(), keys))
    return [entry.key_id for entry in parse_certificate_listing(answer.meta["certificates"])]


def one_key_store(tmp_path, ca) -> tuple[Keystore, str]:
    """A keystore with one ECDSA key and its chain from `ca`; and that key's id."""
    store = Keystore(tmp_path / "ks")
    store.directory.mkdir(mode=0o700)
    current, csr_pem = store.new_key("ecdsa-p256", ["mx.example.org"])
    store.import_chain(ca.chain_pem(ca.issue(csr_pem)))
    return store, current


def test_a_signing_process_keeps_its_keys_through_a_broken_keystore_and_signs_a_retired_key_for_a_while(
        tmp_path, ca, capsys):
    store, current = one_key_store(tmp_path, ca)
    keys = signer.SignerKeys(store)
    keys.reload()
    assert listed(keys) == [current]

    store.chain_path("f" * 32).write_text("not a chain")   # a chain file being fixed by hand
    assert listed(keys) == [current]
    assert "keeping the 1 key(s) held" in capsys.readouterr().err
    store.chain_path("f" * 32).unlink()

    next_id, next_csr, _ = store.rollover()
    store.import_chain(ca.chain_pem(ca.issue(next_csr)))
    assert listed(keys) == [current]
    store.switch()
    assert listed(keys) == [next_id]
    assert keys.for_signing(current) is not None and keys.for_signing(next_id) is not None
    assert keys.for_signing("0" * 32) is None


def sign_frame(entry, key: str) -> Frame:
    """A `sign` request for a real TLS 1.3 transcript that presents `entry`'s chain (what an edge sends)."""
    client = RawClient(ServerConfig([entry.chain]), entry.private_key, auto_sign=False)
    client.send_hello(client.hello())
    [request] = client.signature_requests
    data = encode_frame(Kind.REQUEST, 7, {"method": "sign", "key_id": key, "scheme": int(request.scheme)},
                       b"".join(request.handshake_messages))
    return FrameDecoder(signer.MAX_FRAME).feed(data)[0]


def test_a_signing_process_behind_on_a_renewal_reads_the_renewed_chain_when_an_edge_presents_it(tmp_path, ca):
    """Two signing processes read the keystore one after the other: a renewal imported between the two reads
    leaves the first with the old chain while the front lists the new one. The first re-reads the keystore
    when a transcript presents that chain and signs; at most once per MISMATCH_RELOAD_SPACING."""
    store, current = one_key_store(tmp_path, ca)
    behind, ahead = signer.SignerKeys(store), signer.SignerKeys(store)
    behind.reload()
    store.import_chain(ca.chain_pem(ca.issue_for_key(behind.by_id[current].private_key.public_key())))
    ahead.reload()
    renewed = sign_frame(ahead.by_id[current], current)

    (answer,) = FrameDecoder(signer.MAX_FRAME).feed(signer.answer(renewed, behind))
    assert answer.kind == Kind.RESPONSE and answer.tail, answer.meta
    assert behind.by_id[current].chain.der_chain == ahead.by_id[current].chain.der_chain

    # Renewed once more: within the spacing the behind process does not read the disk again for it.
    store.import_chain(ca.chain_pem(ca.issue_for_key(behind.by_id[current].private_key.public_key())))
    ahead.reload()
    (refused,) = FrameDecoder(signer.MAX_FRAME).feed(signer.answer(sign_frame(ahead.by_id[current], current), behind))
    assert refused.kind == Kind.ERROR and refused.meta["code"] == "policy.certificate_mismatch", refused.meta
    behind.mismatch_reload_at -= signer.MISMATCH_RELOAD_SPACING   # the spacing has passed
    (answer,) = FrameDecoder(signer.MAX_FRAME).feed(signer.answer(sign_frame(ahead.by_id[current], current), behind))
    assert answer.kind == Kind.RESPONSE and answer.tail, answer.meta


def test_the_chain_a_renewal_replaced_is_still_signed_with_for_the_grace_period(tmp_path, ca):
    """Another edge's listing made this process read a renewal; an edge that has not refreshed yet still presents
    the replaced chain of the same key: signed for DROPPED_KEY_GRACE, then refused."""
    store, current = one_key_store(tmp_path, ca)
    keys = signer.SignerKeys(store)
    keys.reload()
    before = keys.by_id[current]
    store.import_chain(ca.chain_pem(ca.issue_for_key(before.private_key.public_key())))
    keys.reload()
    assert keys.by_id[current].chain.der_chain != before.chain.der_chain

    (answer,) = FrameDecoder(signer.MAX_FRAME).feed(signer.answer(sign_frame(before, current), keys))
    assert answer.kind == Kind.RESPONSE and answer.tail, answer.meta
    entry, _ = keys.replaced[current]
    keys.replaced[current] = (entry, time.monotonic() - 1)   # the grace has passed
    (refused,) = FrameDecoder(signer.MAX_FRAME).feed(signer.answer(sign_frame(before, current), keys))
    assert refused.kind == Kind.ERROR and refused.meta["code"] == "policy.certificate_mismatch", refused.meta
