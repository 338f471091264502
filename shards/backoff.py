"""Waiting before a retry: what the router does while slots move and what the directory
does while another write's young claim is in flight, within the caller's deadline."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc


async def pause(attempt: int, context: Any, waiting_for: str) -> None:
    """Sleep 2 ms doubling per attempt, at most 100 ms; if the caller's deadline would pass
    first, end its call with DEADLINE_EXCEEDED ("deadline passed while <waiting_for>")."""
    delay = min(0.002 * (2 ** attempt), 0.1)
    remaining = context.time_remaining()
    if remaining is not None and remaining <= delay:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"deadline passed while {waiting_for}")
        raise AssertionError("abort returned")
    await asyncio.sleep(delay)
