"""What both ends of an oracle connection agree on, beyond relay.rpc's frames.

Methods: `ping`; `hello` -> {"challenge": hex}; `auth` {"signature": base64}
(the edge's identity key over `auth_message`); `certificates` -> the chains,
key ids and schemes; `sign` {"key_id", "scheme"} + the handshake messages as
the frame tail -> the signature as the tail. docs/rpc.md has the details.
"""

AUTH_CONTEXT = b"yestls oracle auth v1\x00"
CHALLENGE_LEN = 32
# A handshake up to Certificate is a few KiB; chains stay well below this.
MAX_FRAME = 256 * 1024


def auth_message(challenge: bytes, server_address: tuple, client_address: tuple) -> bytes:
    """What the edge signs: the fresh challenge, bound to this connection's two addresses."""
    server = f"{server_address[0]}:{server_address[1]}".encode()
    client = f"{client_address[0]}:{client_address[1]}".encode()
    return AUTH_CONTEXT + challenge + b"\x00" + server + b"\x00" + client
