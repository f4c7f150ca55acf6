"""`yestls dns`: every DNS record the site needs, as zone-file lines, from site.toml and home's files.

What is published, and from where (docs/dns.md explains each record):

    per mail domain   MX (the site's mx_names, preference 10, 20, ...), SPF (ip4: each edge), DMARC
                      (site.dmarc, or the advised p=none with reports to postmaster@), DKIM (home's
                      records file, copied verbatim), _mta-sts TXT (relay/mtasts: the id of the policy the
                      edge serves) and the A of mta-sts.<domain>, _smtp._tls TXT (TLS-RPT, when a rua is
                      set), CAA (the ACME CA's issuer domain, when it is known)
    per edge name     A of each MX name (its own edge's address when there are as many as edges), of
                      the HELO name (every edge) and of the clients' name (the primary edge's: only it
                      forwards the clients' ports; no AAAA: the edge's mail paths are IPv4 only); SPF of the HELO name (`v=spf1 a -all`,
                      for bounces, whose envelope sender is empty); TLSA 3 1 1 at _25._tcp.<MX name> for
                      each key the oracle serves and each key made for the next certificate
    at the provider   PTR of each edge address (a comment: set where the address is rented)

Decisions:

- Names are absolute (trailing dot) and lines carry no TTL: the output pastes into any zone, whose
  $TTL then applies. Record data is written by dnspython's rdata classes, so quoting and the split of
  long TXT strings into 255-byte pieces are the zone-file syntax dnspython reads back.
- With several MX names and as many edge addresses, the n-th name is the n-th edge; otherwise every MX
  name gets every edge address (`mx_addresses`). The doctor expects the same.
- TLSA 3 1 1 (DANE-EE, SPKI, SHA-256) pins the key, not the certificate: a renewal with the same key
  changes nothing in DNS. The values are the keystore's (relay/oracle/keystore.tlsa_records: its
  current keys and the next key `yestls keys rollover` made, from chain and CSR files only), printed
  at each MX name the key's certificate or CSR names.
- DKIM records are copied as home's role wrote them (roles/home_postfix: /etc/dkimkeys/
  yestls-dns-records.txt), never regenerated: home's milter signs with exactly those keys.
"""

import ipaddress
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from dns.rdtypes.ANY.TXT import TXT

from relay import mtasts
from relay.site import LETS_ENCRYPT, MtaStsMode, Site

TXT_PIECE = 255
CA_ISSUERS = {LETS_ENCRYPT: "letsencrypt.org",
              "https://acme-staging-v02.api.letsencrypt.org/directory": "letsencrypt.org"}
_RECORD_LINE = re.compile(r"^(?P<name>\S+)\s+(?:\d+\s+)?IN\s+TXT\s+(?P<data>.*)$", re.IGNORECASE | re.DOTALL)


# --- the values --------------------------------------------------------------------------------------------

def mx_addresses(site: Site) -> dict[str, tuple[str, ...]]:
    """Each MX name's A records: pairwise when there are as many names as edges, else every edge."""
    if len(site.mx_names) == len(site.edge_addresses) > 1:
        return {name: (address,) for name, address in zip(site.mx_names, site.edge_addresses)}
    return {name: site.edge_addresses for name in site.mx_names}


def client_addresses(site: Site) -> tuple[str, ...]:
    """The clients' name's A records: the primary edge's (the first MX name's): only it forwards the clients'
    ports to home (home's replies route through it)."""
    return mx_addresses(site)[site.mx_names[0]]


def ptr_name(site: Site, address: str) -> str:
    """The name an edge address's PTR should give: the HELO name for the primary edge's (home's mail leaves
    from it), each other edge's own MX name (its A record points back)."""
    if address in client_addresses(site):
        return site.helo_name
    return next(name for name, addresses in mx_addresses(site).items() if address in addresses)


def spf_record(site: Site) -> str:
    return "v=spf1 " + " ".join(f"ip4:{address}" for address in site.edge_addresses) + " -all"


HELO_SPF = "v=spf1 a -all"


def dmarc_record(site: Site, domain: str) -> str:
    return site.dmarc or f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}"


def mta_sts_policy(site: Site) -> bytes:
    return mtasts.policy_text(site.mta_sts_mode.value, site.mx_names, site.mta_sts_max_age)


def tls_rpt_record(site: Site) -> str | None:
    return f"v=TLSRPTv1; rua={site.tls_rpt_rua}" if site.tls_rpt_rua else None


def caa_issuer(site: Site) -> str | None:
    """The CAA issuer-domain of the site's ACME CA, when we know it (Let's Encrypt)."""
    return CA_ISSUERS.get(site.acme.directory) if site.acme is not None else None


def tlsa_records(keystore_dir: Path) -> list:
    """The keystore's current and next keys' TLSA 3 1 1 values (relay/oracle/keystore.py: chain and CSR files
    only, no private key opened). Raises KeystoreError or OSError when the keystore cannot be read."""
    from relay.oracle.keystore import tlsa_records as keystore_tlsa_records

    return keystore_tlsa_records(keystore_dir)


def tlsa_for(records: list, name: str, role=None) -> list:
    """The records of keys whose names include `name` (of `role` when given)."""
    return [r for r in records if name in r.names and (role is None or r.role is role)]


@dataclass(frozen=True)
class DkimRecord:
    name: str     # absolute, lower case, no trailing dot: yestls-rsa._domainkey.example.org
    line: str     # as the file has it
    value: str    # the TXT strings joined: "v=DKIM1; k=rsa; p=..."

    @property
    def selector(self) -> str:
        return self.name.split("._domainkey.", 1)[0]


class DkimRecordsError(Exception):
    pass


def dkim_records(path: Path) -> list[DkimRecord]:
    """The TXT records of home's DKIM records file (zone-file lines, `;` comments).

    Raises FileNotFoundError when the file is not there yet, DkimRecordsError when a line is not a TXT record.
    """
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        match = _RECORD_LINE.match(line.strip())
        try:
            if match is None:
                raise ValueError("not NAME IN TXT DATA")
            rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, match["data"])
        except (ValueError, dns.exception.DNSException) as error:
            raise DkimRecordsError(f"{path}:{number}: not a TXT record ({error})") from None
        value = b"".join(rdata.strings).decode("ascii", "replace")
        records.append(DkimRecord(match["name"].lower().rstrip("."), line, value))
    return records


def _under(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


# --- the zone lines ------------------------------------------------------------------------------------------

def _txt(text: str) -> str:
    """TXT data as the zone file writes it: quoted, in pieces of at most 255 bytes."""
    data = text.encode()
    pieces = [data[i:i + TXT_PIECE] for i in range(0, len(data), TXT_PIECE)] or [b""]
    return TXT(dns.rdataclass.IN, dns.rdatatype.TXT, pieces).to_text()


def _rdata_text(rdtype: str, text: str) -> str:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text).to_text()


class Zone:
    """Lines of a zone file: records with absolute names, comments."""

    def __init__(self):
        self.lines: list[str] = []

    def comment(self, text: str) -> None:
        self.lines.extend(f"; {line}".rstrip() for line in text.splitlines())

    def record(self, name: str, rdtype: str, data: str, note: str = "") -> None:
        owner = dns.name.from_text(name).to_text()
        self.lines.append(f"{owner:<40} IN {rdtype:<5} {data}" + (f"   ; {note}" if note else ""))

    def blank(self) -> None:
        self.lines.append("")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def zone_text(site: Site, source: str = "site.toml") -> str:
    zone = Zone()
    zone.comment(f"YesTLS: the DNS records to publish (yestls dns, from {source}).\n"
                 "Names are absolute; lines carry no TTL (the zone's $TTL applies). docs/dns.md explains each.")
    dkim, dkim_problem = _dkim(site)
    for domain in site.domains:
        zone.blank()
        _domain_records(zone, site, domain, dkim, dkim_problem)
    zone.blank()
    _edge_records(zone, site)
    return zone.text()


def _dkim(site: Site) -> tuple[list[DkimRecord], str | None]:
    if site.dkim_records is None:
        return [], "site.toml names no dkim_records file"
    try:
        return dkim_records(site.dkim_records), None
    except FileNotFoundError:
        return [], f"{site.dkim_records} is not there yet: home's first deploy (roles/home_postfix) writes it"
    except (OSError, DkimRecordsError) as error:
        return [], str(error)


def _domain_records(zone: Zone, site: Site, domain: str, dkim: list[DkimRecord], dkim_problem: str | None) -> None:
    zone.comment(f"==== {domain} ====")
    for preference, name in enumerate(site.mx_names, start=1):
        zone.record(domain, "MX", f"{preference * 10} {name}.")
    zone.record(domain, "TXT", _txt(spf_record(site)), "SPF: mail from this domain leaves from the edge")
    zone.record(f"_dmarc.{domain}", "TXT", _txt(dmarc_record(site, domain)),
                "DMARC" if site.dmarc else "DMARC: p=none to start; p=quarantine once the reports look right")
    mine = [record for record in dkim if record.name.endswith(f"._domainkey.{domain}")]
    if mine:
        zone.comment(f"DKIM, home's keys (verbatim from {site.dkim_records}):")
        zone.lines.extend(record.line for record in mine)
    else:
        zone.comment(f"DKIM: the TXT records of home's keys go here; {dkim_problem or 'none for ' + domain}")
    if site.mta_sts_mode is MtaStsMode.NONE:
        zone.comment("MTA-STS is off (mode none): publish no _mta-sts record (remove one published before)")
    else:
        zone.record(f"_mta-sts.{domain}", "TXT", _txt(mtasts.txt_record(mta_sts_policy(site))),
                    f"MTA-STS, mode {site.mta_sts_mode.value}: the id changes with the policy")
        for address in site.edge_addresses:
            zone.record(f"mta-sts.{domain}", "A", address, "the edge serves the policy over HTTPS")
    rpt = tls_rpt_record(site)
    if rpt:
        zone.record(f"_smtp._tls.{domain}", "TXT", _txt(rpt), "TLS-RPT: senders' daily TLS reports")
    else:
        zone.comment("TLS-RPT: set [tls_rpt] rua in site.toml to receive senders' TLS reports")
    _caa(zone, site, domain)


def _caa(zone: Zone, site: Site, domain: str) -> None:
    issuer = caa_issuer(site)
    if issuer is not None:
        zone.record(domain, "CAA", _rdata_text("CAA", f'0 issue "{issuer}"'),
                    "optional: only this CA may issue certificates for the domain")
    elif site.acme is not None:
        zone.comment(f"CAA (optional): 0 issue \"<your CA's issuer domain>\" for {site.acme.directory}")
    else:
        zone.comment("CAA (optional): 0 issue \"<your CA's issuer domain>\", the CA that signs the edge's CSR")


def _edge_records(zone: Zone, site: Site) -> None:
    zone.comment("==== the edge's names ====")
    addresses = mx_addresses(site)
    named: dict[str, tuple[str, ...]] = dict(addresses)
    named.setdefault(site.helo_name, client_addresses(site))   # the primary's: where home's mail leaves from
    if site.client_name:
        named.setdefault(site.client_name, client_addresses(site))
    for name, edge in named.items():
        why = ("MX" if name in addresses else "") or ("HELO name" if name == site.helo_name else "clients' name")
        for address in edge:
            zone.record(name, "A", address, why)
    zone.comment("No AAAA for these names: the edge's mail paths are IPv4 only (an AAAA would send mail where "
                 "nothing answers).")
    for helo in dict.fromkeys(ptr_name(site, address) for address in site.edge_addresses):
        zone.record(helo, "TXT", _txt(HELO_SPF), "SPF of a HELO name (home's mail leaves through that edge when "
                                                 "the ones before it do not answer): bounces have an empty sender")
    _tlsa(zone, site)
    zone.blank()
    zone.comment("PTR: set at the provider of each edge address (not in your zone); the primary edge's must be "
                 "the HELO name,\nanother edge's its MX name, whose A record above points back (forward-confirmed "
                 "reverse DNS):")
    for address in site.edge_addresses:
        reverse = ipaddress.ip_address(address).reverse_pointer
        zone.comment(f"  {reverse}. IN PTR {ptr_name(site, address)}.")


def _tlsa(zone: Zone, site: Site) -> None:
    from relay.oracle.keystore import KeystoreError

    try:
        records = tlsa_records(site.keystore)
    except (KeystoreError, OSError) as error:
        zone.comment(f"TLSA (DANE): cannot read the keystore {site.keystore} ({error}); run as root at home")
        return
    zone.comment("TLSA (DANE): useful only in a DNSSEC-signed zone. Publish a next key's record before "
                 "`yestls keys rollover --switch`.")
    for name in site.mx_names:
        mine = tlsa_for(records, name)
        if not mine:
            zone.comment(f"  no key in {site.keystore} names {name} yet")
        for record in mine:
            zone.record(f"_25._tcp.{name}", "TLSA", _rdata_text("TLSA", f"3 1 1 {record.sha256}"),
                        f"{record.role.value} key")


def run(args) -> int:
    from relay import site as site_module

    try:
        site = site_module.load(args.site)
    except site_module.ConfigError as error:
        print(f"yestls dns: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(zone_text(site, str(args.site)))
    return 0
