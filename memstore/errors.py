"""Errors the engine raises; the server maps each class to one gRPC status code."""

from __future__ import annotations


class MemstoreError(Exception):
    """Base class; `str(err)` is the message the caller sees."""


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


class Unavailable(MemstoreError):
    """The change could not be made durable; nothing was applied or acknowledged."""
