"""A private Dovecot for tests: IMAP, LMTP and doveadm's HTTP API on loopback, Maildir in a temp dir.

    with run_dovecot(users=("user@example.org",)) as dovecot:
        dovecot.lmtp_port, dovecot.imap_port, dovecot.doveadm_url, dovecot.api_key
        dovecot.fetch_all("user@example.org") -> [message bytes, ...] over IMAP (imaplib)

Mail belongs to `nobody`; users log in with the password "secret". The
instance lives in its own directory under /tmp, traversable by Dovecot's
unprivileged processes (pytest's tmp_path is not), removed at the end.
"""

import imaplib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .oracle_home import free_port

PASSWORD = "secret"


@dataclass
class Dovecot:
    directory: Path
    config: Path
    imap_port: int
    lmtp_port: int
    doveadm_port: int
    api_key: str
    process: subprocess.Popen | None = None

    @property
    def doveadm_url(self) -> str:
        return f"http://127.0.0.1:{self.doveadm_port}/doveadm/v1"

    def log(self) -> str:
        path = self.directory / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def imap(self, user: str) -> imaplib.IMAP4:
        connection = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10)
        connection.login(user, PASSWORD)
        return connection

    def fetch_all(self, user: str, mailbox: str = "INBOX") -> list[bytes]:
        """Every message in `mailbox`, in order, as the IMAP server returns it (RFC822)."""
        connection = self.imap(user)
        try:
            connection.select(mailbox, readonly=True)
            _, data = connection.search(None, "ALL")
            messages = []
            for number in data[0].split():
                _, parts = connection.fetch(number, "(RFC822)")
                messages.append(parts[0][1])
            return messages
        finally:
            connection.logout()

    def doveadm(self, *args: str) -> str:
        return subprocess.run(["doveadm", "-c", str(self.config), *args], check=True, capture_output=True,
                              text=True, timeout=30).stdout

    def start(self, timeout: float = 20.0) -> None:
        self.process = subprocess.Popen(["dovecot", "-F", "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"dovecot exited:\n{self.log()}")
            try:
                self.imap_ready()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"dovecot did not start:\n{self.log()}")

    def imap_ready(self) -> None:
        imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=2).logout()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None


def make_dovecot(users=("user@example.org",), *, quota: str | None = None) -> Dovecot:
    """Write a private Dovecot's config; `quota` (e.g. "1k") gives users a storage quota (over it: 4xx)."""
    directory = Path(tempfile.mkdtemp(prefix="yestls-dovecot-"))
    directory.chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    mail = directory / "mail"
    mail.mkdir(exist_ok=True)
    os.chown(mail, nobody.pw_uid, nobody.pw_gid)
    (directory / "users").write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}::::::\n" for u in users))
    imap_port, lmtp_port, doveadm_port = free_port(), free_port(), free_port()
    api_key = os.urandom(12).hex()
    quota_config = ""
    if quota:
        quota_config = (
            "mail_plugins = $mail_plugins quota\n"
            f"plugin {{\n  quota = count:User quota\n  quota_rule = *:storage={quota}\n"
            "  quota_vsizes = yes\n}\n"
            "quota_full_tempfail = yes\n"
        )
    config = directory / "dovecot.conf"
    config.write_text(f"""
base_dir = {directory}/run
state_dir = {directory}/state
log_path = {directory}/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{mail}/%u
mail_uid = {nobody.pw_uid}
mail_gid = {nobody.pw_gid}
first_valid_uid = {nobody.pw_uid}
first_valid_gid = {nobody.pw_gid}
doveadm_api_key = {api_key}
{quota_config}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {directory}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {directory}/users
  default_fields = uid={nobody.pw_uid} gid={nobody.pw_gid} home={mail}/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
service doveadm {{
  inet_listener http {{
    address = 127.0.0.1
    port = {doveadm_port}
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@example.org
}}
""")
    return Dovecot(directory, config, imap_port, lmtp_port, doveadm_port, api_key)


@contextmanager
def run_dovecot(users=("user@example.org",), **options):
    dovecot = make_dovecot(users, **options)
    try:
        dovecot.start()
        yield dovecot
    finally:
        dovecot.stop()
        shutil.rmtree(dovecot.directory, ignore_errors=True)
