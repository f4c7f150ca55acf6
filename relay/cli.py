"""The `yestls` command."""

import argparse
import sys
from pathlib import Path

from relay.backup import cli as backup_cli
from relay.certs import cli as cert_cli
from relay.keys import cli as keys_cli
from relay.status import CONFIGS as STATUS_CONFIGS
from relay.tls.constants import Group

GROUP_NAMES = {"X25519MLKEM768": Group.X25519MLKEM768, "x25519": Group.X25519,
               "secp256r1": Group.SECP256R1, "secp384r1": Group.SECP384R1}


def _group(name: str) -> int:
    try:
        return GROUP_NAMES[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown group {name!r}; choose from {', '.join(GROUP_NAMES)}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yestls", description="Self-hosted mail with keyless TLS.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "tls-serve",
        help="serve the TLS engine behind a minimal HTTP/1.0 responder (for TLS test tools)",
        description="Answer every request with HTTP/1.0 200 over the keyless TLS engine, signing in-process.",
    )
    serve.add_argument("--cert", type=Path, action="append", default=[],
                       help="PEM certificate chain, leaf first (repeatable: several chains)")
    serve.add_argument("--key", type=Path, action="append", default=[],
                       help="PEM private key of the matching --cert (signs in-process)")
    serve.add_argument("--oracle", action="append", default=[], metavar="HOST:PORT",
                       help="sign with the key oracle at HOST:PORT instead (repeatable: failover)")
    serve.add_argument("--identity-key", type=Path,
                       help="this edge's identity key for the oracle (yestls keys identity-new)")
    serve.add_argument("--oracle-wait", type=float, default=10.0, metavar="SECONDS",
                       help="how long to wait at start for an oracle (default %(default)s)")
    serve.add_argument("--listen", default="127.0.0.1:4433", help="HOST:PORT (default %(default)s)")
    serve.add_argument("--groups", type=_group, nargs="+", metavar="GROUP",
                       help=f"key exchange groups in preference order ({', '.join(GROUP_NAMES)})")
    serve.add_argument("--no-tls12", action="store_true",
                       help="serve TLS 1.3 only: TLS 1.2 clients get protocol_version")
    serve.add_argument("--insist-on-preferred-group", action="store_true",
                       help="HelloRetryRequest for the preferred group even if the client sent another usable share")
    serve.add_argument("--alpn", action="append", default=[], help="ALPN protocol to accept (repeatable)")
    serve.add_argument("--tickets", type=int, default=1, help="session tickets per handshake (0: no resumption)")
    serve.add_argument("--ticket-early-data", type=int, default=0, metavar="BYTES",
                       help="advertise this max_early_data_size in tickets (early data is still refused)")
    oracle = commands.add_parser("oracle", help="the key oracle at home")
    oracle_commands = oracle.add_subparsers(dest="oracle_command", required=True)
    oracle_serve = oracle_commands.add_parser("serve", help="answer the edge's signature requests")
    oracle_serve.add_argument("--config", type=Path, required=True, help="oracle.toml")

    edge = commands.add_parser("edge", help="the public MX on the cloud VM")
    edge_commands = edge.add_subparsers(dest="edge_command", required=True)
    edge_serve = edge_commands.add_parser("serve", help="accept mail, seal it, serve it to home")
    edge_serve.add_argument("--config", type=Path, required=True, help="edge.toml")

    intake = commands.add_parser("intake", help="home: pull sealed mail from the edge, deliver it to Dovecot")
    intake_commands = intake.add_subparsers(dest="intake_command", required=True)
    intake_serve = intake_commands.add_parser("serve", help="run the intake")
    intake_serve.add_argument("--config", type=Path, required=True, help="intake.toml")

    egress = commands.add_parser("egress", help="home: which edge home's own mail leaves through, moved when "
                                                "it stops answering")
    egress_commands = egress.add_subparsers(dest="egress_command", required=True)
    egress_serve = egress_commands.add_parser("serve", help="probe the edges, keep the route and Postfix's HELO "
                                                            "on one that answers")
    egress_serve.add_argument("--config", type=Path, required=True, help="egress.toml")

    status = commands.add_parser("status", help="tunnel, oracle, policy, spool, intake, certificate expiry "
                                                "and backups, as this host sees them")
    for name in STATUS_CONFIGS:
        status.add_argument(f"--{name}-config", type=Path, metavar="PATH",
                            help=f"{name}.toml (default /etc/yestls/{name}.toml when present)")
    status.add_argument("--json", action="store_true", help="JSON for scripts instead of the table")

    dns = commands.add_parser("dns", help="print the DNS records the site needs, as zone-file lines (at home)")
    dns.add_argument("--site", type=Path, default=Path("/etc/yestls/site.toml"), metavar="PATH",
                     help="site.toml (default %(default)s)")

    doctor = commands.add_parser("doctor", help="check the published DNS records, the MTA-STS policy and the "
                                                "MX's certificate, live (at home)")
    doctor.add_argument("--site", type=Path, default=Path("/etc/yestls/site.toml"), metavar="PATH",
                        help="site.toml (default %(default)s)")
    doctor.add_argument("--nameserver", metavar="HOST[:PORT]",
                        help="ask this resolver (default: the system's, /etc/resolv.conf)")
    doctor.add_argument("--ca-file", type=Path, metavar="PATH",
                        help="trust these CA certificates for STARTTLS and MTA-STS (default: the system's)")
    doctor.add_argument("--smtp-port", type=int, default=25, help="the MX's SMTP port (default %(default)s)")
    doctor.add_argument("--https-port", type=int, default=443,
                        help="the MTA-STS policy host's HTTPS port (default %(default)s)")
    doctor.add_argument("--json", action="store_true", help="JSON for scripts instead of the table")

    keys_cli.add_parsers(commands)
    cert_cli.add_parsers(commands)
    backup_cli.add_parsers(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tls-serve":
        from relay import tls_serve

        tls_serve.run(args)
        return 0
    if args.command == "oracle":
        from relay.oracle import server

        return server.run(args)
    if args.command == "edge":
        from relay.edge import server as edge_server

        return edge_server.run(args)
    if args.command == "intake":
        from relay.home import intake

        return intake.run(args)
    if args.command == "egress":
        from relay.home import egress

        return egress.run(args)
    if args.command == "status":
        from relay import status

        return status.run(args)
    if args.command == "dns":
        from relay import dnsrecords

        return dnsrecords.run(args)
    if args.command == "doctor":
        from relay import doctor

        return doctor.run(args)
    if args.command == "keys":
        return keys_cli.run(args)
    if args.command == "cert":
        return cert_cli.run(args)
    if args.command == "backup":
        return backup_cli.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
