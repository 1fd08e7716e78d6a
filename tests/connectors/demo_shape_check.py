"""The contract at the demo's model shape, as a script: run in-process and under other CPU kernel paths.

``python tests/connectors/demo_shape_check.py [float32|bfloat16 ...]`` (default both) prints one JSON
line per dtype and exits 0 when the contract held for every restore: a system prompt stored by one
conversation is restored into a second one, then the second's first turn into its longer second turn
(prefixes stored by prompts of other lengths, as in the demo). Checked: the restored KV equals the saved
KV (``torch.equal``), the logits are within the dtype's tolerance with the top-1 token agreeing, and
greedy continuations agree.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from transformers import DynamicCache

from kvtier import HostConfig, Store, StoreConfig
from kvtier_connectors.transformers import TransformersConnector, kv_layout, random_model
from kvtier_connectors.transformers.contract import (
    RecordingStore,
    compare_logits,
    greedy_continuation,
    restored_kv_identical,
)
from kvtier_connectors.transformers.demo import DEMO_MODEL

BLOCK_TOKENS = 32


def check(dtype: torch.dtype) -> dict[str, Any]:
    model = random_model("llama", dtype=dtype, **DEMO_MODEL)
    generator = torch.Generator().manual_seed(7)
    system = torch.randint(0, DEMO_MODEL["vocab_size"], (1, 128), generator=generator)
    first = torch.cat([system, torch.randint(0, DEMO_MODEL["vocab_size"], (1, 37), generator=generator)], dim=1)
    second = torch.cat([system, torch.randint(0, DEMO_MODEL["vocab_size"], (1, 61), generator=generator)], dim=1)
    second_turn = torch.cat([second, torch.randint(0, DEMO_MODEL["vocab_size"], (1, 83), generator=generator)], dim=1)
    layout = kv_layout(model, BLOCK_TOKENS)
    results = []
    with Store(layout, StoreConfig(host=HostConfig(capacity_bytes=64 * layout.block_bytes))) as store:
        recorder = RecordingStore(store)
        connector = TransformersConnector(model, recorder)
        connector.prefill(first, logits_to_keep=1)
        for prompt in (second, second_turn):
            result = connector.prefill(prompt, logits_to_keep=1)
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                full = model(prompt, use_cache=True, logits_to_keep=1, cache=cache).logits[:, -1]
            agreement = compare_logits(result.logits[:, -1], full, dtype)
            keys = connector.block_keys(prompt)[0]
            results.append({
                "restored_tokens": result.restored_tokens,
                "kv_identical": restored_kv_identical(result.cache, layout, keys, result.restored_tokens,
                                                      recorder.saved),
                "max_abs_logit_diff": agreement.max_abs_logit_diff, "tolerance": agreement.tolerance,
                "top1_agree": agreement.top1_agree, "logits_identical": agreement.logits_identical,
                "within_noise": agreement.within_noise,
                "greedy_agree": greedy_continuation(model, result.cache, result.logits[:, -1], 3)
                == greedy_continuation(model, cache, full, 3),
            })
    held = all(r["kv_identical"] and r["within_noise"] and r["top1_agree"] and r["greedy_agree"] for r in results)
    restored = [r["restored_tokens"] for r in results]
    return {"dtype": str(dtype), "restored_tokens": restored, "held": held and restored == [128, 160],
            "requests": results}


def main(argv: list[str]) -> int:
    outcomes = [check(getattr(torch, name)) for name in argv or ["float32", "bfloat16"]]
    for outcome in outcomes:
        print(json.dumps(outcome))
    return 0 if all(outcome["held"] for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
