"""Token verification: the engine and the key resolvers it reads.

``NATIVE_AVAILABLE`` says whether the optional native fast path
(fedtoken._native) was built; engines use it unless told ``native=False``.
"""

from fedtoken.verifier.engine import NATIVE_AVAILABLE, VerificationEngine
from fedtoken.verifier.local import ChainedKeyResolver, LocalKeyResolver

__all__ = ["NATIVE_AVAILABLE", "ChainedKeyResolver", "LocalKeyResolver", "VerificationEngine"]
