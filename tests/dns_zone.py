"""Tiny authoritative DNS servers for tests, over UDP on 127.0.0.1: TXT records from a dict, or a whole zone.

    with serve_zone({"example.net": ["v=spf1 ip4:127.0.0.1 -all"]}) as zone:
        ... point a resolver at 127.0.0.1:zone.port ...
        zone.records["other.example"] = ["..."]   # may change while it runs
        zone.queries                              # [(name, type name), ...] as asked

Every name in `records` exists and answers TXT queries with its strings (a
string over 255 bytes is split into several character-strings, as DKIM keys
need); other types at an existing name get an empty answer (NODATA); any
other name is NXDOMAIN. Names match without regard to case or a trailing dot.
The server runs in a daemon thread and stops, within a bounded time, when
the `with` block ends.

    with serve_zone_text(ZONE_TEXT, authenticated=True) as served:
        served.zone             # a dns.zone.Zone: change or delete records while it runs
        served.servfail.add("example.org")   # answer SERVFAIL for that name
        served.silent.add("example.org")     # never answer for it (the resolver times out)

answers every type from a zone file's records (absolute names, `$TTL` given),
with the AD flag set when `authenticated` (as a validating resolver does).
"""

import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset
import dns.zone

TTL = 60
MAX_STRING = 255


def _key(name: str) -> str:
    return name.lower().rstrip(".")


@dataclass
class Zone:
    records: dict[str, list[str]]
    port: int = 0
    queries: list[tuple[str, str]] = field(default_factory=list)

    def answer(self, wire: bytes) -> bytes | None:
        """The response to one query datagram; None for junk (dropped, as a server would)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - anything unparsable is ignored
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text()
        self.queries.append((_key(name), dns.rdatatype.to_text(question.rdtype)))
        strings = {_key(k): v for k, v in self.records.items()}.get(_key(name))
        if strings is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT:
            rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, dns.rdatatype.TXT)
            for text in strings:
                data = text.encode()
                pieces = [data[i:i + MAX_STRING] for i in range(0, len(data), MAX_STRING)] or [b""]
                rrset.add(dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, pieces), TTL)
            response.answer.append(rrset)
        return response.to_wire()


@dataclass
class ZoneFile:
    zone: dns.zone.Zone
    authenticated: bool = False
    port: int = 0
    servfail: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    queries: list[tuple[str, str]] = field(default_factory=list)

    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - anything unparsable is ignored
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | (dns.flags.AD if self.authenticated else 0)
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = _key(question.name.to_text())
        self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
        if name in self.silent:
            return None
        if name in self.servfail:
            response.flags &= ~(dns.flags.AA | dns.flags.AD)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        node = self.zone.get_node(question.name)
        if node is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            rdataset = node.get_rdataset(dns.rdataclass.IN, question.rdtype)
            if rdataset is not None:
                response.answer.append(dns.rrset.from_rdata_list(question.name, rdataset.ttl, list(rdataset)))
        try:
            return response.to_wire(max_size=query.payload if query.edns >= 0 else 512)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()


@contextmanager
def serve_zone(records: dict[str, list[str]]):
    """TXT records from a dict (see the module)."""
    with _serve(Zone(dict(records))) as zone:
        yield zone


@contextmanager
def serve_zone_text(text: str, authenticated: bool = False):
    """Every record of a zone file (absolute names, a $TTL line), as an authoritative server would."""
    zone = dns.zone.from_text(text, origin=dns.name.root, relativize=False, check_origin=False)
    with _serve(ZoneFile(zone, authenticated)) as served:
        yield served


@contextmanager
def _serve(zone):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    zone.port = sock.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                wire, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = zone.answer(wire)
            if reply is not None:
                sock.sendto(reply, peer)

    thread = threading.Thread(target=serve, name="dns-zone", daemon=True)
    thread.start()
    try:
        yield zone
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()
