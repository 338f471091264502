"""Seeded generator of realistic customer profiles, shared by memstore and every peer.

One job: turn (size, seed) into the same column arrays every time, and cache them on disk so
that loaders and peers read identical data. Columns are numpy arrays (no Python object per
profile), so 10,000,000 profiles fit in a few hundred MB:

- categorical strings: int16 codes into a fixed vocabulary, -1 where the attribute is absent;
- int / float / timestamp (int64 epoch seconds, UTC): values plus a `present` bool mask for
  optional attributes;
- bool: int8 0/1;
- string lists (a set): a uint64 bitmask over a fixed vocabulary; 0 means absent (memstore
  stores an empty list as "attribute absent", so `exists(tags)` means "has at least one").

Value skew follows Zipf-like weights. Timestamps lie within the five years before REF_END,
at whole seconds, so every system stores them exactly. Floats carry two decimals.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import compress, repeat
from pathlib import Path
from typing import Any

import numpy as np

DATA_VERSION = 1
REF_END = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp())
FIVE_YEARS = 5 * 365 * 86400
DEFAULT_CACHE = Path(os.environ.get("MEMSTORE_BENCH_DATA", Path(__file__).parent / "data"))

COUNTRIES = ["US", "GB", "DE", "FR", "CA", "BR", "IN", "JP", "AU", "ES", "IT", "NL", "MX", "SE", "PL", "KR", "TR", "AR", "BE", "CH", "AT", "NO", "DK", "FI", "IE", "PT", "CZ", "RO", "HU", "GR", "IL", "ZA", "NG", "EG", "SG", "MY", "TH", "ID", "PH", "NZ"]
PLANS = ["free", "basic", "plus", "pro", "enterprise"]
DEVICE_OS = ["ios", "android", "windows", "macos", "linux", "chromeos", "other"]
CHANNELS = ["organic", "paid_search", "social", "email", "referral", "display", "affiliate",
            "direct"]
LANGUAGES = ["en", "es", "de", "fr", "pt", "ja", "it", "nl", "pl", "ko", "tr", "sv"]
CONSENT = ["granted", "denied"]
INTERESTS = ["dogs", "cats", "hiking", "running", "cycling", "yoga", "fitness", "cooking", "baking", "travel", "photography", "music", "movies", "books", "gaming", "tech", "gadgets", "fashion", "beauty", "skincare", "gardening", "diy", "home_decor", "cars", "motorcycles", "football", "basketball", "tennis", "golf", "skiing", "surfing", "camping", "fishing", "wine", "beer", "coffee", "tea", "vegan", "vegetarian", "keto", "parenting", "pets", "finance", "investing", "crypto", "real_estate", "education", "languages", "art", "design", "theatre", "dance", "comedy", "podcasts", "anime", "comics", "history", "science", "space", "wellness"]
TAGS = ["vip", "churn_risk", "high_intent", "newsletter", "beta_tester", "early_adopter", "wholesale", "student", "teacher", "nonprofit", "partner", "influencer", "reseller", "b2b", "b2c", "returning", "new_customer", "discount_seeker", "full_price", "mobile_first", "desktop_first", "cart_abandoner", "reviewer", "referrer", "support_heavy", "loyalty_gold", "loyalty_silver", "loyalty_bronze", "gift_buyer", "bulk_buyer"]
CITIES = [f"city_{i:04d}" for i in range(2000)]
EMAIL_DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "icloud.com", "example.org",
                 "proton.me", "aol.com", "gmx.de"]

assert len(COUNTRIES) == 40 and len(INTERESTS) == 60 and len(TAGS) == 30


@dataclass(frozen=True)
class Attr:
    """One profile attribute: its memstore kind, how it is held here, and its vocabulary."""

    name: str
    kind: str  # memstore kind: string, int, float, bool, timestamp, string_list
    storage: str  # cat, int, float, bool, ts, list, text
    vocab: tuple[str, ...] = ()
    indexed: bool = True

    def declaration(self) -> dict[str, Any]:
        decl: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if not self.indexed:
            decl["indexed"] = False
        return decl


SCHEMA: tuple[Attr, ...] = (
    Attr("country", "string", "cat", tuple(COUNTRIES)),
    Attr("city", "string", "cat", tuple(CITIES)),
    Attr("language", "string", "cat", tuple(LANGUAGES)),
    Attr("plan", "string", "cat", tuple(PLANS)),
    Attr("device_os", "string", "cat", tuple(DEVICE_OS)),
    Attr("acquisition.channel", "string", "cat", tuple(CHANNELS)),
    Attr("consent.email", "string", "cat", tuple(CONSENT)),
    Attr("age", "int", "int"),
    Attr("nps", "int", "int"),
    Attr("orders", "int", "int"),
    Attr("event.purchase.count", "int", "int"),
    Attr("ltv", "float", "float"),
    Attr("signup", "timestamp", "ts"),
    Attr("last_seen", "timestamp", "ts"),
    Attr("event.purchase.last", "timestamp", "ts"),
    Attr("is_subscribed", "bool", "bool"),
    Attr("interests", "string_list", "list", tuple(INTERESTS)),
    Attr("tags", "string_list", "list", tuple(TAGS)),
    Attr("email", "string", "text", indexed=False),
)
ATTRS = {a.name: a for a in SCHEMA}


def schema_declaration() -> list[dict[str, Any]]:
    """The schema as `Client.declare` takes it."""
    return [a.declaration() for a in SCHEMA]


@dataclass
class Dataset:
    """Column arrays for `size` profiles; row i is the profile with id `profile_id(i)`."""

    size: int
    seed: int
    cols: dict[str, np.ndarray]
    present: dict[str, np.ndarray] = field(default_factory=dict)  # optional numeric attrs
    device: np.ndarray | None = None  # uint64 device ids; 0 = no device identifier

    def has(self, name: str) -> np.ndarray:
        """Bool mask: the profile holds attribute `name`."""
        a = ATTRS[name]
        col = self.cols[name]
        if a.storage == "cat":
            return col >= 0
        if a.storage == "list":
            return col != 0
        if name in self.present:
            return self.present[name]
        return np.ones(self.size, dtype=bool)

    def nbytes(self) -> int:
        arrays = [*self.cols.values(), *self.present.values()]
        if self.device is not None:
            arrays.append(self.device)
        return int(sum(a.nbytes for a in arrays))


def profile_id(i: int) -> str:
    return f"u{i:08d}"


def email_of(i: int, domain_code: int) -> str:
    return f"user{i}@{EMAIL_DOMAINS[domain_code]}"


def _zipf(rng: np.random.Generator, n_values: int, size: int, s: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n_values + 1) ** s
    return rng.choice(n_values, size=size, p=weights / weights.sum()).astype(np.int16)


def _absent(rng: np.random.Generator, codes: np.ndarray, rate: float) -> np.ndarray:
    codes[rng.random(codes.size) < rate] = -1
    return codes


def _bitmask(rng: np.random.Generator, n_values: int, size: int, mean: float,
             s: float) -> np.ndarray:
    """Each value k is present independently with Zipf-like probability; mean set size ~mean."""
    weights = 1.0 / np.arange(1, n_values + 1) ** s
    probs = np.minimum(weights * (mean / weights.sum()), 0.9)
    mask = np.zeros(size, dtype=np.uint64)
    for k, p in enumerate(probs):
        mask |= (rng.random(size) < p).astype(np.uint64) << np.uint64(k)
    return mask


def generate(size: int, seed: int = 42) -> Dataset:
    """Generate `size` profiles deterministically from `seed` (vectorised; ~1M rows/s)."""
    rng = np.random.default_rng(seed)
    n = size
    cols: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    cols["country"] = _zipf(rng, 40, n, 1.1)
    cols["city"] = _absent(rng, _zipf(rng, 2000, n, 1.0), 0.05)
    cols["language"] = _zipf(rng, len(LANGUAGES), n, 1.3)
    cols["plan"] = rng.choice(5, size=n, p=[0.55, 0.2, 0.12, 0.1, 0.03]).astype(np.int16)
    cols["device_os"] = _absent(rng, _zipf(rng, len(DEVICE_OS), n, 0.9), 0.1)
    cols["acquisition.channel"] = _zipf(rng, len(CHANNELS), n, 0.8)
    consent = rng.choice(3, size=n, p=[0.7, 0.15, 0.15]).astype(np.int16)
    consent[consent == 2] = -1
    cols["consent.email"] = consent

    age = np.clip(np.rint(rng.normal(38, 13, n)), 18, 90).astype(np.int32)
    present["age"] = rng.random(n) >= 0.15
    cols["age"] = np.where(present["age"], age, 0).astype(np.int32)
    present["nps"] = rng.random(n) < 0.3
    cols["nps"] = np.where(present["nps"], rng.integers(0, 11, n), 0).astype(np.int32)
    orders = rng.negative_binomial(1, 0.35, n).astype(np.int32)
    orders[rng.random(n) < 0.45] = 0
    cols["orders"] = orders
    buyer = orders > 0
    present["event.purchase.count"] = buyer
    cols["event.purchase.count"] = orders.copy()
    ltv = np.round(orders * rng.lognormal(3.8, 0.9, n), 2)
    cols["ltv"] = ltv.astype(np.float64)

    signup = REF_END - (FIVE_YEARS * (1.0 - np.sqrt(rng.random(n)))).astype(np.int64) - 1
    cols["signup"] = signup
    gap = REF_END - signup
    last_seen = signup + (gap * rng.beta(3.0, 1.0, n)).astype(np.int64)
    cols["last_seen"] = last_seen
    cols["event.purchase.last"] = np.where(
        buyer, signup + ((last_seen - signup) * rng.random(n)).astype(np.int64), 0)
    present["event.purchase.last"] = buyer
    cols["is_subscribed"] = (rng.random(n) < 0.35).astype(np.int8)
    cols["interests"] = _bitmask(rng, len(INTERESTS), n, 3.0, 0.7)
    cols["tags"] = _bitmask(rng, len(TAGS), n, 1.2, 1.0)
    cols["email"] = rng.integers(0, len(EMAIL_DOMAINS), n).astype(np.int8)  # domain code
    device = rng.integers(1, 2**63, n, dtype=np.int64).astype(np.uint64)
    device[rng.random(n) < 0.1] = 0
    return Dataset(size=n, seed=seed, cols=cols, present=present, device=device)


def cache_path(size: int, seed: int, cache_dir: Path = DEFAULT_CACHE) -> Path:
    return Path(cache_dir) / f"profiles-v{DATA_VERSION}-n{size}-s{seed}.npz"


def load_or_generate(size: int, seed: int = 42, cache_dir: Path = DEFAULT_CACHE) -> Dataset:
    """The dataset for (size, seed), read from the cache file or generated and written once."""
    path = cache_path(size, seed, cache_dir)
    if path.exists():
        with np.load(path) as z:
            cols = {k[2:]: z[k] for k in z.files if k.startswith("c:")}
            present = {k[2:]: z[k] for k in z.files if k.startswith("p:")}
            return Dataset(size, seed, cols, present, z["device"])
    ds = generate(size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    arrays = {f"c:{k}": v for k, v in ds.cols.items()}
    arrays.update({f"p:{k}": v for k, v in ds.present.items()})
    assert ds.device is not None
    arrays["device"] = ds.device
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)
    return ds


# ---- records for memstore ------------------------------------------------------------------

def iter_records(ds: Dataset, start: int = 0, stop: int | None = None,
                 chunk: int = 10_000, iso: bool = False) -> Iterator[dict[str, Any]]:
    """Profiles as memstore records: {"id", "attributes", "identifiers"}.

    Timestamps are aware UTC datetimes, or ISO-8601 strings with `iso=True` (for JSON Lines).
    Absent attributes are left out. Built a column at a time: the loader feeding a benchmark
    shares the machine with the server, so its own cost per record is kept small.
    """
    stop = ds.size if stop is None else stop
    names = [a.name for a in SCHEMA if a.storage != "text"] + ["email"]
    for lo in range(start, stop, chunk):
        hi = min(lo + chunk, stop)
        columns = [_column(ds, a, lo, hi, iso) for a in SCHEMA if a.storage != "text"]
        emails = [email_of(i, d) for i, d in zip(range(lo, hi), ds.cols["email"][lo:hi].tolist())]
        columns.append(emails)
        devices = (ds.device[lo:hi].tolist() if ds.device is not None else [0] * (hi - lo))
        for i, row, email, device in zip(range(lo, hi), zip(*columns), emails, devices):
            attrs = {name: v for name, v in zip(names, row) if v is not None}
            idents: list[tuple[str, str]] = [("email", email)]
            if device:
                idents.append(("device", f"{device:016x}"))
            yield {"id": profile_id(i), "attributes": attrs, "identifiers": idents}


def _column(ds: Dataset, a: Attr, lo: int, hi: int, iso: bool) -> list[Any]:
    """Rows lo..hi of one attribute as record values, None where absent."""
    raw = ds.cols[a.name][lo:hi]
    st = a.storage
    if st == "cat":  # code -1 (absent) picks the None after the vocabulary
        return list(map((*a.vocab, None).__getitem__, raw.tolist()))
    if st == "list":  # bit k of a mask: the list holds vocab[k]; lists in vocab order
        bits = (raw.astype(np.int64)[:, None] >> np.arange(len(a.vocab))) & 1
        return [list(compress(a.vocab, row)) if mask else None
                for mask, row in zip(raw.tolist(), bits.astype(bool).tolist())]
    if st == "ts":
        values: list[Any] = list(map(datetime.fromtimestamp, raw.tolist(), repeat(UTC)))
        if iso:
            values = [v.strftime("%Y-%m-%dT%H:%M:%SZ") for v in values]
    elif st == "bool":
        values = list(map(bool, raw.tolist()))
    else:
        values = raw.tolist()
    if a.name in ds.present:
        values = [v if has else None for v, has in zip(values, ds.present[a.name][lo:hi].tolist())]
    return values


def write_jsonl(ds: Dataset, path: Path) -> Path:
    """JSON Lines for `memstore load`: one record a line, timestamps as ISO-8601 strings."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in iter_records(ds, iso=True):
            rec["identifiers"] = [list(x) for x in rec["identifiers"]]
            f.write(json.dumps(rec, separators=(",", ":")))
            f.write("\n")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    import sys
    import time

    t = time.perf_counter()
    d = generate(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
    print(f"{d.size} profiles in {time.perf_counter() - t:.2f}s, {d.nbytes() / 1e6:.0f} MB")
