"""Logs of every memstore process: one JSON object a line on stderr.

Each line has `ts` (UTC, ISO-8601 with milliseconds), `level`, `logger`, `msg`, the
process's `role` and, for a shard, its `shard` name, and whatever structured fields the
call passed in `extra` (python-json-logger does the escaping, so any message or data
directory name stays valid JSON). The lines a server writes when it is ready ("listening
on ADDRESS") are log lines too; `listening_address` reads one back (the supervisor, the
tests and the benchmarks wait for it).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from pythonjsonlogger.json import JsonFormatter

_context: dict[str, str] = {}
READY = "listening on "  # the message a server logs when it accepts calls


class _Formatter(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
            f".{int(record.msecs):03d}Z"

    def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record.update(_context)


def setup(verbose: bool = False, **context: str) -> None:
    """Send this process's logs to stderr as JSON lines; `context` (role="shard",
    shard="shard-0") is added to every line."""
    _context.clear()
    _context.update(context)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("{asctime}{levelname}{name}{message}", style="{",
                                    rename_fields={"asctime": "ts", "levelname": "level",
                                                   "name": "logger", "message": "msg"}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def ready(logger: logging.Logger, address: str) -> None:
    """Log that the server accepts calls at `address` (READY), and flush."""
    logger.info(f"{READY}{address}", extra={"address": address})
    for handler in logging.getLogger().handlers:
        handler.flush()


def message(line: str, role: str | None = None) -> str:
    """The `msg` of a JSON log line (the line itself if it is not one); with `role`, ""
    unless the line is from a process of that role ("supervisor", "router", "shard")."""
    text = line.strip()
    entry: Any = None
    if text.startswith("{"):
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
    if not isinstance(entry, dict):
        return "" if role is not None else text
    if role is not None and entry.get("role") != role:
        return ""
    msg = entry.get("msg")
    return msg if isinstance(msg, str) else ""


def listening_address(line: str, role: str | None = None) -> str | None:
    """The address in a READY line (of a process of `role`, if given), else None:
    `memstore serve` passes its shards' READY lines on before its own."""
    msg = message(line, role)
    return msg[len(READY):] if msg.startswith(READY) else None
