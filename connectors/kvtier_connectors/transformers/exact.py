"""``kvtier_exact``: a causal attention whose result for a token does not depend on how long the sequence is.

Why: sdpa and eager attention reduce over the keys with one GEMM whose shape follows the sequence length,
and CPU BLAS kernels change their summation order with that shape. In fp32, KV computed while prefilling
a 64-token prompt then differs in the last bits from the same tokens' KV inside a 67-token prompt, so a
restored prefix is close to, not identical with, a full recompute (bf16 rounding hides it in practice).
This implementation walks the keys in fixed chunks of ``CHUNK`` tokens aligned at position 0, each chunk
a GEMM of the same shape, merged left to right with an online softmax: a chunk past a token's position
adds exactly zero, so every token's output is the same bits whatever the sequence length.

Promises:
- ``register()`` (idempotent) makes ``attn_implementation="kvtier_exact"`` available to transformers
  models, with sdpa's mask (none for a plain causal forward; a boolean one otherwise, applied too).
- Output equals softmax(Q K^T * scaling + mask) V up to rounding, causal from the query positions (the
  last ``q`` positions of the keys), accumulated in fp32 and cast to the query dtype; no dropout (it is
  for inference).
- With at least ``MIN_ROWS`` queries in a call, a token's output has the same bits whatever the sequence
  length and the number of queries (tested through whole models in the connector's tests).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kvtier_exact"
# Keys per GEMM: large enough to keep the loop short, small enough that padding the last chunk is cheap.
CHUNK = 64
# CPU GEMMs give a row the same bits only when at least this many rows share the call (measured: fewer
# rows take other kernels), so a chunk is computed for fewer rows only when that many remain.
MIN_ROWS = 16


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


def register() -> None:
    """Make ``attn_implementation="kvtier_exact"`` available to transformers models."""
    AttentionInterface.register(NAME, exact_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
