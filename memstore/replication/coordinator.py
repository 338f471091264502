"""Automatic failover through etcd (`serve-shard --coordinator etcd://HOST:PORT`).

Every member of a shard -- its primary and its replicas, processes started with the same
--name and --coordinator -- runs an `Elector`. etcd decides who is primary; this module
never counts votes. The keys, under /memstore/<shard>/ (docs/replication.md):

    primary            {"address": "HOST:PORT", "epoch": N}, attached to the primary's
                       lease: etcd deletes it once the primary stops refreshing the lease
    epoch              the highest epoch a primary ever claimed (no lease): a claim takes
                       one above it, so epochs only grow across failovers
    members/HOST:PORT  each member's log position, attached to its lease: who is the most
                       up-to-date candidate

Each member holds one lease (--lease-seconds) and refreshes it every third of its TTL.

Election: while `primary` is absent, every member ranks its own position among the
published ones; the furthest (ties: the lowest address) claims at once, the others only
after one TTL more (the furthest may be gone too). A claim is one transaction: if
`primary` does not exist, put it with the claimant's lease and put `epoch`. The winner is
promoted as `memstore cluster failover` promotes (Roles.promote: the shard's name, a higher
epoch); the others see its key and follow it (Roles.demote repoints them).

Fencing: a primary takes a write only while the lease's last refresh that etcd confirmed
was sent less than TTL - MARGIN ago (`Fence.check`, before a write is logged and again
before it is acknowledged). etcd deletes the key a TTL after it received that refresh,
which is after it was sent; so a primary that cannot refresh (dead etcd, partition, a
stopped process) refuses writes before any other member can claim. Once it hears of a
primary at a higher epoch it becomes its replica (Roles.demote); what its log holds after
the new primary's takeover position is discarded by a full resync, which says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aetcd
import grpc
from pyroaring import BitMap

from memstore.errors import FailedPrecondition, Unavailable
from memstore.shard import Shard

log = logging.getLogger("memstore.replication")

DEFAULT_PORT = 2379
# What a member that has not found its primary yet calls the one it waits for; read in
# "this shard is a read-only replica of the primary etcd elects: send writes to the primary".
ELECTED = "the primary etcd elects"


def endpoint(url: str) -> tuple[str, int]:
    """(host, port) of an etcd://HOST[:PORT] coordinator URL; ValueError if it is not one."""
    parts = urlsplit(url)
    if parts.scheme != "etcd" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"--coordinator {url!r}: give etcd://HOST:PORT (one etcd endpoint)")
    return parts.hostname, parts.port or DEFAULT_PORT


@dataclass(frozen=True)
class Claim:
    """What the primary key says."""

    address: str
    epoch: int


class Keys:
    """The key layout of one shard (the module docstring)."""

    def __init__(self, shard: str) -> None:
        root = f"/memstore/{shard}/"
        self.primary = (root + "primary").encode()
        self.epoch = (root + "epoch").encode()
        self.members = (root + "members/").encode()

    def member(self, address: str) -> bytes:
        return self.members + address.encode()


async def holder(etcd: aetcd.Client, keys: Keys) -> Claim | None:
    """Who holds the primary key now (None: nobody)."""
    found = await etcd.get(keys.primary)
    if found is None:
        return None
    fields = json.loads(found.value)
    return Claim(fields["address"], int(fields["epoch"]))


class Fence:
    """Whether this primary may take a write: its lease confirmed recently enough, and
    the primary key its own (`Replicas` asks before and after every write)."""

    def __init__(self, ttl: int) -> None:
        self.ttl = ttl
        self.margin = max(0.2, ttl / 5)  # for the round trip and clocks that run apart
        self.confirmed = 0.0  # monotonic: when the last confirmed refresh was sent
        self.holding = False  # this member holds the primary key

    def renewed(self, sent: float) -> None:
        self.confirmed = sent

    def lost(self) -> None:
        self.holding = False

    @property
    def valid(self) -> bool:
        return self.holding and time.monotonic() < self.confirmed + self.ttl - self.margin

    def check(self, lsn: int | None = None) -> None:
        """Raise Unavailable unless the lease is valid (`lsn`: the write is logged already
        there, acknowledged only if the lease still holds)."""
        if self.valid:
            return
        age = time.monotonic() - self.confirmed
        why = (f"this primary's etcd lease is not confirmed (last {age:.1f} s ago, TTL "
               f"{self.ttl} s): another member may be taking over" if self.holding else
               "this primary no longer holds its claim in etcd: another member may be "
               "taking over")
        if lsn is None:
            raise Unavailable(f"{why}; nothing was written")
        raise Unavailable(f"{why}; the write is on this primary's log at position {lsn} but "
                          "may or may not survive the failover")


class Elector:
    """One member's side of the election (the module docstring): keeps its lease, publishes
    its position, claims the primary key when it is free and this member is the best
    candidate, and follows whoever holds it otherwise."""

    def __init__(self, etcd: aetcd.Client, shard_name: str, ttl: int, roles: Any,
                 slots: BitMap | None = None) -> None:
        self.etcd = etcd
        self.keys = Keys(shard_name)
        self.name = shard_name
        self.ttl = ttl
        self.roles = roles  # memstore.replication.roles.Roles
        self.slots = slots  # --slots: owned on a first claim when the directory owns none
        self.fence = Fence(ttl)
        self.poll = min(0.5, ttl / 4)
        self._lease: Any = None  # aetcd.Lease
        self._refresh_due = 0.0
        self._free_since: float | None = None  # when this member saw no primary key
        self._said = ""
        self._task: asyncio.Task[None] | None = None

    @property
    def shard(self) -> Shard:
        return self.roles.shard  # type: ignore[no-any-return]

    @property
    def address(self) -> str:
        return self.roles.address  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ the loop
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Give up: refuse writes first, then revoke the lease, so that on a clean stop a
        replica takes over at once instead of after a TTL."""
        self.fence.lost()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lease is not None:
            with contextlib.suppress(aetcd.ClientError, grpc.RpcError, TimeoutError):
                await self._lease.revoke()
        with contextlib.suppress(aetcd.ClientError, grpc.RpcError, TimeoutError):
            await self.etcd.close()

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except (aetcd.ClientError, grpc.RpcError, TimeoutError, ValueError) as exc:
                self._say(f"etcd: {type(exc).__name__}: {exc}; trying again")
            except Exception:  # a bug here must not end the election
                log.exception("coordinator step failed; trying again")
            await asyncio.sleep(self.poll)

    async def _step(self) -> None:
        await self._keep_lease()
        held = await holder(self.etcd, self.keys)
        if held is None:
            await self._campaign()
            return
        self._free_since = None
        if held.address == self.address:
            if not self.fence.holding:  # a claim of an earlier process at this address
                self._say(f"etcd names this address primary of {self.name!r} from before "
                          "this process started: waiting for that lease to expire")
            return  # else this member is primary, and its lease is refreshed above
        if self.fence.holding:
            self.fence.lost()
            log.warning("lost the primary key of %r to %s at epoch %d: writes refused",
                        self.name, held.address, held.epoch)
        if self.shard.replica_of != held.address:
            await self._follow(held)

    async def _keep_lease(self) -> None:
        """Refresh the lease every third of its TTL (a new one when etcd dropped it), and
        publish this member's log position with it."""
        now = time.monotonic()
        if self._lease is not None and now < self._refresh_due:
            return
        if self._lease is not None and await self._refresh() <= 0:
            log.warning("etcd lease %x expired (this process was cut off or stopped "
                        "for more than %d s)%s", self._lease.id, self.ttl,
                        ": writes refused" if self.fence.holding else "")
            self.fence.lost()
            self._lease = None
        if self._lease is None:
            self._lease = await self.etcd.lease(self.ttl)
        self.fence.renewed(now)
        self._refresh_due = now + self.ttl / 3
        await self.etcd.put(self.keys.member(self.address), str(self.shard.position).encode(),
                            lease=self._lease.id)

    async def _refresh(self) -> int:
        """One keep-alive of the lease: the TTL etcd gives it now (0: it expired). One
        stream a refresh, closed after the answer (aetcd's Lease.refresh leaves it open)."""
        call = self.etcd.leasestub.LeaseKeepAlive(
            iter([aetcd.rpc.LeaseKeepAliveRequest(ID=self._lease.id)]), timeout=self.ttl / 3)
        try:
            answer = await call.read()
        finally:
            call.cancel()
        if answer is grpc.aio.EOF:
            raise aetcd.ConnectionFailedError("etcd closed the keep-alive stream unanswered")
        return int(answer.TTL)

    async def _campaign(self) -> None:
        """No primary: claim the key if this member is the best candidate, or has waited a
        TTL for the best one to."""
        now = time.monotonic()
        if self._free_since is None:
            self._free_since = now
        ahead = await self._ahead()
        if ahead and now - self._free_since < self.ttl:
            self._say(f"no primary for {self.name!r}: {ahead} is further ahead; waiting for "
                      "it to claim")
            return
        epoch = max(await self._stored_epoch(), self.shard.engine.epoch) + 1
        value = json.dumps({"address": self.address, "epoch": epoch}).encode()
        t = self.etcd.transactions
        won, _ = await self.etcd.transaction(
            compare=[t.version(self.keys.primary) == 0],
            success=[t.put(self.keys.primary, value, lease=self._lease.id),
                     t.put(self.keys.epoch, str(epoch).encode())], failure=[])
        if not won:
            return  # another member claimed first: the next step follows it
        self.fence.holding = True
        try:
            epoch = await self.roles.take_over(self.name, epoch, self.slots)
        except (FailedPrecondition, Unavailable, OSError) as exc:
            log.error("claimed %r in etcd but could not serve as its primary (%s): giving "
                      "the claim up", self.name, exc)
            self.fence.lost()
            await self.etcd.delete(self.keys.primary)
            return
        self._free_since = None
        self._say(f"primary of {self.name!r} at epoch {epoch} (elected through etcd, "
                  f"position {self.shard.position})")

    async def _ahead(self) -> str:
        """A member whose published position is ahead of this one's ("" if none)."""
        mine = (self.shard.position, self.address)
        for kv in await self.etcd.get_prefix(self.keys.members):
            address = kv.key[len(self.keys.members):].decode()
            if address != self.address and (-int(kv.value), address) < (-mine[0], mine[1]):
                return address
        return ""

    async def _stored_epoch(self) -> int:
        found = await self.etcd.get(self.keys.epoch)
        return int(found.value) if found is not None else 0

    async def _follow(self, held: Claim) -> None:
        try:
            await self.roles.demote(held.address, held.epoch)
        except FailedPrecondition as exc:
            self._say(f"not following {held.address}: {exc}")
            return
        self._say(f"following {held.address}, primary of {self.name!r} at epoch "
                  f"{held.epoch} (elected through etcd)")

    def _say(self, line: str) -> None:
        """Log a state once, not at every step."""
        if line != self._said:
            log.warning(line)
            self._said = line


async def connect(url: str, shard_name: str, address: str, timeout: float
                  ) -> tuple[aetcd.Client, str]:
    """A client of the etcd at `url`, and whom a member starting at `address` follows: the
    primary etcd names, else ELECTED (its Elector claims or follows once it serves).
    ValueError when etcd does not answer: a member cannot tell its role without it."""
    host, port = endpoint(url)
    etcd = aetcd.Client(host, port, timeout=timeout)  # type: ignore[arg-type]
    try:
        held = await holder(etcd, Keys(shard_name))
    except (aetcd.ClientError, grpc.RpcError) as exc:
        await etcd.close()
        raise ValueError(f"--coordinator {url}: {type(exc).__name__}: {exc}") from None
    if held is None or held.address == address:  # ours: an earlier process's claim
        return etcd, ELECTED
    return etcd, held.address
