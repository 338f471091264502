"""The floor: answer every query by scanning the column arrays with numpy, no index at all."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.datagen import Dataset, profile_id
from bench.queries import Query, numpy_group_counts, to_numpy


class NumpyPeer:
    name = "numpy"
    available = True
    reason = ""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def load(self) -> dict[str, Any]:
        return {"bytes": self.ds.nbytes(), "seconds": 0.0}

    def mask(self, q: Query) -> np.ndarray:
        return to_numpy(q.tree, self.ds)

    def count(self, q: Query) -> int:
        return int(np.count_nonzero(self.mask(q)))

    def ids(self, q: Query, limit: int) -> list[str]:
        rows = np.flatnonzero(self.mask(q))[:limit]
        return [profile_id(int(i)) for i in rows]

    def group_by(self, q: Query, attr: str, top_n: int) -> list[tuple[Any, int]]:
        full = numpy_group_counts(self.ds, self.mask(q), attr)
        return sorted(full.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]

    def close(self) -> None:
        pass


def timed_mask(ds: Dataset, q: Query) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    m = to_numpy(q.tree, ds)
    return m, time.perf_counter() - t
