"""The MTA-STS policy (RFC 8461): its text, served by the edge, and its id, published in DNS.

One function makes both from the same settings, so the `_mta-sts` TXT record's
id changes exactly when the served policy does (the id is a digest of it).
"""

import hashlib

POLICY_PATH = "/.well-known/mta-sts.txt"


def policy_text(mode: str, mx_names: tuple[str, ...] | list[str], max_age: int) -> bytes:
    """The policy file: CRLF lines, the MX names in the order given (RFC 8461 3.2)."""
    lines = ["version: STSv1", f"mode: {mode}"] + [f"mx: {name}" for name in mx_names] + [f"max_age: {max_age}"]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def policy_id(policy: bytes) -> str:
    """The `id=` of the `_mta-sts` record: 1 to 32 letters and digits (RFC 8461 3.1), from the policy's digest."""
    return hashlib.sha256(policy).hexdigest()[:32]


def txt_record(policy: bytes) -> str:
    return f"v=STSv1; id={policy_id(policy)}"
