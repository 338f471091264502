from memstore.v1 import memstore_pb2 as _memstore_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SlotRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("name", "address", "epoch", "slots", "profiles", "healthy", "held", "claims", "link_port", "link_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    LINK_PORT_FIELD_NUMBER: _ClassVar[int]
    LINK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    epoch: int
    slots: _containers.RepeatedCompositeFieldContainer[SlotRange]
    profiles: int
    healthy: bool
    held: _containers.RepeatedCompositeFieldContainer[HeldProfile]
    claims: int
    link_port: int
    link_token: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., epoch: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[SlotRange, _Mapping]]] = ..., profiles: _Optional[int] = ..., healthy: _Optional[bool] = ..., held: _Optional[_Iterable[_Union[HeldProfile, _Mapping]]] = ..., claims: _Optional[int] = ..., link_port: _Optional[int] = ..., link_token: _Optional[str] = ...) -> None: ...

class HeldProfile(_message.Message):
    __slots__ = ("txn", "loser", "survivor", "age_seconds")
    TXN_FIELD_NUMBER: _ClassVar[int]
    LOSER_FIELD_NUMBER: _ClassVar[int]
    SURVIVOR_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    txn: str
    loser: str
    survivor: str
    age_seconds: float
    def __init__(self, txn: _Optional[str] = ..., loser: _Optional[str] = ..., survivor: _Optional[str] = ..., age_seconds: _Optional[float] = ...) -> None: ...

class HoldRequest(_message.Message):
    __slots__ = ("txn", "loser", "survivor")
    TXN_FIELD_NUMBER: _ClassVar[int]
    LOSER_FIELD_NUMBER: _ClassVar[int]
    SURVIVOR_FIELD_NUMBER: _ClassVar[int]
    txn: str
    loser: str
    survivor: str
    def __init__(self, txn: _Optional[str] = ..., loser: _Optional[str] = ..., survivor: _Optional[str] = ...) -> None: ...

class HoldResponse(_message.Message):
    __slots__ = ("packed",)
    PACKED_FIELD_NUMBER: _ClassVar[int]
    packed: bytes
    def __init__(self, packed: _Optional[bytes] = ...) -> None: ...

class AbsorbRequest(_message.Message):
    __slots__ = ("txn", "losers", "upsert", "link", "record")
    TXN_FIELD_NUMBER: _ClassVar[int]
    LOSERS_FIELD_NUMBER: _ClassVar[int]
    UPSERT_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    txn: str
    losers: _containers.RepeatedScalarFieldContainer[bytes]
    upsert: _memstore_pb2.UpsertRequest
    link: _memstore_pb2.LinkRequest
    record: _memstore_pb2.BatchUpsertRequest
    def __init__(self, txn: _Optional[str] = ..., losers: _Optional[_Iterable[bytes]] = ..., upsert: _Optional[_Union[_memstore_pb2.UpsertRequest, _Mapping]] = ..., link: _Optional[_Union[_memstore_pb2.LinkRequest, _Mapping]] = ..., record: _Optional[_Union[_memstore_pb2.BatchUpsertRequest, _Mapping]] = ...) -> None: ...

class AbsorbResponse(_message.Message):
    __slots__ = ("upsert", "link")
    UPSERT_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    upsert: _memstore_pb2.UpsertResponse
    link: _memstore_pb2.LinkResponse
    def __init__(self, upsert: _Optional[_Union[_memstore_pb2.UpsertResponse, _Mapping]] = ..., link: _Optional[_Union[_memstore_pb2.LinkResponse, _Mapping]] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("txn", "survivor")
    TXN_FIELD_NUMBER: _ClassVar[int]
    SURVIVOR_FIELD_NUMBER: _ClassVar[int]
    txn: str
    survivor: str
    def __init__(self, txn: _Optional[str] = ..., survivor: _Optional[str] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("committed",)
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    committed: bool
    def __init__(self, committed: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("txn", "loser", "committed")
    TXN_FIELD_NUMBER: _ClassVar[int]
    LOSER_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    txn: str
    loser: str
    committed: bool
    def __init__(self, txn: _Optional[str] = ..., loser: _Optional[str] = ..., committed: _Optional[bool] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released", "durable")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    released: bool
    durable: bool
    def __init__(self, released: _Optional[bool] = ..., durable: _Optional[bool] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("ids", "txns", "reforward")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TXNS_FIELD_NUMBER: _ClassVar[int]
    REFORWARD_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    txns: _containers.RepeatedScalarFieldContainer[str]
    reforward: _containers.RepeatedCompositeFieldContainer[Reforward]
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., txns: _Optional[_Iterable[str]] = ..., reforward: _Optional[_Iterable[_Union[Reforward, _Mapping]]] = ...) -> None: ...

class Reforward(_message.Message):
    __slots__ = ("id", "to")
    ID_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    id: str
    to: str
    def __init__(self, id: _Optional[str] = ..., to: _Optional[str] = ..., **kwargs) -> None: ...

class ForgetResponse(_message.Message):
    __slots__ = ("forgotten", "log_position", "shard")
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    LOG_POSITION_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    forgotten: int
    log_position: int
    shard: str
    def __init__(self, forgotten: _Optional[int] = ..., log_position: _Optional[int] = ..., shard: _Optional[str] = ...) -> None: ...

class OwnersRequest(_message.Message):
    __slots__ = ("packed",)
    PACKED_FIELD_NUMBER: _ClassVar[int]
    packed: bytes
    def __init__(self, packed: _Optional[bytes] = ...) -> None: ...

class OwnersResponse(_message.Message):
    __slots__ = ("packed",)
    PACKED_FIELD_NUMBER: _ClassVar[int]
    packed: bytes
    def __init__(self, packed: _Optional[bytes] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ("packed",)
    PACKED_FIELD_NUMBER: _ClassVar[int]
    packed: bytes
    def __init__(self, packed: _Optional[bytes] = ...) -> None: ...

class ClaimResponse(_message.Message):
    __slots__ = ("packed", "log_position", "shard")
    PACKED_FIELD_NUMBER: _ClassVar[int]
    LOG_POSITION_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    packed: bytes
    log_position: int
    shard: str
    def __init__(self, packed: _Optional[bytes] = ..., log_position: _Optional[int] = ..., shard: _Optional[str] = ...) -> None: ...

class SuppressRequest(_message.Message):
    __slots__ = ("packed", "ids")
    PACKED_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    packed: bytes
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, packed: _Optional[bytes] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SuppressResponse(_message.Message):
    __slots__ = ("added", "log_position", "shard")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    LOG_POSITION_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    added: int
    log_position: int
    shard: str
    def __init__(self, added: _Optional[int] = ..., log_position: _Optional[int] = ..., shard: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("attributes",)
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    attributes: _containers.RepeatedCompositeFieldContainer[_memstore_pb2.AttributeSpec]
    def __init__(self, attributes: _Optional[_Iterable[_Union[_memstore_pb2.AttributeSpec, _Mapping]]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("attributes",)
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    attributes: _containers.RepeatedCompositeFieldContainer[_memstore_pb2.AttributeSpec]
    def __init__(self, attributes: _Optional[_Iterable[_Union[_memstore_pb2.AttributeSpec, _Mapping]]] = ...) -> None: ...

class ShardInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetSlotsRequest(_message.Message):
    __slots__ = ("epoch", "slots")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    slots: _containers.RepeatedCompositeFieldContainer[SlotRange]
    def __init__(self, epoch: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[SlotRange, _Mapping]]] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("slots", "after_lsn", "fingerprints", "identifiers")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    AFTER_LSN_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[SlotRange]
    after_lsn: int
    fingerprints: bool
    identifiers: bool
    def __init__(self, slots: _Optional[_Iterable[_Union[SlotRange, _Mapping]]] = ..., after_lsn: _Optional[int] = ..., fingerprints: _Optional[bool] = ..., identifiers: _Optional[bool] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("packed", "lsn")
    PACKED_FIELD_NUMBER: _ClassVar[int]
    LSN_FIELD_NUMBER: _ClassVar[int]
    packed: bytes
    lsn: int
    def __init__(self, packed: _Optional[bytes] = ..., lsn: _Optional[int] = ...) -> None: ...

class ImportRequest(_message.Message):
    __slots__ = ("packed",)
    PACKED_FIELD_NUMBER: _ClassVar[int]
    packed: bytes
    def __init__(self, packed: _Optional[bytes] = ...) -> None: ...

class ImportResponse(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: int
    def __init__(self, applied: _Optional[int] = ...) -> None: ...

class DropSlotsRequest(_message.Message):
    __slots__ = ("slots", "epoch")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[SlotRange]
    epoch: int
    def __init__(self, slots: _Optional[_Iterable[_Union[SlotRange, _Mapping]]] = ..., epoch: _Optional[int] = ...) -> None: ...

class DropSlotsResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    def __init__(self, dropped: _Optional[int] = ...) -> None: ...
