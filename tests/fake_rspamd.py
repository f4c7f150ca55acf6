"""A stand-in for rspamd's normal worker on loopback: /checkv2 answered with JSON of rspamd 3.4's shape.

    with run_fake_rspamd() as rspamd:            # rspamd.url for intake.toml's [spam]
        ...
        rspamd.requests[0].headers["IP"]         # what the client sent, in order

The real rspamd runs in the Molecule scenario (roles/home_spam); here the
answer is chosen by the message: GTUBE's string is `reject` (score 1000),
JUNK_MARK is `add header`, anything else `no action`. `rspamd.answer` can be
replaced (a function of the request) to play a broken or slow filter.
"""

import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .background import serving_in_thread

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
JUNK_MARK = b"JUNK-ME-PLEASE"


@dataclass
class Request:
    path: str
    headers: Message
    body: bytes


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""


def verdict_json(action: str, score: float, symbols: dict, mta_name: str, mail_from: str) -> bytes:
    """JSON as rspamd 3.4's /checkv2 writes it, with milter_headers' additions."""
    return json.dumps({
        "is_skipped": False, "score": score, "required_score": 15.0, "action": action,
        "thresholds": {"reject": 15.0, "add header": 6.0, "greylist": 4.0},
        "symbols": {name: {"name": name, "score": value, "metric_score": value} for name, value in symbols.items()},
        "messages": {}, "message-id": "fake@rspamd", "time_real": 0.001, "milter": {
            "add_headers": {
                "Authentication-Results": {"value": f"{mta_name};\n\tspf=none smtp.mailfrom={mail_from or '<>'};"
                                                    "\n\tdkim=none; dmarc=none", "order": 0},
                "X-Spamd-Result": {"value": f"default: {action != 'no action'} [{score:.2f} / 15.00];\n\t"
                                            + ";\n\t".join(f"{n}({v:.2f})" for n, v in symbols.items()),
                                   "order": 0},
            },
            "remove_headers": {"X-Spamd-Result": 0, "Authentication-Results": 0},
        },
    }).encode()


def default_answer(request: Request) -> Answer:
    mta_name = request.headers.get("MTA-Name", "localhost")
    mail_from = request.headers.get("From", "")
    if GTUBE in request.body:
        return Answer(body=verdict_json("reject", 1000.0, {"GTUBE": 1000.0}, mta_name, mail_from))
    if JUNK_MARK in request.body:
        return Answer(body=verdict_json("add header", 7.5, {"FAKE_JUNK": 7.5}, mta_name, mail_from))
    return Answer(body=verdict_json("no action", -0.1, {"FAKE_HAM": -0.1}, mta_name, mail_from))


@dataclass
class FakeRspamd:
    url: str
    requests: list[Request] = field(default_factory=list)
    answer: Callable[[Request], Answer] = default_answer


@contextmanager
def run_fake_rspamd():
    fake = FakeRspamd("")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            request = Request(self.path, self.headers, body)
            fake.requests.append(request)
            answer = fake.answer(request)
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer.body)))
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                self.wfile.write(answer.body)
            except BrokenPipeError:
                pass   # the client stopped reading (an answer over its limit)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    with serving_in_thread(server):
        yield fake
