"""A router's side of automatic failover (--coordinator): follow etcd's primary keys.

Shards started with --coordinator name their primary in etcd, /memstore/<shard>/primary
(memstore/replication/coordinator.py). Every POLL seconds a router given the same etcd
reads those keys. A shard it knows by name whose key names another address has failed
over: once that address answers as a primary, the router adds it and forgets the old
address -- the AddShard and RemoveShard that `memstore cluster failover` sends
(shards/admin.py) -- and its slot map prefers the new primary's higher epoch. Keys of
shards the router does not know are left alone: one etcd may hold several clusters.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aetcd
import grpc

from memstore.replication.coordinator import endpoint
from shards.admin import RouterAdmin
from shards.failover import shard_stats

log = logging.getLogger("memstore.router")

POLL = 0.5  # seconds between reads of the primary keys
ROOT = b"/memstore/"


async def follow_primaries(admin: RouterAdmin, url: str) -> None:
    """Switch `admin`'s router to each new primary etcd names, until cancelled."""
    host, port = endpoint(url)
    said = ""
    async with aetcd.Client(host, port, timeout=2) as etcd:  # type: ignore[arg-type]
        while True:
            try:
                await _switch(admin, etcd)
                said = ""
            except (aetcd.ClientError, grpc.RpcError, TimeoutError, ValueError) as exc:
                if str(exc) != said:  # once, not every POLL
                    log.warning("--coordinator %s: %s: %s; trying again", url,
                                type(exc).__name__, exc)
                    said = str(exc)
            await asyncio.sleep(POLL)


async def _switch(admin: RouterAdmin, etcd: aetcd.Client) -> None:
    for kv in await etcd.get_prefix(ROOT):
        key = kv.key.decode()
        if not key.endswith("/primary"):
            continue
        name, address = key[len(ROOT):-len("/primary")], json.loads(kv.value)["address"]
        known = [s for s in admin.map.shards if s.name == name]
        if not known or any(s.address == address for s in known):
            continue
        found = await shard_stats(address, admin.map.credentials)
        if found is None or found.get("replication.role") != "primary":
            continue  # elected, not promoted yet: the next round looks again
        log.warning("etcd names %s primary of shard %r (epoch %s): routing to it instead "
                    "of %s", address, name, found.get("epoch"),
                    ", ".join(s.address for s in known))
        await admin.call("AddShard", {"address": address})
        for old in known:
            await admin.call("RemoveShard", {"name": old.address})
