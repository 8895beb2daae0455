-- 0003_roles: least privilege. Every fedtoken object belongs to the owner
-- role fedtoken_owner; the service runs as fedtoken_app, which owns nothing
-- and holds only the grants below (docs/security.md, "Database roles").
--
-- Why: whoever owns a table may ALTER TABLE ... DISABLE TRIGGER, and a
-- superuser may also SET session_replication_role = replica; either switches
-- off the append-only and chain triggers of the audit trail. A service role
-- that is no superuser and owns nothing can do neither.
--
-- Run by a superuser (the embedded server, a DBA), this creates the roles if
-- they are missing (fedtoken_app without a password: the embedded server or
-- the operator sets it), takes the attributes a service role must not have
-- away from fedtoken_app, and hands every object to fedtoken_owner. Run by a
-- plain owner role that may not create roles (an external database), it
-- creates none: it hands over what it can and grants only to roles that
-- exist, and says what it skipped in NOTICEs.
--
-- The chain trigger function runs as its owner (SECURITY DEFINER, with a
-- fixed search_path), so the service needs no right on audit_head beyond
-- SELECT: audit_head moves only through the trigger.
--
-- A later migration that creates an object hands it to fedtoken_owner and
-- grants fedtoken_app what the service needs, the same way.

DO $migration$
DECLARE
    schema_name text := current_schema();
    me_super boolean := (SELECT rolsuper FROM pg_roles WHERE rolname = current_user);
    may_create_roles boolean :=
        (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user);
    object record;
BEGIN
    IF schema_name IS NULL THEN
        RAISE EXCEPTION 'no current schema: fix the search_path of %', current_user;
    END IF;

    -- 1. The roles ---------------------------------------------------------------
    IF to_regrole('fedtoken_owner') IS NULL THEN
        IF may_create_roles THEN
            BEGIN
                CREATE ROLE fedtoken_owner NOLOGIN;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile from another database of the cluster
            END;
        ELSE
            RAISE NOTICE 'fedtoken: role fedtoken_owner does not exist and % may not '
                'create roles; the objects stay with %', current_user, current_user;
        END IF;
    END IF;
    IF to_regrole('fedtoken_app') IS NULL THEN
        IF may_create_roles THEN
            BEGIN
                CREATE ROLE fedtoken_app LOGIN;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        ELSE
            RAISE NOTICE 'fedtoken: role fedtoken_app does not exist and % may not '
                'create roles; nothing is granted', current_user;
        END IF;
    END IF;
    IF me_super AND to_regrole('fedtoken_app') IS NOT NULL THEN
        ALTER ROLE fedtoken_app NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;

    -- 2. Every object to the owner role -----------------------------------------
    IF to_regrole('fedtoken_owner') IS NOT NULL AND current_user <> 'fedtoken_owner' THEN
        FOR object IN
            SELECT 'TABLE' AS kind, c.oid::regclass::text AS name
              FROM unnest(ARRAY['tenants', 'keys', 'revocations', 'audit_events',
                                'audit_head', 'schema_migrations']) AS t(name)
              JOIN pg_class c ON c.oid = to_regclass(t.name)
            UNION ALL
            SELECT 'FUNCTION', p.oid::regprocedure::text
              FROM pg_proc p
              JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = schema_name
               AND p.proname IN ('fedtoken_notify_revocation', 'fedtoken_notify_keys',
                                 'fedtoken_notify_tenant', 'audit_canonical',
                                 'audit_events_chain', 'audit_append_only',
                                 'audit_head_guard')
        LOOP
            BEGIN
                EXECUTE format('ALTER %s %s OWNER TO fedtoken_owner', object.kind, object.name);
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE NOTICE 'fedtoken: % may not hand % % to fedtoken_owner',
                    current_user, lower(object.kind), object.name;
            END;
        END LOOP;
    END IF;

    -- 3. The chain trigger runs as the owner of audit_head ------------------------
    EXECUTE format('ALTER FUNCTION audit_events_chain() SECURITY DEFINER '
                   'SET search_path = %I, pg_temp', schema_name);
    REVOKE ALL ON FUNCTION fedtoken_notify_revocation(), fedtoken_notify_keys(),
        fedtoken_notify_tenant(), audit_events_chain(), audit_append_only(),
        audit_head_guard() FROM PUBLIC;

    -- 4. The service's grants -----------------------------------------------------
    IF to_regrole('fedtoken_app') IS NOT NULL THEN
        REVOKE ALL ON tenants, keys, revocations, audit_events, audit_head,
            schema_migrations FROM fedtoken_app;
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO fedtoken_app', schema_name);
        GRANT SELECT, INSERT, UPDATE ON tenants, keys TO fedtoken_app;
        GRANT SELECT, INSERT, UPDATE, DELETE ON revocations TO fedtoken_app;  -- the purge
        -- Only the columns a writer supplies; seq, ts and the hashes are the trigger's.
        GRANT SELECT ON audit_events TO fedtoken_app;
        GRANT INSERT (tenant_id, actor, event_type, subject, jti, kid, outcome, reason,
                      request_id, details) ON audit_events TO fedtoken_app;
        GRANT SELECT ON audit_head, schema_migrations TO fedtoken_app;
        -- audit verify recomputes the hashes with it.
        GRANT EXECUTE ON FUNCTION audit_canonical(bigint, timestamptz, text, text, text, text,
            text, text, text, text, text, jsonb) TO fedtoken_app;

        -- No CREATE in the schema: the service never defines objects.
        IF has_schema_privilege('fedtoken_app', schema_name, 'CREATE') THEN
            BEGIN
                EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM fedtoken_app', schema_name);
                IF has_schema_privilege('fedtoken_app', schema_name, 'CREATE') THEN
                    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC', schema_name);
                END IF;
            EXCEPTION WHEN insufficient_privilege THEN
                NULL;
            END;
            IF has_schema_privilege('fedtoken_app', schema_name, 'CREATE') THEN
                RAISE WARNING 'fedtoken: fedtoken_app may still create objects in schema %; '
                    'revoke CREATE on it (docs/security.md, Database roles)', schema_name;
            END IF;
        END IF;
    END IF;
END
$migration$;
