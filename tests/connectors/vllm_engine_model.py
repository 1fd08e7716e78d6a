"""A tiny random-weight Llama and its tokenizer, written offline for the real-engine vLLM tests.

Promises:
- ``write_tiny_llama(path)`` writes a model directory vLLM's ``LLM`` loads with no network: a
  ``LlamaForCausalLM`` (hidden 256, 4 layers, 2 KV heads, bf16) with weights drawn from a fixed seed, and a
  WordLevel tokenizer over the same vocabulary. The same call always writes the same weights.
- The tests send ``prompt_token_ids``, so the tokenizer only has to load.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 512
LAYERS = 4
KV_HEADS = 2
HEAD_DIM = 64


def write_tiny_llama(path: Path) -> Path:
    """Write the model and tokenizer into ``path`` (created) and return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # Random weights at the default scale give near-uniform logits; a larger scale makes greedy tokens depend
    # strongly on the KV, so a wrong restored block shows in the output.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(8.0)
    model.save_pretrained(path, safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(path)
    (path / "kvtier-test-model.json").write_text(json.dumps({"vocab": VOCAB, "layers": LAYERS}))
    return path
