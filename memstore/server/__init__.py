"""The network face of a shard, and what every serving process shares.

    service    the gRPC services of one shard (Memstore, ShardControl), and serving it
    guard      the last interceptor: malformed requests INVALID_ARGUMENT, bugs INTERNAL
    link       the link: a light framed protocol for unary calls beside gRPC
    security   TLS, tokens and roles, and the credentials a process presents to others
    audit      audit lines for deletes, declarations and cluster changes
    metrics    Prometheus metrics
    heap       giving a bulk load's freed memory back to the operating system
"""
