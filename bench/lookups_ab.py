"""`python -m bench.lookups_ab --before DIR`: served look-ups and counts, this tree against
another, side by side in the same run.

One job: whether a change of code slows what callers see (issue 29 allows a smaller
footprint to cost look-ups and queries at most 10%). Two `memstore serve-shard` processes
(the other tree's code, e.g. from `git archive`, and this one's; bench.memstore_side) are
loaded with the bench's profiles (bench.datagen, seed 42); then rounds, alternating which
shard goes first, each with the same calls to both: Get of `--gets` random ids one by
one, BatchGet of `--batch` random ids five times, and two counts. Prints each call's
median and p99 (nearest rank) per code, and this tree's median ÷ the other's.

    python -m bench.lookups_ab --before DIR [--size 1000000] [--rounds 12]
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import click

from bench.datagen import load_or_generate, profile_id
from bench.memstore_side import MemstoreServer

COUNTS = ('country = "US"', 'age >= 30 AND plan = "pro"')


def _summary(times: list[float]) -> tuple[float, float]:
    """Median and p99 (nearest rank) in milliseconds."""
    ordered = sorted(times)
    return statistics.median(ordered) * 1e3, ordered[max(0, -(-99 * len(ordered) // 100) - 1)] * 1e3


@click.command()
@click.option("--before", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="the other tree (its memstore/ at the top)")
@click.option("--size", default=1_000_000, show_default=True, help="profiles in each shard")
@click.option("--rounds", default=12, show_default=True)
@click.option("--gets", default=500, show_default=True, help="Get calls a round")
@click.option("--batch", default=1000, show_default=True, help="ids a BatchGet")
@click.option("--seed", default=7, show_default=True, help="of the ids asked for")
def main(before: Path, size: int, rounds: int, gets: int, batch: int, seed: int) -> None:
    ds = load_or_generate(size, 42)
    shards = {"before": MemstoreServer(ds, code=before), "now": MemstoreServer(ds)}
    try:
        for name, ms in shards.items():
            ms.start()
            loaded = ms.load()
            click.echo(f"{name}: loaded {size:,}, {loaded['bytes_per_profile']:.1f} bytes a profile")
        rng = random.Random(seed)
        times: dict[tuple[str, str], list[float]] = {
            (name, call): [] for name in shards for call in ("Get", "BatchGet", "Count")}
        for round_ in range(rounds):
            ids = [profile_id(rng.randrange(size)) for _ in range(gets)]
            keys = [profile_id(rng.randrange(size)) for _ in range(batch)]
            order = list(shards.items())
            for name, ms in order if round_ % 2 == 0 else order[::-1]:
                client = ms.client
                for pid in ids:
                    t = time.perf_counter()
                    client.get(pid)
                    times[name, "Get"].append(time.perf_counter() - t)
                for _ in range(5):
                    t = time.perf_counter()
                    client.batch_get(keys)
                    times[name, "BatchGet"].append(time.perf_counter() - t)
                for query in COUNTS:
                    t = time.perf_counter()
                    client.count(query)
                    times[name, "Count"].append(time.perf_counter() - t)
        for call in ("Get", "BatchGet", "Count"):
            (old, old_p99), (new, new_p99) = (_summary(times[name, call]) for name in shards)
            click.echo(f"{call}: before median {old:.3f} ms p99 {old_p99:.3f}, now median "
                       f"{new:.3f} ms p99 {new_p99:.3f} (n={len(times['now', call])}); "
                       f"now ÷ before {new / old:.3f}")
    finally:
        for ms in shards.values():
            ms.stop()


if __name__ == "__main__":
    main()
