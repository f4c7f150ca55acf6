"""Home's spool client against an edge that lies: every answer's cost is bounded, every lie is named.

The edge (tests/hostile_edge.py: the real spool service, with answers the
test rewrites) lists ids that are paths, sizes past any message, pages
without end; it claims files far larger than it has, answers pieces of the
wrong length, changes a file's size halfway. The client uses no listed id it
has not checked, fetches no file over its cap, asks for no more pieces than
it needs, keeps at most `parallel_fetches` fetch tasks alive whatever size is
claimed, and says what was wrong: a refused listing entry, or a
SpoolProtocolError.
"""

import asyncio
import os

import pytest

from relay.identity import load_identity
from relay.spool import client as client_module
from relay.spool.client import SpoolClient, SpoolProtocolError, max_file_size
from relay.spool.protocol import MAX_FETCH

from ..hostile_edge import hostile_edge

TIMEOUT = 30.0
METADATA = {"mail_from": "alice@example.net", "rcpt_tos": ["user@example.org"]}


@pytest.fixture
def edge(tmp_path):
    with hostile_edge(tmp_path / "edge") as edge:
        yield edge


def client_for(edge, **options) -> SpoolClient:
    return SpoolClient("127.0.0.1", edge.spool_service_port, load_identity(edge.home_identity_path), timeout=10,
                       **options)


def run(edge, test, **options):
    async def main():
        async with client_for(edge, **options) as client:
            return await test(client)

    return asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def extra_entries(*entries, more: bool | None = None):
    """A `list` answer: the honest page with `entries` after it (and `more` forced, if given)."""
    async def answer(params, honest):
        meta, tail = await honest()
        meta = {**meta, "messages": meta["messages"] + list(entries)}
        if more is not None:
            meta["more"] = more
        return meta, tail

    return answer


BAD_IDS = ["../../../tmp/escape", "/tmp/absolute", "AB" * 16, "ab" * 15, "ab" * 16 + "\n", "ab" * 16 + "/..",
           12, None, ["ab" * 16]]


def test_listed_ids_that_are_not_spool_ids_are_left_out_and_named(edge):
    honest = [edge.seal(METADATA, b"honest %d" % i) for i in range(2)]
    edge.lie("list", extra_entries(*({"id": bad, "size": 100, "accepted": 1.0} for bad in BAD_IDS),
                                   "not an object"))

    async def test(client):
        return await client.list()

    listing = run(edge, test)
    assert [m.id for m in listing.messages] == honest
    assert len(listing.refused) == len(BAD_IDS) + 1
    assert all("bad id" in reason for reason in listing.refused[:-1])
    assert "not an object" in listing.refused[-1]
    assert listing.last_id == honest[-1]


def test_odd_values_in_a_listing_are_named_briefly(edge):
    nested = "deep"
    for _ in range(200):
        nested = [nested]
    honest = edge.seal(METADATA, b"honest")
    bad_time = os.urandom(16).hex()
    edge.lie("list", extra_entries({"id": nested, "size": 100, "accepted": 1.0},
                                   {"id": bad_time, "size": 100, "accepted": 10 ** 400},
                                   {"id": "ab" * 5000, "size": 100, "accepted": 1.0}))
    listing = run(edge, lambda client: client.list())
    assert [m.id for m in listing.messages] == [honest]
    assert len(listing.refused) == 3 and all(len(reason) < 300 for reason in listing.refused), listing.refused
    assert f"{bad_time}: accepted" in listing.refused[1]


def test_stats_keep_only_the_numbers(edge):
    async def answer(params, honest):
        return {"depth": "lots", "bytes": 10 ** 400, "oldest_age": [[1]], "accepted": 3, "full_bytes": 0.5,
                "full_files": True, "extra": None}, b""

    edge.lie("stats", answer)
    assert run(edge, lambda client: client.stats()) == {"accepted": 3, "full_bytes": 0.5}


@pytest.mark.parametrize("size, reason", [
    (10 ** 12, "over the"), (0, "not a file size"), (-5, "not a file size"), ("100", "not a file size"),
    (True, "not a file size"), (1.5, "not a file size"),
])
def test_listed_sizes_that_no_message_has_are_left_out(edge, size, reason):
    honest = edge.seal(METADATA, b"honest")
    liar = os.urandom(16).hex()
    edge.lie("list", extra_entries({"id": liar, "size": size, "accepted": 1.0}))

    listing = run(edge, lambda client: client.list())
    assert [m.id for m in listing.messages] == [honest]
    (refused,) = listing.refused
    assert liar in refused and reason in refused
    assert listing.last_id == liar, "a well-formed id is where the next wait starts, usable or not"


def test_endless_pages_of_new_ids_stop_at_max_listed(edge):
    async def answer(params, honest):
        return {"messages": [{"id": os.urandom(16).hex(), "size": 100, "accepted": 1.0} for _ in range(20)],
                "more": True}, b""

    edge.lie("list", answer)
    listing = run(edge, lambda client: client.list(), max_listed=50)
    assert not listing.complete
    assert len(listing.messages) == 50
    assert listing.refused == ["a list page of 20 entries, asked for at most 10: the 10 after them left out"]
    assert [method for method, _ in edge.requests].count("list") == 3
    assert [params["limit"] for method, params in edge.requests if method == "list"] == [50, 30, 10]


def test_the_same_page_again_and_again_stops_at_the_first_repeat(edge):
    ids = [edge.seal(METADATA, b"m%d" % i) for i in range(3)]

    async def answer(params, honest):
        meta, tail = await honest()
        return {**meta, "messages": [{"id": i, "size": edge.spool.size(i), "accepted": 1.0} for i in ids],
                "more": True}, tail

    edge.lie("list", answer)
    listing = run(edge, lambda client: client.list())
    assert [m.id for m in listing.messages] == ids and listing.complete
    assert listing.refused == [f"{ids[0]} listed twice: the listing stops there"]
    assert [method for method, _ in edge.requests].count("list") == 2


@pytest.mark.parametrize("meta", [{"messages": "all of them", "more": False}, {"messages": [], "more": "yes"}, {}])
def test_a_malformed_list_page_is_a_protocol_error(edge, meta):
    async def answer(params, honest):
        return meta, b""

    edge.lie("list", answer)
    with pytest.raises(SpoolProtocolError, match="malformed list answer"):
        run(edge, lambda client: client.list())


def fetch_lie(change):
    """A `fetch` answer: the honest one, then change(params, meta, tail) -> (meta, tail)."""
    async def answer(params, honest):
        meta, tail = await honest()
        return change(params, meta, tail)

    return answer


@pytest.mark.parametrize("name, change, message", [
    ("a size over the cap", lambda p, m, t: ({"size": 10 ** 12}, t), "over the"),
    ("a size that is no size", lambda p, m, t: ({"size": "big"}, t), "not a file size"),
    ("a size of True", lambda p, m, t: ({"size": True}, t), "not a file size"),
    ("another size than listed", lambda p, m, t: ({"size": m["size"] + 1}, t + b"x"), "it listed"),
    ("a short first piece", lambda p, m, t: (m, t[:-1]), "first piece"),
    ("a long first piece", lambda p, m, t: (m, t + b"x"), "first piece"),
    ("an empty first piece", lambda p, m, t: (m, b""), "first piece"),
    ("a short later piece", lambda p, m, t: (m, t[:-1] if p["offset"] else t), "returned"),
    ("a size that changes halfway", lambda p, m, t: ({"size": m["size"] - 1} if p["offset"] else m, t), "returned"),
])
def test_fetch_answers_that_do_not_add_up_are_protocol_errors(edge, name, change, message):
    spool_id = edge.seal(METADATA, os.urandom(2 * MAX_FETCH + 100))
    size = edge.spool.size(spool_id)
    edge.lie("fetch", fetch_lie(change))
    with pytest.raises(SpoolProtocolError, match=message):
        run(edge, lambda client: client.fetch(spool_id, size))
    assert edge.fetched(spool_id) <= 1 + 4, "no more pieces asked for than the file has"


def test_the_cap_follows_max_message_size(edge):
    spool_id = edge.seal(METADATA, os.urandom(50_000))
    size = edge.spool.size(spool_id)
    with pytest.raises(SpoolProtocolError, match="over the"):
        run(edge, lambda client: client.fetch(spool_id, size), max_size=size - 1)
    assert edge.fetched(spool_id) == 1, "the first answer told the size: nothing more was asked"
    assert run(edge, lambda client: client.fetch(spool_id, size), max_size=size) == edge.sealed_file(spool_id)
    assert max_file_size(25 * 1024 * 1024) > 25 * 1024 * 1024 + 1024 * 1024, "room for metadata and the trace"


def test_a_claim_of_200000_pieces_keeps_parallel_fetches_tasks_alive(edge, monkeypatch):
    """No task per piece: a claimed size makes at most `parallel_fetches` fetches at a time."""
    piece = 1024
    monkeypatch.setattr(client_module, "MAX_FETCH", piece)
    claimed = 200_000 * piece
    spool_id = edge.seal(METADATA, b"small")
    honest_pieces = 40

    async def answer(params, honest):
        offset, length = params["offset"], params["length"]
        if offset >= honest_pieces * piece:
            return {"size": claimed}, b""        # the lie shows at last: a piece of the wrong length
        return {"size": claimed}, b"x" * length

    edge.lie("fetch", answer)
    peak = 0

    async def test(client):
        nonlocal peak
        before = len(asyncio.all_tasks())
        fetching = asyncio.ensure_future(client.fetch(spool_id, claimed))
        while not fetching.done():
            peak = max(peak, len(asyncio.all_tasks()) - before)
            await asyncio.sleep(0)
        return fetching.exception()

    error = run(edge, test, max_size=claimed, parallel_fetches=4)
    assert isinstance(error, SpoolProtocolError)
    assert 1 + 1 <= peak <= 1 + 4, f"{peak} tasks alive at once"   # the fetch and at most its four workers
    assert edge.fetched(spool_id) <= honest_pieces + 4
