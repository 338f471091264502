"""Fuzzing: random and mutated requests to every method of both services (issue 23).

Real processes on loopback: two shards with data directories behind a `serve-router`, and a
throw-away shard of its own for memstore.v1.ShardControl (whose SetSlots, DropSlots and
ImportProfiles may legitimately take a shard's slots or fill it with junk). Requests are
sent as raw bytes (`request_serializer=None`), so what is not valid protobuf reaches the
server as it is. Each request is one of:
  * a random message of the method's type, filled field by field from its descriptor with
    values chosen to hurt (empty, huge, boundary integers, unknown enum numbers, NaN,
    msgpack junk in bytes fields, query texts with and without sense);
  * such a message mutated: bits flipped, cut short, spliced with itself, a string made
    invalid UTF-8, a field made oversize (1 MB strings, 20,000-item IN lists), a query
    nested past every depth limit, a text query of 1,000,000 items (8.9 MB);
  * random bytes.
Every answer must be OK or a status that says what was wrong with the request
(ALLOWED) — never UNKNOWN, INTERNAL, UNAVAILABLE (nothing is down) or a deadline (no
request may hang the server). Afterwards every process is alive, answers correctly (the
profiles seeded before the fuzz read back unchanged and count the same, through the router
and straight to the shards), and its resident memory (VmRSS) grew by at most its
MEMORY_BOUND: 100 MiB for a shard, 300 MiB for the router.

Fixed seeds: a failure is found again by running the same test. The CI run sends 3,500
requests; `-m slow` runs 100,000.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import cluster_pb2_grpc, memstore_pb2_grpc
from memstore.v1 import memstore_pb2 as pb
from shards.slots import format_ranges, split_even
from tests.conftest import ServerProcess, start_router, start_shard

Code = grpc.StatusCode
ALLOWED = frozenset({Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION,
                     Code.OUT_OF_RANGE, Code.ALREADY_EXISTS, Code.ABORTED})
# RSS a process may gain over the fuzz. Requests of up to ~32 MB, CONCURRENCY at a time, and
# malloc keeping pages it freed, raise a process to a high-water mark that more requests
# hardly pass: shards +20-40 MiB after 10,000 requests and +50-60 MiB after 100,000; the
# router, which parses each request and sends it on (and whose refusals wait for the
# collector, see _fail), +100-110 MiB and +190 MiB. Memory kept per request outgrows the
# bounds: failed requests frozen in reference cycles by a snapshot's gc.freeze() took a
# shard +160-190 MiB in 1,500 requests (+1 GiB a round of oversize requests).
MEMORY_BOUND = {"router": 300 << 20, "shard-0": 100 << 20, "shard-1": 100 << 20,
                "throwaway": 100 << 20}
CALL_TIMEOUT = 60.0
CONCURRENCY = 12
SEEDED = 40  # profiles written before the fuzz, read back after it
MEMSTORE = pb.DESCRIPTOR.services_by_name["Memstore"]
CONTROL = cpb.DESCRIPTOR.services_by_name["ShardControl"]
F = FieldDescriptor


@dataclass(frozen=True)
class Method:
    path: str
    name: str
    request: Descriptor
    streaming: bool


def _methods(service: ServiceDescriptor) -> list[Method]:
    return [Method(f"/{service.full_name}/{m.name}", m.name, m.input_type, m.server_streaming)
            for m in service.methods]


BULK_ERASURE = frozenset({"EraseProfiles"})

# Streams that never end by themselves (they follow the log): each call gets a short deadline,
# the only way such a call ends when its request was good.
WATCHES = frozenset({"WatchSegments", "WatchChanges"})
WATCH_TIMEOUT = 1.0

# Calls that write a snapshot or fan out to every shard cost more than the rest: sent less.
_WEIGHT = {"Snapshot": 0.1, "Stats": 0.3, "GetSchema": 0.3, "ExportSlots": 0.5,
           "DropSlots": 0.5, "SetSlots": 0.5, "WatchSegments": 0.2, "WatchChanges": 0.2}

# ------------------------------------------------------------------------------ values

MARK = "ZQXZQX"  # a string the invalid-UTF-8 mutation finds in the serialized bytes
_INVALID_UTF8 = b"\xff\xc3\x28\xa0\xa1\xe2"  # same length as MARK, invalid UTF-8
_INT64 = [0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 10**12, 1_700_000_000]
_UINT64 = [0, 1, 2, 1000, 100_000, 100_001, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1]
_INT32 = [0, 1, -1, 999_999_999, 1_000_000_000, 2**31 - 1, -(2**31)]
_UINT32 = [0, 1, 5, 1000, 16383, 16384, 100_000, 100_001, 2**32 - 1]
_FLOATS = [0.0, -0.0, 1.5, -1e308, 1e308, math.inf, -math.inf, math.nan, 5e-324]
_WORDS = ["", "a", "x y", "é", "名前", "\x00", "\t\n", "AND", "NOT", "`", '"', "'", "\\", "-1",
          "0x10", "1e999", "9" * 40, MARK, "fz", "fz.a", "fz.n", "fz.tags", "fz.t", "email",
          "phone", "fzev", "event.fzev.count", "address.city"]
_ATTRIBUTES = ["fz.a", "fz.n", "fz.f", "fz.b", "fz.t", "fz.tags", "fz.deep.er", "event.fzev.count",
               "event.fzev.last", "fz.A-b_9", "Bad Name", "", "fz..x", "fz." + "n" * 300]
# Queries may name the seeded attributes (reads); writes never do.
_QUERY_ATTRIBUTES = _ATTRIBUTES + ["seed.city", "seed.n", "seed.tags", "nosuch", "`odd name`"]


class Fuzzer:
    """Random requests from a seed: field by field from descriptors (see the module)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.million: str | None = None  # the 8.9 MB text, built once
        self.millions_left = 3  # it is sent at most this often per run

    # -- scalars
    def word(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.45:
            return rng.choice(_WORDS)
        if roll < 0.85:
            alphabet = "abcfz.-_0123456789é名\x00 ZQX"
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 24)))
        if roll < 0.97:
            return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(1, 300)))
        return rng.choice("xé名") * rng.choice([1000, 70_000, 300_000])

    def pid(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.7:
            return f"fz-{rng.randrange(300)}"
        if roll < 0.8:
            return "fz-" + "i" * rng.choice([255, 256, 257, 5000])
        return "fz" + self.word()

    def string(self, name: str) -> str:
        rng = self.rng
        if name == "text":
            return self.query_text()
        if name in ("id", "loser", "survivor", "from", "to", "ids", "merged_ids"):
            return self.pid()
        if name in ("attribute", "attributes", "name"):
            return rng.choice(_ATTRIBUTES) if rng.random() < 0.8 else "fz." + self.word()
        if name == "kind":
            return rng.choice(["email", "phone", "device", "crm", "Bad Kind", "", "e" * 200])
        if name == "value":
            return f"v{rng.randrange(400)}@fz.invalid" if rng.random() < 0.7 else self.word()
        if name == "event":
            return rng.choice(["fzev", "fz-2", "bad name", "", "e" * 129, self.word()])
        if name == "cursor":
            return rng.choice(["", "0", "ff", "ffffffff", "f" * 40, "-1", "zz", "eyJ4Ijox",
                               "WyJzaGFyZC0wIiwiMTAiXQ", "W1tbW1tbW10", self.word()])
        if name == "txn":
            return rng.choice(["", "t1", "txn-" + str(rng.randrange(50)), self.word()])
        return self.word()

    def integer(self, kind: int) -> int:
        rng = self.rng
        if kind in (F.TYPE_UINT64, F.TYPE_FIXED64):
            return rng.choice(_UINT64) if rng.random() < 0.7 else rng.randrange(2**64)
        if kind in (F.TYPE_UINT32, F.TYPE_FIXED32):
            return rng.choice(_UINT32) if rng.random() < 0.7 else rng.randrange(2**32)
        if kind in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
            return rng.choice(_INT32) if rng.random() < 0.7 else rng.randrange(-(2**31), 2**31)
        return rng.choice(_INT64) if rng.random() < 0.7 else rng.randrange(-(2**63), 2**63)

    def junk(self, depth: int = 0) -> Any:
        """A random msgpack-able value."""
        rng = self.rng
        roll = rng.random()
        if depth < 4 and roll < 0.3:
            return [self.junk(depth + 1) for _ in range(rng.randrange(0, 5))]
        if depth < 4 and roll < 0.45:
            return {rng.choice([0, -1, 2**64 - 1, b"k", None, True, self.word()])
                    if rng.random() < 0.3 else rng.choice(_ATTRIBUTES):
                    self.junk(depth + 1) for _ in range(rng.randrange(0, 4))}
        return rng.choice([None, True, 0, -1, 2**64 - 1, -(2**63), 1.5, math.nan, b"\xff",
                           self.pid(), rng.choice(_ATTRIBUTES), self.word(),
                           msgpack.Timestamp(rng.randrange(-2**40, 2**40))])

    def packed(self, name: str) -> bytes:
        """A bytes field: msgpack shaped as the method expects (mostly), or junk."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.15:
            return rng.randbytes(rng.randrange(0, 64))
        if roll < 0.35:
            return msgpack.packb(self.junk(), use_bin_type=True)
        if name == "packed":  # records, claims, owners or an export: one of those shapes
            shape = rng.randrange(4)
            n = rng.randrange(0, 30)
            if shape == 0:
                body: Any = [[self.pid(), {rng.choice(_ATTRIBUTES): self.junk(3)
                                           for _ in range(rng.randrange(0, 4))},
                              [[self.string("kind"), self.string("value")]]]
                             for _ in range(n)]
            elif shape == 1:
                body = [[self.string("kind"), self.string("value"),
                         rng.choice([None, self.pid()]), rng.choice([None, self.pid()])]
                        for _ in range(n)]
            elif shape == 2:
                body = [[self.string("kind"), self.string("value")] for _ in range(n)]
            else:
                body = {"schema": [[rng.choice(_ATTRIBUTES), rng.randrange(-1, 8),
                                    rng.random() < 0.5, rng.randrange(-1, 5)]
                                   for _ in range(rng.randrange(0, 4))],
                        "profiles": [[self.pid(), rng.choice(_UINT64), {}, [], []]
                                     for _ in range(rng.randrange(0, 4))],
                        "deleted": [self.pid() for _ in range(rng.randrange(0, 3))]}
            return msgpack.packb(body, use_bin_type=True)
        if name == "columns":
            n = rng.randrange(0, 20)
            return msgpack.packb({"ids": [self.pid() for _ in range(n)],
                                  "attributes": {rng.choice(_ATTRIBUTES):
                                                 [self.junk(3) for _ in range(n)]},
                                  "timestamps": rng.choice([[], ["fz.t"]]),
                                  "identifiers": [[] for _ in range(n)]}, use_bin_type=True)
        return msgpack.packb(self.junk(), use_bin_type=True)

    # -- queries
    def literal(self) -> str:
        rng = self.rng
        return rng.choice([f'"{self.word()[:20]}"'.replace("\\", ""), str(rng.choice(_INT64)),
                           "1.5", "-0.0", "1e308", "TRUE", "false", '"2024-05-01"',
                           '"2024-13-45T99:00"', "9" * rng.choice([19, 20, 5000]), "'x'"])

    def query_text(self, depth: int = 0) -> str:
        rng = self.rng
        attr = rng.choice(_QUERY_ATTRIBUTES)
        roll = rng.random()
        if depth < 4 and roll < 0.25:
            op = rng.choice([" AND ", " OR ", " and "])
            return f"({self.query_text(depth + 1)}{op}{self.query_text(depth + 1)})"
        if depth < 4 and roll < 0.32:
            return "NOT " + self.query_text(depth + 1)
        text = rng.choice([
            "ALL", "*", f"{attr} = {self.literal()}", f"{attr} != {self.literal()}",
            f"{attr} < {self.literal()}", f"{attr} >= {self.literal()}",
            f"{attr} IN ({', '.join(self.literal() for _ in range(rng.randrange(1, 6)))})",
            f"{attr} NOT IN ({self.literal()})",
            f"{attr} BETWEEN {self.literal()} AND {self.literal()}", f"exists({attr})",
            f"{attr} HAS {self.literal()}",
            (f'did("{rng.choice(["fzev", "", "x" * 200])}", '
             f'within={rng.randrange(10**6)}{rng.choice("smhdwy")})'),
        ])
        if depth == 0 and rng.random() < 0.2:  # syntax damage
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice(["(", ")", '"', "`", ",", "@", "NOT", ""]) + text[at:]
        return text

    # -- messages
    def message(self, descriptor: Descriptor, depth: int = 0) -> Message:
        rng = self.rng
        message = GetMessageClass(descriptor)()
        if descriptor.full_name == "memstore.v1.Query" and (depth > 3 or rng.random() < 0.4):
            return pb.Query(all=True) if rng.random() < 0.3 else self._predicate()
        for fd in descriptor.fields:
            if rng.random() < 0.35 or (fd.message_type is not None and depth > 5):
                continue
            if fd.is_repeated:
                count = rng.choice([0, 1, 1, 2, 3, 8])
                if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                    target = getattr(message, fd.name)
                    value_fd = fd.message_type.fields_by_name["value"]
                    for _ in range(count):
                        key = self.string(fd.name)
                        if value_fd.message_type is not None:
                            target[key].CopyFrom(self.message(value_fd.message_type, depth + 1))
                        else:
                            target[key] = self.string("value")
                    continue
                target = getattr(message, fd.name)
                for _ in range(count):
                    if fd.message_type is not None:
                        target.add().CopyFrom(self.message(fd.message_type, depth + 1))
                    else:
                        target.append(self.scalar(fd))
            elif fd.message_type is not None:
                getattr(message, fd.name).CopyFrom(self.message(fd.message_type, depth + 1))
            else:
                setattr(message, fd.name, self.scalar(fd))
        return message

    def _predicate(self) -> pb.Query:
        rng = self.rng
        values = [self.message(pb.Value.DESCRIPTOR, 9) for _ in range(rng.randrange(0, 4))]
        return pb.Query(predicate=pb.Predicate(
            attribute=rng.choice(_QUERY_ATTRIBUTES), op=rng.randrange(0, 12), values=values))

    def scalar(self, fd: FieldDescriptor) -> Any:
        rng = self.rng
        if fd.type == F.TYPE_STRING:
            return self.string(fd.name)
        if fd.type == F.TYPE_BYTES:
            return self.packed(fd.name)
        if fd.type == F.TYPE_BOOL:
            return rng.random() < 0.5
        if fd.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return rng.choice(_FLOATS) if rng.random() < 0.6 else rng.uniform(-1e9, 1e9)
        if fd.type == F.TYPE_ENUM:
            numbers = [v.number for v in fd.enum_type.values]
            return rng.choice(numbers) if rng.random() < 0.85 else rng.choice([-1, 99, 2**31 - 1])
        return self.integer(fd.type)

    # -- requests
    def request(self, method: Method) -> tuple[str, bytes]:
        """(strategy, the request's bytes) for one call of `method`."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.05:
            return "random bytes", rng.randbytes(rng.randrange(0, 300))
        message = self.message(method.request)
        if roll < 0.10:
            return "oversize", self._oversize(message, method).SerializeToString()
        if roll < 0.13 and self._queries(message) is not None:
            return self._deep_or_huge(message, method)
        data = message.SerializeToString()
        if roll < 0.45 or not data:
            return "random message", data
        if roll < 0.60:
            flipped = bytearray(data)
            for _ in range(rng.randrange(1, 9)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            return "bit flips", bytes(flipped)
        if roll < 0.70:
            return "truncated", data[:rng.randrange(len(data))]
        if roll < 0.78:
            at, end = sorted(rng.randrange(len(data) + 1) for _ in range(2))
            return "spliced", data[:end] + data[at:]
        if roll < 0.92:
            message = self._marked(method)
            return "invalid utf-8", message.SerializeToString().replace(
                MARK.encode(), _INVALID_UTF8)
        return "random message", data

    def _marked(self, method: Method) -> Message:
        """A message with MARK in some string field (retried a few times)."""
        for _ in range(10):
            message = self.message(method.request)
            strings = list(_string_fields(message))
            if strings:
                holder, name, repeated = self.rng.choice(strings)
                if repeated:
                    getattr(holder, name).append(MARK)
                else:
                    setattr(holder, name, MARK)
                return message
        return message

    def _oversize(self, message: Message, method: Method) -> Message:
        rng = self.rng
        strings = list(_string_fields(message))
        if strings and rng.random() < 0.6:
            holder, name, repeated = rng.choice(strings)
            huge = rng.choice(["x" * 1_000_000, "é" * 300_000, "名" * 200_000])
            if repeated:
                getattr(holder, name).append(huge)
            else:
                setattr(holder, name, huge)
            return message
        for fd in message.DESCRIPTOR.fields:  # a repeated field with many entries
            if fd.is_repeated and not (fd.message_type and fd.message_type.GetOptions()
                                       .map_entry):
                target = getattr(message, fd.name)
                one = self.message(fd.message_type, 5) if fd.message_type is not None \
                    else self.scalar(fd)
                size = (len(one.SerializeToString()) if isinstance(one, Message) else
                        len(one) if isinstance(one, str | bytes) else 8) * 4
                n = min(rng.choice([1000, 20_000, 100_001]), (32 << 20) // (size + 8))
                target.extend([one] * n)
                break
        return message

    def _queries(self, message: Message) -> pb.QueryRequest | None:
        if isinstance(message, pb.QueryRequest):
            return message
        if isinstance(message, pb.QueryIdsRequest | pb.GroupByRequest):
            return message.query
        return None

    def _deep_or_huge(self, message: Message, method: Method) -> tuple[str, bytes]:
        rng = self.rng
        query = self._queries(message)
        assert query is not None
        roll = rng.random()
        if roll < 0.45:  # Query.not inside Query.not ...: near and past every depth limit
            deep = b"\x2a\x01\x01"  # all = true
            for _ in range(rng.choice([30, 98, 99, 100, 101, 150, 5000])):
                deep = b"\x22" + _varint(len(deep)) + deep
            data = b"\x0a" + _varint(len(deep)) + deep  # QueryRequest.query
            if not isinstance(message, pb.QueryRequest):  # QueryIds/GroupByRequest.query
                data = b"\x0a" + _varint(len(data)) + data
            return "deep nesting", data
        if roll < 0.55 and self.millions_left:
            self.millions_left -= 1
            if self.million is None:
                self.million = "seed.city IN (" + ",".join(['"x"'] * 1_000_000) + ")"
            query.text = self.million
            return "huge IN list (text)", message.SerializeToString()
        n = rng.choice([10_001, 20_000, 100_000])
        values = [pb.Value(int_value=i) for i in range(n)]
        query.query.CopyFrom(pb.Query(predicate=pb.Predicate(
            attribute="seed.n", op=pb.Predicate.IN, values=values)))
        return "huge IN list", message.SerializeToString()


def _string_fields(message: Message) -> Iterator[tuple[Message, str, bool]]:
    """(holder, field name, repeated) of every string field in a message tree."""
    for fd in message.DESCRIPTOR.fields:
        if fd.type == F.TYPE_STRING:
            yield message, fd.name, fd.is_repeated
        elif fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            if fd.is_repeated:
                for child in getattr(message, fd.name):
                    yield from _string_fields(child)
            elif message.HasField(fd.name):
                yield from _string_fields(getattr(message, fd.name))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


# ------------------------------------------------------------------------------ running

@dataclass
class Report:
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    strategies: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)  # calls answered outside ALLOWED


async def _fuzz(address: str, methods: list[Method], requests: int, seed: int,
                report: Report) -> None:
    """Send `requests` fuzzed calls spread over `methods`, CONCURRENCY at a time."""
    fuzzer = Fuzzer(seed)
    weights = [_WEIGHT.get(m.name, 1.0) for m in methods]
    options = [("grpc.max_send_message_length", 64 << 20),
               ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        calls = {m.path: (channel.unary_stream if m.streaming else channel.unary_unary)(
            m.path, request_serializer=None, response_deserializer=None) for m in methods}
        queue: asyncio.Queue[tuple[Method, str, bytes] | None] = asyncio.Queue(CONCURRENCY)

        async def worker() -> None:
            while (item := await queue.get()) is not None:
                method, strategy, data = item
                code, details = await _call(calls[method.path], method, data)
                report.codes[code.name] += 1
                if code not in ALLOWED:
                    report.bad.append(f"{method.name} ({strategy}, {len(data)} bytes): "
                                      f"{code.name}: {details[:300]}")

        workers = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
        for _ in range(requests):
            method = fuzzer.rng.choices(methods, weights)[0]
            strategy, data = fuzzer.request(method)
            report.sent += 1
            report.strategies[strategy] += 1
            await queue.put((method, strategy, data))
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)


async def _call(call: Any, method: Method, data: bytes) -> tuple[grpc.StatusCode, str]:
    watch = method.name in WATCHES
    try:
        if method.streaming:
            async for _ in call(data, timeout=WATCH_TIMEOUT if watch else CALL_TIMEOUT):
                pass
        else:
            await call(data, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        if watch and exc.code() is Code.DEADLINE_EXCEEDED:
            return Code.OK, ""  # a watch that was accepted runs until its caller stops it
        return exc.code(), exc.details() or ""
    return Code.OK, ""


def rss(process: ServerProcess) -> int:
    for line in Path(f"/proc/{process.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


# ------------------------------------------------------------------------------ the cluster

def _seed_request(i: int) -> pb.UpsertRequest:
    def value(v: Any) -> pb.Value:
        if isinstance(v, str):
            return pb.Value(string_value=v)
        if isinstance(v, list):
            return pb.Value(list_value=pb.StringList(values=v))
        return pb.Value(int_value=v)

    attributes = {"seed.city": ["Oslo", "Lima", "Pune"][i % 3], "seed.n": i,
                  "seed.tags": [f"t{i % 4}", "all"]}
    return pb.UpsertRequest(id=f"seed-{i}", operations=[
        pb.Operation(op=pb.Operation.SET, attribute=name, value=value(v))
        for name, v in attributes.items()],
        identifiers=[pb.Identifier(kind="email", value=f"seed-{i}@known.invalid")])


def _oslo() -> pb.QueryRequest:
    return pb.QueryRequest(text='seed.city = "Oslo" AND seed.tags HAS "all"')


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("fuzz")
    shards = [start_shard(root / f"shard-{i}", "--name", f"shard-{i}", "--slots",
                          format_ranges(ranges), "--sync", "off")
              for i, ranges in enumerate(split_even(2))]
    throwaway = start_shard(root / "throwaway", "--name", "throwaway", "--sync", "off")
    router = start_router([s.address for s in shards])
    try:
        with grpc.insecure_channel(router.address) as channel:
            stub = memstore_pb2_grpc.MemstoreStub(channel)
            stub.BatchUpsert(pb.BatchUpsertRequest(
                requests=[_seed_request(i) for i in range(SEEDED)]), timeout=30)
            for i in range(SEEDED):  # through the directory too, as a client would write
                stub.Upsert(pb.UpsertRequest(id=f"seed-{i}", identifiers=[pb.Identifier(
                    kind="email", value=f"seed-{i}@known.invalid")]), timeout=30)
            seeded = {i: stub.Get(pb.GetRequest(key=pb.ProfileKey(id=f"seed-{i}")),
                                  timeout=30).profile for i in range(SEEDED)}
            oslo = stub.Count(_oslo(), timeout=30).count
        assert oslo == len(range(0, SEEDED, 3))
        with grpc.insecure_channel(throwaway.address) as channel:
            memstore_pb2_grpc.MemstoreStub(channel).BatchUpsert(pb.BatchUpsertRequest(
                requests=[_seed_request(i) for i in range(SEEDED)]), timeout=30)
        yield {"shards": shards, "router": router, "throwaway": throwaway, "seeded": seeded,
               "oslo": oslo}
    finally:
        for process in (router, throwaway, *shards):
            process.stop()


def _run(cluster: dict[str, Any], per_target: dict[str, int], seed: int) -> None:
    router, shards, throwaway = cluster["router"], cluster["shards"], cluster["throwaway"]
    processes = [router, *shards, throwaway]
    before = [rss(p) for p in processes]
    reports: dict[str, Report] = {}
    started = time.monotonic()
    # A bulk erasure with a random query (ALL, say) would erase the seeded profiles the
    # checks afterwards read: it goes to the throw-away shard, with the control calls.
    kept = [m for m in _methods(MEMSTORE) if m.name not in BULK_ERASURE]
    erasing = [m for m in _methods(MEMSTORE) if m.name in BULK_ERASURE]
    plan: list[tuple[str, str, list[Method], int]] = [
        ("router", router.address, kept, per_target["router"]),
        ("shard-0", shards[0].address, kept, per_target["shard"] // 2),
        ("shard-1", shards[1].address, kept, per_target["shard"] // 2),
        ("throwaway", throwaway.address, _methods(CONTROL) + erasing, per_target["control"]),
    ]
    for offset, (name, address, methods, requests) in enumerate(plan):
        reports[name] = Report()
        asyncio.run(_fuzz(address, methods, requests, seed + offset, reports[name]))
    elapsed = time.monotonic() - started
    after = [rss(p) for p in processes]
    summary = "\n".join(
        f"  {name}: {r.sent} requests, {dict(r.codes)}; strategies {dict(r.strategies)}"
        for name, r in reports.items())
    growth = ", ".join(f"{n} {b >> 20}->{a >> 20} MiB" for n, b, a in zip(
        ("router", "shard-0", "shard-1", "throwaway"), before, after, strict=True))
    print(f"\nfuzz: {sum(r.sent for r in reports.values())} requests in {elapsed:.1f} s\n"
          f"{summary}\n  RSS: {growth}")
    bad = [f"{name}: {line}" for name, r in reports.items() for line in r.bad]
    assert not bad, f"{len(bad)} answers outside {sorted(c.name for c in ALLOWED)}:\n" + \
        "\n".join(bad[:20])
    for process in processes:
        assert process.proc.poll() is None, "a server died"
    for name, b, a in zip(("router", "shard-0", "shard-1", "throwaway"), before, after,
                          strict=True):
        assert a - b <= MEMORY_BOUND[name], f"{name} grew from {b >> 20} to {a >> 20} MiB"
    _still_correct(cluster)


def _still_correct(cluster: dict[str, Any]) -> None:
    """The seeded profiles read back unchanged and count the same, through the router and
    straight to the shards; the throw-away shard still answers its control calls."""
    seeded: dict[int, pb.Profile] = cluster["seeded"]
    with grpc.insecure_channel(cluster["router"].address) as channel:
        stub = memstore_pb2_grpc.MemstoreStub(channel)
        assert stub.Count(_oslo(), timeout=30).count == cluster["oslo"]
        for i, profile in seeded.items():
            got = stub.Get(pb.GetRequest(key=pb.ProfileKey(id=f"seed-{i}")), timeout=30)
            assert got.profile == profile
        by_email = stub.Get(pb.GetRequest(key=pb.ProfileKey(identifier=pb.Identifier(
            kind="email", value="seed-7@known.invalid"))), timeout=30)
        assert by_email.profile == seeded[7]
        assert stub.Count(pb.QueryRequest(text="ALL"), timeout=30).count >= SEEDED
    counts = []
    for shard in cluster["shards"]:
        with grpc.insecure_channel(shard.address) as channel:
            counts.append(memstore_pb2_grpc.MemstoreStub(channel).Count(_oslo(),
                                                                        timeout=30).count)
    assert sum(counts) == cluster["oslo"]
    with grpc.insecure_channel(cluster["throwaway"].address) as channel:
        info = cluster_pb2_grpc.ShardControlStub(channel).GetShardInfo(cpb.ShardInfoRequest(),
                                                                       timeout=30)
        assert info.name == "throwaway"


def test_fuzz_every_method_of_both_services(cluster: dict[str, Any]) -> None:
    """3,500 requests: 1,600 to the router, 1,100 straight to the shards, 800 to
    ShardControl on the throw-away shard (the slow variant below sends 100,000)."""
    _run(cluster, {"router": 1600, "shard": 1100, "control": 800}, seed=23)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzz_every_method_of_both_services_at_length(cluster: dict[str, Any]) -> None:
    """100,000 requests, the same mix, other seeds."""
    _run(cluster, {"router": 45_000, "shard": 30_000, "control": 25_000}, seed=2023)

