"""kvtier for Hugging Face transformers: restore stored KV prefixes into a model's cache, byte for byte.

Exports ``TransformersConnector`` (``prefill``, ``generate``, ``restore``, ``save``) and its results
``Prefill`` and ``Restored``; ``BlockStore`` (the store methods it uses); ``kv_layout`` (the store layout
of a model); ``model_id_for`` (the key namespace of a model); ``cache_kwarg`` (the forward argument that
takes the cache in the installed transformers); ``EXACT_ATTENTION`` (kvtier's opt-in length-invariant attention,
registered with transformers on import); ``random_model`` and ``load_model`` (a model with seeded random
weights, or from a local checkpoint); ``UnsupportedModelError``; ``SUPPORTED_TRANSFORMERS`` (the
versions supported). Promises: ``kvtier_connectors.transformers.adapter``.
"""

from kvtier_connectors.transformers.adapter import (
    BlockStore,
    Prefill,
    Restored,
    TransformersConnector,
    UnsupportedModelError,
    cache_kwarg,
    kv_layout,
    model_id_for,
)
from kvtier_connectors.transformers.exact import NAME as EXACT_ATTENTION
from kvtier_connectors.transformers.exact import register as _register_exact_attention
from kvtier_connectors.transformers.models import SUPPORTED_TRANSFORMERS, load_model, random_model

_register_exact_attention()

__all__ = [
    "EXACT_ATTENTION", "SUPPORTED_TRANSFORMERS", "BlockStore", "Prefill", "Restored", "TransformersConnector",
    "UnsupportedModelError", "cache_kwarg", "kv_layout", "load_model", "model_id_for", "random_model",
]
