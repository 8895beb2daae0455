"""Token verification: the engine and the local key resolver it reads.

Build order for a composition root::

    resolver = LocalKeyResolver()            # a KeyResolver and a KeyTable
    resolver.replace(tenants, keys)          # the catalog, on every change
    engine = VerificationEngine(resolver, revocations, clock=clock,
                                threads=n, native=None)

``NATIVE_AVAILABLE`` says whether the optional native fast path
(fedtoken._native) was built; engines use it unless told ``native=False``.
The engine owns its native table (``fedtoken.verifier.native.NativePath``);
nothing outside it builds or feeds one.
"""

from fedtoken.verifier.engine import VerificationEngine
from fedtoken.verifier.local import LocalKeyResolver
from fedtoken.verifier.native import NATIVE_AVAILABLE

__all__ = ["NATIVE_AVAILABLE", "LocalKeyResolver", "VerificationEngine"]
