"""TLS reports (RFC 8460) read at home: the RFC's example report, gzip and plain, malformed and oversize ones,
the running totals, `yestls status`, and the intake reading them while delivering them unchanged."""

import base64
import gzip
import json
import time
from pathlib import Path

import pytest

from relay import status
from relay.home import tlsrpt
from relay.home.tlsrpt import MAX_JSON, MAX_KEYS, OTHER, ReportTotals, TlsRptError, read_report

from ..intake_mail import USER, mail_world, wait_for

REPORT = (Path(__file__).parent.parent / "data" / "rfc8460-report.json").read_bytes()
RUA = "tls-reports@example.org"
BOUNDARY = "----=_NextPart_000_024E_01CC9B0A.AFE54C00"


def report_mail(payload: bytes, *, media_type="application/tlsrpt+gzip", report_type="tlsrpt",
                to=RUA, subject_id="735ff.e317+bf22029@mailexample.net") -> bytes:
    """A report mail as RFC 8460 5.3's example: multipart/report, a text part, the report base64."""
    encoded = base64.encodebytes(payload).decode().replace("\n", "\r\n")
    return (
        "From: tlsrpt@mail.sender.example.com\r\n"
        f"To: <{to}>\r\n"
        "Date: Fri, 09 May 2017 16:54:30 -0800\r\n"
        f"Subject: Report Domain: example.org Submitter: mail.sender.example Report-ID: <{subject_id}>\r\n"
        "TLS-Report-Domain: example.org\r\n"
        "TLS-Report-Submitter: mail.sender.example\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type="{report_type}";\r\n boundary="{BOUNDARY}"\r\n'
        "\r\n"
        "This is a multipart message in MIME format.\r\n\r\n"
        f"--{BOUNDARY}\r\n"
        'Content-Type: text/plain; charset="us-ascii"\r\n'
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
        "This is an aggregate TLS report from mail.sender.example\r\n\r\n"
        f"--{BOUNDARY}\r\n"
        f"Content-Type: {media_type}\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment;\r\n filename="mail.sender.example!example.org!1013662812!1013749130.json.gz"\r\n'
        "\r\n"
        f"{encoded}\r\n"
        f"--{BOUNDARY}--\r\n"
    ).encode()


def check_rfc_example(report: tlsrpt.Report) -> None:
    assert report.organization == "Company-X"
    assert report.report_id == "5065427c-23d3-47ca-b6e0-946ea0e8c4be"
    assert (report.start, report.end) == ("2016-04-01T00:00:00Z", "2016-04-01T23:59:59Z")
    (policy,) = report.policies
    assert (policy.policy_type, policy.policy_domain) == ("sts", "company-y.example")
    assert (report.successful, report.failed) == (5326, 303)
    assert report.failures() == {"certificate-expired": 100, "starttls-not-supported": 200, "validation-failure": 3}


def test_the_rfc_example_report_gzip():
    check_rfc_example(read_report(report_mail(gzip.compress(REPORT))))


def test_the_rfc_example_report_plain_json():
    check_rfc_example(read_report(report_mail(REPORT, media_type="application/tlsrpt+json")))


def test_a_report_part_is_found_without_the_multipart_report_wrapper():
    # Some reporters send the attachment in a multipart/mixed message: the part's type is what counts.
    check_rfc_example(read_report(report_mail(gzip.compress(REPORT), report_type="other").replace(
        b"multipart/report", b"multipart/mixed")))



def _with(path: tuple, value) -> bytes:
    data = json.loads(REPORT)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize(("message", "why"), [
    (report_mail(b"not gzip at all"), "not gzip"),
    (report_mail(gzip.compress(REPORT)[:40]), "cut short"),
    (report_mail(gzip.compress(b"{not json")), "not JSON"),
    (report_mail(gzip.compress(b"[1, 2]")), "the report is not an object"),
    (report_mail(gzip.compress(_with(("policies", 0, "summary", "total-failure-session-count"), "303"))),
     "total-failure-session-count is not a non-negative integer"),
    (report_mail(gzip.compress(_with(("policies", 0, "summary", "total-successful-session-count"), -1))),
     "non-negative"),
    (report_mail(gzip.compress(_with(("policies", 0, "summary", "total-successful-session-count"), True))),
     "non-negative"),
    (report_mail(gzip.compress(_with(("policies",), {}))), "policies is not a list"),
    (report_mail(gzip.compress(_with(("date-range",), None))), "date-range is not an object"),
    (report_mail(gzip.compress(_with(("organization-name",), 7))), "organization-name is not a string"),
    (report_mail(gzip.compress(_with(("policies",), [json.loads(REPORT)["policies"][0]] * 1001))), "over 1000"),
    (b"From: a@b.example\r\nTo: <tls-reports@example.org>\r\nSubject: hello\r\n\r\nJust mail.\r\n",
     "not a TLS report"),
    (report_mail(b"", media_type="application/octet-stream"), "without an application/tlsrpt"),
])
def test_malformed_reports_are_refused_with_a_reason(message, why):
    with pytest.raises(TlsRptError, match=why):
        read_report(message)


def test_oversize_reports_are_refused_before_they_are_read():
    bomb = gzip.compress(b" " * (MAX_JSON + 1024))      # a few KiB that would inflate past the cap
    assert len(bomb) < 64 * 1024
    with pytest.raises(TlsRptError, match="once decompressed"):
        read_report(report_mail(bomb))
    with pytest.raises(TlsRptError, match="over"):
        read_report(report_mail(b"{" + b" " * MAX_JSON + b"}", media_type="application/tlsrpt+json"))
    with pytest.raises(TlsRptError, match="the message is over"):
        read_report(report_mail(gzip.compress(REPORT)) + b" " * tlsrpt.MAX_MESSAGE)


def test_strings_from_the_reporter_are_bounded_and_printable():
    data = _with(("organization-name",), "Evil\r\nInjected: yes" + "x" * 1000)
    data = json.dumps({**json.loads(data), "policies": [{
        "policy": {"policy-type": "sts", "policy-domain": "example.org"},
        "summary": {"total-successful-session-count": 1, "total-failure-session-count": 1},
        "failure-details": [{"result-type": "Not A Token!", "failed-session-count": 1}]}]}).encode()
    report = read_report(report_mail(gzip.compress(data)))
    assert report.organization.startswith("EvilInjected: yes") and len(report.organization) == tlsrpt.MAX_TEXT
    assert report.failures() == {"invalid": 1}


def test_totals_add_up_cap_what_anyone_can_send_and_survive_json():
    totals = ReportTotals()
    report = read_report(report_mail(gzip.compress(REPORT)))
    totals.add(report, 1000.0)
    totals.add(report, 2000.0)
    assert (totals.reports, totals.successful, totals.failed, totals.last_report) == (2, 10652, 606, 2000.0)
    assert totals.organizations == {"Company-X": {"reports": 2, "successful": 10652, "failed": 606}}
    assert totals.result_types["starttls-not-supported"] == 400
    for number in range(MAX_KEYS + 5):
        other = read_report(report_mail(gzip.compress(_with(("organization-name",), f"org{number}"))))
        totals.add(other, 3000.0)
    assert len(totals.organizations) == MAX_KEYS + 1 and totals.organizations[OTHER]["reports"] == 6
    assert ReportTotals.from_json(json.loads(json.dumps(totals.to_json()))) == totals
    assert ReportTotals.from_json({"reports": "many"}) == ReportTotals()
    assert ReportTotals.from_json(None) == ReportTotals()


def test_status_shows_failures_by_result_type():
    totals = ReportTotals(malformed=1)
    totals.add(read_report(report_mail(gzip.compress(REPORT))), time.time() - 3600)
    rows = {row.item: row for row in status.tls_report_rows(totals.to_json(), time.time())}
    assert rows["TLS reports"].text.startswith("1 report(s), last 60 min ago: 5326 session(s) successful, "
                                               "303 failed; 1 malformed")
    assert "starttls-not-supported 200, certificate-expired 100, validation-failure 3" in rows["TLS failures"].text
    assert "Company-X 303" in rows["TLS failures"].text
    assert status.tls_report_rows(None, time.time()) == []


# --- through the intake -----------------------------------------------------------------------------------------

def test_the_intake_reads_reports_and_still_delivers_them(tmp_path_factory, pki):
    options = f'tls_reports = "mailto:{RUA.upper()}"'   # as site.toml's rua is written; any case
    with mail_world(tmp_path_factory.mktemp("tlsrpt"), pki, users=(USER, RUA), intake_options=options) as world:
        good = report_mail(gzip.compress(REPORT))
        broken = report_mail(b"not gzip at all", subject_id="broken@mailexample.net")
        to_user = report_mail(gzip.compress(REPORT), to=USER, subject_id="elsewhere@mailexample.net")
        sent = [world.send("tlsrpt@mail.sender.example.com", [RUA], good),
                world.send("tlsrpt@mail.sender.example.com", [RUA], broken),
                world.send("tlsrpt@mail.sender.example.com", [USER], to_user)]
        with world.intake_running() as intake:
            world.wait_for_acknowledged(*sent, process=intake)
            got = world.wait_for_mailbox(RUA, 2, intake)
            assert world.wait_for_mailbox(USER, 1, intake)
            state = _status_when(world, lambda s: s["tls_reports"]["malformed"] == 1, intake)
        assert [message.endswith(original) for message, original in zip(got, (good, broken))] == [True, True]
        reports = state["tls_reports"]
        assert (reports["reports"], reports["malformed"], reports["failed"]) == (1, 1, 303)
        assert reports["organizations"] == {"Company-X": {"reports": 1, "successful": 5326, "failed": 303}}

        # A restart keeps the totals: reports come once a day.
        again = world.send("tlsrpt@mail.sender.example.com", [RUA], report_mail(gzip.compress(REPORT),
                                                                               subject_id="next@mailexample.net"))
        with world.intake_running() as intake:
            world.wait_for_acknowledged(again, process=intake)
            state = _status_when(world, lambda s: s["tls_reports"]["reports"] == 2, intake)
        assert state["tls_reports"]["result_types"]["certificate-expired"] == 200
        rows = {row.item: row.text for row in status.intake_rows(world.intake.config, time.time())}
        assert "2 report(s)" in rows["TLS reports"] and "certificate-expired 200" in rows["TLS failures"]


def _status_when(world, condition, process) -> dict:
    found = {}

    def ready() -> bool:
        try:
            found.update(json.loads(world.intake.status_file.read_text()))
            return "tls_reports" in found and condition(found)
        except (OSError, ValueError):
            return False

    wait_for(ready, "the intake's status file to count the reports",
             details=lambda: f"{found.get('tls_reports')}\n{world.logs(process)}")
    return found
