"""The ACME account and one order, driven through the `acme` library (RFC 8555; never hand-written here).

`Ca` talks to one ACME server (site.toml [acme] directory, trusted through
ca_bundle when given): the directory is fetched when first needed, the
account registered (or found again: newAccount answers an existing key with
its URL) only when an order is placed. The account key is an ECDSA P-256 key
made in state_dir on first use (0600, never overwritten) and read back only
if still private to this user.

`order()` places one order for a CSR: for each pending authorization it
picks the solver's challenge type, has the solver publish the response
(Solver.present), tells the CA to validate, polls, finalizes, and always
has the solver withdraw what it published (Solver.cleanup), success or not.
The chain it returns is checked to be for the CSR's key before anyone writes
it. Every failure is a CertificateError that says what to fix, with the CA's
problem document where there is one.

`renewal_window()` asks the CA's ACME Renewal Information (RFC 9773, the
library's `renewal_time`) when the directory offers it; None otherwise.
"""

import datetime
import logging
import os
from pathlib import Path
from typing import Protocol

import josepy as jose
import requests
from acme import challenges, errors, messages
from acme import client as acme_client
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.certs.store import CertificateError, spki
from relay.private_files import create_private_file, read_private_file
from relay.site import Acme

log = logging.getLogger("yestls.certs")

ACCOUNT_KEY = "account.key.pem"
ORDER_TIMEOUT = 300     # seconds from answering the challenges to the issued chain
NETWORK_TIMEOUT = 30    # seconds for one HTTP request to the CA
USER_AGENT = "yestls"


class Solver(Protocol):
    """Publishes challenge responses where the CA looks, and withdraws them."""

    challenge_type: type[challenges.Challenge]

    def present(self, domain: str, token: str, validation: str) -> None:
        """Publish `validation` (HTTP-01: the key authorization; DNS-01: the TXT value) for `domain`."""

    def cleanup(self) -> None:
        """Withdraw everything presented; must not raise (log what could not be withdrawn)."""


def load_account_key(state_dir: Path) -> jose.JWKEC:
    """The account key in `state_dir`, made on first use."""
    path = Path(state_dir) / ACCOUNT_KEY
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            create_private_file(path, pem)
        except FileExistsError:
            pass   # made meanwhile by another run: use that one
        except OSError as error:
            raise CertificateError(f"cannot write the ACME account key {path} ({error.strerror}); state_dir "
                                   f"must be a directory the ACME user can write") from None
        log.info("made the ACME account key %s", path)
    data = read_private_file(path, os.getuid(), CertificateError, "ACME account key",
                             f"yestls cert renew (it makes {path} when missing)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"ACME account key {path} is not an unencrypted PEM ECDSA key; move it away (a new "
                               f"one is made, a new account registered)")
    return jose.JWKEC(key=key)


def describe(error: BaseException, directory: str) -> str:
    """An exception from the acme library or requests, as what to fix."""
    if isinstance(error, requests.exceptions.SSLError):
        return (f"CA unreachable: TLS to {directory} failed ({error.__class__.__name__}); is ca_bundle in "
                f"site.toml the CA's trust anchor?")
    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return f"CA unreachable: cannot connect to {directory}; check the network and the directory URL"
    if isinstance(error, errors.ValidationError):
        failed = []
        for authzr in error.failed_authzrs:
            for challb in authzr.body.challenges:
                if challb.error is not None:
                    failed.append(f"{authzr.body.identifier.value}: {problem(challb.error)}")
        return ("challenge failed: " + "; ".join(failed) + " (is the name's A record the edge's address, does "
                "the edge answer on port 80 / does the DNS update reach the zone's servers?)")
    if isinstance(error, errors.IssuanceError):
        return f"the CA refused to issue: {problem(error.error)}"
    if isinstance(error, errors.TimeoutError):
        return f"the CA did not finish the order within {ORDER_TIMEOUT} s; it is retried later"
    if isinstance(error, messages.Error):
        return f"the CA refused: {problem(error)}"
    if isinstance(error, requests.exceptions.RequestException):
        return f"CA unreachable: {error.__class__.__name__} talking to {directory}"
    return f"{error.__class__.__name__}: {error}"


def problem(error: messages.Error) -> str:
    """An RFC 7807 problem document as one line: its type and detail."""
    kind = error.code or error.typ
    return f"{kind}: {error.detail}" if error.detail else kind


class Ca:
    def __init__(self, settings: Acme):
        self.settings = settings
        self.account_key = load_account_key(settings.state_dir)
        verify = str(settings.ca_bundle) if settings.ca_bundle else True
        self.net = acme_client.ClientNetwork(self.account_key, alg=jose.ES256, verify_ssl=verify, user_agent=USER_AGENT,
                                        timeout=NETWORK_TIMEOUT)
        self._client: acme_client.ClientV2 | None = None
        self._registered = False

    def client(self) -> acme_client.ClientV2:
        if self._client is None:
            try:
                directory = acme_client.ClientV2.get_directory(self.settings.directory, self.net)
            except Exception as error:  # noqa: BLE001 - requests, acme and josepy errors alike
                raise CertificateError(describe(error, self.settings.directory)) from None
            self._client = acme_client.ClientV2(directory, self.net)
        return self._client

    def _register(self, acme: acme_client.ClientV2) -> None:
        if self._registered:
            return
        contact = {"email": self.settings.email} if self.settings.email else {}
        registration = messages.NewRegistration.from_data(terms_of_service_agreed=True, **contact)
        try:
            acme.new_account(registration)
        except errors.ConflictError as existing:   # this key's account exists: use it
            self.net.account = messages.RegistrationResource(uri=existing.location, body=messages.Registration())
        self._registered = True

    def renewal_window(self, chain_pem: bytes) -> datetime.datetime | None:
        """When the CA's ARI says to renew this chain's leaf; None without ARI. CertificateError if unreachable."""
        acme = self.client()
        try:
            acme.directory["renewalInfo"]
        except KeyError:
            return None   # this CA offers no ARI
        try:
            moment, _ = acme.renewal_time(chain_pem)
        except Exception as error:  # noqa: BLE001
            why = describe(error.__cause__ or error, self.settings.directory)
            raise CertificateError(f"ACME renewal information: {why}") from None
        if moment is not None and moment.tzinfo is None:
            moment = moment.astimezone()
        return moment

    def order(self, csr_pem: bytes, csr: x509.CertificateSigningRequest, solver: Solver) -> bytes:
        """One order for the CSR; the issued chain (PEM, leaf first), for the CSR's key."""
        try:
            acme = self.client()
            self._register(acme)
            chain_pem = self._order(acme, csr_pem, solver)
        except CertificateError:
            raise
        except Exception as error:  # noqa: BLE001 - every library failure becomes a line that says what to fix
            raise CertificateError(describe(error, self.settings.directory)) from None
        try:
            certs = x509.load_pem_x509_certificates(chain_pem)
        except ValueError:
            raise CertificateError("the CA's certificate download holds no PEM certificate") from None
        if spki(certs[0].public_key()) != spki(csr.public_key()):
            raise CertificateError("the CA issued a certificate for another key than the CSR's; nothing written")
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)

    def _order(self, acme: acme_client.ClientV2, csr_pem: bytes, solver: Solver) -> bytes:
        order = acme.new_order(csr_pem)
        try:
            for authzr in order.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue   # the CA remembers an earlier validation of this account
                domain = authzr.body.identifier.value
                challb = next((c for c in authzr.body.challenges if isinstance(c.chall, solver.challenge_type)),
                              None)
                if challb is None:
                    offered = ", ".join(c.chall.typ for c in authzr.body.challenges)
                    raise CertificateError(f"the CA offers no {solver.challenge_type.typ} challenge for {domain} "
                                           f"(offered: {offered}); a wildcard name needs challenge = \"dns-01\"")
                response, validation = challb.response_and_validation(self.account_key)
                solver.present(domain, challb.chall.encode("token"), validation)
                acme.answer_challenge(challb, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
            order = acme.poll_and_finalize(order, deadline)
        finally:
            solver.cleanup()
        return order.fullchain_pem.encode()
