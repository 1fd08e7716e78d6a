"""The ordered chain of tiers below the host pool (nearest first: disk, then remote).

Promises:
- ``find`` and ``find_local`` answer from the tiers' local knowledge, without I/O; ``locate`` asks each tier
  only about the keys no nearer tier holds, one batch per tier.
- ``write_through`` offers a committed block to every tier in write-through mode, lending the payload to
  shared tiers (released once none holds it); ``demote`` offers an
  evicted block, without waiting, to every tier that does not hold it yet. A tier's refusal or failure
  never stops the others (a write-through raises the first failure once every tier was offered the block).
- Hits are counted per tier as the store reports them; ``stats`` maps each tier's name to its ``TierStats``.
- ``close`` closes every tier, nearest first, even when one fails.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from kvtier.config import StoreConfig
from kvtier.layout import KVLayout
from kvtier.stats import TierStats
from kvtier.tiers.base import LowerTier


class _Holds:
    """Counts the borrowers of a payload; the last one's ``done`` calls ``release`` (the chain holds one)."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._count = 1
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self._count += 1

    def done(self) -> None:
        with self._lock:
            self._count -= 1
            last = self._count == 0
        if last:
            self._release()


class TierChain:
    """Lower tiers, nearest first."""

    def __init__(self, tiers: Sequence[LowerTier] = ()) -> None:
        self.tiers = tuple(tiers)
        self._hits = {tier.name: 0 for tier in self.tiers}

    def __bool__(self) -> bool:
        return bool(self.tiers)

    def get(self, name: str) -> LowerTier | None:
        return next((tier for tier in self.tiers if tier.name == name), None)

    def find(self, key: bytes) -> LowerTier | None:
        """The nearest tier worth reading ``key`` from, by local knowledge."""
        return next((tier for tier in self.tiers if tier.contains(key)), None)

    def find_local(self, key: bytes) -> LowerTier | None:
        """The nearest tier private to this host that holds ``key`` (a put of it is then a duplicate)."""
        return next((tier for tier in self.tiers if tier.local and tier.contains(key)), None)

    def locate(self, keys: Sequence[bytes]) -> list[LowerTier | None]:
        """The nearest tier holding each key, asking each tier once about what the nearer ones lack."""
        found: list[LowerTier | None] = [None] * len(keys)
        for n, tier in enumerate(self.tiers):
            if n == 0:  # the nearest tier is asked about every key: no index lists to build
                found = [tier if hit else None for hit in tier.locate(keys)]
                continue
            todo = [i for i, where in enumerate(found) if where is None]
            if not todo:
                break
            for i, hit in zip(todo, tier.locate([keys[i] for i in todo]), strict=True):
                if hit:
                    found[i] = tier
        return found

    def write_through(self, key: bytes, payload: torch.Tensor, release: Callable[[], None]) -> None:
        """Offer a committed block to the write-through tiers. ``payload`` stays valid (the caller pins it)
        until ``release()``, called once when no tier borrows it any more: shared tiers send it from there
        instead of copying it on the caller's thread."""
        holds = _Holds(release)
        errors: list[Exception] = []
        try:
            for tier in self.tiers:
                if tier.write_mode == "through":
                    holds.add()
                    try:
                        tier.offer(key, payload, wait=tier.local, release=holds.done)
                    except Exception as exc:  # offer the others first, then report the first failure
                        errors.append(exc)
        finally:
            holds.done()
        if errors:
            raise errors[0]

    def demote(self, key: bytes, payload: torch.Tensor) -> bool:
        """Offer an evicted block to every tier lacking it; whether any took it."""
        taken = False
        for tier in self.tiers:
            if not tier.contains(key) and tier.offer(key, payload, wait=False):
                taken = True
        return taken

    def on_access(self, keys: Sequence[bytes], hit_flags: Sequence[bool]) -> None:
        for tier in self.tiers:
            tier.on_access(keys, hit_flags)

    def count_hits(self, name: str, num_blocks: int) -> None:
        self._hits[name] += num_blocks

    def flush(self, deadline: float) -> None:
        """Flush every tier by ``deadline`` (``time.monotonic``), else ``FlushTimeoutError``."""
        for tier in self.tiers:
            tier.flush(deadline)

    def stats(self) -> dict[str, TierStats]:
        return {tier.name: tier.stats(self._hits[tier.name]) for tier in self.tiers}

    def close(self) -> None:
        errors: list[BaseException] = []
        for tier in self.tiers:
            try:
                tier.close()
            except Exception as exc:  # close the others first, then report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]


def build_chain(config: StoreConfig, layout: KVLayout, slot_bytes: int) -> TierChain:
    """The tiers ``config`` asks for: disk if ``disk.paths``, then remote if ``remote.urls``."""
    tiers: list[LowerTier] = []
    try:
        if config.disk.paths:
            from kvtier.tiers.disk import DiskAdapter

            tiers.append(DiskAdapter(config.disk, layout, slot_bytes))
        if config.remote.urls:
            from kvtier.tiers.remote import RemoteTier

            tiers.append(RemoteTier(config.remote, layout))
    except BaseException:
        TierChain(tiers).close()
        raise
    return TierChain(tiers)
