"""TLS reports (RFC 8460) that senders mail to the site's `rua` address: read at home, totalled for `yestls status`.

A sender that publishes TLS-RPT results reports, about once a day, how many of its SMTP sessions to our
MX succeeded and which failed and why (certificate-expired, starttls-not-supported, sts-policy-fetch-error,
validation-failure, ...). The site asks for them with `_smtp._tls.<domain> TXT "v=TLSRPTv1;
rua=mailto:..."` (`yestls dns`); they arrive as mail through the edge like any other.

The intake calls `read_report` for each message whose recipients include the address intake.toml's
`tls_reports` names, once its delivery is final. Delivery is not changed: the report still goes to the
mailbox. What is read:

- a message whose top-level type is multipart/report with report-type="tlsrpt", or that carries a part
  of type application/tlsrpt+gzip or application/tlsrpt+json (RFC 8460 5.3); the first such part is
  the report, its body base64 or as it is, gzip-compressed (+gzip) or not (+json);
- at most MAX_MESSAGE bytes of message, MAX_JSON bytes once decompressed (gzip read with a cap: a
  small bomb stays small), MAX_POLICIES policies and MAX_DETAILS failure details each;
- organization-name, date-range, report-id, and per policy: policy-type and policy-domain, the
  summary's total-successful-session-count and total-failure-session-count, each failure detail's
  result-type and failed-session-count. Numbers must be non-negative integers; strings are cut and
  stripped of control characters (the report comes from anyone who can send us mail).

Anything else sent to the address (not a report, broken MIME, gzip or JSON, a field of the wrong
type, too large) raises TlsRptError: the intake logs it and counts it as malformed, and delivers
the message anyway.

`ReportTotals` keeps the running totals the status file carries: reports, sessions successful and
failed, per reporting organization and per result type, the last report's time. Anyone can send
reports, so the number of organizations and result types kept is capped; past the cap they add to
OTHER.
"""

import email
import email.policy
import json
import re
import zlib
from dataclasses import dataclass, field

MAX_MESSAGE = 10 * 1024 * 1024   # bytes of a message looked at
MAX_JSON = 5 * 1024 * 1024       # bytes of report JSON, decompressed
MAX_POLICIES = 1000
MAX_DETAILS = 1000               # failure details per policy
MAX_TEXT = 200                   # characters of a string kept
MAX_KEYS = 100                   # organizations, and result types, kept in the totals
OTHER = "(others)"
REPORT_TYPES = ("application/tlsrpt+gzip", "application/tlsrpt+json")
_RESULT_TYPE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


class TlsRptError(ValueError):
    """Not a usable TLS report; the message says why."""


@dataclass(frozen=True)
class PolicyResult:
    policy_type: str            # sts, tlsa, no-policy-found
    policy_domain: str
    successful: int
    failed: int
    failures: dict[str, int]    # result-type -> failed sessions


@dataclass(frozen=True)
class Report:
    organization: str
    report_id: str
    start: str
    end: str
    policies: tuple[PolicyResult, ...]

    @property
    def successful(self) -> int:
        return sum(p.successful for p in self.policies)

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self.policies)

    def failures(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for policy in self.policies:
            for result_type, count in policy.failures.items():
                totals[result_type] = totals.get(result_type, 0) + count
        return totals


# --- finding the report in a message ---------------------------------------------------------------------

def report_json(message: bytes) -> bytes:
    """The report's JSON from a TLS-RPT mail, decompressed and bounded; TlsRptError when there is none."""
    if len(message) > MAX_MESSAGE:
        raise TlsRptError(f"the message is over {MAX_MESSAGE} bytes")
    try:
        parsed = email.message_from_bytes(message, policy=email.policy.compat32)
        parts = [part for part in parsed.walk() if part.get_content_type() in REPORT_TYPES]
    except Exception as error:  # noqa: BLE001 - the email package raises many kinds on broken MIME
        raise TlsRptError(f"unreadable MIME ({type(error).__name__})") from None
    if not parts:
        kind = parsed.get_content_type()
        tlsrpt = kind == "multipart/report" and (parsed.get_param("report-type") or "").lower() == "tlsrpt"
        raise TlsRptError("a multipart/report of type tlsrpt without an application/tlsrpt+gzip or +json part"
                          if tlsrpt else f"not a TLS report (a {kind} message without an application/tlsrpt part)")
    part = parts[0]
    body = part.get_payload(decode=True)
    if not isinstance(body, bytes):
        raise TlsRptError(f"the {part.get_content_type()} part has no body")
    if part.get_content_type() == "application/tlsrpt+gzip":
        return _gunzip(body)
    if len(body) > MAX_JSON:
        raise TlsRptError(f"the report is over {MAX_JSON} bytes")
    return body


def _gunzip(data: bytes) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, MAX_JSON + 1)
    except zlib.error as error:
        raise TlsRptError(f"not gzip ({error})") from None
    if len(out) > MAX_JSON:
        raise TlsRptError(f"the report is over {MAX_JSON} bytes once decompressed")
    if not inflater.eof:
        raise TlsRptError("the gzip stream is cut short")
    return out


# --- reading the JSON ------------------------------------------------------------------------------------------

def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise TlsRptError(f"{what} is not a string")
    return "".join(c for c in value if c.isprintable())[:MAX_TEXT]


def _count(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TlsRptError(f"{what} is not a non-negative integer")
    return value


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise TlsRptError(f"{what} is not an object")
    return value


def _list(value, what: str, limit: int) -> list:
    if not isinstance(value, list):
        raise TlsRptError(f"{what} is not a list")
    if len(value) > limit:
        raise TlsRptError(f"{what} has over {limit} entries")
    return value


def result_type(value) -> str:
    """A result-type as the totals key it: RFC 8460's tokens, anything else "invalid"."""
    text = _text(value, "result-type").lower()
    return text if _RESULT_TYPE.fullmatch(text) else "invalid"


def parse_report(data: bytes) -> Report:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise TlsRptError(f"not JSON ({str(error)[:100]})") from None
    document = _object(document, "the report")
    dates = _object(document.get("date-range"), "date-range")
    policies = []
    for number, entry in enumerate(_list(document.get("policies"), "policies", MAX_POLICIES), start=1):
        where = f"policies[{number}]"
        entry = _object(entry, where)
        policy = _object(entry.get("policy"), f"{where}.policy")
        summary = _object(entry.get("summary"), f"{where}.summary")
        failures: dict[str, int] = {}
        for detail in _list(entry.get("failure-details", []), f"{where}.failure-details", MAX_DETAILS):
            detail = _object(detail, f"{where}.failure-details[]")
            kind = result_type(detail.get("result-type"))
            failures[kind] = failures.get(kind, 0) + _count(detail.get("failed-session-count"),
                                                            f"{where} failed-session-count")
        policies.append(PolicyResult(
            _text(policy.get("policy-type"), f"{where}.policy-type"),
            _text(policy.get("policy-domain"), f"{where}.policy-domain"),
            _count(summary.get("total-successful-session-count"), f"{where} total-successful-session-count"),
            _count(summary.get("total-failure-session-count"), f"{where} total-failure-session-count"),
            failures))
    return Report(_text(document.get("organization-name"), "organization-name"),
                  _text(document.get("report-id"), "report-id"),
                  _text(dates.get("start-datetime"), "start-datetime"),
                  _text(dates.get("end-datetime"), "end-datetime"), tuple(policies))


def read_report(message: bytes) -> Report:
    """The TLS report a message carries; TlsRptError when it carries none that can be read."""
    return parse_report(report_json(message))


# --- running totals ---------------------------------------------------------------------------------------------

def _add(counts: dict, key: str, value: int) -> None:
    if key not in counts and len(counts) >= MAX_KEYS:
        key = OTHER
    counts[key] = counts.get(key, 0) + value


@dataclass
class ReportTotals:
    reports: int = 0
    malformed: int = 0
    successful: int = 0
    failed: int = 0
    last_report: float | None = None
    organizations: dict[str, dict[str, int]] = field(default_factory=dict)  # org -> reports/successful/failed
    result_types: dict[str, int] = field(default_factory=dict)             # result-type -> failed sessions

    def add(self, report: Report, now: float) -> None:
        self.reports += 1
        self.successful += report.successful
        self.failed += report.failed
        self.last_report = now
        organization = report.organization or "(unnamed)"
        if organization not in self.organizations and len(self.organizations) >= MAX_KEYS:
            organization = OTHER
        totals = self.organizations.setdefault(organization, {"reports": 0, "successful": 0, "failed": 0})
        totals["reports"] += 1
        totals["successful"] += report.successful
        totals["failed"] += report.failed
        for kind, count in report.failures().items():
            _add(self.result_types, kind, count)

    def to_json(self) -> dict:
        return {"reports": self.reports, "malformed": self.malformed, "successful": self.successful,
                "failed": self.failed, "last_report": self.last_report, "organizations": self.organizations,
                "result_types": self.result_types}

    @classmethod
    def from_json(cls, data) -> "ReportTotals":
        """The totals a status file kept; empty ones for anything that is not what to_json wrote."""
        try:
            numbers = {k: data[k] for k in ("reports", "malformed", "successful", "failed")}
            last = data["last_report"]
            organizations = {str(org): {k: int(v[k]) for k in ("reports", "successful", "failed")}
                             for org, v in data["organizations"].items()}
            result_types = {str(k): int(v) for k, v in data["result_types"].items()}
            if not all(isinstance(v, int) for v in numbers.values()) or not isinstance(last, (int, float, type(None))):
                raise TypeError
        except (TypeError, KeyError, ValueError, AttributeError):
            return cls()
        return cls(**numbers, last_report=last, organizations=organizations, result_types=result_types)
