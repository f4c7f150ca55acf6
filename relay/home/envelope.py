"""The envelope home delivers with, checked from the sealed metadata before any LMTP command is written.

The edge records the envelope in the sealed metadata (`mail_from`,
`rcpt_tos`, `smtputf8`); a compromised edge can put anything there. Every
address must be one RFC 5321 mailbox fit for a path (relay/smtp/address.py,
the same rules the edge applies at MAIL and RCPT).

The null reverse-path (`<>`, recorded as "<>" or "") is the sender of
bounces, allowed for MAIL FROM only. `rcpt_tos` must be a non-empty list of
at most MAX_RECIPIENTS such strings, `smtputf8` a boolean (absent: false).
Anything else is an EnvelopeError, and the intake quarantines the message:
no recipient gets it, so it is never half-delivered.
"""

from dataclasses import dataclass

from relay.show import show
from relay.smtp.address import AddressError, check_mailbox

MAX_RECIPIENTS = 1000    # RFC 5321 4.5.3.1.8 asks servers to take at least 100; the edge's default limit is 100


class EnvelopeError(ValueError):
    """The sealed metadata's envelope cannot be delivered as it is: the message goes to the quarantine."""


@dataclass(frozen=True)
class Envelope:
    mail_from: str                 # "" for the null reverse-path
    recipients: tuple[str, ...]    # in the edge's order; a repeated one is delivered once (the ledger)
    smtputf8: bool


def envelope_from_metadata(metadata: dict) -> Envelope:
    """The checked envelope of the sealed metadata; EnvelopeError saying what is wrong."""
    smtputf8 = metadata.get("smtputf8", False)
    if not isinstance(smtputf8, bool):
        raise EnvelopeError(f"smtputf8 is {show(smtputf8)}, not true or false")
    if "mail_from" not in metadata:
        raise EnvelopeError("no mail_from")
    mail_from = metadata["mail_from"]
    if mail_from in ("", "<>"):
        mail_from = ""
    else:
        mail_from = _mailbox(mail_from, smtputf8, "mail_from")
    recipients = metadata.get("rcpt_tos")
    if not isinstance(recipients, list) or not recipients:
        raise EnvelopeError(f"rcpt_tos is {show(recipients)}, not a non-empty list of addresses")
    if len(recipients) > MAX_RECIPIENTS:
        raise EnvelopeError(f"rcpt_tos names {len(recipients)} recipients, more than {MAX_RECIPIENTS}")
    checked = tuple(_mailbox(r, smtputf8, f"rcpt_tos[{i}]") for i, r in enumerate(recipients))
    return Envelope(mail_from, checked, smtputf8)


def _mailbox(address, smtputf8: bool, what: str) -> str:
    try:
        return check_mailbox(address, smtputf8, what=what)
    except AddressError as error:
        raise EnvelopeError(str(error)) from None
