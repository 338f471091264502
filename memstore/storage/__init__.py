"""What a shard keeps on disk, and how it stays consistent there.

    wal_format     the log's record types and header layouts, nothing else (the spec:
                   docs/log-format.md)
    wal_writer     appending to the log, with group commit and the sync policies
    wal_reader     replaying, checking and repairing the log
    snapshot_file  checksummed snapshot files, written atomically, and the CURRENT pointer
    forked         writing a snapshot from a forked child (Redis's BGSAVE shape)
    fsutil         fsync of files and directories
    dirlock        one process per data directory (DATA_DIR/LOCK)
    datadir        what kind of data directory a path is (a shard's, a cluster's)

Nothing here knows what a profile is: payloads are bytes the engine encodes.
"""
