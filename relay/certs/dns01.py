"""The DNS-01 solver: `_acme-challenge.<name> TXT` by RFC 2136 dynamic update, signed with TSIG.

For sites whose names cannot be validated over HTTP (wildcards) or that
prefer not to route port 80: site.toml [acme] challenge = "dns-01" and
[acme.dns01] name the zone's primary server, the zone, and the TSIG key (its
base64 secret in a file only the ACME user can read). For each name the
solver adds the TXT record (TTL 60), then waits until the primary answers it
(so the CA is not told to look before it is there; secondaries are the
zone's business: a primary that notifies them promptly is assumed), and
after the order deletes exactly the records it added, leaving any other
TXT at the name alone. dnspython builds and signs the messages.
"""

import logging
import os
import time

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update
from acme import challenges

from relay.certs.store import CertificateError
from relay.private_files import read_private_file
from relay.site import Dns01

log = logging.getLogger("yestls.certs")

TTL = 60
TIMEOUT = 10.0          # seconds for one DNS exchange
VISIBLE_WITHIN = 60.0   # seconds for an added record to be answered by the primary
POLL = 0.5


def load_tsig_secret(settings: Dns01) -> bytes:
    text = read_private_file(settings.tsig_secret_file, os.getuid(), CertificateError, "TSIG secret",
                             "a file holding the base64 TSIG secret your DNS server gave for the key")
    return text.strip()


class Dns01Solver:
    challenge_type = challenges.DNS01

    def __init__(self, settings: Dns01):
        self.settings = settings
        self.zone = dns.name.from_text(settings.zone)
        secret = load_tsig_secret(settings).decode("ascii", "replace")
        try:
            self.keyring = {dns.name.from_text(settings.tsig_name): dns.tsig.Key(
                settings.tsig_name, secret, settings.tsig_algorithm)}
        except Exception as error:  # noqa: BLE001 - dnspython raises several kinds for a bad key
            raise CertificateError(f"[acme.dns01] TSIG key {settings.tsig_name} ({settings.tsig_algorithm}) from "
                                   f"{settings.tsig_secret_file} is not usable ({error}); check the algorithm and "
                                   f"that the file holds the base64 secret") from None
        self.added: list[tuple[dns.name.Name, str]] = []

    @property
    def where(self) -> str:
        host, port = self.settings.server
        return f"the DNS server {host}:{port}"

    def record_name(self, domain: str) -> dns.name.Name:
        name = dns.name.from_text(f"_acme-challenge.{domain.removeprefix('*.')}")
        if not name.is_subdomain(self.zone):
            raise CertificateError(f"{name} is not in the zone {self.zone} ([acme.dns01] zone); name the zone "
                                   f"that holds {domain}")
        return name

    def present(self, domain: str, token: str, validation: str) -> None:
        name = self.record_name(domain)
        update = self._update()
        update.add(name.relativize(self.zone), TTL, dns.rdatatype.TXT, f'"{validation}"')
        self._send(update, f"add TXT {name}")
        self.added.append((name, validation))
        self._wait_visible(name, validation)
        log.info("DNS-01 record %s TXT placed on %s", name, self.where)

    def cleanup(self) -> None:
        for name, validation in self.added:
            update = self._update()
            update.delete(name.relativize(self.zone), dns.rdatatype.TXT, f'"{validation}"')
            try:
                self._send(update, f"delete TXT {name}")
            except CertificateError as error:
                log.warning("could not delete the DNS-01 record (remove it by hand): %s", error)
        self.added.clear()

    def _update(self) -> dns.update.UpdateMessage:
        return dns.update.UpdateMessage(self.zone, keyring=self.keyring,
                                        keyalgorithm=self.settings.tsig_algorithm)

    def _send(self, message: dns.message.Message, what: str) -> dns.message.Message:
        host, port = self.settings.server
        try:
            response = dns.query.tcp(message, host, port=port, timeout=TIMEOUT)
        except (OSError, dns.exception.DNSException) as error:
            raise CertificateError(f"{what}: cannot reach {self.where} ({error.__class__.__name__}: {error}); "
                                   f"check [acme.dns01] server") from None
        if response.rcode() != dns.rcode.NOERROR:
            raise CertificateError(f"{what}: {self.where} answered {dns.rcode.to_text(response.rcode())}; does it "
                                   f"allow updates to {self.zone} with the TSIG key {self.settings.tsig_name}?")
        return response

    def _wait_visible(self, name: dns.name.Name, validation: str) -> None:
        deadline = time.monotonic() + VISIBLE_WITHIN
        while True:
            response = self._send(dns.message.make_query(name, dns.rdatatype.TXT), f"query TXT {name}")
            values = {b"".join(rdata.strings).decode("ascii", "replace")
                      for rrset in response.answer if rrset.rdtype == dns.rdatatype.TXT for rdata in rrset}
            if validation in values:
                return
            if time.monotonic() >= deadline:
                raise CertificateError(f"{name} TXT was added but {self.where} does not answer it after "
                                       f"{VISIBLE_WITHIN:g} s; is it the zone's primary?")
            time.sleep(POLL)
