"""memstore: an in-memory real-time customer profile store and segment query server.

Public names: the clients and their result types. Everything else is internal.
"""

import os

# gRPC's own fork handlers (on by default in some grpcio builds, "a mixed state that causes
# problems" say its maintainers) abort a child forked while calls are in flight; memstore
# forks only to write snapshots, in a child that never touches gRPC. Must be set before
# gRPC initialises, hence here. An explicit setting in the environment wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from memstore.client.core import (
    AsyncClient,
    Client,
    ClientError,
    LinkResult,
    LoadError,
    UpsertResult,
)

__all__ = ["AsyncClient", "Client", "ClientError", "LinkResult", "LoadError", "UpsertResult"]
