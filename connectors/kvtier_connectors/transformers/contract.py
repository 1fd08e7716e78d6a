"""The correctness contract of a restore, measured: what the demo, the benchmark and the tests check.

The contract, on every CPU and GPU:
- The store's promise is exact: the KV restored into the cache is byte-identical (``torch.equal``) to
  the KV that was saved. ``RecordingStore`` keeps a copy of every block saved through it, and
  ``restored_kv_identical`` compares a restored cache with those copies.
- The model-level promise is numerical: the logits after a restore match a full recompute's within the
  engine's own noise between prompt lengths (GEMM kernels sum in an order that follows the shapes, which
  differ between a tail forward and a full one; which rows differ depends on the BLAS and the CPU). The
  bound is ``RTOL[dtype]`` times the largest reference logit (at least 1), and the top-1 token agrees
  unless the reference's own top-2 margin is within that bound (a near tie, decided by noise).
- "identical" is said only where ``torch.equal`` holds.

Promises:
- ``compare_logits`` returns every measured figure (``Agreement``) and ``within_noise`` is the verdict;
  nothing here depends on one BLAS's kernel choices.
- ``RecordingStore`` forwards every ``BlockStore`` method to the store it wraps and changes nothing it
  stores; it records blocks committed through ``reserve``/``commit`` and blocks ``put``.
- ``kv_prefix_equal`` compares two caches' first tokens (``torch.equal``).
- ``greedy_continuation`` decodes a few tokens greedily from a prompt's cache and first logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from kvtier import BlockHasher, KVLayout, Lease, LookupResult, Reservation
from kvtier_connectors.transformers.adapter import BlockStore, cache_kwarg

# Bound on max |logit difference| after a restore, relative to the largest reference logit (at least 1).
# fp32: noise measured at 1e-6 of the logits' scale (AVX2, AVX-512 and ATen's default kernels); a block of
# wrong KV moves them by about 0.3 of it. bf16/fp16: a few units in the last place of the logits.
RTOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Agreement:
    """How the logits of a restored prefill compare with a full recompute's (last position)."""

    max_abs_logit_diff: float
    tolerance: float
    top1_agree: bool
    top1_margin: float  # the reference's top-1 logit minus its top-2
    logits_identical: bool  # torch.equal

    @property
    def within_noise(self) -> bool:
        """The model-level contract: differences within the tolerance, and the top-1 token agrees or ties."""
        decided = self.top1_agree or self.top1_margin <= self.tolerance
        return self.max_abs_logit_diff <= self.tolerance and decided


def tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """The bound on max |logit difference| for a model in ``dtype`` whose reference logits are ``reference``."""
    rtol = RTOL.get(dtype, RTOL[torch.bfloat16])
    return rtol * max(1.0, float(reference.detach().float().abs().max()))


def compare_logits(logits: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> Agreement:
    """Compare two ``[batch, vocab]`` logits of a model in ``dtype``: the restored one and the recompute's."""
    diff = float((logits.float() - reference.float()).abs().max())
    top2 = reference.float().topk(2, dim=-1).values
    margin = float((top2[..., 0] - top2[..., 1]).min())
    agree = bool(torch.equal(logits.argmax(-1), reference.argmax(-1)))
    return Agreement(diff, tolerance(dtype, reference), agree, margin, bool(torch.equal(logits, reference)))


def kv_planes(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)``, ``[batch, kv_heads, tokens, head_dim]``."""
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


def kv_prefix_equal(cache: DynamicCache, reference: DynamicCache, num_tokens: int) -> bool:
    """Whether every layer's first ``num_tokens`` tokens of K and V are the reference's (``torch.equal``)."""
    return all(torch.equal(k[:, :, :num_tokens], ref_k[:, :, :num_tokens])
               and torch.equal(v[:, :, :num_tokens], ref_v[:, :, :num_tokens])
               for (k, v), (ref_k, ref_v) in zip(kv_planes(cache), kv_planes(reference), strict=True))


def block_of(cache: DynamicCache, row: int, start: int, end: int) -> torch.Tensor:
    """Tokens ``start:end`` of batch row ``row`` of ``cache`` as ``[layers, 2, kv_heads, end - start, head_dim]``."""
    return torch.stack([torch.stack((k[row, :, start:end], v[row, :, start:end])) for k, v in kv_planes(cache)])


def restored_kv_identical(cache: DynamicCache, layout: KVLayout, keys: Sequence[bytes], num_tokens: int,
                          saved: dict[bytes, torch.Tensor], row: int = 0) -> bool:
    """Whether the first ``num_tokens`` tokens of ``cache`` equal the saved blocks ``keys`` (``torch.equal``).

    A key without a saved copy counts as a difference: what cannot be checked is not called identical.
    """
    for index in range(-(-num_tokens // layout.block_tokens)):
        start = index * layout.block_tokens
        end = min(start + layout.block_tokens, num_tokens)
        block = saved.get(keys[index])
        if block is None:
            return False
        restored = block_of(cache, row, start, end).cpu()
        if not torch.equal(restored, block[:, :, :, : end - start]):
            return False
    return True


class RecordingStore:
    """A ``BlockStore`` that keeps a CPU copy of every block written through it, by key.

    A block is recorded when it is written (a commit, or a put of a key the store lacks), replacing an
    older copy: a key evicted from every tier and saved again holds the new bytes in the store too.
    """

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self.saved: dict[bytes, torch.Tensor] = {}

    @property
    def layout(self) -> KVLayout:
        return self.store.layout

    def _record(self, key: bytes, block: torch.Tensor) -> None:
        layout = self.store.layout
        self.saved[key] = block.detach().reshape(-1).view(layout.torch_dtype).view(layout.block_shape).cpu().clone()

    def hasher(self, model_id: str, tp_rank: int = 0, tp_size: int = 1, tenant_salt: str = "") -> BlockHasher:
        return self.store.hasher(model_id, tp_rank, tp_size, tenant_salt)

    def lookup(self, keys: Sequence[bytes], *, prefetch: bool = True) -> LookupResult:
        return self.store.lookup(keys, prefetch=prefetch)

    def reserve(self, keys: Sequence[bytes]) -> Reservation:
        return self.store.reserve(keys)

    def commit(self, reservation: Reservation) -> None:
        for key, slot in zip(reservation.keys, reservation.slots, strict=True):
            self._record(key, self.store.slot_view(slot, reservation))
        self.store.commit(reservation)

    def abort(self, reservation: Reservation) -> None:
        self.store.abort(reservation)

    def acquire(self, keys: Sequence[bytes], timeout: float | None = None) -> Lease:
        return self.store.acquire(keys, timeout)

    def release(self, lease: Lease) -> None:
        self.store.release(lease)

    def slot_view(self, slot: int, handle: Lease | Reservation | None = None) -> torch.Tensor:
        return self.store.slot_view(slot, handle)

    def put(self, keys: Sequence[bytes], blocks: Sequence[torch.Tensor]) -> Any:
        """``Store.put``, recording the blocks of the keys the store lacks (the ones it will write)."""
        store: Any = self.store
        absent = [store.contains(key) is None for key in keys]
        job = store.put(keys, blocks)
        for key, block, new in zip(keys, blocks, absent, strict=True):
            if new:
                self._record(key, block)
        return job

    def __getattr__(self, name: str) -> Any:
        # Anything else the wrapped store offers (stats, flush, get...), unchanged.
        return getattr(self.store, name)


def greedy_continuation(model: Any, cache: DynamicCache, logits: torch.Tensor, num_tokens: int) -> list[int]:
    """``num_tokens`` greedy tokens after a prompt whose ``cache`` and last ``[1, vocab]`` logits are given."""
    tokens = [int(logits[0].argmax())]
    with torch.no_grad():
        for _ in range(num_tokens - 1):
            step = torch.tensor([[tokens[-1]]], device=model.device)
            out = model(step, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens
