"""The edge's web side (relay/edge/web.py, relay/edge/acme.py): ACME tokens on port 80, MTA-STS on 443.

Unit tests: the challenge store (validation, the cap, expiry on a fake
clock) and the routes. Against a running edge with its oracle:
- home's ACME client (its own identity, allowed only the acme_challenge_*
  methods) places a token over the tunnel; port 80 answers it, text/plain,
  until it is deleted; that identity is refused `not_permitted` for the
  spool's methods;
- hostile HTTP on port 80 (bare LF, huge headers, absolute-form, POST,
  percent-encoded dots, a client that never finishes its request, more
  connections than the per-address cap) gets its status, or is closed, and
  a log line; the edge keeps serving;
- real HTTPS clients (curl, Python's http.client over ssl) fetch the MTA-STS
  policy from mta-sts.example.org with ALPN http/1.1, the chain verified;
  the oracle's audit shows the signature for that name; another Host or path
  is 404; a handshake for another name (the MX's) is refused before home is
  asked; SMTP's STARTTLS never selects ALPN even when offered http/1.1;
- the HTTPS listener spends the same TLS budget as SMTP.
The settings ([web], [mta_sts]) and a certificate refresh, which gives SMTP
and HTTPS the new chains at once (no restart), are tested in process.
"""

import asyncio
import http.client
import json
import logging
import os
import socket
import ssl
import subprocess

import pytest
from prometheus_client import CollectorRegistry

from relay import tunnel
from relay.edge import config as edge_config
from relay.edge.acme import MAX_CHALLENGES, AcmeChallenges
from relay.edge.config import MtaStsSettings
from relay.edge.server import Edge, EdgeMetrics
from relay.edge.web import WebSite
from relay.http import Request
from relay.identity import load_identity
from relay.mtasts import policy_text
from relay.rpc import Code, Frame, RemoteError, RpcConnection
from relay.site import MtaStsMode
from relay.spool.protocol import SERVICE
from relay.tls import TicketKeyring

from ..edge_site import make_edge_site
from ..edge_smtp import CLIENT_NAME, SmtpClient, running_edge, tls_context, wait_until
from ..pki import make_pki

pytestmark = pytest.mark.timeout(300)

STS = "mta-sts.example.org"
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
THUMBPRINT = "nP1qzpXGymHBrUEepNY9HCsQk7K8KhOypzEt62jcerQ"
KEY_AUTHORIZATION = f"{TOKEN}.{THUMBPRINT}"
POLICY = policy_text("enforce", ["mx.example.org", "*.mx.example.org"], 86400)
WEB_OPTIONS = ("request_timeout = 2\nmax_connections_per_ip = 4\n"
               '[mta_sts]\nmode = "enforce"\nmax_age = 86400\nmx = ["mx.example.org", "*.mx.example.org"]\n')


# --- the challenge store and the routes, on their own -------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def put(store: AcmeChallenges, **params):
    return asyncio.run(store.put(None, Frame(1, 1, {"method": "acme_challenge_put", **params})))


def delete(store: AcmeChallenges, **params):
    return asyncio.run(store.delete(None, Frame(1, 1, {"method": "acme_challenge_delete", **params})))


def test_a_token_is_answered_until_its_ttl_or_its_deletion():
    clock = Clock()
    store = AcmeChallenges(clock)
    assert put(store, token=TOKEN, key_authorization=KEY_AUTHORIZATION, ttl=60) == ({}, b"")
    assert store.key_authorization(TOKEN) == KEY_AUTHORIZATION
    clock.now += 59
    assert store.key_authorization(TOKEN) == KEY_AUTHORIZATION
    clock.now += 1
    assert store.key_authorization(TOKEN) is None and len(store) == 0
    put(store, token=TOKEN, key_authorization=KEY_AUTHORIZATION, ttl=3600)
    put(store, token=TOKEN, key_authorization=f"{TOKEN}.other", ttl=10)  # placed again: replaced
    assert store.key_authorization(TOKEN) == f"{TOKEN}.other"
    assert delete(store, token=TOKEN) == ({}, b"") and store.key_authorization(TOKEN) is None
    assert delete(store, token=TOKEN) == ({}, b"")  # not held: already what home wants


BAD_PUTS = {
    "no token": {"key_authorization": KEY_AUTHORIZATION, "ttl": 60},
    "empty token": {"token": "", "key_authorization": ".x", "ttl": 60},
    "token too long": {"token": "a" * 129, "key_authorization": "a" * 129 + ".x", "ttl": 60},
    "token with a slash": {"token": "../x", "key_authorization": "../x.y", "ttl": 60},
    "token with a percent": {"token": "%2e", "key_authorization": "%2e.y", "ttl": 60},
    "token with a newline": {"token": "ab\n", "key_authorization": "ab\n.y", "ttl": 60},
    "token not a string": {"token": 5, "key_authorization": "5.y", "ttl": 60},
    "authorization for another token": {"token": TOKEN, "key_authorization": f"other.{THUMBPRINT}", "ttl": 60},
    "authorization without a thumbprint": {"token": TOKEN, "key_authorization": f"{TOKEN}.", "ttl": 60},
    "authorization with markup": {"token": TOKEN, "key_authorization": f"{TOKEN}.<script>", "ttl": 60},
    "authorization too long": {"token": TOKEN, "key_authorization": f"{TOKEN}." + "a" * 256, "ttl": 60},
    "authorization not a string": {"token": TOKEN, "key_authorization": None, "ttl": 60},
    "ttl 0": {"token": TOKEN, "key_authorization": KEY_AUTHORIZATION, "ttl": 0},
    "ttl over an hour": {"token": TOKEN, "key_authorization": KEY_AUTHORIZATION, "ttl": 3601},
    "ttl a float": {"token": TOKEN, "key_authorization": KEY_AUTHORIZATION, "ttl": 60.0},
    "ttl true": {"token": TOKEN, "key_authorization": KEY_AUTHORIZATION, "ttl": True},
    "ttl missing": {"token": TOKEN, "key_authorization": KEY_AUTHORIZATION},
}


@pytest.mark.parametrize("name", list(BAD_PUTS))
def test_bad_puts_are_bad_requests(name):
    store = AcmeChallenges(Clock())
    with pytest.raises(RemoteError) as refused:
        put(store, **BAD_PUTS[name])
    assert refused.value.code == Code.BAD_REQUEST and len(store) == 0


def test_at_most_so_many_challenges_are_held_at_once():
    clock = Clock()
    store = AcmeChallenges(clock)
    for n in range(MAX_CHALLENGES):
        put(store, token=f"t{n}", key_authorization=f"t{n}.x", ttl=60 + n)
    with pytest.raises(RemoteError) as refused:
        put(store, token="one-more", key_authorization="one-more.x", ttl=60)
    assert refused.value.code == Code.BAD_REQUEST and f"holds {MAX_CHALLENGES} ACME challenges" in refused.value.message
    put(store, token="t5", key_authorization="t5.y", ttl=600)  # replacing one is fine
    clock.now += 60  # t0 expires: room for one
    put(store, token="one-more", key_authorization="one-more.x", ttl=60)
    assert len(store) == MAX_CHALLENGES and store.key_authorization("t0") is None


def request(target: str, host: str | None = "mx.example.org", method: str = "GET") -> Request:
    return Request(method, target, "HTTP/1.1", host, ())


def test_routes():
    store = AcmeChallenges(Clock())
    put(store, token=TOKEN, key_authorization=KEY_AUTHORIZATION, ttl=60)
    site = WebSite(store, frozenset({"example.org", "example.net"}), POLICY)
    acme = f"/.well-known/acme-challenge/{TOKEN}"
    assert site.answer(request(acme), https=False) == (200, KEY_AUTHORIZATION.encode())
    assert site.answer(request(acme, host="anything.example"), https=False)[0] == 200
    for target in (acme + "?x", acme + "/", "/.well-known/acme-challenge/", "/.well-known/acme-challenge/%2e%2e",
                   "/.well-known/acme-challenge/nope", "/", "/.well-known/mta-sts.txt"):
        assert site.answer(request(target, host=STS), https=False) == (404, b""), target
    policy = "/.well-known/mta-sts.txt"
    for host in (STS, "mta-sts.example.net"):
        assert site.answer(request(policy, host=host), https=True) == (200, POLICY)
    assert site.answer(request(policy, host=None), https=True, server_name=STS) == (200, POLICY)
    for host, target in ((STS, acme), (STS, "/"), (STS, policy + "?"), (STS, "/.well-known/./mta-sts.txt"),
                         ("mx.example.org", policy), ("mta-sts.example.com", policy), ("example.org", policy)):
        assert site.answer(request(target, host=host), https=True) == (404, b""), (host, target)


# --- a running edge --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sts_pki(tmp_path_factory):
    """The edge's certificate as home's ACME client orders it: the MX name and mta-sts.<domain>."""
    return make_pki(tmp_path_factory.mktemp("sts-pki"), names=("mx.example.org", STS, "localhost"),
                    key_types=("ecdsa-p256",))


@pytest.fixture(scope="module")
def edge(tmp_path_factory, sts_pki):
    with running_edge(tmp_path_factory.mktemp("web"), sts_pki, web=True, web_options=WEB_OPTIONS) as running:
        yield running


async def tunnel_call(edge, identity_path, method: str, **params) -> dict:
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(RpcConnection, "127.0.0.1", edge.site.spool_service_port)
    try:
        await tunnel.authenticate(connection, SERVICE, load_identity(identity_path), 5)
        reply = await connection.call(method, params, timeout=5)
        return reply.meta
    finally:
        connection.close()


def as_acme(edge, method: str, **params) -> dict:
    return asyncio.run(tunnel_call(edge, edge.site.acme_identity_path, method, **params))


def http_exchange(port: int, data: bytes, timeout: float = 10.0, source: str | None = None) -> bytes:
    """Send `data` (from loopback address `source`), read until the server closes; what it sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def get(port: int, target: str, host: str = "mx.example.org") -> bytes:
    return http_exchange(port, f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())


def test_home_places_a_token_and_port_80_answers_it(edge):
    target = f"/.well-known/acme-challenge/{TOKEN}"
    assert get(edge.site.http_port, target).startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert as_acme(edge, "acme_challenge_put", token=TOKEN, key_authorization=KEY_AUTHORIZATION, ttl=600) == {}
    answer = get(edge.site.http_port, target, host="mx.example.org")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == KEY_AUTHORIZATION.encode()
    assert b"\r\nContent-Type: text/plain\r\n" in head and b"\r\nConnection: close" in head
    assert f"Content-Length: {len(KEY_AUTHORIZATION)}".encode() in head
    head_only = http_exchange(edge.site.http_port, f"HEAD {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    assert head_only == head + b"\r\n\r\n"
    assert as_acme(edge, "acme_challenge_delete", token=TOKEN) == {}
    assert get(edge.site.http_port, target).startswith(b"HTTP/1.1 404 ")
    assert "ACME challenge placed by acme for token" in edge.log()


def test_home_acme_identity_may_place_tokens_and_nothing_else(edge):
    for method, params in (("list", {"after": None, "limit": 10}), ("stats", {}), ("wait", {"after": None, "timeout": 0})):
        with pytest.raises(RemoteError) as refused:
            as_acme(edge, method, **params)
        assert refused.value.code == Code.NOT_PERMITTED, method
    with pytest.raises(RemoteError) as bad:
        as_acme(edge, "acme_challenge_put", token="../../etc", key_authorization="x", ttl=60)
    assert bad.value.code == Code.BAD_REQUEST
    audit = [json.loads(line) for line in (edge.site.directory / "edge" / "spool-audit.jsonl").read_text().splitlines()]
    assert {"peer": "acme", "method": "list", "outcome": "refused:not_permitted"}.items() <= \
        next(line for line in audit if line.get("method") == "list").items()
    # The intake's identity (no `methods`) keeps every method it had.
    assert "depth" in asyncio.run(tunnel_call(edge, edge.site.home_identity_path, "stats"))


HOSTILE = {
    "bare LF": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "NUL in a header": (b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n", 400),
    "absolute-form": (b"GET http://mx.example.org/.well-known/acme-challenge/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "huge header": (b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * 20000 + b"\r\n\r\n", 431),
    "long target": (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    "POST": (b"POST /.well-known/acme-challenge/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", 405),
    "percent-encoded dots": (b"GET /.well-known/acme-challenge/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: a\r\n\r\n",
                             404),
    "dot segments": (b"GET /.well-known/acme-challenge/../../etc/passwd HTTP/1.1\r\nHost: a\r\n\r\n", 404),
    "TLS on the plain port": (bytes.fromhex("16030100200100001c0303") + b"\x00" * 40, 400),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "a request that never ends": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: 1\r\n", 408),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_requests_on_port_80_get_their_status_and_a_log_line(edge, name):
    """Each from its own address: log lines are limited per address (a flood must not flood the log)."""
    data, status = HOSTILE[name]
    source = f"127.0.9.{list(HOSTILE).index(name) + 1}"
    answer = http_exchange(edge.site.http_port, data, source=source)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:100]
    if status != 404:
        wait_until(lambda: f"{source}: refused with {status}" in edge.log(), 10, "the log line")
    assert edge.process_alive()
    assert get(edge.site.http_port, "/").startswith(b"HTTP/1.1 404 ")


# --- HTTPS: the MTA-STS policy through the keyless engine and the oracle ------------------------------------------

def https_get(edge, sts_pki, target: str, *, host: str = STS, server_name: str = STS,
              alpn=("h2", "http/1.1")) -> tuple[http.client.HTTPResponse, bytes, tuple[str | None, str]]:
    """Python's http.client (what urllib uses) over ssl, verifying the chain and the name."""
    context = tls_context(sts_pki)
    context.set_alpn_protocols(list(alpn))
    raw = socket.create_connection(("127.0.0.1", edge.site.https_port), timeout=10)
    sock = context.wrap_socket(raw, server_hostname=server_name)
    negotiated = (sock.selected_alpn_protocol(), sock.version())  # http.client closes the socket at the end
    connection = http.client.HTTPConnection(host, edge.site.https_port, timeout=10)
    connection.sock = sock
    connection.request("GET", target, headers={"Host": host})
    answer = connection.getresponse()
    body = answer.read()
    return answer, body, negotiated


def signed_for(edge, name: str) -> list[dict]:
    return [line for line in edge.site.oracle.audit_lines()
            if line.get("method") == "sign" and line.get("server_name") == name]


def test_python_fetches_the_policy_over_https_with_alpn_http11(edge, sts_pki):
    answer, body, negotiated = https_get(edge, sts_pki, "/.well-known/mta-sts.txt")
    assert answer.status == 200 and body == POLICY
    assert answer.getheader("Content-Type") == "text/plain"
    assert negotiated == ("http/1.1", "TLSv1.3")
    assert signed_for(edge, STS), "the oracle signed no handshake for mta-sts.example.org"


def test_python_without_alpn_fetches_the_policy_too(edge, sts_pki):
    answer, body, negotiated = https_get(edge, sts_pki, "/.well-known/mta-sts.txt", alpn=())
    assert answer.status == 200 and body == POLICY and negotiated == (None, "TLSv1.3")


@pytest.mark.parametrize("host, target", [(STS, "/"), (STS, "/.well-known/acme-challenge/x"),
                                          ("mx.example.org", "/.well-known/mta-sts.txt"),
                                          ("mta-sts.example.com", "/.well-known/mta-sts.txt")])
def test_other_paths_and_hosts_over_https_are_404(edge, sts_pki, host, target):
    answer, body, _ = https_get(edge, sts_pki, target, host=host)
    assert answer.status == 404


def test_a_handshake_for_another_name_on_443_is_refused_before_home_is_asked(edge, sts_pki):
    before = len(signed_for(edge, "mx.example.org"))
    for server_name in ("mx.example.org", "localhost"):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(edge, sts_pki, "/.well-known/mta-sts.txt", server_name=server_name)
    assert len(signed_for(edge, "mx.example.org")) == before and not signed_for(edge, "localhost")
    assert edge.metric("yestls_edge_web_refused_total", reason="https_not_mta_sts_name") >= 2


def test_an_h2_only_client_gets_no_application_protocol(edge, sts_pki):
    with pytest.raises(ssl.SSLError, match="NO_APPLICATION_PROTOCOL|no application protocol"):
        https_get(edge, sts_pki, "/.well-known/mta-sts.txt", alpn=("h2",))


def test_curl_fetches_the_policy(edge, sts_pki):
    port = edge.site.https_port
    done = subprocess.run(
        ["curl", "--silent", "--show-error", "--verbose", "--cacert", str(sts_pki.ca_pem), "--resolve",
         f"{STS}:{port}:127.0.0.1", "--max-time", "20", f"https://{STS}:{port}/.well-known/mta-sts.txt"],
        capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == POLICY
    assert "ALPN: server accepted http/1.1" in done.stderr.decode() or \
        "ALPN, server accepted to use http/1.1" in done.stderr.decode()


def test_smtp_starttls_never_selects_alpn(edge, sts_pki):
    """Offered http/1.1 (and smtp) with the mta-sts name on port 25: no protocol selected, the oracle signs."""
    context = tls_context(sts_pki)
    context.set_alpn_protocols(["http/1.1", "smtp"])
    client = SmtpClient.connect(edge.site.smtp_port)
    client.ehlo(CLIENT_NAME)
    client.starttls(context, server_hostname=STS)
    assert client.sock.selected_alpn_protocol() is None and client.sock.version() == "TLSv1.3"
    client.ehlo(CLIENT_NAME)
    client.sock.close()


@pytest.fixture(scope="module")
def budgeted_edge(tmp_path_factory, sts_pki):
    """A budget of 2 full handshakes per address, and a request_timeout no test waits for."""
    options = WEB_OPTIONS.replace("request_timeout = 2", "request_timeout = 300")
    with running_edge(tmp_path_factory.mktemp("web-budget"), sts_pki, web=True, web_options=options,
                      tls_options="handshakes_per_minute = 0.01\nhandshake_burst = 2\n") as running:
        yield running


def closed_unanswered(port: int, source: str) -> bool:
    try:
        return http_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", source=source) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("port", ["http_port", "https_port"])
def test_more_connections_than_the_cap_from_one_address_are_closed(budgeted_edge, port):
    """max_connections_per_ip = 4, for both ports together: four idle connections hold the slots; a fifth is closed
    unanswered (on 443 before any handshake); another address is served."""
    edge = budgeted_edge
    source = "127.0.10.1" if port == "http_port" else "127.0.10.2"
    holders = [socket.create_connection(("127.0.0.1", getattr(edge.site, port)), timeout=10,
                                        source_address=(source, 0)) for _ in range(4)]
    try:
        wait_until(lambda: edge.metric("yestls_edge_web_connections") >= 4, 10, "four web connections open")
        assert closed_unanswered(edge.site.http_port, source)
        assert get(edge.site.http_port, "/").startswith(b"HTTP/1.1 404 ")
        assert edge.metric("yestls_edge_web_refused_total", reason="too_many_connections_from_ip") >= 1
    finally:
        for sock in holders:
            sock.close()
    wait_until(lambda: edge.metric("yestls_edge_web_connections") == 0, 10, "the holders closed")
    assert http_exchange(edge.site.http_port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", source=source) \
        .startswith(b"HTTP/1.1 404 ")


def test_the_https_listener_spends_the_smtp_tls_budget(budgeted_edge, sts_pki):
    """The third full handshake from one address is refused and home never asked; SMTP from it is told to wait."""
    edge = budgeted_edge
    for _ in range(2):
        answer, body, _ = https_get(edge, sts_pki, "/.well-known/mta-sts.txt")
        assert answer.status == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(edge, sts_pki, "/.well-known/mta-sts.txt")
    assert len(signed_for(edge, STS)) == 2
    assert edge.metric("yestls_edge_refused_total", reason="tls_budget_address") >= 1
    greeting = SmtpClient.connect(edge.site.smtp_port, read_greeting=False).read_reply()
    assert greeting.code == 421 and "retry later" in greeting.text


# --- configuration, and chains refreshed without a restart ---------------------------------------------------------

def edge_toml(tmp_path, sts_pki, **options):
    site = make_edge_site(tmp_path, sts_pki, **options)
    return edge_config.load(site.config)


def test_web_and_mta_sts_settings(tmp_path, sts_pki):
    plain = edge_toml(tmp_path / "plain", sts_pki)
    assert plain.web is None and plain.oracle.refresh_certificates == 60
    assert plain.mta_sts == MtaStsSettings(MtaStsMode.TESTING, 604800, ("mx.example.org",))
    web = edge_toml(tmp_path / "web", sts_pki, web=True, web_options=WEB_OPTIONS)
    assert web.web.request_timeout == 2 and web.web.max_connections == 100 and web.web.max_connections_per_ip == 4
    assert web.mta_sts.policy() == POLICY
    assert [p.methods for p in web.spool_service.peers] == [None, {"acme_challenge_put", "acme_challenge_delete"}]


@pytest.mark.parametrize("options, error", [
    ('[mta_sts]\nmode = "strict"\n', "mta_sts.mode"),
    ("[mta_sts]\nmax_age = 60\n", "mta_sts.max_age"),
    ('[mta_sts]\nmx = ["MX.example.org"]\n', "mta_sts.mx"),
    ('[mta_sts]\nmx = ["*.*.example.org"]\n', "mta_sts.mx"),
    ("[mta_sts]\nmx = []\n", "mta_sts.mx"),
    ("request_timeout = 0\n", "web.request_timeout"),
    ("unknown = 1\n", "web.unknown"),
])
def test_bad_web_settings_are_refused(tmp_path, sts_pki, options, error):
    with pytest.raises(edge_config.ConfigError) as refused:
        edge_toml(tmp_path, sts_pki, web=True, web_options=options)
    assert error in str(refused.value)


def test_an_acme_peer_needs_http_listen(tmp_path, sts_pki):
    site = make_edge_site(tmp_path, sts_pki, web=True)
    text = site.config.read_text()
    site.config.write_text(text.replace(f'http_listen = ["127.0.0.1:{site.http_port}"]\n', ""))
    with pytest.raises(edge_config.ConfigError, match="may place ACME tokens, but no http_listen"):
        edge_config.load(site.config)


class ListingPool:
    """The oracle pool as refresh_certificates sees it: the chains it lists now."""

    def __init__(self, chains):
        self.chains = chains

    async def certificates(self):
        return [(f"key{n}", chain) for n, chain in enumerate(self.chains)]


def test_a_refresh_gives_smtp_and_https_the_new_chains(tmp_path, pki, sts_pki, caplog):
    """The chain home renews (here: one without mta-sts, then one with it) is served by both within a refresh; the
    HTTPS configuration differs from SMTP's only by ALPN; the expiry metric follows."""
    caplog.set_level(logging.INFO)
    config = edge_toml(tmp_path, sts_pki, web=True, web_options=WEB_OPTIONS)
    registry = CollectorRegistry()
    renewed = make_pki(tmp_path / "renewed", names=(STS, "mx.example.org"), key_types=("ecdsa-p256",))
    old, new = pki.leaves["ecdsa-p256"].chain, renewed.leaves["ecdsa-p256"].chain
    pool = ListingPool([old])
    edge = Edge(config, pool, None, EdgeMetrics(registry), TicketKeyring(os.urandom))
    for _ in range(2):
        asyncio.run(edge.refresh_certificates())
    assert edge.tls_config.certificates == edge.web_tls_config.certificates == [old]
    assert edge.tls_config.alpn_protocols == () and edge.web_tls_config.alpn_protocols == (b"http/1.1",)
    assert edge.web_tls_config.tickets is edge.tls_config.tickets is edge.tickets
    warnings = [r.getMessage() for r in caplog.records if "no certificate covers" in r.getMessage()]
    assert warnings == ["no certificate covers mta-sts.example.org: HTTPS (MTA-STS) handshakes for it are refused "
                        "until the oracle lists one that does"]
    expiry = "yestls_edge_certificate_not_after_seconds"
    assert registry.get_sample_value(expiry, {"name": "localhost"}) == old.not_after().timestamp()
    pool.chains = [new]
    asyncio.run(edge.refresh_certificates())
    assert edge.tls_config.certificates == edge.web_tls_config.certificates == [new]
    assert registry.get_sample_value(expiry, {"name": "localhost"}) is None
    assert registry.get_sample_value(expiry, {"name": STS}) == new.not_after().timestamp()
