-- 0007_rotation: scheduled key rotation (fedtoken.core.rotation).
--
-- tenants.rotation_period_s: a new signing key every this many seconds
-- (default 30 days); every other timing of the schedule (prepublication,
-- grace, JWKS max-age) is derived from it, the token lifetime and the
-- settings, so it is computed, never stored. The lower bound here is only a
-- backstop: the service refuses periods under min_rotation_period_seconds.
--
-- keys.private_destroyed_at: when the private half was destroyed in the HSM
-- (C_DestroyObject), as soon as the key stopped signing and its successor
-- was active. NULL: it may still exist (the scheduler destroys it, and the
-- compliance report flags a published key that should have none).
--
-- The tenant notification carries the new column, so a change of the period
-- alone (even by psql) reloads every replica's catalog.

ALTER TABLE tenants
    ADD COLUMN rotation_period_s integer NOT NULL DEFAULT 2592000
        CHECK (rotation_period_s > 0);

ALTER TABLE keys ADD COLUMN private_destroyed_at timestamptz;

CREATE OR REPLACE FUNCTION fedtoken_notify_tenant() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fedtoken_events', json_build_object(
        'type', 'tenant', 'tenant', NEW.id, 'issuer', NEW.issuer,
        'max_token_lifetime_s', NEW.max_token_lifetime_s,
        'default_token_lifetime_s', NEW.default_token_lifetime_s,
        'allowed_algorithms', NEW.allowed_algorithms, 'key_size', NEW.key_size,
        'rotation_period_s', NEW.rotation_period_s)::text);
    RETURN NULL;
END $$;

-- Least privilege, as in 0003: the new columns fall under the table grants
-- fedtoken_app already holds (SELECT, INSERT, UPDATE on tenants and keys);
-- the replaced function stays the owner's and nobody else may call it.
DO $migration$
BEGIN
    IF to_regrole('fedtoken_owner') IS NOT NULL AND current_user <> 'fedtoken_owner' THEN
        BEGIN
            ALTER FUNCTION fedtoken_notify_tenant() OWNER TO fedtoken_owner;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'fedtoken: % may not hand fedtoken_notify_tenant to fedtoken_owner',
                current_user;
        END;
    END IF;
    REVOKE ALL ON FUNCTION fedtoken_notify_tenant() FROM PUBLIC;
    IF to_regrole('fedtoken_app') IS NOT NULL THEN
        GRANT SELECT, INSERT, UPDATE ON tenants, keys TO fedtoken_app;
    END IF;
END $migration$;
