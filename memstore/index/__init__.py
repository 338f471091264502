"""In-memory structures over a shard's dense ids.

    bitmap_index   roaring-bitmap indexes: a bitmap per value, bit-sliced ranges
    day_index      who did an event on each day, and how often: did(...) windows
    dense          roaring bitmaps to and from numpy arrays, in bulk
    inttable       a compact uint64 -> uint32 hash table (identifier keys -> dense ids)
    pidtable       primary ids by dense id and back, in one buffer and an inttable
    claims         this shard's part of the cluster's identifier directory
"""
