"""A tiny authoritative DNS server for tests: TXT records from a dict, over UDP on 127.0.0.1.

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
"""

import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

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


@contextmanager
def serve_zone(records: dict[str, list[str]]):
    zone = Zone(dict(records))
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
