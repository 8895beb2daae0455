"""The LISTEN/NOTIFY feed that keeps a replica's in-memory state current."""

from fedtoken.events.feed import EventFeed, FeedBroken, revocation_loader

__all__ = ["EventFeed", "FeedBroken", "revocation_loader"]
