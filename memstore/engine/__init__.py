"""One shard's data: profiles in memory, their schema, and the plans that change them.

    core       the Engine: state, reading and planning entry points
    applying   applying Changes and undoing them: the one way the state changes
    change     Change, Image, Note, Undo: what planning produces and applying consumes
    blob       a profile's encoded form (msgpack) and its identifiers' directory keys
    identity   identity rules: valid ids and identifiers, merge protection
    planner    the general write planner: drafts, operations, links and merges
    bulk       the bulk-load planner: columnar batches checked and encoded per column
    merging    a shard's steps of a cross-shard merge (protocol: shards/merge.py)
    rights     erasure, the suppression list, anonymous-profile expiry
    indexing   attribute indexes and the identifier directory kept in step with blobs
    segments   saved segments: definitions and members kept current on every write
    tracking   events: Track batches, day records and their expiry
    days       a day record's encoding: (day, count) pairs of one event
    eventpack  the packed wire form of event batches (TrackBatchRequest.packed)
    schema     attribute kinds, declarations and merge rules
    values     profile values between the API and the stored form
    columnar   the columnar bulk-load format (BatchUpsertRequest.columns)
    rowpack    a bulk load's profile blobs, built a column at a time
    exported   profiles moved between shards (ImportProfiles, Absorb), checked on arrival

The engine never touches disk or the network: memstore.shard logs what it plans, and
memstore.server translates between protobuf and the engine.
"""
