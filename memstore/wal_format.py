"""On-disk format of the shard log. Only constants and layouts: the writer and the reader
import this module and share nothing else. The full spec, with worked file names, is
docs/log-format.md; in short:

A shard's log is a logical byte stream of frames, split over segment files in
DATA_DIR/log/. A position in that stream is an LSN. Each segment file is named by the LSN
of its first frame, 20 zero-padded decimal digits plus ".log", and begins with a header:

    segment header (20 bytes, little-endian)
      magic     6 bytes  b"MSLOG\\x00"
      version   u16      FORMAT_VERSION
      base_lsn  u64      LSN of the first frame (must equal the file name)
      crc       u32      zlib.crc32 of the 16 bytes above

then frames, back to back; the frame at file offset o has LSN base_lsn + o - 20:

    frame
      length    u32      payload length, at most MAX_PAYLOAD
      crc       u32      zlib.crc32 of (type byte + payload)
      type      u8       a RECORD_* number
      payload   length bytes (msgpack, opaque to the log)

Numbers on disk never change meaning; a new layout gets a new FORMAT_VERSION.
"""

from __future__ import annotations

import struct

SEGMENT_MAGIC = b"MSLOG\x00"
FORMAT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<6sHQ")  # magic, version, base_lsn; then u32 crc
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size + 4  # 20
FRAME_HEADER = struct.Struct("<IIB")  # length, crc, type
FRAME_HEADER_SIZE = FRAME_HEADER.size  # 9
MAX_PAYLOAD = 1 << 30
SEGMENT_SUFFIX = ".log"

# Record types. Payloads are msgpack; the engine defines their contents.
RECORD_PROFILES = 1  # [[dense id, primary id, blob or nil], ...] after-images
RECORD_SCHEMA = 2  # [[attribute id, name, kind, indexed, merge], ...] declarations
RECORD_SHARD_META = 3  # [epoch, owned slots as a portable roaring bitmap or nil]
RECORD_TYPES = frozenset({RECORD_PROFILES, RECORD_SCHEMA, RECORD_SHARD_META})


def segment_name(base_lsn: int) -> str:
    return f"{base_lsn:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    stem = name[: -len(SEGMENT_SUFFIX)] if name.endswith(SEGMENT_SUFFIX) else ""
    return int(stem) if len(stem) == 20 and stem.isdigit() else None
