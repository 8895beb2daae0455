-- 0005_trust: federation. The foreign issuers our tenants trust, and the last
-- good key set of each, kept so that a restart during a partner's outage
-- still verifies its tokens (within that issuer's maximum staleness).
--
-- trusted_issuers: one row per foreign issuer (its exact `iss`), with how to
-- find its keys (jwks_uri, or '' for OIDC discovery under the issuer), the
-- algorithms accepted from it, the audiences it may address ('{}': any), the
-- subject namespace of token exchange, the maximum staleness of its key set,
-- and the local tenants that trust it (a foreign token verifies only in one
-- of them). The service validates every field (fedtoken.core.trust); the
-- checks below are the backstop for any other writer.
--
-- Every change is notified on fedtoken_events as
--   {"type": "trust", "issuer": ISSUER}
-- so that every replica reconfigures its remote JWKS cache.
--
-- A tenant's issuer and a trusted issuer never coincide (a token of ours
-- verifies as ours only): triggers refuse a trusted issuer that names a
-- tenant's issuer, and a tenant whose issuer is trusted.

CREATE TABLE trusted_issuers (
    issuer      text PRIMARY KEY
                CHECK (length(issuer) <= 512
                       AND issuer ~ '^https?://[^/?#@[:space:]\\]+(/[^?#[:space:]\\]*)?$'),
    jwks_uri    text NOT NULL DEFAULT ''
                CHECK (jwks_uri = ''
                       OR (length(jwks_uri) <= 512
                           AND jwks_uri ~ '^https?://[^/?#@[:space:]\\]+(/[^?#[:space:]\\]*)?$')),
    algorithms  text[] NOT NULL
                CHECK (cardinality(algorithms) > 0
                       AND algorithms <@ ARRAY['RS256', 'PS256']::text[]),
    audiences   text[] NOT NULL DEFAULT '{}' CHECK (cardinality(audiences) <= 16),
    tenants     text[] NOT NULL CHECK (cardinality(tenants) BETWEEN 1 AND 256),
    -- One label ending in its only ':' (fedtoken.core.trust.NAMESPACE), unique:
    -- a namespaced subject then names exactly one issuer.
    namespace   text NOT NULL UNIQUE
                CHECK (namespace ~ '^[A-Za-z0-9][A-Za-z0-9._~/-]{0,126}:$'),
    max_stale_s integer NOT NULL CHECK (max_stale_s > 0),
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    -- Who made the current definition (the audit trail has every earlier one).
    added_by    text NOT NULL DEFAULT '' CHECK (length(added_by) <= 4096)
);

-- The last good key set of an issuer, as fetched from jwks_uri (a body
-- fetched from another URI than the issuer's current one is not used).
-- Removing the issuer removes it.
CREATE TABLE trusted_key_sets (
    issuer     text PRIMARY KEY REFERENCES trusted_issuers (issuer) ON DELETE CASCADE,
    jwks_uri   text NOT NULL CHECK (length(jwks_uri) BETWEEN 1 AND 512),
    body       bytea NOT NULL CHECK (length(body) BETWEEN 1 AND 65536),
    etag       text NOT NULL DEFAULT '' CHECK (length(etag) <= 256),
    -- When this body was last confirmed by the issuer (a 200 or a 304).
    fetched_at timestamptz NOT NULL
);

-- Tenants are a text[] (no foreign key can point from an array), so a
-- trigger checks that each exists. SQLSTATE foreign_key_violation: the store
-- reports it as an unknown tenant.
CREATE FUNCTION fedtoken_check_trust() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    SELECT t INTO missing FROM unnest(NEW.tenants) AS t
     WHERE NOT EXISTS (SELECT FROM tenants WHERE id = t) LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'trusted issuer: tenant % does not exist', missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF EXISTS (SELECT FROM tenants WHERE issuer = NEW.issuer) THEN
        RAISE EXCEPTION 'trusted issuer: it is the issuer of a local tenant'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER trusted_issuers_check BEFORE INSERT OR UPDATE ON trusted_issuers
    FOR EACH ROW EXECUTE FUNCTION fedtoken_check_trust();

CREATE FUNCTION fedtoken_check_tenant_issuer() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM trusted_issuers WHERE issuer = NEW.issuer) THEN
        RAISE EXCEPTION 'tenant: its issuer is a trusted foreign issuer'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER tenants_issuer_not_trusted BEFORE INSERT OR UPDATE OF issuer ON tenants
    FOR EACH ROW EXECUTE FUNCTION fedtoken_check_tenant_issuer();

CREATE FUNCTION fedtoken_notify_trust() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify('fedtoken_events', json_build_object(
        'type', 'trust', 'issuer', r.issuer)::text);
    RETURN NULL;
END $$;

CREATE TRIGGER trusted_issuers_notify AFTER INSERT OR UPDATE OR DELETE ON trusted_issuers
    FOR EACH ROW EXECUTE FUNCTION fedtoken_notify_trust();

-- Least privilege, as in 0003: the owner role owns, the service role uses.
-- The service never deletes a key set by itself: one goes with its issuer
-- (the cascade runs with the owner's rights), so fedtoken_app gets no DELETE
-- on trusted_key_sets.
DO $migration$
BEGIN
    IF to_regrole('fedtoken_owner') IS NOT NULL AND current_user <> 'fedtoken_owner' THEN
        BEGIN
            ALTER TABLE trusted_issuers OWNER TO fedtoken_owner;
            ALTER TABLE trusted_key_sets OWNER TO fedtoken_owner;
            ALTER FUNCTION fedtoken_check_trust() OWNER TO fedtoken_owner;
            ALTER FUNCTION fedtoken_check_tenant_issuer() OWNER TO fedtoken_owner;
            ALTER FUNCTION fedtoken_notify_trust() OWNER TO fedtoken_owner;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'fedtoken: % may not hand the trust tables to fedtoken_owner',
                current_user;
        END;
    END IF;
    REVOKE ALL ON FUNCTION fedtoken_check_trust(), fedtoken_check_tenant_issuer(),
        fedtoken_notify_trust() FROM PUBLIC;
    IF to_regrole('fedtoken_app') IS NOT NULL THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON trusted_issuers TO fedtoken_app;
        GRANT SELECT, INSERT, UPDATE ON trusted_key_sets TO fedtoken_app;
    END IF;
END $migration$;
