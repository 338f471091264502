"""memstore's cluster layer: hash slots, the router, the supervisor, slot moves.

Modules, one job each:
    slots       slot_of(id), slot ranges, fair-share move plans (pure)
    shard_map   the router's cached view: which shard owns which slot, at which epoch
    router      memstore.v1.Memstore for the whole cluster: forward and merge
    text_cache  the router's memory of query texts, bounded by bytes
    supervisor  `memstore serve`: shard processes plus a router on one machine
    rebalance   moving slots between shards online (add-shard, remove-shard)
    cli         the click commands memstore/cli/__init__.py registers
"""

from shards.slots import SLOT_COUNT, Move, plan_add, plan_remove, slot_of, split_even

__all__ = ["SLOT_COUNT", "Move", "plan_add", "plan_remove", "slot_of", "split_even"]
