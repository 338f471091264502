"""`python -m bench.security`: what TLS and token checks cost a Get and a Count.

One job: start four shard processes on the same generated profiles, one per setting
(plaintext; TLS; a token checked against an auth file; TLS and a token, the secured
default), and time sequential Gets of random ids and Counts of one segment query against
each, interleaved round by round so that the machine's drift falls on all four alike. It
prints median and p99 per setting and its ratio to plaintext in the same run. The link is
off on all four (it is off wherever TLS or tokens are), so the ratios isolate TLS and the
token check.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from bench.datagen import iter_records, load_or_generate, profile_id, schema_declaration
from bench.timing import summarize
from memstore import Client
from memstore.server.logs import listening_address

QUERY = 'country = "US" AND age BETWEEN 25 AND 34'
TOKEN = "bench-token-0123456789abcdefghij"


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 (the test suite's helper, cryptography)."""
    from tests.pki import make_pki

    pki = make_pki(directory)
    return pki.ca, pki.server_cert, pki.server_key


def _start(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "memstore.cli", "serve-shard", "--port", "0",
                             "--in-memory", "--no-link", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        address = listening_address(line)
        if address:
            return proc, address
    raise RuntimeError(f"shard did not start: {args}")


@click.command()
@click.option("--size", default=100_000, show_default=True, help="Profiles loaded in each.")
@click.option("--gets", default=2000, show_default=True, help="Gets per setting per round.")
@click.option("--counts", default=200, show_default=True, help="Counts per setting per round.")
@click.option("--rounds", default=3, show_default=True, help="Rounds, interleaving settings.")
def main(size: int, gets: int, counts: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ca, cert, key = _certificates(Path(tmp) / "pki")
        tokens = Path(tmp) / "tokens"
        tokens.write_text(f"{TOKEN} admin bench\n")
        tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
        settings: dict[str, tuple[list[str], dict[str, Any]]] = {
            "plaintext": ([], {}),
            "tls": (tls, {"tls_ca": str(ca)}),
            "token": (["--auth-file", str(tokens)], {"token": TOKEN}),
            "tls+token": ([*tls, "--auth-file", str(tokens)], {"tls_ca": str(ca),
                                                                "token": TOKEN}),
        }
        data = load_or_generate(size)
        procs, clients = [], {}
        try:
            for name, (args, options) in settings.items():
                proc, address = _start(args)
                procs.append(proc)
                c = Client(address, timeout=60, **options)
                c.declare(schema_declaration())
                c.load(iter_records(data))
                clients[name] = c
            rng = random.Random(7)
            samples: dict[str, dict[str, list[float]]] = {
                n: {"get": [], "count": []} for n in settings}
            for _ in range(rounds):
                for name, c in clients.items():
                    for pid in (profile_id(rng.randrange(size)) for _ in range(gets)):
                        started = time.perf_counter()
                        c.get(pid)
                        samples[name]["get"].append(time.perf_counter() - started)
                    for _ in range(counts):
                        started = time.perf_counter()
                        c.count(QUERY)
                        samples[name]["count"].append(time.perf_counter() - started)
            report(samples, size)
        finally:
            for c in clients.values():
                c.close()
            for proc in procs:
                proc.terminate()
                proc.wait(30)


def report(samples: dict[str, dict[str, list[float]]], size: int) -> None:
    print(f"{size:,} profiles a shard; Get of a random id, Count of {QUERY!r}")
    print(f"{'setting':<11} {'op':<6} {'median ms':>10} {'p99 ms':>8} {'median ÷ plain':>15} "
          f"{'p99 ÷ plain':>12}")
    base = {op: summarize(samples["plaintext"][op]) for op in ("get", "count")}
    for name, ops in samples.items():
        for op, values in ops.items():
            s = summarize(values)
            print(f"{name:<11} {op:<6} {s['median_ms']:>10.3f} {s['p99_ms']:>8.3f} "
                  f"{s['median_ms'] / base[op]['median_ms']:>15.2f} "
                  f"{s['p99_ms'] / base[op]['p99_ms']:>12.2f}")


if __name__ == "__main__":
    main()
