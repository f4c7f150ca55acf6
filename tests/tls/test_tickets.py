"""Session ticket keys: random per process, or derived from a seed that sibling workers share.

Time is injected: START is the first second of an epoch, so `START + k * R` is
the first second of the k-th epoch after it.
"""

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from relay.tls import CipherSuite, ServerConfig, SessionState, SharedTicketSeed, TicketKeyring
from relay.tls.constants import TLS12
from relay.tls.tickets import KEY_ID_LEN, NONCE_LEN

from ..rawclient import RawClient
from ..rawclient12 import Raw12

R = 3600                 # rotate_every
L = 2 * R                # lifetime
START = 480_000 * R      # 2024-10-04 00:00 UTC, the start of epoch 480000
SEED = bytes(range(32))


def state(now: float, lifetime: int = L) -> SessionState:
    return SessionState(cipher_suite=CipherSuite.AES_128_GCM_SHA256, psk=b"p" * 32, issued_at_ms=int(now * 1000),
                        lifetime=lifetime, age_add=7, server_name="mx.example.org", alpn=None)


def supervisor() -> TicketKeyring:
    return TicketKeyring.shared(os.urandom, SEED, START, lifetime=L, rotate_every=R)


def worker(shared: SharedTicketSeed) -> TicketKeyring:
    """A worker's keyring from the shared seed as it arrives on its pipe."""
    return TicketKeyring.from_shared(os.urandom, SharedTicketSeed.from_bytes(shared.to_bytes()))


# --- shared keys ----------------------------------------------------------------------------------

def test_a_ticket_from_one_worker_opens_in_another_across_epochs():
    a = supervisor()
    b = worker(a.share(START))
    for now in (START, START + R - 1, START + R, START + 3 * R + 17):
        assert b.open(a.seal(state(now), now), now) == state(now)
        assert a.open(b.seal(state(now), now), now) == state(now)


def test_a_worker_started_later_opens_tickets_sealed_before_it_started():
    a = supervisor()
    sealed_before = a.seal(state(START + R - 1), START + R - 1)
    later = START + R + 600          # the next epoch, ten minutes in
    b = worker(a.share(later))
    assert b.open(sealed_before, later) == state(START + R - 1)
    assert a.open(b.seal(state(later), later), later) == state(later)


def test_keyrings_from_one_share_first_used_two_epochs_apart_have_the_same_keys():
    shared = supervisor().share(START)
    early, late = worker(shared), worker(shared)
    sealed = [early.seal(state(START + k * R), START + k * R) for k in range(3)]
    now = START + 2 * R              # `late` is first used here
    assert [late.open(ticket, now) for ticket in sealed] == [state(START + k * R) for k in range(3)]
    assert late.seal(state(now), now)[:KEY_ID_LEN] == sealed[2][:KEY_ID_LEN]
    assert early.open(late.seal(state(now), now), now) == state(now)


def test_key_ids_change_with_the_epoch_and_only_then():
    a = supervisor()
    key_id = [a.seal(state(now), now)[:KEY_ID_LEN] for now in (START, START + R - 1, START + R, START + 2 * R)]
    assert key_id[0] == key_id[1]
    assert len({key_id[1], key_id[2], key_id[3]}) == 3


def test_keys_are_hkdf_expand_of_a_ratcheted_seed():
    """The derivation is a contract between workers of different releases: pin it to RFC 5869."""
    def expand(secret: bytes, label: bytes, length: int) -> bytes:
        return HKDFExpand(SHA256(), length, label).derive(secret)

    next_seed = expand(SEED, b"yestls ticket ratchet", 32)
    ticket = supervisor().seal(state(START + R), START + R)
    assert ticket[:KEY_ID_LEN] == expand(next_seed, b"yestls ticket key id", KEY_ID_LEN)
    plaintext = AESGCM(expand(next_seed, b"yestls ticket key", 32)).decrypt(
        ticket[KEY_ID_LEN:KEY_ID_LEN + NONCE_LEN], ticket[KEY_ID_LEN + NONCE_LEN:], ticket[:KEY_ID_LEN])
    assert SessionState.decode(plaintext) == state(START + R)


def test_a_ticket_does_not_open_after_its_keys_horizon():
    """Epoch e's key opens tickets until a lifetime after e ends; the state here would live longer."""
    a = supervisor()
    ticket = a.seal(state(START, lifetime=10 * L), START)
    horizon = START + R + L
    assert a.open(ticket, horizon - 1) == state(START, lifetime=10 * L)
    assert worker(a.share(horizon - 1)).open(ticket, horizon - 1) == state(START, lifetime=10 * L)
    assert a.open(ticket, horizon) is None


def test_the_ratchet_forgets_the_seed_of_an_expired_epoch():
    a = supervisor()
    old = a.seal(state(START, lifetime=10 * L), START)
    assert a.share(START + R + L - 1).epoch == START // R
    shared = a.share(START + R + L)
    assert shared.epoch == START // R + 1
    # Even told that the ticket is fresh, neither keyring has the key that sealed it any more.
    assert worker(shared).open(old, START + 1) is None
    assert a.open(old, START + 1) is None
    # What can still be open still opens.
    now = START + R + L
    assert worker(shared).open(a.seal(state(now), now), now) == state(now)


def test_a_clock_behind_the_shared_epoch_still_seals_and_opens():
    shared = supervisor().share(START + 5 * L)
    b = worker(shared)
    assert b.open(b.seal(state(START), START), START) == state(START)


def test_nonces_are_random_and_keys_are_not():
    asked: list[int] = []

    def random(n: int) -> bytes:
        asked.append(n)
        return os.urandom(n)

    a = TicketKeyring.shared(random, SEED, START, lifetime=L, rotate_every=R)
    first, second = a.seal(state(START), START), a.seal(state(START), START)
    assert first[:KEY_ID_LEN] == second[:KEY_ID_LEN] and first[KEY_ID_LEN:] != second[KEY_ID_LEN:]
    assert asked == [NONCE_LEN, NONCE_LEN]


def test_derived_keys_held_stay_bounded():
    a = supervisor()
    for step in range(40):
        now = START + step * R // 2
        a.open(a.seal(state(now), now), now)
        assert len(a._keys._keys) <= L / R + 2


@pytest.mark.parametrize("tamper", [
    pytest.param(lambda t: bytes([t[0] ^ 1]) + t[1:], id="key-id"),
    pytest.param(lambda t: t[:KEY_ID_LEN] + bytes([t[KEY_ID_LEN] ^ 1]) + t[KEY_ID_LEN + 1:], id="nonce"),
    pytest.param(lambda t: t[:30] + bytes([t[30] ^ 1]) + t[31:], id="ciphertext"),
    pytest.param(lambda t: t[:-1] + bytes([t[-1] ^ 1]), id="tag"),
    pytest.param(lambda t: t[:KEY_ID_LEN + NONCE_LEN + 15], id="truncated"),
])
def test_a_tampered_ticket_is_refused(tamper):
    a = supervisor()
    ticket = a.seal(state(START), START)
    assert a.open(ticket, START) == state(START)
    assert a.open(tamper(ticket), START) is None
    assert worker(a.share(START)).open(tamper(ticket), START) is None


# --- the shared seed on the pipe ------------------------------------------------------------------

GOOD = SharedTicketSeed(epoch=480_000, seed=SEED, lifetime=L, rotate_every=R)


def test_the_shared_seed_has_a_fixed_layout_and_round_trips():
    data = GOOD.to_bytes()
    assert data == b"\x01" + (480_000).to_bytes(8, "big") + L.to_bytes(4, "big") + R.to_bytes(4, "big") + SEED
    assert SharedTicketSeed.from_bytes(data) == GOOD
    assert repr(SEED) not in repr(GOOD)


def _with(offset: int, value: bytes) -> bytes:
    data = GOOD.to_bytes()
    return data[:offset] + value + data[offset + len(value):]


@pytest.mark.parametrize("data", [
    pytest.param(b"", id="empty"),
    pytest.param(GOOD.to_bytes()[:-1], id="short"),
    pytest.param(GOOD.to_bytes() + b"\x00", id="long"),
    pytest.param(_with(0, b"\x00"), id="version-0"),
    pytest.param(_with(0, b"\x02"), id="version-2"),
    pytest.param(_with(9, bytes(4)), id="zero-lifetime"),
    pytest.param(_with(9, (604801).to_bytes(4, "big")), id="lifetime-over-a-week"),
    pytest.param(_with(13, bytes(4)), id="zero-rotate-every"),
])
def test_a_malformed_shared_seed_is_refused(data):
    with pytest.raises(ValueError):
        SharedTicketSeed.from_bytes(data)


@pytest.mark.parametrize("seed, rotate_every", [(SEED[:16], R), (SEED, 0)], ids=["short-seed", "zero-rotate-every"])
def test_a_shared_keyring_refuses_a_bad_start(seed, rotate_every):
    with pytest.raises(ValueError):
        TicketKeyring.shared(os.urandom, seed, START, lifetime=L, rotate_every=rotate_every)


# --- random keys (one process) --------------------------------------------------------------------

def test_random_keys_rotate_from_first_use_and_are_forgotten_a_lifetime_later():
    a = TicketKeyring(os.urandom, lifetime=L, rotate_every=R)
    first_use = START + 100
    ticket = a.seal(state(first_use, lifetime=10 * L), first_use)
    assert a.seal(state(first_use), first_use + R - 1)[:KEY_ID_LEN] == ticket[:KEY_ID_LEN]
    assert a.seal(state(first_use), first_use + R)[:KEY_ID_LEN] != ticket[:KEY_ID_LEN]
    assert a.open(ticket, first_use + R + L) == state(first_use, lifetime=10 * L)
    assert a.open(ticket, first_use + R + L + 1) is None


def test_random_keys_are_not_shared():
    a, b = TicketKeyring(os.urandom), TicketKeyring(os.urandom)
    assert b.open(a.seal(state(START), START), START) is None
    with pytest.raises(ValueError):
        a.share(START)


# --- through the engine ---------------------------------------------------------------------------

@pytest.fixture
def leaf(pki):
    return pki.leaves["ecdsa-p256"]


def test_a_tls13_ticket_issued_by_one_worker_resumes_on_another(leaf):
    keys = supervisor()
    first = RawClient(ServerConfig([leaf.chain], tickets=worker(keys.share(START))), leaf.key,
                      now=lambda: START + R - 1)
    first.handshake()
    later = START + R + 600          # the next epoch, in a worker started then
    again = RawClient(ServerConfig([leaf.chain], tickets=worker(keys.share(later))), leaf.key, now=lambda: later)
    again.handshake(again.hello(ticket=first.tickets[0]))
    assert again.server.session.resumed and again.signature_requests == []


def test_a_tls12_ticket_issued_by_one_worker_resumes_on_another(leaf):
    keys = supervisor()
    first = Raw12(ServerConfig([leaf.chain], tickets=worker(keys.share(START))), leaf.key, now=lambda: START + R - 1)
    first.handshake()
    assert first.server.version == TLS12
    later = START + R + 600
    again = Raw12(ServerConfig([leaf.chain], tickets=worker(keys.share(later))), leaf.key, now=lambda: later)
    again.resume_with(first.master)
    again.handshake(again.hello(ticket=first.ticket(), session_id=os.urandom(32)))
    assert again.resumed and not again.requests
