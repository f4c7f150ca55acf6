"""Where a server connection is in its handshake."""

from enum import Enum, auto


class State(Enum):
    START = auto()              # waiting for the first ClientHello
    WAIT_SECOND_HELLO = auto()  # TLS 1.3: sent HelloRetryRequest
    WAIT_SIGNATURE = auto()     # waiting for the signer (TLS 1.3: ServerHello sent; TLS 1.2: nothing sent yet)
    WAIT_CLIENT_KEY_EXCHANGE = auto()   # TLS 1.2: sent ServerHelloDone
    WAIT_CHANGE_CIPHER_SPEC = auto()    # TLS 1.2: keys made, the client's ChangeCipherSpec next
    WAIT_FINISHED = auto()      # waiting for the client's Finished
    CONNECTED = auto()
    CLOSED = auto()
