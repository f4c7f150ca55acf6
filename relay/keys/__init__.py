"""`yestls keys ...`: every kind of key YesTLS makes (the home keystore's TLS keys, the edge's and home's
identity keys, home's spool key), in one command (relay/keys/cli.py).

It sits above relay/oracle and relay/spool so that neither imports the other: the
oracle owns the keystore, the spool owns the spool key, this package only calls them.
"""
