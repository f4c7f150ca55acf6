"""The spool over the tunnel: home's intake lists, fetches, acknowledges and long-polls the edge's spool.

The methods sit behind a relay.tunnel.TunnelService named "spool": only
allowlisted tunnel addresses connect, and nothing but ping/hello/auth is
served until the connection proves home's identity key. Serve it with

    service = SpoolService(spool, peers, AuditLog(path), registry)   # registry: the edge's CollectorRegistry
    servers = await service.serve(listen)                            # relay.tunnel.serve(service.gate, ...)

The spool's own gauges (depth, bytes, oldest age) are relay.spool.metrics.
SpoolMetrics, registered where the Spool is made: they matter with or
without this service.

Methods (docs/spool-format.md):
    list  {"after": ID|null, "limit": N}       -> {"messages": [{"id", "size", "accepted"}], "more": bool}
    fetch {"id", "offset", "length"}            -> {"size": N}, tail = those bytes of the sealed file
    ack   {"id"}                                -> {}   (deleted, durably)
    wait  {"after": ID|null, "timeout": secs}   -> {"ready": bool}
    stats {}                                    -> {"depth", "bytes", "oldest_age", ...}
Errors: `not_found` (no such message: never accepted, or acknowledged
already), `bad_request` (malformed parameters or id), and relay.tunnel's.
"""

import asyncio
import dataclasses

from prometheus_client import CollectorRegistry

from relay.audit import AuditLog
from relay.rpc import Code, Frame, RemoteError, RpcConnection
from relay.spool.metrics import SpoolServiceMetrics
from relay.spool.protocol import MAX_FETCH, MAX_LIST, MAX_WAIT, SERVICE
from relay.spool.store import NotFound, Spool, validate_id
from relay.tunnel import Method, Peer, TunnelService, serve

NOT_FOUND = "not_found"
# Requests to the spool are small JSON objects: refuse anything bigger before buffering it.
MAX_REQUEST_FRAME = 64 * 1024


class SpoolService:
    """The spool's methods behind the tunnel gate; `extra_methods` adds the edge's own (e.g. `mailboxes`)."""

    def __init__(self, spool: Spool, peers: tuple[Peer, ...], audit: AuditLog,
                 registry: CollectorRegistry | None = None, *, extra_methods: dict[str, Method] | None = None,
                 max_frame: int = MAX_REQUEST_FRAME):
        self.spool = spool
        self.audit = audit
        self.metrics = SpoolServiceMetrics(registry)
        methods = {"list": self._list, "fetch": self._fetch, "ack": self._ack, "wait": self._wait,
                   "stats": self._stats}
        clash = set(methods) & set(extra_methods or {})
        if clash:
            raise ValueError(f"extra spool methods {sorted(clash)} would replace the spool's own")
        methods.update(extra_methods or {})
        self.gate = TunnelService(SERVICE, peers, methods, audit, self.metrics, max_frame=max_frame)

    async def serve(self, listen: tuple[tuple[str, int], ...]) -> list[asyncio.Server]:
        """Listen on each (host, port): the tunnel address only."""
        return await serve(self.gate, listen)

    async def _list(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        after = _optional_id(frame.meta, "after")
        limit = min(_integer(frame.meta, "limit", MAX_LIST, low=1), MAX_LIST)
        entries = self.spool.list(after, limit + 1)
        listing = [{"id": e.id, "size": e.size, "accepted": e.accepted} for e in entries[:limit]]
        return {"messages": listing, "more": len(entries) > limit}, b""

    async def _fetch(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        spool_id = _id(frame.meta, "id")
        offset = _integer(frame.meta, "offset", 0, low=0)
        length = min(_integer(frame.meta, "length", MAX_FETCH, low=0), MAX_FETCH)
        size = _found(self.spool.size, spool_id)
        if offset > size:
            raise RemoteError(Code.BAD_REQUEST, f"offset {offset} is past the end of the {size}-byte file")
        data = await asyncio.to_thread(_found, self.spool.read, spool_id, offset, length)
        if offset == 0:
            self.audit.record(peer=connection.state["peer"].name, method="fetch", id=spool_id, size=size,
                              outcome="ok")
        return {"size": size}, data

    async def _ack(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        spool_id = _id(frame.meta, "id")
        size = _found(self.spool.size, spool_id)
        await asyncio.to_thread(_found, self.spool.delete, spool_id)
        self.audit.record(peer=connection.state["peer"].name, method="ack", id=spool_id, size=size,
                          outcome="deleted")
        return {}, b""

    async def _wait(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        after = _optional_id(frame.meta, "after")
        timeout = frame.meta.get("timeout", MAX_WAIT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf"):
            raise RemoteError(Code.BAD_REQUEST, "timeout must be a number of seconds, 0 or more")
        ready = await self.spool.wait_for_mail(after, min(float(timeout), MAX_WAIT))
        return {"ready": ready}, b""

    async def _stats(self, connection: RpcConnection, frame: Frame) -> tuple[dict, bytes]:
        return dataclasses.asdict(self.spool.stats()), b""


def _found(function, *args):
    try:
        return function(*args)
    except NotFound as error:
        raise RemoteError(NOT_FOUND, str(error)) from None
    except ValueError as error:
        raise RemoteError(Code.BAD_REQUEST, str(error)) from None


def _id(meta: dict, key: str) -> str:
    try:
        return validate_id(meta.get(key))
    except ValueError as error:
        raise RemoteError(Code.BAD_REQUEST, f"{key}: {error}") from None


def _optional_id(meta: dict, key: str) -> str | None:
    return None if meta.get(key) is None else _id(meta, key)


def _integer(meta: dict, key: str, default: int, low: int) -> int:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RemoteError(Code.BAD_REQUEST, f"{key} must be an integer, {low} or more")
    return value
