import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    STRING: _ClassVar[Kind]
    INT: _ClassVar[Kind]
    FLOAT: _ClassVar[Kind]
    BOOL: _ClassVar[Kind]
    TIMESTAMP: _ClassVar[Kind]
    STRING_LIST: _ClassVar[Kind]
    EVENT_DAYS: _ClassVar[Kind]
KIND_UNSPECIFIED: Kind
STRING: Kind
INT: Kind
FLOAT: Kind
BOOL: Kind
TIMESTAMP: Kind
STRING_LIST: Kind
EVENT_DAYS: Kind

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("string_value", "int_value", "float_value", "bool_value", "timestamp_value", "list_value")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_VALUE_FIELD_NUMBER: _ClassVar[int]
    LIST_VALUE_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    int_value: int
    float_value: float
    bool_value: bool
    timestamp_value: _timestamp_pb2.Timestamp
    list_value: StringList
    def __init__(self, string_value: _Optional[str] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., bool_value: _Optional[bool] = ..., timestamp_value: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., list_value: _Optional[_Union[StringList, _Mapping]] = ...) -> None: ...

class Identifier(_message.Message):
    __slots__ = ("kind", "value")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    value: str
    def __init__(self, kind: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("op", "attribute", "value")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OP_UNSPECIFIED: _ClassVar[Operation.Op]
        SET: _ClassVar[Operation.Op]
        SET_ONCE: _ClassVar[Operation.Op]
        UNSET: _ClassVar[Operation.Op]
        INCREMENT: _ClassVar[Operation.Op]
        ADD_TO_SET: _ClassVar[Operation.Op]
        REMOVE_FROM_SET: _ClassVar[Operation.Op]
    OP_UNSPECIFIED: Operation.Op
    SET: Operation.Op
    SET_ONCE: Operation.Op
    UNSET: Operation.Op
    INCREMENT: Operation.Op
    ADD_TO_SET: Operation.Op
    REMOVE_FROM_SET: Operation.Op
    OP_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    op: Operation.Op
    attribute: str
    value: Value
    def __init__(self, op: _Optional[_Union[Operation.Op, str]] = ..., attribute: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("id", "operations", "identifiers", "expected_version")
    ID_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    operations: _containers.RepeatedCompositeFieldContainer[Operation]
    identifiers: _containers.RepeatedCompositeFieldContainer[Identifier]
    expected_version: int
    def __init__(self, id: _Optional[str] = ..., operations: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ..., identifiers: _Optional[_Iterable[_Union[Identifier, _Mapping]]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("id", "version", "created")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    created: bool
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class BatchUpsertRequest(_message.Message):
    __slots__ = ("requests", "packed", "columns", "validate_only")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[UpsertRequest]
    packed: bytes
    columns: bytes
    validate_only: bool
    def __init__(self, requests: _Optional[_Iterable[_Union[UpsertRequest, _Mapping]]] = ..., packed: _Optional[bytes] = ..., columns: _Optional[bytes] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class BatchUpsertResponse(_message.Message):
    __slots__ = ("applied", "created")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    applied: int
    created: int
    def __init__(self, applied: _Optional[int] = ..., created: _Optional[int] = ...) -> None: ...

class ProfileKey(_message.Message):
    __slots__ = ("id", "identifier")
    ID_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    id: str
    identifier: Identifier
    def __init__(self, id: _Optional[str] = ..., identifier: _Optional[_Union[Identifier, _Mapping]] = ...) -> None: ...

class Profile(_message.Message):
    __slots__ = ("id", "version", "attributes", "identifiers", "merged_ids", "slot", "packed_attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    MERGED_IDS_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PACKED_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    attributes: _containers.MessageMap[str, Value]
    identifiers: _containers.RepeatedCompositeFieldContainer[Identifier]
    merged_ids: _containers.RepeatedScalarFieldContainer[str]
    slot: int
    packed_attributes: bytes
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., attributes: _Optional[_Mapping[str, Value]] = ..., identifiers: _Optional[_Iterable[_Union[Identifier, _Mapping]]] = ..., merged_ids: _Optional[_Iterable[str]] = ..., slot: _Optional[int] = ..., packed_attributes: _Optional[bytes] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "attributes", "packed")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    key: ProfileKey
    attributes: _containers.RepeatedScalarFieldContainer[str]
    packed: bool
    def __init__(self, key: _Optional[_Union[ProfileKey, _Mapping]] = ..., attributes: _Optional[_Iterable[str]] = ..., packed: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("profile",)
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    profile: Profile
    def __init__(self, profile: _Optional[_Union[Profile, _Mapping]] = ...) -> None: ...

class BatchGetRequest(_message.Message):
    __slots__ = ("keys", "attributes", "packed", "ids")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ProfileKey]
    attributes: _containers.RepeatedScalarFieldContainer[str]
    packed: bool
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[_Union[ProfileKey, _Mapping]]] = ..., attributes: _Optional[_Iterable[str]] = ..., packed: _Optional[bool] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetResult(_message.Message):
    __slots__ = ("found", "profile")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    found: bool
    profile: Profile
    def __init__(self, found: _Optional[bool] = ..., profile: _Optional[_Union[Profile, _Mapping]] = ...) -> None: ...

class BatchGetResponse(_message.Message):
    __slots__ = ("results", "packed")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GetResult]
    packed: bytes
    def __init__(self, results: _Optional[_Iterable[_Union[GetResult, _Mapping]]] = ..., packed: _Optional[bytes] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "suppress")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SUPPRESS_FIELD_NUMBER: _ClassVar[int]
    key: ProfileKey
    suppress: bool
    def __init__(self, key: _Optional[_Union[ProfileKey, _Mapping]] = ..., suppress: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "id", "merged_ids", "identifiers", "receipt", "erased_at", "log_position", "shard_positions", "suppressed", "hashed_ids")
    class ShardPositionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DELETED_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    MERGED_IDS_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    ERASED_AT_FIELD_NUMBER: _ClassVar[int]
    LOG_POSITION_FIELD_NUMBER: _ClassVar[int]
    SHARD_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    HASHED_IDS_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    id: str
    merged_ids: _containers.RepeatedScalarFieldContainer[str]
    identifiers: _containers.RepeatedCompositeFieldContainer[Identifier]
    receipt: str
    erased_at: _timestamp_pb2.Timestamp
    log_position: int
    shard_positions: _containers.ScalarMap[str, int]
    suppressed: bool
    hashed_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[bool] = ..., id: _Optional[str] = ..., merged_ids: _Optional[_Iterable[str]] = ..., identifiers: _Optional[_Iterable[_Union[Identifier, _Mapping]]] = ..., receipt: _Optional[str] = ..., erased_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., log_position: _Optional[int] = ..., shard_positions: _Optional[_Mapping[str, int]] = ..., suppressed: _Optional[bool] = ..., hashed_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LinkRequest(_message.Message):
    __slots__ = ("id", "identifiers", "create")
    ID_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    CREATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    identifiers: _containers.RepeatedCompositeFieldContainer[Identifier]
    create: bool
    def __init__(self, id: _Optional[str] = ..., identifiers: _Optional[_Iterable[_Union[Identifier, _Mapping]]] = ..., create: _Optional[bool] = ...) -> None: ...

class LinkResponse(_message.Message):
    __slots__ = ("id", "version", "merged_ids")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MERGED_IDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    merged_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., merged_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class TrackRequest(_message.Message):
    __slots__ = ("id", "event", "at", "count", "identifier")
    ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    id: str
    event: str
    at: _timestamp_pb2.Timestamp
    count: int
    identifier: Identifier
    def __init__(self, id: _Optional[str] = ..., event: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., count: _Optional[int] = ..., identifier: _Optional[_Union[Identifier, _Mapping]] = ...) -> None: ...

class TrackResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ExportProfileRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ProfileKey
    def __init__(self, key: _Optional[_Union[ProfileKey, _Mapping]] = ...) -> None: ...

class ExportedAttribute(_message.Message):
    __slots__ = ("name", "kind", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: Kind
    value: Value
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[Kind, str]] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class EventAggregate(_message.Message):
    __slots__ = ("name", "count", "first", "last")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    first: _timestamp_pb2.Timestamp
    last: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., first: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ExportProfileResponse(_message.Message):
    __slots__ = ("id", "version", "attributes", "identifiers", "merged_ids", "created", "changed", "events", "slot", "shard", "sections")
    class SectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    MERGED_IDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SECTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    attributes: _containers.RepeatedCompositeFieldContainer[ExportedAttribute]
    identifiers: _containers.RepeatedCompositeFieldContainer[Identifier]
    merged_ids: _containers.RepeatedScalarFieldContainer[str]
    created: _timestamp_pb2.Timestamp
    changed: _timestamp_pb2.Timestamp
    events: _containers.RepeatedCompositeFieldContainer[EventAggregate]
    slot: int
    shard: str
    sections: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., attributes: _Optional[_Iterable[_Union[ExportedAttribute, _Mapping]]] = ..., identifiers: _Optional[_Iterable[_Union[Identifier, _Mapping]]] = ..., merged_ids: _Optional[_Iterable[str]] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., changed: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., events: _Optional[_Iterable[_Union[EventAggregate, _Mapping]]] = ..., slot: _Optional[int] = ..., shard: _Optional[str] = ..., sections: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ExportProfilesRequest(_message.Message):
    __slots__ = ("query", "chunk_size", "format")
    class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PACKED: _ClassVar[ExportProfilesRequest.Format]
        JSON_LINES: _ClassVar[ExportProfilesRequest.Format]
        COLUMNS: _ClassVar[ExportProfilesRequest.Format]
    PACKED: ExportProfilesRequest.Format
    JSON_LINES: ExportProfilesRequest.Format
    COLUMNS: ExportProfilesRequest.Format
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    query: QueryRequest
    chunk_size: int
    format: ExportProfilesRequest.Format
    def __init__(self, query: _Optional[_Union[QueryRequest, _Mapping]] = ..., chunk_size: _Optional[int] = ..., format: _Optional[_Union[ExportProfilesRequest.Format, str]] = ...) -> None: ...

class ExportProfilesChunk(_message.Message):
    __slots__ = ("packed", "shard", "log_position", "missing_shards", "lines", "profiles", "columns")
    PACKED_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    LOG_POSITION_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    packed: bytes
    shard: str
    log_position: int
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    lines: bytes
    profiles: int
    columns: bytes
    def __init__(self, packed: _Optional[bytes] = ..., shard: _Optional[str] = ..., log_position: _Optional[int] = ..., missing_shards: _Optional[_Iterable[str]] = ..., lines: _Optional[bytes] = ..., profiles: _Optional[int] = ..., columns: _Optional[bytes] = ...) -> None: ...

class EraseProfilesRequest(_message.Message):
    __slots__ = ("query", "suppress", "batch_size", "anonymous_before", "anonymous_kinds")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    SUPPRESS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_KINDS_FIELD_NUMBER: _ClassVar[int]
    query: QueryRequest
    suppress: bool
    batch_size: int
    anonymous_before: _timestamp_pb2.Timestamp
    anonymous_kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, query: _Optional[_Union[QueryRequest, _Mapping]] = ..., suppress: _Optional[bool] = ..., batch_size: _Optional[int] = ..., anonymous_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., anonymous_kinds: _Optional[_Iterable[str]] = ...) -> None: ...

class ErasedProfile(_message.Message):
    __slots__ = ("id", "merged_ids", "identifiers")
    ID_FIELD_NUMBER: _ClassVar[int]
    MERGED_IDS_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    merged_ids: _containers.RepeatedScalarFieldContainer[str]
    identifiers: _containers.RepeatedCompositeFieldContainer[Identifier]
    def __init__(self, id: _Optional[str] = ..., merged_ids: _Optional[_Iterable[str]] = ..., identifiers: _Optional[_Iterable[_Union[Identifier, _Mapping]]] = ...) -> None: ...

class EraseProfilesChunk(_message.Message):
    __slots__ = ("erased", "receipt", "erased_at", "log_position", "shard_positions", "shard", "suppressed", "missing_shards", "hashed_ids")
    class ShardPositionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ERASED_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    ERASED_AT_FIELD_NUMBER: _ClassVar[int]
    LOG_POSITION_FIELD_NUMBER: _ClassVar[int]
    SHARD_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    HASHED_IDS_FIELD_NUMBER: _ClassVar[int]
    erased: _containers.RepeatedCompositeFieldContainer[ErasedProfile]
    receipt: str
    erased_at: _timestamp_pb2.Timestamp
    log_position: int
    shard_positions: _containers.ScalarMap[str, int]
    shard: str
    suppressed: bool
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    hashed_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, erased: _Optional[_Iterable[_Union[ErasedProfile, _Mapping]]] = ..., receipt: _Optional[str] = ..., erased_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., log_position: _Optional[int] = ..., shard_positions: _Optional[_Mapping[str, int]] = ..., shard: _Optional[str] = ..., suppressed: _Optional[bool] = ..., missing_shards: _Optional[_Iterable[str]] = ..., hashed_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class TrackBatchRequest(_message.Message):
    __slots__ = ("events", "packed")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[TrackRequest]
    packed: bytes
    def __init__(self, events: _Optional[_Iterable[_Union[TrackRequest, _Mapping]]] = ..., packed: _Optional[bytes] = ...) -> None: ...

class TrackBatchResponse(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: int
    def __init__(self, applied: _Optional[int] = ...) -> None: ...

class AttributeSpec(_message.Message):
    __slots__ = ("name", "kind", "not_indexed", "merge")
    class Merge(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MERGE_DEFAULT: _ClassVar[AttributeSpec.Merge]
        SUM: _ClassVar[AttributeSpec.Merge]
        MIN: _ClassVar[AttributeSpec.Merge]
        MAX: _ClassVar[AttributeSpec.Merge]
    MERGE_DEFAULT: AttributeSpec.Merge
    SUM: AttributeSpec.Merge
    MIN: AttributeSpec.Merge
    MAX: AttributeSpec.Merge
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NOT_INDEXED_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: Kind
    not_indexed: bool
    merge: AttributeSpec.Merge
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[Kind, str]] = ..., not_indexed: _Optional[bool] = ..., merge: _Optional[_Union[AttributeSpec.Merge, str]] = ...) -> None: ...

class DeclareAttributesRequest(_message.Message):
    __slots__ = ("attributes",)
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    attributes: _containers.RepeatedCompositeFieldContainer[AttributeSpec]
    def __init__(self, attributes: _Optional[_Iterable[_Union[AttributeSpec, _Mapping]]] = ...) -> None: ...

class GetSchemaRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SchemaResponse(_message.Message):
    __slots__ = ("attributes",)
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    attributes: _containers.RepeatedCompositeFieldContainer[AttributeSpec]
    def __init__(self, attributes: _Optional[_Iterable[_Union[AttributeSpec, _Mapping]]] = ...) -> None: ...

class Predicate(_message.Message):
    __slots__ = ("attribute", "op", "values")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OP_UNSPECIFIED: _ClassVar[Predicate.Op]
        EQ: _ClassVar[Predicate.Op]
        NE: _ClassVar[Predicate.Op]
        IN: _ClassVar[Predicate.Op]
        LT: _ClassVar[Predicate.Op]
        LE: _ClassVar[Predicate.Op]
        GT: _ClassVar[Predicate.Op]
        GE: _ClassVar[Predicate.Op]
        BETWEEN: _ClassVar[Predicate.Op]
        EXISTS: _ClassVar[Predicate.Op]
        HAS: _ClassVar[Predicate.Op]
    OP_UNSPECIFIED: Predicate.Op
    EQ: Predicate.Op
    NE: Predicate.Op
    IN: Predicate.Op
    LT: Predicate.Op
    LE: Predicate.Op
    GT: Predicate.Op
    GE: Predicate.Op
    BETWEEN: Predicate.Op
    EXISTS: Predicate.Op
    HAS: Predicate.Op
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    attribute: str
    op: Predicate.Op
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, attribute: _Optional[str] = ..., op: _Optional[_Union[Predicate.Op, str]] = ..., values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("predicate", "all", "did", "in_segment")
    PREDICATE_FIELD_NUMBER: _ClassVar[int]
    AND_FIELD_NUMBER: _ClassVar[int]
    OR_FIELD_NUMBER: _ClassVar[int]
    NOT_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    DID_FIELD_NUMBER: _ClassVar[int]
    IN_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    predicate: Predicate
    all: bool
    did: Did
    in_segment: str
    def __init__(self, predicate: _Optional[_Union[Predicate, _Mapping]] = ..., all: _Optional[bool] = ..., did: _Optional[_Union[Did, _Mapping]] = ..., in_segment: _Optional[str] = ..., **kwargs) -> None: ...

class Did(_message.Message):
    __slots__ = ("event", "within_days", "to", "at_least", "at_most", "within_seconds")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    WITHIN_DAYS_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    AT_LEAST_FIELD_NUMBER: _ClassVar[int]
    AT_MOST_FIELD_NUMBER: _ClassVar[int]
    WITHIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    event: str
    within_days: int
    to: str
    at_least: int
    at_most: int
    within_seconds: int
    def __init__(self, event: _Optional[str] = ..., within_days: _Optional[int] = ..., to: _Optional[str] = ..., at_least: _Optional[int] = ..., at_most: _Optional[int] = ..., within_seconds: _Optional[int] = ..., **kwargs) -> None: ...

class QueryList(_message.Message):
    __slots__ = ("children",)
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    children: _containers.RepeatedCompositeFieldContainer[Query]
    def __init__(self, children: _Optional[_Iterable[_Union[Query, _Mapping]]] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("query", "text", "allow_partial", "unknown_attribute_is_empty")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ATTRIBUTE_IS_EMPTY_FIELD_NUMBER: _ClassVar[int]
    query: Query
    text: str
    allow_partial: bool
    unknown_attribute_is_empty: bool
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., text: _Optional[str] = ..., allow_partial: _Optional[bool] = ..., unknown_attribute_is_empty: _Optional[bool] = ...) -> None: ...

class QueryIdsRequest(_message.Message):
    __slots__ = ("query", "page_size", "cursor")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    query: QueryRequest
    page_size: int
    cursor: str
    def __init__(self, query: _Optional[_Union[QueryRequest, _Mapping]] = ..., page_size: _Optional[int] = ..., cursor: _Optional[str] = ...) -> None: ...

class QueryIdsResponse(_message.Message):
    __slots__ = ("ids", "next_cursor", "missing_shards")
    IDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    next_cursor: str
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., next_cursor: _Optional[str] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class CountResponse(_message.Message):
    __slots__ = ("count", "missing_shards")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    count: int
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, count: _Optional[int] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class GroupByRequest(_message.Message):
    __slots__ = ("query", "attribute", "top_n")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    query: QueryRequest
    attribute: str
    top_n: int
    def __init__(self, query: _Optional[_Union[QueryRequest, _Mapping]] = ..., attribute: _Optional[str] = ..., top_n: _Optional[int] = ...) -> None: ...

class GroupCount(_message.Message):
    __slots__ = ("value", "count")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    value: Value
    count: int
    def __init__(self, value: _Optional[_Union[Value, _Mapping]] = ..., count: _Optional[int] = ...) -> None: ...

class GroupByResponse(_message.Message):
    __slots__ = ("groups", "total", "missing_shards")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[GroupCount]
    total: int
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, groups: _Optional[_Iterable[_Union[GroupCount, _Mapping]]] = ..., total: _Optional[int] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class ShardBitmap(_message.Message):
    __slots__ = ("shard", "bitmap")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    BITMAP_FIELD_NUMBER: _ClassVar[int]
    shard: str
    bitmap: bytes
    def __init__(self, shard: _Optional[str] = ..., bitmap: _Optional[bytes] = ...) -> None: ...

class BitmapResponse(_message.Message):
    __slots__ = ("bitmaps", "missing_shards")
    BITMAPS_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    bitmaps: _containers.RepeatedCompositeFieldContainer[ShardBitmap]
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bitmaps: _Optional[_Iterable[_Union[ShardBitmap, _Mapping]]] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ("path", "log_position", "profiles", "shard_positions")
    class ShardPositionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    LOG_POSITION_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    SHARD_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    path: str
    log_position: int
    profiles: int
    shard_positions: _containers.ScalarMap[str, int]
    def __init__(self, path: _Optional[str] = ..., log_position: _Optional[int] = ..., profiles: _Optional[int] = ..., shard_positions: _Optional[_Mapping[str, int]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("profiles", "identifiers", "attributes", "log_bytes", "shard", "info")
    class InfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    LOG_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    profiles: int
    identifiers: int
    attributes: int
    log_bytes: int
    shard: str
    info: _containers.ScalarMap[str, str]
    def __init__(self, profiles: _Optional[int] = ..., identifiers: _Optional[int] = ..., attributes: _Optional[int] = ..., log_bytes: _Optional[int] = ..., shard: _Optional[str] = ..., info: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreateSegmentRequest(_message.Message):
    __slots__ = ("name", "query", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    query: QueryRequest
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., query: _Optional[_Union[QueryRequest, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SegmentInfo(_message.Message):
    __slots__ = ("name", "query", "members", "created_at", "broken", "missing_shards")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    BROKEN_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    query: str
    members: int
    created_at: _timestamp_pb2.Timestamp
    broken: str
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., query: _Optional[str] = ..., members: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., broken: _Optional[str] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteSegmentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteSegmentResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ListSegmentsRequest(_message.Message):
    __slots__ = ("allow_partial",)
    ALLOW_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    allow_partial: bool
    def __init__(self, allow_partial: _Optional[bool] = ...) -> None: ...

class ListSegmentsResponse(_message.Message):
    __slots__ = ("segments", "missing_shards")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[SegmentInfo]
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, segments: _Optional[_Iterable[_Union[SegmentInfo, _Mapping]]] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchSegmentsRequest(_message.Message):
    __slots__ = ("segments", "from_position", "initial")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    FROM_POSITION_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedScalarFieldContainer[str]
    from_position: str
    initial: bool
    def __init__(self, segments: _Optional[_Iterable[str]] = ..., from_position: _Optional[str] = ..., initial: _Optional[bool] = ...) -> None: ...

class SegmentEvent(_message.Message):
    __slots__ = ("segment", "id", "change", "position", "at", "initial")
    class Change(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CHANGE_UNSPECIFIED: _ClassVar[SegmentEvent.Change]
        ENTER: _ClassVar[SegmentEvent.Change]
        LEAVE: _ClassVar[SegmentEvent.Change]
    CHANGE_UNSPECIFIED: SegmentEvent.Change
    ENTER: SegmentEvent.Change
    LEAVE: SegmentEvent.Change
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    segment: str
    id: str
    change: SegmentEvent.Change
    position: str
    at: _timestamp_pb2.Timestamp
    initial: bool
    def __init__(self, segment: _Optional[str] = ..., id: _Optional[str] = ..., change: _Optional[_Union[SegmentEvent.Change, str]] = ..., position: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., initial: _Optional[bool] = ...) -> None: ...

class WatchSegmentsResponse(_message.Message):
    __slots__ = ("events", "position", "at")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[SegmentEvent]
    position: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, events: _Optional[_Iterable[_Union[SegmentEvent, _Mapping]]] = ..., position: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchChangesRequest(_message.Message):
    __slots__ = ("query", "attributes", "from_position", "initial")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    FROM_POSITION_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    query: QueryRequest
    attributes: _containers.RepeatedScalarFieldContainer[str]
    from_position: str
    initial: bool
    def __init__(self, query: _Optional[_Union[QueryRequest, _Mapping]] = ..., attributes: _Optional[_Iterable[str]] = ..., from_position: _Optional[str] = ..., initial: _Optional[bool] = ...) -> None: ...

class ProfileChange(_message.Message):
    __slots__ = ("id", "version", "set", "unset", "created", "deleted", "merged_into", "position", "at", "initial")
    class SetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SET_FIELD_NUMBER: _ClassVar[int]
    UNSET_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MERGED_INTO_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    set: _containers.MessageMap[str, Value]
    unset: _containers.RepeatedScalarFieldContainer[str]
    created: bool
    deleted: bool
    merged_into: str
    position: str
    at: _timestamp_pb2.Timestamp
    initial: bool
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., set: _Optional[_Mapping[str, Value]] = ..., unset: _Optional[_Iterable[str]] = ..., created: _Optional[bool] = ..., deleted: _Optional[bool] = ..., merged_into: _Optional[str] = ..., position: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., initial: _Optional[bool] = ...) -> None: ...

class WatchChangesResponse(_message.Message):
    __slots__ = ("changes", "position", "at")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[ProfileChange]
    position: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, changes: _Optional[_Iterable[_Union[ProfileChange, _Mapping]]] = ..., position: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
