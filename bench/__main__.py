"""`python -m bench`: run the benchmark suite and write results.json, report.md and plots."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bench.report import markdown, plots
from bench.run import CrossCheckError, Options, run, write_json
from memstore.client.core import LOAD_CHUNK


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


@click.command()
@click.option("--size", type=int, default=1_000_000, show_default=True,
              help="Profiles to generate (cached in bench/data by size and seed).")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Results folder [default: bench/results/<size>].")
@click.option("--peers", default="duckdb,numpy,redis", show_default=True,
              help="Comma-separated peers (numpy always runs: it is the reference).")
@click.option("--memstore", type=click.Choice(["auto", "yes", "no"]), default="auto",
              show_default=True, help="auto: benchmark memstore if it imports and starts.")
@click.option("--query-budget", type=float, default=1.0, show_default=True,
              help="Seconds of repetitions per query per system.")
@click.option("--duration", type=float, default=2.0, show_default=True,
              help="Seconds per concurrency level and for the mixed workload.")
@click.option("--concurrency", default="1,4,16", show_default=True,
              help="Client threads for Get and BatchGet.")
@click.option("--client-processes", default="2,4", show_default=True,
              help="Client processes for BatchGet (a process's own decoding binds it).")
@click.option("--workloads", default="queries,lookups,ingest,mixed,memory,recovery,snapshot",
              show_default=True)
@click.option("--load-batch", type=int, default=LOAD_CHUNK, show_default=True,
              help="Profiles per BatchUpsert in memstore's bulk load (Client.load chunk_size).")
@click.option("--no-plots", is_flag=True)
def main(size: int, seed: int, out: Path | None, peers: str, memstore: str,
         query_budget: float, duration: float, concurrency: str, client_processes: str,
         workloads: str, load_batch: int, no_plots: bool) -> None:
    """Benchmark memstore against DuckDB, Redis+RediSearch and a numpy scan.

    Every query's count is checked equal across all systems before any time is reported;
    a mismatch exits with status 2.
    """
    out = out or Path("bench/results") / str(size)
    opt = Options(size=size, seed=seed, out=out, peers=tuple(p for p in peers.split(",") if p),
                  memstore=memstore, query_budget_s=query_budget, duration_s=duration,
                  concurrency=_ints(concurrency),
                  client_processes=_ints(client_processes), workloads=tuple(workloads.split(",")),
                  load_batch=load_batch, plots=not no_plots)
    try:
        res = run(opt)
    except CrossCheckError as e:
        click.echo(f"\nCROSS-CHECK FAILED, no timings reported.\n{e}", err=True)
        sys.exit(2)
    (out / "report.md").write_text(markdown(res))
    if opt.plots:
        plots(res, out)
    write_json(res, out / "results.json")
    click.echo(f"results in {out}: results.json, report.md"
               + ("" if no_plots else ", *.png"), err=True)
    if res.get("errors"):
        click.echo(f"some workloads failed: {', '.join(res['errors'])}", err=True)


if __name__ == "__main__":
    main()
