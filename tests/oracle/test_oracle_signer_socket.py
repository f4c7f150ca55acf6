"""The oracle's front and its signing processes over the signer socket, as deployed.

Deployed, systemd listens on the signer socket (yestls-signer.socket,
Accept=yes) and starts one signing process per connection, as a user the
front cannot become; the front (`signer_socket` in oracle.toml) connects
there and never opens the keystore. Here tests/signer_socket.py stands in for
systemd: same socket, one `python -m relay.oracle.signer --fd 0` per
connection. The users are the same in a test; the Molecule scenario checks
the users and permissions (molecule/default/tests/test_oracle_separation.py).

- The front serves the chains the signing processes gave it and gets
  signatures through the socket, with its own `keystore` setting pointing
  nowhere: it needs no keystore at all.
- A signing process that ends is replaced: with every one killed, the front
  connects new ones and signs again.
- Without the socket, or with signing processes that refuse their keystore,
  the front does not start, and says where to look.
- Straight on the socket (what a compromised front could do), a signing
  process offers nothing new: the chains, policy-checked signatures, and no
  other method.
- The front checks what the signing processes list: each key id is its
  leaf's.
"""

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys

import pytest

from relay.identity import load_identity
from relay.oracle.client import OraclePool
from relay.oracle.keystore import Keystore
from relay.oracle.protocol import certificate_listing, parse_certificate_listing
from relay.rpc import Code, FrameDecoder, Kind, encode_frame
from relay.tls.signing import verify

from ..memory import signature_requests
from ..oracle_home import OracleHome, make_oracle_home, start_oracle
from ..services import running
from ..signer_socket import SignerSocket

pytestmark = pytest.mark.timeout(120)

KEY_TYPES = ("ecdsa-p256", "rsa-2048")
SIGNERS = 2
WAIT = 30.0  # bound on waiting for the front to replace its signing processes


def socket_home(directory, pki, signers: int = SIGNERS) -> tuple[OracleHome, object]:
    """An oracle home whose oracle.toml names the signer socket and a keystore that does not exist.

    Returns the home (its `keystore` is the real one, for the signer socket) and the socket's path."""
    home = make_oracle_home(directory, pki, KEY_TYPES, signers=signers)
    path = directory / "signer.sock"
    config = home.config.read_text()
    assert f'keystore = "{home.keystore}"\n' in config
    config = config.replace(f'keystore = "{home.keystore}"\n',
                            f'keystore = "{directory / "not-the-keystore"}"\nsigner_socket = "{path}"\n')
    home.config.write_text(config)
    return home, path


def sign_through(home: OracleHome, pki, key_types=KEY_TYPES) -> dict:
    """As the edge does: list the oracle's certificates, then get one signature per key type; verify each."""
    async def main():
        pool = OraclePool([("127.0.0.1", home.port)], load_identity(home.identity_path), request_timeout=10)
        await pool.start()
        try:
            assert await pool.wait_ready(10), "the edge's pool found no oracle"
            listed = {key_id: chain.der_chain for key_id, chain in await pool.certificates()}
            for key_type in key_types:
                [request] = signature_requests(pki, key_type, 1)
                signature = await pool.sign(request)
                assert verify(pki.leaves[key_type].key.public_key(), request.scheme, request.content, signature)
            return listed
        finally:
            await pool.close()

    return asyncio.run(main())


def wait_for_replacements(oracle) -> None:
    """Block until the front says it has all its signing processes again."""
    async def poll():
        while f"({SIGNERS} of {SIGNERS} running)" not in oracle.log():
            await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(poll(), WAIT))


# --- the front through the socket ------------------------------------------------------------------

def test_the_front_signs_through_the_signer_socket_without_a_keystore_of_its_own(tmp_path, pki):
    home, path = socket_home(tmp_path, pki)
    with SignerSocket(path, home.keystore) as signers, running(start_oracle(home)) as oracle:
        assert "through " + str(path) in oracle.log()
        assert len(signers.running()) == SIGNERS
        listed = sign_through(home, pki)
    assert listed == {home.key_ids[t]: pki.leaves[t].chain.der_chain for t in KEY_TYPES}
    signed = [line for line in home.audit_lines() if line["method"] == "sign"]
    assert [(line["key_id"], line["outcome"]) for line in signed] == [(home.key_ids[t], "signed") for t in KEY_TYPES]
    assert not (tmp_path / "not-the-keystore").exists()


def test_signing_processes_that_end_are_replaced(tmp_path, pki):
    home, path = socket_home(tmp_path, pki)
    with SignerSocket(path, home.keystore) as signers, running(start_oracle(home)) as oracle:
        first = signers.running()
        assert len(first) == SIGNERS
        for process in first:
            process.send_signal(signal.SIGKILL)
        wait_for_replacements(oracle)
        replaced = signers.running()
        assert len(replaced) == SIGNERS and not set(replaced) & set(first)
        sign_through(home, pki)  # only the new ones are left to sign
        assert oracle.process.poll() is None
        assert "a signing process ended" in oracle.log()


def front_exit(home: OracleHome) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.cli", "oracle", "serve", "--config", str(home.config)],
                          capture_output=True, text=True, timeout=60)


def test_without_its_signer_socket_the_front_does_not_start(tmp_path, pki):
    home, path = socket_home(tmp_path, pki)
    result = front_exit(home)
    assert result.returncode == 2, result.stderr
    assert f"cannot connect to the signer socket {path}" in result.stderr
    assert "yestls-signer.socket" in result.stderr


def test_signing_processes_that_refuse_their_keystore_stop_the_front_at_start(tmp_path, pki):
    """The signing process checks the keystore's permissions itself (the front cannot: it has no access)."""
    home, path = socket_home(tmp_path, pki, signers=1)
    os.chmod(home.keystore, 0o755)
    with SignerSocket(path, home.keystore) as signers:
        result = front_exit(home)
        assert [process.wait(timeout=10) for process in signers.processes] == [2]
    assert result.returncode == 2, result.stderr
    assert "a signing process did not get ready" in result.stderr


# --- the signing process, straight on the socket ------------------------------------------------------

class Direct:
    """A blocking relay.rpc client on the signer socket: what a compromised front could send."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.decoder = FrameDecoder()
        self.next_id = 1

    def call(self, method: str, params: dict | None = None, tail: bytes = b""):
        frame_id, self.next_id = self.next_id, self.next_id + 1
        self.sock.sendall(encode_frame(Kind.REQUEST, frame_id, {"method": method, **(params or {})}, tail))
        while True:
            data = self.sock.recv(1 << 16)
            assert data, "the signing process closed the connection"
            frames = self.decoder.feed(data)
            if frames:
                [frame] = frames
                assert frame.id == frame_id
                return frame

    def close(self):
        self.sock.close()


def test_straight_on_the_socket_a_signing_process_offers_nothing_new(tmp_path, pki):
    home = make_oracle_home(tmp_path, pki, KEY_TYPES)
    key_id = home.key_ids["ecdsa-p256"]
    [request] = signature_requests(pki, "ecdsa-p256", 1)
    with SignerSocket(tmp_path / "signer.sock", home.keystore) as signers:
        direct = Direct(signers.path)
        try:
            listing = direct.call("certificates")
            bare_digest = direct.call("sign", {"key_id": key_id, "scheme": int(request.scheme)}, request.content)
            others = {method: direct.call(method, {"key_id": key_id}, bytes(256))
                      for method in ("decrypt", "hello", "auth", "export", "keys")}
            signed = direct.call("sign", {"key_id": key_id, "scheme": int(request.scheme)},
                                 b"".join(request.handshake_messages))
        finally:
            direct.close()
    assert listing.kind == Kind.RESPONSE
    chains = {item["key_id"]: [base64.b64decode(der) for der in item["chain"]]
              for item in listing.meta["certificates"]}
    assert chains == {home.key_ids[t]: list(pki.leaves[t].chain.der_chain) for t in KEY_TYPES}
    assert b"PRIVATE" not in repr(listing.meta).encode() and listing.tail == b""
    assert (bare_digest.kind, bare_digest.meta["code"]) == (Kind.ERROR, "policy.not_a_transcript")
    assert {method: (frame.kind, frame.meta["code"]) for method, frame in others.items()} == \
        {method: (Kind.ERROR, Code.UNKNOWN_METHOD) for method in others}
    assert signed.kind == Kind.RESPONSE
    assert verify(pki.leaves["ecdsa-p256"].key.public_key(), request.scheme, request.content, signed.tail)


# --- what the front accepts from a signing process ----------------------------------------------------

@pytest.fixture
def listing(tmp_path, pki):
    home = make_oracle_home(tmp_path, pki, KEY_TYPES)
    return certificate_listing(Keystore(home.keystore).public_entries()), home


def test_a_listing_reads_back_as_the_keystore_has_it(listing, pki):
    items, home = listing
    entries = parse_certificate_listing(items)
    assert {(e.key_id, e.key_type, e.chain.der_chain) for e in entries} == \
        {(home.key_ids[t], t, pki.leaves[t].chain.der_chain) for t in KEY_TYPES}


@pytest.mark.parametrize("edit", ["another key's id", "another key type", "not base64", "no chain", "not a list"])
def test_a_listing_that_does_not_add_up_is_refused(listing, edit):
    items, _ = listing
    p256, rsa = items
    if edit == "another key's id":
        items = [{**p256, "key_id": rsa["key_id"]}]
    elif edit == "another key type":
        items = [{**p256, "key_type": "ecdsa-p384"}]
    elif edit == "not base64":
        items = [{**p256, "chain": ["not base64!"]}]
    elif edit == "no chain":
        items = [{**p256, "chain": []}]
    else:
        items = {"certificates": items}
    with pytest.raises(ValueError):
        parse_certificate_listing(items)
