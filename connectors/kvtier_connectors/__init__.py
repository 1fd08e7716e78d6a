"""Engine adapters built on kvtier's public API: ``kvtier_connectors.transformers``, ``.vllm`` and ``.sglang``."""
