"""intake.toml: where the edges' spools are, the keys, and where mail goes at home.

    identity_key = ...                           # (top-level keys first; the [edges] table after them)
    identity_key = "/var/lib/yestls-intake/identity.key"   # `yestls keys identity-new`
    spool_key = "/var/lib/yestls-intake/spool.key"         # `yestls keys spool-new`
    lmtp = "/run/dovecot/lmtp"                   # a UNIX socket path, or "HOST:PORT"
    ledger = "/var/lib/yestls-intake/ledger.sqlite"
    quarantine = "/var/lib/yestls-intake/quarantine"
    status_file = "/var/lib/yestls-intake/status.json"
    authserv_id = "mx.example.org"               # names the Authentication-Results header
    in_flight = 4                                # sealed messages fetched ahead
    max_message_size = 26214400                  # bytes: at least the edge's [smtp] max_message_size
    poll = 50                                    # seconds a long-poll waits
    timeout = 10                                 # seconds per spool request
    retry = [60, 300, 900, 3600]                 # backoff after LMTP 4xx, seconds
    doveadm_url = "http://127.0.0.1:8080/doveadm/v1"     # optional: finds a delivery a crash hid
    doveadm_api_key = "..."
    addresses = "/etc/yestls/addresses.json"     # optional: the site's address book (relay/addressbook.py):
                                                 # aliases delivered to their mailboxes, published to the edge
    bounce_relay = "127.0.0.1:25"                # optional: home's MTA, which sends the intake's DSNs out
    outbox = "/var/lib/yestls-intake/outbox"     # DSNs waiting for it
    give_up_after = 432000                       # seconds of temporary failures before a DSN (5 days)
    tls_reports = "tls-reports@example.org"      # optional: the TLS-RPT rua mailbox: its mail is read as
                                                 # RFC 8460 reports too (relay/home/tlsrpt.py), and delivered

    [spam]                                       # optional: rspamd judges every message (relay/home/spam.py)
    rspamd = "http://127.0.0.1:11333"            # its normal worker
    timeout = 20                                 # seconds per judgement at delivery (then tried again later)
    verdict_key = "/var/lib/yestls-intake/verdict.key"   # home's MAC key for verdicts the edge carries (made if
                                                 # missing)
    before_queue = true                          # answer the edge's verdict requests (relay/home/judge.py)
    before_queue_workers = 4                     # verdicts judged at once

    [edges]                                      # every edge (MX) home pulls from: NAME = its spool service
    edge = "10.77.0.1:7444"                      # (its tunnel address). The name is the inventory's, and keys
    edge2 = "10.77.0.3:7444"                     # the edge's rows in the ledger: keep it when an address changes
"""

import re
from dataclasses import dataclass
from pathlib import Path

from relay.config import ConfigError, Table, parse_address
from relay.spool.client import DEFAULT_MAX_MESSAGE_SIZE, max_file_size

# A sealed file is held in memory while it is unsealed (`in_flight` of them):
# a message size beyond this is a typo, not a mail server's setting.
MAX_MESSAGE_SIZE_LIMIT = 1024 * 1024 * 1024
EDGE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")   # a host name's label: it goes in paths and logs
MAX_EDGES = 16


@dataclass(frozen=True)
class Edge:
    """An edge home pulls sealed mail from."""

    name: str
    spool: tuple[str, int]   # its spool service, on the tunnel


@dataclass(frozen=True)
class SpamSettings:
    rspamd: str = "http://127.0.0.1:11333"
    timeout: float = 20.0
    verdict_key: Path = Path("/var/lib/yestls-intake/verdict.key")
    before_queue: bool = True
    before_queue_workers: int = 4


@dataclass(frozen=True)
class IntakeConfig:
    edges: tuple[Edge, ...]
    identity_key: Path
    spool_key: Path
    lmtp: str | tuple[str, int]
    ledger: Path
    quarantine: Path
    status_file: Path
    authserv_id: str
    in_flight: int
    poll: float
    timeout: float
    retry: tuple[float, ...]
    doveadm_url: str | None
    doveadm_api_key: str | None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    addresses: Path | None = None
    bounce_relay: tuple[str, int] | None = None
    outbox: Path = Path("/var/lib/yestls-intake/outbox")
    give_up_after: float = 5 * 86400
    tls_reports: str | None = None
    spam: SpamSettings | None = None   # None: no content filter, every message to INBOX

    @property
    def max_sealed_size(self) -> int:
        """The largest sealed file the intake fetches: what the edge makes of a message of max_message_size."""
        return max_file_size(self.max_message_size)


def load(path: Path) -> IntakeConfig:
    table = Table.load(path)
    lmtp_text = table.get("lmtp", str, default="/run/dovecot/lmtp", hint="a UNIX socket path or HOST:PORT")
    if lmtp_text.startswith("/"):
        lmtp = lmtp_text
    else:
        try:
            lmtp = parse_address(lmtp_text)
        except ValueError as error:
            raise table.error("lmtp", f"{error}; give a socket path or HOST:PORT") from None
    retry = table.get("retry", list, default=[60, 300, 900, 3600],
                      check=lambda v: v and all(isinstance(x, (int, float)) and x > 0 for x in v),
                      hint="a list of positive seconds")
    state = Path("/var/lib/yestls-intake")
    if "edge" in table.data:
        raise table.error("edge", f'one edge is now written in the [edges] table, with its name: '
                                  f'[edges] edge = {table.data["edge"]!r}')
    config = IntakeConfig(
        edges=edges_table(table.table("edges")),
        identity_key=Path(table.get("identity_key", str, hint="made by `yestls keys identity-new`")),
        spool_key=Path(table.get("spool_key", str, hint="made by `yestls keys spool-new`")),
        lmtp=lmtp,
        ledger=Path(table.get("ledger", str, default=str(state / "ledger.sqlite"))),
        quarantine=Path(table.get("quarantine", str, default=str(state / "quarantine"))),
        status_file=Path(table.get("status_file", str, default=str(state / "status.json"))),
        authserv_id=table.get("authserv_id", str, check=bool, hint="your MX name, e.g. mx.example.org"),
        in_flight=table.get("in_flight", int, default=4, check=lambda n: 1 <= n <= 64),
        poll=float(table.get("poll", (int, float), default=50, check=lambda n: 0 < n <= 60)),
        timeout=float(table.get("timeout", (int, float), default=10, check=lambda n: n > 0)),
        retry=tuple(float(x) for x in retry),
        doveadm_url=table.get("doveadm_url", str, default=None),
        doveadm_api_key=table.get("doveadm_api_key", str, default=None),
        max_message_size=table.get(
            "max_message_size", int, default=DEFAULT_MAX_MESSAGE_SIZE,
            check=lambda n: 1024 <= n <= MAX_MESSAGE_SIZE_LIMIT,
            hint=f"bytes, 1024 to {MAX_MESSAGE_SIZE_LIMIT}: at least the edge's [smtp] max_message_size "
                 f"({DEFAULT_MAX_MESSAGE_SIZE} unless set), or larger messages stay on the edge"),
        addresses=_optional_path(table.get("addresses", str, default=None,
                                           hint="the address book's path, e.g. /etc/yestls/addresses.json")),
        bounce_relay=table.address("bounce_relay", default=None, hint='home\'s MTA for DSNs, "HOST:PORT"'),
        outbox=Path(table.get("outbox", str, default=str(state / "outbox"))),
        give_up_after=float(table.get("give_up_after", (int, float), default=5 * 86400, check=lambda n: n > 0,
                                      hint="seconds of temporary failures before the message is bounced")),
        tls_reports=_address(table.get("tls_reports", str, default=None,
                                        check=lambda v: "@" in v.removeprefix("mailto:"),
                                        hint='the address of site.toml\'s [tls_rpt] rua, "tls-reports@example.org"')),
        spam=_spam_settings(table.table("spam"), state) if "spam" in table.data else None,
    )
    if config.doveadm_url and not config.doveadm_api_key:
        raise table.error("doveadm_api_key", "doveadm_url needs the API key Dovecot's doveadm_api_key has")
    table.done()
    return config


def edges_table(table: Table) -> tuple[Edge, ...]:
    """An [edges] table, NAME = "HOST:PORT" of its spool service, in the order written (the first the
    primary)."""
    names = list(table.data)
    if not names:
        raise table.error("", 'missing; name every edge and its spool service: [edges] edge = "10.77.0.1:7444"')
    if len(names) > MAX_EDGES:
        raise table.error("", f"{len(names)} edges; at most {MAX_EDGES}")
    edges = []
    for name in names:
        if not EDGE_NAME.fullmatch(name):
            raise table.error(name, "an edge's name is a host name label: a-z, 0-9 and -, at most 63")
        edges.append(Edge(name, table.address(name, hint="the edge's spool service, HOST:PORT on the tunnel")))
    if len({edge.spool for edge in edges}) < len(edges):
        raise table.error("", "two edges with the same spool service: each edge has its own tunnel address")
    table.done()
    return tuple(edges)


def _spam_settings(spam: Table, state: Path) -> SpamSettings:
    rspamd = spam.get("rspamd", str, default=SpamSettings.rspamd,
                      check=lambda v: v.startswith("http://"), hint="rspamd's normal worker, http://HOST:PORT")
    settings = SpamSettings(
        rspamd=rspamd,
        timeout=float(spam.get("timeout", (int, float), default=SpamSettings.timeout, check=lambda n: 0 < n <= 300,
                                hint="seconds, at most 300")),
        verdict_key=Path(spam.get("verdict_key", str, default=str(state / "verdict.key"))),
        before_queue=spam.get("before_queue", bool, default=True),
        before_queue_workers=spam.get("before_queue_workers", int, default=4, check=lambda n: 1 <= n <= 64,
                                      hint="1 to 64"),
    )
    spam.done()
    return settings


def _address(text: str | None) -> str | None:
    """An address compared without regard to case; a "mailto:" (as the rua is written) dropped."""
    return None if text is None else text.removeprefix("mailto:").lower()


def _optional_path(text: str | None) -> Path | None:
    return None if text is None else Path(text)


__all__ = ["ConfigError", "Edge", "IntakeConfig", "edges_table", "load"]
