"""Errors the engine raises; the server maps each class to one gRPC status code.

Messages quote what a caller sent through `brief`, which shortens a long value to its first
characters and its size, and every status message leaves a server through `capped`, at most
MAX_STATUS_BYTES: a message is for a person, and one that quotes a megabyte of input would
go over the client's metadata limit (it would see RESOURCE_EXHAUSTED, not the error).
"""

from __future__ import annotations

import sys

BRIEF_CHARACTERS = 64
MAX_STATUS_BYTES = 1024


def brief(value: object, limit: int = BRIEF_CHARACTERS) -> str:
    """repr(value), or for a long one the start of it and its size: 'aaaa'… (1048576 bytes).
    Safe on any value a request can carry (an int too long to print becomes its size)."""
    if isinstance(value, str | bytes) and len(value) > limit:
        size = len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) \
            else len(value)
        return f"{value[:limit]!r}… ({size} bytes)"
    if isinstance(value, int) and value.bit_length() > 4 * limit:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # a nested or huge value from msgpack
        return f"a {type(value).__name__}"
    return text if len(text) <= limit + 2 else f"{text[:limit]}… ({len(text)} characters)"


def capped(message: str, limit: int = MAX_STATUS_BYTES) -> str:
    """`message` as valid UTF-8 of at most `limit` bytes, saying so where it was cut."""
    data = message.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data.decode("utf-8")
    note = f"… (message cut, {len(data)} bytes)"
    return data[:limit - len(note.encode())].decode("utf-8", "ignore") + note


def drop_tracebacks() -> None:
    """Cut the exception being handled, and those it chains to, from their tracebacks.

    Call it where an except block answers a call with a status (an abort raises from inside
    the block). The traceback's frames hold the request, and the handling frame holds the
    exception: a reference cycle that only the collector's full passes free, and the
    servers run those rarely (memstore.server.service.serve's thresholds). A request that fails
    must be freed when its call ends, or failing requests of a few MB each pile up."""
    pending = [sys.exception()]
    seen: set[int] = set()
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        exc.__traceback__ = None
        pending += [exc.__cause__, exc.__context__]


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


class ReadOnlyReplica(FailedPrecondition):
    """A write sent to a replica: it names the primary that takes writes (sent back as
    PRIMARY_TRAILER too, so a client can go there)."""

    def __init__(self, primary: str) -> None:
        super().__init__(f"this shard is a read-only replica of {primary}: send writes to "
                         "the primary")
        self.primary = primary
