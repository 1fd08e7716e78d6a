"""The store against a plain dict: random puts, gets, lookups, pins and evictions never return wrong bytes.

The model holds exactly what the store holds: a key enters with a put reported successful and leaves only
through an eviction the store counts, so a store that loses a committed block, or reports a get of a
resident block as failed, fails the test.
"""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier import HostConfig, KVLayout, Store, StoreConfig, TransferConfig
from kvtier.store import Lease

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", block_tokens=2)
NUM_SLOTS = 4
KEYS = [i.to_bytes(16, "little") for i in range(10)]


def block_for(key_index: int, version: int) -> torch.Tensor:
    return torch.full(LAYOUT.block_shape, float(key_index * 100 + version))


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        config = StoreConfig(host=HostConfig(capacity_bytes=NUM_SLOTS * 4096, policy="s3fifo"),
                             transfer=TransferConfig(backend="cpu", num_workers=2))
        self.store = Store(LAYOUT, config)
        self.model: dict[bytes, torch.Tensor] = {}  # what was put under each key, first copy wins
        self.leases: list[Lease] = []
        self.version = 0
        self.evictions = 0

    def sync_evictions(self) -> None:
        """Drop from the model the keys the store evicted; each must match a counted eviction."""
        evictions = self.store.stats().tiers["host"].evicted_blocks
        gone = [key for key in self.model if self.store.contains(key) is None]
        assert len(gone) == evictions - self.evictions, (gone, evictions, self.evictions)
        for key in gone:
            del self.model[key]
        self.evictions = evictions

    @rule(indices=st.lists(st.integers(0, 9), min_size=1, max_size=5, unique=True))
    def put(self, indices: list[int]) -> None:
        self.version += 1
        blocks = [block_for(i, self.version) for i in indices]
        result = self.store.put([KEYS[i] for i in indices], blocks).wait(10)
        for position, (i, block) in enumerate(zip(indices, blocks, strict=True)):
            if position not in result.failed:
                self.model.setdefault(KEYS[i], block)

    @rule(indices=st.lists(st.integers(0, 9), min_size=1, max_size=5, unique=True))
    def get(self, indices: list[int]) -> None:
        out = [torch.full(LAYOUT.block_shape, -1.0) for _ in indices]
        result = self.store.get([KEYS[i] for i in indices], out).wait(10)
        for position, i in enumerate(indices):
            if KEYS[i] in self.model:  # resident: a get never fails, and returns the first copy put
                assert position not in result.failed and torch.equal(out[position], self.model[KEYS[i]])
            else:
                assert position in result.failed

    @rule(indices=st.lists(st.integers(0, 9), min_size=1, max_size=5, unique=True))
    def lookup(self, indices: list[int]) -> None:
        found = self.store.lookup([KEYS[i] for i in indices])
        leading = 0
        while leading < len(indices) and KEYS[indices[leading]] in self.model:
            leading += 1
        assert found.num_blocks == leading

    @precondition(lambda self: len(self.leases) < 2)
    @rule(indices=st.lists(st.integers(0, 9), min_size=1, max_size=2, unique=True))
    def pin(self, indices: list[int]) -> None:
        self.leases.append(self.store.acquire([KEYS[i] for i in indices]))

    @precondition(lambda self: bool(self.leases))
    @rule()
    def unpin(self) -> None:
        self.store.release(self.leases.pop())

    @invariant()
    def capacity_and_pins_hold(self) -> None:
        host = self.store.stats().tiers["host"]
        assert host.used_blocks <= NUM_SLOTS
        for lease in self.leases:
            for key, slot in zip(lease.keys, lease.slots, strict=True):
                assert self.store.host.is_ready(key)  # pinned blocks are never evicted
                assert torch.equal(self.store.slot_view(slot).view(LAYOUT.block_shape), self.model[key])
        # Evicted keys leave the model (a later put may store a new version under them), only counted ones.
        self.sync_evictions()

    def teardown(self) -> None:
        self.store.close()


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestStoreMachine = StoreMachine.TestCase
