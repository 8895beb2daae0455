"""The in-memory revocation view (``fedtoken.events`` keeps it current)."""

from fedtoken.revocation.view import InMemoryRevocationView, RevocationEntry

__all__ = ["InMemoryRevocationView", "RevocationEntry"]
