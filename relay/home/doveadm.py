"""Asking Dovecot, through doveadm's HTTP API, whether a message is already in a mailbox.

Used only for recipients left in doubt by a crash between Dovecot's answer and
the ledger's record: the message carries an X-YesTLS-Spool-Id header, so a
search on it says whether the earlier attempt got there.
"""

import asyncio
import base64
import json
import urllib.request

# doveadm's exit code for "user doesn't exist" (EX_NOUSER).
NO_SUCH_USER = 67


class DoveadmError(Exception):
    pass


class DeliveryFinder:
    def __init__(self, url: str, api_key: str, timeout: float = 10.0):
        self.url = url
        self.authorization = "X-Dovecot-API " + base64.b64encode(api_key.encode()).decode()
        self.timeout = timeout

    async def delivered(self, user: str, spool_id: str) -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self._search, user, spool_id)

    def _search(self, user: str, spool_id: str) -> bool:
        command = [["search", {"user": user, "query": ["mailbox", "*", "header", "X-YesTLS-Spool-Id", spool_id]},
                    "yestls"]]
        request = urllib.request.Request(self.url, data=json.dumps(command).encode(), method="POST",
                                         headers={"Authorization": self.authorization,
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.load(response)
        except (OSError, ValueError) as error:
            raise DoveadmError(f"doveadm at {self.url}: {error}") from None
        kind, result, _ = answer[0]
        if kind == "error" and isinstance(result, dict) and result.get("exitCode") == NO_SUCH_USER:
            return False  # Dovecot has no such user: nothing can have been delivered to it
        if kind != "doveadmResponse":
            raise DoveadmError(f"doveadm search for {user}: {result}")
        return bool(result)
