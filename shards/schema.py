"""One schema for the whole cluster, as a router keeps it: the registry of declarations.

An attribute has one kind (and one `indexed` and merge rule) across the cluster. Its
declaration lives in the registry, partitioned like the identifier directory: the entry for
attribute NAME is kept by the shard owning slot_of("attribute:" + NAME)
(memstore.engine.schema.registry_key), logged, snapshotted and moved with that slot. So each name
has exactly one owner, whichever router asks, and the registry is the commit point of a
declaration: the first proposal it receives wins, every later one is answered with it.

How a declaration reaches the shards:
- Every call a router makes to a shard carries CLUSTER_SCHEMA. A write so marked may not
  declare attributes by their values on the shard: one naming an attribute the shard has
  not declared is refused (FAILED_PRECONDITION, UNDECLARED_TRAILER with the declarations the
  write would have made, e.g. `price` as an int from the value 10). The router registers
  them (`register`: the registry's answer wins over the proposal), declares the registry's
  declarations on that shard (DeclareAttributes, idempotent) and sends the write again. A
  value of another kind is then refused by the shard as usual (an int written to a float
  attribute is that float: one number type, as in JSON).
- DeclareAttributes through a router registers first: a conflict with the registry refuses
  the call before any shard changed. Then every reachable shard declares it; a shard that
  was down declares it when a write first meets it there, before that write applies.
- So two first writes of different kinds racing on two shards through two routers meet at
  the registry: one kind wins everywhere, the other write is refused.
- A shard added with `cluster add-shard` is given the schema before it owns a slot
  (shards/rebalance.py); registry entries travel with their slots.

A router caches the registry's answers (declarations never change) and, per shard, nothing:
a refused write is the signal, so a restarted or new shard costs one extra round trip per
new attribute, once. Writes sent straight to a shard, without a router, still declare by
their values there: in a cluster, write through routers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import msgpack

from memstore.engine.schema import registry_key
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import memstore_pb2 as pb
from shards.shard_map import ShardMap, ShardState

log = logging.getLogger("memstore.schema")


class Router(Protocol):
    map: ShardMap

    async def routed(self, items: list[tuple[str, Any]], method: str, build: Any,
                     context: Any, retarget: Any = None, control: bool = False
                     ) -> list[tuple[list[Any], Any]]: ...


class SchemaConflict(ValueError):
    """A declaration asked for differs from the one the cluster's registry holds."""


def _same(a: pb.AttributeSpec, b: pb.AttributeSpec) -> bool:
    return (a.kind, a.not_indexed, a.merge) == (b.kind, b.not_indexed, b.merge)


def describe(spec: pb.AttributeSpec) -> str:
    kind = pb.Kind.Name(spec.kind).lower()
    merge = pb.AttributeSpec.Merge.Name(spec.merge).lower().removeprefix("merge_")
    return f"{kind}{', not indexed' if spec.not_indexed else ''}" \
           f"{'' if merge == 'default' else f', merge {merge}'}"


def proposals(trailer: bytes) -> list[pb.AttributeSpec]:
    """The declarations a refused write would have made (memstore.errors.Undeclared)."""
    return [pb.AttributeSpec(name=name, kind=kind, not_indexed=not indexed, merge=merge)
            for name, kind, indexed, merge in msgpack.unpackb(trailer)]


class ClusterSchema:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.known: dict[str, pb.AttributeSpec] = {}  # the registry's answers so far

    async def register(self, specs: Sequence[pb.AttributeSpec], context: Any
                       ) -> list[pb.AttributeSpec]:
        """The cluster's declaration of each attribute, registering the proposed one where
        the registry has none yet (one request per registry shard, concurrently)."""
        wanted = {s.name: s for s in specs if s.name not in self.known}
        if wanted:
            items = [(registry_key(name), spec) for name, spec in wanted.items()]

            def build(group: list[pb.AttributeSpec]) -> cpb.RegisterRequest:
                return cpb.RegisterRequest(attributes=group)

            for group, response in await self.router.routed(items, "Register", build,
                                                            context, control=True):
                for asked, held in zip(group, response.attributes, strict=True):
                    held.name = asked.name
                    self.known[asked.name] = held
        return [self.known[s.name] for s in specs]

    async def declare_on(self, shard: ShardState, trailer: bytes, context: Any,
                         timeout: float | None) -> None:
        """A write `shard` refused as naming undeclared attributes: declare them there as
        the cluster has them, so that the write can be sent again."""
        specs = await self.register(proposals(trailer), context)
        await shard.stub.DeclareAttributes(pb.DeclareAttributesRequest(attributes=specs),
                                           timeout=timeout)

    async def declare_where_refused(self, refusals: Sequence[tuple[ShardState, bytes]],
                                    context: Any, timeout: float | None) -> None:
        """The parts of one batch that shards refused as naming undeclared attributes:
        register the attributes once for all the parts, then declare them on each shard.
        A name some parts propose as an int and others as a float is a float, as one
        shard makes it of the whole batch (each part's shard saw its own values only)."""
        proposed: dict[str, pb.AttributeSpec] = {}
        for _, trailer in refusals:
            for spec in proposals(trailer):
                held = proposed.setdefault(spec.name, spec)
                if (held.kind, spec.kind) == (pb.INT, pb.FLOAT):
                    proposed[spec.name] = spec
        registered = {s.name: s for s in await self.register(list(proposed.values()), context)}
        await asyncio.gather(*(shard.stub.DeclareAttributes(pb.DeclareAttributesRequest(
            attributes=[registered[spec.name] for spec in proposals(trailer)]), timeout=timeout)
            for shard, trailer in refusals))

    async def declare(self, specs: Sequence[pb.AttributeSpec], context: Any
                      ) -> list[pb.AttributeSpec]:
        """DeclareAttributes through a router: the registry first (all or nothing there),
        then the shards. Raises SchemaConflict naming the first declaration that differs
        from the registry's."""
        for i, spec in enumerate(specs):
            if not spec.name:
                raise ValueError(f"attributes[{i}]: empty attribute name")
        registered = await self.register(specs, context)
        for i, (asked, held) in enumerate(zip(specs, registered, strict=True)):
            if not _same(asked, held):
                raise SchemaConflict(f"attributes[{i}]: attribute {asked.name!r} is declared "
                                     f"{describe(held)} in the cluster, cannot declare it "
                                     f"{describe(asked)}")
        return registered

    async def bootstrap(self, schemas: Iterable[tuple[ShardState, pb.SchemaResponse]],
                        context: Any) -> list[str]:
        """Register what shards declared before the registry existed (data from an older
        version): the first shard's declaration of a name is proposed. Returns a line for
        each attribute some shard holds with another declaration than the registry's."""
        seen: dict[str, list[tuple[ShardState, pb.AttributeSpec]]] = {}
        for shard, response in schemas:
            for spec in response.attributes:
                seen.setdefault(spec.name, []).append((shard, spec))
        if not seen:
            return []
        registered = await self.register([held[0][1] for held in seen.values()], context)
        conflicts = []
        for spec in registered:
            for shard, held in seen[spec.name]:
                if not _same(held, spec):
                    conflicts.append(f"attribute {spec.name!r} is {describe(held)} on "
                                     f"{shard.label} but {describe(spec)} in the registry")
        return conflicts
