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
    __slots__ = ("name", "address", "epoch", "slots", "profiles", "healthy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    epoch: int
    slots: _containers.RepeatedCompositeFieldContainer[SlotRange]
    profiles: int
    healthy: bool
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., epoch: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[SlotRange, _Mapping]]] = ..., profiles: _Optional[int] = ..., healthy: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("slots", "after_lsn", "fingerprints")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    AFTER_LSN_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[SlotRange]
    after_lsn: int
    fingerprints: bool
    def __init__(self, slots: _Optional[_Iterable[_Union[SlotRange, _Mapping]]] = ..., after_lsn: _Optional[int] = ..., fingerprints: _Optional[bool] = ...) -> None: ...

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
