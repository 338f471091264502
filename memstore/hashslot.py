"""Hash slots: which of SLOT_COUNT slots a primary id belongs to.

slot = CRC16/XMODEM(utf-8 bytes of the id) mod 16384, the function Redis Cluster uses
(binascii.crc_hqx is that CRC in C). The number is part of the on-disk and wire contract:
shards record the slots they own, so it must never change.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable
from itertools import repeat

SLOT_COUNT = 16384
# Trailing metadata of every shard answer: the slot-ownership epoch it was made at (a
# router's fan-out checks it against the epochs of the slot map it asked by).
EPOCH_TRAILER = "memstore-epoch"
# Request metadata a router sends with a write it judged against its slot map, and a
# direct_reads client with a Get ("name:epoch" of the shard it expects to run the call): the
# shard refuses the call (ABORTED, trailer REJUDGE_TRAILER) if it is another shard or its
# slots changed since.
EXPECT_SHARD = "memstore-expect-shard"
REJUDGE_TRAILER = "memstore-rejudge"
# Request metadata a router sends with every call to a shard: its writes may not declare
# attributes by their values on the shard; a shard refuses one naming attributes it has
# not declared (FAILED_PRECONDITION, trailer UNDECLARED_TRAILER: msgpack [[name, kind,
# indexed, merge], ...]), and the router declares them cluster-wide and sends it again.
CLUSTER_SCHEMA = ("memstore-schema", "cluster")
UNDECLARED_TRAILER = "memstore-undeclared-bin"
# Trailing metadata of a refused BatchUpsert: the index of the record at fault (requests,
# then packed rows, then columns rows, as the request holds them), and, from a router, which
# records of the batch applied all the same (a portable roaring bitmap of indexes): a
# router's batch applies per shard, so the other shards' parts may have applied.
RECORD_TRAILER = "memstore-record"
APPLIED_TRAILER = "memstore-applied-bin"
# The router's JSON admin service (cluster tools; ListShards also serves direct_reads).
ADMIN_SERVICE = "memstore.cluster.v1.RouterAdmin"


def slot_of(primary_id: str) -> int:
    return binascii.crc_hqx(primary_id.encode("utf-8"), 0) % SLOT_COUNT


def slots_of(primary_ids: Iterable[str]) -> list[int]:
    """slot_of of each id, with no Python frame per id (a bulk load's thousand ids)."""
    return list(map(SLOT_COUNT.__rmod__, map(binascii.crc_hqx, map(str.encode, primary_ids),
                                             repeat(0))))


def owners_by_epoch(claims: Iterable[tuple[int, Iterable[tuple[int, int]]]]
                    ) -> tuple[list[int], bool]:
    """Which claimant owns each slot, from (epoch, slot ranges) per claimant: where two
    claim a slot the higher epoch owns it (-1: nobody claims it). Also whether the claims
    are exact: every slot claimed once, none twice (no move is switching)."""
    owner = [-1] * SLOT_COUNT
    epoch_of = [-1] * SLOT_COUNT
    claimed = 0
    for index, (epoch, ranges) in enumerate(claims):
        for start, end in ranges:
            for slot in range(start, end + 1):
                claimed += 1
                if epoch > epoch_of[slot]:
                    owner[slot], epoch_of[slot] = index, epoch
    return owner, claimed == SLOT_COUNT and -1 not in owner
