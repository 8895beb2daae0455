"""Federation: the remote JWKS cache of the trusted foreign issuers.

An adapter (it imports ``fedtoken.core`` only): ``RemoteJwksCache``
implements ``fedtoken.core.ports.TrustedKeys`` over aiohttp. Build order for
a composition root::

    cache = RemoteJwksCache(store=key_set_store, clock=clock,
                            settings=CacheSettings(...), ca_file=settings.ca_file,
                            on_fetch=audit_and_count)
    cache.configure(trusted_issuers)     # before or after start, then on changes
    await cache.start()                  # loads persisted sets, starts refreshing
    ...
    await cache.close()

``freshness`` holds the pure rules (Cache-Control, schedule, backoff,
budget); ``fetch`` the bounded HTTP client.
"""

from fedtoken.federation.cache import CacheSettings, RemoteJwksCache

__all__ = ["CacheSettings", "RemoteJwksCache"]
