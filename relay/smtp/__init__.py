"""SMTP on the wire, without I/O: what the edge reads from its clients."""
