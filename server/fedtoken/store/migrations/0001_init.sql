-- 0001_init: tenants, keys, revocations, and the hash-chained audit trail.
--
-- Applied by fedtoken.store.migrate inside one transaction, under an
-- advisory lock, so replicas starting together apply it exactly once.

-- Tenants ---------------------------------------------------------------------

CREATE TABLE tenants (
    -- Short id: lowercase letters, digits and '-', 1 to 63 characters.
    id                       text PRIMARY KEY CHECK (id ~ '^[a-z0-9-]{1,63}$'),
    issuer                   text NOT NULL UNIQUE CHECK (issuer <> ''),
    max_token_lifetime_s     integer NOT NULL CHECK (max_token_lifetime_s > 0),
    default_token_lifetime_s integer NOT NULL
        CHECK (default_token_lifetime_s > 0 AND default_token_lifetime_s <= max_token_lifetime_s),
    allowed_algorithms       text[] NOT NULL CHECK (cardinality(allowed_algorithms) > 0),
    key_size                 integer NOT NULL CHECK (key_size >= 2048),
    created_at               timestamptz NOT NULL DEFAULT now()
);

-- Keys (metadata only: private keys never leave the HSM) ----------------------

CREATE TABLE keys (
    kid            text PRIMARY KEY CHECK (kid <> ''),
    tenant_id      text NOT NULL REFERENCES tenants (id),
    alg            text NOT NULL,
    key_size       integer NOT NULL,
    state          text NOT NULL CHECK (state IN
        ('PENDING', 'ACTIVE', 'RETIRING', 'RETIRED', 'DESTROYED', 'COMPROMISED')),
    public_jwk     jsonb NOT NULL,
    hsm_label      text NOT NULL UNIQUE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    activated_at   timestamptz,
    retiring_at    timestamptz,
    retired_at     timestamptz,
    destroyed_at   timestamptz,
    compromised_at timestamptz
);

-- At most one signing key per tenant, whatever the application does.
CREATE UNIQUE INDEX keys_one_active_per_tenant ON keys (tenant_id) WHERE state = 'ACTIVE';
CREATE INDEX keys_tenant_created ON keys (tenant_id, created_at DESC);

-- Revocations -------------------------------------------------------------------
--
-- kind 'jti':     the token with this jti is revoked.
-- kind 'subject': tokens of this subject issued before not_before are revoked.
-- kind 'key':     every token signed by this kid is revoked.
-- A row is kept until expires_at, when every token it could match has expired.

CREATE TABLE revocations (
    tenant_id  text NOT NULL REFERENCES tenants (id),
    kind       text NOT NULL CHECK (kind IN ('jti', 'subject', 'key')),
    -- Bounded so that the NOTIFY payload (8000 bytes) always fits.
    value      text NOT NULL CHECK (length(value) BETWEEN 1 AND 1024),
    not_before timestamptz,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    reason     text NOT NULL DEFAULT '',
    actor      text NOT NULL DEFAULT '',
    PRIMARY KEY (tenant_id, kind, value),
    CHECK ((kind = 'subject') = (not_before IS NOT NULL))
);

CREATE INDEX revocations_expires_at ON revocations (expires_at);

-- Change notifications ----------------------------------------------------------
--
-- Every replica LISTENs on channel 'fedtoken_events' and refreshes its
-- in-memory state on these JSON payloads (delivered at commit, only if the
-- transaction commits):
--   {"type": "revocation", "tenant": T, "kind": K, "value": V,
--    "expires_at": unix seconds, "not_before": unix seconds or null}
--     (times rounded up: for an integer iat, iat < not_before holds exactly
--     when iat < ceil(not_before), and a later expiry only errs on the safe side)
--   {"type": "keys", "tenant": T, "kid": KID, "state": S}
-- They are sent by triggers so that any writer, including an operator with
-- psql, reaches every replica. A replica whose listening connection drops
-- must resync from the tables: notifications are not queued for it.

CREATE FUNCTION fedtoken_notify_revocation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fedtoken_events', json_build_object(
        'type', 'revocation', 'tenant', NEW.tenant_id, 'kind', NEW.kind, 'value', NEW.value,
        'expires_at', ceil(extract(epoch FROM NEW.expires_at))::bigint,
        'not_before', ceil(extract(epoch FROM NEW.not_before))::bigint)::text);
    RETURN NULL;
END $$;

CREATE TRIGGER revocations_notify AFTER INSERT OR UPDATE ON revocations
    FOR EACH ROW EXECUTE FUNCTION fedtoken_notify_revocation();

CREATE FUNCTION fedtoken_notify_keys() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fedtoken_events', json_build_object(
        'type', 'keys', 'tenant', NEW.tenant_id, 'kid', NEW.kid, 'state', NEW.state)::text);
    RETURN NULL;
END $$;

CREATE TRIGGER keys_notify AFTER INSERT OR UPDATE ON keys
    FOR EACH ROW EXECUTE FUNCTION fedtoken_notify_keys();

-- Audit trail -------------------------------------------------------------------
--
-- Tamper evidence: every row carries
--     hash = sha256(prev_hash || convert_to(audit_canonical(row), 'UTF8'))
-- where prev_hash is the hash of the row with seq - 1 (32 zero bytes for
-- seq 1). Changing, deleting or reordering any row breaks the chain at that
-- row, which verify_audit_chain() reports. audit_head holds the newest
-- (seq, hash); anchoring that pair outside the database from time to time
-- (logs, another system) also exposes a rewrite of the whole chain.
--
-- The chain is computed here, in a BEFORE INSERT trigger, not by the
-- application: INSERT and COPY from any replica chain the same way, and the
-- row lock on audit_head serialises writers until they commit, so seq is
-- gapless and chain order is seq order. A rolled back insert also rolls back
-- its audit_head update and leaves no gap.

CREATE TABLE audit_events (
    seq        bigint PRIMARY KEY,
    ts         timestamptz NOT NULL DEFAULT now(),
    tenant_id  text,
    actor      text,
    event_type text NOT NULL,
    subject    text,
    jti        text,
    kid        text,
    outcome    text,
    reason     text,
    request_id text,
    details    jsonb,
    prev_hash  bytea NOT NULL,
    hash       bytea NOT NULL
);

CREATE INDEX audit_events_tenant_seq ON audit_events (tenant_id, seq);
CREATE INDEX audit_events_ts ON audit_events (ts);
CREATE INDEX audit_events_subject_seq ON audit_events (subject, seq);

CREATE TABLE audit_head (
    id   integer PRIMARY KEY CHECK (id = 1),
    seq  bigint NOT NULL,
    hash bytea NOT NULL CHECK (length(hash) = 32)
);

INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'));

-- The canonical text of an audit row, the input of its hash.
--
-- Format (version 1): the JSON array text produced by json_build_array of
--     [1, seq, ts_us, tenant_id, actor, event_type, subject, jti, kid,
--      outcome, reason, request_id, details_text]
-- where the leading 1 is the format version, ts_us is ts as integer
-- microseconds since the Unix epoch (independent of the session time zone),
-- absent values are JSON null, and details_text is details::text (jsonb's
-- normalised text: sorted keys, no duplicates) as a JSON string. JSON string
-- quoting makes the encoding unambiguous: no choice of field values can make
-- two different rows produce the same text. An offline verifier must
-- reproduce Postgres's json text exactly: elements separated by ", ",
-- strings escaped as by json_build_array (\", \\, \b, \f, \n, \r, \t,
-- \u00XX for other control characters, everything else verbatim UTF-8).
CREATE FUNCTION audit_canonical(
    seq bigint, ts timestamptz, tenant_id text, actor text, event_type text,
    subject text, jti text, kid text, outcome text, reason text,
    request_id text, details jsonb
) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT json_build_array(
        1, seq, (extract(epoch FROM ts) * 1000000)::bigint, tenant_id, actor, event_type,
        subject, jti, kid, outcome, reason, request_id, details::text
    )::text
$$;

-- Chains a new row. seq, ts, prev_hash and hash given by the writer are
-- overwritten: ts is taken when the row joins the chain, so ts never
-- decreases along seq.
CREATE FUNCTION audit_events_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    head_seq  bigint;
    head_hash bytea;
BEGIN
    SELECT h.seq, h.hash INTO STRICT head_seq, head_hash
        FROM audit_head h WHERE h.id = 1 FOR UPDATE;
    NEW.seq := head_seq + 1;
    NEW.ts := clock_timestamp();
    NEW.prev_hash := head_hash;
    NEW.hash := sha256(head_hash || convert_to(audit_canonical(
        NEW.seq, NEW.ts, NEW.tenant_id, NEW.actor, NEW.event_type, NEW.subject,
        NEW.jti, NEW.kid, NEW.outcome, NEW.reason, NEW.request_id, NEW.details), 'UTF8'));
    UPDATE audit_head SET seq = NEW.seq, hash = NEW.hash WHERE id = 1;
    RETURN NEW;
END $$;

CREATE TRIGGER audit_events_chain BEFORE INSERT ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_chain();

-- Defence in depth: the trail is append-only. A superuser can still disable
-- these triggers; the hash chain is what exposes that.
CREATE FUNCTION audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

-- audit_head moves only from inside audit_events_chain (trigger depth > 1).
CREATE FUNCTION audit_head_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND pg_trigger_depth() > 1 THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_head is maintained by the audit chain trigger: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_head_guard BEFORE UPDATE OR DELETE ON audit_head
    FOR EACH ROW EXECUTE FUNCTION audit_head_guard();
CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_head_guard();
