"""asyncio adapters: the TLS engine over transports."""
