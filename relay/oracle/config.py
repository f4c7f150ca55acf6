"""oracle.toml: where the oracle listens, its keystore, and who may ask it to sign.

    listen = ["10.77.0.2:7443"]          # the tunnel address; never a public one
    keystore = "/var/lib/yestls-oracle/keystore"
    audit_log = "/var/log/yestls-oracle/audit.jsonl"
    signers = 2                          # signing processes (they alone hold the keys)
    metrics_listen = "10.77.0.2:9464"    # optional; Prometheus, tunnel address only

    [[peer]]
    name = "edge"
    addresses = ["10.77.0.1"]            # source addresses this peer connects from
    identity = "ed25519:..."             # `yestls keys identity-new` on the edge prints it
    max_connections = 4
    max_in_flight = 128
    rate = 50.0                          # signatures per second, sustained
    burst = 100                          # and in a burst
"""

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from relay.config import ConfigError, Table, parse_address
from relay.identity import parse_public_key_text


@dataclass(frozen=True)
class Peer:
    name: str
    addresses: frozenset[str]
    identity: Ed25519PublicKey
    max_connections: int
    max_in_flight: int
    rate: float
    burst: int


@dataclass(frozen=True)
class OracleConfig:
    listen: tuple[tuple[str, int], ...]
    keystore: Path
    audit_log: Path
    signers: int
    metrics_listen: tuple[str, int] | None
    peers: tuple[Peer, ...]

    def peer_for_address(self, address: str) -> Peer | None:
        return next((p for p in self.peers if address in p.addresses), None)


def _address(table: Table, key: str, text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as error:
        raise table.error(key, f"{error}; write HOST:PORT with the tunnel address") from None


def _ip(table: Table, key: str, text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise table.error(key, f"{text!r} is not an IP address") from None


def load(path: Path) -> OracleConfig:
    table = Table.load(path)
    listen = table.get("listen", list, check=lambda v: v and all(isinstance(x, str) for x in v),
                       hint='a list of "HOST:PORT" on the tunnel address')
    keystore = Path(table.get("keystore", str, hint="the keystore directory made by `yestls keys new`"))
    audit_log = Path(table.get("audit_log", str, hint="a JSON-lines file the oracle appends to"))
    signers = table.get("signers", int, default=min(os.cpu_count() or 1, 4), check=lambda n: 1 <= n <= 64,
                        hint="the number of signing processes, 1..64")
    metrics = table.get("metrics_listen", str, default=None, hint='"HOST:PORT" on the tunnel address')
    peers = []
    for peer in table.tables("peer"):
        name = peer.get("name", str, check=bool, hint="a label for logs and metrics")
        addresses = peer.get("addresses", list, check=bool, hint="the peer's tunnel source addresses")
        identity_text = peer.get("identity", str, hint="the edge's `yestls keys identity-new` output")
        try:
            identity = parse_public_key_text(identity_text)
        except ValueError as error:
            raise peer.error("identity", f"{error}; paste the line `yestls keys identity-new` printed") from None
        peers.append(Peer(
            name=name,
            addresses=frozenset(_ip(peer, "addresses", a) for a in addresses),
            identity=identity,
            max_connections=peer.get("max_connections", int, default=4, check=lambda n: n >= 1),
            max_in_flight=peer.get("max_in_flight", int, default=128, check=lambda n: n >= 1),
            rate=float(peer.get("rate", (int, float), default=50.0, check=lambda r: r > 0,
                                hint="signatures per second")),
            burst=peer.get("burst", int, default=100, check=lambda n: n >= 1),
        ))
        peer.done()
    if not peers:
        raise table.error("peer", "no [[peer]]: nobody could use the oracle; add the edge as a [[peer]]")
    table.done()
    return OracleConfig(
        listen=tuple(_address(table, "listen", a) for a in listen),
        keystore=keystore,
        audit_log=audit_log,
        signers=signers,
        metrics_listen=_address(table, "metrics_listen", metrics) if metrics else None,
        peers=tuple(peers),
    )


__all__ = ["ConfigError", "OracleConfig", "Peer", "load"]
