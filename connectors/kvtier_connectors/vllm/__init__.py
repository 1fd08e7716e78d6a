"""kvtier as a vLLM KV connector: ``KvtierConnector`` in module ``kvtier_connectors.vllm``.

``KvtierConnector`` (and with it vLLM) is imported on first access, so that the worker's data path
(``kvtier_connectors.vllm.worker``, ``bench_worker``) runs where vLLM is not installed.
docs/connectors/vllm.md has the recipe and the settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier_connectors.vllm.connector import KvtierConnector

__all__ = ["KvtierConnector"]


def __getattr__(name: str) -> Any:
    if name == "KvtierConnector":
        from kvtier_connectors.vllm.connector import KvtierConnector

        return KvtierConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
