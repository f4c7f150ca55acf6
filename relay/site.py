"""site.toml: the facts about the whole site that home's certificate and DNS tools need.

Written at home by the roles (roles/key_oracle), from the inventory; read by
`yestls cert ...` (relay/certs/), `yestls dns` and `yestls doctor`. Every
value is public: no key, no password.

    domains = ["example.org", "example.net"]     # the mail domains
    mx_names = ["mx.example.org"]                # the edges' names, MX preference order
    edge_addresses = ["203.0.113.10"]            # the edges' public IPv4 addresses (SPF, A, PTR)
    helo_name = "mx.example.org"                 # the primary edge's PTR name, home's Postfix's HELO
    client_name = "mail.example.org"             # optional: the clients' name (IMAPS, submission)
    keystore = "/var/lib/yestls-oracle/keystore" # the oracle's keystore (public chains read only)
    dkim_records = "/etc/dkimkeys/yestls-dns-records.txt"   # optional: the DKIM TXT records home made
    dmarc = "v=DMARC1; p=none; rua=mailto:postmaster@example.org"   # optional: the advised record

    [mta_sts]
    mode = "testing"                             # testing | enforce | none
    max_age = 604800                             # seconds

    [tls_rpt]
    rua = "mailto:tls-reports@example.org"       # optional: where TLS reports go (a mailbox at home)

    [acme]                                       # optional: certificates by ACME (relay/certs/)
    directory = "https://acme-v02.api.letsencrypt.org/directory"
    email = "postmaster@example.org"             # optional: the account's contact
    challenge = "http-01"                        # http-01 (through the edge) | dns-01 (RFC 2136)
    ca_bundle = "/etc/yestls/acme-ca.pem"        # optional: trust for the ACME server (tests: Pebble)
    state_dir = "/var/lib/yestls-acme"           # the account key, the renewal state
    edges = ["10.77.0.1:7444"]                   # every edge's tunnel service (HTTP-01 tokens go to each)
    identity_key = "/var/lib/yestls-acme/identity.key"   # home's identity key towards the edge
    [acme.dns01]                                 # with challenge = "dns-01"
    server = "192.0.2.53:53"
    zone = "example.org"
    tsig_name = "yestls."
    tsig_algorithm = "hmac-sha256"
    tsig_secret_file = "/etc/yestls/tsig.secret"
"""

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from relay.config import ConfigError, Table, is_ipv4, parse_address

DEFAULT_PATH = Path("/etc/yestls/site.toml")
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


class MtaStsMode(str, Enum):
    TESTING = "testing"
    ENFORCE = "enforce"
    NONE = "none"


class Challenge(str, Enum):
    HTTP_01 = "http-01"
    DNS_01 = "dns-01"


@dataclass(frozen=True)
class Dns01:
    server: tuple[str, int]
    zone: str
    tsig_name: str
    tsig_algorithm: str
    tsig_secret_file: Path


@dataclass(frozen=True)
class Acme:
    directory: str
    email: str | None
    challenge: Challenge
    ca_bundle: Path | None
    state_dir: Path
    edges: tuple[tuple[str, int], ...]
    identity_key: Path | None
    dns01: Dns01 | None


@dataclass(frozen=True)
class Site:
    domains: tuple[str, ...]
    mx_names: tuple[str, ...]
    edge_addresses: tuple[str, ...]
    helo_name: str
    client_name: str | None
    keystore: Path
    dkim_records: Path | None
    dmarc: str | None
    mta_sts_mode: MtaStsMode = MtaStsMode.TESTING
    mta_sts_max_age: int = 604800
    tls_rpt_rua: str | None = None
    acme: Acme | None = None

    def certificate_names(self) -> tuple[str, ...]:
        """The names of the edge's certificate: the MX names, then mta-sts.<domain> unless MTA-STS is off."""
        names = list(self.mx_names)
        if self.mta_sts_mode is not MtaStsMode.NONE:
            names += [f"mta-sts.{domain}" for domain in self.domains]
        return tuple(dict.fromkeys(names))


def _name(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 253 and value == value.lower().strip(".") \
        and all(label and len(label) <= 63 for label in value.split("."))


def _names(table: Table, key: str, hint: str) -> tuple[str, ...]:
    values = table.get(key, list, check=lambda v: bool(v) and all(_name(x) for x in v), hint=hint)
    return tuple(values)


def load(path: Path = DEFAULT_PATH) -> Site:
    table = Table.load(path)
    domains = _names(table, "domains", "a list of lower-case domain names")
    mx_names = _names(table, "mx_names", "the edges' names, lower case, MX preference order")
    edges = table.get("edge_addresses", list, check=lambda v: bool(v) and all(is_ipv4(x) for x in v),
                      hint="the edges' public IPv4 addresses")
    helo = table.get("helo_name", str, default=mx_names[0], check=_name, hint="the edge's PTR name")
    client = table.get("client_name", str, default=None, check=_name, hint="the clients' name")
    keystore = Path(table.get("keystore", str, default="/var/lib/yestls-oracle/keystore"))
    dkim = table.get("dkim_records", str, default=None)
    dmarc = table.get("dmarc", str, default=None, check=lambda v: v.startswith("v=DMARC1"),
                      hint='a DMARC record, "v=DMARC1; p=..."')

    sts = table.table("mta_sts")
    mode = _enum(sts, "mode", MtaStsMode, MtaStsMode.TESTING)
    max_age = sts.get("max_age", int, default=604800, check=lambda v: 86400 <= v <= 31557600,
                      hint="seconds, 1 day to 1 year (RFC 8461)")
    sts.done()
    rpt = table.table("tls_rpt")
    rua = rpt.get("rua", str, default=None, check=lambda v: v.startswith(("mailto:", "https:")),
                  hint='"mailto:ADDRESS" or "https:URL" (RFC 8460)')
    rpt.done()
    acme = _acme(table.table("acme")) if "acme" in table.data else None
    table.done()
    return Site(domains, mx_names, tuple(edges), helo, client, keystore, Path(dkim) if dkim else None, dmarc,
                mode, max_age, rua, acme)


def _enum(table: Table, key: str, kind, default):
    text = table.get(key, str, default=default.value, check=lambda v: v in {m.value for m in kind},
                     hint=" | ".join(m.value for m in kind))
    return kind(text)


def _acme(table: Table) -> Acme:
    directory = table.get("directory", str, default=LETS_ENCRYPT, check=lambda v: v.startswith("https://"),
                          hint="the ACME server's directory URL (https)")
    email = table.get("email", str, default=None, check=lambda v: "@" in v, hint="a contact address")
    challenge = _enum(table, "challenge", Challenge, Challenge.HTTP_01)
    bundle = table.get("ca_bundle", str, default=None)
    state = Path(table.get("state_dir", str, default="/var/lib/yestls-acme"))
    if "edge" in table.data:
        raise table.error("edge", f"every edge takes the HTTP-01 tokens now, in a list: edges = "
                                  f"[{table.data['edge']!r}]")
    edges = table.addresses("edges", default=[], hint='every edge\'s tunnel service, ["HOST:PORT", ...]')
    identity = table.get("identity_key", str, default=None)
    if challenge is Challenge.HTTP_01 and (not edges or identity is None):
        raise table.error("challenge", "http-01 needs edges and identity_key in [acme] (the edges answer the CA)")
    dns01 = None
    if challenge is Challenge.DNS_01:
        section = table.table("dns01")
        server = section.get("server", str, hint='the primary name server, "HOST:PORT"')
        try:
            server_address = parse_address(server)
        except ValueError as error:
            raise section.error("server", f"{error}; write HOST:PORT") from None
        dns01 = Dns01(server_address, section.get("zone", str, check=_name, hint="the zone to update"),
                      section.get("tsig_name", str, hint="the TSIG key's name"),
                      section.get("tsig_algorithm", str, default="hmac-sha256"),
                      Path(section.get("tsig_secret_file", str, hint="a file holding the base64 TSIG secret")))
        section.done()
    elif "dns01" in table.data:
        raise table.error("dns01", 'set only with challenge = "dns-01"')
    table.done()
    return Acme(directory, email, challenge, Path(bundle) if bundle else None, state, edges,
                Path(identity) if identity else None, dns01)


__all__ = ["Acme", "Challenge", "ConfigError", "Dns01", "MtaStsMode", "Site", "load"]
