"""The router's memory of query texts: which attributes a text names, bounded by bytes.

Segments are asked again and again with the same text, and the router parses a text to
check that some shard knows every attribute it names. Keeping the answer saves that parse;
keeping it for any text a caller sends would let callers fill the router's memory (100
distinct 4 MB texts once held 460 MB). So the cache holds at most `max_bytes` of texts and
their answers (Python object sizes), least recently used out first, and never keeps a
text larger than `max_text`: a big text is parsed each time, at a cost its sender pays.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

MAX_BYTES = 4 << 20  # if unsure: a few MiB hold thousands of segment definitions
MAX_TEXT = 16 << 10  # segment definitions are far shorter; a longer text is parsed each time
_ENTRY_OVERHEAD = 200  # the dict slot, the frozenset, and the ordering node, roughly


class TextCache:
    """text -> frozenset of attribute names, least recently used out past `max_bytes`."""

    def __init__(self, max_bytes: int = MAX_BYTES, max_text: int = MAX_TEXT) -> None:
        self.max_bytes = max_bytes
        self.max_text = max_text
        self.size = 0  # bytes held, as `_cost` counts them
        self._entries: OrderedDict[str, tuple[frozenset[str], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, text: str) -> frozenset[str] | None:
        entry = self._entries.get(text)
        if entry is None:
            return None
        self._entries.move_to_end(text)
        return entry[0]

    def put(self, text: str, names: frozenset[str]) -> None:
        if len(text) > self.max_text:
            return
        cost = _cost(text, names)
        if cost > self.max_bytes:
            return
        old = self._entries.pop(text, None)
        if old is not None:
            self.size -= old[1]
        self._entries[text] = (names, cost)
        self.size += cost
        while self.size > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.size -= dropped


def _cost(text: str, names: frozenset[str]) -> int:
    return (sys.getsizeof(text) + sys.getsizeof(names) + sum(map(sys.getsizeof, names))
            + _ENTRY_OVERHEAD)
