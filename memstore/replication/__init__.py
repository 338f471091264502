"""Replicas: shards that follow another shard's log (docs/replication.md).

    history  which log history a data directory holds (DATA/HISTORY): what makes a
             position meaningful across processes (Redis's replication id)
    primary  the primary's side: the Replication gRPC service (snapshot for a full
             resync, the log stream for a partial one) and its replicas' acks, which
             --replication sync waits for
    replica  the replica's side: follow the primary, full or partial resync, apply records
             through the recovery path into its own data directory
    roles    which of the two a process is, and the switch: promote, demote (the fence)
    coordinator  --coordinator: the election through etcd (leases, one transaction) that
             promotes and demotes by itself, and the lease that fences a primary's writes

A replica is a reader of its primary's log, like a change stream (DESIGN.md): its position
is a position in that log, and its own log holds the same records at the same positions.
`memstore cluster failover` (pick, promote, switch routers, fence) is a cluster
operation: shards/failover.py; routers follow etcd's choice in shards/coordinated.py.
"""

from memstore.replication.history import HistoryError
from memstore.replication.primary import Replicas, ReplicationService
from memstore.replication.replica import Follower

__all__ = ["Follower", "HistoryError", "Replicas", "ReplicationService"]
