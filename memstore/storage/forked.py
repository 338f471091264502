"""Run a function in a forked child: a point-in-time copy of this process, for free.

Snapshots use it the way Redis's BGSAVE does: fork() gives the child the shard's memory as
it is at that instant (the kernel copies a page only when one side writes it), the child
writes the snapshot file from that frozen view on the other core, and the parent goes on
serving without sharing its event loop or its GIL with the writer. The parent pauses only
for fork() itself (copying page tables: milliseconds per GiB of memory).

The cost is memory: pages the parent changes while the child runs are copied, and so are
the pages of every object the child reads (reading a Python object writes its reference
count). Plan for up to the size of the profiles' data on top while a snapshot runs.

The child touches nothing the parent owns beyond reading: no event loop, no gRPC, no
logging. It resets signal handling (the parent's SIGTERM goes to the parent), dies with
the parent, never runs the garbage collector, reports through a pipe and leaves with
os._exit, so no cleanup of the parent's state runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
from collections.abc import Callable
from typing import Any

import msgpack

PR_SET_PDEATHSIG = 1
# Resolved here, in the parent: dlopen()/dlsym() in a child forked while another thread of
# the parent held the loader's lock could wait on it forever.
try:
    _prctl: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the child cannot ask to die with its parent
    _prctl = None


class ChildFailed(RuntimeError):
    """The child raised, or died, before finishing its work."""


async def run_in_child(work: Callable[[], Any]) -> Any:
    """Fork; in the child, return work() through a pipe: a small msgpack-able value (the
    parent reads it after the child exits, so it must fit the pipe's 64 KiB buffer).
    Raises ChildFailed. Cancelling the awaiting task kills the child."""
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, reports through the pipe
        _child(work, read_end, write_end, parent)
    os.close(write_end)
    reaped = asyncio.get_running_loop().run_in_executor(None, os.waitpid, pid, 0)
    try:
        _, status = await asyncio.shield(reaped)
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await reaped
        os.close(read_end)
        raise
    try:
        report = _read_all(read_end)
    finally:
        os.close(read_end)
    if not report:
        raise ChildFailed(f"child process {pid} died ({_describe(status)}) without a report")
    ok, value = msgpack.unpackb(report)
    if not ok:
        raise ChildFailed(value)
    return value


def _child(work: Callable[[], Any], read_end: int, write_end: int, parent: int) -> None:
    status = 1
    try:
        os.close(read_end)
        gc.disable()  # a collection would write every object's header: copies of all pages
        signal.set_wakeup_fd(-1)  # the parent's event loop owns that descriptor
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)
        payload = msgpack.packb([True, work()])
        status = 0
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        payload = msgpack.packb([False, f"{type(exc).__name__}: {exc}"])
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(write_end, view):]
    finally:
        os._exit(status)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
