"""Token verification: the engine and the key resolvers it reads."""

from fedtoken.verifier.engine import VerificationEngine
from fedtoken.verifier.local import ChainedKeyResolver, LocalKeyResolver

__all__ = ["ChainedKeyResolver", "LocalKeyResolver", "VerificationEngine"]
