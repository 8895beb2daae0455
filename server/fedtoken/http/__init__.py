"""The HTTP bridge: JWKS, OIDC discovery, health."""
