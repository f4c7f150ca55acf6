"""Delivery status notifications (RFC 3464): what the intake sends back when a message cannot be delivered.

Who gets one is decided by `bounce_to`: the envelope sender, except
- the null sender (`<>`: bounces are never bounced, RFC 5321 4.5.5), and
- a sender at one of the site's own domains: mail from the Internet that
  claims one of our addresses is forged or looped (our users' own mail never
  comes through the edge), and a bounce to it would be backscatter into our
  own mailbox.
The report itself (`build`) is a multipart/report: a human part, the
machine-readable status per failed recipient, and the original message's
header only (not its body: the sender has it, and a bounce must not carry a
payload someone else chose to a third party).
"""

import email.utils
import re
from email import policy
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from relay.home.headers import header_end

_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


def bounce_to(mail_from: str, site_domains: frozenset[str]) -> str | None:
    """The address a DSN for this message goes to, or None (see the module)."""
    if not mail_from:
        return None
    domain = mail_from.rpartition("@")[2].lower()
    if domain in site_domains:
        return None
    return mail_from


def status_code(reply_code: int, reply_text: str) -> str:
    """The RFC 3463 status for a reply: its enhanced code, or the class with 0.0."""
    found = _ENHANCED.search(reply_text)
    if found and found.group(1)[0] == str(reply_code)[0]:
        return found.group(1)
    return f"{str(reply_code)[0]}.0.0"


def build(*, to: str, reporting_mta: str, postmaster: str, original: bytes, arrival: float,
          failures: list[tuple[str, int, str]]) -> bytes:
    """The DSN message for `failures` [(recipient, reply code, reply text)] of `original`; CRLF lines."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <{postmaster}>"
    report["To"] = f"<{to}>"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = email.utils.formatdate(usegmt=True)
    report["Message-ID"] = email.utils.make_msgid(domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"   # RFC 3834: no auto-reply to this
    lines = [f"This is the mail system at {reporting_mta}.", "",
             "Your message could not be delivered to the recipient(s) below. Their mail system said:", ""]
    lines += [f"<{recipient}>: {code} {_one_line(text)}" for recipient, code, text in failures]
    report.attach(MIMEText("\n".join(lines) + "\n", "plain", "us-ascii"))

    status = Message()
    status.set_type("message/delivery-status")
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["Arrival-Date"] = email.utils.formatdate(arrival, usegmt=True)
    blocks = [per_message]
    for recipient, code, text in failures:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {recipient}"
        block["Action"] = "failed"
        block["Status"] = status_code(code, text)
        block["Diagnostic-Code"] = f"smtp; {code} {_one_line(text)}"
        blocks.append(block)
    status.set_payload(blocks)
    report.attach(status)

    headers = Message()
    headers.set_type("text/rfc822-headers")
    headers.set_payload(original[:header_end(original)].decode("ascii", "backslashreplace"))
    report.attach(headers)
    return report.as_bytes(policy=policy.SMTP)


def _one_line(text: str) -> str:
    """Printable ASCII, one line, bounded: a reply text from the LMTP server."""
    return "".join(c if " " <= c <= "~" else " " for c in text)[:500]
