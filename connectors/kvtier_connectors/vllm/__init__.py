"""kvtier as a vLLM KV connector: ``KvtierConnector`` in module ``kvtier_connectors.vllm``.

Importing this package imports vLLM. docs/connectors/vllm.md has the recipe and the settings.
"""

from kvtier_connectors.vllm.connector import KvtierConnector

__all__ = ["KvtierConnector"]
