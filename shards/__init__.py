"""memstore's cluster layer: hash slots, the router, the supervisor, slot moves.

Modules, one job each:
    slots       slot_of(id), slot ranges, fair-share move plans (pure)
    shard_map   the router's cached view: which shard owns which slot, at which epoch
    router      memstore.v1.Memstore for the whole cluster: the servicer, each RPC handed
                to the module below whose job it is
    calls       what a router's call to a shard means: exceptions, trailers, deadlines
    routing     calls to the owner of a key's slot, following moves, merges, declarations
    fanout      calls to every shard at once, exact over a stable partition of the slots
    queries     Count, GroupBy, QueryBitmap, QueryIds, StreamIds through a router
    reads       Get and BatchGet through a router; profiles found by identifier
    writes      Upsert, Link, Track, TrackBatch, BatchUpsert through a router
    erasure     Delete and EraseProfiles through a router (and retention's sweeps)
    segments    saved segments and change streams through a router
    operations  DeclareAttributes, GetSchema, Snapshot, Stats through a router
    admin       RouterAdmin: the cluster tools tell a router about shards
    server      a router's gRPC server: start, serve until a signal, stop
    directory   the identifier directory: claims in each identifier's own slot
    schema      the cluster's schema registry of declarations
    merge       the cross-shard merge protocol a router coordinates
    watch       every shard's change stream merged into one, resumable
    retention   erasing anonymous profiles nobody touched for --anonymous-ttl
    backoff     waiting before a retry, within the caller's deadline
    text_cache  the router's memory of query texts, bounded by bytes
    supervisor  `memstore serve`: shard processes plus a router on one machine
    rebalance   moving slots between shards online (add-shard, remove-shard)
    failover    promoting a replica by hand: pick, promote, switch routers, fence
    cli         the click commands memstore/cli/__init__.py registers
"""

from shards.slots import SLOT_COUNT, Move, plan_add, plan_remove, slot_of, split_even

__all__ = ["SLOT_COUNT", "Move", "plan_add", "plan_remove", "slot_of", "split_even"]
