"""Restore stored KV prefixes into a transformers model's cache, and save a prompt's KV after its prefill.

``TransformersConnector(model, store)`` wraps a causal LM of transformers 5.16-5.29 and a kvtier store (any
object with the ``BlockStore`` methods: the embedded ``kvtier.Store`` now, the daemon client later).

Promises:
- ``prefill`` and ``generate`` look up the longest stored prefix of the prompt, restore it into a
  ``DynamicCache`` and run the model on the rest only. Positions follow from the cache length, so the
  rotary embedding of the remaining tokens is the full forward's.
- The restored KV is byte-identical (``torch.equal``) to the KV that was saved. The logits that follow
  match a full recompute within the engine's own numerical noise, not bit for bit: GEMM and attention
  kernels sum in an order that follows the shapes, and which shapes differ depends on the BLAS and the
  device (``kvtier_connectors.transformers.contract`` states the bound and measures it; the opt-in
  ``kvtier_exact`` attention is bit-exact only where ``exact.verify`` confirms it on the running machine).
- At least ``min_tail_tokens`` (default 16) prompt tokens are always recomputed, since the forward must
  return logits; a prompt stored whole restores all but its last ``min_tail_tokens`` tokens.
- After the prefill, the prompt's whole blocks that the store lacks are saved; the partial tail block is
  not (it is recomputed next time), and nothing of a forward shorter than ``min_tail_tokens`` is (its KV
  comes from the smallest GEMM shapes, the furthest from a full prefill's). Saving is best effort: a
  block that gets no host slot is skipped, never an error. ``generate`` saves right after its prefill
  step, before any token is decoded.
- KV is keyed by ``model_id`` (``model_id_for``): the checkpoint name and a digest of the config, of a
  sample of every weight, of the weights' dtype, the attention implementation, the device type and the
  transformers and torch versions. KV computed by any other model, dtype or implementation is a miss,
  never a restore. A store of another layout is refused (``LayoutMismatchError``).
- A block that cannot be read (absent, evicted meanwhile, failed checksum on disk) ends the restored
  prefix there: the rest is recomputed, never filled with other data.
- A model whose cache cannot be restored exactly is refused with ``UnsupportedModelError``: at
  construction, a cache layer other than full or sliding-window attention (linear attention, KV sharing,
  compressed or quantized layers); per request, a prompt longer than a sliding-window layer's window
  minus one (that layer no longer holds the whole prefix); on saving, a cache whose K and V are not
  ``[batch, kv_heads, tokens, head_dim]`` of the layout. A cache that no longer holds the prompt's tokens
  from the first (a sliding-window layer run past its window) or holds fewer in any layer is never saved
  from (``InvalidInputError``).
- Data path: each block is copied once, between its arena slot and the cache's own layout, by one shared
  code path (``PagedKV`` with one segment per layer, K/V plane and head, a page being one block's
  ``[block tokens, head dim]`` of one head). A restore is one ``scatter_from_slots`` into one
  ``[layer, plane, head, row, tokens, dim]`` tensor whose slices are the cache's K and V (one kernel launch
  on CUDA, reading the registered arena in place; one strided copy per run of blocks on the CPU); the leases are
  released once the launch completed (a CUDA event; the forward is queued meanwhile). On the CPU that
  tensor is memory an earlier restore's cache gave up where there is some (``restore_buffers``, up to
  ``idle_restore_bytes`` kept idle): written without a page fault per page. A save is one
  ``gather_to_slots`` per batch row straight from the cache tensors; on CUDA it runs on a side stream after
  the forward, and the slots are committed once its event completed (checked on the next restore or
  save, or by ``wait_saves``). No step waits for the device: the kernels' address and index tables go up
  from pinned buffers (``kvtier.native.upload_table``), never as per-call pageable tensors, and the arena
  is registered on the model's device at construction (``pin_for``).
- Batch size: rows of equal length without padding are supported; each row is keyed by its own tokens
  and every row restores the shortest prefix that all rows have stored. A padded batch (an attention
  mask with zeros) is refused with ``InvalidInputError``: pass its rows one at a time.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
import transformers
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvtier import (
    BlockHasher,
    CapacityError,
    InvalidInputError,
    KVLayout,
    KvtierError,
    LayoutMismatchError,
    Lease,
    LookupResult,
    Reservation,
    Tier,
)
from kvtier.layout import dtype_name
from kvtier.native import PagedKV
from kvtier_connectors.transformers.buffers import DEFAULT_MAX_IDLE_BYTES, RestoreBuffers
from kvtier_connectors.transformers.exact import MIN_ROWS
from kvtier_connectors.transformers.models import SUPPORTED_TRANSFORMERS, transformers_version_supported

# Elements sampled from each weight tensor for the model id: enough that two random initialisations or
# a fine-tune never share a digest, few enough that hashing a large model takes milliseconds.
_WEIGHT_SAMPLES = 64


_Plain = TypeVar("_Plain")


def _copy_of(obj: _Plain) -> _Plain:
    """What ``copy.copy`` returns for an object whose state is its ``__dict__`` (the caches and layers here),
    without the copy protocol's calls: each restore makes one per layer, and after a model's forward (the CPU
    caches cold) the protocol cost about 15 us a restore against a few."""
    new: _Plain = type(obj).__new__(type(obj))
    new.__dict__.update(vars(obj))
    return new


class UnsupportedModelError(KvtierError):
    """The model's cache cannot be restored exactly (see the module docstring for the cases)."""


class BlockStore(Protocol):
    """The part of a kvtier store the connector uses (``kvtier.Store`` implements it)."""

    @property
    def layout(self) -> KVLayout: ...

    def hasher(self, model_id: str, tp_rank: int = 0, tp_size: int = 1, tenant_salt: str = "") -> BlockHasher: ...

    def lookup(self, keys: Sequence[bytes], *, prefetch: bool = True) -> LookupResult: ...

    def reserve(self, keys: Sequence[bytes]) -> Reservation: ...

    def commit(self, reservation: Reservation) -> None: ...

    def abort(self, reservation: Reservation) -> None: ...

    def acquire(self, keys: Sequence[bytes], timeout: float | None = None) -> Lease: ...

    def release(self, lease: Lease) -> None: ...

    def slot_view(self, slot: int, handle: Lease | Reservation | None = None) -> torch.Tensor: ...

    def slot_rows(self, handle: Lease | Reservation | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class Restored:
    """A cache holding the first ``num_tokens`` tokens of a prompt, restored from ``tiers`` (one per block)."""

    cache: DynamicCache
    num_tokens: int
    num_blocks: int
    tiers: tuple[Tier, ...]
    restore_s: float
    # On CUDA: events on the forward's stream at the restore's start and after its copy (timing enabled).
    span: tuple[torch.cuda.Event, torch.cuda.Event] | None = None


@dataclass(frozen=True)
class Prefill:
    """A prefill: the model's output for the unrestored tail, the cache of the whole prompt, and timings."""

    output: Any
    cache: DynamicCache
    prompt_tokens: int
    restored_tokens: int
    tiers: tuple[Tier, ...]
    saved_blocks: int
    restore_s: float
    forward_s: float
    save_s: float
    restore_span: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    def restore_device_s(self) -> float:
        """The restore's time to its copy's completion: CUDA events on the forward's stream, else ``restore_s``.

        ``restore_s`` is host time, which on CUDA ends when the copy is queued, not done.
        """
        if self.restore_span is None:
            return self.restore_s
        start, done = self.restore_span
        done.synchronize()
        return float(start.elapsed_time(done)) / 1e3

    @property
    def logits(self) -> torch.Tensor:
        """Logits of the tokens the forward computed (the tail): ``[batch, tail_tokens or kept, vocab]``."""
        logits: torch.Tensor = self.output.logits
        return logits

    @property
    def ttft_s(self) -> float:
        """Seconds from the request to the first token's logits: restore plus forward (the save comes after)."""
        return self.restore_s + self.forward_s


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def kv_layout(model: Any, block_tokens: int) -> KVLayout:
    """The ``KVLayout`` of ``model``'s KV cache with ``block_tokens`` tokens per block."""
    config = _text_config(model)
    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    return KVLayout(num_layers=int(config.num_hidden_layers), num_kv_heads=num_kv_heads, head_dim=head_dim,
                    dtype=dtype_name(model.dtype), block_tokens=block_tokens)


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for name, tensor in tensors:
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if flat.numel() == 0 or flat.device.type == "meta":
                continue
            # Integer spacing: a float linspace rounds past the end of tensors of more than 2**24 elements.
            count = min(flat.numel(), _WEIGHT_SAMPLES)
            index = torch.arange(count, dtype=torch.int64) * (flat.numel() - 1) // max(1, count - 1)
            sample = flat[index.to(flat.device)].cpu().contiguous()
            digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_id_for(model: Any) -> str:
    """``"<name>@<digest>"``: what decides the bits of the model's KV, so two models share keys only if equal.

    The digest covers the config (minus bookkeeping fields), a sample of every weight and buffer, the
    weights' dtype, the attention implementation, the device type and the transformers and torch versions
    (kernels and model code decide the last bits of KV, so KV of one is never restored into the other).
    """
    config = model.config
    fields = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    identity = {
        "config": fields,
        "dtype": str(model.dtype),
        "attn_implementation": str(getattr(config, "_attn_implementation", None)),
        "device_type": model.device.type,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "weights": _weights_digest(model),
    }
    canonical = json.dumps(identity, sort_keys=True, default=str)
    name = getattr(config, "name_or_path", "") or getattr(config, "model_type", "model")
    return f"{name}@{hashlib.sha256(canonical.encode()).hexdigest()[:32]}"


def cache_kwarg(model: Any) -> str:
    """The forward argument that takes the cache in this transformers version: ``cache`` or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _SaveAfterPrefill(LogitsProcessor):  # type: ignore[misc,unused-ignore]
    """A no-op logits processor that saves the prompt's blocks the first time ``generate`` calls it.

    ``generate`` calls its logits processors right after each forward; after the first (the prefill) the
    cache holds exactly the prompt, before decoding appends to it (or a sliding layer drops old tokens).
    """

    def __init__(self, connector: TransformersConnector, keys: list[list[bytes]], restored: Restored,
                 num_tokens: int) -> None:
        self.connector = connector
        self.keys = keys
        self.restored = restored
        self.num_tokens = num_tokens
        self.saved_blocks: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.saved_blocks is None:
            self.saved_blocks = self.connector._save_after_forward(self.keys, self.restored, self.num_tokens)
        return scores


class TransformersConnector:
    """Restores and saves prompt prefixes of one transformers model through one kvtier store."""

    def __init__(self, model: Any, store: BlockStore, *, model_id: str | None = None,
                 min_tail_tokens: int = MIN_ROWS, idle_restore_bytes: int = DEFAULT_MAX_IDLE_BYTES) -> None:
        if not transformers_version_supported():
            raise UnsupportedModelError(
                f"transformers {transformers.__version__} is not in the tested range {SUPPORTED_TRANSFORMERS}")
        if min_tail_tokens < 1:
            raise InvalidInputError(f"min_tail_tokens must be at least 1, got {min_tail_tokens}")
        self.min_tail_tokens = min_tail_tokens
        self.model = model
        # CPU restores write memory that earlier restores' caches gave up (see ``buffers``).
        self.restore_buffers = RestoreBuffers(idle_restore_bytes)
        self.store = store
        self.layout = store.layout
        expected = kv_layout(model, store.layout.block_tokens)
        if expected != store.layout:
            raise LayoutMismatchError(f"the store's layout {store.layout} is not the model's KV layout {expected}")
        self.model_id = model_id or model_id_for(model)
        self.hasher = store.hasher(self.model_id)
        # ``model.device`` walks the model's modules (~20 us, twice a restore): one parameter says the same
        # (transformers reads the first one's device too), and follows ``model.to``, which moves it in place.
        self._device_probe: torch.Tensor = next(model.parameters())
        self.windows = self._check_cache_layers()
        # An empty cache built from the config once; each restore copies it with fresh layers of the same kinds
        # (``DynamicCache(config=)`` reads the config's layer types again: ~0.1 ms a restore).
        self._empty_cache = DynamicCache(config=self.model.config)
        # Per device, a full-attention layer as ``lazy_initialization`` leaves it (see ``_full_layer``).
        self._layer_templates: dict[torch.device, DynamicLayer] = {}
        self.cache_kwarg = cache_kwarg(model)
        # The arena is registered with CUDA on the model's device (a store that cannot pin, such as a
        # test double, is copied through the same kernels' correct fallback).
        pin_for = getattr(store, "pin_for", None)
        if pin_for is not None:
            pin_for(model.device)
        # CUDA work in flight on the arena: (event, what to do once it completed): release leases, commit.
        self._pending: list[tuple[torch.cuda.Event, Any]] = []
        self._save_stream: torch.cuda.Stream | None = None

    def _check_cache_layers(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (``None``: full attention); ``UnsupportedModelError`` for other layers."""
        layers = self.new_cache().layers
        if len(layers) != self.layout.num_layers:
            raise UnsupportedModelError(
                f"the model's cache has {len(layers)} layers but its config says {self.layout.num_layers}")
        windows: list[int | None] = []
        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer:
                windows.append(None)
            elif type(layer) is DynamicSlidingWindowLayer:
                windows.append(int(layer.sliding_window))
            else:
                raise UnsupportedModelError(
                    f"layer {i} has a {type(layer).__name__} cache; kvtier restores only full and "
                    "sliding-window attention layers")
        return tuple(windows)

    def new_cache(self) -> DynamicCache:
        """An empty cache shaped like the one ``generate`` would build for this model."""
        return DynamicCache(config=self.model.config)

    @property
    def device(self) -> torch.device:
        """The model's device (that of its first parameter, as ``model.device`` says, without its module walk)."""
        return self._device_probe.device

    def _restore_cache(self, layers: list[Any] | None = None) -> DynamicCache:
        """``new_cache()``, from the template built at construction: the same attributes, and ``layers`` (a
        restore's) or else new layers of the kinds ``_check_cache_layers`` accepted (full attention, or a
        sliding window of the same size)."""
        cache = _copy_of(self._empty_cache)
        cache.layers = layers if layers is not None else [
            DynamicLayer() if window is None else DynamicSlidingWindowLayer(sliding_window=window)
            for window in self.windows]
        return cache

    def _full_layer(self, like: torch.Tensor) -> DynamicLayer:
        """A full-attention layer as ``lazy_initialization`` leaves it for K and V of ``like``'s dtype and device.

        Built once per device from empty tensors (it depends on nothing else of them); a restored layer is a
        copy of it with its K and V set, as ``lazy_initialization`` followed by setting them would leave it,
        without the two tensors that call builds per layer (5-10 us each after a model's forward).
        """
        template = self._layer_templates.get(like.device)
        if template is None:
            template = DynamicLayer()
            empty = like.new_empty(0)
            template.lazy_initialization(empty, empty)
            self._layer_templates[like.device] = template
        return template

    # -- requests ---------------------------------------------------------------------------------

    def _check_request(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise InvalidInputError("input_ids must be a [batch, tokens] tensor with at least one token")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise InvalidInputError("padded batches are not supported (the attention mask has zeros): "
                                    "pass the rows one at a time")
        num_tokens = input_ids.shape[1]
        for i, window in enumerate(self.windows):
            if window is not None and num_tokens > window - 1:
                raise UnsupportedModelError(
                    f"layer {i} attends to a sliding window of {window} tokens; a prompt of {num_tokens} tokens "
                    f"(more than {window - 1}) cannot be restored exactly")

    def block_keys(self, input_ids: torch.Tensor) -> list[list[bytes]]:
        """The keys of every whole block of each row of ``input_ids``."""
        return [self.hasher.keys(row) for row in input_ids.detach().cpu()]

    def restore(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> Restored:
        """A cache holding the longest stored prefix of ``input_ids`` (the same length for every row).

        Holds back at least ``min_tail_tokens`` tokens. Blocks are copied once, from the store's host slots
        into the per-layer cache tensors, on the model's device.
        """
        self._check_request(input_ids, attention_mask)
        return self._restore(input_ids, self.block_keys(input_ids))

    def _restore(self, input_ids: torch.Tensor, keys: list[list[bytes]]) -> Restored:
        started = time.perf_counter()
        # Saves of earlier requests become readable here (their copies finished long ago in practice).
        self._settle(wait=True)
        start = None
        device = self.device
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(device))
        max_tokens = input_ids.shape[1] - self.min_tail_tokens
        if max_tokens <= 0:
            return Restored(self._restore_cache(), 0, 0, (), time.perf_counter() - started)
        # Only the blocks that can be used (the last one may be cut to leave min_tail_tokens), so that no
        # disk read is started for the others.
        usable = -(-max_tokens // self.layout.block_tokens)
        lookups, leases = self._lookup_and_acquire([row_keys[:usable] for row_keys in keys])
        if not leases:
            return Restored(self._restore_cache(), 0, 0, (), time.perf_counter() - started)
        event = None
        layers = None
        try:
            # A block may have gone (evicted, corrupt on disk) between lookup and acquire: restore what all
            # rows still hold, contiguous from the start.
            num_blocks = min(len(lease.slots) for lease in leases)
            num_tokens = min(num_blocks * self.layout.block_tokens, max_tokens)
            if num_blocks:
                layers, event = self._fill(leases, num_blocks, num_tokens)
        finally:
            if event is None:
                self._release(leases)
            else:
                self._pending.append((event, lambda: self._release(leases)))
        return Restored(self._restore_cache(layers), num_tokens, num_blocks, lookups[0].tiers[:num_blocks],
                        time.perf_counter() - started, None if start is None or event is None else (start, event))

    def _lookup_and_acquire(self, keys: list[list[bytes]]) -> tuple[list[LookupResult], list[Lease]]:
        """Each row's lookup, then (if every row has a stored prefix) a lease on each row's first blocks, as
        many as the shortest prefix has; no leases if a row has none.

        Every row is looked up before any is acquired, so that the disk reads of all rows start at once. A
        single row goes through the store's ``lookup_acquire`` where its class defines one (``kvtier.Store``:
        one call instead of two for a prefix in host memory); not through a wrapper's attribute forwarding,
        which would skip the wrapper's own ``lookup`` and ``acquire``.
        """
        if len(keys) == 1 and getattr(type(self.store), "lookup_acquire", None) is not None:
            found, lease = self.store.lookup_acquire(keys[0])  # type: ignore[attr-defined]
            return [found], [lease] if lease.slots else []
        lookups = [self.store.lookup(row_keys) for row_keys in keys]
        num_blocks = min(result.num_blocks for result in lookups)
        if num_blocks == 0:
            return lookups, []
        return lookups, [self.store.acquire(row_keys[:num_blocks]) for row_keys in keys]

    def _rows_of(self, handles: Sequence[Lease | Reservation]) -> torch.Tensor:
        """The arena rows of ``handles``, checked for each: a daemon restart between them raises StaleHandleError."""
        rows = [self.store.slot_rows(handle) for handle in handles]
        return rows[0]

    def _release(self, leases: list[Lease]) -> None:
        for lease in leases:
            self.store.release(lease)

    def _settle(self, wait: bool) -> None:
        """Run the follow-up of CUDA work that completed (every one if ``wait``): releases and commits."""
        pending, self._pending = self._pending, []
        for event, follow_up in pending:
            if wait:
                event.synchronize()
            if wait or event.query():
                follow_up()
            else:
                self._pending.append((event, follow_up))

    def wait_saves(self) -> None:
        """Wait for every save and restore copy in flight, then commit and release what they held."""
        self._settle(wait=True)

    def _kv_bytes(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` uninitialised bytes (a contiguous uint8 tensor) on the model's device."""
        device = self.device
        if device.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        return self.restore_buffers.take(nbytes)

    def _fill(self, leases: list[Lease], num_blocks: int,
              num_tokens: int) -> tuple[list[Any], torch.cuda.Event | None]:
        """The cache layers holding the leased blocks' first ``num_tokens`` tokens; on CUDA, the event after
        which the leases may go.

        One copy of each block from its slot into the cache's layout, shared by every device: one kernel
        launch on CUDA (reading the registered arena in place), one strided copy per run of blocks on the CPU. Each
        layer's K and V are views of one ``[layer, plane, head, row, tokens, dim]`` tensor, seen by the copy as
        one segment per (layer, plane, head) whose pages are one block's ``[block tokens, dim]`` of one row,
        block id ``row * blocks + b``: a chunk (block ``b`` of row ``row``) in segment order is exactly a stored
        block, so a block moves between its slot and the cache in one copy.
        """
        layout = self.layout
        slots = [slot for lease in leases for slot in lease.slots[:num_blocks]]
        planes, heads, rows = 2 * layout.num_layers, layout.num_kv_heads, len(leases)
        tokens = num_blocks * layout.block_tokens
        kv = self._kv_bytes(planes * heads * rows * tokens * layout.head_dim * layout.torch_dtype.itemsize)
        PagedKV(kv.view(planes * heads, len(slots), -1)).scatter_from_slots(range(len(slots)), self._rows_of(leases),
                                                                            slots)
        event = None
        if kv.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(kv.device))
        # [layer * plane, head, row, tokens, dim] -> [row, head, num_tokens, dim] per layer and plane: views
        # (contiguous for one row), cut for every layer at once by one strided view (slicing each layer's took
        # ~40 ops a restore; a view, transpose and slice of the whole 15 us more than this after a forward).
        dim = layout.head_dim
        cut = kv.view(layout.torch_dtype).as_strided(
            (planes, rows, heads, num_tokens, dim),
            (heads * rows * tokens * dim, tokens * dim, rows * tokens * dim, dim, 1)).unbind(0)
        template = self._full_layer(cut[0])
        layers: list[Any] = []
        for window, keys, values in zip(self.windows, cut[0::2], cut[1::2], strict=True):
            if window is None:
                # K and V set directly: ``update`` would concatenate onto an empty tensor, a second full copy.
                layer = _copy_of(template)
                layer.keys, layer.values = keys, values
            else:
                layer = DynamicSlidingWindowLayer(sliding_window=window)
                layer.update(keys, values)
            layers.append(layer)
        return layers, event

    def save(self, input_ids: torch.Tensor, cache: DynamicCache, *, start_block: int = 0) -> int:
        """Save the whole blocks of ``input_ids`` from ``cache`` that the store lacks; the number written.

        ``cache`` must hold at least the prompt's tokens, computed by this model in forwards of at least
        ``min_tail_tokens`` tokens each (see the module docstring). Blocks before ``start_block`` are not
        looked at. On CUDA the copies run on a side stream: the blocks become readable once they completed
        (``wait_saves``, or the next restore, which waits for them).
        """
        self._check_request(input_ids, None)
        return self._save_keys(self.block_keys(input_ids), cache, start_block)

    def _save_after_forward(self, keys: list[list[bytes]], restored: Restored, num_tokens: int) -> int:
        if num_tokens - restored.num_tokens < MIN_ROWS:
            return 0
        return self._save_keys(keys, restored.cache, restored.num_blocks)

    def _save_keys(self, keys: list[list[bytes]], cache: DynamicCache, start_block: int) -> int:
        layout = self.layout
        self._settle(wait=False)
        layers: list[Any] = list(cache.layers)
        planes: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(layers):
            k, v = layer.keys, layer.values
            expected = (len(keys), layout.num_kv_heads, layout.head_dim)
            if k is None or v is None or (k.shape[0], k.shape[1], k.shape[3]) != expected or k.shape != v.shape:
                raise UnsupportedModelError(
                    f"layer {i}'s cache is not [batch, {layout.num_kv_heads}, tokens, {layout.head_dim}] K and V "
                    f"(got {None if k is None else tuple(k.shape)})")
            planes.append((k, v))
        wanted: dict[bytes, tuple[int, int]] = {}
        for row, row_keys in enumerate(keys):
            for block in range(start_block, len(row_keys)):
                wanted.setdefault(row_keys[block], (row, block))
        if not wanted:
            return 0
        needed = (max(block for _, block in wanted.values()) + 1) * layout.block_tokens
        for i, (layer, (k, _)) in enumerate(zip(layers, planes, strict=True)):
            # A sliding-window layer past its window keeps only its last tokens: its first rows are then not the
            # prompt's first tokens, and saving them would store another position's KV under the prompt's keys.
            if layer.get_seq_length() != k.shape[2]:
                raise InvalidInputError(f"layer {i} no longer holds the prompt: it keeps the last {k.shape[2]} of "
                                        f"{layer.get_seq_length()} tokens (a sliding window)")
            if k.shape[2] < needed:
                raise InvalidInputError(f"layer {i} holds {k.shape[2]} tokens, fewer than the prompt's {needed}")
        reservations = self._reserve(list(wanted))
        chosen = [(key, slot) for reservation in reservations for key, slot in zip(reservation.keys,
                                                                                 reservation.slots, strict=True)]
        if not chosen:
            return 0
        try:
            event = self._gather_blocks(planes, [wanted[key] for key, _ in chosen], [slot for _, slot in chosen],
                                        self._rows_of(reservations))
        except BaseException:
            for reservation in reservations:
                self.store.abort(reservation)
            raise
        if event is None:
            self._commit(reservations)
        else:
            self._pending.append((event, lambda: self._commit(reservations)))
        return len(chosen)

    def _reserve(self, keys: list[bytes]) -> list[Reservation]:
        """Slots for the absent ``keys``: all in one reservation, or (the host tier is short) one by one.

        One at a time, a prompt larger than the host tier still saves (older blocks are demoted meanwhile)
        and a refusal skips one block instead of the whole prompt.
        """
        try:
            return [self.store.reserve(keys)]
        except CapacityError:
            pass
        reservations: list[Reservation] = []
        for key in keys:
            try:
                reservations.append(self.store.reserve([key]))
            except CapacityError:
                continue
        return reservations

    def _commit(self, reservations: list[Reservation]) -> None:
        for reservation in reservations:
            self.store.commit(reservation)

    def _gather_blocks(self, planes: list[tuple[torch.Tensor, torch.Tensor]], where: list[tuple[int, int]],
                       slots: list[int], rows: torch.Tensor) -> torch.cuda.Event | None:
        """Copy block ``where[i] = (row, block)`` of the cache into ``slots[i]``; on CUDA, the completion event.

        On CUDA everything runs on a side stream that first waits for the forward's stream; the cache's
        tensors are tied to it (``record_stream``) so that their memory is not reused before it read them.
        Nothing here waits for the device: the kernels' tables go up from pinned buffers.
        """
        device = planes[0][0].device
        if device.type != "cuda":
            self._gather_rows(planes, where, slots, rows)
            return None
        if self._save_stream is None:
            self._save_stream = torch.cuda.Stream(device)
        stream = self._save_stream
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._gather_rows(planes, where, slots, rows)
            event = torch.cuda.Event()
            event.record(stream)
        for k, v in planes:
            k.record_stream(stream)
            v.record_stream(stream)
        return event

    def _gather_rows(self, planes: list[tuple[torch.Tensor, torch.Tensor]], where: list[tuple[int, int]],
                     slots: list[int], rows: torch.Tensor) -> None:
        """Per batch row, one ``gather_to_slots`` straight from the cache tensors: one copy of each block.

        Segments are (layer, plane, head) of that row, a page one block's ``[block tokens, dim]``.
        """
        layout = self.layout
        num_whole = planes[0][0].shape[2] // layout.block_tokens
        for row in sorted({row for row, _ in where}):
            positions = [i for i, (r, _) in enumerate(where) if r == row]
            segments = [tensor[row, head, : num_whole * layout.block_tokens].contiguous().view(torch.uint8)
                        .view(num_whole, -1) for pair in planes for tensor in pair
                        for head in range(layout.num_kv_heads)]
            PagedKV(segments).gather_to_slots([where[i][1] for i in positions], rows, [slots[i] for i in positions])

    @staticmethod
    def _check_no_cache(kwargs: dict[str, Any]) -> None:
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise InvalidInputError("the connector builds the cache itself: do not pass one")

    def prefill(self, input_ids: torch.Tensor, **model_kwargs: Any) -> Prefill:
        """Restore the stored prefix, run the model on the rest of the prompt, save the new whole blocks.

        ``model_kwargs`` go to the model's forward (``attention_mask`` must be all ones; ``position_ids``,
        if given, are for the whole prompt and are cut to the tail here).
        """
        self._check_no_cache(model_kwargs)
        self._check_request(input_ids, model_kwargs.get("attention_mask"))
        model_kwargs.pop("use_cache", None)
        keys = self.block_keys(input_ids)
        restored = self._restore(input_ids, keys)
        started = time.perf_counter()
        tail = restored.num_tokens
        if model_kwargs.get("position_ids") is not None:
            model_kwargs["position_ids"] = model_kwargs["position_ids"][:, tail:]
        with torch.no_grad():
            output = self.model(input_ids[:, tail:], use_cache=True, **{self.cache_kwarg: restored.cache},
                                **model_kwargs)
        forward_s = time.perf_counter() - started
        started = time.perf_counter()
        saved = self._save_after_forward(keys, restored, input_ids.shape[1])
        return Prefill(output, restored.cache, input_ids.shape[1], tail, restored.tiers, saved,
                       restored.restore_s, forward_s, time.perf_counter() - started, restored.span)

    def generate(self, input_ids: torch.Tensor, **generate_kwargs: Any) -> Any:
        """``model.generate`` with the prompt's stored prefix restored first and its new blocks saved.

        Returns what ``model.generate`` returns. Greedy search and sampling with one sequence per prompt;
        beam search and several return sequences change the cache's batch and are refused
        (``InvalidInputError``), as is a cache passed in by the caller.
        """
        beams = int(generate_kwargs.get("num_beams") or 1)
        if beams != 1 or int(generate_kwargs.get("num_return_sequences") or 1) != 1:
            raise InvalidInputError("generate through kvtier supports num_beams=1 and num_return_sequences=1")
        self._check_no_cache(generate_kwargs)
        self._check_request(input_ids, generate_kwargs.get("attention_mask"))
        keys = self.block_keys(input_ids)
        restored = self._restore(input_ids, keys)
        saver = _SaveAfterPrefill(self, keys, restored, input_ids.shape[1])
        processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
        processors.append(saver)
        generate_kwargs[self.cache_kwarg] = restored.cache
        return self.model.generate(input_ids, logits_processor=processors, **generate_kwargs)

