"""The interface of a tier below the host pool, as the store and the chain use it.

A lower tier holds verified copies of host blocks. The store never names a tier: it asks the chain
(``kvtier.tiers.chain``) which tier holds a key, offers blocks to the tiers, and promotes from the nearest.

Promises every implementation keeps:
- ``contains`` answers from what the tier knows locally, without I/O: ``True`` means a read is worth trying.
- ``locate`` may ask the tier's backing store (one round trip per server at most) and is bounded by the
  tier's timeout; a tier that cannot answer says ``False``.
- ``offer`` never waits for I/O unless ``wait`` is true and returns whether the block was taken (or already
  held). Without ``release`` it copies the payload before it returns; with it, the tier may borrow the
  payload until it calls ``release()``, which it does exactly once (at once if it keeps no reference).
- ``submit_read`` lands the block's verified bytes in ``dst`` and resolves to ``True``; a miss, a corrupt,
  truncated or foreign value, or a fault resolves to ``False`` (counted), never to wrong bytes or an error.
- ``stats`` answers after ``close``; ``close`` is idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Literal, Protocol

import torch

from kvtier.stats import TierStats

WriteMode = Literal["back", "through"]


class LowerTier(Protocol):
    """One tier below the host pool (see the module docstring)."""

    # "disk", "remote": the value a lookup reports for blocks found here.
    name: str
    # "through": offered every committed block; "back": offered host evictions only.
    write_mode: WriteMode
    # Private to this host (a put of a key it holds is deduplicated) or shared with other hosts (it may
    # evict on its own, so its copy never stands in for the host's).
    local: bool

    def contains(self, key: bytes) -> bool: ...

    def locate(self, keys: Sequence[bytes]) -> list[bool]: ...

    def offer(self, key: bytes, payload: torch.Tensor, *, wait: bool = False,
              release: Callable[[], None] | None = None) -> bool: ...

    def submit_read(self, key: bytes, dst: torch.Tensor) -> Future[bool]: ...

    def on_access(self, keys: Sequence[bytes], hit_flags: Sequence[bool]) -> None: ...

    def flush(self, deadline: float | None = None) -> None: ...

    def stats(self, hit_blocks: int) -> TierStats: ...

    def close(self) -> None: ...
