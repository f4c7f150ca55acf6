"""SPF, DKIM and DMARC at home, as an Authentication-Results header (RFC 8601).

The edge records what these checks need inside the sealed metadata (the
client's address, its HELO, the envelope sender), so home evaluates them with
maintained libraries (authheaders over dkimpy and pyspf) when it delivers. DNS
goes through dnspython; `nameservers`/`port` point it at a chosen resolver
(tests use a local zone).
"""

import functools
import logging

import authheaders
import authheaders.dmarc_lookup
import dns.resolver
from publicsuffix2 import PublicSuffixList

log = logging.getLogger("yestls.intake")
DNS_CACHE_ENTRIES = 10_000


@functools.lru_cache(maxsize=4)
def _suffix_list(location: str) -> PublicSuffixList:
    with open(location) as suffixes:
        return PublicSuffixList(suffixes)


def _org_domain_from_suffix_list(location: str, domain: str) -> str:
    return _suffix_list(str(location)).get_public_suffix(domain)


# authheaders parses the whole Public Suffix List (~10,000 rules, ~40 ms) for
# every DMARC lookup, several per message; parse it once. This is the one
# function all its callers go through (authheaders 0.16.3, pinned).
authheaders.dmarc_lookup.get_org_domain_from_suffix_list = _org_domain_from_suffix_list


class AuthenticationChecker:
    def __init__(self, authserv_id: str, nameservers: tuple[str, ...] = (), port: int = 53):
        self.authserv_id = authserv_id
        if nameservers:
            # dkimpy and pyspf both resolve through dnspython's default resolver.
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = list(nameservers)
            resolver.port = port
            resolver.lifetime = 5.0
            dns.resolver.default_resolver = resolver
        # Answers kept for their TTL, as any resolver does: mail from one
        # sender domain repeats the same SPF and DMARC lookups.
        dns.resolver.get_default_resolver().cache = dns.resolver.LRUCache(DNS_CACHE_ENTRIES)

    def without_forged_results(self, message: bytes) -> bytes:
        """The message without Authentication-Results headers claiming to be ours (RFC 8601 5)."""
        end = message.find(b"\r\n\r\n")
        if end < 0 or b"authentication-results" not in message[:end].lower():
            return message
        lines = message[:end + 2].split(b"\r\n")[:-1]
        kept, dropping = [], False
        for line in lines:
            if line[:1] in (b" ", b"\t"):  # a continuation belongs to the header before it
                if not dropping:
                    kept.append(line)
                continue
            name, _, value = line.partition(b":")
            dropping = (name.strip().lower() == b"authentication-results"
                        and value.split(b";", 1)[0].strip().lower() == self.authserv_id.lower().encode())
            if dropping:
                log.warning("removed an incoming Authentication-Results header forged with our name")
            else:
                kept.append(line)
        return b"\r\n".join(kept) + b"\r\n" + message[end + 2:]

    def header(self, message: bytes, metadata: dict) -> bytes:
        """The Authentication-Results header line(s), CRLF-terminated; a temperror result if checking fails."""
        client = str(metadata.get("client_address") or "")
        ip = client.rpartition(":")[0] or client
        try:
            value = authheaders.authenticate_message(
                message, self.authserv_id, spf=True, dkim=True, dmarc=True,
                ip=ip, mail_from=metadata.get("mail_from") or "", helo=metadata.get("helo") or "")
        except Exception as error:  # noqa: BLE001 - a broken message or DNS must not stop delivery
            log.warning("authentication checks failed (%s: %s)", type(error).__name__, error)
            value = f"Authentication-Results: {self.authserv_id}; none (checks failed: temperror)"
        if not _has_dkim_signature(message):
            # authheaders says "fail" for an unsigned message; RFC 8601 2.7.1 says "none".
            value = value.replace("dkim=fail", "dkim=none", 1)
        return value.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "replace") + b"\r\n"


def _has_dkim_signature(message: bytes) -> bool:
    head = message.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return any(line[:15].lower() == b"dkim-signature:" for line in head.splitlines())
