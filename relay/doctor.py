"""`yestls doctor`: are the site's DNS records, MTA-STS policy and MX certificate what they must be, live?

Run at home (it reads site.toml, the keystore's public side and home's DKIM records file). Each check
is one small function returning one `Result` per thing it looks at (a domain, a name, an address):
a `Verdict` (pass, warn, fail), what was found, and the fix. The table prints them in order; `--json`
gives the same for scripts; the exit status is 1 when any line fails. Modelled on Mox's
`config dnscheck` and Mail-in-a-Box's status checks.

    MX            each domain's MX hosts are the site's mx_names (preference order: warn)
    A             each MX name's A records are its edge addresses; no AAAA (warn: the edge is IPv4 only);
                  the clients' name points at the edge
    PTR           each edge address's PTR is the HELO name, whose A points back (FCrDNS)
    SPF           pyspf evaluates each domain's policy for each edge address (s=postmaster@domain,
                  h=HELO name): pass, nothing less; and the HELO name's own policy (bounces)
    DKIM          each selector of home's records file is published with home's public key (p=)
    DMARC         published (fail when absent, warn on p=none)
    MTA-STS       the _mta-sts TXT's id is the configured policy's (relay/mtasts); the policy fetched over
                  HTTPS (certificate verified) has the configured mode and the DNS MX names
    TLS-RPT       the _smtp._tls TXT names site.toml's rua
    TLSA          _25._tcp.<MX> has 3 1 1 of the key the MX serves (fail otherwise, warn when absent), and of
                  the next key when the keystore has one (warn: publish it before the rollover);
                  the answer is DNSSEC-authentic, AD bit set by a validating resolver (warn otherwise)
    certificate   a live STARTTLS to each MX address on port 25: verified (system CAs or --ca-file), the
                  MX name in it, not expiring within 21 days (warn)
    outbound 25   Postfix's journal at home: a recent delivery out (status=sent) proves the edge lets TCP
                  25 out, since home's mail leaves through it; only timeouts connecting to port 25 is a
                  fail; no outbound delivery in 7 days, or a journal we cannot read, is a warn to check
                  by hand. Home cannot open a connection from the edge's address itself, and `yestls
                  status` has no record of the edge's outbound flows; the log of real deliveries is
                  the evidence there is.

DNS goes through one dnspython resolver (the system's, or --nameserver), with the AD flag asked for.
Every failure to get an answer is a result, never an exception: NXDOMAIN and "no record of that type"
say what to publish; SERVFAIL (often a broken DNSSEC chain) and timeouts say the name server or
resolver is at fault. pyspf resolves through dnspython's default resolver: it is pointed at ours for
the duration of each evaluation only.
"""

import contextlib
import datetime
import http.client
import json
import re
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import dns.exception
import dns.flags
import dns.name
import dns.resolver
import dns.reversename
import spf
from cryptography import x509

from relay import dnsrecords, mtasts
from relay.config import parse_address
from relay.site import MtaStsMode, Site

DNS_LIFETIME = 5.0         # seconds per lookup, retries included
CONNECT_TIMEOUT = 10.0     # seconds for STARTTLS and the policy fetch
MAX_POLICY = 64 * 1024     # bytes: RFC 8461 3.3 caps a policy at 64 KiB
RENEW_WARNING = 21 * 86400  # seconds before expiry a certificate is a warn (as `yestls status`)
OUTBOUND_WINDOW = "-7d"    # how far back Postfix's journal is searched


class Verdict(str, Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


class Check(str, Enum):
    MX = "MX"
    A = "A"
    PTR = "PTR"
    SPF = "SPF"
    HELO_SPF = "SPF (HELO)"
    DKIM = "DKIM"
    DMARC = "DMARC"
    MTA_STS = "MTA-STS"
    MTA_STS_POLICY = "MTA-STS policy"
    TLS_RPT = "TLS-RPT"
    TLSA = "TLSA"
    TLSA_NEXT = "TLSA (next key)"
    DNSSEC = "DNSSEC"
    CERTIFICATE = "certificate"
    OUTBOUND_25 = "outbound 25"


@dataclass(frozen=True)
class Result:
    check: Check
    subject: str
    verdict: Verdict
    message: str
    fix: str = ""

    def as_json(self) -> dict:
        return {"check": self.check.value, "subject": self.subject, "verdict": self.verdict.value,
                "message": self.message, "fix": self.fix}


def passed(check: Check, subject: str, message: str) -> Result:
    return Result(check, subject, Verdict.PASS, message)


def warned(check: Check, subject: str, message: str, fix: str) -> Result:
    return Result(check, subject, Verdict.WARN, message, fix)


def failed(check: Check, subject: str, message: str, fix: str) -> Result:
    return Result(check, subject, Verdict.FAIL, message, fix)


# --- DNS, every outcome a value ------------------------------------------------------------------------

class Outcome(str, Enum):
    ANSWER = "answer"
    NXDOMAIN = "no such name (NXDOMAIN)"
    NODATA = "no record of that type"
    SERVFAIL = "the resolver failed (SERVFAIL or refused)"
    TIMEOUT = "no answer in time"
    ERROR = "a broken answer"


@dataclass(frozen=True)
class Lookup:
    name: str
    rdtype: str
    outcome: Outcome
    records: tuple = ()
    authentic: bool = False    # the AD bit: a validating resolver checked the DNSSEC chain
    detail: str = ""

    @property
    def found(self) -> bool:
        return self.outcome is Outcome.ANSWER

    @property
    def missing(self) -> bool:
        """Nothing published (as opposed to: we could not ask)."""
        return self.outcome in (Outcome.NXDOMAIN, Outcome.NODATA)

    def why(self) -> str:
        extra = f": {self.detail}" if self.detail else ""
        return f"{self.rdtype} {self.name}: {self.outcome.value}{extra}"

    def texts(self) -> list[str]:
        """TXT records, each one's strings joined (RFC 7208 3.3)."""
        return [b"".join(r.strings).decode("utf-8", "replace") for r in self.records]


class Dns:
    """One resolver, asked with the AD flag; answers cached for the run."""

    def __init__(self, nameserver: tuple[str, int] | None = None, lifetime: float = DNS_LIFETIME):
        if nameserver is None:
            self.resolver = dns.resolver.Resolver()
        else:
            self.resolver = dns.resolver.Resolver(configure=False)
            self.resolver.nameservers = [nameserver[0]]
            self.resolver.port = nameserver[1]
        self.resolver.lifetime = lifetime
        self.resolver.use_edns(0, 0, 1232)
        self.resolver.flags = dns.flags.RD | dns.flags.AD
        self._cache: dict[tuple[str, str], Lookup] = {}

    def lookup(self, name: str, rdtype: str) -> Lookup:
        key = (name.lower().rstrip("."), rdtype)
        if key not in self._cache:
            self._cache[key] = self._ask(*key)
        return self._cache[key]

    def _ask(self, name: str, rdtype: str) -> Lookup:
        try:
            answer = self.resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            return Lookup(name, rdtype, Outcome.NXDOMAIN)
        except dns.resolver.NoAnswer:
            return Lookup(name, rdtype, Outcome.NODATA)
        except dns.resolver.NoNameservers as error:
            return Lookup(name, rdtype, Outcome.SERVFAIL, detail=_first_line(error))
        except dns.exception.Timeout:
            return Lookup(name, rdtype, Outcome.TIMEOUT, detail=f"{self.resolver.lifetime:g} s")
        except dns.exception.DNSException as error:
            return Lookup(name, rdtype, Outcome.ERROR, detail=_first_line(error))
        authentic = bool(answer.response.flags & dns.flags.AD)
        return Lookup(name, rdtype, Outcome.ANSWER, tuple(answer), authentic)

    @contextlib.contextmanager
    def as_default(self):
        """pyspf resolves through dnspython's default resolver: make it ours while it runs."""
        saved = dns.resolver.default_resolver
        dns.resolver.default_resolver = self.resolver
        try:
            yield
        finally:
            dns.resolver.default_resolver = saved


def _first_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]


def _trouble(check: Check, subject: str, lookup: Lookup) -> Result:
    """The result when a lookup got no usable answer: publish it, or fix the name server."""
    if lookup.missing:
        return failed(check, subject, f"not published ({lookup.why()})", "publish the record `yestls dns` prints")
    return failed(check, subject, f"cannot be checked ({lookup.why()})",
                  "the name server or resolver does not answer: check the zone is served and, if signed, "
                  "that its DNSSEC chain is valid (SERVFAIL), then run doctor again")


# --- live TLS: STARTTLS and the policy fetch --------------------------------------------------------------

@dataclass(frozen=True)
class TlsProbe:
    certificate: x509.Certificate | None = None
    verify_error: str | None = None     # why the chain did not verify, when it did not
    error: str | None = None            # why there is no certificate at all
    refused: bool = False               # the connection was refused (nothing listens)


def _context(ca_file: Path | None, verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def starttls_certificate(name: str, address: str, port: int, context: ssl.SSLContext,
                         timeout: float = CONNECT_TIMEOUT) -> x509.Certificate:
    """The certificate the MX at `address` shows after STARTTLS, for `name` (raises on any failure)."""
    with smtplib.SMTP(address, port, local_hostname="doctor.yestls.invalid", timeout=timeout) as smtp:
        smtp.ehlo()
        if not smtp.has_extn("starttls"):
            raise smtplib.SMTPNotSupportedError("the MX does not offer STARTTLS")
        code, reply = smtp.docmd("STARTTLS")
        if code != 220:
            raise smtplib.SMTPResponseException(code, reply)
        # As smtplib.starttls does, with the MX name (not the address we connected to) as the server name.
        smtp.sock = context.wrap_socket(smtp.sock, server_hostname=name)
        smtp.file = None
        return x509.load_der_x509_certificate(smtp.sock.getpeercert(binary_form=True))


def probe_starttls(name: str, address: str, port: int, ca_file: Path | None) -> TlsProbe:
    try:
        return TlsProbe(starttls_certificate(name, address, port, _context(ca_file, verify=True)))
    except ssl.SSLCertVerificationError as error:
        why = error.verify_message or str(error)
    except ConnectionRefusedError:
        return TlsProbe(error=f"{address}:{port} refused the connection", refused=True)
    except (OSError, smtplib.SMTPException, ValueError) as error:
        return TlsProbe(error=f"{address}:{port}: {_first_line(error)}")
    try:   # again without verification, to see what it shows
        return TlsProbe(starttls_certificate(name, address, port, _context(ca_file, verify=False)), why)
    except (OSError, smtplib.SMTPException, ValueError) as error:
        return TlsProbe(verify_error=why, error=f"{address}:{port}: {_first_line(error)}")


def fetch_policy(host: str, address: str, port: int, ca_file: Path | None) -> bytes:
    """GET https://<host>/.well-known/mta-sts.txt from `address`, certificate verified (raises on failure)."""
    context = _context(ca_file, verify=True)
    raw = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
    connection = http.client.HTTPSConnection(host, port, timeout=CONNECT_TIMEOUT, context=context)
    try:
        connection.sock = context.wrap_socket(raw, server_hostname=host)
        connection.request("GET", mtasts.POLICY_PATH, headers={"Host": host, "User-Agent": "yestls-doctor"})
        response = connection.getresponse()
        body = response.read(MAX_POLICY + 1)
    except BaseException:
        raw.close()
        raise
    finally:
        connection.close()
    if response.status != 200:
        raise ValueError(f"HTTP {response.status} {response.reason} (a policy is served with 200, no redirect)")
    if len(body) > MAX_POLICY:
        raise ValueError(f"the policy is over {MAX_POLICY} bytes")
    return body


@dataclass(frozen=True)
class Policy:
    mode: str | None
    mx: tuple[str, ...]
    max_age: int | None
    version: str | None


def parse_policy(body: bytes) -> Policy:
    fields: dict[str, list[str]] = {}
    for line in body.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), []).append(value.strip())
    age = (fields.get("max_age") or [""])[0]
    return Policy((fields.get("mode") or [None])[0], tuple(v.lower().rstrip(".") for v in fields.get("mx", [])),
                  int(age) if age.isdigit() else None, (fields.get("version") or [None])[0])


def _mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: an mx pattern is a name, or "*." and the name of its parent."""
    if pattern.startswith("*."):
        return host.partition(".")[2] == pattern[2:]
    return host == pattern


# --- the checks ---------------------------------------------------------------------------------------------

class Doctor:
    def __init__(self, site: Site, resolver: Dns, *, ca_file: Path | None = None, smtp_port: int = 25,
                 https_port: int = 443, run: Callable = subprocess.run):
        self.site = site
        self.dns = resolver
        self.ca_file = ca_file
        self.smtp_port = smtp_port
        self.https_port = https_port
        self.run = run
        self._probes: dict[tuple[str, str], TlsProbe] = {}
        self._keys: list | str | None = None   # the keystore's TLSA records, or why they cannot be read

    # each domain

    def check_mx(self, domain: str) -> Result:
        lookup = self.dns.lookup(domain, "MX")
        if not lookup.found:
            return _trouble(Check.MX, domain, lookup)
        ordered = [r.exchange.to_text(omit_final_dot=True).lower()
                   for r in sorted(lookup.records, key=lambda r: r.preference)]
        expected = list(self.site.mx_names)
        fix = "publish exactly: " + ", ".join(f"MX {10 * i} {n}." for i, n in enumerate(expected, start=1))
        if set(ordered) != set(expected):
            return failed(Check.MX, domain, f"MX hosts are {', '.join(ordered)}; the edge's are "
                          f"{', '.join(expected)}", fix)
        if list(dict.fromkeys(ordered)) != expected:
            return warned(Check.MX, domain, f"MX preference order is {', '.join(ordered)}", fix)
        return passed(Check.MX, domain, f"MX {', '.join(ordered)}")

    def check_spf(self, domain: str) -> Result:
        fix = f'publish TXT "{dnsrecords.spf_record(self.site)}" at {domain}'
        for address in self.site.edge_addresses:
            result, explanation = self._spf(address, f"postmaster@{domain}", dnsrecords.ptr_name(self.site, address))
            if result != "pass":
                return failed(Check.SPF, domain, f"SPF evaluates to {result} for the edge {address}"
                              + (f" ({explanation})" if explanation else ""), fix)
        return passed(Check.SPF, domain, f"pass for {', '.join(self.site.edge_addresses)}")

    def check_helo_spf(self, address: str) -> Result:
        """Bounces (empty sender) are judged by the HELO name's SPF: each edge's own (home's mail leaves through
        another edge when the primary does not answer, saying that edge's name)."""
        helo = dnsrecords.ptr_name(self.site, address)
        result, explanation = self._spf(address, "", helo)
        if result != "pass":
            return failed(Check.HELO_SPF, helo, f"SPF of the HELO name evaluates to {result} for {address}"
                          + (f" ({explanation})" if explanation else ""),
                          f'publish TXT "{dnsrecords.HELO_SPF}" at {helo}, and its A record')
        return passed(Check.HELO_SPF, helo, f"pass for {address} (bounces)")

    def _spf(self, address: str, sender: str, helo: str) -> tuple[str, str]:
        with self.dns.as_default():
            try:
                return spf.check2(i=address, s=sender, h=helo, querytime=self.dns.resolver.lifetime * 4)
            except Exception as error:  # noqa: BLE001 - pyspf raises its own on broken DNS; a result, not a crash
                return "temperror", _first_line(error)

    def check_dkim(self, domain: str) -> list[Result]:
        try:
            records = dnsrecords.dkim_records(self.site.dkim_records) if self.site.dkim_records else None
        except FileNotFoundError:
            records = None
        except (OSError, dnsrecords.DkimRecordsError) as error:
            return [failed(Check.DKIM, domain, f"home's DKIM records cannot be read: {error}",
                           "run home's deploy again (roles/home_postfix writes the file)")]
        if records is None:
            return [warned(Check.DKIM, domain, f"no DKIM records file ({self.site.dkim_records}) to compare with",
                           "set dkim_records in site.toml; home's deploy writes /etc/dkimkeys/yestls-dns-records.txt")]
        mine = [r for r in records if r.name.endswith(f"._domainkey.{domain}")]
        if not mine:
            return [warned(Check.DKIM, domain, f"home's DKIM records file has no key for {domain}",
                           "add the domain to site_domains and deploy home again")]
        return [self._dkim_record(domain, record) for record in mine]

    def _dkim_record(self, domain: str, record: dnsrecords.DkimRecord) -> Result:
        subject = f"{record.selector} ({domain})"
        lookup = self.dns.lookup(record.name, "TXT")
        fix = f"publish home's record: {record.line.strip()}"
        if not lookup.found:
            result = _trouble(Check.DKIM, subject, lookup)
            return Result(result.check, subject, result.verdict, result.message, fix if lookup.missing else result.fix)
        ours = _tag(record.value, "p")
        published = [_tag(text, "p") for text in lookup.texts()]
        if ours in published:
            return passed(Check.DKIM, subject, f"{record.name} has home's key")
        return failed(Check.DKIM, subject, f"{record.name} publishes another key than home's", fix)

    def check_dmarc(self, domain: str) -> Result:
        lookup = self.dns.lookup(f"_dmarc.{domain}", "TXT")
        fix = f'publish TXT "{dnsrecords.dmarc_record(self.site, domain)}" at _dmarc.{domain}'
        if not lookup.found:
            return _trouble(Check.DMARC, domain, lookup) if not lookup.missing else \
                failed(Check.DMARC, domain, "no DMARC record", fix)
        records = [t for t in lookup.texts() if t.lower().startswith("v=dmarc1")]
        if len(records) != 1:
            return failed(Check.DMARC, domain, f"{len(records)} DMARC records (RFC 7489: exactly one)", fix)
        policy = _tag(records[0], "p")
        if policy not in ("none", "quarantine", "reject"):
            return failed(Check.DMARC, domain, f"DMARC record without a valid p= ({records[0]})", fix)
        if policy == "none":
            return warned(Check.DMARC, domain, "p=none: receivers only report, they do not act",
                          "once the aggregate reports show only your own mail passing, set p=quarantine")
        return passed(Check.DMARC, domain, f"p={policy}")

    def check_mta_sts(self, domain: str) -> Result:
        lookup = self.dns.lookup(f"_mta-sts.{domain}", "TXT")
        records = [t for t in lookup.texts() if t.startswith("v=STSv1")] if lookup.found else []
        if self.site.mta_sts_mode is MtaStsMode.NONE:
            if records:
                return warned(Check.MTA_STS, domain, "MTA-STS is off in site.toml but a record is published",
                              f"remove the TXT record at _mta-sts.{domain}")
            return passed(Check.MTA_STS, domain, "off (mode none), nothing published")
        expected = mtasts.txt_record(dnsrecords.mta_sts_policy(self.site))
        fix = f'publish TXT "{expected}" at _mta-sts.{domain}'
        if not lookup.found and not lookup.missing:
            return _trouble(Check.MTA_STS, domain, lookup)
        if len(records) != 1:
            return failed(Check.MTA_STS, domain, f"{len(records)} v=STSv1 records at _mta-sts.{domain} "
                          "(RFC 8461: exactly one)", fix)
        expected_id = _tag(expected, "id")
        if _tag(records[0], "id") != expected_id:
            return failed(Check.MTA_STS, domain, f"id={_tag(records[0], 'id')}, the served policy's is {expected_id}"
                          " (senders keep an old policy until the id changes)", fix)
        return passed(Check.MTA_STS, domain, f"id={expected_id}")

    def check_mta_sts_policy(self, domain: str) -> Result:
        host = f"mta-sts.{domain}"
        if self.site.mta_sts_mode is MtaStsMode.NONE:
            return passed(Check.MTA_STS_POLICY, host, "off (mode none)")
        lookup = self.dns.lookup(host, "A")
        if not lookup.found:
            return _trouble(Check.MTA_STS_POLICY, host, lookup)
        address = lookup.records[0].address
        try:
            body = fetch_policy(host, address, self.https_port, self.ca_file)
        except ssl.SSLCertVerificationError as error:
            return failed(Check.MTA_STS_POLICY, host, f"the certificate of https://{host} does not verify "
                          f"({error.verify_message})", f"the edge's certificate must name {host}: renew it "
                          "with the site's names (site.toml domains)")
        except (OSError, http.client.HTTPException, ValueError) as error:
            return failed(Check.MTA_STS_POLICY, host, f"https://{host}{mtasts.POLICY_PATH} from {address}: "
                          f"{_first_line(error)}", "the edge serves the policy on 443: check it runs and "
                          "that its provider's firewall lets 443 in")
        policy = parse_policy(body)
        mx_lookup = self.dns.lookup(domain, "MX")
        dns_mx = ([r.exchange.to_text(omit_final_dot=True).lower() for r in mx_lookup.records]
                  if mx_lookup.found else list(self.site.mx_names))
        uncovered = [mx for mx in dns_mx if not any(_mx_matches(p, mx) for p in policy.mx)]
        fix = "redeploy the edge with site.toml's MTA-STS settings (the policy it serves is relay/mtasts's)"
        if policy.version != "STSv1" or policy.max_age is None:
            return failed(Check.MTA_STS_POLICY, host, "not an STSv1 policy with max_age", fix)
        if uncovered:
            return failed(Check.MTA_STS_POLICY, host, f"the policy's mx ({', '.join(policy.mx) or 'none'}) "
                          f"does not cover the DNS MX {', '.join(uncovered)}: enforcing senders would refuse",
                          fix + "; or fix the MX records")
        if policy.mode != self.site.mta_sts_mode.value:
            return failed(Check.MTA_STS_POLICY, host, f"mode {policy.mode}, site.toml says "
                          f"{self.site.mta_sts_mode.value}", fix)
        return passed(Check.MTA_STS_POLICY, host, f"mode {policy.mode}, mx {', '.join(policy.mx)}, "
                      f"max_age {policy.max_age}")

    def check_tls_rpt(self, domain: str) -> Result:
        lookup = self.dns.lookup(f"_smtp._tls.{domain}", "TXT")
        expected = dnsrecords.tls_rpt_record(self.site)
        records = [t for t in lookup.texts() if t.startswith("v=TLSRPTv1")] if lookup.found else []
        if expected is None:
            if records:
                return passed(Check.TLS_RPT, domain, f"published ({records[0]}), not set in site.toml")
            return warned(Check.TLS_RPT, domain, "no TLS reports asked for",
                          "set [tls_rpt] rua in site.toml, then publish what `yestls dns` prints")
        fix = f'publish TXT "{expected}" at _smtp._tls.{domain}'
        if not lookup.found and not lookup.missing:
            return _trouble(Check.TLS_RPT, domain, lookup)
        if len(records) != 1:
            return failed(Check.TLS_RPT, domain, f"{len(records)} v=TLSRPTv1 records (RFC 8460: exactly one)", fix)
        ruas = [value.strip() for value in (_tag(records[0], "rua") or "").split(",")]
        if self.site.tls_rpt_rua not in ruas:
            return failed(Check.TLS_RPT, domain, f"reports go to {', '.join(ruas)}, not {self.site.tls_rpt_rua}",
                          fix)
        return passed(Check.TLS_RPT, domain, f"rua={self.site.tls_rpt_rua}")

    # each MX name

    def check_addresses(self, name: str, expected: tuple[str, ...]) -> list[Result]:
        lookup = self.dns.lookup(name, "A")
        fix = f"publish A {', '.join(expected)} at {name} (only those)"
        if not lookup.found:
            a = _trouble(Check.A, name, lookup)
        else:
            found = sorted(r.address for r in lookup.records)
            a = (passed(Check.A, name, f"A {', '.join(found)}") if set(found) == set(expected) else
                 failed(Check.A, name, f"A {', '.join(found)}; the edge is {', '.join(expected)}", fix))
        aaaa = self.dns.lookup(name, "AAAA")
        if aaaa.found:
            return [a, warned(Check.A, name, f"AAAA {', '.join(r.address for r in aaaa.records)}: the edge's paths "
                              "are IPv4 only; senders trying IPv6 first are delayed or fail",
                              f"remove the AAAA records at {name}")]
        return [a]

    def check_ptr(self, address: str) -> Result:
        helo = dnsrecords.ptr_name(self.site, address)   # the HELO name, or a secondary edge's MX name
        fix = (f"ask the provider of {address} to set its reverse DNS (PTR) to {helo}; publish A {address} "
               f"at {helo}")
        lookup = self.dns.lookup(dns.reversename.from_address(address).to_text(), "PTR")
        if not lookup.found:
            result = _trouble(Check.PTR, address, lookup)
            return Result(Check.PTR, address, Verdict.FAIL, result.message, fix if lookup.missing else result.fix)
        names = [r.target.to_text(omit_final_dot=True).lower() for r in lookup.records]
        if helo not in names:
            what = "the HELO name" if helo == self.site.helo_name else "the edge's MX name"
            return failed(Check.PTR, address, f"PTR {', '.join(names)}, not {what} {helo} (receivers "
                          "distrust mail whose HELO and reverse DNS differ)", fix)
        forward = self.dns.lookup(helo, "A")
        if not forward.found or address not in {r.address for r in forward.records}:
            return failed(Check.PTR, address, f"PTR {helo}, but {helo} does not point back to {address} "
                          f"({forward.why() if not forward.found else 'A ' + ', '.join(r.address for r in forward.records)})",
                          fix)
        return passed(Check.PTR, address, f"PTR {helo}, forward-confirmed")

    def probe(self, name: str, address: str) -> TlsProbe:
        if (name, address) not in self._probes:
            self._probes[(name, address)] = probe_starttls(name, address, self.smtp_port, self.ca_file)
        return self._probes[(name, address)]

    def _mx_addresses(self, name: str) -> list[str]:
        lookup = self.dns.lookup(name, "A")
        return [r.address for r in lookup.records] if lookup.found else []

    def check_certificate(self, name: str, address: str, now: datetime.datetime) -> Result:
        subject = f"{name} ({address})"
        probe = self.probe(name, address)
        if probe.certificate is None:
            if probe.refused:
                return failed(Check.CERTIFICATE, subject, probe.error or "", "start the edge (`yestls edge serve`) "
                              "and check the provider's firewall lets TCP 25 in")
            return warned(Check.CERTIFICATE, subject, f"no STARTTLS from here: {probe.error}",
                          "if home's network blocks outbound 25, run doctor from another network; else check "
                          "the edge runs and its provider lets TCP 25 in")
        cert = probe.certificate
        left = (cert.not_valid_after_utc - now).total_seconds()
        expires = f"expires {cert.not_valid_after_utc:%Y-%m-%d}"
        if probe.verify_error is not None:
            return failed(Check.CERTIFICATE, subject, f"does not verify: {probe.verify_error} ({expires})",
                          f"the edge must serve a CA-signed chain naming {name}: `yestls status` shows the "
                          "keystore's chains; renew or import one")
        if left < RENEW_WARNING:
            return warned(Check.CERTIFICATE, subject, f"verified, {expires}: in {left / 86400:.0f} days",
                          "renew the certificate now")
        return passed(Check.CERTIFICATE, subject, f"verified, names {name}, {expires}")

    def _served_digests(self, name: str) -> list[str]:
        from relay.oracle.keystore import spki_sha256

        probes = [self.probe(name, address) for address in self._mx_addresses(name)]
        return sorted({spki_sha256(p.certificate.public_key()) for p in probes if p.certificate})

    def _keystore_keys(self, name: str, role) -> list | str:
        """The keystore's TLSA records of `role` for `name`, or why they cannot be read."""
        from relay.oracle.keystore import KeystoreError

        if self._keys is None:
            try:
                self._keys = dnsrecords.tlsa_records(self.site.keystore)
            except (KeystoreError, OSError) as error:
                self._keys = f"keystore {self.site.keystore}: {error}"
        return self._keys if isinstance(self._keys, str) else dnsrecords.tlsa_for(self._keys, name, role)

    def _tlsa_published(self, name: str) -> tuple[Lookup, set[str]]:
        lookup = self.dns.lookup(f"_25._tcp.{name}", "TLSA")
        digests = {r.cert.hex() for r in lookup.records if (r.usage, r.selector, r.mtype) == (3, 1, 1)}
        return lookup, digests

    def check_tlsa(self, name: str) -> Result:
        from relay.oracle.keystore import KeyRole

        lookup, published = self._tlsa_published(name)
        served = self._served_digests(name)
        keys = self._keystore_keys(name, KeyRole.CURRENT)
        expected = served or ([k.sha256 for k in keys] if not isinstance(keys, str) else [])
        fix = f"publish what `yestls dns` prints at _25._tcp.{name} (TLSA 3 1 1), in a DNSSEC-signed zone"
        if lookup.missing:
            return warned(Check.TLSA, name, "no TLSA record: senders that insist on DANE cannot, MTA-STS only", fix)
        if not lookup.found:
            return _trouble(Check.TLSA, name, lookup)
        if not expected:
            return warned(Check.TLSA, name, "no key to compare with (no STARTTLS from here, and "
                          f"{keys if isinstance(keys, str) else 'no current key in the keystore'})",
                          "run doctor as root at home")
        missing = [d for d in expected if d not in published]
        what = "the served key" if served else "the keystore's current key"
        if missing:
            return failed(Check.TLSA, name, f"no TLSA 3 1 1 for {what} ({missing[0][:16]}...): DANE senders "
                          "refuse the MX", fix)
        return passed(Check.TLSA, name, f"3 1 1 matches {what}")

    def check_tlsa_next(self, name: str) -> Result:
        from relay.oracle.keystore import KeyRole

        keys = self._keystore_keys(name, KeyRole.NEXT)
        if isinstance(keys, str):
            return warned(Check.TLSA_NEXT, name, f"cannot read the next key ({keys})", "run doctor as root at home")
        if not keys:
            return passed(Check.TLSA_NEXT, name, "no next key waiting")
        _, published = self._tlsa_published(name)
        unpublished = [k for k in keys if k.sha256 not in published]
        if unpublished:
            return warned(Check.TLSA_NEXT, name, f"the next key ({unpublished[0].sha256[:16]}...) has no TLSA "
                          "record yet", f"publish its TLSA 3 1 1 (`yestls dns`) at _25._tcp.{name} before "
                          "`yestls keys rollover --switch`")
        return passed(Check.TLSA_NEXT, name, f"next key{'s' if len(keys) > 1 else ''} published")

    def check_dnssec(self, name: str) -> Result:
        lookup = self.dns.lookup(f"_25._tcp.{name}", "TLSA")
        if not lookup.found:
            lookup = self.dns.lookup(name, "A")
        if lookup.found and lookup.authentic:
            return passed(Check.DNSSEC, name, f"{lookup.rdtype} {lookup.name} is DNSSEC-authentic (AD)")
        return warned(Check.DNSSEC, name, f"{lookup.rdtype} {lookup.name} is not DNSSEC-authenticated: the zone is "
                      "not signed, or this resolver does not validate", "sign the zone (DANE needs it), and ask a "
                      "validating resolver (--nameserver)")

    # the edge

    def check_outbound_25(self) -> Result:
        subject = ", ".join(self.site.edge_addresses)
        by_hand = ("send a mail to a mailbox elsewhere and read Postfix's log; if it times out connecting "
                   "to port 25, ask the edge's provider to open outbound TCP 25")
        command = ["journalctl", "--no-pager", "-q", "-o", "short-iso", "--since", OUTBOUND_WINDOW,
                   "-t", "postfix/smtp", "-g", r"status=sent|:25: Connection timed out"]
        try:
            result = self.run(command, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as error:
            return warned(Check.OUTBOUND_25, subject, f"cannot read Postfix's journal ({_first_line(error)})",
                          by_hand)
        if result.returncode not in (0, 1):   # 1: nothing matched
            return warned(Check.OUTBOUND_25, subject, "cannot read Postfix's journal: "
                          f"{(result.stderr or '').strip()[:200] or f'exit {result.returncode}'}", by_hand)
        lines = result.stdout.splitlines()
        sent = [line for line in lines if "status=sent" in line and _RELAY_25.search(line)]
        if sent:
            return passed(Check.OUTBOUND_25, subject, f"last delivery out: {sent[-1].split(' ', 1)[0]}")
        if any("Connection timed out" in line for line in lines):
            return failed(Check.OUTBOUND_25, subject, "deliveries out time out connecting to port 25 and none "
                          "succeeded in 7 days", "ask the edge's provider to open outbound TCP 25")
        return warned(Check.OUTBOUND_25, subject, "no delivery out in 7 days to show that the edge lets TCP 25 out",
                      by_hand)

    # all of them

    def results(self) -> list[Result]:
        now = datetime.datetime.now(datetime.timezone.utc)
        results: list[Result] = []
        for domain in self.site.domains:
            results += [self.check_mx(domain), self.check_spf(domain), *self.check_dkim(domain),
                        self.check_dmarc(domain), self.check_mta_sts(domain), self.check_mta_sts_policy(domain),
                        self.check_tls_rpt(domain)]
        addresses = dnsrecords.mx_addresses(self.site)
        names = dict(addresses)
        if self.site.client_name:
            names.setdefault(self.site.client_name, dnsrecords.client_addresses(self.site))
        for name, expected in names.items():
            results += self.check_addresses(name, expected)
        for address in self.site.edge_addresses:
            results.append(self.check_ptr(address))
        for address in self.site.edge_addresses:   # home's mail leaves from the primary, or another when it is down
            results.append(self.check_helo_spf(address))
        for name in self.site.mx_names:
            for address in self._mx_addresses(name) or addresses[name]:
                results.append(self.check_certificate(name, address, now))
            results += [self.check_tlsa(name), self.check_tlsa_next(name), self.check_dnssec(name)]
        results.append(self.check_outbound_25())
        return results


_RELAY_25 = re.compile(r"relay=\S+:25,")


def _tag(record: str, name: str) -> str | None:
    """A tag's value in a `k=v; k=v` record (DKIM, DMARC, MTA-STS, TLS-RPT); spaces inside removed for p=."""
    for part in record.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip().lower() == name:
            return "".join(value.split()) if name == "p" and len(value) > 20 else value.strip()
    return None


def table(results: list[Result]) -> str:
    width = [max((len(r.check.value) for r in results), default=5), max((len(r.subject) for r in results),
                                                                      default=7)]
    lines = []
    for r in results:
        lines.append(f"{r.verdict.value.upper():<4}  {r.check.value:<{width[0]}}  {r.subject:<{width[1]}}  "
                     f"{r.message}")
        if r.fix:
            lines.append(f"{'':<4}  {'':<{width[0]}}  {'':<{width[1]}}  fix: {r.fix}")
    counts = {v: sum(r.verdict is v for r in results) for v in Verdict}
    lines.append(f"{counts[Verdict.PASS]} pass, {counts[Verdict.WARN]} warn, {counts[Verdict.FAIL]} fail")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from relay import site as site_module

    try:
        site = site_module.load(args.site)
        nameserver = parse_address(args.nameserver, default_port=53) if args.nameserver else None
    except site_module.ConfigError as error:
        print(f"yestls doctor: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"yestls doctor: --nameserver: {error}", file=sys.stderr)
        return 2
    try:
        resolver = Dns(nameserver)
    except dns.resolver.NoResolverConfiguration:
        print("yestls doctor: no resolver in /etc/resolv.conf; pass --nameserver HOST[:PORT]", file=sys.stderr)
        return 2
    doctor = Doctor(site, resolver, ca_file=args.ca_file, smtp_port=args.smtp_port, https_port=args.https_port)
    results = doctor.results()
    if args.json:
        json.dump([r.as_json() for r in results], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(table(results))
    return 1 if any(r.verdict is Verdict.FAIL for r in results) else 0


__all__ = ["Check", "Dns", "Doctor", "Outcome", "Result", "Verdict"]
