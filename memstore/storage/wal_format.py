"""On-disk format of the shard log: constants and layouts only.

The writer (wal_writer) and the reader (wal_reader) import this module and share nothing
else. docs/log-format.md is the full spec with worked file names; in short:

A shard's log is one logical byte stream of frames, split over segment files in
DATA_DIR/log/. A position in that stream is an LSN (log sequence number): the count of
frame bytes (headers of segments excluded) before that position since the log began. A
segment file is named by the LSN of its first frame, 20 zero-padded decimal digits plus
".log" (SEGMENT_NAME), and begins with a header:

    segment header (SEGMENT_HEADER_SIZE = 20 bytes, little-endian)
      magic     6 bytes  SEGMENT_MAGIC = b"MSLOG\\x00"
      version   u16      FORMAT_VERSION
      base_lsn  u64      LSN of the first frame; must equal the number in the file name
      crc       u32      zlib.crc32 of the 16 bytes above

then frames, back to back, with no padding. The frame at file offset `o` starts at
LSN base_lsn + o - SEGMENT_HEADER_SIZE, so the next segment's base_lsn is this segment's
base_lsn + file size - SEGMENT_HEADER_SIZE (segments are contiguous):

    frame (FRAME_HEADER_SIZE = 9 bytes of header, then the payload)
      length    u32      payload length, at most MAX_PAYLOAD
      crc       u32      zlib.crc32 of (type byte + payload)
      type      u8       a RECORD_* number
      payload   `length` bytes, opaque to the log (the engine writes msgpack)

A record's LSN range is [lsn_start, lsn_end) where lsn_end = lsn_start + 9 + length.

Numbers on disk never change meaning. A new layout gets a new FORMAT_VERSION (readers
refuse versions they do not know); a new kind of record gets a new RECORD_* number.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Final

# ---------------------------------------------------------------- segment files
SEGMENT_MAGIC: Final = b"MSLOG\x00"
FORMAT_VERSION: Final = 1
SEGMENT_HEADER: Final = struct.Struct("<6sHQ")  # magic, version, base_lsn; then u32 crc
SEGMENT_CRC: Final = struct.Struct("<I")
SEGMENT_HEADER_SIZE: Final = SEGMENT_HEADER.size + SEGMENT_CRC.size  # 20

SEGMENT_NAME: Final = "{base_lsn:020d}.log"  # SEGMENT_NAME.format(base_lsn=67108864)
SEGMENT_NAME_RE: Final = re.compile(r"^([0-9]{20})\.log$")  # group 1: base_lsn

# ---------------------------------------------------------------- frames
FRAME_HEADER: Final = struct.Struct("<IIB")  # length, crc, type
FRAME_HEADER_SIZE: Final = FRAME_HEADER.size  # 9
# A length above this is garbage, not a record: damage, never a huge allocation.
MAX_PAYLOAD: Final = 64 << 20

# ---------------------------------------------------------------- record types
RECORD_PROFILES: Final = 1  # after-images of profiles
RECORD_SCHEMA: Final = 2  # attribute declarations
RECORD_SHARD_META: Final = 3  # epoch and owned hash slots
RECORD_MERGE: Final = 4  # after-images plus cross-shard merge notes, applied as one change
# One change as a whole (what writers write since created and changed times, saved
# segments and change streams): its time, declarations, after-images, notes, times, what
# changed in each updated profile, and the saved segments' membership deltas. Types 1, 2
# and 4 are still read (older logs).
RECORD_CHANGE: Final = 5
# A RECORD_CHANGE of many images (a load, a batch of tracks, a big batch of upserts) with
# its images logged as columns: dense ids, primary ids, blob lengths, the blobs joined.
# Recovery copies a load's or a batch of tracks' blobs into memory as they lie in the
# record, with no object a blob.
RECORD_COLUMNS: Final = 6
CHANGE_RECORDS: Final = frozenset({RECORD_CHANGE, RECORD_COLUMNS})  # read alike
RECORD_TYPES: Final = frozenset({RECORD_PROFILES, RECORD_SCHEMA, RECORD_SHARD_META,
                                 RECORD_MERGE, RECORD_CHANGE, RECORD_COLUMNS})


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(base LSN, path) of every segment file in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = SEGMENT_NAME_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)
