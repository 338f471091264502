"""A bulk request the server refused, taken apart record by record.

One job: given a refused chunk (BatchUpsert's profiles, TrackBatch's events), decide what
to send next. The refusal names the record at fault (RECORD_TRAILER) and, from a router,
the records that applied on other shards all the same (APPLIED_TRAILER); the rest is sent
again without the refused record (with `on_refused`), or only the rest before it
(without: the load stops there). A refusal that names no record stops the load.
Subclasses say how a record is named and how a request is packed again.
"""

from __future__ import annotations

from typing import Any

import grpc
from pyroaring import BitMap

from memstore.hashslot import APPLIED_TRAILER, RECORD_TRAILER

# Codes that refuse one record (the others say nothing about any single record)
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}


class Refusal:
    method = ""  # the RPC, as ClientError names it

    def __init__(self, count: int, base: int, load: Any) -> None:
        self.base = base  # index of the chunk's first record in the whole load
        self.load = load  # memstore.client.core._Load
        self.rows = list(range(count))  # the chunk's records in the request last sent

    def key(self, row: int) -> str:
        """How the record `row` of the chunk is named to on_refused and in errors."""
        raise NotImplementedError

    def pack(self, rows: list[int]) -> bytes:
        """The request body of the chunk's records `rows`."""
        raise NotImplementedError

    def next(self, exc: grpc.RpcError) -> bytes | None:
        """Take the refusal of the request last sent; the request to send next, if any."""
        from memstore.client.core import ClientError, LoadError

        code = exc.code()  # type: ignore[attr-defined]
        details = exc.details() or code.name  # type: ignore[attr-defined]
        trailers = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
        applied = trailers.get(APPLIED_TRAILER)
        done = set(BitMap.deserialize(applied)) if applied else set()
        self.load.add(len(done))
        record = trailers.get(RECORD_TRAILER)
        at = int(record) if record is not None and code in REFUSED else -1
        if not 0 <= at < len(self.rows):
            unknown = 0 if code in REFUSED else len(self.rows) - len(done)
            self.load.stop(LoadError(code, details, applied=0, unknown=unknown))
            return None
        bad = self.rows[at]
        index, key = self.base + bad, self.key(bad)
        if self.load.on_refused is not None:
            self.load.on_refused(index, key, ClientError(code, details, self.method))
            kept = [row for i, row in enumerate(self.rows) if i != at and i not in done]
        else:
            self.load.stop(LoadError(code, details, applied=0, record=index, id=key))
            kept = [row for i, row in enumerate(self.rows[:at]) if i not in done]
        self.rows = kept
        if not kept:
            return None
        return self.pack(kept)
