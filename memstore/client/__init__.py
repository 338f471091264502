"""The Python clients and what they need.

    core       Client (blocking) and AsyncClient (asyncio): the same methods, one definition
    loader     reading JSON Lines, CSV and Parquet files to load, with positions
    replicas   read_from="replica": which replica of a shard a client reads from
"""

from memstore.client.core import (
    DEFAULT_ADDRESS,
    LOAD_CHUNK,
    LOAD_CONCURRENCY,
    AsyncClient,
    Client,
    ClientError,
    ClientMethods,
    LinkResult,
    LoadError,
    UpsertResult,
    pack_records,
)

__all__ = ["DEFAULT_ADDRESS", "LOAD_CHUNK", "LOAD_CONCURRENCY", "AsyncClient", "Client",
           "ClientError", "ClientMethods", "LinkResult", "LoadError", "UpsertResult",
           "pack_records"]
