-- 0006_audit_retention: removing old audit rows without losing the proof.
--
-- The trail stays append-only for everyone. Old rows leave it only through
-- audit_prune(), which the retention job calls after it has written the rows
-- to an archive file (docs/security.md, "Audit retention"):
--
--   * rows are removed from the oldest up to a row that a signed checkpoint
--     pins (its seq and hash are given, and the row must have that hash), and
--     never the newest row, so the chain always continues from a known hash;
--   * audit_anchor keeps that (seq, hash), the checkpoint line and the name of
--     the archive file: the chain is verified from the anchor on, and the
--     anchor itself must be a checkpoint signed by the HSM key (checked
--     offline by `fedtoken audit verify --checkpoints`), so an anchor moved by
--     hand, or rows removed without their archive, are caught;
--   * no row younger than audit_retention_floor.min_age_s (one hour unless
--     the owner changes it) is ever removed, whatever the caller asks;
--   * every removal appends an 'audit.pruned' event to the chain in the same
--     transaction.
--
-- Why not time partitions and DROP: the chain trigger assigns seq, ts and the
-- hashes under the audit_head lock, after Postgres has routed the row to a
-- partition, so a partition key cannot be any of them; and the verification
-- rows are already compact (one row per up to 1000 verdicts, about 32 bytes per
-- verification: bench/audit_volume.py), so a batched DELETE is cheap.

CREATE TABLE audit_anchor (
    id         integer PRIMARY KEY CHECK (id = 1),
    seq        bigint NOT NULL CHECK (seq > 0),
    hash       bytea NOT NULL CHECK (length(hash) = 32),
    checkpoint text NOT NULL,
    archive    text NOT NULL,
    pruned_at  timestamptz NOT NULL
);

CREATE TABLE audit_retention_floor (
    id        integer PRIMARY KEY CHECK (id = 1),
    min_age_s integer NOT NULL CHECK (min_age_s >= 0)
);
INSERT INTO audit_retention_floor (id, min_age_s) VALUES (1, 3600);

-- Append-only, except inside audit_prune (which sets a transaction-local flag
-- and runs as the owner; the service role has no DELETE right at all).
CREATE OR REPLACE FUNCTION audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('fedtoken.audit_prune', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the audit trail is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE FUNCTION audit_prune(upto bigint, upto_hash bytea, checkpoint text, archive text,
                            actor text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    head_seq   bigint;
    anchor_seq bigint;
    row_hash   bytea;
    row_ts     timestamptz;
    floor_s    integer;
    cp         jsonb;
    removed    bigint;
BEGIN
    -- One prune at a time (replicas may all run the job).
    PERFORM pg_advisory_xact_lock(7305093410952847726);
    SELECT h.seq INTO STRICT head_seq FROM audit_head h WHERE h.id = 1;
    SELECT a.seq INTO anchor_seq FROM audit_anchor a WHERE a.id = 1 FOR UPDATE;
    anchor_seq := coalesce(anchor_seq, 0);
    IF upto <= anchor_seq THEN
        RETURN 0;  -- already removed: idempotent
    END IF;
    IF upto >= head_seq THEN
        RAISE EXCEPTION 'audit_prune: row % is the newest (or beyond it); the newest row is '
            'always kept', upto USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT e.hash, e.ts INTO row_hash, row_ts FROM audit_events e WHERE e.seq = upto;
    IF row_hash IS NULL OR row_hash <> upto_hash THEN
        RAISE EXCEPTION 'audit_prune: row % does not have the checkpointed hash', upto
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        cp := checkpoint::jsonb;
    EXCEPTION WHEN others THEN
        cp := NULL;
    END;
    IF cp IS NULL OR jsonb_typeof(cp -> 'seq') <> 'number' OR (cp ->> 'seq')::bigint <> upto
            OR cp ->> 'hash' IS DISTINCT FROM encode(upto_hash, 'hex')
            OR cp ->> 'sig' IS NULL THEN
        RAISE EXCEPTION 'audit_prune: the checkpoint does not sign row % with its hash', upto
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT f.min_age_s INTO STRICT floor_s FROM audit_retention_floor f WHERE f.id = 1;
    IF row_ts > clock_timestamp() - make_interval(secs => floor_s) THEN
        RAISE EXCEPTION 'audit_prune: row % is younger than the retention floor (% s)',
            upto, floor_s USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF archive IS NULL OR archive = '' OR length(archive) > 1024 THEN
        RAISE EXCEPTION 'audit_prune: name the archive that holds the rows'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    PERFORM set_config('fedtoken.audit_prune', 'on', true);
    DELETE FROM audit_events e WHERE e.seq > anchor_seq AND e.seq <= upto;
    GET DIAGNOSTICS removed = ROW_COUNT;
    PERFORM set_config('fedtoken.audit_prune', 'off', true);

    INSERT INTO audit_anchor (id, seq, hash, checkpoint, archive, pruned_at)
        VALUES (1, upto, upto_hash, checkpoint, archive, clock_timestamp())
        ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash,
            checkpoint = EXCLUDED.checkpoint, archive = EXCLUDED.archive,
            pruned_at = EXCLUDED.pruned_at;
    INSERT INTO audit_events (actor, event_type, outcome, details)
        VALUES (left(coalesce(actor, ''), 1024), 'audit.pruned', 'ok', jsonb_build_object(
            'from_seq', anchor_seq + 1, 'to_seq', upto, 'rows', removed,
            'hash', encode(upto_hash, 'hex'), 'archive', archive));
    RETURN removed;
END $$;

-- Least privilege, as in 0003: the owner role owns; the service may read the
-- anchor and call audit_prune, nothing else.
DO $migration$
DECLARE
    schema_name text := current_schema();
BEGIN
    IF to_regrole('fedtoken_owner') IS NOT NULL AND current_user <> 'fedtoken_owner' THEN
        BEGIN
            ALTER TABLE audit_anchor OWNER TO fedtoken_owner;
            ALTER TABLE audit_retention_floor OWNER TO fedtoken_owner;
            ALTER FUNCTION audit_prune(bigint, bytea, text, text, text) OWNER TO fedtoken_owner;
            ALTER FUNCTION audit_append_only() OWNER TO fedtoken_owner;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'fedtoken: % may not hand the retention objects to fedtoken_owner',
                current_user;
        END;
    END IF;
    EXECUTE format('ALTER FUNCTION audit_prune(bigint, bytea, text, text, text) '
                   'SECURITY DEFINER SET search_path = %I, pg_temp', schema_name);
    REVOKE ALL ON FUNCTION audit_prune(bigint, bytea, text, text, text) FROM PUBLIC;
    REVOKE ALL ON FUNCTION audit_append_only() FROM PUBLIC;
    IF to_regrole('fedtoken_app') IS NOT NULL THEN
        REVOKE ALL ON audit_anchor, audit_retention_floor FROM fedtoken_app;
        GRANT SELECT ON audit_anchor, audit_retention_floor TO fedtoken_app;
        GRANT EXECUTE ON FUNCTION audit_prune(bigint, bytea, text, text, text) TO fedtoken_app;
    END IF;
END
$migration$;
