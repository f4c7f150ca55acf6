"""A key oracle's home for tests: keystore from the test PKI, edge identity, oracle.toml.

    home = make_oracle_home(tmp_path, pki, ("ecdsa-p256", "rsa-2048"))
    with run_oracle(home) as oracle:       # `yestls oracle serve` in a subprocess
        ... oracle.port ...
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from relay.identity import generate_identity, load_identity
from relay.oracle.keystore import Keystore, key_id
from relay.private_files import create_private_file

from .interop_helpers import free_port
from .pki import TestPKI
from .services import ServiceProcess, running, start_service


@dataclass
class OracleHome:
    directory: Path
    config: Path
    keystore: Path
    audit_log: Path
    identity_path: Path
    port: int
    key_ids: dict[str, str]   # key type -> key id

    @property
    def identity(self):
        return load_identity(self.identity_path)

    def audit_lines(self) -> list[dict]:
        import json

        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]


def make_oracle_home(directory: Path, pki: TestPKI, key_types=("ecdsa-p256",), *, signers: int = 1,
                     peer_options: str = "", settings: str = "", port: int | None = None,
                     metrics_port: int | None = None) -> OracleHome:
    """`settings` are more top-level lines of oracle.toml (audit_*), `peer_options` more lines of the [[peer]]."""
    directory.mkdir(parents=True, exist_ok=True)
    keystore_dir = directory / "keystore"
    keystore_dir.mkdir(mode=0o700, exist_ok=True)
    keystore = Keystore(keystore_dir)
    ids = {}
    for key_type in key_types:
        leaf = pki.leaves[key_type]
        ids[key_type] = key_id(leaf.key.public_key())
        pem = leaf.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        create_private_file(keystore.key_path(ids[key_type]), pem)
        keystore.import_chain(leaf.chain_pem.read_bytes())
    identity_path = directory / "edge-identity.key"
    identity_text = generate_identity(identity_path)
    port = port or free_port()
    metrics = f'metrics_listen = "127.0.0.1:{metrics_port}"\n' if metrics_port else ""
    config = directory / "oracle.toml"
    config.write_text(
        f'listen = ["127.0.0.1:{port}"]\n'
        f'keystore = "{keystore_dir}"\n'
        f'audit_log = "{directory / "audit.jsonl"}"\n'
        f"signers = {signers}\n{metrics}{settings}\n"
        "[[peer]]\n"
        'name = "edge"\n'
        'addresses = ["127.0.0.1"]\n'
        f'identity = "{identity_text}"\n'
        f"{peer_options}\n"
    )
    return OracleHome(directory, config, keystore_dir, directory / "audit.jsonl", identity_path, port, ids)


OracleProcess = ServiceProcess


def start_oracle(home: OracleHome, timeout: float = 20.0) -> ServiceProcess:
    """`yestls oracle serve` in a subprocess, returned once it listens."""
    return start_service(["oracle", "serve", "--config", str(home.config)], home.directory, r"oracle listening on",
                         name="oracle", timeout=timeout, port=home.port)


@contextmanager
def run_oracle(home: OracleHome):
    with running(start_oracle(home)) as oracle:
        yield oracle
