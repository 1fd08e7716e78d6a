"""Engine adapters built on kvtier's public API: ``kvtier_connectors.transformers`` and ``kvtier_connectors.vllm``."""
