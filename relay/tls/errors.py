"""The engine's exceptions: one per TLS alert it sends, one for alerts it receives.

`TLSAlert` is raised when *we* end the connection: the matching fatal alert is
already queued in `data_to_send()` when the caller sees it. `PeerAlert` is
raised when the peer ends it with a fatal alert. Nothing else escapes the
engine for any input (the fuzz tests hold it to that).
"""

from .constants import AlertDescription


class TLSError(Exception):
    """Base of everything the engine raises."""


class TLSAlert(TLSError):
    description: AlertDescription = AlertDescription.internal_error

    def __init__(self, message: str = ""):
        super().__init__(message or self.description.name)
        self.message = message or self.description.name

    def __str__(self) -> str:
        return f"{self.description.name}: {self.message}"


class UnexpectedMessage(TLSAlert):
    description = AlertDescription.unexpected_message


class BadRecordMac(TLSAlert):
    description = AlertDescription.bad_record_mac


class RecordOverflow(TLSAlert):
    description = AlertDescription.record_overflow


class HandshakeFailure(TLSAlert):
    description = AlertDescription.handshake_failure


class IllegalParameter(TLSAlert):
    description = AlertDescription.illegal_parameter


class DecodeError(TLSAlert):
    description = AlertDescription.decode_error


class DecryptError(TLSAlert):
    description = AlertDescription.decrypt_error


class ProtocolVersion(TLSAlert):
    description = AlertDescription.protocol_version


class InappropriateFallback(TLSAlert):
    description = AlertDescription.inappropriate_fallback


class InternalError(TLSAlert):
    description = AlertDescription.internal_error


class MissingExtension(TLSAlert):
    description = AlertDescription.missing_extension


class NoApplicationProtocol(TLSAlert):
    description = AlertDescription.no_application_protocol


class PeerAlert(TLSError):
    """The peer sent a fatal alert; the connection is over."""

    def __init__(self, description: int):
        try:
            self.description = AlertDescription(description)
            name = self.description.name
        except ValueError:
            self.description = description
            name = f"alert {description}"
        super().__init__(f"peer sent {name}")


class ConnectionClosed(TLSError):
    """The application used a connection that is already closed."""
