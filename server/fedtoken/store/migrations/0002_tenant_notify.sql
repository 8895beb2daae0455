-- 0002_tenant_notify: tenant changes are notified like revocations and keys.
--
-- Change notifications, all on channel 'fedtoken_events' (the Python copy of
-- the name is fedtoken.store.EVENTS_CHANNEL). Every replica LISTENs on it and
-- refreshes its in-memory state on these JSON payloads, delivered at commit
-- and only if the transaction commits:
--
--   {"type": "revocation", "tenant": T, "kind": K, "value": V,
--    "expires_at": unix seconds, "not_before": unix seconds or null}
--       revocations, AFTER INSERT OR UPDATE (0001). Times are rounded up:
--       for an integer iat, iat < not_before holds exactly when
--       iat < ceil(not_before), and a later expiry only errs on the safe side.
--   {"type": "keys", "tenant": T, "kid": KID, "state": S}
--       keys, AFTER INSERT OR UPDATE (0001).
--   {"type": "tenant", "tenant": T}
--       tenants, AFTER INSERT OR UPDATE (this migration): a new tenant, or a
--       changed issuer or policy; the replica reloads that tenant.
--
-- Senders of other payloads (e.g. a replica's own heartbeats) pick a "type"
-- of their own; listeners ignore types they do not know. Triggers send them
-- so that any writer, including an operator with psql, reaches every
-- replica. A replica whose listening connection drops must resync from the
-- tables: notifications are not queued for it.

CREATE FUNCTION fedtoken_notify_tenant() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fedtoken_events', json_build_object(
        'type', 'tenant', 'tenant', NEW.id, 'issuer', NEW.issuer,
        'max_token_lifetime_s', NEW.max_token_lifetime_s,
        'default_token_lifetime_s', NEW.default_token_lifetime_s,
        'allowed_algorithms', NEW.allowed_algorithms, 'key_size', NEW.key_size)::text);
    RETURN NULL;
END $$;

CREATE TRIGGER tenants_notify AFTER INSERT OR UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION fedtoken_notify_tenant();
