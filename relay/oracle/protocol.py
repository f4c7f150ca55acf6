"""What both ends of an oracle connection agree on, beyond relay.rpc's frames.

Methods: `ping`, `hello`, `auth` (relay.tunnel's identity proof), then
`certificates` -> the chains, key ids and schemes; `sign` {"key_id",
"scheme"} + the handshake messages as the frame tail -> the signature as the
tail. docs/rpc.md has the details.
"""

from relay import tunnel

SERVICE = "oracle"
# A handshake up to Certificate is a few KiB; chains stay well below this.
MAX_FRAME = 256 * 1024


def auth_message(challenge: bytes, server_address: tuple, client_address: tuple) -> bytes:
    """The identity proof's signed bytes for the oracle service."""
    return tunnel.auth_message(SERVICE, challenge, server_address, client_address)
