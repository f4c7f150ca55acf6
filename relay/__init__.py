"""YesTLS: a cloud MX with keyless TLS that seals mail for home."""

__version__ = "0.1.0"
