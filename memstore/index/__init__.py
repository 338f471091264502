"""In-memory structures over a shard's dense ids.

    bitmap_index   roaring-bitmap indexes: a bitmap per value, bit-sliced ranges
    inttable       a compact uint64 -> uint32 hash table (identifier keys -> dense ids)
    claims         this shard's part of the cluster's identifier directory
"""
