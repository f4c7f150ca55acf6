"""The key oracle: home holds the TLS keys and signs live handshakes for the edge."""
