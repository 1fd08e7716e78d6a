"""The restore contract: measured as promised, at the demo's model shape, under several CPU kernel paths.

The demo's shape runs here with the native kernels, and in subprocesses with others forced (ATen's
default kernels without vector ISA; MKL and oneDNN capped at AVX2, the path of a CPU without AVX-512), so
that the suite checks the contract on more than the one kernel family of the machine running it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from kvtier import HostConfig, Store, StoreConfig
from kvtier_connectors.transformers import TransformersConnector, kv_layout, random_model
from kvtier_connectors.transformers.contract import (
    RTOL,
    RecordingStore,
    compare_logits,
    greedy_continuation,
    restored_kv_identical,
    tolerance,
)
from kvtier_connectors.transformers.exact import NAME as EXACT_ATTENTION
from kvtier_connectors.transformers.exact import verify

CHECK = Path(__file__).with_name("demo_shape_check.py")
KERNEL_PATHS = {
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl-onednn-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def load_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_shape_check", CHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_contract_holds_at_the_demo_shape_with_the_native_kernels(dtype: torch.dtype) -> None:
    outcome = load_check().check(dtype)
    assert outcome["held"] and all(r["kv_identical"] for r in outcome["requests"]), outcome


@pytest.mark.parametrize("kernels", list(KERNEL_PATHS))
def test_the_contract_holds_at_the_demo_shape_under_other_kernel_paths(kernels: str) -> None:
    env = {**os.environ, **KERNEL_PATHS[kernels]}
    done = subprocess.run([sys.executable, str(CHECK), "float32"], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    outcomes = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and len(outcomes) == 1, (done.stdout, done.stderr[-2000:])
    assert outcomes[0]["held"] and all(r["kv_identical"] for r in outcomes[0]["requests"]), outcomes[0]


def test_the_check_fails_on_restored_kv_that_is_not_what_was_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    check = load_check()
    original, original_pair = Store.acquire, Store.lookup_acquire

    def corrupt(store: Store, lease: Any) -> Any:
        for slot in lease.slots[2:3]:
            store.slot_view(slot)[11] *= 1.5
        return lease

    def corrupting_acquire(self: Store, keys: Any, timeout: float | None = None) -> Any:
        return corrupt(self, original(self, keys, timeout))

    def corrupting_pair(self: Store, keys: Any) -> Any:
        found, lease = original_pair(self, keys)
        return found, corrupt(self, lease)

    monkeypatch.setattr(Store, "acquire", corrupting_acquire)
    monkeypatch.setattr(Store, "lookup_acquire", corrupting_pair)
    outcome = check.check(torch.float32)
    assert not outcome["held"] and not any(r["kv_identical"] for r in outcome["requests"])


# -- the measures themselves -------------------------------------------------------------------------


def test_tolerance_is_stated_per_dtype_and_scales_with_the_logits() -> None:
    assert RTOL[torch.float32] < RTOL[torch.float16] < RTOL[torch.bfloat16]
    small = torch.tensor([[0.1, -0.2]])
    assert tolerance(torch.float32, small) == RTOL[torch.float32]  # at least 1 x rtol
    assert tolerance(torch.bfloat16, small * 40) == pytest.approx(8 * RTOL[torch.bfloat16])


def test_compare_logits_says_identical_only_for_torch_equal() -> None:
    reference = torch.tensor([[3.0, 1.0, 0.5]])
    same = compare_logits(reference.clone(), reference, torch.float32)
    assert same.logits_identical and same.within_noise and same.max_abs_logit_diff == 0.0
    noisy = compare_logits(reference + 1e-7, reference, torch.float32)
    assert not noisy.logits_identical and noisy.within_noise and noisy.top1_agree
    far = compare_logits(reference + torch.tensor([[0.0, 0.01, 0.0]]), reference, torch.float32)
    assert far.top1_agree and not far.within_noise  # beyond fp32 noise: a violation whatever the top-1
    flipped = compare_logits(torch.tensor([[1.0, 3.0, 0.5]]), reference, torch.bfloat16)
    assert not flipped.top1_agree and not flipped.within_noise


def test_a_near_tie_may_flip_the_top_1_within_noise() -> None:
    reference = torch.tensor([[2.0, 2.0 - 1e-5, 0.0]])
    flipped = compare_logits(torch.tensor([[2.0 - 1e-5, 2.0, 0.0]]), reference, torch.float32)
    assert not flipped.top1_agree and flipped.top1_margin == pytest.approx(1e-5, rel=0.01) and flipped.within_noise


@pytest.fixture
def llama() -> Any:
    return random_model("llama")


def test_recording_store_keeps_the_saved_kv_and_a_changed_restore_is_caught(llama: Any) -> None:
    ids = torch.randint(0, 512, (1, 56), generator=torch.Generator().manual_seed(3))
    layout = kv_layout(llama, 8)
    with Store(layout, StoreConfig(host=HostConfig(capacity_bytes=32 * 4096))) as store:
        recorder = RecordingStore(store)
        connector = TransformersConnector(llama, recorder)
        connector.prefill(ids)
        keys = connector.block_keys(ids)[0]
        assert set(recorder.saved) == set(keys)
        again = connector.prefill(ids)
        assert again.restored_tokens == 40
        assert restored_kv_identical(again.cache, layout, keys, 40, recorder.saved)
        again.cache.layers[1].values[0, 1, 33, 5] += 1e-6  # one element of block 4
        assert not restored_kv_identical(again.cache, layout, keys, 40, recorder.saved)
        assert restored_kv_identical(again.cache, layout, keys, 32, recorder.saved)
        del recorder.saved[keys[0]]  # what cannot be checked is not called identical
        assert not restored_kv_identical(again.cache, layout, keys, 8, recorder.saved)


def test_recording_store_records_puts_of_absent_keys_only(llama: Any) -> None:
    layout = kv_layout(llama, 8)
    with Store(layout, StoreConfig(host=HostConfig(capacity_bytes=32 * 4096))) as store:
        recorder = RecordingStore(store)
        key = bytes(range(16))
        first = torch.full(layout.block_shape, 1.0)
        recorder.put([key], [first]).wait(10)
        recorder.put([key], [torch.full(layout.block_shape, 2.0)]).wait(10)  # deduplicated by the store
        assert torch.equal(recorder.saved[key], first)
        assert recorder.stats().put_blocks == 1  # anything else reaches the wrapped store


def test_greedy_continuation_decodes_from_the_cache(llama: Any) -> None:
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = llama.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, 20:].tolist()
        from transformers import DynamicCache

        cache = DynamicCache(config=llama.config)
        logits = llama(ids, use_cache=True, cache=cache).logits[:, -1]
    assert greedy_continuation(llama, cache, logits, 3) == expected


def test_exact_mode_is_claimed_only_where_verified(llama: Any) -> None:
    exact = random_model("llama", attn_implementation=EXACT_ATTENTION)
    assert isinstance(verify(exact), bool)  # the machine decides; nothing else relies on it

    # A model whose layer output depends on the sequence length is never verified exact.
    def length_dependent(module: Any, inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        shifted = hidden + 1e-6 * hidden.shape[1]
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

    handle = exact.model.layers[0].register_forward_hook(length_dependent)
    try:
        assert verify(exact) is False
    finally:
        handle.remove()
