"""The in-memory revocation view and the task that keeps it current."""

from fedtoken.revocation.view import InMemoryRevocationView, RevocationEntry

__all__ = ["InMemoryRevocationView", "RevocationEntry"]
