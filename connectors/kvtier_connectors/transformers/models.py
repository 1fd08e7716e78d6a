"""Models built from a config with seeded random weights (no download), and the transformers versions tested.

Promises:
- ``random_model(arch, ...)`` returns the same weights for the same arguments in every process (the
  seed drives a private generator state; the caller's global RNG is left as it was), in eval mode. With
  ``device="cuda"`` the weights are drawn on the GPU (seconds for a 1B-parameter model, not a minute of
  CPU): the same in every process there, not the CPU's.
- ``ARCHITECTURES`` are the configs the tests run the connector against: Llama, Qwen2 and Mistral.
- ``load_model(path)`` loads a local Hugging Face checkpoint directory (never the network).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kvtier import ConfigError

# The transformers releases this connector is tested against (pyproject's ``transformers`` extra).
SUPPORTED_TRANSFORMERS = ">=5.16,<5.30"

_ARCH: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
ARCHITECTURES = tuple(_ARCH)

# A tiny shape, so that the test matrix of architectures x dtypes x attention implementations stays fast.
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}


def transformers_version_supported(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) lies in ``SUPPORTED_TRANSFORMERS``."""
    parts = (version or transformers.__version__).split(".")
    major, minor = int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    return major == 5 and 16 <= minor < 30


def random_model(arch: str = "llama", *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                 seed: int = 0, device: str | torch.device = "cpu", **config_fields: Any) -> Any:
    """A causal LM of ``arch`` with seeded random weights on ``device``; ``config_fields`` override the tiny shape."""
    if arch not in _ARCH:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    config_cls, model_cls = _ARCH[arch]
    fields = {**TINY, **config_fields}
    config = config_cls(**fields)
    config._attn_implementation = attn_implementation
    config._name_or_path = f"random-{arch}-seed{seed}"
    device = torch.device(device)
    # fork_rng restores the generators of the devices it is given: the CPU's always, and the GPU's in use.
    gpus = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus, device_type="cuda"), device:
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype).eval()


def load_model(path: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> Any:
    """A causal LM from a local checkpoint directory, in ``dtype``, in eval mode."""
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                      local_files_only=True)
    return model.eval()
