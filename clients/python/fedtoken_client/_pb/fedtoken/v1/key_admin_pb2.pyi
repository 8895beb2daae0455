from fedtoken_client._pb.fedtoken.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tenant(_message.Message):
    __slots__ = ("id", "issuer", "max_token_lifetime_seconds", "default_token_lifetime_seconds", "allowed_algorithms", "key_size", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOKEN_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    issuer: str
    max_token_lifetime_seconds: int
    default_token_lifetime_seconds: int
    allowed_algorithms: _containers.RepeatedScalarFieldContainer[str]
    key_size: int
    created_at: int
    def __init__(self, id: _Optional[str] = ..., issuer: _Optional[str] = ..., max_token_lifetime_seconds: _Optional[int] = ..., default_token_lifetime_seconds: _Optional[int] = ..., allowed_algorithms: _Optional[_Iterable[str]] = ..., key_size: _Optional[int] = ..., created_at: _Optional[int] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("id", "issuer", "max_token_lifetime_seconds", "default_token_lifetime_seconds", "allowed_algorithms", "key_size", "generate_key")
    ID_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOKEN_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    GENERATE_KEY_FIELD_NUMBER: _ClassVar[int]
    id: str
    issuer: str
    max_token_lifetime_seconds: int
    default_token_lifetime_seconds: int
    allowed_algorithms: _containers.RepeatedScalarFieldContainer[str]
    key_size: int
    generate_key: bool
    def __init__(self, id: _Optional[str] = ..., issuer: _Optional[str] = ..., max_token_lifetime_seconds: _Optional[int] = ..., default_token_lifetime_seconds: _Optional[int] = ..., allowed_algorithms: _Optional[_Iterable[str]] = ..., key_size: _Optional[int] = ..., generate_key: _Optional[bool] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ...) -> None: ...

class GenerateKeyRequest(_message.Message):
    __slots__ = ("tenant", "key_size", "activate")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    key_size: int
    activate: bool
    def __init__(self, tenant: _Optional[str] = ..., key_size: _Optional[int] = ..., activate: _Optional[bool] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[_common_pb2.Key]
    def __init__(self, keys: _Optional[_Iterable[_Union[_common_pb2.Key, _Mapping]]] = ...) -> None: ...

class KeyRef(_message.Message):
    __slots__ = ("tenant", "kid")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    kid: str
    def __init__(self, tenant: _Optional[str] = ..., kid: _Optional[str] = ...) -> None: ...
