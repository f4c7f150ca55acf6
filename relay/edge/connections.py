"""Open connections, in all and per client address: what the SMTP and web listeners' caps count."""

import ipaddress
from collections import Counter

# Connections the kernel completes before the edge accepts them (asyncio's default is 100). A burst beyond
# it is dropped unanswered (the sender's SYN retried after a second or more); within it, each is accepted
# and, over max_connections, told 421 at once. Linux caps it at net.core.somaxconn (4096 by default).
# A multi-process edge has one such backlog per worker.
SMTP_BACKLOG = 1024

TOO_MANY = "too_many_connections"
TOO_MANY_FROM_IP = "too_many_connections_from_ip"


def client_ip(peer) -> str:
    """The address of a transport's peer (a socket address tuple), or "unknown"."""
    return peer[0] if isinstance(peer, tuple) else "unknown"


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client address as an IP address, an IPv4-mapped IPv6 one as its IPv4 address; None if it is none."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ConnectionCounts:
    def __init__(self, gauge):
        self.gauge = gauge   # a prometheus Gauge set to the total
        self.total = 0
        self.per_ip: Counter = Counter()

    def over(self, ip: str, max_total: int, max_per_ip: int) -> str | None:
        """Which cap one more connection from `ip` would break (TOO_MANY, TOO_MANY_FROM_IP), or None."""
        if self.total >= max_total:
            return TOO_MANY
        if self.per_ip[ip] >= max_per_ip:
            return TOO_MANY_FROM_IP
        return None

    def add(self, ip: str) -> None:
        self.total += 1
        self.per_ip[ip] += 1
        self.gauge.set(self.total)

    def remove(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
        self.gauge.set(self.total)
