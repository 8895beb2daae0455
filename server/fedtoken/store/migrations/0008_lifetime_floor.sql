-- 0008_lifetime_floor: lowering a tenant's maximum token lifetime.
--
-- Tokens issued under the old, longer lifetime stay valid until they expire,
-- so the keys that signed them must stay published until then (plus one JWKS
-- max-age and the leeway): tenants.earlier_tokens_expire_by remembers when the
-- last of them expires (NULL: no earlier, longer lifetime is still running).
-- The rotation schedule (fedtoken.core.rotation, Schedule.unpublish_at) and
-- RetireKey's grace check never unpublish a key before it.

ALTER TABLE tenants ADD COLUMN earlier_tokens_expire_by timestamptz;
