"""kvtier as SGLang's HiCache storage backend: class ``KvtierStorage`` in module ``kvtier_connectors.sglang``.

Reading ``KvtierStorage`` imports SGLang; the settings and keys (``kvtier_connectors.sglang.settings``) do not.
docs/connectors/sglang.md has the launch command and the settings.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvtierStorage"]


def __getattr__(name: str) -> Any:
    if name == "KvtierStorage":
        from kvtier_connectors.sglang.storage import KvtierStorage

        return KvtierStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
