"""The default ``model_id`` of an engine's connector: a name for the weights it serves, not for the string
that named them, and for the options that change the KV those weights compute.

Promises:
- ``model_identity(model, revision)`` is the same for every spelling of one model directory (relative or
  absolute path, through a symlink, a copy elsewhere) and for a hub id whose snapshot is in the local
  Hugging Face cache and that snapshot's directory: it hashes what identifies the weights, the directory's
  ``config.json`` and each weight file's name, size and first and last ``SAMPLE_BYTES`` (not whole files:
  a start-up must not read every weight; a fine-tune changes every tensor, so those bytes too).
- Different weights or configs in the same directory give different ids.
- A hub id without a local snapshot is named by its revision (``id@revision``, ``id@main`` by default); any
  other string is used as given.
- A directory's id is ``weights:`` and 16 hex digits of that hash (no path in it, so copies share).
- The engine's options that change the KV those weights compute without changing a file (weights quantized
  at load, overridden or other config: ``VLLM_KV_OPTIONS`` of vLLM's model config, ``SGLANG_KV_OPTIONS`` of
  SGLang's) are part of the id when set: ``+options:`` and 16 hex digits of their hash, the same in every
  process of the engine (a callable is named by its module and name).
- Each connector's ``model_id`` setting overrides all of this (docs/connectors/vllm.md, sglang.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

SAMPLE_BYTES = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_DOMAIN = b"kvtier-model-identity-v1"
# Fields of each engine's model config that change the KV a checkpoint's weights compute without changing
# its files (the revision is named with the hub id).
VLLM_KV_OPTIONS = ("quantization", "quantization_config", "hf_overrides", "hf_config_path")
SGLANG_KV_OPTIONS = ("quantization", "quantization_param_path", "modelopt_quant", "json_model_override_args",
                     "rl_quant_profile")


def _hash_directory(directory: Path) -> str:
    digest = hashlib.sha256(_DOMAIN)
    config = directory / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    weights = sorted(path for path in directory.iterdir() if path.name.endswith(_WEIGHT_SUFFIXES) and path.is_file())
    for path in weights:
        size = path.stat().st_size
        digest.update(f"\0{path.name}\0{size}\0".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                handle.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def _cached_snapshot(model: str, revision: str | None) -> Path | None:
    """The local Hugging Face cache's snapshot of hub id ``model``, if it holds its config."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(model, "config.json", revision=revision)
    except (ValueError, OSError):
        return None
    return Path(found).parent if isinstance(found, str) else None


def _describe(value: object) -> str:
    """A stand-in for a value JSON cannot hold, alike in every process (a callable's repr has its address)."""
    name = getattr(value, "__qualname__", None)
    if callable(value) and name:
        return f"{getattr(value, '__module__', '')}.{name}"
    return repr(value)


def model_identity(model: str, revision: str | None = None, options: Mapping[str, object] | None = None) -> str:
    """The default ``model_id`` of the model an engine was started with (its model path or hub id and revision),
    with those of its ``options`` (its ``*_KV_OPTIONS`` model config fields) that are set."""
    identity = _checkpoint_identity(model, revision)
    # An override of nothing ("{}", SGLang's default) is not set.
    chosen = {name: value for name, value in (options or {}).items() if value and value != "{}"}
    if not chosen:
        return identity
    encoded = json.dumps(chosen, sort_keys=True, default=_describe).encode()
    return f"{identity}+options:{hashlib.sha256(_DOMAIN + encoded).hexdigest()[:16]}"


def _checkpoint_identity(model: str, revision: str | None) -> str:
    path = Path(model).expanduser()
    directory = path.resolve() if path.is_dir() else None
    if directory is None and not os.path.isabs(model) and model.count("/") == 1:
        directory = _cached_snapshot(model, revision)
        if directory is None:
            return f"{model}@{revision or 'main'}"
    if directory is None:
        return model
    return f"weights:{_hash_directory(directory)}"
