"""Gather and scatter of an engine's paged KV: the pages of many blocks of every layer in one call.

An engine keeps each layer's KV as pages on a leading block dimension. ``PagedKV`` sees every layer (or
every K/V plane of a layer) as a *segment*: a 2-D byte view ``(num_blocks, page_bytes)`` whose rows may be
strided. The block ids are taken ``pages_per_chunk`` at a time; a *chunk* (those engine blocks of every
segment) is one piece of ``chunk_bytes(pages_per_chunk)`` bytes ordered ``(segment, page in chunk, byte)``,
i.e. one kvtier block when the chunk covers its tokens.

- ``gather`` / ``scatter``: chunk ``c`` sits at offset ``c * chunk_bytes`` of one contiguous staging buffer.
- ``gather_to_slots`` / ``scatter_from_slots``: chunk ``c`` sits at the start of row ``slot_ids[c]`` of
  ``rows``, a ``(num_slots, slot_bytes)`` uint8 view such as ``HostArena.rows()``: pages move between the
  engine's cache and arena slots in place, with no staging buffer.

Promises:
- On CUDA with CuPy importable and ``native/gather_scatter.cu`` present, one kernel launch on torch's
  current stream moves everything (asynchronous, like any kernel), after one upload of its address and
  index tables from a page-locked buffer (``upload_table``: no pageable upload, and a buffer is reused only
  once its last copy completed, so no hidden wait for the stream). A launch that touches host memory runs
  on ``LINK_GRID`` CUDA blocks (enough to saturate the host link from a few SMs, leaving the rest to the
  model); one between device buffers on up to ``DEVICE_GRID``. The chunks may be device memory or
  page-locked host memory that the device can address (``torch.empty(..., pin_memory=True)`` or a
  ``HostArena`` registered by its background pinning): the kernel reads and writes it over the bus, zero
  copy. Host memory that is not (yet) registered is never handed to the kernel: the call then takes a
  correct, slower path through a device buffer and a pageable copy, which waits for the copy (``fallbacks``
  counts such calls). Whether rows are registered is asked of the driver, on the pages' device (never
  torch's current one, which would make a context on another GPU), for the first and last byte used, which
  suffices for one pinned allocation and for an arena (registered in ascending chunks).
- Everywhere else a fallback gives the same bytes synchronously: NumPy fancy indexing over the same memory
  for pages in host memory, torch ``index_select`` / ``index_copy_`` on any other device (a GPU without
  CuPy). ``backend`` says which one an instance uses.
- ``segments`` (a range of segment indices) limits a copy to those segments (a layer range); the bytes of
  the other segments in the chunks are left as they are.
- Arguments are checked before anything is copied (``InvalidInputError``): a block id or slot id out of
  range, a slot id twice in one gather, a slot count that is not the chunk count, staging or rows of the
  wrong size, width, device or dtype, segments of unequal page size, device or block count.
"""

from __future__ import annotations

import collections
import functools
import importlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from kvtier.errors import InvalidInputError

Backend = Literal["cuda", "numpy", "torch"]


def _kernel_source(name: str) -> Path:
    """A kernel's source: inside the package where a wheel put it (``setup.py``), else the tree's ``native/``."""
    package = Path(__file__).resolve().parent
    packaged = package / "_kernels" / name
    return packaged if packaged.is_file() else package.parent / "native" / name


KERNEL_SOURCE = _kernel_source("gather_scatter.cu")
_THREADS = 256
# A copy that reads or writes host memory waits on the bus, not on the SMs: this many CUDA blocks (each
# thread keeps four 16-byte loads in flight: 256 KiB in all, several times what PCIe Gen5 x16 holds in
# flight at ~2 us latency) saturate the link from a few SMs and leave the others to the model, so a
# decode step on another stream does not queue behind a save. ``make gpu-check`` measures both.
LINK_GRID = 16
# A copy between two device buffers is bound by HBM and needs every SM; each block loops over its work.
DEVICE_GRID = 8192
# Whole-block copies are cut into pieces of this size, one CUDA block each at a time.
_PIECE_BYTES = 64 * 1024
# On the CPU, a chunk this large is copied by torch's intra-op threads rather than by NumPy on one.
TORCH_CHUNK_BYTES = 256 * 1024
# Pinned upload buffers a device may have in flight before an upload waits (see ``PinnedUploads``): far
# more than a step queues (a vLLM save of every layer of a deep model, each a launch).
_MAX_UPLOAD_LANES = 256


_KERNEL_NAMES = ("kvtier_gather", "kvtier_scatter", "kvtier_copy_blocks")


@functools.cache
def _kernel_module() -> dict[str, Any] | None:
    """The kernels of ``native/gather_scatter.cu`` by name, compiled and loaded, or ``None`` where CuPy, CUDA
    or the source is missing or the kernels do not build or load.

    Compiled once per process (CuPy also caches the binary on disk). CuPy (>= 8) compiles and loads a
    ``RawModule`` at its first ``get_function``, not when it is made: that is done here, so that a missing
    NVRTC or a driver error means the torch path rather than an error from every copy.
    """
    if not KERNEL_SOURCE.is_file() or not torch.cuda.is_available():
        return None
    try:
        cupy = importlib.import_module("cupy")
        module = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=("-std=c++17",))
        return {name: module.get_function(name) for name in _KERNEL_NAMES}
    except Exception as exc:
        # An unusable CuPy (no driver, a CUDA mismatch, NVRTC missing) means the torch path, not a crash.
        logging.getLogger(__name__).warning("gather/scatter kernels unavailable, using torch copies: %s", exc)
        return None


@functools.cache
def load_kernels() -> tuple[Any, Any] | None:
    """The compiled ``(gather, scatter)`` CuPy kernels, or ``None`` where CuPy, CUDA or the source is missing."""
    kernels = _kernel_module()
    return None if kernels is None else (kernels["kvtier_gather"], kernels["kvtier_scatter"])


@functools.cache
def load_copy_kernel() -> Any | None:
    """The compiled whole-block copy kernel (``kvtier_copy_blocks``), or ``None`` as for ``load_kernels``."""
    kernels = _kernel_module()
    return None if kernels is None else kernels["kvtier_copy_blocks"]


def grid_size(work_items: int, touches_host: bool) -> int:
    """CUDA blocks for a copy of ``work_items`` pieces: a few SMs across the host link, every SM on the device."""
    return max(1, min(work_items, LINK_GRID if touches_host else DEVICE_GRID))


def launch_copy_blocks(kernel: Any, pointers: torch.Tensor, num_blocks: int, nbytes: int, vector: bool,
                       stream: torch.cuda.Stream) -> None:
    """Copy ``num_blocks`` blocks of ``nbytes`` from ``pointers[1]`` to ``pointers[0]`` (device int64 ``[2, n]``).

    One launch on ``stream``, ``grid_size`` blocks (one side is host memory the device addresses).
    ``pointers`` must have been allocated on ``stream`` (``upload_table`` does), so that its memory is not
    reused before the kernel read it.
    """
    cupy = importlib.import_module("cupy")
    num_pieces = num_blocks * -(-nbytes // _PIECE_BYTES)
    with cupy.cuda.Device(pointers.device.index or 0), cupy.cuda.ExternalStream(stream.cuda_stream):
        kernel((grid_size(num_pieces, touches_host=True),), (_THREADS,),
               (np.uint64(pointers[0].data_ptr()), np.uint64(pointers[1].data_ptr()), np.int64(num_blocks),
                np.int64(nbytes), np.int64(_PIECE_BYTES), np.int32(1 if vector else 0)))


class _UploadLane:
    def __init__(self, host: torch.Tensor, event: Any) -> None:
        self.host = host
        # Recorded after the lane's last copy: the buffer is written again only once it completed.
        self.event = event


def _pinned_int64(size: int) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int64, pin_memory=True)


def _cuda_event() -> Any:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


class PinnedUploads:
    """Small host-to-device uploads (address and index tables) from page-locked buffers kvtier keeps.

    An upload from pageable memory makes CUDA stage it and wait for the stream (a hidden host sync, and
    impossible under graph capture); a pinned buffer allocated per launch costs a ``cudaHostAlloc``. So
    each device keeps pinned buffers (lanes), oldest first: an upload takes the oldest lane whose last copy
    completed (its event), and adds a lane while none has, so a stream queued far ahead of the GPU (a save
    of many layers) never makes the host wait. Only past ``max_lanes`` in flight on one device does an
    upload wait for the oldest (``waits`` counts them). A lane grows (doubling) only when a table does not
    fit. Thread-safe.
    """

    def __init__(self, max_lanes: int = _MAX_UPLOAD_LANES,
                 pinned: Callable[[int], torch.Tensor] = _pinned_int64,
                 new_event: Callable[[], Any] = _cuda_event) -> None:
        self.max_lanes = max_lanes
        self._pinned = pinned
        self._new_event = new_event
        self._lock = threading.Lock()
        self._lanes: dict[torch.device, collections.deque[_UploadLane]] = {}
        self.waits = 0

    def lanes(self, device: torch.device) -> int:
        """Pinned buffers this device has (in flight or free)."""
        with self._lock:
            return len(self._lanes.get(device, ()))

    def upload(self, table: np.ndarray, device: torch.device, stream: torch.cuda.Stream) -> torch.Tensor:
        """``table`` (int64, any shape) as a device tensor, copied on ``stream``; allocated on ``stream``."""
        values = np.ascontiguousarray(table, dtype=np.int64)
        with self._lock:
            lane = self._claim(device, values.size)
            host = lane.host[: values.size]
            host.numpy()[...] = values.reshape(-1)
            with torch.cuda.stream(stream):
                out = torch.empty(values.shape, dtype=torch.int64, device=device)
                out.view(-1).copy_(host, non_blocking=True)
                lane.event.record(stream)
            self._lanes[device].append(lane)
        return out

    def _claim(self, device: torch.device, size: int) -> _UploadLane:
        """A lane no copy still reads, of at least ``size`` items, taken off the device's queue (lock held)."""
        lanes = self._lanes.setdefault(device, collections.deque())
        if lanes and lanes[0].event.query():
            lane = lanes.popleft()
        elif len(lanes) < self.max_lanes:
            lane = _UploadLane(self._pinned(max(size, 1024)), self._new_event())
        else:
            self.waits += 1
            lane = lanes.popleft()
            lane.event.synchronize()
        if lane.host.numel() < size:
            lane.host = self._pinned(max(size, 2 * lane.host.numel()))
        return lane


_uploads = PinnedUploads()


def upload_table(table: np.ndarray, device: torch.device, stream: torch.cuda.Stream) -> torch.Tensor:
    """``PinnedUploads.upload`` with the process's buffers."""
    return _uploads.upload(table, device, stream)


def host_mapped(pointer: int, device: torch.device) -> bool:
    """Whether host address ``pointer`` is page-locked and mapped at the same address on ``device`` (UVA).

    Asked with ``device`` current (torch's current device only for a ``cuda`` device without an index),
    so that the question never makes a CUDA context on another GPU.
    """
    try:
        cupy = importlib.import_module("cupy")
        index = torch.cuda.current_device() if device.index is None else device.index
        with cupy.cuda.Device(index):
            attributes = cupy.cuda.runtime.pointerGetAttributes(pointer)
    except Exception:
        # Unknown to the driver (a CUDA error for plain pageable memory on old drivers): not addressable.
        return False
    memory_type = getattr(attributes, "type", getattr(attributes, "memoryType", -1))
    host_type = getattr(cupy.cuda.runtime, "memoryTypeHost", 1)
    return int(memory_type) == int(host_type) and int(attributes.devicePointer) == pointer


def rows_addressable(rows: torch.Tensor, first_row: int, last_row: int, nbytes: int, device: torch.device) -> bool:
    """Whether ``device`` addresses rows ``first_row..last_row`` (``nbytes`` of the last) of host ``rows``.

    Asks the driver about the first and last byte: enough for one pinned allocation and for an arena,
    which is registered in ascending chunks.
    """
    begin = rows.data_ptr() + first_row * rows.stride(0)
    end = rows.data_ptr() + last_row * rows.stride(0) + nbytes
    return host_mapped(begin, device) and host_mapped(end - 1, device)


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


def _runs(firsts: list[int], rows: list[int], dense: list[bool],
          pages_per_chunk: int) -> Iterator[tuple[int, int, int]]:
    """``(first chunk, chunks, row step)`` of each run of chunks that one strided copy can move.

    A chunk joins the run before it when both are dense (their block ids one run each), its first block id
    follows the run's last chunk's, and its row lies one more row step on (a positive step, the same
    throughout the run).
    """
    start, count, step = 0, 1, 0
    for chunk in range(1, len(firsts)):
        gap = rows[chunk] - rows[chunk - 1]
        joins = (dense[chunk] and dense[chunk - 1] and firsts[chunk] == firsts[chunk - 1] + pages_per_chunk
                 and gap > 0 and (count == 1 or gap == step))
        if joins:
            count, step = count + 1, gap
        else:
            yield start, count, max(step, 1)
            start, count, step = chunk, 1, 0
    if firsts:
        yield start, count, max(step, 1)


_Array = TypeVar("_Array", np.ndarray, torch.Tensor)


def _copy_run(gather: bool, pages: _Array, picked: _Array, first: int, chunk_ids: _Array | None,
              copy: Callable[[_Array, _Array], object]) -> None:
    """Copy a run of chunks between ``pages`` (``(segment, block, byte)``) and ``picked`` (``(chunk, segment,
    page in chunk, byte)``, its rows'), from block ``first`` on; ``chunk_ids``: one chunk's scattered block ids."""
    count, num_segments, pages_per_chunk, page_bytes = picked.shape
    if chunk_ids is not None:
        if gather:
            picked[0] = pages[:, chunk_ids]
        else:
            pages[:, chunk_ids] = picked[0]
        return
    run = pages[:, first:first + count * pages_per_chunk].reshape(
        num_segments, count, pages_per_chunk, page_bytes).swapaxes(0, 1)
    if gather:
        copy(picked, run)
    else:
        copy(run, picked)


class PagedKV:
    """Segments of an engine's paged KV that share a device, a block count and a page size."""

    def __init__(self, segments: Sequence[torch.Tensor] | torch.Tensor, use_kernel: bool = True,
                 use_numpy: bool = True) -> None:
        """``segments``: 2-D ``(num_blocks, page_bytes)`` uint8 row views, or one 3-D uint8 tensor
        ``(segment, block, page byte)`` (dense pages) whose first dim lists evenly spaced segments: checked
        once rather than per segment, and cut into per-segment views only where a path needs them, which is
        what a per-request caller (a restore) wants."""
        if isinstance(segments, torch.Tensor):
            planes = segments
            if planes.dtype != torch.uint8 or planes.dim() != 3 or planes.stride(2) != 1 or not planes.shape[0]:
                raise InvalidInputError("a tensor of segments must be a non-empty (segment, block, page byte) "
                                        "uint8 view with dense pages")
            self._planes: torch.Tensor | None = planes
            self._segments: list[torch.Tensor] | None = None
            self.num_segments, self.num_blocks, self.page_bytes = planes.shape
            # Built at the first launch: a CPU copy (a restore, once per request) never reads the tables.
            self._table_cache: np.ndarray | None = None
            self.device = planes.device
        else:
            if not segments:
                raise InvalidInputError("PagedKV needs at least one segment")
            self._check_segments(segments)
            self._planes, self._segments = None, list(segments)
            self.num_segments = len(segments)
            self._table_cache = np.stack([np.array([s.data_ptr() for s in segments], dtype=np.int64),
                                          np.array([s.stride(0) for s in segments], dtype=np.int64)])
            self.num_blocks, self.page_bytes = segments[0].shape
            self.device = segments[0].device
        kernels = load_kernels() if use_kernel and self.device.type == "cuda" else None
        self._kernels = kernels
        # Calls whose host chunks the device could not address, so went through a device buffer.
        self.fallbacks = 0
        self.backend: Backend = (
            "cuda" if kernels is not None else "numpy" if use_numpy and self.device.type == "cpu" else "torch"
        )
        self._pages: np.ndarray | None = None
        # The same ``(segment, block, byte)`` view for torch's copies of long runs (``_copy_chunks``).
        self._pages_tensor: torch.Tensor | None = None
        if self.backend == "numpy":
            if self._planes is not None:
                self._pages, self._pages_tensor = self._planes.numpy(), self._planes
            else:
                self._pages = self._regular_pages(segments[0])
                # torch has no negative strides: segments in descending order are copied by NumPy only.
                if self._pages is not None and min(self._pages.strides) >= 0:
                    self._pages_tensor = torch.from_numpy(self._pages)

    @property
    def _tables(self) -> np.ndarray:
        """Each segment's base address and row stride (bytes), uploaded with the indices at every launch."""
        if self._table_cache is None:
            assert self._planes is not None
            planes, count = self._planes, self.num_segments
            self._table_cache = np.stack([planes.data_ptr() + np.arange(count, dtype=np.int64) * planes.stride(0),
                                          np.full(count, planes.stride(1), dtype=np.int64)])
        return self._table_cache

    @property
    def _vector(self) -> bool:
        """Whether every page and segment row is 16-byte aligned (the kernels may move 16 bytes at a time)."""
        return self.page_bytes % 16 == 0 and not (self._tables % 16).any()

    @property
    def segments(self) -> list[torch.Tensor]:
        """Each segment's ``(num_blocks, page_bytes)`` row view."""
        if self._segments is None:
            assert self._planes is not None
            self._segments = list(self._planes.unbind(0))
        return self._segments

    @staticmethod
    def _check_segments(segments: Sequence[torch.Tensor]) -> None:
        first = segments[0]
        for index, segment in enumerate(segments):
            if segment.dtype != torch.uint8 or segment.dim() != 2 or segment.stride(1) != 1:
                raise InvalidInputError(f"segment {index} must be a (num_blocks, page_bytes) uint8 row view")
            if segment.shape != first.shape or segment.device != first.device:
                raise InvalidInputError(
                    f"segment {index} is {tuple(segment.shape)} on {segment.device}, "
                    f"segment 0 is {tuple(first.shape)} on {first.device}"
                )

    def _regular_pages(self, first: torch.Tensor) -> np.ndarray | None:
        """Every page as one ``(segment, block, byte)`` NumPy view, where the segments are evenly spaced.

        Segments at ``base + i * step`` with one row stride (the planes of one tensor, such as a cache
        laid out ``[layer, plane, head, tokens, dim]``) make a chunk one strided array: a chunk is then
        copied in one NumPy call, whatever the number of segments.
        """
        bases = self._tables[0]
        strides = self._tables[1]
        if self.num_segments < 2 or not (strides == strides[0]).all():
            return None
        steps = np.diff(bases)
        if not (steps == steps[0]).all() or steps[0] == 0:
            return None
        return np.lib.stride_tricks.as_strided(first.numpy(), (self.num_segments, self.num_blocks, self.page_bytes),
                                               (int(steps[0]), int(strides[0]), 1), writeable=True)

    def chunk_bytes(self, pages_per_chunk: int = 1) -> int:
        """Bytes of one chunk: ``pages_per_chunk`` pages of every segment."""
        return pages_per_chunk * self.num_segments * self.page_bytes

    def gather(self, block_ids: Sequence[int] | torch.Tensor, staging: torch.Tensor, pages_per_chunk: int = 1,
               segments: range | None = None) -> None:
        """Copy the pages of ``block_ids`` into the contiguous ``staging`` buffer (see the module's order).

        ``segments`` (default: all) limits the copy to those segments, e.g. one layer's; the staging
        positions of the others are left as they are, so a caller can fill ``staging`` layer by layer.
        """
        ids, chosen = self._check_ids(block_ids, pages_per_chunk, segments)
        self._copy(True, ids, self._staging_rows(staging, ids.numel(), pages_per_chunk), None, pages_per_chunk,
                   chosen)

    def scatter(self, block_ids: Sequence[int] | torch.Tensor, staging: torch.Tensor, pages_per_chunk: int = 1,
                segments: range | None = None) -> None:
        """Copy ``staging`` (laid out as ``gather`` writes it) into the pages of ``block_ids``.

        ``segments`` (default: all) limits the copy to those segments, as for ``gather``.
        """
        ids, chosen = self._check_ids(block_ids, pages_per_chunk, segments)
        self._copy(False, ids, self._staging_rows(staging, ids.numel(), pages_per_chunk), None, pages_per_chunk,
                   chosen)

    def gather_to_slots(self, block_ids: Sequence[int] | torch.Tensor, rows: torch.Tensor,
                        slot_ids: Sequence[int] | torch.Tensor, pages_per_chunk: int = 1,
                        segments: range | None = None) -> None:
        """Copy the pages of ``block_ids`` into the rows ``slot_ids`` of ``rows``, chunk ``c`` into row ``slot_ids[c]``.

        The first ``chunk_bytes(pages_per_chunk)`` bytes of each chosen row are written, in ``gather``'s
        order; the rest of the row is left as it is. A slot id may appear only once.
        """
        if not self._copy_listed(True, block_ids, rows, slot_ids, pages_per_chunk, segments):
            ids, chosen = self._check_ids(block_ids, pages_per_chunk, segments)
            slots = self._check_slots(rows, slot_ids, ids.numel() // pages_per_chunk, pages_per_chunk, unique=True)
            self._copy(True, ids, rows, slots, pages_per_chunk, chosen)

    def scatter_from_slots(self, block_ids: Sequence[int] | torch.Tensor, rows: torch.Tensor,
                           slot_ids: Sequence[int] | torch.Tensor, pages_per_chunk: int = 1,
                           segments: range | None = None) -> None:
        """Copy row ``slot_ids[c]`` of ``rows`` (laid out as ``gather_to_slots`` writes it) into chunk ``c``'s pages."""
        if not self._copy_listed(False, block_ids, rows, slot_ids, pages_per_chunk, segments):
            ids, chosen = self._check_ids(block_ids, pages_per_chunk, segments)
            slots = self._check_slots(rows, slot_ids, ids.numel() // pages_per_chunk, pages_per_chunk, unique=False)
            self._copy(False, ids, rows, slots, pages_per_chunk, chosen)

    # -- checks -----------------------------------------------------------------------------------------

    def _check_ids(self, block_ids: Sequence[int] | torch.Tensor, pages_per_chunk: int,
                   segments: range | None) -> tuple[torch.Tensor, range]:
        chosen = range(self.num_segments) if segments is None else segments
        if chosen.step != 1 or not 0 <= chosen.start <= chosen.stop <= self.num_segments:
            raise InvalidInputError(f"segments must be a contiguous range within [0, {self.num_segments}]")
        if isinstance(block_ids, range) and block_ids.step == 1:
            # A restore's ids (every page of a new cache, in order): bounded by its ends, no reduction over them.
            ids = torch.arange(block_ids.start, max(block_ids.start, block_ids.stop), dtype=torch.int64)
            low, high = block_ids.start, block_ids.stop - 1
        else:
            ids = torch.as_tensor(block_ids, dtype=torch.int64, device="cpu").reshape(-1)
            low, high = (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0)
        if pages_per_chunk <= 0 or ids.numel() % pages_per_chunk:
            raise InvalidInputError(f"{ids.numel()} block ids do not make whole chunks of {pages_per_chunk}")
        if ids.numel() and (low < 0 or high >= self.num_blocks):
            raise InvalidInputError(f"a block id lies outside [0, {self.num_blocks})")
        return ids, chosen

    def _staging_rows(self, staging: torch.Tensor, num_ids: int, pages_per_chunk: int) -> torch.Tensor:
        expected = num_ids * self.num_segments * self.page_bytes
        if staging.dtype != torch.uint8 or not staging.is_contiguous() or staging.numel() != expected:
            raise InvalidInputError(
                f"staging must be a contiguous uint8 tensor of {expected} bytes, "
                f"got {staging.dtype} {tuple(staging.shape)}"
            )
        self._check_device(staging, "staging")
        return staging.view(num_ids // pages_per_chunk, self.chunk_bytes(pages_per_chunk))

    def _check_slots(self, rows: torch.Tensor, slot_ids: Sequence[int] | torch.Tensor, num_chunks: int,
                     pages_per_chunk: int, unique: bool) -> torch.Tensor:
        self._check_rows(rows, pages_per_chunk)
        slots = torch.as_tensor(slot_ids, dtype=torch.int64, device="cpu").reshape(-1)
        if slots.numel() != num_chunks:
            raise InvalidInputError(f"{slots.numel()} slot ids for {num_chunks} chunks")
        if not slots.numel():
            return slots
        # A lease's slots come as a list: bounded in Python, without two reductions over a new tensor.
        low, high = ((min(slot_ids), max(slot_ids)) if isinstance(slot_ids, list)
                     else (int(slots.min()), int(slots.max())))
        if low < 0 or high >= rows.shape[0]:
            raise InvalidInputError(f"a slot id lies outside [0, {rows.shape[0]})")
        if unique and torch.unique(slots).numel() != slots.numel():
            raise InvalidInputError("a slot id appears twice in one gather")
        return slots

    def _check_rows(self, rows: torch.Tensor, pages_per_chunk: int) -> None:
        chunk_bytes = self.chunk_bytes(pages_per_chunk)
        if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.stride(1) != 1 or rows.shape[1] < chunk_bytes:
            raise InvalidInputError(
                f"rows must be a (num_slots, >= {chunk_bytes}) uint8 view with dense rows, "
                f"got {rows.dtype} {tuple(rows.shape)} strides {rows.stride()}"
            )
        if rows.shape[0] > 1 and rows.stride(0) < chunk_bytes:
            raise InvalidInputError(f"rows overlap: row stride {rows.stride(0)} B < chunk {chunk_bytes} B")
        self._check_device(rows, "rows")

    def _check_device(self, chunks: torch.Tensor, what: str) -> None:
        if chunks.device != self.device and chunks.device.type != "cpu":
            raise InvalidInputError(f"{what} is on {chunks.device}, the pages on {self.device}")

    # -- copies -----------------------------------------------------------------------------------------

    def _copy(self, gather: bool, ids: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor | None,
              pages_per_chunk: int, chosen: range) -> None:
        """Move chunks between the pages and ``rows`` (chunk ``c`` in row ``slots[c]``, or row ``c``)."""
        if ids.numel() == 0 or len(chosen) == 0:
            return
        if self._kernels is not None:
            if rows.device == self.device or self._addressable(rows, slots, pages_per_chunk):
                self._launch(gather, ids, rows, slots, pages_per_chunk, chosen)
            else:
                self._copy_via_device(gather, ids, rows, slots, pages_per_chunk, chosen)
            return
        grid = self._grid(rows, pages_per_chunk)
        if self._pages is not None and rows.device.type == "cpu" and (
                slots is not None or ids.numel() // pages_per_chunk < len(chosen)):
            per_chunk = ids.numpy().reshape(-1, pages_per_chunk)
            # Chunks whose block ids are one run first..first+n-1 can be sliced rather than fancy-indexed.
            dense = (per_chunk - per_chunk[:, :1] == np.arange(pages_per_chunk)).all(axis=1)
            rows_of = list(range(per_chunk.shape[0])) if slots is None else slots.tolist()
            self._copy_chunks(gather, per_chunk, per_chunk[:, 0].tolist(), rows_of, dense.tolist(), rows,
                              pages_per_chunk, chosen)
            return
        if self.backend == "numpy" and rows.device.type == "cpu":
            # torch fans each small row copy out to its thread pool: on a few cores that costs 10x the copy
            # (0.07-0.6 GB/s against 5-7 GB/s for NumPy on 64 KiB pages, 2 cores).
            grid_np, ids_np = grid.numpy(), ids.numpy()
            where = slice(None) if slots is None else slots.numpy()
            width = pages_per_chunk * self.page_bytes
            # Block ids first..first+n-1 of dense segment rows are one array: copied in one pass, no temporary.
            first = int(ids_np[0])
            run = bool((ids_np == np.arange(first, first + ids_np.size)).all())
            for index in chosen:
                segment = self.segments[index].numpy()
                if run and segment.strides[0] == self.page_bytes:
                    dense = segment[first:first + ids_np.size].reshape(-1, width)
                    if gather:
                        grid_np[where, index] = dense
                    elif slots is None:
                        dense[...] = grid_np[:, index]
                    else:
                        # Only the chosen rows (np.take would first copy the whole strided column).
                        dense[...] = grid_np[slots.numpy(), index]
                elif gather:
                    grid_np[where, index] = segment[ids_np].reshape(-1, width)
                else:
                    segment[ids_np] = grid_np[where, index].reshape(-1, self.page_bytes)
            return
        device_ids = ids.to(self.device)
        grid_slots = None if slots is None else slots.to(grid.device)
        for index in chosen:
            if gather:
                pages = self.segments[index].index_select(0, device_ids).view(-1, pages_per_chunk * self.page_bytes)
                if grid_slots is None:
                    grid[:, index].copy_(pages)
                else:
                    grid[:, index].index_copy_(0, grid_slots, pages.to(grid.device))
            else:
                chunks = grid[:, index] if grid_slots is None else grid[:, index].index_select(0, grid_slots)
                self.segments[index].index_copy_(0, device_ids, chunks.reshape(-1, self.page_bytes).to(self.device))

    def _copy_listed(self, gather: bool, block_ids: Sequence[int] | torch.Tensor, rows: torch.Tensor,
                     slot_ids: Sequence[int] | torch.Tensor, pages_per_chunk: int, segments: range | None) -> bool:
        """A restore's or a save's call (every page of consecutive blocks, one per slot of a list, all segments,
        host pages and rows) copied run by run from the Python lists, checked by their bounds; whether it was.

        The general path turns the ids and slots into tensors and arrays first: about 15 more calls, which
        after a model's forward (the CPU caches cold) cost 5-20 us each, as much as copying a small prefix.
        """
        if not (isinstance(block_ids, range) and block_ids.step == 1 and isinstance(slot_ids, list)
                and pages_per_chunk == 1 and segments is None and self._pages is not None
                and rows.device.type == "cpu" and all(type(slot) is int for slot in slot_ids)):
            return False
        self._check_rows(rows, 1)
        if len(slot_ids) != len(block_ids):
            raise InvalidInputError(f"{len(slot_ids)} slot ids for {len(block_ids)} chunks")
        if not slot_ids:
            return True
        if block_ids.start < 0 or block_ids.stop > self.num_blocks:
            raise InvalidInputError(f"a block id lies outside [0, {self.num_blocks})")
        if min(slot_ids) < 0 or max(slot_ids) >= rows.shape[0]:
            raise InvalidInputError(f"a slot id lies outside [0, {rows.shape[0]})")
        if gather and len(set(slot_ids)) != len(slot_ids):
            raise InvalidInputError("a slot id appears twice in one gather")
        self._copy_chunks(gather, None, list(block_ids), slot_ids, [True] * len(slot_ids), rows, 1,
                          range(self.num_segments))
        return True

    def _copy_chunks(self, gather: bool, per_chunk: np.ndarray | None, firsts: list[int], rows: list[int],
                     dense: list[bool], slot_rows: torch.Tensor, pages_per_chunk: int, chosen: range) -> None:
        """Copy chunks between the evenly spaced pages and their rows of ``slot_rows``, one call per run of chunks.

        Chunk ``c`` starts at block ``firsts[c]`` and sits in row ``rows[c]``; ``dense[c]``: its block ids
        are ``firsts[c]`` on, one after another (else ``per_chunk[c]`` lists them). A run is consecutive
        chunks whose block ids continue one another and whose rows lie at one constant step (a prefix saved
        into a fresh pool, or a contiguous staging buffer): one strided copy moves it, whatever its length.
        A dense run of at least ``TORCH_CHUNK_BYTES`` goes through torch's ``copy_`` between two strided
        views (one ``as_strided`` each), which splits it over its intra-op threads (18-24 GB/s against
        NumPy's 12-17 out of the CPU caches, 2 cores); another through NumPy, for which the fan-out would
        cost more than the copy.
        """
        assert self._pages is not None
        width = pages_per_chunk * self.page_bytes
        chunk_bytes = len(chosen) * width
        shape = (len(chosen), pages_per_chunk, self.page_bytes)
        for start, count, step in _runs(firsts, rows, dense, pages_per_chunk):
            row = rows[start]
            chunk_ids = None if dense[start] or per_chunk is None else per_chunk[start]
            pages = self._pages_tensor
            if pages is not None and chunk_ids is None and count * chunk_bytes >= TORCH_CHUNK_BYTES:
                segment_stride, block_stride = pages.stride(0), pages.stride(1)
                # (chunk, segment, page in chunk, byte) on both sides, from their bases: two ops, not eight.
                run = pages.as_strided((count, *shape), (pages_per_chunk * block_stride, segment_stride,
                                                         block_stride, 1),
                                       pages.storage_offset() + chosen.start * segment_stride
                                       + firsts[start] * block_stride)
                picked = slot_rows.as_strided((count, *shape), (step * slot_rows.stride(0), width, self.page_bytes,
                                                                1),
                                              slot_rows.storage_offset() + row * slot_rows.stride(0)
                                              + chosen.start * width)
                if gather:
                    picked.copy_(run)
                else:
                    run.copy_(picked)
                continue
            where = (slice(row, row + (count - 1) * step + 1, step), slice(chosen.start, chosen.stop))
            grid = self._grid(slot_rows, pages_per_chunk)
            if pages is not None and count * chunk_bytes >= TORCH_CHUNK_BYTES:
                ids_of = None if chunk_ids is None else torch.from_numpy(chunk_ids)
                _copy_run(gather, pages[chosen.start:chosen.stop], grid[where].reshape(count, *shape),
                          firsts[start], ids_of, torch.Tensor.copy_)
            else:
                _copy_run(gather, self._pages[chosen.start:chosen.stop], grid.numpy()[where].reshape(count, *shape),
                          firsts[start], chunk_ids, lambda target, source: np.copyto(target, source))

    def _grid(self, rows: torch.Tensor, pages_per_chunk: int) -> torch.Tensor:
        """``rows`` seen as ``(rows, segment, pages of the chunk)``: the first ``chunk_bytes`` of each row."""
        width = pages_per_chunk * self.page_bytes
        return rows.as_strided((rows.shape[0], self.num_segments, width), (rows.stride(0), width, 1),
                               rows.storage_offset())

    def _addressable(self, rows: torch.Tensor, slots: torch.Tensor | None, pages_per_chunk: int) -> bool:
        """Whether the device can address the host rows this call touches (registered, mapped at the same address)."""
        first, last = (0, rows.shape[0] - 1) if slots is None else (int(slots.min()), int(slots.max()))
        return rows_addressable(rows, first, last, self.chunk_bytes(pages_per_chunk), self.device)

    def _copy_via_device(self, gather: bool, ids: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor | None,
                         pages_per_chunk: int, chosen: range) -> None:
        """The kernel on a device buffer, then one pageable copy: for host rows the device cannot address."""
        self.fallbacks += 1
        chunk_bytes = self.chunk_bytes(pages_per_chunk)
        if gather:
            buffer = torch.empty((ids.numel() // pages_per_chunk, chunk_bytes), dtype=torch.uint8, device=self.device)
            self._launch(True, ids, buffer, None, pages_per_chunk, chosen)
            part = self._grid(buffer, pages_per_chunk)[:, chosen.start:chosen.stop].cpu()
            target = self._grid(rows, pages_per_chunk)[:, chosen.start:chosen.stop]
            if slots is None:
                target.copy_(part)
            else:
                target.index_copy_(0, slots, part)
            return
        host = rows.narrow(1, 0, chunk_bytes)
        picked = host if slots is None else host.index_select(0, slots)
        self._launch(False, ids, picked.to(self.device), None, pages_per_chunk, chosen)

    def _launch(self, gather: bool, ids: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor | None,
                pages_per_chunk: int, segments: range) -> None:
        assert self._kernels is not None
        kernel = self._kernels[0 if gather else 1]
        num_ids, num_segments = ids.numel(), self.num_segments
        stream = torch.cuda.current_stream(self.device)
        # One upload from a pinned buffer carries the segment tables, the block ids and the slot ids.
        parts = [self._tables.reshape(-1), ids.numpy()] + ([] if slots is None else [slots.numpy()])
        table = upload_table(np.concatenate(parts), self.device, stream)
        base, item = table.data_ptr(), table.element_size()
        ids_pointer = base + 2 * num_segments * item
        slot_pointer = 0 if slots is None else ids_pointer + num_ids * item
        num_pairs = num_ids * len(segments)
        vector = self._vector and rows.data_ptr() % 16 == 0 and rows.stride(0) % 16 == 0
        cupy = importlib.import_module("cupy")
        with cupy.cuda.Device(self.device.index or 0), cupy.cuda.ExternalStream(stream.cuda_stream):
            kernel(
                (grid_size(num_pairs, touches_host=rows.device.type == "cpu"),),
                (_THREADS,),
                (
                    np.uint64(base),
                    np.uint64(base + num_segments * item),
                    np.uint64(ids_pointer),
                    np.uint64(slot_pointer),
                    np.uint64(rows.data_ptr()),
                    np.int64(rows.stride(0)),
                    np.int64(num_ids),
                    np.int32(num_segments),
                    np.int32(segments.start),
                    np.int32(segments.stop),
                    np.int64(self.page_bytes),
                    np.int32(pages_per_chunk),
                    np.int32(1 if vector else 0),
                ),
            )
