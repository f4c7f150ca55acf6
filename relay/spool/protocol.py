"""What both ends of a spool connection agree on, beyond relay.rpc's frames.

Methods: `ping`, `hello`, `auth` (relay.tunnel's identity proof: home's
intake proves its identity key to the edge), then `list`, `fetch`, `ack`,
`wait`, `stats`; the edge's own (`addresses`, the ACME tokens, the
before-queue verdicts). docs/spool-format.md has the details.
"""

import re

from relay import tunnel

SERVICE = "spool"
MAX_FETCH = 1024 * 1024                # the most bytes of a sealed file one `fetch` returns
MAX_FRAME = MAX_FETCH + 256 * 1024     # room for the meta beside a full piece, and for a full `list`
MAX_LIST = 1000                        # entries per `list` answer (~100 KB of JSON)
MAX_WAIT = 60.0                        # seconds one `wait` may hold

# ACME HTTP-01 tokens home's ACME client (relay/certs/http01.py) places on the
# edge (relay/edge/acme.py) for its port 80 to answer; docs/spool-format.md.
ACME_PUT = "acme_challenge_put"        # {"token", "key_authorization", "ttl"} -> {}
ACME_DELETE = "acme_challenge_delete"  # {"token"} -> {}
ACME_METHODS = frozenset({ACME_PUT, ACME_DELETE})
MAX_ACME_TTL = 3600                    # seconds a token is answered at most
MAX_KEY_AUTHORIZATION = 256            # characters
_ACME_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


# Before-queue verdicts (relay/edge/verdict.py, relay/home/judge.py): home long-polls the edge for a
# message waiting in an SMTP session, judges it and answers with rspamd's action and home's sealed token.
VERDICT_WAIT = "verdict_wait"          # {"timeout"} -> {"id", "facts", "budget"} + the message as tail, or {}
VERDICT_ANSWER = "verdict_answer"      # {"id", "action", "token"} -> {}
VERDICT_METHODS = frozenset({VERDICT_WAIT, VERDICT_ANSWER})
MAX_VERDICT_ID = 64                    # characters of a verdict request's id


def is_acme_token(text: str) -> bool:
    """An ACME challenge token as the edge accepts it: 1..128 base64url characters (RFC 8555 8.3)."""
    return _ACME_TOKEN.fullmatch(text) is not None


def auth_message(challenge: bytes, server_address: tuple, client_address: tuple) -> bytes:
    """The identity proof's signed bytes for the spool service."""
    return tunnel.auth_message(SERVICE, challenge, server_address, client_address)
