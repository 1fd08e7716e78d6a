"""The transformers connector: restored KV is the saved KV, logits are the full forward's within noise.

Restored KV is checked with ``torch.equal``; logits after a restore against the contract (within the
dtype's tolerance, top-1 agreeing), never bit for bit: which rows a BLAS computes with other bits for
other row counts is the machine's, not kvtier's. ``kvtier_exact`` logits are bit-identical only where
``exact.verify`` holds on the machine running the test. Foreign KV is never restored. Tiny random
models (2 layers, hidden 64) keep the matrix of architectures x dtypes x attention implementations fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from kvtier import DiskConfig, HostConfig, InvalidInputError, LayoutMismatchError, Store, StoreConfig, Tier
from kvtier.config import KiB, MiB
from kvtier_connectors.transformers import (
    EXACT_ATTENTION,
    TransformersConnector,
    UnsupportedModelError,
    cache_kwarg,
    kv_layout,
    model_id_for,
    random_model,
)
from kvtier_connectors.transformers.contract import (
    RecordingStore,
    compare_logits,
    kv_prefix_equal,
    restored_kv_identical,
)
from kvtier_connectors.transformers.exact import verify
from kvtier_connectors.transformers.models import ARCHITECTURES, transformers_version_supported

BLOCK = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tokens(count: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (batch, count), generator=torch.Generator().manual_seed(seed))


def full_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids).logits[:, -1]
    return logits


def assert_matches_recompute(logits: torch.Tensor, expected: torch.Tensor, model: Any) -> None:
    """The model-level contract; bit-identity too for kvtier_exact where this machine verifies it."""
    agreement = compare_logits(logits, expected, model.dtype)
    assert agreement.within_noise and agreement.top1_agree, agreement
    if model.config._attn_implementation == EXACT_ATTENTION and verify(model):
        assert agreement.logits_identical, agreement


def host_store(model: Any, slots: int = 64) -> Store:
    layout = kv_layout(model, BLOCK)
    return Store(layout, StoreConfig(host=HostConfig(capacity_bytes=slots * max(4096, layout.block_bytes))))


def disk_store(model: Any, path: Path, slots: int = 64) -> Store:
    layout = kv_layout(model, BLOCK)
    disk = DiskConfig(paths=(str(path),), capacity_bytes=4 * MiB, region_bytes=256 * KiB, admission="admit_all",
                      write_mode="through")
    return Store(layout, StoreConfig(host=HostConfig(capacity_bytes=slots * max(4096, layout.block_bytes)),
                                     disk=disk))


@pytest.fixture
def llama() -> Any:
    return random_model("llama")


@pytest.fixture
def store(llama: Any) -> Iterator[Store]:
    with host_store(llama) as opened:
        yield opened


# -- exactness -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens", [48, 53], ids=["whole-blocks", "partial-block"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", EXACT_ATTENTION])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_restored_prefix_gives_the_full_forward_logits(arch: str, dtype: str, attn: str, num_tokens: int) -> None:
    model = random_model(arch, dtype=DTYPES[dtype], attn_implementation=attn)
    ids = tokens(num_tokens + 29)
    prompt = ids[:, :num_tokens]
    with host_store(model) as store:
        recorder = RecordingStore(store)
        connector = TransformersConnector(model, recorder)
        first = connector.prefill(prompt)
        assert (first.restored_tokens, first.saved_blocks) == (0, num_tokens // BLOCK)
        again = connector.prefill(prompt)
        assert again.restored_tokens == num_tokens - 16 and set(again.tiers) == {Tier.HOST}
        keys = connector.block_keys(ids)[0]
        assert restored_kv_identical(again.cache, store.layout, keys, again.restored_tokens, recorder.saved)
        assert_matches_recompute(again.logits[:, -1], full_logits(model, prompt), model)
        # A longer prompt continuing the first: its prefix was stored by a forward of another length.
        longer = connector.prefill(ids)
        assert longer.restored_tokens == num_tokens // BLOCK * BLOCK
        assert longer.saved_blocks == ids.shape[1] // BLOCK - num_tokens // BLOCK
        assert restored_kv_identical(longer.cache, store.layout, keys, longer.restored_tokens, recorder.saved)
        assert_matches_recompute(longer.logits[:, -1], full_logits(model, ids), model)


@pytest.mark.parametrize("attn", ["sdpa", EXACT_ATTENTION])
def test_generate_restores_and_matches_plain_generate(attn: str) -> None:
    model = random_model("llama", attn_implementation=attn)
    ids = tokens(45)
    settings: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False, "output_logits": True,
                                "return_dict_in_generate": True, "pad_token_id": 0}
    with torch.no_grad():
        plain = model.generate(ids, **settings)
    with host_store(model) as store:
        connector = TransformersConnector(model, store)
        cold = connector.generate(ids, **settings)
        assert store.lookup(connector.block_keys(ids)[0]).num_blocks == 45 // BLOCK
        warm = connector.generate(ids, **settings)
    assert torch.equal(cold.sequences, plain.sequences) and torch.equal(warm.sequences, plain.sequences)
    assert_matches_recompute(warm.logits[0], plain.logits[0], model)


def test_restore_holds_back_the_minimum_tail(llama: Any, store: Store) -> None:
    connector = TransformersConnector(llama, store)
    ids = tokens(40)
    connector.prefill(ids)
    assert connector.restore(ids).num_tokens == 24
    assert connector.restore(ids[:, :16]).num_tokens == 0  # nothing can be restored before the tail
    assert TransformersConnector(llama, store, min_tail_tokens=1).restore(ids).num_tokens == 39


def test_a_forward_of_fewer_than_16_tokens_saves_nothing(llama: Any, store: Store) -> None:
    connector = TransformersConnector(llama, store)
    assert connector.prefill(tokens(15)).saved_blocks == 0
    ids = tokens(40)
    connector.prefill(ids[:, :24])  # 3 blocks
    eager_restorer = TransformersConnector(llama, store, min_tail_tokens=1)
    result = eager_restorer.prefill(ids)  # restores 24, computes 16 rows: saved
    assert (result.restored_tokens, result.saved_blocks) == (24, 2)
    result = eager_restorer.prefill(tokens(44))  # the same first 40 tokens, then 4 rows of tail: not saved
    assert (result.restored_tokens, result.saved_blocks) == (40, 0)


def test_batch_of_equal_rows_restores_the_common_prefix(store: Store) -> None:
    # Row 0's first blocks come from a shorter prompt (bit-identical in fp32 only where kvtier_exact verifies).
    model = random_model("llama", attn_implementation=EXACT_ATTENTION)
    connector = TransformersConnector(model, store)
    ids = tokens(64, batch=2)
    connector.prefill(ids[:1, :40])  # row 0 has 5 blocks stored, row 1 none
    assert connector.prefill(ids).restored_tokens == 0
    again = connector.prefill(ids)
    assert again.restored_tokens == 48
    assert_matches_recompute(again.logits[:, -1], full_logits(model, ids), model)


def test_a_restore_reuses_the_memory_an_earlier_cache_gave_up_and_never_one_in_use(llama: Any, store: Store) -> None:
    """The restored tensors are freed at the cache's first forward: the next restore writes that memory."""
    connector = TransformersConnector(llama, store)
    ids, other = tokens(56), tokens(56, seed=2)
    saved = {prompt: connector.prefill(prompt).cache for prompt in (ids, other)}
    kept = connector.restore(ids)  # held by the caller: its memory is never handed out again
    for prompt in (other, ids, other):
        result = connector.prefill(prompt)
        assert result.restored_tokens == 40
        assert kv_prefix_equal(result.cache, saved[prompt], 40)
    assert kv_prefix_equal(kept.cache, saved[ids], 40)
    assert connector.restore_buffers.reused == 2 and connector.restore_buffers.allocated == 2


def test_a_restored_layer_is_what_lazy_initialization_and_setting_k_and_v_leave(llama: Any, store: Store) -> None:
    """Restored full-attention layers are copies of one initialised template: each its own object, with the
    attributes ``lazy_initialization`` sets for their K and V, and their own K and V."""
    from transformers.cache_utils import DynamicLayer

    connector = TransformersConnector(llama, store)
    ids = tokens(40)
    connector.prefill(ids)
    layers = connector.restore(ids).cache.layers
    assert len({id(layer) for layer in layers}) == len(layers)
    for layer in layers:
        expected = DynamicLayer()
        expected.lazy_initialization(layer.keys, layer.values)
        assert type(layer) is DynamicLayer and layer.is_initialized and layer.keys.shape[2] == 24
        assert {k: v for k, v in vars(layer).items() if k not in ("keys", "values")} == {
            k: v for k, v in vars(expected).items() if k not in ("keys", "values")}
    assert len({layer.keys.data_ptr() for layer in layers}) == len(layers)


def test_padded_batch_is_refused(llama: Any, store: Store) -> None:
    connector = TransformersConnector(llama, store)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :5] = 0
    with pytest.raises(InvalidInputError, match="padded"):
        connector.prefill(tokens(30, batch=2), attention_mask=mask)


def test_position_ids_are_cut_to_the_tail(llama: Any, store: Store) -> None:
    connector = TransformersConnector(llama, store)
    ids = tokens(50)
    connector.prefill(ids)
    again = connector.prefill(ids, position_ids=torch.arange(50)[None])
    assert again.restored_tokens == 34
    assert_matches_recompute(again.logits[:, -1], full_logits(llama, ids), llama)


# -- foreign KV -------------------------------------------------------------------------------------------


def test_another_model_with_the_same_layout_misses(llama: Any, store: Store) -> None:
    ids = tokens(48)
    TransformersConnector(llama, store).prefill(ids)
    other = random_model("llama", seed=1)
    assert kv_layout(other, BLOCK) == store.layout
    result = TransformersConnector(other, store).prefill(ids)
    assert result.restored_tokens == 0
    assert torch.equal(result.logits[:, -1], full_logits(other, ids))


def test_another_attention_implementation_misses(store: Store) -> None:
    ids = tokens(48)
    TransformersConnector(random_model("llama", attn_implementation="sdpa"), store).prefill(ids)
    eager = TransformersConnector(random_model("llama", attn_implementation="eager"), store)
    assert eager.restore(ids).num_tokens == 0


def test_a_store_of_another_layout_is_refused(llama: Any, store: Store) -> None:
    with pytest.raises(LayoutMismatchError):
        TransformersConnector(llama.to(torch.bfloat16), store)
    with pytest.raises(LayoutMismatchError):
        TransformersConnector(random_model("llama", num_hidden_layers=3), store)


def test_model_id_follows_weights_dtype_and_implementation() -> None:
    base = model_id_for(random_model("llama"))
    assert base == model_id_for(random_model("llama"))
    assert base.startswith("random-llama-seed0@")
    variants = [random_model("llama", seed=1), random_model("llama", dtype=torch.bfloat16),
                random_model("llama", attn_implementation="eager"), random_model("llama", rope_theta=500.0)]
    ids = {model_id_for(model) for model in variants}
    assert base not in ids and len(ids) == len(variants)


def test_weights_digest_samples_tensors_past_float_precision() -> None:
    from kvtier_connectors.transformers.adapter import _weights_digest

    big = torch.nn.Embedding(2**20 + 1, 17)  # more elements than a float32 index counts exactly
    digest = _weights_digest(big)
    with torch.no_grad():
        big.weight[-1, -1] += 1.0  # the last element is always sampled
    assert _weights_digest(big) != digest


# -- what cannot be restored exactly ----------------------------------------------------------------------


def test_sliding_window_within_the_window_is_exact_and_past_it_refused() -> None:
    model = random_model("mistral", sliding_window=40)
    with host_store(model) as store:
        connector = TransformersConnector(model, store)
        ids = tokens(39)
        connector.prefill(ids)
        again = connector.prefill(ids)
        assert again.restored_tokens == 23
        assert_matches_recompute(again.logits[:, -1], full_logits(model, ids), model)
        with pytest.raises(UnsupportedModelError, match="sliding window of 40"):
            connector.prefill(tokens(40))
        # A restore's cache, copied from the template, is the config's: same kinds, windows and attributes,
        # new layers each time (none shared with the template or an earlier restore).
        built, expected = connector._restore_cache(), connector.new_cache()
        assert [type(layer) for layer in built.layers] == [type(layer) for layer in expected.layers]
        assert [getattr(layer, "sliding_window", None) for layer in built.layers] == [
            getattr(layer, "sliding_window", None) for layer in expected.layers]
        assert {k: v for k, v in vars(built).items() if k != "layers"} == {
            k: v for k, v in vars(expected).items() if k != "layers"}
        assert not {id(layer) for layer in built.layers} & {id(layer) for layer in connector._restore_cache().layers}
        assert connector.device == model.device


def test_a_cache_whose_sliding_layers_dropped_the_prompt_is_never_saved() -> None:
    model = random_model("mistral", sliding_window=40)
    with host_store(model) as store:
        connector = TransformersConnector(model, store)
        ids = tokens(32)
        # A forward past the window: the sliding layers keep its last 39 tokens, no longer the prompt's first 32.
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.cat([ids, tokens(30, seed=2)], dim=1), use_cache=True, **{cache_kwarg(model): cache})
        assert all(layer.keys.shape[2] == 39 for layer in cache.layers)
        with pytest.raises(InvalidInputError, match="layer 0 no longer holds"):
            connector.save(ids, cache)
        assert store.lookup(connector.block_keys(ids)[0]).num_blocks == 0


def test_unknown_cache_layers_are_refused(llama: Any, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.cache_utils import DynamicLayer

    other_layer: Any = type("OtherLayer", (DynamicLayer,), {})
    original = TransformersConnector.new_cache

    def odd_cache(self: TransformersConnector) -> Any:
        cache = original(self)
        cache.layers[1] = other_layer()
        return cache

    monkeypatch.setattr(TransformersConnector, "new_cache", odd_cache)
    with pytest.raises(UnsupportedModelError, match="layer 1 has a OtherLayer cache"):
        TransformersConnector(llama, store)


def test_installed_transformers_is_in_the_supported_range() -> None:
    assert transformers_version_supported()
    assert transformers_version_supported("5.16.1") and transformers_version_supported("5.29.0")
    assert not transformers_version_supported("5.30.0") and not transformers_version_supported("4.57.1")


# -- disk tier ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", EXACT_ATTENTION])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_restore_from_disk_after_a_restart(tmp_path: Path, dtype: str, attn: str) -> None:
    model = random_model("llama", dtype=DTYPES[dtype], attn_implementation=attn)
    ids = tokens(53)
    with disk_store(model, tmp_path) as store:
        TransformersConnector(model, store).prefill(ids)
    with disk_store(model, tmp_path) as store:
        result = TransformersConnector(model, store).prefill(ids)
    assert result.restored_tokens == 37 and set(result.tiers) == {Tier.DISK}
    assert_matches_recompute(result.logits[:, -1], full_logits(model, ids), model)


def test_a_corrupt_disk_block_is_recomputed(tmp_path: Path) -> None:
    model = random_model("llama")
    ids = tokens(56)
    with disk_store(model, tmp_path) as store:
        TransformersConnector(model, store).prefill(ids)
    # Find block 2's payload in the data files by its bytes, and flip one byte in the middle of it.
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg(model): cache})
    layer0: Any = cache.layers[0]
    layer0_keys = layer0.keys[0, 0, 2 * BLOCK : 3 * BLOCK].contiguous()
    needle = layer0_keys.view(torch.uint8).numpy().tobytes()
    hits = 0
    for data_file in (p for p in tmp_path.rglob("*") if p.is_file()):
        raw = bytearray(data_file.read_bytes())
        offset = raw.find(needle)
        if offset >= 0:
            raw[offset + len(needle) // 2] ^= 0xFF
            data_file.write_bytes(bytes(raw))
            hits += 1
    assert hits == 1
    with disk_store(model, tmp_path) as store:
        result = TransformersConnector(model, store).prefill(ids)
    assert result.restored_tokens == 2 * BLOCK  # blocks 0 and 1; block 2 failed its checksum
    assert_matches_recompute(result.logits[:, -1], full_logits(model, ids), model)


def test_a_disk_directory_of_another_dtype_is_never_restored(tmp_path: Path) -> None:
    ids = tokens(48)
    model = random_model("llama")
    with disk_store(model, tmp_path) as store:
        TransformersConnector(model, store).prefill(ids)
    other = random_model("llama", dtype=torch.bfloat16)
    with pytest.raises(LayoutMismatchError):
        disk_store(other, tmp_path)


def test_a_device_restore_is_timed_to_its_copys_completion_not_its_queueing() -> None:
    """On CUDA ``restore_device_s`` reads the span of CUDA events on the forward's stream (after waiting)."""
    from kvtier_connectors.transformers.adapter import Prefill

    class Event:
        synchronized = False

        def synchronize(self) -> None:
            self.synchronized = True

        def elapsed_time(self, other: Event) -> float:
            assert other.synchronized, "read before the copy completed"
            return 42.0  # milliseconds, as CUDA reports them

    start, done = Event(), Event()
    timed = Prefill(None, DynamicCache(), 80, 64, (), 0, 0.001, 0.05, 0.0, (start, done))  # type: ignore[arg-type]
    assert timed.restore_device_s() == pytest.approx(0.042) and done.synchronized
    untimed = Prefill(None, DynamicCache(), 80, 64, (), 0, 0.001, 0.05, 0.0)
    assert untimed.restore_device_s() == 0.001
