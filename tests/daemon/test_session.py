"""``Session`` handlers against an embedded store, where a property needs a store that misbehaves."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from kvtier import KVLayout, Store, StoreConfig
from kvtier.config import HostConfig, TransferConfig
from kvtier.daemon.session import Session
from kvtier.store import Lease

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)


def test_a_get_with_many_gaps_waits_its_timeout_once_not_once_per_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A get (``prefix`` false) leases every readable key, one ``Store.acquire`` per gap; promotions stuck on a
    tier that does not answer must not cost the timeout again at every gap: the call ends by its deadline."""
    config = StoreConfig(host=HostConfig(capacity_bytes=64 * LAYOUT.block_bytes),
                         transfer=TransferConfig(backend="cpu"))
    with Store(LAYOUT, config) as store:
        keys = [bytes([i]) * 16 for i in range(8)]
        resident = keys[0::2]
        assert store.put(resident, [torch.full(LAYOUT.block_shape, float(i)) for i in range(4)]).wait(10).ok
        real_acquire = store.acquire
        waited: list[float] = []

        def acquire(wanted: Sequence[bytes], timeout: float | None = None) -> Lease:
            # The key after each resident one is stuck on a lower tier: the acquire waits its timeout for it.
            assert timeout is not None
            waited.append(timeout)
            time.sleep(timeout)
            return real_acquire(wanted[:1] if wanted[0] in resident else [], 0)

        monkeypatch.setattr(store, "acquire", acquire)
        session = Session(None, "unix", "test")  # type: ignore[arg-type]
        session.greeted, session.store = True, store
        message: dict[str, Any] = {"op": "acquire", "keys": keys, "prefix": False, "timeout": 0.3}
        started = time.monotonic()
        reply = session.handle(message)
        assert time.monotonic() - started < 0.6
        assert sum(waited) <= 0.3 + 0.05 and len(waited) == 4
        assert reply["keys"] == resident and [slot is not None for slot in reply["slots"]] == [True, False] * 4
        session.close()
