"""Identity rules: what a primary id and an identifier may be, and merge protection.

IdentityRules refuses "blob" profiles built from shared or junk identifiers (values on a
blocked list, too many identifiers of one kind); check_pid and check_identifier name the
request field a bad id or identifier came from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from memstore.errors import InvalidArgument, brief

MAX_ID_BYTES = 256
MAX_IDENTIFIER_BYTES = 512
IDENT_KIND = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")

DEFAULT_BLOCKED = frozenset(
    {"", "null", "none", "nil", "undefined", "unknown", "n/a", "na", "0", "-",
     "test", "test@test.com", "test@example.com", "noemail@noemail.com",
     "00000000-0000-0000-0000-000000000000"}
)


@dataclass(frozen=True)
class IdentityRules:
    """Merge protection against "blob" profiles built from shared or junk identifiers."""

    max_per_kind: int = 20
    blocked: frozenset[str] = DEFAULT_BLOCKED

    def is_blocked(self, value: str) -> bool:
        return value.strip().lower() in self.blocked


def check_pid(pid: str, where: str = "id") -> None:
    if not isinstance(pid, str) or not pid:
        raise InvalidArgument(f"{where}: empty profile id")
    if len(pid.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidArgument(f"{where}: profile id longer than {MAX_ID_BYTES} bytes")


def claim_columns(entries: Sequence[Any]) -> tuple[Sequence[Any], ...]:
    """The kinds, values, pids and expected holders of checked claim entries (see
    ClaimRequest). A batch of well-formed entries is checked a column at a time; the
    first bad entry is named by the per-entry checks."""
    if not entries:
        return (), (), (), ()
    try:
        if set(map(type, entries)) <= {list, tuple} and set(map(len, entries)) == {4}:
            kinds, values, pids, expected = zip(*entries)
            named = [p for p in chain(pids, expected) if p is not None]
            if (set(map(type, chain(kinds, values, named))) == {str}
                    and all(map(IDENT_KIND.match, set(kinds))) and all(values) and all(named)
                    and max(map(len, values)) * 4 <= MAX_IDENTIFIER_BYTES
                    and max(map(len, named), default=0) * 4 <= MAX_ID_BYTES):
                return kinds, values, pids, expected
    except TypeError:
        pass
    for i, entry in enumerate(entries):  # name the first bad entry (or pass the long ones)
        where = f"claims[{i}]"
        if not (isinstance(entry, list | tuple) and len(entry) == 4
                and isinstance(entry[0], str) and isinstance(entry[1], str)):
            raise InvalidArgument(f"{where}: not [kind, value, pid or nil, expected or nil]")
        check_identifier(entry[0], entry[1], where)
        for name, named_pid in (("pid", entry[2]), ("expected", entry[3])):
            if named_pid is not None:
                if not isinstance(named_pid, str):
                    raise InvalidArgument(f"{where}: {name} must be a string or nil")
                check_pid(named_pid, f"{where}.{name}")
    return tuple(zip(*entries))  # type: ignore[return-value]


def check_identifier(kind: str, value: str, where: str) -> None:
    if not IDENT_KIND.match(kind or ""):
        raise InvalidArgument(
            f"{where}: identifier kind {brief(kind)} must be lower-case letters, digits, _ or -"
        )
    if not value:
        raise InvalidArgument(f"{where}: empty identifier value")
    if len(value.encode("utf-8")) > MAX_IDENTIFIER_BYTES:
        raise InvalidArgument(f"{where}: identifier longer than {MAX_IDENTIFIER_BYTES} bytes")


def id_key(pid: str) -> str:
    """The suppression key of a primary id (identifiers use claim_key: "kind:value")."""
    return "\x00" + pid
