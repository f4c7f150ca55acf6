"""What both ends of a spool connection agree on, beyond relay.rpc's frames.

Methods: `ping`, `hello`, `auth` (relay.tunnel's identity proof: home's
intake proves its identity key to the edge), then `list`, `fetch`, `ack`,
`wait`, `stats`. docs/spool-format.md has the details.
"""

from relay import tunnel

SERVICE = "spool"
MAX_FETCH = 1024 * 1024                # the most bytes of a sealed file one `fetch` returns
MAX_FRAME = MAX_FETCH + 256 * 1024     # room for the meta beside a full piece, and for a full `list`
MAX_LIST = 1000                        # entries per `list` answer (~100 KB of JSON)
MAX_WAIT = 60.0                        # seconds one `wait` may hold


def auth_message(challenge: bytes, server_address: tuple, client_address: tuple) -> bytes:
    """The identity proof's signed bytes for the spool service."""
    return tunnel.auth_message(SERVICE, challenge, server_address, client_address)
