from fedtoken_client._pb.fedtoken.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuditEvent(_message.Message):
    __slots__ = ("seq", "time_us", "tenant", "actor", "event_type", "subject", "jti", "kid", "outcome", "reason", "request_id", "details_json", "hash")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_US_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_us: int
    tenant: str
    actor: str
    event_type: str
    subject: str
    jti: str
    kid: str
    outcome: str
    reason: str
    request_id: str
    details_json: str
    hash: str
    def __init__(self, seq: _Optional[int] = ..., time_us: _Optional[int] = ..., tenant: _Optional[str] = ..., actor: _Optional[str] = ..., event_type: _Optional[str] = ..., subject: _Optional[str] = ..., jti: _Optional[str] = ..., kid: _Optional[str] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ..., details_json: _Optional[str] = ..., hash: _Optional[str] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("tenant", "event_type", "subject", "since", "until", "after_seq", "page_size")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    event_type: str
    subject: str
    since: int
    until: int
    after_seq: int
    page_size: int
    def __init__(self, tenant: _Optional[str] = ..., event_type: _Optional[str] = ..., subject: _Optional[str] = ..., since: _Optional[int] = ..., until: _Optional[int] = ..., after_seq: _Optional[int] = ..., page_size: _Optional[int] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events", "next_after_seq")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_after_seq: int
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_after_seq: _Optional[int] = ...) -> None: ...

class VerifyAuditChainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuditChainReport(_message.Message):
    __slots__ = ("ok", "rows_checked", "head_seq", "head_hash", "first_bad_seq", "problem", "anchor_seq", "anchor_hash")
    OK_FIELD_NUMBER: _ClassVar[int]
    ROWS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    FIRST_BAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_SEQ_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_HASH_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    rows_checked: int
    head_seq: int
    head_hash: str
    first_bad_seq: int
    problem: str
    anchor_seq: int
    anchor_hash: str
    def __init__(self, ok: _Optional[bool] = ..., rows_checked: _Optional[int] = ..., head_seq: _Optional[int] = ..., head_hash: _Optional[str] = ..., first_bad_seq: _Optional[int] = ..., problem: _Optional[str] = ..., anchor_seq: _Optional[int] = ..., anchor_hash: _Optional[str] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("id", "issuer", "max_token_lifetime_seconds", "default_token_lifetime_seconds", "allowed_algorithms", "key_size", "created_at", "rotation_period_seconds", "prepublish_seconds", "grace_seconds", "jwks_max_age_seconds", "next_rotation_step_at", "next_rotation_step")
    ID_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOKEN_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREPUBLISH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    JWKS_MAX_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROTATION_STEP_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROTATION_STEP_FIELD_NUMBER: _ClassVar[int]
    id: str
    issuer: str
    max_token_lifetime_seconds: int
    default_token_lifetime_seconds: int
    allowed_algorithms: _containers.RepeatedScalarFieldContainer[str]
    key_size: int
    created_at: int
    rotation_period_seconds: int
    prepublish_seconds: int
    grace_seconds: int
    jwks_max_age_seconds: int
    next_rotation_step_at: int
    next_rotation_step: str
    def __init__(self, id: _Optional[str] = ..., issuer: _Optional[str] = ..., max_token_lifetime_seconds: _Optional[int] = ..., default_token_lifetime_seconds: _Optional[int] = ..., allowed_algorithms: _Optional[_Iterable[str]] = ..., key_size: _Optional[int] = ..., created_at: _Optional[int] = ..., rotation_period_seconds: _Optional[int] = ..., prepublish_seconds: _Optional[int] = ..., grace_seconds: _Optional[int] = ..., jwks_max_age_seconds: _Optional[int] = ..., next_rotation_step_at: _Optional[int] = ..., next_rotation_step: _Optional[str] = ...) -> None: ...

class UpdateTenantRequest(_message.Message):
    __slots__ = ("id", "rotation_period_seconds", "max_token_lifetime_seconds", "default_token_lifetime_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOKEN_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    rotation_period_seconds: int
    max_token_lifetime_seconds: int
    default_token_lifetime_seconds: int
    def __init__(self, id: _Optional[str] = ..., rotation_period_seconds: _Optional[int] = ..., max_token_lifetime_seconds: _Optional[int] = ..., default_token_lifetime_seconds: _Optional[int] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("tenant", "reason")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    reason: str
    def __init__(self, tenant: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReconcileKeysRequest(_message.Message):
    __slots__ = ("fix",)
    FIX_FIELD_NUMBER: _ClassVar[int]
    fix: bool
    def __init__(self, fix: _Optional[bool] = ...) -> None: ...

class HsmObject(_message.Message):
    __slots__ = ("hsm_label", "kid", "problem", "destroyed")
    HSM_LABEL_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    DESTROYED_FIELD_NUMBER: _ClassVar[int]
    hsm_label: str
    kid: str
    problem: str
    destroyed: bool
    def __init__(self, hsm_label: _Optional[str] = ..., kid: _Optional[str] = ..., problem: _Optional[str] = ..., destroyed: _Optional[bool] = ...) -> None: ...

class ReconcileKeysReport(_message.Message):
    __slots__ = ("objects", "hsm_objects", "records")
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    HSM_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[HsmObject]
    hsm_objects: int
    records: int
    def __init__(self, objects: _Optional[_Iterable[_Union[HsmObject, _Mapping]]] = ..., hsm_objects: _Optional[int] = ..., records: _Optional[int] = ...) -> None: ...

class ComplianceReportRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class HsmAttributes(_message.Message):
    __slots__ = ("present", "sensitive", "extractable", "sign", "decrypt", "unwrap", "never_extractable", "always_sensitive")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    SENSITIVE_FIELD_NUMBER: _ClassVar[int]
    EXTRACTABLE_FIELD_NUMBER: _ClassVar[int]
    SIGN_FIELD_NUMBER: _ClassVar[int]
    DECRYPT_FIELD_NUMBER: _ClassVar[int]
    UNWRAP_FIELD_NUMBER: _ClassVar[int]
    NEVER_EXTRACTABLE_FIELD_NUMBER: _ClassVar[int]
    ALWAYS_SENSITIVE_FIELD_NUMBER: _ClassVar[int]
    present: bool
    sensitive: bool
    extractable: bool
    sign: bool
    decrypt: bool
    unwrap: bool
    never_extractable: bool
    always_sensitive: bool
    def __init__(self, present: _Optional[bool] = ..., sensitive: _Optional[bool] = ..., extractable: _Optional[bool] = ..., sign: _Optional[bool] = ..., decrypt: _Optional[bool] = ..., unwrap: _Optional[bool] = ..., never_extractable: _Optional[bool] = ..., always_sensitive: _Optional[bool] = ...) -> None: ...

class KeyCompliance(_message.Message):
    __slots__ = ("kid", "tenant", "alg", "modulus_bits", "public_exponent", "state", "age_seconds", "next_step", "next_step_at", "hsm")
    KID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALG_FIELD_NUMBER: _ClassVar[int]
    MODULUS_BITS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_EXPONENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_AT_FIELD_NUMBER: _ClassVar[int]
    HSM_FIELD_NUMBER: _ClassVar[int]
    kid: str
    tenant: str
    alg: str
    modulus_bits: int
    public_exponent: int
    state: _common_pb2.KeyState
    age_seconds: int
    next_step: str
    next_step_at: int
    hsm: HsmAttributes
    def __init__(self, kid: _Optional[str] = ..., tenant: _Optional[str] = ..., alg: _Optional[str] = ..., modulus_bits: _Optional[int] = ..., public_exponent: _Optional[int] = ..., state: _Optional[_Union[_common_pb2.KeyState, str]] = ..., age_seconds: _Optional[int] = ..., next_step: _Optional[str] = ..., next_step_at: _Optional[int] = ..., hsm: _Optional[_Union[HsmAttributes, _Mapping]] = ...) -> None: ...

class ComplianceViolation(_message.Message):
    __slots__ = ("code", "tenant", "kid", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    tenant: str
    kid: str
    message: str
    def __init__(self, code: _Optional[str] = ..., tenant: _Optional[str] = ..., kid: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class TenantCompliance(_message.Message):
    __slots__ = ("tenant", "keys", "violations")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    keys: _containers.RepeatedCompositeFieldContainer[KeyCompliance]
    violations: _containers.RepeatedCompositeFieldContainer[ComplianceViolation]
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ..., keys: _Optional[_Iterable[_Union[KeyCompliance, _Mapping]]] = ..., violations: _Optional[_Iterable[_Union[ComplianceViolation, _Mapping]]] = ...) -> None: ...

class ComplianceReport(_message.Message):
    __slots__ = ("ok", "generated_at", "tenants", "violations", "audit_chain_ok")
    OK_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_CHAIN_OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    generated_at: int
    tenants: _containers.RepeatedCompositeFieldContainer[TenantCompliance]
    violations: _containers.RepeatedCompositeFieldContainer[ComplianceViolation]
    audit_chain_ok: bool
    def __init__(self, ok: _Optional[bool] = ..., generated_at: _Optional[int] = ..., tenants: _Optional[_Iterable[_Union[TenantCompliance, _Mapping]]] = ..., violations: _Optional[_Iterable[_Union[ComplianceViolation, _Mapping]]] = ..., audit_chain_ok: _Optional[bool] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("id", "issuer", "max_token_lifetime_seconds", "default_token_lifetime_seconds", "allowed_algorithms", "key_size", "generate_key", "rotation_period_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOKEN_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    GENERATE_KEY_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    issuer: str
    max_token_lifetime_seconds: int
    default_token_lifetime_seconds: int
    allowed_algorithms: _containers.RepeatedScalarFieldContainer[str]
    key_size: int
    generate_key: bool
    rotation_period_seconds: int
    def __init__(self, id: _Optional[str] = ..., issuer: _Optional[str] = ..., max_token_lifetime_seconds: _Optional[int] = ..., default_token_lifetime_seconds: _Optional[int] = ..., allowed_algorithms: _Optional[_Iterable[str]] = ..., key_size: _Optional[int] = ..., generate_key: _Optional[bool] = ..., rotation_period_seconds: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("tenant", "kid", "emergency")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    EMERGENCY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    kid: str
    emergency: bool
    def __init__(self, tenant: _Optional[str] = ..., kid: _Optional[str] = ..., emergency: _Optional[bool] = ...) -> None: ...

class CallerGrant(_message.Message):
    __slots__ = ("identity", "role", "tenants", "audiences", "max_lifetime_seconds", "created_at", "granted_by")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    GRANTED_BY_FIELD_NUMBER: _ClassVar[int]
    identity: str
    role: str
    tenants: _containers.RepeatedScalarFieldContainer[str]
    audiences: _containers.RepeatedScalarFieldContainer[str]
    max_lifetime_seconds: int
    created_at: int
    granted_by: str
    def __init__(self, identity: _Optional[str] = ..., role: _Optional[str] = ..., tenants: _Optional[_Iterable[str]] = ..., audiences: _Optional[_Iterable[str]] = ..., max_lifetime_seconds: _Optional[int] = ..., created_at: _Optional[int] = ..., granted_by: _Optional[str] = ...) -> None: ...

class GrantCallerRequest(_message.Message):
    __slots__ = ("identity", "role", "tenants", "audiences", "max_lifetime_seconds")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    identity: str
    role: str
    tenants: _containers.RepeatedScalarFieldContainer[str]
    audiences: _containers.RepeatedScalarFieldContainer[str]
    max_lifetime_seconds: int
    def __init__(self, identity: _Optional[str] = ..., role: _Optional[str] = ..., tenants: _Optional[_Iterable[str]] = ..., audiences: _Optional[_Iterable[str]] = ..., max_lifetime_seconds: _Optional[int] = ...) -> None: ...

class RevokeCallerRequest(_message.Message):
    __slots__ = ("identity", "role")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    identity: str
    role: str
    def __init__(self, identity: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class RevokeCallerResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class ListCallersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCallersResponse(_message.Message):
    __slots__ = ("grants",)
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    grants: _containers.RepeatedCompositeFieldContainer[CallerGrant]
    def __init__(self, grants: _Optional[_Iterable[_Union[CallerGrant, _Mapping]]] = ...) -> None: ...

class TrustedIssuer(_message.Message):
    __slots__ = ("issuer", "jwks_uri", "algorithms", "audiences", "tenants", "namespace", "max_stale_seconds", "created_at", "updated_at", "added_by", "key_set", "created")
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    JWKS_URI_FIELD_NUMBER: _ClassVar[int]
    ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MAX_STALE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ADDED_BY_FIELD_NUMBER: _ClassVar[int]
    KEY_SET_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    jwks_uri: str
    algorithms: _containers.RepeatedScalarFieldContainer[str]
    audiences: _containers.RepeatedScalarFieldContainer[str]
    tenants: _containers.RepeatedScalarFieldContainer[str]
    namespace: str
    max_stale_seconds: int
    created_at: int
    updated_at: int
    added_by: str
    key_set: TrustedKeySetStatus
    created: bool
    def __init__(self, issuer: _Optional[str] = ..., jwks_uri: _Optional[str] = ..., algorithms: _Optional[_Iterable[str]] = ..., audiences: _Optional[_Iterable[str]] = ..., tenants: _Optional[_Iterable[str]] = ..., namespace: _Optional[str] = ..., max_stale_seconds: _Optional[int] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ..., added_by: _Optional[str] = ..., key_set: _Optional[_Union[TrustedKeySetStatus, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class TrustedKeySetStatus(_message.Message):
    __slots__ = ("kids", "fetched_at", "age_seconds", "next_refresh_at", "serving_stale", "usable", "last_outcome", "last_error", "fetches")
    KIDS_FIELD_NUMBER: _ClassVar[int]
    FETCHED_AT_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_REFRESH_AT_FIELD_NUMBER: _ClassVar[int]
    SERVING_STALE_FIELD_NUMBER: _ClassVar[int]
    USABLE_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    FETCHES_FIELD_NUMBER: _ClassVar[int]
    kids: _containers.RepeatedScalarFieldContainer[str]
    fetched_at: int
    age_seconds: int
    next_refresh_at: int
    serving_stale: bool
    usable: bool
    last_outcome: str
    last_error: str
    fetches: int
    def __init__(self, kids: _Optional[_Iterable[str]] = ..., fetched_at: _Optional[int] = ..., age_seconds: _Optional[int] = ..., next_refresh_at: _Optional[int] = ..., serving_stale: _Optional[bool] = ..., usable: _Optional[bool] = ..., last_outcome: _Optional[str] = ..., last_error: _Optional[str] = ..., fetches: _Optional[int] = ...) -> None: ...

class AddTrustedIssuerRequest(_message.Message):
    __slots__ = ("issuer", "jwks_uri", "algorithms", "audiences", "tenants", "namespace", "max_stale_seconds")
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    JWKS_URI_FIELD_NUMBER: _ClassVar[int]
    ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MAX_STALE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    jwks_uri: str
    algorithms: _containers.RepeatedScalarFieldContainer[str]
    audiences: _containers.RepeatedScalarFieldContainer[str]
    tenants: _containers.RepeatedScalarFieldContainer[str]
    namespace: str
    max_stale_seconds: int
    def __init__(self, issuer: _Optional[str] = ..., jwks_uri: _Optional[str] = ..., algorithms: _Optional[_Iterable[str]] = ..., audiences: _Optional[_Iterable[str]] = ..., tenants: _Optional[_Iterable[str]] = ..., namespace: _Optional[str] = ..., max_stale_seconds: _Optional[int] = ...) -> None: ...

class ListTrustedIssuersRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListTrustedIssuersResponse(_message.Message):
    __slots__ = ("issuers",)
    ISSUERS_FIELD_NUMBER: _ClassVar[int]
    issuers: _containers.RepeatedCompositeFieldContainer[TrustedIssuer]
    def __init__(self, issuers: _Optional[_Iterable[_Union[TrustedIssuer, _Mapping]]] = ...) -> None: ...

class RemoveTrustedIssuerRequest(_message.Message):
    __slots__ = ("issuer",)
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    def __init__(self, issuer: _Optional[str] = ...) -> None: ...

class RemoveTrustedIssuerResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: TrustedIssuer
    def __init__(self, removed: _Optional[_Union[TrustedIssuer, _Mapping]] = ...) -> None: ...

class RefreshTrustedIssuerRequest(_message.Message):
    __slots__ = ("issuer",)
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    def __init__(self, issuer: _Optional[str] = ...) -> None: ...
