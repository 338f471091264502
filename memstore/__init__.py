"""memstore: an in-memory real-time customer profile store and segment query server.

Public names: the clients and their result types. Everything else is internal.
"""

from memstore.client import AsyncClient, Client, ClientError, LinkResult, UpsertResult

__all__ = ["AsyncClient", "Client", "ClientError", "LinkResult", "UpsertResult"]
