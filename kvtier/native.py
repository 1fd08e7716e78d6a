"""Gather and scatter of an engine's paged KV: the pages of many blocks of every layer in one call.

An engine keeps each layer's KV as pages on a leading block dimension. ``PagedKV`` sees every layer (or
every K/V plane of a layer) as a *segment*: a 2-D byte view ``(num_blocks, page_bytes)`` whose rows may be
strided. ``gather`` copies the pages of a list of block ids out of every segment into one contiguous
staging buffer; ``scatter`` copies them back into (other) block ids.

Promises:
- Staging order is ``(chunk, segment, page in chunk, byte)``: the block ids are taken ``pages_per_chunk``
  at a time, and each chunk (those engine blocks of every segment) is one contiguous piece of
  ``chunk_bytes(pages_per_chunk)`` bytes, i.e. one kvtier block when the chunk covers its tokens.
- On CUDA with CuPy importable and ``native/gather_scatter.cu`` present, one kernel launch on torch's
  current stream moves everything (asynchronous, like any kernel; the staging buffer may be device memory
  or pinned host memory). Everywhere else a fallback gives the same bytes synchronously: NumPy fancy
  indexing over the same memory for pages in host memory, torch ``index_select`` / ``index_copy_`` on any
  other device (a GPU without CuPy). ``backend`` says which one an instance uses.
- Arguments are checked before anything is copied (``InvalidInputError``): a block id out of range, a
  staging buffer of the wrong size, device or dtype, segments of unequal page size, device or block count.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kvtier.errors import InvalidInputError

Backend = Literal["cuda", "numpy", "torch"]
KERNEL_SOURCE = Path(__file__).resolve().parents[1] / "native" / "gather_scatter.cu"
_THREADS = 256
# Enough CUDA blocks to fill any current GPU; each one loops over (block id, segment) pairs.
_MAX_GRID = 8192


@functools.cache
def load_kernels() -> tuple[Any, Any] | None:
    """The compiled ``(gather, scatter)`` CuPy kernels, or ``None`` where CuPy, CUDA or the source is missing.

    Compiled once per process (CuPy also caches the binary on disk).
    """
    if not KERNEL_SOURCE.is_file() or not torch.cuda.is_available():
        return None
    try:
        cupy = importlib.import_module("cupy")
        module = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=("-std=c++17",))
        return module.get_function("kvtier_gather"), module.get_function("kvtier_scatter")
    except Exception as exc:
        # An unusable CuPy (no driver, a CUDA mismatch, NVRTC missing) means the torch path, not a crash.
        logging.getLogger(__name__).warning("gather/scatter kernels unavailable, using torch copies: %s", exc)
        return None


def byte_rows(tensor: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``tensor``'s pages as a ``(num_blocks, page_bytes)`` uint8 view of the same memory (no copy).

    ``tensor`` holds blocks on dim 0, and each block's page (the other dims) must be one dense run of bytes,
    in any dim order (a permuted layout is fine: the bytes are copied, not interpreted). A leading dim of
    ``k * num_blocks`` rows is read as ``k`` adjacent kernel blocks per block, which must then be back to
    back. ``InvalidInputError`` says which assumption failed.
    """
    shape, strides = tuple(tensor.shape), tensor.stride()
    if num_blocks <= 0 or tensor.dim() < 1 or shape[0] % num_blocks:
        raise InvalidInputError(f"expected a multiple of {num_blocks} blocks on dim 0, got shape {shape}")
    page_numel = 1
    for stride, size in sorted((st, sz) for sz, st in zip(shape[1:], strides[1:], strict=True) if sz != 1):
        if stride != page_numel:
            raise InvalidInputError(f"a block's page is not one dense run of bytes: shape {shape} strides {strides}")
        page_numel *= size
    item = tensor.element_size()
    rows_per_block = shape[0] // num_blocks
    page_bytes, row_stride = page_numel * item, strides[0] * item
    if rows_per_block > 1 and row_stride != page_bytes:
        raise InvalidInputError(
            f"{rows_per_block} kernel blocks per block must be back to back: row stride {row_stride} B, "
            f"page {page_bytes} B"
        )
    if shape[0] > 1 and row_stride < page_bytes:
        raise InvalidInputError(f"pages overlap: row stride {row_stride} B < page size {page_bytes} B")
    storage = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())
    return storage.as_strided(
        (num_blocks, page_bytes * rows_per_block), (row_stride * rows_per_block, 1), tensor.storage_offset() * item
    )


class PagedKV:
    """Segments of an engine's paged KV that share a device, a block count and a page size."""

    def __init__(self, segments: Sequence[torch.Tensor], use_kernel: bool = True, use_numpy: bool = True) -> None:
        if not segments:
            raise InvalidInputError("PagedKV needs at least one segment")
        first = segments[0]
        for index, segment in enumerate(segments):
            if segment.dtype != torch.uint8 or segment.dim() != 2 or segment.stride(1) != 1:
                raise InvalidInputError(f"segment {index} must be a (num_blocks, page_bytes) uint8 row view")
            if segment.shape != first.shape or segment.device != first.device:
                raise InvalidInputError(
                    f"segment {index} is {tuple(segment.shape)} on {segment.device}, "
                    f"segment 0 is {tuple(first.shape)} on {first.device}"
                )
        self.segments = list(segments)
        self.num_blocks = int(first.shape[0])
        self.page_bytes = int(first.shape[1])
        self.device = first.device
        kernels = load_kernels() if use_kernel and self.device.type == "cuda" else None
        self._kernels = kernels
        self.backend: Backend = (
            "cuda" if kernels is not None else "numpy" if use_numpy and self.device.type == "cpu" else "torch"
        )
        # The kernel reads each segment's base address and row stride (bytes) from device memory.
        self._tables = (
            torch.tensor([[s.data_ptr() for s in self.segments], [s.stride(0) for s in self.segments]],
                         dtype=torch.int64, device=self.device)
            if kernels is not None else None
        )
        self._vector = self.page_bytes % 16 == 0 and all(
            s.data_ptr() % 16 == 0 and s.stride(0) % 16 == 0 for s in self.segments
        )

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    def chunk_bytes(self, pages_per_chunk: int = 1) -> int:
        """Bytes of one chunk: ``pages_per_chunk`` pages of every segment."""
        return pages_per_chunk * self.num_segments * self.page_bytes

    def gather(self, block_ids: Sequence[int] | torch.Tensor, staging: torch.Tensor, pages_per_chunk: int = 1,
               segments: range | None = None) -> None:
        """Copy the pages of ``block_ids`` into ``staging`` (see the module's order).

        ``segments`` (default: all) limits the copy to those segments, e.g. one layer's; the staging
        positions of the others are left as they are, so a caller can fill ``staging`` layer by layer.
        """
        ids, chosen = self._check(block_ids, staging, pages_per_chunk, segments)
        if ids.numel() == 0:
            return
        if self._kernels is not None and self._tables is not None:
            self._launch(self._kernels[0], self._tables, ids, staging, pages_per_chunk, chosen)
            return
        grid = staging.view(-1, self.num_segments, pages_per_chunk, self.page_bytes)
        if self.backend == "numpy" and staging.device.type == "cpu":
            # torch fans each small row copy out to its thread pool: on a few cores that costs 10x the copy
            # (0.07-0.6 GB/s against 5-7 GB/s for NumPy on 64 KiB pages, 2 cores).
            grid_np, ids_np = grid.numpy(), ids.numpy()
            for index in chosen:
                grid_np[:, index] = self.segments[index].numpy()[ids_np].reshape(-1, pages_per_chunk, self.page_bytes)
            return
        for index in chosen:
            pages = self.segments[index].index_select(0, ids)
            grid[:, index].copy_(pages.view(-1, pages_per_chunk, self.page_bytes))

    def scatter(self, block_ids: Sequence[int] | torch.Tensor, staging: torch.Tensor, pages_per_chunk: int = 1,
                segments: range | None = None) -> None:
        """Copy ``staging`` (laid out as ``gather`` writes it) into the pages of ``block_ids``.

        ``segments`` (default: all) limits the copy to those segments, as for ``gather``.
        """
        ids, chosen = self._check(block_ids, staging, pages_per_chunk, segments)
        if ids.numel() == 0:
            return
        if self._kernels is not None and self._tables is not None:
            self._launch(self._kernels[1], self._tables, ids, staging, pages_per_chunk, chosen)
            return
        grid = staging.view(-1, self.num_segments, pages_per_chunk, self.page_bytes)
        if self.backend == "numpy" and staging.device.type == "cpu":
            grid_np, ids_np = grid.numpy(), ids.numpy()
            for index in chosen:
                self.segments[index].numpy()[ids_np] = grid_np[:, index].reshape(-1, self.page_bytes)
            return
        for index in chosen:
            pages = grid[:, index].reshape(-1, self.page_bytes).to(self.device)
            self.segments[index].index_copy_(0, ids, pages)

    def _check(self, block_ids: Sequence[int] | torch.Tensor, staging: torch.Tensor, pages_per_chunk: int,
               segments: range | None) -> tuple[torch.Tensor, range]:
        chosen = range(self.num_segments) if segments is None else segments
        if chosen.step != 1 or not 0 <= chosen.start <= chosen.stop <= self.num_segments:
            raise InvalidInputError(f"segments must be a contiguous range within [0, {self.num_segments}]")
        ids = torch.as_tensor(block_ids, dtype=torch.int64).reshape(-1)
        if pages_per_chunk <= 0 or ids.numel() % pages_per_chunk:
            raise InvalidInputError(f"{ids.numel()} block ids do not make whole chunks of {pages_per_chunk}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks):
            raise InvalidInputError(f"a block id lies outside [0, {self.num_blocks})")
        expected = ids.numel() * self.num_segments * self.page_bytes
        if staging.dtype != torch.uint8 or not staging.is_contiguous() or staging.numel() != expected:
            raise InvalidInputError(
                f"staging must be a contiguous uint8 tensor of {expected} bytes, "
                f"got {staging.dtype} {tuple(staging.shape)}"
            )
        on_device = staging.device == self.device or (
            self._kernels is not None and staging.device.type == "cpu" and staging.is_pinned()
        )
        if not on_device and staging.device.type != "cpu":
            raise InvalidInputError(f"staging is on {staging.device}, the pages on {self.device}")
        if self._kernels is not None and not on_device:
            raise InvalidInputError("the CUDA kernel needs staging in device memory or pinned host memory")
        return ids.to(self.device, non_blocking=True), chosen

    def _launch(self, kernel: Any, tables: torch.Tensor, ids: torch.Tensor, staging: torch.Tensor,
                pages_per_chunk: int, segments: range) -> None:
        num_pairs = ids.numel() * len(segments)
        if num_pairs == 0:
            return
        cupy = importlib.import_module("cupy")
        stream = torch.cuda.current_stream(self.device)
        with cupy.cuda.Device(self.device.index or 0), cupy.cuda.ExternalStream(stream.cuda_stream):
            kernel(
                (min(num_pairs, _MAX_GRID),),
                (_THREADS,),
                (
                    np.uint64(tables[0].data_ptr()),
                    np.uint64(tables[1].data_ptr()),
                    np.uint64(ids.data_ptr()),
                    np.uint64(staging.data_ptr()),
                    np.int64(ids.numel()),
                    np.int32(self.num_segments),
                    np.int32(segments.start),
                    np.int32(segments.stop),
                    np.int64(self.page_bytes),
                    np.int32(pages_per_chunk),
                    np.int32(1 if self._vector and staging.data_ptr() % 16 == 0 else 0),
                ),
            )
        # The caching allocator may reuse ``ids`` once Python drops it; tie it to the launch's stream.
        ids.record_stream(stream)

