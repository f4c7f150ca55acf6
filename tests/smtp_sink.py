"""An SMTP server that keeps what it is given: home's MTA as the intake sees it, for the DSN tests.

    with smtp_sink() as sink:            # on 127.0.0.1:sink.port
        ... sink.messages -> [Received(mail_from, rcpt_tos, content)] ...
        sink.refuse = "451 4.3.0 try later"   # the next RCPTs get this instead of 250
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller

from .oracle_home import free_port


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes


@dataclass
class Sink:
    port: int
    messages: list[Received] = field(default_factory=list)
    refuse: str | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse:
            return self.refuse
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(Received(envelope.mail_from, tuple(envelope.rcpt_tos), envelope.original_content))
        return "250 OK queued"


@contextmanager
def smtp_sink():
    sink = Sink(free_port())
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()
