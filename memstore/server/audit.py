"""The audit log: one JSON line for every call that changes the cluster, erases data or
exports it, naming who made it (a token's name from the auth file, never the token), when,
and how it ended; and one line for every erasure, its receipt (memstore.server.rights),
which names people only by salted hashes. Lines go to the process's log (logger `memstore.audit`) and, with `--audit-log FILE`,
are appended to FILE as well, each flushed and fsynced before the next, so the file is a
record an operator can keep apart from the data. Audit lines hold no personal data.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Any

log = logging.getLogger("memstore.audit")

# Who makes the call being served (set by the security interceptors), for lines written
# from inside a handler.
caller: ContextVar[str] = ContextVar("caller", default="anonymous")

_lock = threading.Lock()
_file: Any = None
_path: Path | None = None


def open_log(path: Path | None) -> None:
    """Append audit lines to `path` from now on (None: to the process log only)."""
    global _file, _path
    with _lock:
        if _file is not None:
            _file.close()
        _file, _path = (None, None) if path is None else (path.open("a", encoding="utf-8"),
                                                          path)


def record(event: str, **fields: Any) -> dict[str, Any]:
    """Write one audit line; returns it."""
    entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
             + f".{int(time.time() * 1000) % 1000:03d}Z", "event": event, **fields}
    line = json.dumps(entry, ensure_ascii=False, sort_keys=False, default=str)
    log.info("audit: %s", event, extra={"audit": entry})
    with _lock:
        if _file is not None:
            _file.write(line + "\n")
            _file.flush()
            os.fsync(_file.fileno())
    return entry
