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

import os
from dataclasses import dataclass
from pathlib import Path

from relay.config import ConfigError, Table
from relay.tunnel import Peer, load_peers


@dataclass(frozen=True)
class OracleConfig:
    listen: tuple[tuple[str, int], ...]
    keystore: Path
    audit_log: Path
    signers: int
    metrics_listen: tuple[str, int] | None
    peers: tuple[Peer, ...]


def load(path: Path) -> OracleConfig:
    table = Table.load(path)
    listen = table.addresses("listen", hint='a list of "HOST:PORT" on the tunnel address')
    if not listen:
        raise table.error("listen", "empty: give the tunnel address to listen on")
    keystore = Path(table.get("keystore", str, hint="the keystore directory made by `yestls keys new`"))
    audit_log = Path(table.get("audit_log", str, hint="a JSON-lines file the oracle appends to"))
    signers = table.get("signers", int, default=min(os.cpu_count() or 1, 4), check=lambda n: 1 <= n <= 64,
                        hint="the number of signing processes, 1..64")
    metrics = table.address("metrics_listen", default=None, hint='"HOST:PORT" on the tunnel address')
    peers = load_peers(table, "the edge")
    table.done()
    return OracleConfig(
        listen=listen,
        keystore=keystore,
        audit_log=audit_log,
        signers=signers,
        metrics_listen=metrics,
        peers=tuple(peers),
    )


__all__ = ["ConfigError", "OracleConfig", "Peer", "load"]
