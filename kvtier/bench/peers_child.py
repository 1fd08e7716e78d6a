"""One configuration of ``kvtier bench peers``, run in the peers environment's Python (vLLM's CPU engine).

``python -m kvtier.bench.peers_child model DIR`` writes the tiny random-weight Llama the bench serves (no
download). ``python -m kvtier.bench.peers_child run SPEC.json`` builds one offline ``LLM`` in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by the bench) with the spec's KV transfer settings, serves the
spec's prompts one request at a time (greedy) and prints one line ``RESULT {...}``.

Promises:
- Per request: the generated token ids, vLLM's ``num_cached_tokens`` (prefix caching is off unless the spec's
  engine arguments turn it on, so every cached token came from the connector), the time to first token
  (vLLM's own ``first_token_latency`` when the engine reports it, else the request's wall time, marked
  ``ttft_source: "wall"``) and the request's wall time.
- The process's peak RSS (``VmHWM``) and bytes it wrote to storage (``/proc/self/io`` ``write_bytes``), read
  after the last request; kvtier's store statistics for the embedded configuration.
- Nothing is caught: a configuration that cannot run exits non-zero with vLLM's or the peer's own traceback,
  which the bench reports as the reason.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

VOCAB = 512


def write_model(path: Path) -> None:
    """A ``LlamaForCausalLM`` (hidden 256, 4 layers, 2 KV heads of 64, bf16, fixed seed) and a WordLevel tokenizer."""
    import importlib

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    # Typed as Any: the peers environment's transformers (5.x) is not the one mypy sees.
    transformers: Any = importlib.import_module("transformers")
    path.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    # At the default scale random weights give near-uniform logits; scaled up, greedy tokens depend strongly on
    # the KV, so a wrong restored block shows in the tokens compared with the no-offload run.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(8.0)
    model.save_pretrained(path, safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


def _proc_field(path: str, name: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                value = line.split(":", 1)[1].split()[0]
                return int(value) * (1024 if path.endswith("status") else 1)
    except OSError:
        return None
    return None


def _first_token_s(output: Any) -> float | None:
    metrics = getattr(output, "metrics", None)
    latency = getattr(metrics, "first_token_latency", None)
    return float(latency) if isinstance(latency, int | float) and latency > 0 else None


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    engine_args = {"enable_prefix_caching": False, **spec.get("engine_args", {})}
    llm = LLM(model=spec["model"], dtype="bfloat16", seed=0, enforce_eager=True, compilation_config={"mode": 0},
              max_model_len=4096, max_num_batched_tokens=4096, disable_log_stats=False, **engine_args)
    result: dict[str, Any] = {"init_s": time.perf_counter() - started, "requests": []}
    params = SamplingParams(max_tokens=int(spec["max_tokens"]), temperature=0.0)
    for prompt in spec["prompts"]:
        begin = time.perf_counter()
        output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - begin
        first = _first_token_s(output)
        result["requests"].append({"tokens": list(output.outputs[0].token_ids),
                                   "cached": int(output.num_cached_tokens or 0), "prompt_tokens": len(prompt),
                                   "ttft_s": first if first is not None else seconds,
                                   "ttft_source": "vllm" if first is not None else "wall", "seconds": seconds})
    result["peak_rss_bytes"] = _proc_field("/proc/self/status", "VmHWM")
    result["write_bytes"] = _proc_field("/proc/self/io", "write_bytes")
    if spec.get("stats") == "embedded":
        from kvtier_connectors.vllm.settings import _stores

        result["stats"] = _stores[spec.get("instance", "default")].store.stats().to_dict()
    return result


if __name__ == "__main__":
    if sys.argv[1] == "model":
        write_model(Path(sys.argv[2]))
    else:
        with open(sys.argv[2]) as handle:
            print("RESULT " + json.dumps(run(json.load(handle))), flush=True)
