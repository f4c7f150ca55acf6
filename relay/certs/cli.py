"""`yestls cert renew` and `yestls cert status`: the certificates under site.toml's [acme] state_dir.

    yestls cert renew [--site PATH] [--force] [--label L]
    yestls cert status [--site PATH] [--json]

`renew` goes through each certificate directory (relay/certs/store.py): a
certificate that is due is ordered (one order per certificate, the solver
site.toml's challenge names) and its chain.pem replaced; one that is not
due gets its renewal time recorded; one backing off after a failure is
skipped until its next_attempt, unless --force (which also orders
certificates that are not due). Each failure is recorded in its state.json
and logged as one line that says what to fix; chain.pem is never touched
by a failure. The CA is contacted only when something is due, or to ask its
renewal information (ARI) when the directory offers it. Exit status: 0 when
every certificate is fine or not due (or backing off from an earlier
failure: `status` shows it), 1 when this run had a failure, 2 for a
site.toml that cannot be used.
"""

import argparse
import datetime
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from relay.certs.store import (
    CertificateDir,
    CertificateError,
    CertificateState,
    backoff,
    certificate_dirs,
    iso,
    parse_iso,
    renewal_time,
)
from relay.config import ConfigError
from relay.site import DEFAULT_PATH, Acme, Challenge

log = logging.getLogger("yestls.certs")


def add_parsers(subparsers) -> None:
    cert = subparsers.add_parser("cert", help="ACME certificates at home (renew, status)",
                                 description="Order and renew certificates by ACME for CSRs of keys that stay "
                                             "at home; see docs/certificates.md.")
    commands = cert.add_subparsers(dest="cert_command", required=True)
    renew = commands.add_parser("renew", help="renew what is due (run by a timer, as the ACME user)",
                                description="For each state_dir/certificates/<label>/ with a csr.pem: order a "
                                            "certificate when there is none, when past its renewal time (the "
                                            "CA's ARI window, else 2/3 of its lifetime) or with --force; write "
                                            "chain.pem and state.json.")
    renew.add_argument("--site", type=Path, default=DEFAULT_PATH, metavar="PATH",
                       help="site.toml (default %(default)s)")
    renew.add_argument("--force", action="store_true", help="order now, whether due or backing off")
    renew.add_argument("--label", help="only this certificate (its directory's name)")
    status = commands.add_parser("status", help="each certificate's expiry, next renewal and last error",
                                 description="Read each certificate's state.json; contacts nobody.")
    status.add_argument("--site", type=Path, default=DEFAULT_PATH, metavar="PATH",
                        help="site.toml (default %(default)s)")
    status.add_argument("--json", action="store_true", help="JSON for scripts instead of lines")


def run(args: argparse.Namespace) -> int:
    from relay import site as site_toml

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="yestls cert: %(levelname)s %(message)s", stream=sys.stderr)
    try:
        acme = site_toml.load(args.site).acme
    except (ConfigError, OSError) as error:
        print(f"yestls cert {args.cert_command}: {error}", file=sys.stderr)
        return 2
    if acme is None:
        print(f"yestls cert {args.cert_command}: {args.site} has no [acme] table; add one (docs/certificates.md)",
              file=sys.stderr)
        return 2
    try:
        if args.cert_command == "status":
            return show_status(acme, args.json)
        return renew(acme, force=args.force, label=args.label)
    except OSError as error:   # state_dir itself unreadable: the per-certificate files are handled inside
        print(f"yestls cert {args.cert_command}: {error.filename}: {error.strerror}; state_dir must be the ACME "
              f"user's", file=sys.stderr)
        return 2


def renew(acme: Acme, *, force: bool = False, label: str | None = None,
          now: datetime.datetime | None = None) -> int:
    """One pass over the certificates (module docstring); the exit status."""
    from relay.certs.ca import Ca

    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        directories = certificate_dirs(acme.state_dir, label)
    except CertificateError as error:
        log.error("%s", error)
        return 1
    if not directories:
        log.error("no certificate under %s: make a directory there per certificate and put its csr.pem in it",
                  acme.state_dir / "certificates")
        return 1
    ca: Ca | None = None
    failed = False
    for directory in directories:
        try:
            state = directory.state()
        except CertificateError as error:
            log.error("%s: %s", directory.label, error)
            failed = True
            continue
        try:
            if ca is None:
                ca = Ca(acme)
            ordered = _renew_one(directory, state, ca, acme, force, now)
        except CertificateError as error:
            _failed(directory, state, str(error), now)
            failed = True
            continue
        if ordered:
            log.info("%s: new chain written to %s (serial %s, not after %s)", directory.label,
                     directory.chain_path, state.serial, state.not_after)
    return 1 if failed else 0


def _renew_one(directory: CertificateDir, state: CertificateState, ca, acme: Acme, force: bool,
               now: datetime.datetime) -> bool:
    """Order if due; record the outcome in `state` and save it. True if a chain was written."""
    csr_pem, csr = directory.csr()
    backing_off = parse_iso(state.next_attempt) if state.failures else None
    if backing_off is not None and now < backing_off and not force:
        log.warning("%s: backing off until %s after %d failure(s) (last: %s); --force to try now",
                    directory.label, state.next_attempt, state.failures, state.last_error)
        return False
    leaf = directory.leaf()
    renew_after = _renew_after(directory, leaf, ca) if leaf is not None else None
    why = "--force" if force else directory.why_due(csr, leaf, renew_after, now)
    if why is None:
        state.renew_after = state.next_attempt = iso(renew_after)
        state.not_after, state.serial = iso(leaf.not_valid_after_utc), format(leaf.serial_number, "x")
        directory.save_state(state)
        log.info("%s: not due (renewal from %s)", directory.label, state.renew_after)
        return False
    log.info("%s: ordering (%s)", directory.label, why)
    state.last_attempt = iso(now)
    chain_pem = ca.order(csr_pem, csr, _solver(acme))
    directory.save_chain(chain_pem)
    leaf = directory.leaf()
    renew_after = _renew_after(directory, leaf, ca)
    state.not_after, state.serial = iso(leaf.not_valid_after_utc), format(leaf.serial_number, "x")
    state.last_success, state.last_error, state.failures = iso(now), None, 0
    state.renew_after = state.next_attempt = iso(renew_after)
    directory.save_state(state)
    return True


def _renew_after(directory: CertificateDir, leaf, ca) -> datetime.datetime:
    """The CA's ARI window when it offers one, else two thirds into the leaf's lifetime."""
    try:
        window = ca.renewal_window(directory.chain_path.read_bytes())
    except CertificateError as error:
        log.warning("%s: %s; renewing at 2/3 of the lifetime instead", directory.label, error)
        window = None
    return window if window is not None else renewal_time(leaf)


def _solver(acme: Acme):
    if acme.challenge is Challenge.DNS_01:
        from relay.certs.dns01 import Dns01Solver

        return Dns01Solver(acme.dns01)
    from relay.certs.http01 import Http01Solver

    return Http01Solver(acme.edges, acme.identity_key)


def _failed(directory: CertificateDir, state: CertificateState, error: str, now: datetime.datetime) -> None:
    state.last_attempt, state.last_error = iso(now), error
    state.failures += 1
    state.next_attempt = iso(now + backoff(state.failures))
    log.error("%s: %s (failure %d; next try from %s; chain.pem unchanged)", directory.label, error,
              state.failures, state.next_attempt)
    try:
        directory.save_state(state)
    except OSError as failure:
        log.error("%s: cannot write %s (%s)", directory.label, directory.state_path, failure.strerror)


def show_status(acme: Acme, as_json: bool) -> int:
    """Each certificate's state, as lines or JSON; 1 if any has a recorded failure or cannot be read."""
    report = {}
    for directory in certificate_dirs(acme.state_dir):
        try:
            report[directory.label] = asdict(directory.state())
        except CertificateError as error:
            report[directory.label] = {"unreadable": str(error)}
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for label, state in report.items():
            if "unreadable" in state:
                print(f"{label}  {state['unreadable']}")
                continue
            error = f"  last error: {state['last_error']} ({state['failures']} failure(s))" if state["failures"] else ""
            print(f"{label}  not after {state['not_after'] or '-'}  next {state['next_attempt'] or 'now'}{error}")
        if not report:
            print(f"no certificate under {acme.state_dir / 'certificates'}")
    return 1 if any("unreadable" in s or s.get("failures") for s in report.values()) else 0
