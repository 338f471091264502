"""Errors the engine raises; the server maps each class to one gRPC status code."""

from __future__ import annotations


class MemstoreError(Exception):
    """Base class; `str(err)` is the message the caller sees. `record`: the index of the
    record of a batch at fault (BatchUpsert), sent back as RECORD_TRAILER."""

    record: int | None = None


class InvalidArgument(MemstoreError):
    """Malformed input: the message names the field, attribute or column at fault."""


class NotFound(MemstoreError):
    pass


class FailedPrecondition(MemstoreError):
    """The request is well formed but the state refuses it (version, identity rules)."""


class WrongSlot(FailedPrecondition):
    """The shard does not own the hash slot of this primary id."""

    def __init__(self, slot: int, epoch: int, message: str) -> None:
        super().__init__(message)
        self.slot = slot
        self.epoch = epoch


class OwnershipChanged(MemstoreError):
    """A router judged this write, or a direct_reads client this Get, against slot
    ownership that has changed since (another shard, or this shard's slots moved): it
    must judge the call again."""


class Unavailable(MemstoreError):
    """The change could not be made durable; nothing was applied or acknowledged."""


class Held(FailedPrecondition):
    """The profile is held by an unfinished cross-shard merge (shards/merge.py): a router
    finishes or aborts that merge, then retries."""

    def __init__(self, pid: str, txn: str, survivor: str, age: float) -> None:
        super().__init__(f"profile {pid!r} is being merged into {survivor!r} on another shard "
                         f"(merge {txn}, started {age:.1f} s ago); retry when it finishes")
        self.pid = pid
        self.txn = txn
        self.survivor = survivor
        self.age = age


class Forwarded(FailedPrecondition):
    """The primary id was merged into a profile on another shard: ask for the survivor."""

    def __init__(self, pid: str, survivor: str, more: int = 0) -> None:
        also = f" (and {more} more ids of this call were merged away too)" if more else ""
        super().__init__(f"profile {pid!r} was merged into {survivor!r}, which lives on "
                         f"another shard; ask for that id{also}")
        self.pid = pid
        self.survivor = survivor
        self.pairs: list[list[str]] = [[pid, survivor]]  # every (merged id, survivor) met


class Undeclared(FailedPrecondition):
    """A write through a router names attributes this shard has not declared: the router
    declares them as the cluster's schema has them (registering any new one first, so one
    kind wins everywhere), then sends the write again. `specs`: [[name, kind, indexed,
    merge], ...] as this write would declare them."""

    def __init__(self, specs: list[list[object]]) -> None:
        names = ", ".join(str(spec[0]) for spec in specs[:5])
        more = f" and {len(specs) - 5} more" if len(specs) > 5 else ""
        super().__init__(f"attributes not declared on this shard yet: {names}{more} (a "
                         "router declares new attributes cluster-wide before writing them)")
        self.specs = specs
