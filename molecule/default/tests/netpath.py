"""The network path through the edge as the Molecule tests watch it: the TCP
SYNs that arrive on a container's interface, read there with a packet socket
while a test makes connections elsewhere. What crossed the edge is judged by
what arrived (its source address, its MSS), not by the ruleset's text.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Runs in the container: every IPv4 TCP SYN (not SYN-ACK) arriving on the
# interface for one of the ports, until stdin closes; then one JSON line.
_WATCH = r"""
import json, select, socket, struct, sys
interface, ports = sys.argv[1], set(json.loads(sys.argv[2]))
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))  # ETH_P_ALL
s.bind((interface, 0))
print("ready", flush=True)
seen = []
while True:
    readable, _, _ = select.select([s, sys.stdin], [], [], 120)
    if not readable or sys.stdin in readable:
        break
    data, where = s.recvfrom(65535)
    if where[2] == socket.PACKET_OUTGOING or len(data) < 40 or data[0] >> 4 != 4 or data[9] != 6:
        continue
    tcp = data[(data[0] & 15) * 4:]
    if struct.unpack("!H", tcp[2:4])[0] not in ports or tcp[13] & 0x12 != 0x02:
        continue
    options, mss, i = tcp[20:(tcp[12] >> 4) * 4], None, 0
    while i < len(options) and options[i] != 0:
        if options[i] == 1:
            i += 1
            continue
        if options[i] == 2 and i + 4 <= len(options):
            mss = struct.unpack("!H", options[i + 2:i + 4])[0]
        i += max(options[i + 1] if i + 1 < len(options) else 2, 2)
    seen.append([socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20]),
                 struct.unpack("!H", tcp[2:4])[0], mss])
print(json.dumps(seen), flush=True)
"""


@dataclass(frozen=True)
class Syn:
    """A connection's first packet as it arrived on the watched interface."""

    source: str
    destination: str
    port: int
    mss: int | None


@contextmanager
def syns_arriving(name: str, interface: str, ports: list[int]) -> Iterator[list[Syn]]:
    """Watch `interface` of container `name` for SYNs to `ports` while the
    block runs; the list it yields is filled when the block ends."""
    watch = subprocess.Popen(
        ["docker", "exec", "-i", name, "python3", "-c", _WATCH, interface, json.dumps(ports)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    seen: list[Syn] = []
    try:
        assert watch.stdout.readline().strip() == "ready", f"no packet watch on {name} {interface}"
        yield seen
    finally:
        out, _ = watch.communicate("", timeout=60)  # closes its stdin: it prints what it saw
    seen.extend(Syn(*syn) for syn in json.loads(out))
