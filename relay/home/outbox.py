"""Mail the intake itself sends (DSNs), kept on disk until home's MTA has taken it.

A message goes into the outbox (one file, written atomically, named by the
spool id it is about: writing it again replaces it, so a crash and a retry
never make two) before the intake records the delivery as done. `send_all`
hands each file to home's MTA over SMTP (`MAIL FROM:<>`: a DSN has the null
sender) and deletes it once the MTA answered 250; an MTA that is down or
refuses temporarily leaves it for the next round. A crash between the 250
and the delete sends that DSN twice; that window is the only one.

File format: a JSON object {"to": address, "message": base64 of the message}.
"""

import base64
import json
import logging
import smtplib
from pathlib import Path

from relay.private_files import write_atomically
from relay.spool.store import validate_id

log = logging.getLogger("yestls.intake")


class Outbox:
    def __init__(self, directory: Path, relay: tuple[str, int], helo: str, timeout: float = 30.0):
        self.directory = directory
        self.relay = relay
        self.helo = helo
        self.timeout = timeout
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def put(self, spool_id: str, to: str, message: bytes) -> None:
        document = {"to": to, "message": base64.b64encode(message).decode()}
        write_atomically(self.directory / f"{validate_id(spool_id)}.dsn", json.dumps(document).encode())

    def waiting(self) -> list[Path]:
        return sorted(self.directory.glob("*.dsn"))

    def send_all(self) -> int:
        """Hand every waiting message to the MTA (blocking: run it in a thread); how many were sent."""
        sent = 0
        for path in self.waiting():
            try:
                document = json.loads(path.read_text())
                to, message = document["to"], base64.b64decode(document["message"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.error("outbox: %s is unreadable (%s); left for a person to look at", path, error)
                path.rename(path.with_suffix(".bad"))
                continue
            try:
                with smtplib.SMTP(*self.relay, local_hostname=self.helo, timeout=self.timeout) as smtp:
                    smtp.sendmail("", [to], message)
            except smtplib.SMTPRecipientsRefused as error:
                reply = error.recipients.get(to, (0, b""))
                if 500 <= reply[0] < 600:
                    log.error("outbox: the MTA refused the DSN to %s for good (%s); dropped", to, reply)
                    path.unlink()
                    continue
                log.warning("outbox: DSN to %s deferred (%s); will retry", to, reply)
                return sent
            except (OSError, smtplib.SMTPException) as error:
                log.warning("outbox: cannot hand DSNs to %s:%d (%s); will retry", *self.relay, error)
                return sent
            path.unlink()
            sent += 1
            log.info("outbox: DSN to %s handed to %s:%d", to, *self.relay)
        return sent
