"""oracle.toml: where the oracle listens, its keystore, and who may ask it to sign.

    listen = ["10.77.0.2:7443"]          # the tunnel address; never a public one
    keystore = "/var/lib/yestls-signer/keystore"  # the signing processes'; the front never reads it
    audit_log = "/var/log/yestls-oracle/audit.jsonl"
    audit_max_bytes = 67108864           # optional: rotate past this size (audit.jsonl.1, ...)
    audit_backups = 5                    # optional: rotated files kept
    audit_refusal_rate = 2.0             # optional: refusal lines per second per source, then summaries
    audit_refusal_burst = 50             # optional: refusal lines per source at once
    signers = 2                          # signing processes (they alone hold the keys)
    signer_socket = "/run/yestls-signer/signer.sock"  # where systemd starts them as their own
                                         # user; without it the front spawns them as itself
                                         # (no privilege separation: tests, development)
    metrics_listen = "10.77.0.2:9464"    # optional; Prometheus, tunnel address only

    [[peer]]
    name = "edge"
    addresses = ["10.77.0.1"]            # source addresses this peer connects from
    identity = "ed25519:..."             # `yestls keys identity-new` on the edge prints it
    max_connections = 4
    max_in_flight = 128
    rate = 50.0                          # signatures per second, sustained
    burst = 100                          # and in a burst
    auth_timeout = 5.0                   # optional: seconds from connect to a proven identity
    max_unauthenticated = 16             # optional: connections waiting to authenticate; the oldest goes
"""

import os
from dataclasses import dataclass
from pathlib import Path

from relay.audit import AuditSettings, load_audit_settings
from relay.config import ConfigError, Table
from relay.tunnel import Peer, load_peers


@dataclass(frozen=True)
class OracleConfig:
    listen: tuple[tuple[str, int], ...]
    keystore: Path
    audit: AuditSettings
    signers: int
    signer_socket: Path | None
    metrics_listen: tuple[str, int] | None
    peers: tuple[Peer, ...]


def load(path: Path) -> OracleConfig:
    table = Table.load(path)
    listen = table.addresses("listen", hint='a list of "HOST:PORT" on the tunnel address')
    if not listen:
        raise table.error("listen", "empty: give the tunnel address to listen on")
    keystore = Path(table.get("keystore", str, hint="the keystore directory made by `yestls keys new`"))
    audit = load_audit_settings(table)
    signers = table.get("signers", int, default=min(os.cpu_count() or 1, 4), check=lambda n: 1 <= n <= 64,
                        hint="the number of signing processes, 1..64")
    signer_socket = table.get("signer_socket", str, default=None, check=lambda p: p.startswith("/"),
                              hint="the absolute path of yestls-signer.socket's Unix socket")
    metrics = table.address("metrics_listen", default=None, hint='"HOST:PORT" on the tunnel address')
    peers = load_peers(table, "the edge")
    table.done()
    return OracleConfig(
        listen=listen,
        keystore=keystore,
        audit=audit,
        signers=signers,
        signer_socket=Path(signer_socket) if signer_socket is not None else None,
        metrics_listen=metrics,
        peers=tuple(peers),
    )


__all__ = ["AuditSettings", "ConfigError", "OracleConfig", "Peer", "load"]
