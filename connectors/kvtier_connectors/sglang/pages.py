"""SGLang's host pool pages as kvtier blocks: the layout they make and a view of each page in block order.

A kvtier block holds one SGLang page: ``page_size`` tokens of every layer's K and V (MHA) or of every
layer's single latent (MLA). Its bytes are in the order ``(plane, token, layer, head, dim)``, which is how a
``page_first`` pool keeps a page, so pages saved from one host layout load into any other.

Promises:
- ``HostPages.of(pool)`` accepts SGLang's ``MHATokenToKVPoolHost`` (K and V of equal head size) and
  ``MLATokenToKVPoolHost`` (one materialized latent) with the host layouts ``layer_first``, ``page_first``
  and ``page_first_direct``, and derives the kvtier layout (block_tokens = SGLang's page size). Anything
  else (another pool class, ``page_head`` or another layout, K and V of different sizes, a dtype kvtier
  does not store, a buffer of an unexpected shape) raises ``LayoutMismatchError`` saying what it found.
- ``view(start)`` is the page that begins at host token index ``start`` as a strided view of the pool's own
  memory, shaped ``block_shape``: one ``copy_`` moves a page between the pool and an arena slot, with no
  staging buffer. ``page_starts`` checks SGLang's host indices (``InvalidInputError``) before anything moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvtier.errors import ConfigError, InvalidInputError, LayoutMismatchError
from kvtier.layout import KVLayout, dtype_name

HOST_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


@dataclass(frozen=True)
class HostPages:
    """The pages of one SGLang host pool, viewed in kvtier's block order."""

    layout: KVLayout
    host_layout: str
    latent: bool
    num_tokens: int
    # The pool's buffer with the plane dimension first (MLA gets a plane dimension of 1).
    planes: torch.Tensor

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """``(planes, page tokens, layers, heads, head dim)``."""
        layout = self.layout
        return (layout.num_planes, layout.block_tokens, layout.num_layers, layout.num_kv_heads, layout.head_dim)

    @classmethod
    def of(cls, pool: Any) -> HostPages:
        """The pages of ``pool``; ``LayoutMismatchError`` where kvtier cannot serve it (see the module promises)."""
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
        from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

        kind = type(pool)
        if kind not in (MHATokenToKVPoolHost, MLATokenToKVPoolHost):
            raise LayoutMismatchError(f"kvtier stores the pages of SGLang's MHATokenToKVPoolHost and "
                                      f"MLATokenToKVPoolHost, not of {kind.__name__}")
        if pool.layout not in HOST_LAYOUTS:
            raise LayoutMismatchError(f"kvtier serves the host layouts {HOST_LAYOUTS}, not {pool.layout!r}: "
                                      "start SGLang with --hicache-mem-layout page_first (its default)")
        latent = kind is MLATokenToKVPoolHost
        if latent:
            if pool.kv_buffer is None:
                raise LayoutMismatchError("this MLA host pool keeps no latent pages (allocator-only mode)")
            heads, head_dim, planes = 1, pool.kv_cache_dim, pool.kv_buffer.unsqueeze(0)
        else:
            if pool.head_dim != pool.v_head_dim:
                raise LayoutMismatchError(f"kvtier stores K and V of one head size; this pool has K "
                                          f"{pool.head_dim} and V {pool.v_head_dim}")
            heads, head_dim, planes = pool.head_num, pool.head_dim, pool.kv_buffer
        try:
            dtype = dtype_name(pool.dtype)
        except ConfigError as exc:
            raise LayoutMismatchError(str(exc)) from None
        layout = KVLayout(num_layers=pool.layer_num, num_kv_heads=heads, head_dim=head_dim, dtype=dtype,
                          block_tokens=pool.page_size, kind="latent" if latent else "kv")
        pages = cls(layout, pool.layout, latent, pool.size, planes)
        expected = pages._buffer_shape(pool.page_num)
        if tuple(planes.shape) != expected:
            raise LayoutMismatchError(f"the {pool.layout} host buffer has shape {tuple(planes.shape)} (planes "
                                      f"first), kvtier expected {expected}")
        return pages

    def _buffer_shape(self, num_pages: int) -> tuple[int, ...]:
        planes, tokens, layers, heads, dim = self.block_shape
        if self.host_layout == "page_first":
            return (planes, self.num_tokens, layers, heads, dim)
        if self.host_layout == "page_first_direct":
            return (planes, num_pages, layers, tokens, heads, dim)
        return (planes, layers, self.num_tokens, heads, dim)

    def page_starts(self, host_indices: torch.Tensor, num_pages: int) -> list[int]:
        """The first host token index of each of ``num_pages`` pages in SGLang's ``host_indices``."""
        tokens = self.layout.block_tokens
        if not isinstance(host_indices, torch.Tensor) or host_indices.dim() != 1:
            raise InvalidInputError("host_indices must be a one-dimensional tensor of host token indices")
        if host_indices.numel() != num_pages * tokens:
            raise InvalidInputError(f"{num_pages} page hashes need {num_pages * tokens} host indices "
                                    f"({tokens} per page), got {host_indices.numel()}")
        starts: list[int] = host_indices[::tokens].tolist()
        for start in starts:
            if start % tokens or not 0 <= start < self.num_tokens:
                raise InvalidInputError(f"host index {start} does not start a page of this pool "
                                        f"({self.num_tokens} tokens, {tokens} per page)")
        return starts

    def view(self, start: int) -> torch.Tensor:
        """The page that begins at host token index ``start``, shaped ``block_shape`` (a view, no copy)."""
        tokens = self.layout.block_tokens
        if self.host_layout == "page_first":
            return self.planes[:, start : start + tokens]
        if self.host_layout == "page_first_direct":
            return self.planes[:, start // tokens].transpose(1, 2)
        return self.planes[:, :, start : start + tokens].transpose(1, 2)

    def block(self, slot: torch.Tensor) -> torch.Tensor:
        """An arena slot's flat block (``Store.slot_view``) shaped ``block_shape``."""
        return slot.view(self.block_shape)
