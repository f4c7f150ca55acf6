#!/usr/bin/python3
"""Zone-file lines (as `yestls dns` prints them: absolute names, no TTL) to dnsmasq's dns-rr lines.

    yestls-zone-to-dnsmasq ZONE...   prints the dnsmasq configuration for the records of each ZONE

dnsmasq answers every record type from a dns-rr line (the record's wire form in hex), so each
record is served exactly as written, whatever its type (MX, A, TXT, TLSA, PTR...).
Comment lines (;) and blank lines are skipped; anything else that does not parse stops it.
"""

import re
import sys

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

LINE = re.compile(r"^(?P<name>\S+)\s+(?:\d+\s+)?(?:IN\s+)?(?P<type>[A-Z][A-Z0-9]*)\s+(?P<data>.+)$", re.IGNORECASE)


def dnsmasq_lines(path: str) -> list[str]:
    out = [f"# {path}"]
    with open(path, encoding="ascii") as zone:
        for number, line in enumerate(zone, 1):
            line = line.strip()
            if not line or line.startswith(";"):
                continue
            match = LINE.match(line)
            if not match:
                sys.exit(f"{path}:{number}: not a zone-file record: {line}")
            rdtype = dns.rdatatype.from_text(match["type"])
            rdata = dns.rdata.from_text(dns.rdataclass.IN, rdtype, match["data"], origin=dns.name.root,
                                        relativize=False)
            out.append(f"dns-rr={match['name'].rstrip('.')},{int(rdtype)},{rdata.to_wire().hex()}")
    return out


if __name__ == "__main__":
    print("# made by yestls-zone-to-dnsmasq")
    print("\n".join(line for path in sys.argv[1:] for line in dnsmasq_lines(path)))
