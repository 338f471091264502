"""`python -m bench.grpc_floor`: the cost of one gRPC call in Python, answering nothing.

One job: measure the floor under any count through the router -- a unary Count from
grpcio's blocking client (as `memstore.Client` makes it) to a grpc.aio server on uvloop
(as the router serves it) in a process of its own, on loopback, whose handler returns a
constant -- so a benchmark can say which of its queries another system answers faster
than a gRPC round trip can be made at all, in the same run.

`Floor` starts the server (`python -m bench.grpc_floor serve`, which prints its port) and
makes calls; the command prints the median and p99 of `--calls` calls.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from types import TracebackType
from typing import Self

import click
import grpc

from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc as rpc


class _Constant(rpc.MemstoreServicer):
    async def Count(self, request: pb.QueryRequest, context: object) -> pb.CountResponse:
        return pb.CountResponse(count=0)


async def _serve() -> None:
    server = grpc.aio.server()
    rpc.add_MemstoreServicer_to_server(_Constant(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


class Floor:
    """A constant Count server in a process of its own, and a blocking stub to it."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.grpc_floor", "serve"],
                                      stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        port = int(self._proc.stdout.readline())
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._stub = rpc.MemstoreStub(self._channel)  # type: ignore[no-untyped-call]
        self._request = pb.QueryRequest()
        for _ in range(100):  # the channel connected and warm
            self.call()

    def call(self) -> int:
        return int(self._stub.Count(self._request).count)

    def close(self) -> None:
        self._channel.close()
        self._proc.kill()
        self._proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@click.group(invoke_without_command=True)
@click.option("--calls", type=int, default=5_000, show_default=True)
@click.pass_context
def main(ctx: click.Context, calls: int) -> None:
    """Median and p99 of a gRPC call to a server that answers a constant."""
    if ctx.invoked_subcommand is not None:
        return
    with Floor() as floor:
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            floor.call()
            times.append(time.perf_counter() - t)
    times.sort()
    click.echo(f"gRPC round trip, constant answer, {calls:,} calls: median "
               f"{statistics.median(times) * 1e3:.3f} ms, p99 "
               f"{times[int(len(times) * 0.99)] * 1e3:.3f} ms")


@main.command()
def serve() -> None:
    """Serve the constant Count on a loopback port; print the port."""
    import uvloop

    uvloop.run(_serve())


if __name__ == "__main__":
    main()
