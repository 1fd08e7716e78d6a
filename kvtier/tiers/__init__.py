"""The tiers below the host pool: one interface (``base.LowerTier``), the ordered chain the store composes
(``chain``), and its implementations: ``disk`` (the local disk tier) and ``remote`` (a Redis-protocol store
shared by many hosts, with ``values``, its value format, and ``redis_client``). ``servers`` starts local
Redis-protocol servers for the tests and the benchmark.

A new tier (an object store, NIXL, GPUDirect Storage) is one new module implementing ``LowerTier`` and one
line in ``chain.build_chain``.
"""

from kvtier.tiers.base import LowerTier
from kvtier.tiers.chain import TierChain, build_chain

__all__ = ["LowerTier", "TierChain", "build_chain"]
