-- 0004_callers: zero-trust caller grants. A row gives one role to one
-- workload identity (a SPIFFE ID), optionally limited to tenants and, for
-- issuers, to audiences and a maximum token lifetime. Deny by default: an
-- identity with no row may do nothing (bootstrap admins come from the
-- configuration, never from this table).
--
-- Every change is notified on fedtoken_events as
--   {"type": "callers", "identity": ID, "role": R}
-- so a grant or its revocation reaches every replica within the same bound
-- as a token revocation.

CREATE TABLE caller_grants (
    identity       text NOT NULL CHECK (identity LIKE 'spiffe://%' AND length(identity) <= 2048),
    role           text NOT NULL
                   CHECK (role IN ('admin', 'issuer', 'verifier', 'revoker', 'auditor')),
    tenants        text[] NOT NULL DEFAULT '{}',
    audiences      text[] NOT NULL DEFAULT '{}',
    max_lifetime_s integer NOT NULL DEFAULT 0 CHECK (max_lifetime_s >= 0),
    created_at     timestamptz NOT NULL,
    granted_by     text NOT NULL DEFAULT '',
    PRIMARY KEY (identity, role),
    CHECK (role = 'issuer' OR (audiences = '{}' AND max_lifetime_s = 0))
);

CREATE FUNCTION fedtoken_notify_callers() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify('fedtoken_events', json_build_object(
        'type', 'callers', 'identity', r.identity, 'role', r.role)::text);
    RETURN NULL;
END $$;

CREATE TRIGGER caller_grants_notify AFTER INSERT OR UPDATE OR DELETE ON caller_grants
    FOR EACH ROW EXECUTE FUNCTION fedtoken_notify_callers();

-- Least privilege, as in 0003: the owner role owns, the service role uses.
DO $migration$
BEGIN
    IF to_regrole('fedtoken_owner') IS NOT NULL AND current_user <> 'fedtoken_owner' THEN
        BEGIN
            ALTER TABLE caller_grants OWNER TO fedtoken_owner;
            ALTER FUNCTION fedtoken_notify_callers() OWNER TO fedtoken_owner;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'fedtoken: % may not hand caller_grants to fedtoken_owner',
                current_user;
        END;
    END IF;
    IF to_regrole('fedtoken_app') IS NOT NULL THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON caller_grants TO fedtoken_app;
    END IF;
END $migration$;
