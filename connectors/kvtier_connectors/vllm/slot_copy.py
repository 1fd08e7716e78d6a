"""Pages of an engine's paged KV moved straight between ``PagedKV`` segments and arena slots, in place.

Chunk ``c`` (``pages_per_chunk`` pages of every chosen segment, in ``PagedKV``'s staging order
``(segment, page, byte)``) lives in row ``slot_ids[c]`` of ``rows``, a ``(num_slots, slot_bytes)`` uint8 view
of the arena; a row holds at least ``chunk_bytes`` and its tail is left alone.

Promises:
- ``gather_to_slots`` / ``scatter_from_slots`` copy one chosen segment range in one vectorized copy per
  segment (NumPy for host pages, torch indexing elsewhere), never through a staging buffer of the whole load.
- ``copy_page_from_slot`` copies one page of one chunk (the partial first chunk of a load).
- ``arena_rows`` is a store's arena as such a view (fetched per transfer: a client remaps after a reconnect).
- Arguments are checked before anything is copied (``InvalidInputError``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.daemon import Client
from kvtier.errors import InvalidInputError
from kvtier.native import PagedKV
from kvtier.store import Store


def arena_rows(store: Store | Client) -> torch.Tensor:
    """The store's arena as ``(num_slots, slot_bytes)`` uint8 rows."""
    if isinstance(store, Client):
        return store.slot_rows()
    return store.arena.tensor.view(store.arena.num_slots, store.arena.slot_bytes)


def _grid(paged: PagedKV, rows: torch.Tensor, pages_per_chunk: int) -> torch.Tensor:
    chunk_bytes = paged.chunk_bytes(pages_per_chunk)
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.stride(1) != 1 or rows.shape[1] < chunk_bytes:
        raise InvalidInputError(f"rows must be a (num_slots, >= {chunk_bytes}) uint8 row view, "
                                f"got {rows.dtype} {tuple(rows.shape)}")
    return rows[:, :chunk_bytes].view(rows.shape[0], paged.num_segments, pages_per_chunk, paged.page_bytes)


def _check(paged: PagedKV, block_ids: Sequence[int], rows: torch.Tensor, slot_ids: Sequence[int],
           pages_per_chunk: int, segments: range | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, range]:
    chosen = range(paged.num_segments) if segments is None else segments
    if chosen.step != 1 or not 0 <= chosen.start <= chosen.stop <= paged.num_segments:
        raise InvalidInputError(f"segments must be a contiguous range within [0, {paged.num_segments}]")
    if pages_per_chunk <= 0 or len(block_ids) != len(slot_ids) * pages_per_chunk:
        raise InvalidInputError(f"{len(block_ids)} block ids are not {len(slot_ids)} chunks of {pages_per_chunk}")
    ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
    slots = torch.as_tensor(list(slot_ids), dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= paged.num_blocks):
        raise InvalidInputError(f"a block id lies outside [0, {paged.num_blocks})")
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= rows.shape[0]):
        raise InvalidInputError(f"a slot id lies outside [0, {rows.shape[0]})")
    return ids, slots, _grid(paged, rows, pages_per_chunk), chosen


def gather_to_slots(paged: PagedKV, block_ids: Sequence[int], rows: torch.Tensor, slot_ids: Sequence[int],
                    pages_per_chunk: int = 1, segments: range | None = None) -> None:
    """Copy the pages of ``block_ids`` (chunk by chunk) into rows ``slot_ids`` of the arena view ``rows``."""
    ids, slots, grid, chosen = _check(paged, block_ids, rows, slot_ids, pages_per_chunk, segments)
    if not ids.numel():
        return
    if paged.device.type == "cpu":
        grid_np, ids_np, slots_np = grid.numpy(), ids.numpy(), slots.numpy()
        for index in chosen:
            pages = paged.segments[index].numpy()[ids_np]
            grid_np[slots_np, index] = pages.reshape(-1, pages_per_chunk, paged.page_bytes)
        return
    device_ids = ids.to(paged.device, non_blocking=True)
    for index in chosen:
        pages = paged.segments[index].index_select(0, device_ids).view(-1, pages_per_chunk, paged.page_bytes)
        grid[slots, index] = pages.cpu()


def scatter_from_slots(paged: PagedKV, block_ids: Sequence[int], rows: torch.Tensor, slot_ids: Sequence[int],
                       pages_per_chunk: int = 1, segments: range | None = None) -> None:
    """Copy rows ``slot_ids`` of the arena view ``rows`` (chunk by chunk) into the pages of ``block_ids``."""
    ids, slots, grid, chosen = _check(paged, block_ids, rows, slot_ids, pages_per_chunk, segments)
    if not ids.numel():
        return
    if paged.device.type == "cpu":
        grid_np, ids_np, slots_np = grid.numpy(), ids.numpy(), slots.numpy()
        for index in chosen:
            paged.segments[index].numpy()[ids_np] = grid_np[slots_np, index].reshape(-1, paged.page_bytes)
        return
    device_ids = ids.to(paged.device, non_blocking=True)
    for index in chosen:
        pages = grid.index_select(0, slots)[:, index].reshape(-1, paged.page_bytes)
        paged.segments[index].index_copy_(0, device_ids, pages.to(paged.device, non_blocking=True))


def copy_page_from_slot(paged: PagedKV, block_id: int, rows: torch.Tensor, slot_id: int, page: int,
                        pages_per_chunk: int) -> None:
    """Copy page ``page`` of the chunk in row ``slot_id`` into block ``block_id`` of every segment."""
    grid = _grid(paged, rows, pages_per_chunk)
    if not 0 <= page < pages_per_chunk or not 0 <= block_id < paged.num_blocks:
        raise InvalidInputError(f"page {page} of {pages_per_chunk} into block {block_id} of {paged.num_blocks}")
    for index, segment in enumerate(paged.segments):
        segment[block_id].copy_(grid[slot_id, index, page], non_blocking=True)
