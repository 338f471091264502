from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FetchSnapshotRequest(_message.Message):
    __slots__ = ("replica", "salt")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    replica: str
    salt: str
    def __init__(self, replica: _Optional[str] = ..., salt: _Optional[str] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("lsn", "history", "size", "shard", "data")
    LSN_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    lsn: int
    history: str
    size: int
    shard: str
    data: bytes
    def __init__(self, lsn: _Optional[int] = ..., history: _Optional[str] = ..., size: _Optional[int] = ..., shard: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class FollowRequest(_message.Message):
    __slots__ = ("replica", "history", "from_lsn", "address", "acked_lsn", "salt")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    FROM_LSN_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ACKED_LSN_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    replica: str
    history: str
    from_lsn: int
    address: str
    acked_lsn: int
    salt: str
    def __init__(self, replica: _Optional[str] = ..., history: _Optional[str] = ..., from_lsn: _Optional[int] = ..., address: _Optional[str] = ..., acked_lsn: _Optional[int] = ..., salt: _Optional[str] = ...) -> None: ...

class LogRecord(_message.Message):
    __slots__ = ("lsn", "type", "payload")
    LSN_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    lsn: int
    type: int
    payload: bytes
    def __init__(self, lsn: _Optional[int] = ..., type: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class FollowResponse(_message.Message):
    __slots__ = ("records", "primary_lsn", "primary_time_us", "epoch", "history")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_LSN_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_TIME_US_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[LogRecord]
    primary_lsn: int
    primary_time_us: int
    epoch: int
    history: str
    def __init__(self, records: _Optional[_Iterable[_Union[LogRecord, _Mapping]]] = ..., primary_lsn: _Optional[int] = ..., primary_time_us: _Optional[int] = ..., epoch: _Optional[int] = ..., history: _Optional[str] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("shard", "epoch")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    shard: str
    epoch: int
    def __init__(self, shard: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class PromoteResponse(_message.Message):
    __slots__ = ("shard", "epoch", "lsn", "history")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LSN_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    shard: str
    epoch: int
    lsn: int
    history: str
    def __init__(self, shard: _Optional[str] = ..., epoch: _Optional[int] = ..., lsn: _Optional[int] = ..., history: _Optional[str] = ...) -> None: ...

class DemoteRequest(_message.Message):
    __slots__ = ("primary", "epoch")
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    primary: str
    epoch: int
    def __init__(self, primary: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class DemoteResponse(_message.Message):
    __slots__ = ("lsn",)
    LSN_FIELD_NUMBER: _ClassVar[int]
    lsn: int
    def __init__(self, lsn: _Optional[int] = ...) -> None: ...

class FreezeRequest(_message.Message):
    __slots__ = ("frozen",)
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    frozen: bool
    def __init__(self, frozen: _Optional[bool] = ...) -> None: ...

class FreezeResponse(_message.Message):
    __slots__ = ("lsn",)
    LSN_FIELD_NUMBER: _ClassVar[int]
    lsn: int
    def __init__(self, lsn: _Optional[int] = ...) -> None: ...
