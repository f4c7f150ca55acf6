"""The edge: the public MX that seals every message before it touches disk."""
