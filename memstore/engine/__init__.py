"""One shard's data: profiles in memory, their schema, and the plans that change them.

    core       the Engine: state, planning (requests -> Changes) and applying Changes
    schema     attribute kinds, declarations and merge rules
    values     profile values between the API and the stored form
    columnar   the columnar bulk-load format (BatchUpsertRequest.columns)
    rowpack    a bulk load's profile blobs, built a column at a time
    exported   profiles moved between shards (ImportProfiles, Absorb), checked on arrival

The engine never touches disk or the network: memstore.shard logs what it plans, and
memstore.server translates between protobuf and the engine.
"""
