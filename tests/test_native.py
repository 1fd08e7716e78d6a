"""Gather/scatter of paged KV (kvtier.native): the torch path everywhere, the CUDA kernel where CUDA is."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvtier import native
from kvtier.arena import HostArena
from kvtier.errors import InvalidInputError
from kvtier.native import KERNEL_SOURCE, PagedKV, byte_rows, load_kernels

NUM_BLOCKS = 12


def _layers(num_layers: int, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """Per-layer caches shaped like vLLM 0.33's logical view ``[blocks, heads, tokens, 2 * head_dim]``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(NUM_BLOCKS, 2, 4, 8, generator=generator).to(torch.bfloat16).to(device)
            for _ in range(num_layers)]


def _paged(layers: list[torch.Tensor], use_kernel: bool = True, use_numpy: bool = True) -> PagedKV:
    return PagedKV([byte_rows(layer, NUM_BLOCKS) for layer in layers], use_kernel=use_kernel, use_numpy=use_numpy)


FALLBACKS = pytest.mark.parametrize("use_numpy", [True, False], ids=["numpy", "torch"])


def test_byte_rows_views_the_same_memory() -> None:
    layer = _layers(1)[0]
    rows = byte_rows(layer, NUM_BLOCKS)
    assert rows.shape == (NUM_BLOCKS, 2 * 4 * 8 * 2)
    rows[3].zero_()
    assert torch.count_nonzero(layer[3]) == 0


def test_byte_rows_accepts_permuted_and_strided_pages() -> None:
    # Physically [blocks, tokens, heads, C], viewed logically as [blocks, heads, tokens, C] (vLLM's LBNHC).
    physical = torch.randn(NUM_BLOCKS, 4, 2, 8)
    rows = byte_rows(physical.permute(0, 2, 1, 3), NUM_BLOCKS)
    assert torch.equal(rows[5], physical[5].reshape(-1).view(torch.uint8))
    # Block-outermost: every block holds all layers' pages, so one layer's rows are strided.
    packed = torch.randn(NUM_BLOCKS, 3, 2, 4, 8)
    rows = byte_rows(packed[:, 1], NUM_BLOCKS)
    assert rows.stride(0) == 3 * 2 * 4 * 8 * 4
    assert torch.equal(rows[7], packed[7, 1].reshape(-1).view(torch.uint8))


def test_byte_rows_merges_kernel_blocks() -> None:
    kernel_blocks = torch.randn(NUM_BLOCKS * 4, 2, 4, 8)
    rows = byte_rows(kernel_blocks, NUM_BLOCKS)
    assert rows.shape == (NUM_BLOCKS, 4 * 2 * 4 * 8 * 4)
    assert torch.equal(rows[2], kernel_blocks[8:12].reshape(-1).view(torch.uint8))


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(NUM_BLOCKS + 1, 4),  # not a multiple of the block count
        torch.zeros(NUM_BLOCKS, 4, 8)[:, :, :4],  # a page with holes
        torch.zeros(2, NUM_BLOCKS, 4).transpose(0, 1),  # K and V planes apart: not one run per block
    ],
)
def test_byte_rows_refuses_what_it_cannot_copy_as_pages(tensor: torch.Tensor) -> None:
    with pytest.raises(InvalidInputError):
        byte_rows(tensor, NUM_BLOCKS)


@FALLBACKS
@pytest.mark.parametrize("pages_per_chunk", [1, 2, 3])
def test_gather_then_scatter_moves_bytes_between_block_ids(pages_per_chunk: int, use_numpy: bool) -> None:
    layers = _layers(3)
    paged = _paged(layers, use_numpy=use_numpy)
    assert paged.backend == ("numpy" if use_numpy else "torch")
    src_ids = [1, 4, 5, 0, 9, 2][: 2 * pages_per_chunk]
    dst_ids = [11, 10, 3, 6, 7, 8][: 2 * pages_per_chunk]
    staging = torch.empty(len(src_ids) * paged.num_segments * paged.page_bytes, dtype=torch.uint8)
    paged.gather(src_ids, staging, pages_per_chunk)
    paged.scatter(dst_ids, staging, pages_per_chunk)
    for layer in layers:
        assert torch.equal(layer[dst_ids], layer[src_ids])


@FALLBACKS
def test_staging_order_is_chunk_segment_page(use_numpy: bool) -> None:
    layers = _layers(2)
    paged = _paged(layers, use_numpy=use_numpy)
    ids = [7, 2, 5, 1]
    staging = torch.empty(paged.chunk_bytes(2) * 2, dtype=torch.uint8)
    paged.gather(ids, staging, pages_per_chunk=2)
    expected = torch.cat([
        layers[segment][ids[chunk * 2 + page]].reshape(-1).view(torch.uint8)
        for chunk in range(2) for segment in range(2) for page in range(2)
    ])
    assert torch.equal(staging, expected)


@FALLBACKS
def test_segment_ranges_copy_one_layer_at_a_time(use_numpy: bool) -> None:
    layers = _layers(3)
    paged = _paged(layers, use_numpy=use_numpy)
    staging = torch.zeros(paged.chunk_bytes() * 2, dtype=torch.uint8)
    paged.gather([3, 4], staging, segments=range(1, 2))
    grid = staging.view(2, 3, -1)
    assert torch.count_nonzero(grid[:, 0]) == 0 and torch.count_nonzero(grid[:, 2]) == 0
    paged.scatter([8, 9], staging, segments=range(1, 2))
    assert torch.equal(layers[1][[8, 9]], layers[1][[3, 4]])
    assert not torch.equal(layers[0][[8, 9]], layers[0][[3, 4]])


def test_arguments_are_checked_before_copying() -> None:
    paged = _paged(_layers(2))
    staging = torch.empty(paged.chunk_bytes(), dtype=torch.uint8)
    with pytest.raises(InvalidInputError):
        paged.gather([NUM_BLOCKS], staging)
    with pytest.raises(InvalidInputError):
        paged.gather([0, 1], staging)
    with pytest.raises(InvalidInputError):
        paged.gather([0, 1, 2], torch.empty(paged.chunk_bytes() * 3, dtype=torch.uint8), pages_per_chunk=2)
    with pytest.raises(InvalidInputError):
        paged.scatter([0], staging, segments=range(1, 3))
    with pytest.raises(InvalidInputError):
        PagedKV([byte_rows(_layers(1)[0], NUM_BLOCKS), torch.zeros(NUM_BLOCKS, 8, dtype=torch.uint8)])


def test_empty_block_list_is_a_no_op() -> None:
    paged = _paged(_layers(1))
    paged.gather([], torch.empty(0, dtype=torch.uint8))
    paged.scatter([], torch.empty(0, dtype=torch.uint8))


def test_kernel_source_ships_with_the_package() -> None:
    assert KERNEL_SOURCE.is_file()
    assert "kvtier_gather" in KERNEL_SOURCE.read_text()


def test_a_built_wheel_carries_the_kernel_and_an_install_of_it_finds_it(tmp_path: Path) -> None:
    """A non-editable install has no ``native/`` beside the package: without the kernel in the wheel every
    CUDA copy would silently take the torch path."""
    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        tree.mkdir(exist_ok=True)
        shutil.copy(root / name, tree / name)
    for name in ("kvtier", "connectors", "native"):
        shutil.copytree(root / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheels"), str(tree)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").glob("kvtier-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("kvtier/_kernels/gather_scatter.cu") == KERNEL_SOURCE.read_bytes()
        archive.extractall(tmp_path / "site")
    found = subprocess.run([sys.executable, "-c", "import kvtier.native as n; print(n.KERNEL_SOURCE)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == tmp_path / "site" / "kvtier" / "_kernels" / "gather_scatter.cu"


class _Event:
    """A CUDA event stand-in: complete once the test says so (or once waited for)."""

    def __init__(self) -> None:
        self.done, self.recorded, self.waited = True, 0, False

    def record(self, stream: object) -> None:
        self.done, self.recorded = False, self.recorded + 1

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = self.waited = True


def _uploads_on_the_cpu(monkeypatch: pytest.MonkeyPatch, max_lanes: int) -> tuple[native.PinnedUploads, list[_Event]]:
    """``PinnedUploads`` with CPU buffers and recording events; the "device" copy lands in CPU memory."""
    events: list[_Event] = []

    def new_event() -> _Event:
        events.append(_Event())
        return events[-1]

    real_empty = torch.empty
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: real_empty(*args, **{**kwargs, "device": "cpu"}))
    uploads = native.PinnedUploads(max_lanes, pinned=lambda size: real_empty(size, dtype=torch.int64),
                                   new_event=new_event)
    return uploads, events


def test_an_upload_never_waits_for_an_earlier_copy_while_lanes_are_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream queued far ahead of the GPU (a save of many layers) never makes an upload wait on the host:
    a buffer whose copy has not run is never written, a new one is taken instead; a buffer whose copy ran
    is reused (oldest first), and only past ``max_lanes`` in flight does an upload wait."""
    uploads, events = _uploads_on_the_cpu(monkeypatch, max_lanes=4)
    device, stream = torch.device("cuda", 0), object()
    tables = [np.arange(i, i + 5) for i in range(6)]
    outs = [uploads.upload(tables[i], device, stream) for i in range(4)]
    assert uploads.lanes(device) == 4 and uploads.waits == 0 and not any(e.waited for e in events)
    assert all(np.array_equal(out.numpy(), table) for out, table in zip(outs, tables, strict=False))
    events[1].done = True  # not the oldest: the oldest still in flight
    uploads.upload(tables[4], device, stream)
    assert uploads.waits == 1 and events[0].waited and uploads.lanes(device) == 4
    events[0].done = events[2].done = True
    uploads.upload(tables[5], device, stream)
    assert uploads.waits == 1 and len(events) == 4  # the oldest lane, done, was reused
    # A table larger than a buffer grows it; other devices have lanes of their own.
    big = np.arange(5000)
    for event in events:
        event.done = True
    assert np.array_equal(uploads.upload(big, device, stream).numpy(), big)
    uploads.upload(tables[0], torch.device("cuda", 1), stream)
    assert uploads.lanes(torch.device("cuda", 1)) == 1 and uploads.lanes(device) == 4


def _cuda_kernels_available() -> bool:
    return torch.cuda.is_available() and load_kernels() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_kernels_available(), reason="needs CUDA and CuPy")
@pytest.mark.parametrize("pinned", [True, False])
def test_cuda_kernel_matches_the_torch_path(pinned: bool) -> None:
    layers = _layers(4, device="cuda", seed=1)
    kernel, fallback = _paged(layers), _paged(layers, use_kernel=False)
    assert fallback.backend == "torch"
    assert kernel.backend == "cuda"
    ids = [5, 2, 9, 0]
    size = kernel.chunk_bytes(2) * 2
    staging = torch.empty(size, dtype=torch.uint8, pin_memory=True) if pinned else torch.empty(
        size, dtype=torch.uint8, device="cuda")
    reference = torch.empty(size, dtype=torch.uint8, device="cuda")
    kernel.gather(ids, staging, pages_per_chunk=2)
    fallback.gather(ids, reference, pages_per_chunk=2)
    torch.cuda.synchronize()
    assert torch.equal(staging.cuda(), reference)
    kernel.scatter([11, 10, 8, 7], staging, pages_per_chunk=2, segments=range(1, 3))
    torch.cuda.synchronize()
    for index, layer in enumerate(layers):
        assert torch.equal(layer[[11, 10, 8, 7]], layer[ids]) == (index in (1, 2))


# -- in place: chunks in arena slots ---------------------------------------------------------------------


def _rows(num_slots: int, width: int, device: str = "cpu") -> torch.Tensor:
    """A ``(num_slots, width)`` row view with row padding beyond ``width``, like an arena's 4 KiB slots."""
    return torch.zeros(num_slots, width + 32, dtype=torch.uint8, device=device)[:, :width + 16]


@FALLBACKS
@pytest.mark.parametrize("pages_per_chunk", [1, 2, 3])
@pytest.mark.parametrize("layout", ["layer", "block_outermost", "kernel_blocks"])
def test_slots_round_trip_at_several_layouts(pages_per_chunk: int, layout: str, use_numpy: bool) -> None:
    if layout == "layer":
        segments = [byte_rows(layer, NUM_BLOCKS) for layer in _layers(3)]
    elif layout == "block_outermost":
        packed = torch.randn(NUM_BLOCKS, 3, 2, 4, 8)
        segments = [byte_rows(packed[:, i], NUM_BLOCKS) for i in range(3)]
    else:
        segments = [byte_rows(torch.randn(NUM_BLOCKS * 2, 2, 4, 8), NUM_BLOCKS) for _ in range(2)]
    paged = PagedKV(segments, use_numpy=use_numpy)
    before = [segment.clone() for segment in segments]
    src_ids = [1, 4, 5, 0, 9, 2][: 2 * pages_per_chunk]
    dst_ids = [11, 10, 3, 6, 7, 8][: 2 * pages_per_chunk]
    rows = _rows(5, paged.chunk_bytes(pages_per_chunk))
    paged.gather_to_slots(src_ids, rows, [4, 1], pages_per_chunk)
    # The same bytes as a contiguous gather, chunk by chunk, in the chosen rows.
    staging = torch.empty(paged.chunk_bytes(pages_per_chunk) * 2, dtype=torch.uint8)
    paged.gather(src_ids, staging, pages_per_chunk)
    chunks = staging.view(2, -1)
    assert torch.equal(rows[4, : chunks.shape[1]], chunks[0]) and torch.equal(rows[1, : chunks.shape[1]], chunks[1])
    assert torch.count_nonzero(rows[[0, 2, 3]]) == 0
    paged.scatter_from_slots(dst_ids, rows, [4, 1], pages_per_chunk)
    for segment, original in zip(segments, before, strict=True):
        assert torch.equal(segment[dst_ids], original[src_ids])


@FALLBACKS
def test_slots_of_a_layer_range_leave_the_other_layers(use_numpy: bool) -> None:
    layers = _layers(3)
    paged = _paged(layers, use_numpy=use_numpy)
    rows = _rows(4, paged.chunk_bytes())
    paged.gather_to_slots([3, 4], rows, [2, 0], segments=range(1, 2))
    grid = rows[:, : paged.chunk_bytes()].view(4, 3, -1)
    assert torch.count_nonzero(grid[:, 0]) == 0 and torch.count_nonzero(grid[:, 2]) == 0
    assert torch.equal(grid[2, 1], layers[1][3].reshape(-1).view(torch.uint8))
    paged.scatter_from_slots([8, 9], rows, [2, 0], segments=range(1, 2))
    assert torch.equal(layers[1][[8, 9]], layers[1][[3, 4]])
    assert not torch.equal(layers[0][[8, 9]], layers[0][[3, 4]])


def test_slots_in_a_host_arena_hold_whole_blocks() -> None:
    layers = _layers(2)
    paged = _paged(layers)
    arena = HostArena(4, 4096)
    try:
        rows = arena.rows()
        assert rows.shape == (4, 4096) and rows.data_ptr() == arena.slot(0).data_ptr()
        paged.gather_to_slots([5, 6, 7, 8], rows, [3, 1], pages_per_chunk=2)
        staging = torch.empty(paged.chunk_bytes(2) * 2, dtype=torch.uint8)
        paged.gather([5, 6, 7, 8], staging, pages_per_chunk=2)
        assert torch.equal(arena.slot(3, paged.chunk_bytes(2)), staging[: paged.chunk_bytes(2)])
        assert torch.equal(arena.slot(1, paged.chunk_bytes(2)), staging[paged.chunk_bytes(2):])
    finally:
        del rows
        arena.close()


def test_slot_arguments_are_checked_before_copying() -> None:
    layers = _layers(2)
    paged = _paged(layers)
    before = [layer.clone() for layer in layers]
    rows = _rows(3, paged.chunk_bytes())
    bad_calls = [
        lambda: paged.gather_to_slots([0, 1], rows, [0, 3]),  # slot out of range
        lambda: paged.gather_to_slots([0, 1], rows, [-1, 0]),
        lambda: paged.gather_to_slots([0, 1], rows, [1, 1]),  # one slot twice
        lambda: paged.gather_to_slots([0, 1], rows, [0]),  # chunk count mismatch
        lambda: paged.gather_to_slots([0, 1], rows, [0, 1], pages_per_chunk=2),
        lambda: paged.scatter_from_slots([0, 1], rows[:, : paged.chunk_bytes() - 1], [0, 1]),  # too narrow
        lambda: paged.scatter_from_slots([0, 1], rows.view(torch.int8), [0, 1]),  # wrong dtype
        lambda: paged.scatter_from_slots([0, 1], rows[0], [0, 1]),  # not rows
        lambda: paged.scatter_from_slots([0, 1], rows[:, ::2], [0, 1]),  # bytes not dense
        lambda: paged.scatter_from_slots([0, 1], torch.zeros(4096, dtype=torch.uint8).as_strided(
            (3, paged.chunk_bytes()), (8, 1)), [0, 1]),  # rows overlap
        lambda: paged.scatter_from_slots([0, NUM_BLOCKS], rows, [0, 1]),  # block id out of range
        lambda: paged.scatter_from_slots(range(NUM_BLOCKS - 1, NUM_BLOCKS + 1), rows, [0, 1]),  # a range past the end
        lambda: paged.scatter_from_slots(range(-1, 1), rows, [0, 1]),  # a range before the start
        lambda: paged.scatter_from_slots(range(0, 2), rows, torch.tensor([0, 3])),  # a tensor slot out of range
    ]
    for call in bad_calls:
        with pytest.raises(InvalidInputError):
            call()
    for layer, original in zip(layers, before, strict=True):
        assert torch.equal(layer, original)
    assert torch.count_nonzero(rows) == 0


def test_empty_slot_list_is_a_no_op() -> None:
    paged = _paged(_layers(1))
    rows = _rows(2, paged.chunk_bytes())
    paged.gather_to_slots([], rows, [])
    paged.scatter_from_slots([], rows, [])
    paged.scatter_from_slots(range(3, 3), rows, [])
    assert torch.count_nonzero(rows) == 0


def test_range_ids_copy_what_the_same_ids_as_a_list_copy() -> None:
    """A range of block ids (a restore's) takes a shortcut through the checks, not through the copy."""
    layers = _layers(2)
    paged = _paged(layers)
    rows = _rows(4, paged.chunk_bytes())
    paged.gather_to_slots([2, 3, 4], rows, [3, 0, 1])
    for ids in (range(5, 8), range(5, 11, 2)):
        got, expected = [layer.clone() for layer in layers], [layer.clone() for layer in layers]
        PagedKV([byte_rows(layer, NUM_BLOCKS) for layer in got]).scatter_from_slots(ids, rows, [3, 0, 1])
        PagedKV([byte_rows(layer, NUM_BLOCKS) for layer in expected]).scatter_from_slots(list(ids), rows,
                                                                                          torch.tensor([3, 0, 1]))
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_kernels_available(), reason="needs CUDA and CuPy")
@pytest.mark.parametrize("memory", ["registered_arena", "pinned", "device", "pageable"])
def test_cuda_slots_match_the_cpu_bytes(memory: str) -> None:
    cpu_layers = _layers(4, seed=2)
    layers = [layer.cuda() for layer in cpu_layers]
    kernel = _paged(layers)
    assert kernel.backend == "cuda"
    ids, slots = [5, 2, 9, 0], [6, 1]
    width = kernel.chunk_bytes(2)
    arena = None
    if memory == "registered_arena":
        arena = HostArena(8, -(-width // 4096) * 4096)
        arena.start_pinning(4096)
        assert arena.wait_pinned(timeout=30)
        rows = arena.rows()
    elif memory == "pinned":
        rows = torch.zeros(8, width, dtype=torch.uint8, pin_memory=True)
    elif memory == "device":
        rows = torch.zeros(8, width, dtype=torch.uint8, device="cuda")
    else:
        rows = torch.zeros(8, width, dtype=torch.uint8)
    try:
        kernel.gather_to_slots(ids, rows, slots, pages_per_chunk=2)
        torch.cuda.synchronize()
        expected = _rows(8, width)
        _paged(cpu_layers).gather_to_slots(ids, expected, slots, pages_per_chunk=2)
        assert torch.equal(rows[:, :width].cpu(), expected[:, :width])
        assert kernel.fallbacks == (1 if memory == "pageable" else 0)
        kernel.scatter_from_slots([11, 10, 8, 7], rows, slots, pages_per_chunk=2, segments=range(1, 3))
        torch.cuda.synchronize()
        for index, layer in enumerate(layers):
            assert torch.equal(layer[[11, 10, 8, 7]], layer[ids]) == (index in (1, 2))
        assert kernel.fallbacks == (2 if memory == "pageable" else 0)
    finally:
        del rows
        if arena is not None:
            arena.close()


@pytest.mark.parametrize("pages_per_chunk", [1, 2])
def test_evenly_spaced_segments_copy_a_chunk_at_a_time_with_the_same_bytes(pages_per_chunk: int) -> None:
    """Segments that are planes of one tensor take the per-chunk NumPy path; bytes equal the torch path's."""
    planes = torch.randn(3, 2, NUM_BLOCKS, 4, 8, generator=torch.Generator().manual_seed(5))
    segments = [planes[i, j].view(torch.uint8).view(NUM_BLOCKS, -1) for i in range(3) for j in range(2)]
    fast, reference = PagedKV(segments), PagedKV([s.clone() for s in segments], use_numpy=False)
    assert fast._pages is not None and reference._pages is None
    ids, slots = [7, 8, 3, 1], [5, 0, 2, 6][: 4 // pages_per_chunk]
    width = fast.chunk_bytes(pages_per_chunk)
    got, expected = _rows(8, width), _rows(8, width)
    fast.gather_to_slots(ids, got, slots, pages_per_chunk)
    reference.gather_to_slots(ids, expected, slots, pages_per_chunk)
    assert torch.equal(got, expected)
    targets = [11, 10, 0, 2]
    fast.scatter_from_slots(targets, got, slots, pages_per_chunk, segments=range(1, 5))
    reference.scatter_from_slots(targets, expected, slots, pages_per_chunk, segments=range(1, 5))
    assert all(torch.equal(a, b) for a, b in zip(segments, reference.segments, strict=True))


def test_a_launch_uploads_its_tables_once_from_host_arrays_and_sizes_its_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel path on a CPU, through stand-ins for CuPy and the stream: one upload of the segment tables
    and the ids per launch (from a host array, never a per-call device tensor), a few CUDA blocks when the
    chunks are host memory, the full grid between device buffers."""
    import contextlib
    import types

    from kvtier import native

    caller = types.SimpleNamespace(cuda_stream=1)
    launches: list[tuple[tuple[int, ...], tuple[int, ...], tuple[Any, ...]]] = []
    uploads: list[np.ndarray] = []

    def kernel(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        launches.append((grid, block, args))

    def upload(table: np.ndarray, device: torch.device, stream: object) -> torch.Tensor:
        assert isinstance(table, np.ndarray) and stream is caller
        uploads.append(table.copy())
        return torch.from_numpy(table.copy())

    real_tensor = torch.tensor

    def no_device_tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
        assert kwargs.get("device") is None, "a per-call device tensor (a pageable upload)"
        return real_tensor(*args, **kwargs)

    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Device=lambda index: contextlib.nullcontext(), ExternalStream=lambda pointer: contextlib.nullcontext()))
    monkeypatch.setattr(native, "upload_table", upload)
    asked: list[torch.device] = []
    monkeypatch.setattr(native, "rows_addressable", lambda *args: asked.append(args[-1]) or True)
    monkeypatch.setattr(native.importlib, "import_module", lambda name: fake_cupy)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch, "tensor", no_device_tensor)
    layers = _layers(3)
    paged = _paged(layers, use_kernel=False)
    paged._kernels = (kernel, kernel)
    paged.device = torch.device("cuda", 1)
    monkeypatch.setattr(PagedKV, "_check_device", lambda self, chunks, what: None)
    ids = list(range(NUM_BLOCKS))
    paged.gather_to_slots(ids, _rows(NUM_BLOCKS, paged.chunk_bytes()), list(reversed(ids)))
    assert len(uploads) == 1 and len(launches) == 1
    # The driver is asked on the pages' GPU, not torch's current one (a context on GPU 0 for cuda:1).
    assert asked == [torch.device("cuda", 1)]
    table = uploads[0]
    assert table.size == 2 * 3 + 2 * NUM_BLOCKS and list(table[6:6 + NUM_BLOCKS]) == ids
    assert launches[0][0] == (native.grid_size(NUM_BLOCKS * 3, touches_host=True),)
    assert native.grid_size(10**6, touches_host=True) == native.LINK_GRID < 64
    assert native.grid_size(10**6, touches_host=False) == native.DEVICE_GRID
    assert native.grid_size(3, touches_host=True) == 3


def test_a_restore_into_one_tensor_of_segments_is_one_upload_and_one_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The transformers connector's restore on CUDA: ``PagedKV`` over one ``(segment, block, page byte)``
    tensor (not a list of segments) reads its shape and device from it and scatters every block of the
    prefix in one launch, its tables built from that tensor and uploaded once from a host array."""
    import contextlib
    import types

    from kvtier import native

    caller = types.SimpleNamespace(cuda_stream=1)
    launches: list[tuple[Any, ...]] = []
    uploads: list[np.ndarray] = []

    def upload(table: np.ndarray, device: torch.device, stream: object) -> torch.Tensor:
        uploads.append(table.copy())
        return torch.from_numpy(table.copy())

    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Device=lambda index: contextlib.nullcontext(), ExternalStream=lambda pointer: contextlib.nullcontext()))
    monkeypatch.setattr(native, "upload_table", upload)
    monkeypatch.setattr(native, "rows_addressable", lambda *args: True)
    monkeypatch.setattr(native.importlib, "import_module", lambda name: fake_cupy)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(PagedKV, "_check_device", lambda self, chunks, what: None)
    num_segments, page_bytes = 6, 64
    planes = torch.zeros(num_segments * NUM_BLOCKS * page_bytes, dtype=torch.uint8).view(num_segments, NUM_BLOCKS, -1)
    paged = PagedKV(planes, use_kernel=False)
    assert (paged.num_segments, paged.num_blocks, paged.page_bytes) == (num_segments, NUM_BLOCKS, page_bytes)
    # As a CUDA tensor's PagedKV is built: kernels, no host pages.
    paged._kernels = (lambda *args: launches.append(args), lambda *args: launches.append(args))
    paged.device, paged.backend, paged._pages, paged._pages_tensor = torch.device("cuda", 0), "cuda", None, None
    slots = list(reversed(range(NUM_BLOCKS)))
    paged.scatter_from_slots(range(NUM_BLOCKS), _rows(NUM_BLOCKS, paged.chunk_bytes()), slots)
    assert len(uploads) == 1 and len(launches) == 1
    assert list(uploads[0][2 * num_segments:2 * num_segments + NUM_BLOCKS]) == list(range(NUM_BLOCKS))


@pytest.mark.parametrize("torch_chunk_bytes", [1, 1 << 40], ids=["torch", "numpy"])
@pytest.mark.parametrize("pages_per_chunk", [1, 2])
@pytest.mark.parametrize("slots", [[0, 1, 2, 3, 4, 5, 6, 7], [1, 3, 5, 7, 9, 0, 2, 4], [6, 2, 3, 4, 9, 8, 7, 0],
                                   [4, 5, 0, 1, 2, 3, 9, 8]])
def test_runs_of_chunks_copy_in_one_call_with_the_same_bytes(monkeypatch: pytest.MonkeyPatch, slots: list[int],
                                                             pages_per_chunk: int, torch_chunk_bytes: int) -> None:
    """Chunks whose ids continue and whose slots step evenly move in one strided copy (torch's or NumPy's).

    Block ids with a break inside a chunk (``[3, 1]``) and slots that change step split the runs; the bytes
    equal the per-segment torch path's, from a 3-D plane tensor as from a list of segments.
    """
    monkeypatch.setattr(native, "TORCH_CHUNK_BYTES", torch_chunk_bytes)
    planes = torch.randn(6, NUM_BLOCKS, 4, 8, generator=torch.Generator().manual_seed(7)).view(torch.uint8)
    planes = planes.view(6, NUM_BLOCKS, -1)
    fast, reference = PagedKV(planes), PagedKV([s.clone() for s in planes.unbind(0)], use_numpy=False)
    assert fast._pages is not None and fast.num_segments == 6 and len(fast.segments) == 6
    num_chunks = 8 // pages_per_chunk
    ids = [4, 5, 6, 7, 8, 9, 3, 1][: num_chunks * pages_per_chunk]
    chosen = slots[:num_chunks]
    width = fast.chunk_bytes(pages_per_chunk)
    got, expected = _rows(10, width), _rows(10, width)
    fast.gather_to_slots(ids, got, chosen, pages_per_chunk)
    reference.gather_to_slots(ids, expected, chosen, pages_per_chunk)
    assert torch.equal(got, expected)
    targets = [10, 11, 5, 6, 0, 2, 9, 8][: num_chunks * pages_per_chunk]
    fast.scatter_from_slots(targets, got, chosen, pages_per_chunk, segments=range(1, 5))
    reference.scatter_from_slots(targets, expected, chosen, pages_per_chunk, segments=range(1, 5))
    assert all(torch.equal(a, b) for a, b in zip(planes.unbind(0), reference.segments, strict=True))


@pytest.mark.parametrize("torch_chunk_bytes", [1, 1 << 40], ids=["torch", "numpy"])
@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_evenly_spaced_segments_in_either_order_copy_runs_with_the_same_bytes(
        monkeypatch: pytest.MonkeyPatch, order: str, torch_chunk_bytes: int) -> None:
    """A list of evenly spaced segments copies a run in one call; segments in descending address order (a
    negative step, which torch cannot view) go through NumPy whatever the run's size. Bytes equal the
    per-segment torch path's."""
    monkeypatch.setattr(native, "TORCH_CHUNK_BYTES", torch_chunk_bytes)
    planes = torch.randn(6, NUM_BLOCKS, 4, 8, generator=torch.Generator().manual_seed(9)).view(torch.uint8)
    segments = list(planes.view(6, NUM_BLOCKS, -1).unbind(0))
    if order == "descending":
        segments.reverse()
    fast, reference = PagedKV(segments), PagedKV([s.clone() for s in segments], use_numpy=False)
    assert fast._pages is not None and (fast._pages_tensor is None) == (order == "descending")
    got, expected = _rows(10, fast.chunk_bytes()), _rows(10, fast.chunk_bytes())
    fast.gather_to_slots(range(2, 8), got, [4, 5, 6, 7, 0, 1])
    reference.gather_to_slots(list(range(2, 8)), expected, torch.tensor([4, 5, 6, 7, 0, 1]))
    assert torch.equal(got, expected)
    fast.scatter_from_slots(range(6, 12), got, [0, 1, 4, 5, 6, 7])
    reference.scatter_from_slots(list(range(6, 12)), expected, torch.tensor([0, 1, 4, 5, 6, 7]))
    assert all(torch.equal(a, b) for a, b in zip(segments, reference.segments, strict=True))


def test_a_plane_tensor_is_checked_once() -> None:
    planes = torch.zeros(4, NUM_BLOCKS, 64, dtype=torch.uint8)
    for bad in (planes.view(torch.int8), planes[:, :, ::2], planes[:0], planes[0]):
        with pytest.raises(InvalidInputError):
            PagedKV(bad)
    assert PagedKV(planes).chunk_bytes(2) == 2 * 4 * 64
    # The kernels' tables, built lazily for a plane tensor, are those of the same segments passed one by one.
    lazy, listed = PagedKV(planes, use_kernel=False), PagedKV(list(planes.unbind(0)), use_kernel=False)
    assert np.array_equal(lazy._tables, listed._tables) and lazy._vector == listed._vector


@pytest.mark.parametrize("torch_chunk_bytes", [1, 1 << 40], ids=["torch", "numpy"])
@pytest.mark.parametrize("slots", [[0, 1, 2, 3, 4, 5], [9, 7, 5, 0, 2, 4], [6, 2, 3, 4, 9, 8]])
def test_a_range_of_ids_with_a_list_of_slots_copies_from_the_lists_with_the_same_bytes(
        monkeypatch: pytest.MonkeyPatch, slots: list[int], torch_chunk_bytes: int) -> None:
    """A restore's call (a range of ids, a lease's list of slots, host pages) skips the tensors of ids and
    slots, never the bytes: they equal the per-segment torch path's."""
    monkeypatch.setattr(native, "TORCH_CHUNK_BYTES", torch_chunk_bytes)
    planes = torch.randn(6, NUM_BLOCKS, 4, 8, generator=torch.Generator().manual_seed(3)).view(torch.uint8)
    planes = planes.view(6, NUM_BLOCKS, -1)
    fast, reference = PagedKV(planes), PagedKV([s.clone() for s in planes.unbind(0)], use_numpy=False)
    got, expected = _rows(10, fast.chunk_bytes()), _rows(10, fast.chunk_bytes())
    general = PagedKV._copy
    monkeypatch.setattr(PagedKV, "_copy", lambda *args: pytest.fail("took the general path"))
    fast.gather_to_slots(range(2, 8), got, slots)
    monkeypatch.setattr(PagedKV, "_copy", general)
    reference.gather_to_slots(list(range(2, 8)), expected, torch.tensor(slots))
    assert torch.equal(got, expected)
    fast.scatter_from_slots(range(6, 12), got, list(reversed(slots)))
    reference.scatter_from_slots(list(range(6, 12)), expected, torch.tensor(list(reversed(slots))))
    assert all(torch.equal(a, b) for a, b in zip(planes.unbind(0), reference.segments, strict=True))


def test_a_range_of_ids_with_a_list_of_slots_is_checked_before_copying() -> None:
    planes = torch.randn(4, NUM_BLOCKS, 16, generator=torch.Generator().manual_seed(4)).view(torch.uint8)
    planes = planes.view(4, NUM_BLOCKS, -1)
    paged, before = PagedKV(planes), planes.clone()
    rows = _rows(3, paged.chunk_bytes())
    bad_calls = [
        lambda: paged.gather_to_slots(range(2), rows, [0, 3]),  # slot out of range
        lambda: paged.gather_to_slots(range(2), rows, [-1, 0]),
        lambda: paged.gather_to_slots(range(2), rows, [1, 1]),  # one slot twice
        lambda: paged.gather_to_slots(range(2), rows, [0]),  # chunk count mismatch
        lambda: paged.scatter_from_slots(range(NUM_BLOCKS - 1, NUM_BLOCKS + 1), rows, [0, 1]),  # past the end
        lambda: paged.scatter_from_slots(range(-1, 1), rows, [0, 1]),  # before the start
        lambda: paged.scatter_from_slots(range(2), rows[:, : paged.chunk_bytes() - 1], [0, 1]),  # too narrow
        lambda: paged.scatter_from_slots(range(2), rows.view(torch.int8), [0, 1]),  # wrong dtype
        lambda: paged.scatter_from_slots(range(2), torch.zeros(4096, dtype=torch.uint8).as_strided(
            (3, paged.chunk_bytes()), (8, 1)), [0, 1]),  # rows overlap
    ]
    for call in bad_calls:
        with pytest.raises(InvalidInputError):
            call()
    assert torch.equal(planes, before) and torch.count_nonzero(rows) == 0
    with pytest.raises(InvalidInputError):  # slots that are not ints take the general path's checks
        paged.scatter_from_slots(range(2), rows, [0, 3.0])
    paged.scatter_from_slots(range(3, 3), rows, [])  # nothing to copy
    paged.scatter_from_slots(range(2), rows, [1, 1])  # one slot read twice: allowed
    assert torch.equal(planes[:, 0], planes[:, 1])


def test_kernels_that_do_not_build_or_load_mean_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """CuPy compiles and loads a module at its first ``get_function``: an NVRTC or driver error there is the
    torch path (``None``), never an error from every copy."""

    class Module:
        def __init__(self, **_: object) -> None:
            pass

        def get_function(self, name: str) -> object:
            raise RuntimeError(f"nvrtc: cannot compile {name}")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=Module))
    for cached in (native._kernel_module, native.load_kernels, native.load_copy_kernel):
        cached.cache_clear()
    try:
        assert native.load_kernels() is None and native.load_copy_kernel() is None
    finally:
        for cached in (native._kernel_module, native.load_kernels, native.load_copy_kernel):
            cached.cache_clear()
