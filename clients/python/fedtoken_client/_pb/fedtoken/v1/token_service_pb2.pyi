from fedtoken_client._pb.fedtoken.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExchangeRequest(_message.Message):
    __slots__ = ("subject_token", "subject_token_type", "tenant", "audience", "lifetime_seconds", "scope")
    SUBJECT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    subject_token: str
    subject_token_type: str
    tenant: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    lifetime_seconds: int
    scope: str
    def __init__(self, subject_token: _Optional[str] = ..., subject_token_type: _Optional[str] = ..., tenant: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ..., lifetime_seconds: _Optional[int] = ..., scope: _Optional[str] = ...) -> None: ...

class ExchangeResponse(_message.Message):
    __slots__ = ("access_token", "issued_token_type", "jti", "kid", "tenant", "issuer", "subject", "expires_at")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ISSUED_TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    access_token: str
    issued_token_type: str
    jti: str
    kid: str
    tenant: str
    issuer: str
    subject: str
    expires_at: int
    def __init__(self, access_token: _Optional[str] = ..., issued_token_type: _Optional[str] = ..., jti: _Optional[str] = ..., kid: _Optional[str] = ..., tenant: _Optional[str] = ..., issuer: _Optional[str] = ..., subject: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class IssueRequest(_message.Message):
    __slots__ = ("tenant", "subject", "audience", "lifetime_seconds", "extra_claims_json", "scope", "client_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_CLAIMS_JSON_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    subject: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    lifetime_seconds: int
    extra_claims_json: str
    scope: str
    client_id: str
    def __init__(self, tenant: _Optional[str] = ..., subject: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ..., lifetime_seconds: _Optional[int] = ..., extra_claims_json: _Optional[str] = ..., scope: _Optional[str] = ..., client_id: _Optional[str] = ...) -> None: ...

class IssueBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[IssueRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[IssueRequest, _Mapping]]] = ...) -> None: ...

class IssueBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[IssueResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[IssueResponse, _Mapping]]] = ...) -> None: ...

class IssueResponse(_message.Message):
    __slots__ = ("token", "jti", "kid", "tenant", "issuer", "issued_at", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    jti: str
    kid: str
    tenant: str
    issuer: str
    issued_at: int
    expires_at: int
    def __init__(self, token: _Optional[str] = ..., jti: _Optional[str] = ..., kid: _Optional[str] = ..., tenant: _Optional[str] = ..., issuer: _Optional[str] = ..., issued_at: _Optional[int] = ..., expires_at: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("token", "audience", "issuer", "tenant")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    token: str
    audience: str
    issuer: str
    tenant: str
    def __init__(self, token: _Optional[str] = ..., audience: _Optional[str] = ..., issuer: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("valid", "reason", "tenant", "issuer", "kid", "subject", "jti", "expires_at", "claims_json", "foreign")
    VALID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_JSON_FIELD_NUMBER: _ClassVar[int]
    FOREIGN_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    reason: _common_pb2.Reason
    tenant: str
    issuer: str
    kid: str
    subject: str
    jti: str
    expires_at: int
    claims_json: bytes
    foreign: bool
    def __init__(self, valid: _Optional[bool] = ..., reason: _Optional[_Union[_common_pb2.Reason, str]] = ..., tenant: _Optional[str] = ..., issuer: _Optional[str] = ..., kid: _Optional[str] = ..., subject: _Optional[str] = ..., jti: _Optional[str] = ..., expires_at: _Optional[int] = ..., claims_json: _Optional[bytes] = ..., foreign: _Optional[bool] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("verdict",)
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class VerifyBatchRequest(_message.Message):
    __slots__ = ("tokens", "audience", "issuer", "tenant")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    audience: str
    issuer: str
    tenant: str
    def __init__(self, tokens: _Optional[_Iterable[str]] = ..., audience: _Optional[str] = ..., issuer: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class VerifyBatchResponse(_message.Message):
    __slots__ = ("verdicts",)
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    verdicts: _containers.RepeatedCompositeFieldContainer[Verdict]
    def __init__(self, verdicts: _Optional[_Iterable[_Union[Verdict, _Mapping]]] = ...) -> None: ...

class IntrospectRequest(_message.Message):
    __slots__ = ("token", "token_type_hint")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_HINT_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_type_hint: str
    def __init__(self, token: _Optional[str] = ..., token_type_hint: _Optional[str] = ...) -> None: ...

class IntrospectResponse(_message.Message):
    __slots__ = ("active", "scope", "client_id", "token_type", "exp", "iat", "nbf", "sub", "aud", "iss", "jti", "tenant", "kid", "reason")
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXP_FIELD_NUMBER: _ClassVar[int]
    IAT_FIELD_NUMBER: _ClassVar[int]
    NBF_FIELD_NUMBER: _ClassVar[int]
    SUB_FIELD_NUMBER: _ClassVar[int]
    AUD_FIELD_NUMBER: _ClassVar[int]
    ISS_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    active: bool
    scope: str
    client_id: str
    token_type: str
    exp: int
    iat: int
    nbf: int
    sub: str
    aud: _containers.RepeatedScalarFieldContainer[str]
    iss: str
    jti: str
    tenant: str
    kid: str
    reason: _common_pb2.Reason
    def __init__(self, active: _Optional[bool] = ..., scope: _Optional[str] = ..., client_id: _Optional[str] = ..., token_type: _Optional[str] = ..., exp: _Optional[int] = ..., iat: _Optional[int] = ..., nbf: _Optional[int] = ..., sub: _Optional[str] = ..., aud: _Optional[_Iterable[str]] = ..., iss: _Optional[str] = ..., jti: _Optional[str] = ..., tenant: _Optional[str] = ..., kid: _Optional[str] = ..., reason: _Optional[_Union[_common_pb2.Reason, str]] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("tenant", "token", "jti", "subject", "kid", "expires_at", "reason", "issuer")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    token: str
    jti: str
    subject: SubjectRevocation
    kid: str
    expires_at: int
    reason: str
    issuer: str
    def __init__(self, tenant: _Optional[str] = ..., token: _Optional[str] = ..., jti: _Optional[str] = ..., subject: _Optional[_Union[SubjectRevocation, _Mapping]] = ..., kid: _Optional[str] = ..., expires_at: _Optional[int] = ..., reason: _Optional[str] = ..., issuer: _Optional[str] = ...) -> None: ...

class SubjectRevocation(_message.Message):
    __slots__ = ("subject", "issued_before")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    subject: str
    issued_before: int
    def __init__(self, subject: _Optional[str] = ..., issued_before: _Optional[int] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("tenant", "jti", "revoked_at", "created", "kind", "value")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    jti: str
    revoked_at: int
    created: bool
    kind: str
    value: str
    def __init__(self, tenant: _Optional[str] = ..., jti: _Optional[str] = ..., revoked_at: _Optional[int] = ..., created: _Optional[bool] = ..., kind: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class GetKeysRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class GetKeysResponse(_message.Message):
    __slots__ = ("tenant", "issuer", "jwks_json", "max_age_seconds", "etag", "keys")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    JWKS_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    issuer: str
    jwks_json: bytes
    max_age_seconds: int
    etag: str
    keys: _containers.RepeatedCompositeFieldContainer[_common_pb2.Key]
    def __init__(self, tenant: _Optional[str] = ..., issuer: _Optional[str] = ..., jwks_json: _Optional[bytes] = ..., max_age_seconds: _Optional[int] = ..., etag: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[_common_pb2.Key, _Mapping]]] = ...) -> None: ...
