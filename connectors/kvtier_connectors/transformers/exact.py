"""``kvtier_exact``: an opt-in attention whose result for a token does not depend on the sequence length.

Why: sdpa and eager attention reduce over the keys with one GEMM whose shape follows the sequence length,
and CPU BLAS kernels change their summation order with that shape, so the KV of a prefix computed inside
a shorter prompt can differ in the last bits from the same tokens' KV inside a longer one. This
implementation walks the keys in fixed chunks of ``CHUNK`` tokens aligned at position 0, each chunk a
GEMM of the same shape, merged left to right with an online softmax: a chunk past a token's position adds
exactly zero, so the attention no longer depends on the sequence length.

That removes one source of difference, not all: the model's linear layers are GEMMs whose row count is
the number of tokens in the forward, and whether a row gets the same bits with other row counts is the
BLAS's choice (on AVX-512 MKL only 1-row tails differ; on its AVX2 path tails of 2, 3, 7, 8, 9, 13, 14 or
15 rows do as well). So bit-exactness is a property of the machine, never assumed: ``verify(model)`` checks
it on the machine it runs on, and nothing in kvtier depends on it (the contract is
``kvtier_connectors.transformers.contract``).

Promises:
- ``register()`` (idempotent) makes ``attn_implementation="kvtier_exact"`` available to transformers
  models, with sdpa's mask (none for a plain causal forward; a boolean one otherwise, applied too).
- Output equals softmax(Q K^T * scaling + mask) V up to rounding, causal from the query positions (the
  last ``q`` positions of the keys), accumulated in fp32 and cast to the query dtype; no dropout (it is
  for inference).
- ``verify(model)`` is true only if, on this machine, prefilling prompt prefixes of several lengths and
  then the rest gives the same KV and logits bits (``torch.equal``) as one forward of the whole prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kvtier_exact"
# Keys per GEMM: large enough to keep the loop short, small enough that padding the last chunk is cheap.
CHUNK = 64
# A chunk is computed for fewer rows than all the queries only when at least this many remain: on the
# CPUs measured, GEMMs of 16 rows or more gave a row the same bits (fewer rows took other kernels).
# The connector's default minimum tail; a heuristic that ``verify`` checks, not a guarantee.
MIN_ROWS = 16
# Prefix lengths ``verify`` splits its prompt at: block-aligned and not, tails of many row counts.
_VERIFY_SPLITS = (16, 33, 64, 95, 112, 127)
_VERIFY_TOKENS = 144


def exact_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of ``query [b, h, q, d]`` over ``key``/``value [b, kv_heads, k, d]``; returns ``[b, q, h, d]``."""
    batch, heads, num_queries, head_dim = query.shape
    groups = heads // key.shape[1]
    num_keys = key.shape[2]
    pad = -num_keys % CHUNK
    # One padded fp32 copy of K and V (GQA heads repeated), so that every chunk is a GEMM of one shape.
    key = torch.nn.functional.pad(key.float(), (0, 0, 0, pad)).repeat_interleave(groups, dim=1)
    value = torch.nn.functional.pad(value.float(), (0, 0, 0, pad)).repeat_interleave(groups, dim=1)
    device = query.device
    first_pos = num_keys - num_queries
    query_pos = torch.arange(first_pos, num_keys, device=device)
    stats_shape = (batch, heads, num_queries, 1)
    row_max = torch.full(stats_shape, float("-inf"), dtype=torch.float32, device=device)
    row_sum = torch.zeros(stats_shape, dtype=torch.float32, device=device)
    acc = torch.zeros((batch, heads, num_queries, value.shape[-1]), dtype=torch.float32, device=device)
    scaled = query.float() * (head_dim**-0.5 if scaling is None else scaling)
    for start in range(0, num_keys, CHUNK):
        # Rows before ``start`` see nothing of this chunk: it would add exactly zero to them, so skip them
        # while enough rows remain.
        row = max(0, start - first_pos)
        row = row if num_queries - row >= MIN_ROWS else 0
        key_pos = torch.arange(start, start + CHUNK, device=device)
        hidden = (key_pos[None, :] > query_pos[row:, None]) | (key_pos[None, :] >= num_keys)
        scores = torch.matmul(scaled[:, :, row:], key[:, :, start : start + CHUNK].transpose(-1, -2))
        if attention_mask is not None:
            chunk_mask = attention_mask[..., row:, start : start + CHUNK]
            chunk_mask = torch.nn.functional.pad(chunk_mask, (0, CHUNK - chunk_mask.shape[-1]))
            if chunk_mask.dtype == torch.bool:
                hidden = hidden | ~chunk_mask
            else:
                scores = scores + chunk_mask.float()
        scores = scores.masked_fill(hidden, float("-inf"))
        new_max = torch.maximum(row_max[:, :, row:], scores.amax(-1, keepdim=True))
        probs = torch.exp(scores - new_max)
        rescale = torch.exp(row_max[:, :, row:] - new_max)
        row_sum[:, :, row:] = row_sum[:, :, row:] * rescale + probs.sum(-1, keepdim=True)
        acc[:, :, row:] = acc[:, :, row:] * rescale + torch.matmul(probs, value[:, :, start : start + CHUNK])
        row_max[:, :, row:] = new_max
    return (acc / row_sum).to(query.dtype).transpose(1, 2).contiguous(), None


def verify(model: Any, *, seed: int = 0) -> bool:
    """Whether ``model`` computes, on this machine, a prompt's KV and logits with the same bits in pieces as whole.

    Each split prefills a prefix, then the rest into the same cache, and compares the last logits and
    every layer's K and V with one forward of the whole prompt (``torch.equal``). Seconds for a small model.
    """
    # Imported here: the adapter imports this module (MIN_ROWS), and the contract the adapter.
    from kvtier_connectors.transformers.adapter import cache_kwarg
    from kvtier_connectors.transformers.contract import kv_prefix_equal

    vocab_size = int(model.config.vocab_size)
    prompt = torch.randint(0, vocab_size, (1, _VERIFY_TOKENS), generator=torch.Generator().manual_seed(seed))
    prompt = prompt.to(model.device)
    kwarg = cache_kwarg(model)

    def forward(ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        logits: torch.Tensor = model(ids, use_cache=True, logits_to_keep=1, **{kwarg: cache}).logits[:, -1]
        return logits

    with torch.no_grad():
        whole = DynamicCache(config=model.config)
        reference = forward(prompt, whole)
        for split in _VERIFY_SPLITS:
            pieces = DynamicCache(config=model.config)
            forward(prompt[:, :split], pieces)
            if not torch.equal(forward(prompt[:, split:], pieces), reference):
                return False
            if not kv_prefix_equal(pieces, whole, _VERIFY_TOKENS):
                return False
    return True


def register() -> None:
    """Make ``attn_implementation="kvtier_exact"`` available to transformers models."""
    AttentionInterface.register(NAME, exact_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
