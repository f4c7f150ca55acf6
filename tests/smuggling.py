"""Message bodies that would end an LMTP (or SMTP) message early for some reader, then run a second transaction.

    for name, body in smuggling_cases().items():
        message_body = body(rcpt, victim)      # bytes: text, an end-of-data form, MAIL/RCPT(victim, rcpt)/DATA or BDAT

Servers disagree on what ends a line (Dovecot: LF, with or without CR;
others: a bare CR too; a C reader: the NUL in ".\\0"), so each form of the
end-of-data dot is here, alone, with its dot doubled, and before a whole
second transaction to a victim and to the recipient itself. Used against
the real Dovecot (tests/home/test_intake_hostile_content.py) and against a
lenient LMTP server that ends lines at anything (tests/home/test_intake_lmtp.py).
No case holds CR CR LF (Dovecot stores one CR of it less, which says
nothing about smuggling).
"""

# Where a body can end for some reader: Dovecot ends lines at LF, other servers at a bare CR too.
TERMINATORS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "LF.CR": b"\n.\r",
    "CRLF.CRLF": b"\r\n.\r\n",          # the one a naive client already escapes: a control
    "CRLF.NUL.CRLF": b"\r\n.\x00\r\n",  # a C reader's line "." ends at the NUL
    "CRLF.NUL-dot.CRLF": b"\r\n\x00.\r\n",
}


def second_data_transaction(rcpt: str, victim: str) -> bytes:
    return (f"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<{victim}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n"
            "From: ceo@example.org\r\nSubject: smuggled\r\n\r\nwire the money\r\n.\r\n").encode()


def second_bdat_transaction(rcpt: str, victim: str) -> bytes:
    smuggled = b"From: ceo@example.org\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
    return (f"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<{victim}>\r\nRCPT TO:<{rcpt}>\r\n"
            f"BDAT {len(smuggled)} LAST\r\n").encode() + smuggled


def smuggling_cases() -> dict:
    """name -> body(rcpt, victim): text, an end-of-data form, a second transaction, more text."""
    cases = {}
    for name, terminator in TERMINATORS.items():
        cases[f"{name} then MAIL/RCPT/DATA"] = (
            lambda r, v, t=terminator: b"Dear colleague," + t + second_data_transaction(r, v) + b"regards\r\n")
        cases[f"{name} then MAIL/RCPT/BDAT"] = (
            lambda r, v, t=terminator: b"Dear colleague," + t + second_bdat_transaction(r, v) + b"regards\r\n")
        cases[f"{name} with its dot doubled"] = (
            lambda r, v, t=terminator: b"Dear colleague," + t.replace(b".", b"..") + second_data_transaction(r, v))
    cases["ends in LF dot"] = lambda r, v: b"the last line is a dot\n."
    cases["ends in CR dot CR"] = lambda r, v: b"the last line is a dot\r.\r"
    cases["NULs and dots throughout"] = (
        lambda r, v: b".\x00.\r\n\x00\r\n..\n.\r\x00.\x00\n" + second_data_transaction(r, v) + b".")
    return cases
